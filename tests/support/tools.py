"""The operator tools the deployment tests run (hadolint, kubeconform, podman-compose, ...), found or failed for."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


def tool(name: str) -> str:
    """The tool next to this interpreter (installed into .venv) or on PATH; else fail."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (bash .ci/run installs it)")
    return found

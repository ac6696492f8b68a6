"""
The installed package, which the integration, slow and deploy tiers run (as an operator's install
would be run): its commands, and a check that it is this checkout's code, so that a change not yet
installed (``.venv/bin/pip install .``; ``.ci/run`` does it) fails loudly instead of being tested
as the old code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
_BIN = Path(sys.executable).parent
_checked: list[bool] = []


def script(name: str) -> str:
    """A console script of the installed package (``license-proxy``, ``license-proxy-status``)."""
    return str(_BIN / name)


def require_this_checkout() -> None:
    """Fail unless the package the interpreter imports outside the checkout is this checkout's."""
    if _checked:
        return
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run(
        [sys.executable, "-c", "import license_proxy; print(license_proxy.__file__)"],
        capture_output=True, text=True, cwd="/", env=env, timeout=60,
    )
    if found.returncode != 0:
        pytest.fail(f"license_proxy is not installed in {sys.prefix}: run {_BIN}/pip install .")
    installed = Path(found.stdout.strip()).parent
    source = REPO_ROOT / "license_proxy"
    ours = {p.relative_to(source): p.read_bytes() for p in source.rglob("*.py")}
    theirs = {p.relative_to(installed): p.read_bytes() for p in installed.rglob("*.py")}
    if ours != theirs:
        differ = sorted(str(n) for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
        pytest.fail(
            f"the installed license_proxy ({installed}) is not this checkout's ({', '.join(differ)}"
            f" differ): remove {REPO_ROOT}/build (an old build is copied into new wheels), then run"
            f" {_BIN}/pip install --force-reinstall --no-deps {REPO_ROOT}"
        )
    _checked.append(True)

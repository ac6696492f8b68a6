"""The shipped Prometheus alerting rules are valid and fire when they should (promtool)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "etc" / "prometheus"


def promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    if tool is None:
        # Never a skip: .ci/run installs it, and rules nobody checked must not pass.
        pytest.fail("promtool not found: install Debian's prometheus package (.ci/run does)")
    done = subprocess.run([tool, *args], cwd=RULES, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rules_are_valid():
    assert "SUCCESS: 4 rules found" in promtool("check", "rules", "alerts.yaml")


def test_rules_fire_as_documented():
    promtool("test", "rules", "alerts.test.yaml")

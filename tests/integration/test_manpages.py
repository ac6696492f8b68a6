"""
The man pages in ``man/`` (installed from the wheel's data into ``share/man``) are what Sphinx
builds from ``docs/man/`` now.  They are committed rather than built with the wheel so that a
build needs no Sphinx; this test is what keeps them in sync.  After a change to docs/man/:

    .venv/bin/python -m sphinx -q -b man -d /tmp/man-doctrees docs man
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGES = ("license-proxy.8", "license-proxy-status.1")


def normalised(text: str) -> str:
    """Without what changes by itself: the build's date and docutils' version."""
    text = re.sub(r'^(\.TH "[^"]*" "\d") "[^"]*"', r"\1", text, flags=re.M)
    return re.sub(r"^\.\\\" by the Docutils .* manpage writer\.$", "", text, flags=re.M)


def test_committed_man_pages_are_what_sphinx_builds(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", "man",
         "-d", str(tmp_path / "doctrees"), str(REPO / "docs"), str(tmp_path / "man")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "man").iterdir()) == sorted(PAGES)
    for page in PAGES:
        built = normalised((tmp_path / "man" / page).read_text())
        committed = normalised((REPO / "man" / page).read_text())
        assert committed == built, f"man/{page} is stale: rebuild it (see this file's docstring)"

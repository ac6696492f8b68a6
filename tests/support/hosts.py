"""
A name resolved by a hosts file of the test's own: each proxy runs in a private mount namespace
with the file bound over /etc/hosts (the machine's is untouched), and the test rewrites it in
place to make names appear, change and go.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")


def private_hosts(hosts: Path) -> tuple[str, ...]:
    """The ``wrapper`` of a ``ProxyProcess`` that reads ``hosts`` as /etc/hosts."""
    return ("unshare", "--mount", "sh", "-c", f'mount --bind "{hosts}" /etc/hosts && exec "$@"', "sh")


def rewrite(hosts: Path, text: str) -> None:
    """New contents, written in place: the bind mounts hold this inode."""
    with open(hosts, "w") as f:
        f.write(text)

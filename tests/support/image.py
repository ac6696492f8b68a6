"""
The image under test, built once per test session from ``Containerfile`` with buildah, and the
helpers the container tests share.

No image registry is reachable here, so the base is a stand-in made from Debian's packages
(python3 + python3-venv, like the official slim image: a Debian with a Python >= 3.11), passed
through the Containerfile's ``PYTHON_IMAGE`` argument.  It is kept in local storage as
``localhost/license-proxy-stand-in-python:bookworm`` and reused by later runs; remove it
(``buildah rmi``) to make it again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = "localhost/license-proxy-stand-in-python:bookworm"
# Per run: two runs on one machine (shared image storage) must not meet.
IMAGE = f"localhost/license-proxy:test-{os.getpid()}"
UID = 10001
# The readiness probe of the vendor's Helm chart, character for character.
VENDOR_PROBE = (
    "curl --silent http://localhost:8080/v1/status | grep --quiet -e "
    "'^{.*\"state\":\"\\(Connected\\|TrustBased\\)\".*}$'"
)


def run(*args, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def require_tools():
    if os.geteuid() != 0:
        pytest.fail("the container tests need root (buildah, debootstrap, ip netns)")
    missing = [t for t in ("buildah", "debootstrap", "ip") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)} (.ci/run installs them)")


def pip_ca_bundle() -> str:
    """The CA bundle pip uses on this machine (PIP_CERT, pip's config, or the system's)."""
    cert = os.environ.get("PIP_CERT")
    if not cert:
        got = run("python3", "-m", "pip", "config", "get", "global.cert", check=False)
        cert = got.stdout.strip() if got.returncode == 0 else ""
    return cert or "/etc/ssl/certs/ca-certificates.crt"


def make_base(workdir: Path) -> None:
    if run("buildah", "images", "--quiet", BASE, check=False).stdout.strip():
        return
    rootfs = workdir / "rootfs"
    run(
        "debootstrap", "--variant=minbase", "--include=python3,python3-venv",
        "bookworm", str(rootfs), "http://deb.debian.org/debian",
    )
    shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
    ctr = run("buildah", "from", "scratch").stdout.strip()
    try:
        mnt = run("buildah", "mount", ctr).stdout.strip()
        run("cp", "-a", f"{rootfs}/.", mnt)
        run("buildah", "umount", ctr)
        run("buildah", "config", "--env", "LANG=C.UTF-8", "--cmd", '["python3"]', ctr)
        run("buildah", "commit", "--quiet", ctr, BASE)
    finally:
        run("buildah", "rm", ctr, check=False)
        shutil.rmtree(rootfs, ignore_errors=True)




def wait_for(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)

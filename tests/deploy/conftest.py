"""The image, built once for every container test of the session (the build is slow)."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.image import BASE, IMAGE, REPO, make_base, pip_ca_bundle, require_tools, run
from tests.support.installed import require_this_checkout


@pytest.fixture(autouse=True, scope="session")
def _installed_is_this_checkout():
    """This tier runs the installed package: it must be this checkout's."""
    require_this_checkout()


@pytest.fixture(scope="session")
def image(tmp_path_factory):
    """Builds the image; its Docker-format config (Cmd, User, Healthcheck, ...)."""
    require_tools()
    workdir = tmp_path_factory.mktemp("image")
    started = time.monotonic()
    make_base(workdir)
    base_done = time.monotonic()
    # pip inside the build reaches the package registry as pip does here: same CA bundle.
    pip_conf = workdir / "pip.conf"
    pip_conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    run(
        "buildah", "bud", "--isolation", "chroot", "--network", "host", "--format", "docker",
        "--build-arg", f"PYTHON_IMAGE={BASE}",
        "--volume", f"{pip_ca_bundle()}:/etc/ssl/certs/ca-certificates.crt:ro",
        "--volume", f"{pip_conf}:/etc/pip.conf:ro",
        "--tag", IMAGE, "--file", str(REPO / "Containerfile"), str(REPO),
        timeout=900,
    )
    print(f"\nbase image {base_done - started:.0f} s, build {time.monotonic() - base_done:.0f} s")
    inspected = json.loads(run("buildah", "inspect", "--type", "image", IMAGE).stdout)
    yield inspected["Docker"]["config"]
    run("buildah", "rmi", IMAGE, check=False)  # 300+ MB: not left behind



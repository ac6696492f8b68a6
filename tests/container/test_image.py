"""
The container image, built from ``Containerfile`` with buildah and run as operators run it.

Slow (a Debian base made with debootstrap, then a real build that fetches wheels), so it is
its own target: ``.venv/bin/python -m pytest tests/container`` (``.ci/run`` runs it after the
other tests).  Needs root, buildah, debootstrap, iproute2 and the package registry.

No image registry is reachable here, so the base is a stand-in made from Debian's packages
(python3 + python3-venv, like the official slim image: a Debian with a Python >= 3.11), passed
through the Containerfile's ``PYTHON_IMAGE`` argument.  It is kept in local storage as
``localhost/license-proxy-stand-in-python:bookworm`` and reused by later runs; remove it
(``buildah rmi``) to make it again.  The image runs with ``buildah run --isolation chroot``
(podman's runtime can't start containers here) inside a network namespace of the test's own,
so it listens on its real ports 8443 and 8080 without meeting anything else on this machine;
the license server is the demo server shipped in the image, in the same namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

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


@pytest.fixture(scope="module")
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


def test_image_metadata(image):
    assert image["User"] == f"{UID}:{UID}"
    assert set(image["ExposedPorts"]) == {"8443/tcp", "8080/tcp"}
    assert list(image["Volumes"]) == ["/var/lib/license-proxy"]
    assert image["Cmd"] == [
        "twistd", "--nodaemon", "--pidfile=", "license-proxy", "--config", "/license-proxy.toml",
    ]
    assert image["Healthcheck"]["Test"][:2] == ["CMD", "sh"]
    assert "/v1/status" in image["Healthcheck"]["Test"][-1]


class Namespace:
    """A network namespace of this test's own, with loopback up."""

    def __init__(self):
        self.name = f"lp-image-{os.getpid()}"

    def __enter__(self):
        run("ip", "netns", "add", self.name)
        run("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc):
        run("ip", "netns", "del", self.name, check=False)

    def buildah_run(self, ctr, mounts, command, **kw):
        args = ["ip", "netns", "exec", self.name, "buildah", "run", "--isolation", "chroot",
                "--network", "host"]
        for host, inside in mounts:
            args += ["--volume", f"{host}:{inside}"]
        return args + [ctr, "--"] + list(command)


def descendants(pid: int) -> list[int]:
    """Pids of every process below ``pid`` (what ``buildah run`` started in the container)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
        except OSError:
            pass
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def twistd_below(pid: int) -> list[int]:
    """The Python process running twistd (not buildah's helper around it)."""
    found = []
    for p in descendants(pid):
        argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        if argv[0].endswith(b"python3") and argv[1].endswith(b"/twistd"):
            found.append(p)
    return found


def wait_for(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def test_runs_licenses_passes_probes_and_stops_on_sigterm(image, tmp_path):
    demo = tmp_path / "demo"      # the demo license server's CA and certificate
    state = tmp_path / "state"    # what a named volume would be
    demo.mkdir(mode=0o777)
    demo.chmod(0o777)
    state.mkdir(mode=0o700)
    os.chown(state, UID, UID)
    config = tmp_path / "license-proxy.toml"
    # The vendor's compose mounts exactly this file; default ports and cache path.
    config.write_text(
        '[license]\nserver_url = "https://localhost:9443"\nca_file = "/demo/ca.crt"\n'
    )
    ctr = run("buildah", "from", "--pull-never", IMAGE).stdout.strip()
    # buildah run mounts the image's own VOLUME and our --volume on the same directory in
    # no fixed order, so the state would land in either; drop the former from this
    # working container (the image keeps it: test_image_metadata).
    run("buildah", "config", "--volume", "/var/lib/license-proxy-", ctr)
    procs = []
    try:
        with Namespace() as ns:
            upstream_log = open(tmp_path / "upstream.log", "wb")
            procs.append(subprocess.Popen(
                ns.buildah_run(ctr, [(demo, "/demo")],
                               ["license-proxy-demo-upstream", "--dir", "/demo", "--port", "9443"]),
                stdout=upstream_log, stderr=subprocess.STDOUT,
            ))
            wait_for("the demo CA", lambda: (demo / "upstream.pid").exists(), 30)

            proxy_log_path = tmp_path / "proxy.log"
            proxy_log = open(proxy_log_path, "wb")
            procs.append(subprocess.Popen(
                ns.buildah_run(
                    ctr,
                    [(config, "/license-proxy.toml:ro"), (demo, "/demo:ro"),
                     (state, "/var/lib/license-proxy")],
                    image["Cmd"],
                ),
                stdout=proxy_log, stderr=subprocess.STDOUT,
            ))

            def in_container(command):
                return run(*ns.buildah_run(ctr, [], command), check=False, timeout=60)

            healthcheck = image["Healthcheck"]["Test"][1:]
            try:
                wait_for("the image's HEALTHCHECK to pass",
                         lambda: in_container(healthcheck).returncode == 0, 60)
            except AssertionError:
                raise AssertionError(proxy_log_path.read_text(errors="replace")) from None
            status = in_container(["curl", "--silent", "http://localhost:8080/v1/status"]).stdout
            assert json.loads(status)["state"] == "Connected", status
            assert in_container(["sh", "-c", VENDOR_PROBE]).returncode == 0
            # The probes of etc/kubernetes/deployment.yaml, run as the kubelet would.
            (container,) = yaml.safe_load(
                (REPO / "etc/kubernetes/deployment.yaml").read_text()
            )["spec"]["template"]["spec"]["containers"]
            assert in_container(container["readinessProbe"]["exec"]["command"]).returncode == 0
            assert container["livenessProbe"]["tcpSocket"]["port"] == "status"
            licensed = in_container(["curl", "--silent", "--show-error", "--insecure", "https://localhost:8443/v1/x"])
            assert licensed.returncode == 0, licensed.stderr
            assert json.loads(licensed.stdout)["license"] == "valid", licensed

            (pid,) = twistd_below(procs[1].pid)
            assert Path(f"/proc/{pid}").stat().st_uid == UID  # not root
            try:
                wait_for("the trust cache", lambda: (state / "trust-cache.json").exists(), 10)
            except AssertionError as e:
                raise AssertionError(
                    f"{e}: {sorted(os.listdir(state))}\n{proxy_log_path.read_text(errors='replace')}"
                ) from None
            assert {p.name for p in state.iterdir()} >= {"trust-cache.json", "tls.crt", "tls.key"}
            assert all(p.stat().st_uid == UID for p in state.iterdir())

            os.kill(pid, 15)
            wait_for("the proxy to exit after SIGTERM",
                     lambda: not Path(f"/proc/{pid}").exists(), 15)
            log = proxy_log_path.read_text(errors="replace")
            # Logs on stdout; a plugin cache made at build time; a clean stop.
            assert "state Ready -> Connected" in log, log
            assert "Unable to write to plugin cache" not in log, log
            assert "Traceback" not in log, log
            assert "Server Shut Down." in log, log
            cache = json.loads((state / "trust-cache.json").read_text())
            assert cache["last_successful_checkin"] is not None
    finally:
        for proc in procs:  # only what this test started, inside its containers
            for pid in descendants(proc.pid):
                try:
                    if Path(f"/proc/{pid}").stat().st_uid == UID:
                        os.kill(pid, 15)
                except OSError:
                    pass
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        run("buildah", "rm", ctr, check=False)

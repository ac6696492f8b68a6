"""
The container image, built from ``Containerfile`` with buildah and run as operators run it.

Slow (a Debian base made with debootstrap, then a real build that fetches wheels, once per
session: conftest.py), so it is its own target: ``.venv/bin/python -m pytest tests/deploy``
(``.ci/run`` runs it after the other tests).  Needs root, buildah, debootstrap, iproute2 and
the package registry.

Here the image runs with ``buildah run --isolation chroot`` inside a network namespace of the
test's own,
so it listens on its real ports 8443 and 8080 without meeting anything else on this machine;
the license server is the demo server shipped in the image, in the same namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from tests.support.image import IMAGE, REPO, UID, VENDOR_PROBE, run, wait_for


def test_image_metadata(image):
    assert image["User"] == f"{UID}:{UID}"
    assert set(image["ExposedPorts"]) == {"8443/tcp", "8080/tcp"}
    assert list(image["Volumes"]) == ["/var/lib/license-proxy"]
    # The vendor's command line: its compose files give only the arguments.
    assert image["Entrypoint"] == ["license-proxy"]
    assert image["Cmd"] == ["serve", "/license-proxy.toml"]
    assert image["Healthcheck"]["Test"][:2] == ["CMD", "sh"]
    assert "/v1/status" in image["Healthcheck"]["Test"][-1]


def test_man_pages_are_in_the_image_for_man_l(image):
    """The image carries the pages, not man(1): they are read on the host with ``man -l -``."""
    ctr = run("buildah", "from", "--pull-never", IMAGE).stdout.strip()
    try:
        for path, words in (
            ("/opt/license-proxy/share/man/man8/license-proxy.8", "drop-in License Proxy"),
            ("/opt/license-proxy/share/man/man1/license-proxy-status.1", "exit with it"),
        ):
            page = run("buildah", "run", "--isolation", "chroot", ctr, "--", "cat", path).stdout
            shown = subprocess.run(
                ["man", "-l", "-"], input=page, capture_output=True, text=True, timeout=60,
                env={"PATH": "/usr/bin:/bin", "MANPAGER": "cat", "MANWIDTH": "80"},
            )
            assert words in shown.stdout, shown.stdout + shown.stderr
        assert run("buildah", "run", "--isolation", "chroot", ctr, "--", "sh", "-c",
                   "command -v man", check=False).returncode != 0  # as docs/deploying.md says
    finally:
        run("buildah", "rm", ctr, check=False)


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


def proxy_below(pid: int) -> list[int]:
    """The Python process running the proxy (not buildah's helper around it)."""
    found = []
    for p in descendants(pid):
        argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        if argv[0].endswith(b"python3") and argv[1].endswith(b"/license-proxy"):
            found.append(p)
    return found


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
    run("buildah", "config", "--env", "DEEPGRAM_API_KEY=image-test-key", ctr)
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
                    image["Entrypoint"] + image["Cmd"],
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
            assert container["livenessProbe"]["tcpSocket"]["port"] == 8080
            licensed = in_container(["curl", "--silent", "--show-error", "--insecure", "https://localhost:8443/v1/x"])
            assert licensed.returncode == 0, licensed.stderr
            assert json.loads(licensed.stdout)["license"] == "valid", licensed

            (pid,) = proxy_below(procs[1].pid)
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

"""
etc/license-proxy.service under a real systemd: a Debian made with debootstrap, the program
installed into /opt/license-proxy as docs/deploying.md says, the unit enabled, booted with
systemd-nspawn (no systemd runs on these machines otherwise).  The container shares the
host's network, so the proxy reaches the test's TLS license server on loopback and the test
reaches the proxy on free ports.  Slow, hence in the container target.

The pristine debootstrapped tree is kept in /var/tmp/license-proxy-tests/ for later runs;
delete it to make it again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.proxy import free_port
from tests.support.processes import stop

REPO = Path(__file__).resolve().parents[2]
CACHED_ROOT = Path("/var/tmp/license-proxy-tests/bookworm-systemd")
KEY = "lk-systemd-test-0123456789"
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def make_root(root: Path, wheels: Path) -> None:
    if not CACHED_ROOT.exists():
        partial = CACHED_ROOT.with_name(CACHED_ROOT.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        run("debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus,python3,python3-venv",
            "bookworm", str(partial), "http://deb.debian.org/debian")
        partial.rename(CACHED_ROOT)
    run("cp", "-a", str(CACHED_ROOT), str(root))
    # debootstrap writes no /etc/hosts; an installed system has one, and "localhost" needs it.
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    # The install of docs/deploying.md: a venv at /opt/license-proxy, the plugin cache written as root.
    shutil.copytree(wheels, root / "tmp/wheels")
    run("chroot", str(root), "sh", "-c",
        "python3 -m venv /opt/license-proxy"
        " && /opt/license-proxy/bin/pip install -q --no-index --find-links /tmp/wheels license-proxy"
        " && /opt/license-proxy/bin/python -c 'from twisted.plugin import IPlugin, getPlugins;"
        " list(getPlugins(IPlugin))'"
        " && rm -rf /tmp/wheels")


class Machine:
    """A systemd-nspawn boot of ``root``; commands run inside through nsenter."""

    def __init__(self, root: Path, log: Path):
        self.log = open(log, "wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D", str(root), "--boot"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.pid1 = self._find_init()

    def _find_init(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.nspawn.poll() is None, "systemd-nspawn exited"
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit() and (entry / "comm").read_text().strip() == "systemd":
                        stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                        if int(stat[1]) == self.nspawn.pid:
                            return int(entry.name)
                except OSError:
                    continue
            time.sleep(0.2)
        raise AssertionError("no systemd started in the container")

    def sh(self, command: str, check=True) -> subprocess.CompletedProcess:
        return run("nsenter", "-t", str(self.pid1), "-a", "sh", "-c", command, check=check, timeout=60)

    def stop(self):
        stop(self.nspawn, timeout=30)  # nspawn asks the container's systemd to halt
        self.log.close()


def status(port: int) -> dict:
    with _direct.open(f"http://127.0.0.1:{port}/v1/status", timeout=2) as response:
        return json.loads(response.read())


def test_unit_runs_the_proxy_hardened_under_systemd(tmp_path, pki, upstream):
    if os.geteuid() != 0:
        pytest.fail("this test needs root (debootstrap, chroot, systemd-nspawn)")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (.ci/run installs it)")
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), str(REPO))
    root = tmp_path / "root"
    make_root(root, wheels)

    port, status_port = free_port(), free_port()
    etc = root / "etc/license-proxy"
    etc.mkdir()
    shutil.copy(pki.ca_cert, etc / "ca.crt")
    (etc / "license-proxy.toml").write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
status_port = {status_port}
[license]
server_url = "{upstream.url}"
ca_file = "/etc/license-proxy/ca.crt"
key = "${{DEEPGRAM_API_KEY}}"
""")
    env_file = etc / "license-proxy.env"
    env_file.write_text(f"DEEPGRAM_API_KEY={KEY}\n")
    env_file.chmod(0o600)
    shutil.copy(REPO / "etc/license-proxy.service", root / "etc/systemd/system/")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "license-proxy.service").symlink_to("/etc/systemd/system/license-proxy.service")

    machine = Machine(root, tmp_path / "nspawn.log")
    try:
        deadline = time.monotonic() + 60
        state = "no answer"
        while state != "Connected":
            assert time.monotonic() < deadline, (
                f"not Connected after 60 s ({state})\n"
                + machine.sh("journalctl -u license-proxy --no-pager", check=False).stdout
            )
            try:
                state = status(status_port)["state"]
            except OSError as e:
                state = str(e)
            time.sleep(0.5)
        # The key from the EnvironmentFile reached the check-in.
        assert upstream.requests[0].header("Authorization") == f"Token {KEY}"

        shown = machine.sh("systemctl show license-proxy -p MainPID -p User -p ActiveState").stdout
        props = dict(line.split("=", 1) for line in shown.split())
        assert props["ActiveState"] == "active"
        uid = machine.sh(f"stat -c %u /proc/{props['MainPID']}").stdout.strip()
        assert uid != "0"  # DynamicUser
        listing = machine.sh("ls -ln /var/lib/private/license-proxy").stdout
        assert "tls.crt" in listing and "tls.key" in listing
        assert all(line.split()[2] == uid for line in listing.splitlines()[1:])

        machine.sh("systemctl stop license-proxy")
        shown = machine.sh("systemctl show license-proxy -p Result -p ActiveState").stdout
        assert dict(line.split("=", 1) for line in shown.split()) == {
            "Result": "success", "ActiveState": "inactive",
        }
        journal = machine.sh("journalctl -u license-proxy --no-pager").stdout
        assert "state Ready -> Connected" in journal
        assert "Server Shut Down." in journal
        assert machine.sh("test -s /var/lib/private/license-proxy/trust-cache.json", check=False).returncode == 0
        for unwanted in (KEY, "Traceback", "plugin cache"):
            assert unwanted not in journal, journal
    finally:
        machine.stop()
        shutil.rmtree(root, ignore_errors=True)  # a whole Debian: don't keep it in /tmp

"""
Blue-green upgrade behind a real HAProxy (etc/haproxy.cfg, on free ports) with bin/blue-green:
two real twistd license-proxy processes, a client checking in continuously through HAProxy
the whole time, and not one failed check-in.
"""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
import sys
import threading
import time

import pytest

from tests.support.proxy import REPO_ROOT, ProxyProcess, free_port
from tests.support.processes import stop

SCRIPT = REPO_ROOT / "bin" / "blue-green"


def proxy_config(tmp_path, pki, upstream_url, port, status_port, startup="10s"):
    return f"""
[server]
host = "127.0.0.1"
port = {port}
status_port = {status_port}
[license]
server_url = "{upstream_url}"
ca_file = "{pki.ca_cert}"
timeout = "5s"
startup_timeout = "{startup}"
[trust]
checkin_interval = "2s"
[cache]
path = "{tmp_path}/state/trust-cache.json"
"""


class HAProxy:
    """etc/haproxy.cfg with its ports and socket moved to free ones, run in the foreground."""

    def __init__(self, tmp_path, blue: ProxyProcess, green: ProxyProcess):
        if shutil.which("haproxy") is None:
            pytest.fail("haproxy is not installed (.ci/run installs the Debian package)")
        self.port = free_port()
        self.socket = tmp_path / "haproxy.sock"
        text = (REPO_ROOT / "etc" / "haproxy.cfg").read_text()
        for shipped, ours in [
            ("/run/haproxy/license-proxy.sock", str(self.socket)),
            ("bind :8443", f"bind 127.0.0.1:{self.port}"),
            ("127.0.0.1:9443 check port 9080", f"127.0.0.1:{blue.port} check port {blue.status_port}"),
            ("127.0.0.1:9444 check port 9081", f"127.0.0.1:{green.port} check port {green.status_port}"),
        ]:
            assert shipped in text, shipped
            text = text.replace(shipped, ours)
        self.config = tmp_path / "haproxy.cfg"
        self.config.write_text(text)
        self.log = open(tmp_path / "haproxy.log", "wb")
        self.process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 10
            while not (self.socket.exists() and self.server_status("blue").startswith("UP")):
                assert self.process.poll() is None, (tmp_path / "haproxy.log").read_text()
                assert time.monotonic() < deadline, "HAProxy: no stats socket, or blue not UP"
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def server_status(self, name: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", "import sys, importlib.machinery as m;"
             "g = m.SourceFileLoader('bg', sys.argv[1]).load_module();"
             "print(g.HAProxy(sys.argv[2]).server('license_proxy', sys.argv[3])['status'])",
             str(SCRIPT), str(self.socket), name],
            capture_output=True, text=True, check=True,
        )
        return out.stdout.strip()

    def stop(self):
        stop(self.process)
        self.log.close()


class CheckInClient(threading.Thread):
    """Checks in through HAProxy on a fresh TLS connection every 20 ms, as containers do."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE  # the instances' self-signed certificates

    def run(self):
        deadline = time.monotonic() + 120  # bounded, whatever the test does
        while not self.stopping.is_set() and time.monotonic() < deadline:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=self.context)
            try:
                conn.request("POST", "/v1/check-in", body=b'{"n":1}')
                response = conn.getresponse()
                body = response.read()
                if response.status == 200 and body == b'{"license":"valid"}':
                    self.ok += 1
                else:
                    self.failures.append(f"{response.status} {body[:100]!r}")
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(f"{type(e).__name__}: {e}")
            finally:
                conn.close()
            time.sleep(0.02)

    def wait_for(self, count: int, timeout: float = 20):
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < deadline, f"only {self.ok} check-ins; failures {self.failures[:5]}"
            time.sleep(0.05)

    def finish(self):
        self.stopping.set()
        self.join(20)


def relays(proxy: ProxyProcess) -> int:
    return proxy.log_text().count("relay POST /v1/check-in")


def blue_green(haproxy, green, *extra, timeout=60):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--socket", str(haproxy.socket), "--backend",
         "license_proxy", "--old", "blue", "--new", "green",
         "--status-url", f"http://127.0.0.1:{green.status_port}/v1/status", *extra],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def blue(tmp_path, pki, upstream):
    upstream.respond(body=b'{"license":"valid"}')
    (tmp_path / "blue").mkdir()
    text = proxy_config(tmp_path / "blue", pki, upstream.url, free_port(), free_port())
    with ProxyProcess(tmp_path / "blue", text) as proxy:
        proxy.wait_state("Connected")
        yield proxy


def test_swap_blue_for_green_without_a_failed_check_in(tmp_path, pki, upstream, blue):
    (tmp_path / "green").mkdir()
    green = ProxyProcess(
        tmp_path / "green",
        proxy_config(tmp_path / "green", pki, upstream.url, free_port(), free_port()),
    )
    haproxy = HAProxy(tmp_path, blue, green)
    client = CheckInClient(haproxy.port)
    try:
        assert haproxy.server_status("green") == "MAINT"
        client.start()
        client.wait_for(20)
        green.start()
        result = blue_green(haproxy, green, "--stop", f"kill -TERM {blue.process.pid}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "new instance: Connected" in result.stdout
        assert blue.wait_exit(15) in (0, -15)
        during = relays(green)
        client.wait_for(50)
        client.finish()
        assert relays(green) > during  # check-ins after the swap went to green
        assert haproxy.server_status("blue") == "MAINT"
        assert haproxy.server_status("green").startswith("UP")
    finally:
        try:
            client.finish()
            if green.process is not None:
                green.terminate()
        finally:
            haproxy.stop()
    print(f"{client.ok} check-ins through HAProxy, {len(client.failures)} failed")
    assert client.failures == [], f"{len(client.failures)} failed of {client.ok + len(client.failures)}"
    assert client.ok > 70 and relays(blue) > 0
    assert "Traceback" not in blue.log_text() + green.log_text()


def test_green_that_cannot_reach_the_license_server_is_never_switched_to(tmp_path, pki, upstream, blue):
    (tmp_path / "green").mkdir()
    dead = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    green = ProxyProcess(
        tmp_path / "green",
        proxy_config(tmp_path / "green", pki, dead, free_port(), free_port(), startup="3s"),
    )
    haproxy = HAProxy(tmp_path, blue, green)
    client = CheckInClient(haproxy.port)
    try:
        client.start()
        client.wait_for(10)
        green.start()
        result = blue_green(haproxy, green, "--timeout", "8", "--stop", "false")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "not switching: license_proxy/blue keeps serving" in result.stdout
        assert green.wait_exit(10) == 1  # the start-up rule
        client.wait_for(10)
        assert haproxy.server_status("blue").startswith("UP")
        assert haproxy.server_status("green") == "MAINT"
        assert blue.running
    finally:
        try:
            client.finish()
        finally:
            haproxy.stop()
    assert client.failures == []

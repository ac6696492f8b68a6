"""
The demo license server (``license-proxy-demo-upstream``), run as a real process the way the
quickstart runs it, and a real ``twistd license-proxy`` on the config it writes: the quickstart
is the first thing a newcomer tries, so it is tested end to end.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from license_proxy import config as configuration
from tests.support.installed import script
from tests.support.proxy import ProxyProcess, free_port
from tests.support.client import exchange


def _context(cafile) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13+ does by default
    return context


class DemoUpstream:
    """One ``python -m license_proxy.demo`` process on a free port, with its directory."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.log_path = directory.parent / f"{directory.name}-upstream.log"
        self.process: subprocess.Popen | None = None

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def config_path(self) -> Path:
        return self.directory / "license-proxy.toml"

    @property
    def pid_file(self) -> Path:
        return self.directory / "upstream.pid"

    def start(self) -> "DemoUpstream":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        args = [script("license-proxy-demo-upstream"), "--dir", str(self.directory),
                "--port", str(self.port)]
        with open(self.log_path, "ab", buffering=0) as log:
            self.process = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 20) -> None:
        """Until the pid file names this process, which the server writes once it listens."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"demo server exited\n{self.log()}"
            try:
                if int(self.pid_file.read_text()) == self.process.pid:
                    return
            except (OSError, ValueError):
                pass
            assert time.monotonic() < deadline, f"demo server not listening\n{self.log()}"
            time.sleep(0.05)

    def terminate(self, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"demo server ignored SIGTERM\n{self.log()}") from None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def request(self, method="GET", path="/", body=None, headers=None, host="localhost"):
        conn = http.client.HTTPSConnection(
            host, self.port, context=_context(self.ca_file), timeout=5
        )
        return exchange(conn, method, path, body, headers)


@pytest.fixture
def demo(tmp_path):
    up = DemoUpstream(tmp_path / "demo")
    yield up
    if up.process is not None and up.process.poll() is None:
        up.terminate()


def test_answers_over_tls_verified_against_its_own_ca(demo):
    demo.start()
    before = datetime.now(timezone.utc)
    response, body = demo.request(
        "POST", "/v1/license?token=query-secret", body=b"{}",
        headers={"Authorization": "Token header-secret"},
    )
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    answer = json.loads(body)
    assert answer["license"] == "valid"
    assert answer["path"] == "/v1/license"
    issued = datetime.strptime(answer["issued_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=timezone.utc
    )
    assert before - timedelta(seconds=5) <= issued <= datetime.now(timezone.utc)
    # The certificate also names the IP, for users who curl it.
    response, _ = demo.request("GET", "/", host="127.0.0.1")
    assert response.status == 200
    # One line per request, method and path, no secrets.
    log = demo.log()
    assert re.search(r"^.*POST /v1/license$", log, re.MULTILINE), log
    assert "header-secret" not in log and "query-secret" not in log


def test_generated_config_points_the_proxy_at_it(demo):
    demo.start()
    loaded = configuration.load(str(demo.config_path), {})
    assert loaded.server_urls == (f"https://localhost:{demo.port}",)
    assert loaded.ca_file == str(demo.ca_file)
    assert loaded.cache_path == str(demo.directory / "state" / "trust-cache.json")
    assert (loaded.host, loaded.port, loaded.status_port) == ("127.0.0.1", 8443, 8080)
    assert (loaded.trust_duration, loaded.checkin_interval) == (120, 5)
    assert loaded.key == "demo-key"  # the proxy needs one, and demo.sh passes none
    # The demo values are explained where they are set.
    text = demo.config_path.read_text()
    for key in ("duration", "checkin_interval", "key"):
        before = text[: text.index(f"\n{key} =")]
        assert before.rsplit("\n", 1)[-1].startswith("#"), key


def test_second_start_reuses_ca_certificate_and_config(demo):
    demo.start()
    assert demo.terminate() == 0
    first = {name: (demo.directory / name).read_bytes()
             for name in ("ca.crt", "ca.key", "upstream.crt", "license-proxy.toml")}
    demo.start()
    for name, content in first.items():
        assert (demo.directory / name).read_bytes() == content, name
    response, _ = demo.request()
    assert response.status == 200


def test_sigterm_exits_cleanly_and_removes_the_pid_file(demo):
    demo.start()
    assert demo.pid_file.read_text().strip() == str(demo.process.pid)
    assert demo.terminate() == 0
    assert not demo.pid_file.exists()


def test_second_server_on_the_same_directory_refuses(demo, tmp_path):
    demo.start()
    other = DemoUpstream(demo.directory)
    other.log_path = tmp_path / "other.log"
    with pytest.raises(AssertionError, match="demo server exited"):
        other.start()
    assert other.process.wait(10) == 1
    assert "already running" in other.log()
    assert demo.pid_file.read_text().strip() == str(demo.process.pid)


def test_proxy_on_the_generated_config_goes_connected_then_trust_based(demo, tmp_path):
    demo.start()
    text = demo.config_path.read_text()
    text, n_port = re.subn(r"(?m)^port = \d+$", f"port = {free_port()}", text)
    text, n_status = re.subn(r"(?m)^status_port = \d+$", f"status_port = {free_port()}", text)
    cache = tmp_path / "proxy" / "state" / "trust-cache.json"
    text, n_path = re.subn(r"(?m)^path = .*$", f"path = {json.dumps(str(cache))}", text)
    assert (n_port, n_status, n_path) == (1, 1, 1)
    (tmp_path / "proxy").mkdir()
    # As demo.sh runs it: the key is the config's, with none in the environment.
    with ProxyProcess(tmp_path / "proxy", text, env={"DEEPGRAM_API_KEY": None}) as proxy:
        proxy.wait_state("Connected", timeout=30)
        status, _, fresh = proxy.request("GET", "/v1/anything")
        assert status == 200, fresh
        assert json.loads(fresh)["path"] == "/v1/anything"

        assert demo.terminate() == 0
        status, headers, cached = proxy.request("GET", "/v1/anything")
        assert status == 200, cached
        assert cached == fresh  # the same issued_at: the answer came from the trust cache
        assert headers["Age"] is not None
        proxy.wait_state("TrustBased", timeout=15)

"""
End to end: a real ``twistd license-proxy`` process, a real TLS upstream with
a CA the tests made, and a real HTTP client, all over loopback.  Each test
asserts what an operator or a container sees: status JSON, answers, exit
status, log lines, files on disk.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time

import pytest
from twisted.internet.task import Clock

from license_proxy.trustcache import TrustCache
from tests.support.configs import KEY, PROBE, config
from tests.support.faults import FAULTS
from tests.support.proxy import ProxyProcess
from tests.support.upstream import Upstream, relayed

@pytest.fixture
def proxy(tmp_path, pki, upstream):
    """A started proxy in front of ``upstream``, checking in every second."""
    text = config(tmp_path, pki, upstream.url, trust='duration = "1h"\ncheckin_interval = "1s"')
    with ProxyProcess(tmp_path, text) as p:
        yield p


def test_connected_at_start_and_relays(proxy, upstream):
    status = proxy.wait_state("Connected")
    assert PROBE.search(proxy.raw_status), proxy.raw_status
    assert list(status) == [
        "state", "last_successful_checkin", "trust_expiration", "state_since",
        "cache_persisted", "cache_error", "license_servers",
    ]
    assert status["license_servers"] == [
        {"server_url": upstream.url, "up": True, "down_since": None, "last_error": None}
    ]
    assert status["last_successful_checkin"].endswith("Z")
    assert upstream.requests[0].method == "GET" and upstream.requests[0].path == "/"

    upstream.respond(body=b'{"license":"valid"}')
    code, headers, body = proxy.request(
        "POST", "/v1/check?instance=7", body=b'{"n":1}', headers={"Authorization": "Token c1"}
    )
    assert (code, body) == (200, b'{"license":"valid"}')
    assert headers["Content-Type"] == "application/json"
    (seen,) = relayed(upstream, "/v1/check?instance=7")
    assert (seen.method, seen.body, seen.header("Authorization")) == ("POST", b'{"n":1}', "Token c1")
    assert seen.header("Host") == f"localhost:{upstream.port}"


def test_a_form_body_is_relayed_as_it_is_never_parsed(proxy, upstream):
    # twisted.web parses POSTed forms by default, and answers 400 itself to a multipart body
    # it cannot parse: the relay must pass any body on, whatever its Content-Type says.
    proxy.wait_state("Connected")
    body = b"not --really multipart"
    code, _, _ = proxy.request(
        "POST", "/v1/form", body=body, headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert code == 200
    (seen,) = relayed(upstream, "/v1/form")
    assert seen.body == body


def test_states_follow_an_outage_and_trust_expiry(tmp_path, pki, upstream):
    text = config(tmp_path, pki, upstream.url, trust='duration = "4s"\ncheckin_interval = "1s"')
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
        upstream.respond(body=b'{"license":"cached"}')
        assert proxy.request("GET", "/v1/lic")[0] == 200

        upstream.stop()
        code, headers, body = proxy.request("GET", "/v1/lic")
        assert (code, body) == (200, b'{"license":"cached"}')
        assert int(headers["Age"]) >= 0
        status = proxy.wait_state("TrustBased")
        assert PROBE.search(proxy.raw_status)
        assert status["trust_expiration"] > status["last_successful_checkin"]

        proxy.wait_state("Failed", timeout=10)
        assert not PROBE.search(proxy.raw_status)
        code, _, body = proxy.request("GET", "/v1/lic")
        assert code == 502 and "license server unavailable" in json.loads(body)["error"]

        upstream.start()
        proxy.wait_state("Connected", timeout=10)
        assert "state TrustBased -> Failed" in proxy.log_text()


def test_restart_with_a_cache_serves_trusted_answers(tmp_path, pki, upstream):
    text = config(tmp_path, pki, upstream.url, license=f'key = "{KEY}"')
    cache = tmp_path / "state" / "trust-cache.json"
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
        upstream.respond(body=b'{"license":"kept"}')
        assert proxy.request("GET", "/v1/lic", headers={"Authorization": "Token c1"})[0] == 200
        assert proxy.terminate() in (0, -15)
    assert "Traceback" not in proxy.log_text()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    saved = cache.read_bytes()
    assert json.loads(saved)["last_successful_checkin"] is not None
    for secret in (KEY.encode(), b"Token c1"):
        assert secret not in saved
        assert secret.decode() not in proxy.log_text()

    upstream.stop()
    with ProxyProcess(tmp_path, text) as again:
        status = again.wait_state("TrustBased")
        assert status["last_successful_checkin"] is not None
        code, headers, body = again.request("GET", "/v1/lic", headers={"Authorization": "Token c1"})
        assert (code, body) == (200, b'{"license":"kept"}')
        assert "Age" in headers
        assert again.request("GET", "/v1/lic", headers={"Authorization": "Token other"})[0] == 502


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_upstream_falls_back_to_trust_and_is_never_cached(proxy, upstream, pki, fault):
    proxy.wait_state("Connected")
    upstream.respond(body=b'{"license":"good"}')
    assert proxy.request("GET", "/v1/lic")[2] == b'{"license":"good"}'

    upstream.respond(body=b'{"license":"bad"}' + b" " * 200)
    FAULTS[fault](upstream, pki)
    # The trusted answer, whole, never a part of the broken one.
    code, headers, body = proxy.request("GET", "/v1/lic")
    assert (code, body) == (200, b'{"license":"good"}')
    assert "Age" in headers
    proxy.wait_state("TrustBased")
    # A request that was never answered well has nothing to fall back on.
    code, _, body = proxy.request("GET", "/v1/other")
    assert code == 502 and "license server unavailable" in json.loads(body)["error"], body

    # Nothing of the failures reached the trust cache.
    assert proxy.terminate() in (0, -15)
    cache = TrustCache.load(Clock(), str(proxy.tmp_path / "state" / "trust-cache.json"))
    assert cache.lookup(cache.key(b"GET", b"v1/lic", [])).body == b'{"license":"good"}'
    assert cache.lookup(cache.key(b"GET", b"v1/other", [])) is None


def test_an_answer_whose_end_is_uncertain_is_relayed_but_not_cached(proxy, upstream):
    proxy.wait_state("Connected")
    upstream.respond(body=b'{"license":"open-ended"}')
    upstream.mode = "until_close"
    assert proxy.request("GET", "/v1/lic")[:3:2] == (200, b'{"license":"open-ended"}')
    upstream.mode = "reset"
    assert proxy.request("GET", "/v1/lic")[0] == 502


@pytest.mark.parametrize(
    "cert, reason",
    [
        ("wrong_host", "certificate does not match"),
        ("unknown_ca_server", "certificate verify failed"),
        ("expired", "certificate"),
    ],
)
def test_an_unverified_upstream_is_never_sent_a_request(tmp_path, pki, cert, reason):
    with Upstream(getattr(pki, f"{cert}_cert"), getattr(pki, f"{cert}_key")) as bad:
        with ProxyProcess(tmp_path, config(tmp_path, pki, bad.url)) as proxy:
            assert proxy.wait_exit(timeout=20) == 1
            log = proxy.log_text()
        assert bad.requests == []
    assert "license server could not be reached within 3 s" in log
    assert reason in log, log
    assert "Traceback" not in log


def test_a_black_hole_at_start_times_out(tmp_path, pki, upstream):
    upstream.mode = "blackhole"
    with ProxyProcess(tmp_path, config(tmp_path, pki, upstream.url)) as proxy:
        assert proxy.wait_exit(timeout=20) == 1
    assert "no complete answer within 2 s" in proxy.log_text()
    assert upstream.requests == []


def test_startup_fails_without_upstream_or_cache(tmp_path, pki, upstream):
    upstream.stop()
    started = time.monotonic()
    with ProxyProcess(tmp_path, config(tmp_path, pki, upstream.url)) as proxy:
        assert proxy.wait_exit(timeout=20) == 1
        assert time.monotonic() - started >= 3
    lines = [line for line in proxy.log_text().splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "connection refused" in lines[0], proxy.log_text()


def test_the_licensing_port_opens_only_once_the_start_up_rule_holds(tmp_path, pki, upstream):
    """An instance still trying to reach the license server (and that may yet refuse to
    start) refuses connections: a load balancer or a container moves on at once, instead of
    getting a 502 from it."""
    upstream.stop()
    text = config(tmp_path, pki, upstream.url).replace('startup_timeout = "3s"', 'startup_timeout = "60s"')
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_status(lambda s: s.get("state") == "Ready", "state Ready")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, proxy.port), timeout=5).close()
        assert proxy.status()["state"] == "Ready"
        upstream.start()
        proxy.wait_state("Connected", timeout=30)
        assert proxy.request("GET", "/v1/opened")[0] == 200


def test_a_rejected_key_stops_the_start(tmp_path, pki, upstream):
    upstream.respond(status=401, body=b'{"error":"bad key"}')
    text = config(tmp_path, pki, upstream.url, license=f'key = "{KEY}"')
    with ProxyProcess(tmp_path, text) as proxy:
        assert proxy.wait_exit(timeout=20) == 1
    assert "the license server rejected the key (HTTP 401)" in proxy.log_text()
    assert upstream.requests[0].header("Authorization") == f"Token {KEY}"
    assert KEY not in proxy.log_text()


def test_the_key_comes_from_the_environment(tmp_path, pki, upstream):
    text = config(tmp_path, pki, upstream.url, license='key = "${DEEPGRAM_API_KEY}"')
    with ProxyProcess(tmp_path, text, env={"DEEPGRAM_API_KEY": KEY}) as proxy:
        proxy.wait_state("Connected")
    assert upstream.requests[0].header("Authorization") == f"Token {KEY}"


def test_mutual_tls_presents_the_client_certificate(tmp_path, pki):
    with Upstream(pki.server_cert, pki.server_key, client_ca_path=pki.client_ca_cert) as up:
        text = config(
            tmp_path,
            pki,
            up.url,
            license=f'client_cert = "{pki.client_cert}"\nclient_key = "{pki.client_key}"',
        )
        with ProxyProcess(tmp_path, text) as proxy:
            proxy.wait_state("Connected")
        assert up.requests[0].client_cn == pki.client_cn


def test_a_corrupt_cache_is_moved_aside(tmp_path, pki, upstream):
    state = tmp_path / "state"
    state.mkdir()
    (state / "trust-cache.json").write_bytes(b'{"format":1,"entries":')
    with ProxyProcess(tmp_path, config(tmp_path, pki, upstream.url)) as proxy:
        proxy.wait_state("Connected")
        log = proxy.log_text()
    assert "is corrupt" in log and "moved aside" in log
    aside = [p.name for p in state.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1


def test_it_is_not_an_open_proxy(proxy, upstream):
    proxy.wait_state("Connected")
    proxy.scheme = "https"
    raw = _raw_request(proxy, b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 404"), raw
    code, _, _ = proxy.request("GET", "/v1/ok", headers={"Host": "evil.example"})
    assert code == 200
    assert relayed(upstream, "/v1/ok")[0].header("Host") == f"localhost:{upstream.port}"
    assert relayed(upstream, "/steal") == []


def _raw_request(proxy, data: bytes) -> bytes:
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        with context.wrap_socket(sock) as tls:
            tls.sendall(data)
            return tls.recv(65536)


def test_the_generated_certificate_survives_a_restart(tmp_path, pki, upstream):
    text = config(tmp_path, pki, upstream.url)
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
    first = (tmp_path / "state" / "tls.crt").read_bytes()
    assert stat.S_IMODE((tmp_path / "state" / "tls.key").stat().st_mode) == 0o600
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
        served = _peer_certificate(proxy)
    assert (tmp_path / "state" / "tls.crt").read_bytes() == first
    assert served.strip() == first.decode().strip()


def test_the_generated_certificate_names_the_vendors_names_and_tls_names(tmp_path, pki, upstream):
    import ssl

    text = config(tmp_path, pki, upstream.url)
    env = {"POD_NAMESPACE": "licensing"}
    names = [
        "localhost", "license-proxy", "deepgram-license-proxy-internal",
        "deepgram-license-proxy-internal.licensing.svc",
        "deepgram-license-proxy-internal.licensing.svc.cluster.local", socket.gethostname(),
    ]
    with ProxyProcess(tmp_path, text, env) as proxy:
        proxy.wait_state("Connected")
        first = (tmp_path / "state" / "tls.crt").read_bytes()
        context = ssl.create_default_context(cadata=first.decode())
        for name in names:  # a client verifying the certificate and the name it dialled
            with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
                with context.wrap_socket(sock, server_hostname=name):
                    pass
        with pytest.raises(ssl.SSLCertVerificationError):
            with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
                context.wrap_socket(sock, server_hostname="proxy.example.com")
    # A name added to tls_names makes a new certificate at the next start; no change, none.
    more = text.replace("[server]\n", '[server]\ntls_names = ["proxy.example.com", "10.9.8.7"]\n')
    with ProxyProcess(tmp_path, more, env) as proxy:
        proxy.wait_state("Connected")
        second = (tmp_path / "state" / "tls.crt").read_bytes()
        assert second != first
        from cryptography import x509

        san = x509.load_pem_x509_certificate(second).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        assert "10.9.8.7" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        context = ssl.create_default_context(cadata=second.decode())
        for name in [*names, "proxy.example.com"]:
            with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
                with context.wrap_socket(sock, server_hostname=name):
                    pass
    with ProxyProcess(tmp_path, more, env) as proxy:
        proxy.wait_state("Connected")
    assert (tmp_path / "state" / "tls.crt").read_bytes() == second


def _peer_certificate(proxy) -> str:
    import ssl

    return ssl.get_server_certificate((proxy.host, proxy.port))


def test_plain_http_listener_with_tls_false(tmp_path, pki, upstream):
    text = config(tmp_path, pki, upstream.url, server="tls = false")
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
        assert proxy.request("GET", "/v1/x")[0] == 200


def test_sigterm_finishes_requests_in_flight(proxy, upstream):
    proxy.wait_state("Connected")
    upstream.respond(body=b'{"license":"late"}')
    upstream.mode = "hang"
    result = {}
    client = threading.Thread(target=lambda: result.update(answer=proxy.request("GET", "/v1/slow")))
    client.start()
    deadline = time.monotonic() + 10
    while not relayed(upstream, "/v1/slow") and time.monotonic() < deadline:
        time.sleep(0.02)
    proxy.process.send_signal(15)
    # The listener closes at once; the request in flight is still answered.
    deadline = time.monotonic() + 10
    while _accepts(proxy) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _accepts(proxy)
    upstream.mode = "normal"
    client.join(timeout=10)
    assert result["answer"][0] == 200 and result["answer"][2] == b'{"license":"late"}'
    assert proxy.wait_exit() in (0, -15)
    assert json.loads((proxy.tmp_path / "state" / "trust-cache.json").read_bytes())["entries"]


def _accepts(proxy) -> bool:
    try:
        socket.create_connection((proxy.host, proxy.port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "text, message",
    [
        ('[server]\nport = "abc"\n', "[server] port"),
        ("[server]\nprot = 1\n", "unknown key [server] prot"),
        ('[license]\nkey = "${NOPE_UNSET_VAR}"\n', "NOPE_UNSET_VAR"),
        ('[server]\ntls = false\ntls_cert = "/etc/hostname"\ntls_key = "/etc/hostname"\n', "tls = false"),
    ],
)
def test_a_bad_config_is_one_line_and_status_2(tmp_path, text, message):
    with ProxyProcess(tmp_path, text) as proxy:
        assert proxy.wait_exit() == 2
        output = proxy.log_text().strip()
    assert message in output
    assert len(output.splitlines()) == 1, output
    assert "Traceback" not in output


def test_a_bad_certificate_file_is_a_config_error(tmp_path, pki, upstream):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    text = config(tmp_path, pki, upstream.url, server=f'tls_cert = "{garbage}"\ntls_key = "{pki.server_key}"')
    with ProxyProcess(tmp_path, text) as proxy:
        assert proxy.wait_exit() == 2
    assert "[server] tls_cert: no PEM certificate" in proxy.log_text()
    assert "Traceback" not in proxy.log_text()


@pytest.fixture(autouse=True)
def _no_stray_state(tmp_path):
    yield
    assert not list(tmp_path.glob("state/*.tmp-*")), "a temporary cache file was left behind"


def _listen_queue(port: int) -> int:
    """The backlog of the socket listening on ``port`` (Send-Q of a LISTEN socket in ss)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    (line,) = out.splitlines()
    return int(line.split()[2])


@pytest.mark.parametrize("server, backlog", [("", 4096), ("backlog = 1000", 1000)])
def test_both_listeners_listen_with_the_configured_backlog(tmp_path, pki, upstream, server, backlog):
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    with ProxyProcess(tmp_path, config(tmp_path, pki, upstream.url, server=server)) as proxy:
        proxy.wait_state("Connected")
        assert proxy.request("GET", "/v1/opened")[0] == 200  # both listening
        queues = [_listen_queue(port) for port in (proxy.port, proxy.status_port)]
    assert queues == [min(backlog, somaxconn)] * 2


@pytest.mark.parametrize("listener", ["status", "licensing"])
def test_a_taken_port_is_one_line_and_status_1(tmp_path, pki, upstream, listener):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = config(tmp_path, pki, upstream.url)
        key = "status_port" if listener == "status" else "port"
        text = re.sub(rf"^{key} = \d+$", f"{key} = {port}", text, count=1, flags=re.M)
        with ProxyProcess(tmp_path, text) as proxy:
            assert proxy.wait_exit(timeout=20) == 1
    log = proxy.log_text()
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if "cannot" in line]
    assert len(lines) == 1, log
    assert lines[0].endswith(
        f"license-proxy cannot start: cannot listen for {listener} requests on 127.0.0.1:{port}:"
        " [Errno 98] Address already in use"
    ), lines[0]


def _tls_client() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the proxy's self-signed certificate
    return context


def _closed_by_server(sock: ssl.SSLSocket, timeout: float = 10) -> bool:
    """Whether the server closes ``sock`` (sending nothing) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def test_sigterm_drains_answering_check_ins_for_the_default_drain_time(tmp_path, pki, upstream):
    """
    A Kubernetes pod leaves its Service as it gets SIGTERM, not before: for ``drain_time`` (5 s
    by default) check-ins still reaching it, on an open connection or a new one, are relayed and
    answered with ``Connection: close``; a kept-alive connection is closed while idle, so that
    its client's next check-in goes elsewhere; the status port closes at once.  Then the stop.
    """
    text = config(tmp_path, pki, upstream.url)
    upstream.respond(body=b'{"license":"valid"}')
    with ProxyProcess(tmp_path, text, env={"LICENSE_PROXY_DRAIN_TIME": None}) as proxy:
        proxy.wait_state("Connected")
        kept = http.client.HTTPSConnection(proxy.host, proxy.port, timeout=10,
                                           context=_tls_client())
        kept.request("GET", "/v1/lic")
        assert kept.getresponse().read() == b'{"license":"valid"}'
        opened = _tls_client().wrap_socket(socket.create_connection((proxy.host, proxy.port)))
        os.kill(proxy.pid, signal.SIGTERM)

        assert _closed_by_server(kept.sock), "the idle kept-alive connection was left open"
        opened.sendall(b"GET /v1/lic HTTP/1.1\r\nHost: proxy\r\n\r\n")
        answer = b""
        opened.settimeout(10)
        while chunk := opened.recv(65536):  # until the server closes
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert b"\r\nConnection: close\r\n" in answer and answer.endswith(b'{"license":"valid"}')
        with pytest.raises(OSError):
            proxy.status(timeout=2)  # the status port closed at once
        code, headers, body = proxy.request("GET", "/v1/lic")  # a new connection, still taken
        assert (code, headers["Connection"], body) == (200, "close", b'{"license":"valid"}')
        assert proxy.running
        assert proxy.wait_exit(30) in (0, -15)
    log = proxy.log_text()
    assert "licensing requests are still answered for 5 s ([server] drain_time)" in log, log
    assert log.index("still answered for 5 s") < log.index("the drain is over")
    assert "Traceback" not in log
    assert len(relayed(upstream, "/v1/lic")) == 3
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=5)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_ends_the_drain_at_once_without_a_traceback(tmp_path, pki, upstream,
                                                                     signum):
    text = config(tmp_path, pki, upstream.url, server='drain_time = "5m"')
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
        os.kill(proxy.pid, signum)
        deadline = time.monotonic() + 15
        while "still answered for 300 s" not in proxy.log_text():
            assert time.monotonic() < deadline and proxy.running, proxy.log_text()
            time.sleep(0.05)
        assert proxy.request("GET", "/v1/lic")[0] == 200  # draining
        os.kill(proxy.pid, signum)
        assert proxy.wait_exit(30) in (0, -signum)  # not the 5 minutes
    log = proxy.log_text()
    assert "stopping: a second signal ends the drain; the licensing port closes" in log, log
    assert "Traceback" not in log and "Can't stop reactor" not in log, log

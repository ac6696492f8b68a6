"""
Hostile clients against a real ``twistd license-proxy``, over loopback, on both listeners: the
licensing one (HTTPS) and the status one (plain HTTP).  Each test checks what the client gets
on the wire, that the process still answers everyone else, and that it logged no traceback.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
import urllib.request

import pytest

from tests.support.configs import config
from tests.support.proxy import ProxyProcess
from tests.support.wire import connect, exchange, read_to_end

LIMITS = """
max_body_size = 65536
header_timeout = "1s"
idle_timeout = "2s"
max_connections = 8
max_connections_per_peer = 4
"""

LISTENERS = ["licensing", "status"]


@pytest.fixture
def proxy(tmp_path, pki, upstream):
    with ProxyProcess(tmp_path, config(tmp_path, pki, upstream.url, server=LIMITS)) as p:
        p.wait_state("Connected")
        yield p
        assert p.running
        assert not re.search(r"Traceback|Unhandled Error", p.log_text()), p.log_text()


def metric(proxy: ProxyProcess, name: str, labels: str) -> float:
    url = f"http://{proxy.host}:{proxy.status_port}/metrics"
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url) as response:
        text = response.read().decode()
    (value,) = re.findall(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(value)


def still_serving(proxy: ProxyProcess, upstream) -> None:
    """The status answers, and a licensing request is relayed."""
    assert proxy.status()["state"] == "Connected"
    upstream.respond(body=b'{"license":"valid"}')
    assert proxy.request("POST", "/v1/check", body=b"{}")[::2] == (200, b'{"license":"valid"}')


@pytest.mark.parametrize("listener", LISTENERS)
def test_each_refusal_as_the_client_sees_it(proxy, upstream, listener):
    big_head = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
    cases = {
        413: b"POST /v1/a HTTP/1.1\r\nHost: p\r\nContent-Length: 65537\r\n\r\n",
        431: b"GET /v1/b HTTP/1.1\r\nHost: p\r\n" + big_head + b"\r\n",
        414: b"GET /v1/" + b"c" * 20000 + b" HTTP/1.1\r\n\r\n",
        400: b"NOT HTTP AT ALL\r\n\r\n",
    }
    for code, data in cases.items():
        answer = exchange(proxy, listener, data)
        assert answer.startswith(b"HTTP/1.1 %d " % code), (code, answer[:200])
        assert b"\r\nConnection: close\r\n" in answer
    with connect(proxy, listener) as sock:
        sock.sendall(b"POST /v1/d HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"8000\r\n" + b"x" * 0x8000 + b"\r\n")  # 32 KiB are allowed,
        sock.sendall(b"8001\r\n" + b"x" * 0x8001 + b"\r\n")  # 65 537 bytes are not
        assert read_to_end(sock).startswith(b"HTTP/1.1 413 ")
    assert [r.path for r in upstream.requests if r.path.startswith("/v1/")] == []
    assert metric(proxy, "license_proxy_requests_rejected_total", 'code="413"') == 2
    assert metric(proxy, "license_proxy_requests_rejected_total", 'code="400"') == 1
    still_serving(proxy, upstream)


@pytest.mark.parametrize("listener", LISTENERS)
def test_framing_read_more_than_one_way_is_400_and_no_banner(proxy, upstream, listener):
    cases = {
        "obs-fold": b"POST /v1/f HTTP/1.1\r\nHost: p\r\nTransfer-Encoding:\r\n chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        "no Host": b"GET /v1/status HTTP/1.1\r\n\r\n",
        "OPTIONS *": b"OPTIONS * HTTP/1.1\r\nHost: p\r\n\r\n",
    }
    for name, data in cases.items():
        answer = exchange(proxy, listener, data)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (name, answer[:200])
    assert not [r for r in upstream.requests if r.path.startswith("/v1/f")]
    assert metric(proxy, "license_proxy_requests_rejected_total", 'code="400"') == 3
    # The proxy's own answers carry no Server banner; a relayed one keeps the license server's.
    own = exchange(proxy, listener, b"TRACE /v1/x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    status = exchange(proxy, listener, b"GET /v1/status HTTP/1.1\r\nHost: p\r\nConnection: close"
                                       b"\r\n\r\n")
    for answer in (own, status):
        assert answer[:12] in (b"HTTP/1.1 200", b"HTTP/1.1 404", b"HTTP/1.1 405"), answer[:200]
        assert b"\r\nserver:" not in answer.split(b"\r\n\r\n")[0].lower(), answer[:300]
    upstream.respond(headers={"Content-Type": "application/json", "Server": "license-server/7"})
    relayed = exchange(proxy, "licensing", b"GET /v1/r HTTP/1.1\r\nHost: p\r\nConnection: close"
                                           b"\r\n\r\n")
    assert b"\r\nServer: license-server/7\r\n" in relayed, relayed[:300]


PIPELINED = 200


def test_pipelined_requests_are_relayed_as_the_client_reads_them(proxy, upstream):
    upstream.pad = 256 * 1024
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads nothing
    sock.settimeout(10)
    sock.connect((proxy.host, proxy.port))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(sock, server_hostname="localhost") as sock:
        sock.sendall(b"".join(
            b"GET /v1/pipe/%d HTTP/1.1\r\nHost: p\r\n\r\n" % n for n in range(PIPELINED)
        ))

        def relayed():
            return len([r for r in upstream.requests if r.path.startswith("/v1/pipe/")])

        seen, deadline = -1, time.monotonic() + 20
        while relayed() != seen and time.monotonic() < deadline:  # still relaying
            seen = relayed()
            time.sleep(1)
        # What the socket buffers and the proxy's write buffer hold, and one more.
        assert seen <= 10, f"{seen} of {PIPELINED} relayed for a client that reads nothing"
        reader = sock.makefile("rb")
        numbers = []
        for _ in range(PIPELINED):
            assert reader.readline() == b"HTTP/1.1 200 OK\r\n"
            headers = {}
            for line in iter(reader.readline, b"\r\n"):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.lower()] = value.strip()
            body = reader.read(int(headers["content-length"]))
            numbers.append(json.loads(body)["n"])
    assert [r.path for r in upstream.requests if r.path.startswith("/v1/pipe/")] == [
        f"/v1/pipe/{n}" for n in range(PIPELINED)
    ]
    assert numbers == sorted(numbers) and len(set(numbers)) == PIPELINED  # in order, each once
    still_serving(proxy, upstream)


@pytest.mark.parametrize("listener", LISTENERS)
def test_413_arrives_before_the_client_has_sent_its_body(proxy, upstream, listener):
    with connect(proxy, listener) as sock:
        sock.sendall(b"POST /v1/big HTTP/1.1\r\nHost: p\r\nContent-Length: 10485760\r\n\r\n")
        sock.sendall(b"x" * 16384)  # of 10 MiB announced
        assert read_to_end(sock).startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert not [r for r in upstream.requests if r.path == "/v1/big"]
    still_serving(proxy, upstream)


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_head_trickled_byte_by_byte_gets_408(proxy, upstream, listener):
    with connect(proxy, listener) as sock:
        sock.settimeout(0.2)
        start = time.monotonic()
        answer = b""
        for byte in b"GET /v1/slow HTTP/1.1\r\nHost: p\r\n" * 10:
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            break
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert elapsed < 5  # header_timeout is 1 s: the bytes did not keep moving the deadline
    assert metric(proxy, "license_proxy_requests_rejected_total", 'code="408"') == 1
    still_serving(proxy, upstream)


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_connection_that_sends_nothing_is_closed_when_idle(proxy, listener):
    port = proxy.port if listener == "licensing" else proxy.status_port
    # On the licensing listener this client never starts TLS.
    with socket.create_connection((proxy.host, port), timeout=10) as sock:
        start = time.monotonic()
        assert read_to_end(sock) == b""
        assert 1.5 < time.monotonic() - start < 8  # idle_timeout is 2 s


def test_everyone_else_is_served_while_hostile_clients_hold_connections(proxy, upstream):
    hostile = []
    for listener in LISTENERS:
        for source in ("127.0.0.2", "127.0.0.3"):
            for _ in range(3):
                sock = connect(proxy, listener, source)
                sock.sendall(b"POST /v1/held HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\nx")
                hostile.append(sock)
    try:
        still_serving(proxy, upstream)
        for sock in hostile:
            assert read_to_end(sock).startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in hostile:
            sock.close()
    assert not [r for r in upstream.requests if r.path == "/v1/held"]


def test_connections_over_the_limits_are_closed_at_once(proxy, upstream):
    held = [connect(proxy, "licensing", "127.0.0.2") for _ in range(4)]
    try:
        over_peer = socket.create_connection((proxy.host, proxy.port), 5, ("127.0.0.2", 0))
        with over_peer:
            assert read_to_end(over_peer) == b""  # closed before any TLS
        held += [connect(proxy, "licensing", "127.0.0.3") for _ in range(4)]
        over_total = socket.create_connection((proxy.host, proxy.port), 5, ("127.0.0.4", 0))
        with over_total:
            assert read_to_end(over_total) == b""
        # The status listener has limits of its own: it still answers.
        assert proxy.status()["state"] == "Connected"
        assert metric(proxy, "license_proxy_connections_refused_total", 'reason="per_peer"') == 1
        assert metric(proxy, "license_proxy_connections_refused_total", 'reason="total"') == 1
    finally:
        for sock in held:
            sock.close()
    log = proxy.log_text()
    assert "licensing listener: refused 1 connection(s) over [server] max_connections_per_peer" \
        " = 4 since the last warning, the latest from 127.0.0.2" in log
    assert "refused 1 connection(s) over [server] max_connections = 8" in log

    def relayed():
        try:
            return proxy.request("GET", "/v1/after")[0] == 200
        except OSError:
            return False

    deadline = time.monotonic() + 10  # the held connections are gone once the proxy sees it
    while not relayed():
        assert time.monotonic() < deadline, "connections not released after their clients left"
        time.sleep(0.05)

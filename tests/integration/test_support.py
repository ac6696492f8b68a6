"""The test support code itself: the TLS upstream and the process harness (the secret volume: tests/unit)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

from tests.support import proxy
from tests.support.proxy import ProxyProcess, free_port
from tests.support.tlsclient import client_context, connection, get
from tests.support.upstream import Upstream


# -- the upstream ----------------------------------------------------------------------------


def test_answers_over_tls_with_urllib(pki, upstream):
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=client_context(pki.ca_cert)),
    )
    with opener.open(upstream.url + "/v1/check?x=1", timeout=5) as response:
        first = json.loads(response.read())
        assert response.headers["Content-Type"] == "application/json"
    with opener.open(upstream.url + "/v1/check?x=1", timeout=5) as response:
        second = json.loads(response.read())
    assert first["license"] == "ok" and first != second


def test_records_requests(pki, upstream):
    upstream.respond(status=201, body=b"made", headers=[("X-A", "1"), ("X-A", "2")])
    upstream.set_cookie = "sid=abc"
    response, body = get(
        upstream,
        "/v1/license?key=k",
        context=client_context(pki.ca_cert),
        method="POST",
        body=b'{"q":1}',
        headers={"X-Token": "t", "Content-Type": "application/json"},
    )
    assert (response.status, body) == (201, b"made")
    assert response.headers.get_all("X-A") == ["1", "2"]
    assert response.headers["Set-Cookie"] == "sid=abc"
    [request] = upstream.requests
    assert request[:2] == ("POST", "/v1/license?key=k")
    assert request.body == b'{"q":1}'
    assert ("X-Token", "t") in request.headers
    assert request.client_cn is None


def test_keep_alive(pki, upstream):
    conn = connection(upstream, client_context(pki.ca_cert))
    for _ in range(3):
        conn.request("GET", "/")
        assert conn.getresponse().read()
    conn.close()
    assert (upstream.connections, upstream.handshakes, len(upstream.requests)) == (1, 1, 3)


def test_stop_refuses_and_start_reuses_port(pki, upstream):
    port = upstream.port
    upstream.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    upstream.start()
    assert upstream.port == port
    response, _ = get(upstream, context=client_context(pki.ca_cert))
    assert response.status == 200


def test_stop_cuts_open_connections(pki, upstream):
    conn = connection(upstream, client_context(pki.ca_cert))
    conn.request("GET", "/")
    conn.getresponse().read()
    upstream.stop()
    conn.request("GET", "/")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, ssl.SSLError)):
        conn.getresponse()


def test_truncated_raises_incomplete_read(pki, upstream):
    upstream.mode = "truncated"
    with pytest.raises(http.client.IncompleteRead):
        get(upstream, context=client_context(pki.ca_cert))
    assert len(upstream.requests) == 1


def raw_exchange(up: Upstream, cafile) -> tuple[bytes, str]:
    """
    Send a GET over TLS and read until the connection ends, decrypting with a memory BIO so
    the end is seen at the TCP level: (plaintext, "RST" | "FIN").  ssl sockets blur the two.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(cafile).wrap_bio(incoming, outgoing, server_hostname="localhost")
    sock = socket.create_connection(("127.0.0.1", up.port), timeout=5)
    plaintext, request_sent, end = b"", False, None
    with sock:
        while end is None:
            try:
                if not request_sent:
                    tls.do_handshake()
                    tls.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    request_sent = True
                while chunk := tls.read():  # b"" once the server's close_notify is in
                    plaintext += chunk
            except (ssl.SSLWantReadError, ssl.SSLEOFError):
                pass
            try:
                if pending := outgoing.read():
                    sock.sendall(pending)
                data = sock.recv(65536)
            except ConnectionResetError:
                end = "RST"
            else:
                incoming.write(data)
                if not data:
                    end = "FIN"
    return plaintext, end


def test_reset(pki, upstream):
    upstream.mode = "reset"
    assert raw_exchange(upstream, pki.ca_cert) == (b"", "RST")
    assert len(upstream.requests) == 1


def test_reset_in_body(pki, upstream):
    upstream.mode = "reset_in_body"
    upstream.respond(body=b"0123456789abcdef")
    plaintext, end = raw_exchange(upstream, pki.ca_cert)
    assert plaintext.endswith(b"Content-Length: 100\r\n\r\n0123456789")
    assert end == "RST"


def test_reset_in_headers(pki, upstream):
    upstream.mode = "reset_in_headers"
    plaintext, end = raw_exchange(upstream, pki.ca_cert)
    assert plaintext == b"HTTP/1.1 200 OK\r\nContent-Type: appl"
    assert end == "RST"


def test_close_reused_answers_a_connection_once(pki, upstream):
    upstream.mode = "close_reused"
    conn = connection(upstream, client_context(pki.ca_cert))
    conn.request("GET", "/first")
    assert conn.getresponse().read()
    conn.request("GET", "/second")
    with pytest.raises(http.client.RemoteDisconnected):
        conn.getresponse()
    conn.close()
    assert [r.path for r in upstream.requests] == ["/first", "/second"]
    # A new connection is answered again.
    assert get(upstream, context=client_context(pki.ca_cert))[0].status == 200


def test_an_idle_connection_is_closed_after_idle_timeout(pki, upstream):
    upstream.idle_timeout = 0.2
    conn = connection(upstream, client_context(pki.ca_cert))
    conn.request("GET", "/")
    conn.getresponse().read()
    deadline = time.monotonic() + 5
    while upstream.idle_closes == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert conn.sock.recv(1) == b""  # the close reached the client
    conn.close()
    assert upstream.idle_closes == 1


def test_use_certificate_applies_to_new_connections(pki, upstream):
    upstream.use_certificate(pki.wrong_host_cert, pki.wrong_host_key)
    with pytest.raises(ssl.SSLCertVerificationError):
        get(upstream, context=client_context(pki.ca_cert))
    upstream.use_certificate(pki.server_cert, pki.server_key)
    assert get(upstream, context=client_context(pki.ca_cert))[0].status == 200


def test_truncated_ends_cleanly(pki, upstream):
    upstream.mode = "truncated"
    upstream.respond(body=b"0123456789abcdef")
    plaintext, end = raw_exchange(upstream, pki.ca_cert)
    assert plaintext.endswith(b"\r\n\r\n0123456789")
    assert end == "FIN"


@pytest.mark.parametrize("mode", ["chunked", "until_close"])
def test_complete_bodies_without_length(pki, upstream, mode):
    upstream.mode = mode
    upstream.respond(body=b"0123456789abcdefghij")
    response, body = get(upstream, context=client_context(pki.ca_cert))
    assert body == b"0123456789abcdefghij"


def test_chunked_truncated(pki, upstream):
    upstream.mode = "chunked_truncated"
    with pytest.raises(http.client.IncompleteRead):
        get(upstream, context=client_context(pki.ca_cert))


def test_drip(pki, upstream):
    upstream.mode = "drip"
    upstream.drip_interval = 0.05
    upstream.respond(body=b"abcd")
    started = time.monotonic()
    response, body = get(upstream, context=client_context(pki.ca_cert))
    assert body == b"abcd"
    assert time.monotonic() - started >= 0.2


def test_hang_answers_when_mode_changes_and_stop_is_prompt(pki, upstream):
    upstream.mode = "hang"
    with pytest.raises(TimeoutError):
        conn = connection(upstream, client_context(pki.ca_cert), timeout=0.3)
        conn.request("GET", "/hung")
        conn.getresponse()
    assert [r.path for r in upstream.requests] == ["/hung"]

    result = {}
    thread = threading.Thread(
        target=lambda: result.update(r=get(upstream, context=client_context(pki.ca_cert)))
    )
    thread.start()
    time.sleep(0.2)
    upstream.mode = "normal"
    thread.join(5)
    assert result["r"][0].status == 200

    upstream.mode = "hang"
    conn = connection(upstream, client_context(pki.ca_cert))
    conn.request("GET", "/")
    started = time.monotonic()
    upstream.stop()
    assert time.monotonic() - started < 2


def test_blackhole_never_handshakes(pki, upstream):
    upstream.mode = "blackhole"
    with pytest.raises(TimeoutError):
        conn = connection(upstream, client_context(pki.ca_cert), timeout=0.3)
        conn.request("GET", "/")
    assert (upstream.connections, upstream.handshakes, upstream.requests) == (1, 0, [])


def test_mutual_tls(pki):
    with Upstream(pki.server_cert, pki.server_key, client_ca_path=pki.client_ca_cert) as up:
        context = client_context(pki.ca_cert, cert=pki.client_cert, key=pki.client_key)
        response, _ = get(up, context=context)
        assert response.status == 200
        assert up.requests[0].client_cn == pki.client_cn

        with pytest.raises((ssl.SSLError, ConnectionError)):
            get(up, context=client_context(pki.ca_cert))  # no client certificate
        assert len(up.requests) == 1


# -- the process harness, against a stand-in for twistd ---------------------------------------

FAKE_TWISTD = """\
import http.server, json, sys, threading, tomllib
server = tomllib.load(open(sys.argv[sys.argv.index("--config") + 1], "rb"))["server"]
print("fake twistd", sys.argv[1:], flush=True)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/v1/status":
            body = json.dumps({"state": "Connected"}, separators=(",", ":")).encode()
        else:
            body = b"relayed " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

licensing = http.server.ThreadingHTTPServer(("127.0.0.1", server["port"]), Handler)
threading.Thread(target=licensing.serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("127.0.0.1", server["status_port"]), Handler).serve_forever()
"""


def test_proxy_process_harness(tmp_path, monkeypatch):
    script = tmp_path / "twistd"
    script.write_text(f"#!{sys.executable}\n" + FAKE_TWISTD)
    script.chmod(0o755)
    monkeypatch.setattr(proxy, "TWISTD", str(script))
    config = textwrap.dedent(
        f"""\
        [server]
        host = "127.0.0.1"
        port = {free_port()}
        status_port = {free_port()}
        tls = false
        """
    )
    with ProxyProcess(tmp_path, config) as p:
        assert p.scheme == "http"
        assert p.wait_state("Connected") == {"state": "Connected"}
        assert p.raw_status == '{"state":"Connected"}'
        status, headers, body = p.request("GET", "/v1/x")
        assert (status, body) == (200, b"relayed /v1/x")
        assert "--nodaemon" in p.log_text()
        with pytest.raises(AssertionError, match="not in state"):
            p.wait_state("Failed", timeout=0.3)
    assert not p.running


def test_proxy_process_exit_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(proxy, "TWISTD", sys.executable)  # "python --nodaemon": exits at once
    config = f"[server]\nport = {free_port()}\nstatus_port = {free_port()}\n"
    with ProxyProcess(tmp_path, config) as p:
        with pytest.raises(AssertionError, match="exited"):
            p.wait_state("Connected")
        assert p.wait_exit() != 0
        assert "--nodaemon" in p.log_text()

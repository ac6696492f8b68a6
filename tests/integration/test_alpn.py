"""
Clients that offer ALPN (curl, Go's and Rust's HTTP clients offer h2 and http/1.1) must get
a TLS session with the licensing listener, not an "internal error" alert.
"""

from __future__ import annotations

import socket
import ssl

from tests.support.proxy import ProxyProcess, free_port


def test_client_offering_alpn_gets_http11(tmp_path, pki, upstream):
    text = f"""
[server]
host = "127.0.0.1"
port = {free_port()}
status_port = {free_port()}
[license]
server_url = "{upstream.url}"
ca_file = "{pki.ca_cert}"
[cache]
path = "{tmp_path}/state/trust-cache.json"
"""
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == "http/1.1"
                tls.sendall(b"GET /v1/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert tls.recv(64).startswith(b"HTTP/1.1 200")

"""Bytes on the wire to a real proxy's listeners: TLS on the licensing one, plain TCP on the status one."""

from __future__ import annotations

import socket
import ssl

from tests.support.proxy import ProxyProcess


def connect(proxy: ProxyProcess, listener: str, source: str = "127.0.0.1") -> socket.socket:
    """A connection to ``listener`` from loopback address ``source`` (TLS on the licensing one)."""
    port = proxy.port if listener == "licensing" else proxy.status_port
    sock = socket.create_connection((proxy.host, port), timeout=10, source_address=(source, 0))
    if listener == "status":
        return sock
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(sock, server_hostname="localhost")


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the proxy sends until it closes (a reset or TLS end counts as closing)."""
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return received
        if not data:
            return received
        received += data


def exchange(proxy: ProxyProcess, listener: str, data: bytes) -> bytes:
    with connect(proxy, listener) as sock:
        sock.sendall(data)
        return read_to_end(sock)

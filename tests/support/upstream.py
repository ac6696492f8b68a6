"""
A real TLS license server on loopback, for end-to-end tests.

It runs in threads of the test process and misbehaves on demand (hangs, resets, truncated or
dripping bodies, a TCP listener that never completes the TLS handshake, ...) so tests can check
what the proxy does with each kind of upstream failure.  Plain sockets and ``ssl`` rather than
``http.server``: several modes need control below what ``http.server`` exposes.

    with Upstream(pki.server_cert, pki.server_key) as up:
        up.mode = "hang"
        ...
        assert up.requests == []
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
from http import HTTPStatus
from typing import Iterable, NamedTuple

MODES = frozenset(
    {
        "normal",  # answer with the configured response; keep-alive
        "hang",  # read the request, answer only once the mode changes (or stop())
        "blackhole",  # accept TCP, never take part in the TLS handshake
        "reset",  # read the request, then close with a TCP RST
        "reset_in_headers",  # the status line and part of the headers, then RST
        "reset_in_body",  # headers with Content-Length: 100, 10 body bytes, then RST
        "truncated",  # headers with Content-Length: 100, 10 body bytes, then a clean close
        "chunked",  # a valid chunked body
        "chunked_truncated",  # chunks but no terminating chunk, then a clean close
        "until_close",  # neither Content-Length nor chunked: the body ends at the close
        "drip",  # the body one byte per `drip_interval` seconds
        "close_reused",  # a kept-alive connection's next request is read, then closed unanswered
    }
)

_MAX_LINE = 65536
#: Connections idle longer than this are dropped (the proxy's pool should not keep one so long).
_IDLE_TIMEOUT = 30.0
_HANDSHAKE_TIMEOUT = 10.0


class Request(NamedTuple):
    """One complete HTTP request as the upstream read it."""

    method: str
    path: str  # with the query string
    headers: list[tuple[str, str]]  # as received: order, case and repetitions kept
    body: bytes
    client_cn: str | None  # common name of the client certificate (mutual TLS only)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class _Closed(Exception):
    """The peer closed or broke the connection before a whole request arrived."""


class Upstream:
    """
    A TLS (optionally mutual-TLS) HTTP/1.1 server on ``host``, with a settable behaviour.

    Thread-safe: tests change ``mode``, ``respond()`` and ``set_cookie`` between (or during)
    requests while connection threads serve.  ``stop()`` closes the listening socket (new
    connections are refused) and every open connection, as a server going down would;
    ``start()`` listens again on the same port.
    """

    def __init__(
        self,
        cert_path,
        key_path,
        *,
        client_ca_path=None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self._client_ca_path = client_ca_path
        self.use_certificate(cert_path, key_path)

        self._lock = threading.Condition()
        self._mode = "normal"
        self._status = 200
        self._body: bytes | None = None  # None: a JSON body with a counter
        self._headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        self.set_cookie: str | None = None  # when set, every answer carries Set-Cookie
        self.pad = 0  # the default JSON body is padded to at least this many bytes
        self.drip_interval = 1.0
        self.delay = 0.0  # seconds each answer waits, as a distant server's would (benchmarks)
        self.idle_timeout = _IDLE_TIMEOUT  # seconds a kept-alive connection may wait for a request
        self.idle_closes = 0  # connections closed for waiting longer
        self.requests: list[Request] = []
        self.connections = 0  # TCP connections accepted
        self.open_connections = 0  # accepted and not yet closed
        self.most_open = 0  # the most open at once
        self.handshakes = 0  # TLS handshakes completed
        self.answers = 0  # responses decided (numbers the default body)

        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()  # dups of live connections, to shut them down

    # -- configuration -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {sorted(MODES)}")
        with self._lock:
            self._mode = mode
            self._lock.notify_all()  # wakes "hang"

    def use_certificate(self, cert_path, key_path) -> None:
        """Present this certificate on connections accepted from now on."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_path, key_path)
        if self._client_ca_path is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self._client_ca_path)
        self._context = context

    def respond(
        self,
        status: int = 200,
        body: bytes | None = None,
        headers: dict[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        """
        What to answer from now on.  ``body=None`` is the default JSON body with a counter
        (successive answers differ); ``headers`` replace the default Content-Type (a list of
        pairs may repeat a name).  Content-Length/Transfer-Encoding are the mode's business.
        """
        if headers is None:
            headers = {"Content-Type": "application/json"}
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
        with self._lock:
            self._status, self._body, self._headers = status, body, pairs

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "Upstream":
        if self._listener is not None:
            raise RuntimeError("already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stopping = threading.Event()
        self._spawn(self._accept_loop, listener, self._stopping)
        return self

    def stop(self) -> None:
        """Refuse new connections, cut the open ones, and wait for the server threads."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with self._lock:
            self._stopping.set()
            self._lock.notify_all()
            live, self._open = list(self._open), set()
        # shutdown() wakes the thread blocked in accept(); close() alone does not on Linux.
        for sock in [listener, *live]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        listener.close()
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> "Upstream":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------------

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # stop() shut the listener down
            with self._lock:
                self.connections += 1
                self.open_connections += 1
                self.most_open = max(self.most_open, self.open_connections)
                if stopping.is_set():
                    self.open_connections -= 1
                    sock.close()
                    return
                # A dup of the socket lets stop() shut the connection down from its thread
                # without touching the SSL object in use in the connection's thread.
                killswitch = sock.dup()
                self._open.add(killswitch)
                self._spawn(self._serve_connection, sock, killswitch, stopping)

    def _serve_connection(self, sock, killswitch, stopping: threading.Event) -> None:
        conn = _Connection(self, sock, killswitch, stopping)
        try:
            conn.serve()
        except (OSError, _Closed, ssl.SSLError):
            pass
        finally:
            conn.close()
            with self._lock:
                self.open_connections -= 1

    def _next_response(self) -> tuple[str, int, list[tuple[str, str]], bytes]:
        """The mode, status, headers and body of the next answer (one atomic snapshot)."""
        with self._lock:
            self.answers += 1
            body = self._body
            if body is None:
                body = json.dumps({"license": "ok", "n": self.answers}).encode()
                if len(body) < self.pad:
                    padded = {"license": "ok", "n": self.answers, "pad": ""}
                    padded["pad"] = "x" * (self.pad - len(json.dumps(padded)))
                    body = json.dumps(padded).encode()
            headers = list(self._headers)
            if self.set_cookie is not None:
                headers.append(("Set-Cookie", self.set_cookie))
            return self._mode, self._status, headers, body


class _Connection:
    """Serves one accepted TCP connection according to the upstream's current mode."""

    def __init__(self, upstream: Upstream, sock, killswitch, stopping: threading.Event) -> None:
        self.up = upstream
        self.sock = sock
        self.killswitch = killswitch
        self.stopping = stopping
        self.client_cn: str | None = None
        self.reader = None

    def serve(self) -> None:
        up = self.up
        if up.mode == "blackhole":
            return self._swallow()
        # Each write goes out at once: without this, Nagle holds a small write back and an
        # RST close (which discards unsent data) would swallow the headers of "reset_in_body".
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(_HANDSHAKE_TIMEOUT)
        self.sock = up._context.wrap_socket(
            self.sock, server_side=True, do_handshake_on_connect=False
        )
        self.sock.do_handshake()
        self.client_cn = _common_name(self.sock.getpeercert())
        with up._lock:
            up.handshakes += 1
        self.sock.settimeout(up.idle_timeout)
        self.reader = self.sock.makefile("rb")
        answered = 0
        while not self.stopping.is_set():
            try:
                request = _read_request(self.reader, self.client_cn)
            except _Closed:
                return
            except TimeoutError:
                with up._lock:
                    up.idle_closes += 1
                return
            with up._lock:
                up.requests.append(request)
            if answered and up.mode == "close_reused":
                return self._close_cleanly()
            if not self._answer(request):
                return
            answered += 1

    def _swallow(self) -> None:
        """Blackhole: read and discard (the ClientHello) until the peer gives up or stop()."""
        while self.sock.recv(4096):
            pass

    def _answer(self, request: Request) -> bool:
        """Answer per the mode; True when the connection may carry another request."""
        up = self.up
        with up._lock:
            up._lock.wait_for(lambda: up._mode != "hang" or self.stopping.is_set())
        if self.stopping.is_set() or self.stopping.wait(up.delay):
            return False
        mode, status, headers, body = up._next_response()
        length = len(body)  # a HEAD answer's Content-Length is the GET answer's
        if request.method == "HEAD":
            body = b""
        keep_alive = (request.header("Connection") or "").lower() != "close"

        if mode == "reset":
            self._reset()
            return False
        if mode == "reset_in_headers":
            self.sock.sendall(f"HTTP/1.1 {status} OK\r\nContent-Type: appl".encode("ascii"))
            self._reset()
            return False
        if mode in ("reset_in_body", "truncated"):
            self._send_head(status, headers + [("Content-Length", "100")])
            self.sock.sendall(body.ljust(100, b" ")[:10])
            self._reset() if mode == "reset_in_body" else self._close_cleanly()
            return False
        if mode in ("chunked", "chunked_truncated"):
            self._send_head(status, headers + [("Transfer-Encoding", "chunked")])
            for i in range(0, len(body), 4):
                piece = body[i : i + 4]
                self.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            if mode == "chunked_truncated":
                self._close_cleanly()
                return False
            self.sock.sendall(b"0\r\n\r\n")
            return keep_alive
        if mode == "until_close":
            self._send_head(status, headers + [("Connection", "close")])
            self.sock.sendall(body)
            self._close_cleanly()
            return False
        if mode == "drip":
            self._send_head(status, headers + [("Content-Length", str(len(body)))])
            for i in range(len(body)):
                if self.stopping.wait(self.up.drip_interval):
                    return False
                self.sock.sendall(body[i : i + 1])
            return keep_alive
        # normal
        if not keep_alive:
            headers = headers + [("Connection", "close")]
        self._send_head(status, headers + [("Content-Length", str(length))])
        self.sock.sendall(body)
        return keep_alive

    def _send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _reset(self) -> None:
        """Abort with a TCP RST: SO_LINGER 0, then close the last descriptor."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def _close_cleanly(self) -> None:
        """TLS close_notify, then FIN: a well-formed end of the connection."""
        try:
            # Non-blocking: send our close_notify, don't wait for the peer's answer to it.
            self.sock.setblocking(False)
            self.sock.unwrap()
        except (OSError, ssl.SSLError, ValueError):
            pass
        self.close()

    def close(self) -> None:
        # The killswitch and the reader hold the socket open too: an RST close (SO_LINGER 0)
        # only takes effect when the last of them is closed.
        with self.up._lock:
            self.up._open.discard(self.killswitch)
        self.killswitch.close()
        if self.reader is not None:
            self.reader.close()
        self.sock.close()


def _read_request(reader, client_cn: str | None) -> Request:
    """Read one whole HTTP/1.1 request (Content-Length or chunked body), or raise _Closed."""
    line = reader.readline(_MAX_LINE)
    while line in (b"\r\n", b"\n"):  # tolerated between requests (RFC 9112 §2.2)
        line = reader.readline(_MAX_LINE)
    if not line.endswith(b"\n"):
        raise _Closed()
    try:
        method, target, _version = line.decode("latin-1").split()
    except ValueError:
        raise _Closed() from None
    headers: list[tuple[str, str]] = []
    while True:
        line = reader.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise _Closed()
        if line in (b"\r\n", b"\n"):
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise _Closed()
        headers.append((name.strip(), value.strip()))
    fields = {name.lower(): value for name, value in headers}
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = _read_chunked(reader)
    else:
        body = _read_exactly(reader, int(fields.get("content-length", "0")))
    return Request(method, target, headers, body, client_cn)


def _read_exactly(reader, size: int) -> bytes:
    data = reader.read(size)
    if len(data) != size:
        raise _Closed()
    return data


def _read_chunked(reader) -> bytes:
    body = b""
    while True:
        line = reader.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise _Closed()
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while reader.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return body
        body += _read_exactly(reader, size)
        _read_exactly(reader, 2)  # CRLF after the chunk


def _common_name(peercert: dict | None) -> str | None:
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def relayed(upstream: Upstream, path: str) -> list:
    """The requests ``upstream`` received for ``path``."""
    return [r for r in upstream.requests if r.path == path]

"""
Random bytes and random HTTP-shaped requests against a real ``twistd license-proxy``, on both
listeners (the licensing one over TLS and, TLS garbage, over plain TCP; the status one over
plain HTTP).  After every example ``/v1/status`` must answer with a valid state; at the end the
process is alive, logged no traceback, and its trust cache file still loads.

The run is derandomized (the same examples every run, so a failure reproduces) and bounded to
``EXAMPLES`` examples; Hypothesis prints the failing example.
"""

from __future__ import annotations

import json
import re
import socket
import ssl

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.configs import config
from tests.support.proxy import ProxyProcess

EXAMPLES = 500

STATES = {"Ready", "Connected", "TrustBased", "Failed"}

_LIMITS = 'max_body_size = 4096\nheader_timeout = "2s"\nidle_timeout = "3s"\n'

_TLS_CONTEXT = ssl.create_default_context()
_TLS_CONTEXT.check_hostname = False
_TLS_CONTEXT.verify_mode = ssl.CERT_NONE


def _text(max_size: int, line_ends: bool = True) -> st.SearchStrategy[bytes]:
    characters = st.characters(exclude_characters=None if line_ends else "\r\n")
    return st.text(characters, max_size=max_size).map(
        lambda t: t.encode("utf-8", "surrogatepass")
    )


_token = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12).map(
    str.encode
)
_methods = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"CONNECT", b"PRI"])
_odd_methods = st.one_of(_token, _text(10))
_targets = st.one_of(
    st.sampled_from(
        [b"/", b"/v1/status", b"/v1/ready", b"/metrics", b"*", b"http://x/v1/status", b"//",
         b"/%zz", b"/v1/x?key=%00", b"/v1/check"]
    ),
    _token.map(lambda t: b"/" + t),
    st.integers(0, 20000).map(lambda n: b"/" + b"a" * n),
)
_odd_targets = _text(60).map(lambda t: b"/" + t)
_versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"])
_odd_versions = st.sampled_from([b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.1x", b"http/1.1", b"", b"HTTP/"])
_names = st.one_of(
    st.sampled_from(
        [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect", b"Cookie"]
    ),
    _token.filter(lambda t: b":" not in t),
)
_odd_names = st.one_of(st.sampled_from([b" Host", b"Host ", b""]), _text(20))
_values = st.one_of(
    st.sampled_from(
        [b"chunked", b"identity", b"gzip, chunked", b"100-continue", b"close", b"keep-alive",
         b"-1", b"0", b"5", b"4097", b"18446744073709551616", b"1e3", b" 12", b"abc"]
    ),
    _text(100, line_ends=False),
    st.integers(0, 20000).map(lambda n: b"v" * n),
)
_odd_values = _text(100)
_chunk_sizes = st.one_of(
    st.integers(0, 5000).map(lambda n: b"%x" % n),
    st.sampled_from([b"", b"-1", b"zz", b"1;ext=1", b"FFFFFFFFFFFFFFFFFFFF", b" 5", b"0x5"]),
)
_chunked_bodies = st.lists(st.tuples(_chunk_sizes, st.binary(max_size=300)), max_size=5).map(
    lambda chunks: b"".join(size + b"\r\n" + data + b"\r\n" for size, data in chunks)
)


@st.composite
def _http(draw) -> bytes:
    """
    A request that looks like HTTP: half of them well-formed in shape (odd values, lengths and
    bodies, so they get past the parser's first checks), the other half odd anywhere.
    """
    odd = draw(st.booleans())

    def pick(usual: st.SearchStrategy, unusual: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(usual, unusual) if odd else usual

    end = draw(st.sampled_from([b"\r\n", b"\n"])) if odd else b"\r\n"
    line = b" ".join(
        draw(pick(usual, unusual))
        for usual, unusual in (
            (_methods, _odd_methods), (_targets, _odd_targets), (_versions, _odd_versions)
        )
    )
    header = st.tuples(pick(_names, _odd_names), pick(_values, _odd_values))
    headers = draw(st.lists(header, max_size=120))
    body = draw(st.one_of(st.binary(max_size=5000), _chunked_bodies))
    framing = draw(st.sampled_from(["as drawn", "length", "chunked"]))
    if framing == "length":  # around the 4096-byte limit, true or not
        headers.append((b"Content-Length", b"%d" % draw(st.integers(0, 8192))))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
    head = end.join([line, *(name + b": " + value for name, value in headers)]) + end + end
    return (head + body) * draw(st.sampled_from([1, 1, 2]))  # sometimes pipelined


_payloads = st.one_of(
    _http(),
    _http(),
    st.binary(max_size=4096),
    st.binary(max_size=512).map(lambda b: b"\x16\x03\x01" + b),  # a TLS record, or nearly
)


def _send(proxy: ProxyProcess, listener: str, payload: bytes) -> bytes:
    """Send ``payload`` and end our side; what came back before the proxy closed."""
    port = proxy.status_port if listener == "status" else proxy.port
    sock = socket.create_connection((proxy.host, port), timeout=5)
    try:
        if listener == "licensing-tls":
            sock = _TLS_CONTEXT.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(payload)
        # TCP's half close, also under TLS (SSLSocket.shutdown would drop the TLS layer).
        socket.socket.shutdown(sock, socket.SHUT_WR)
        received = b""
        while data := sock.recv(65536):
            received += data
        return received
    except (OSError, ssl.SSLError):  # a reset or an alert: the proxy closing is allowed
        return b""
    finally:
        sock.close()


def test_random_traffic_never_takes_the_proxy_down(tmp_path, pki, upstream):
    text = config(tmp_path, pki, upstream.url, server=_LIMITS)
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.sampled_from(["status", "licensing-tls", "licensing-raw"]), _payloads)
        def hostile(listener: str, payload: bytes) -> None:
            answer = _send(proxy, listener, payload)
            # Plain bytes on the TLS port get a TLS alert record (or nothing); HTTP gets HTTP.
            expected = rb"\x15\x03" if listener == "licensing-raw" else rb"HTTP/1\.[01] [1-5]\d\d "
            assert answer == b"" or re.match(expected, answer), answer[:200]
            assert proxy.status()["state"] in STATES, proxy.raw_status

        hostile()
        assert proxy.running
        log = proxy.log_text()
        assert not re.search(r"Traceback|Unhandled Error", log), log
        assert proxy.terminate() in (0, -15)
    cache = tmp_path / "state" / "trust-cache.json"
    json.loads(cache.read_text())

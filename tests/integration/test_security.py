"""
Nobody in, nothing out, over a real ``twistd license-proxy`` that holds secrets: a license
key, and cached answers to clients that sent Authorization, X-Api-Key and Cookie headers
and a token in the query.  The status listener answers its four pages and nothing else, whatever the path or method;
no answer of it, no 502 body, no log line (text or JSON) and no byte of the trust cache
holds a secret (nor its base64 or hex), and the status listener never shows a cached body; the
same with the key in DEEPGRAM_API_KEY instead of the file, and debug level logging.
"""

from __future__ import annotations

import base64
import http.client
import json

import pytest

from tests.support.client import exchange
from tests.support.configs import KEY, config
from tests.support.proxy import ProxyProcess

CLIENT = {
    "Authorization": "Token client-auth-6b1d9e",
    "X-Api-Key": "xkey-0f4c8a2e7d",
    "Cookie": "session=cookie-3a9f1c5e",
}
OTHER_CLIENT = {**CLIENT, "Authorization": "Token other-auth-2c7e4b"}
QUERY_SECRET = "query-token-91ab3d"
LICENSING = f"/v1/license?token={QUERY_SECRET}"
CACHED_BODY = b'{"license":"cached-answer-5e1f77"}'
PAGES = ("/", "/v1/status", "/v1/ready", "/v1/health", "/metrics")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND")


def forms(secret: bytes) -> list[bytes]:
    """``secret`` as it could appear on disk or on the wire: as is, in hex, and the part of
    its base64 (standard and URL-safe) that does not depend on the bytes around it."""
    found = [secret, secret.hex().encode()]
    for offset in range(3):
        core = base64.b64encode(b"\0" * offset + secret)[4 if offset else 0 : -4]
        found += [core, core.replace(b"+", b"-").replace(b"/", b"_")]
    return found


def leaks(text: bytes, cache_path: str) -> list[bytes]:
    """The secrets (and cache path) found in ``text``."""
    values = [KEY, QUERY_SECRET, cache_path, CACHED_BODY.decode()] + [
        v for c in (CLIENT, OTHER_CLIENT) for v in c.values()
    ]
    return [f for v in values for f in forms(v.encode()) if f in text]


@pytest.fixture
def exercised(request, tmp_path, pki, upstream):
    """A proxy that checked in with its key, stored an answer for CLIENT, answered it from
    trust and gave OTHER_CLIENT a 502: (proxy, 502 body).  The parameter: the log format, and
    where the key is (the file's [license] key, or DEEPGRAM_API_KEY, logging at debug level)."""
    log_format, where = getattr(request, "param", ("text", "file"))
    if where == "file":
        text = config(tmp_path, pki, upstream.url, license=f'key = "{KEY}"')
        options, env = ("--log-format", log_format), {}
    else:
        text = config(tmp_path, pki, upstream.url)
        options = ("--log-format", log_format, "--log-level", "debug")
        env = {"DEEPGRAM_API_KEY": KEY}
    with ProxyProcess(tmp_path, text, env, options=options) as proxy:
        proxy.wait_state("Connected")
        assert upstream.requests[0].header("Authorization") == f"Token {KEY}"
        upstream.respond(body=CACHED_BODY)
        assert proxy.request("POST", LICENSING, b"{}", CLIENT)[::2] == (200, CACHED_BODY)
        upstream.mode = "reset"
        assert proxy.request("POST", LICENSING, b"{}", CLIENT)[::2] == (200, CACHED_BODY)
        code, _, unavailable = proxy.request("POST", LICENSING, b"{}", OTHER_CLIENT)
        assert code == 502
        proxy.wait_state("TrustBased")
        yield proxy, unavailable


def status_port(proxy, method: str, path: str) -> tuple[int, bytes]:
    """One request to the status listener with a client's secrets: (status, the whole answer)."""
    conn = http.client.HTTPConnection(proxy.host, proxy.status_port, timeout=5)
    response, body = exchange(conn, method, path, b"probe", CLIENT)
    head = "".join(f"{k}: {v}\n" for k, v in response.getheaders()).encode()
    return response.status, head + body


def test_status_listener_serves_its_five_pages_and_nothing_else(exercised, tmp_path):
    proxy, _ = exercised
    cache_path = str(tmp_path / "state" / "trust-cache.json")
    probes = [
        "/v1", "/v1/", "/v1/status/", "/v1/status/..", "/v1/status/x", "/v1/status/../status",
        "//v1/status", "/V1/STATUS", "/v1/status%00", "/v1/health;x", "/metrics/", "/metrics/x",
        "/%2e%2e/", "/%2e%2e/%2e%2e/etc/passwd", "/../../etc/passwd", "/..%2f..%2fetc%2fpasswd",
        "/trust-cache.json", "/state/trust-cache.json", cache_path, "/tls.key", "/tls.crt",
        "/license-proxy.toml", "/debug", "/debug/pprof", "/admin", "/.git/config", LICENSING,
        "/v1/check?x=1", *PAGES, *(f"{page}?x=1" for page in PAGES),
    ]
    expected, seen = {}, {}
    for path in probes:
        page = path.split("?")[0] in PAGES
        for method in METHODS:
            code, answer = status_port(proxy, method, path)
            seen[method, path] = code
            expected[method, path] = (200 if method in ("GET", "HEAD") else 405) if page else 404
            assert not leaks(answer, cache_path), (method, path, leaks(answer, cache_path), answer)
            assert b"probe" not in answer and b"HTTP/1.1" not in answer, (method, path, answer)
    # The target "*" (RFC 9110's server-wide OPTIONS), which twisted.web answered itself, is
    # refused by the guard like any other request read more than one way.
    for method in METHODS:
        code, answer = status_port(proxy, method, "*")
        seen[method, "*"] = code
        expected[method, "*"] = 400
        assert answer.endswith(b"\nmalformed request\n") or method == "HEAD", answer
    assert seen == expected
    assert proxy.running and "Traceback" not in proxy.log_text()


@pytest.mark.parametrize(
    "exercised",
    [("text", "file"), ("json", "file"), ("text", "environment"), ("json", "environment")],
    indirect=True,
)
def test_no_secret_in_the_cache_file_logs_status_metrics_or_502(exercised, tmp_path):
    proxy, unavailable = exercised
    cache_path = str(tmp_path / "state" / "trust-cache.json")
    assert "license server unavailable" in json.loads(unavailable)["error"]
    assert not leaks(unavailable, cache_path)
    for page in PAGES:
        code, answer = status_port(proxy, "GET", page)
        assert code == 200 and not leaks(answer, cache_path), (page, answer)
        assert LICENSING.split("?")[0].encode() not in answer, (page, answer)  # no request path
    state = tmp_path / "state"

    def on_disk() -> bytes:  # the snapshot and its journal
        return b"".join(p.read_bytes() for p in sorted(state.glob("trust-cache.json*")))

    proxy.wait_status(lambda _: base64.b64encode(CACHED_BODY) in on_disk(), "the answer written")
    running = on_disk()
    assert proxy.terminate() in (0, -15)

    cache = running + on_disk()  # as written while running, and as a stop leaves them
    # The cached answer is there (base64), so the file is the one that was written ...
    assert base64.b64encode(CACHED_BODY) in cache
    # ... and none of the secrets are.
    assert not leaks(cache.replace(base64.b64encode(CACHED_BODY), b""), "no such path")
    log = proxy.log_text().encode()
    assert b"/v1/license" in log  # the relays were logged
    if "debug" in proxy.options:  # and the configuration, at debug level
        assert b"configuration from" in log
    assert not leaks(log.replace(cache_path.encode(), b""), "no such path")

"""
The attacks of issue 14 on a real ``twistd license-proxy`` whose ``server_url`` has a path,
in front of a real TLS upstream that logs every request it gets.  ``tests/attack.py`` is
run as an operator would run it, so it cannot rot; the attacks it can't judge from
outside (what reached the upstream, what is on disk) are tested here directly.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path


from tests.support.forward import Squid
from tests.support.installed import REPO_ROOT
from tests.support.proxy import ProxyProcess
from tests.support.configs import config
from tests.support.wire import exchange

BASE = 'base_url = "/v1/"'


def start(tmp_path, pki, upstream, *, cache="", trust='duration = "1h"', **kwargs):
    """A proxy relaying ``/v1/...`` to the upstream's ``/lic/...``; ``cache``: [cache] lines."""
    text = config(tmp_path, pki, upstream.url + "/lic", server=BASE, trust=trust) + cache
    return ProxyProcess(tmp_path, text, **kwargs)


def relayed_paths(upstream) -> list[str]:
    return [r.path for r in upstream.requests]


def test_the_attack_script_finds_every_attack_refused_or_safe(tmp_path, pki, upstream):
    upstream.respond(headers=[("Content-Type", "application/json"), ("Vary", "X-Tenant")])
    upstream.set_cookie = "session=licensee-a; Path=/"
    trust = 'duration = "1h"\ncheckin_interval = "2s"'
    with start(tmp_path, pki, upstream, cache="max_entries = 50\n", trust=trust) as proxy:
        proxy.wait_state("Connected")
        script = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "tests" / "attack.py"), "--host", proxy.host,
             "--port", str(proxy.port), "--status-port", str(proxy.status_port),
             "--base-url", "/v1/", "--outage", "--max-entries", "50", "--checkin-interval", "2"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            prompt = script.stderr.readline()
            assert prompt == "# primed: stop the license server, then press Enter\n", (
                prompt + script.stderr.read()
            )
            upstream.stop()
            out, err = script.communicate("\n", timeout=120)
        finally:
            if script.poll() is None:
                script.kill()
    lines = out.splitlines()
    assert script.returncode == 0, out + err
    assert len(lines) == 31, out
    for line in lines:
        assert ": refused (" in line or ": safe (" in line, line
    assert "peer mark 'ask' on a cached POST: safe (answered 200 by the license server)" in out
    assert "flood of 100 requests each sent twice: safe (10 of the fleet's 10 answers" in out
    # Nothing outside the configured prefix, and no refused method, reached the license server.
    assert all(p == "/lic" or p.startswith("/lic/") for p in relayed_paths(upstream))
    assert not [p for p in relayed_paths(upstream) if "admin" in p]
    assert {r.method for r in upstream.requests} == {"GET", "HEAD", "POST"}  # POST: peer mark


def test_encoded_separators_are_refused_and_the_prefix_kept(tmp_path, pki, upstream):
    with start(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("Connected")
        for path in ("/v1/..%2Fadmin", "/v1/%2E%2E%2Fadmin", "/v1/a%2F..%2F..%2Fadmin",
                     "/v1/a%2fb", "/v1/..%5cadmin", "/v1/..;/admin", "/v1/%2e%2E;x/admin"):
            code, _, body = proxy.request("GET", path)
            assert (code, json.loads(body)) == (
                400, {"error": "dot segment or encoded / or \\ in the path"}
            ), path
        # Encoded bytes that are no separator, and dots inside a segment, still go through.
        assert proxy.request("GET", "/v1/a%20b/..x/c.d?next=%2F..%2F")[0] == 200
    assert relayed_paths(upstream)[1:] == ["/lic/a%20b/..x/c.d?next=%2F..%2F"]


def test_a_vary_header_and_the_configured_key_headers_tell_licensees_apart(tmp_path, pki, upstream):
    upstream.respond(body=b'{"license":"tenant-a"}', headers={"Vary": "x-tenant, Accept"})
    cache = 'key_headers = ["x-auth-token", "Authorization"]\n'
    with start(tmp_path, pki, upstream, cache=cache) as proxy:
        proxy.wait_state("Connected")
        tenant_a = {"X-Tenant": "a", "X-Auth-Token": "t1", "Accept": "*/*"}
        assert proxy.request("GET", "/v1/lic", headers=tenant_a)[::2] == (200, b'{"license":"tenant-a"}')
        upstream.respond(body=b'{"license":"star"}', headers={"Vary": "*"})
        assert proxy.request("GET", "/v1/star", headers=tenant_a)[0] == 200
        upstream.stop()
        # The same request is served from trust; one differing in a header the answer
        # varies on, or in a configured key header, is not.
        assert proxy.request("GET", "/v1/lic", headers=tenant_a)[::2] == (200, b'{"license":"tenant-a"}')
        for changed in ({"X-Tenant": "b"}, {"Accept": "text/html"}, {"X-Auth-Token": "t2"},
                        {"X-Tenant": None}):
            headers = {k: v for k, v in {**tenant_a, **changed}.items() if v is not None}
            assert proxy.request("GET", "/v1/lic", headers=headers)[0] == 502, changed
        # Vary: * is never cached.
        assert proxy.request("GET", "/v1/star", headers=tenant_a)[0] == 502
        # A header name in any case: the same licensee.
        lower = {"x-tenant": "a", "x-auth-token": "t1", "accept": "*/*"}
        assert proxy.request("GET", "/v1/lic", headers=lower)[0] == 200


def test_a_restart_keeps_the_headers_an_answer_varies_on(tmp_path, pki, upstream):
    upstream.respond(body=b'{"license":"tenant-a"}', headers={"Vary": "X-Tenant"})
    with start(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("Connected")
        assert proxy.request("GET", "/v1/lic", headers={"X-Tenant": "a"})[0] == 200
    upstream.stop()
    with start(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("TrustBased")
        assert proxy.request("GET", "/v1/lic", headers={"X-Tenant": "a"})[0] == 200
        assert proxy.request("GET", "/v1/lic", headers={"X-Tenant": "b"})[0] == 502
        assert proxy.request("GET", "/v1/lic")[0] == 502


def test_hop_by_hop_headers_never_reach_the_license_server(tmp_path, pki, upstream):
    hop = {"Proxy-Authorization": "Basic cHJveHk6c2VjcmV0", "TE": "trailers",
           "Keep-Alive": "timeout=5", "Upgrade": "h2c", "Proxy-Connection": "keep-alive",
           "Trailer": "X-Sum"}
    with start(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("Connected")
        assert proxy.request("GET", "/v1/hop", headers={**hop, "X-End": "1"})[0] == 200
    (seen,) = [r for r in upstream.requests if r.path == "/lic/hop"]
    assert seen.header("X-End") == "1"
    assert [name for name in hop if seen.header(name) is not None] == []


def test_a_credential_named_in_connection_is_neither_sent_nor_keyed(tmp_path, pki, upstream):
    with start(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("Connected")
        upstream.respond(body=b'{"license":"anonymous"}')
        sneaky = {"Authorization": "Token K", "Connection": "Authorization"}
        assert proxy.request("GET", "/v1/lic", headers=sneaky)[0] == 200
        upstream.stop()
        assert proxy.request("GET", "/v1/lic", headers={"Authorization": "Token K"})[0] == 502
        assert proxy.request("GET", "/v1/lic")[::2] == (200, b'{"license":"anonymous"}')
    (seen,) = [r for r in upstream.requests if r.path == "/lic/lic"]
    assert seen.header("Authorization") is None


def test_repeated_credential_values_count_in_their_order(tmp_path, pki, upstream):
    first = b"GET /v1/lic HTTP/1.1\r\nHost: p\r\nX-Api-Key: a\r\nX-Api-Key: b\r\nConnection: close\r\n\r\n"
    swapped = first.replace(b"X-Api-Key: a\r\nX-Api-Key: b", b"X-Api-Key: b\r\nX-Api-Key: a")
    with start(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("Connected")
        assert raw(proxy, first).startswith(b"HTTP/1.1 200 ")
        upstream.stop()
        assert raw(proxy, first).startswith(b"HTTP/1.1 200 ")
        assert raw(proxy, swapped).startswith(b"HTTP/1.1 502 ")


def raw(proxy, data: bytes) -> bytes:
    return exchange(proxy, "licensing", data)


def test_set_cookie_and_3xx_are_never_served_from_trust(tmp_path, pki, upstream):
    with start(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("Connected")
        upstream.set_cookie = "session=licensee-a; Path=/"
        code, headers, _ = proxy.request("GET", "/v1/cookie")
        assert (code, headers["Set-Cookie"]) == (200, "session=licensee-a; Path=/")
        upstream.set_cookie = None
        upstream.respond(status=302, body=b"", headers={"Location": "https://elsewhere.example/"})
        code, headers, _ = proxy.request("GET", "/v1/moved")
        assert (code, headers["Location"]) == (302, "https://elsewhere.example/")
        upstream.stop()
        code, headers, _ = proxy.request("GET", "/v1/cookie")
        assert (code, headers["Set-Cookie"]) == (200, None)
        assert proxy.request("GET", "/v1/moved")[0] == 502


def test_a_chunked_answer_is_relayed_whole_and_trusted(tmp_path, pki, upstream):
    body = b'{"license":"sent in chunks of four bytes"}'
    with start(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("Connected")
        upstream.respond(body=body)
        upstream.mode = "chunked"
        code, headers, got = proxy.request("GET", "/v1/chunked")
        assert (code, got, headers["Content-Length"]) == (200, body, str(len(body)))
        upstream.stop()
        code, headers, got = proxy.request("GET", "/v1/chunked")
        assert (code, got) == (200, body) and "Age" in headers


def test_a_head_answer_carries_the_upstreams_content_length(tmp_path, pki, upstream):
    upstream.respond(body=b"x" * 1234)
    with start(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("Connected")
        for _ in ("relayed", "from trust"):
            code, headers, got = proxy.request("HEAD", "/v1/lic")
            assert (code, headers["Content-Length"], got) == (200, "1234", b"")
            upstream.stop()


def test_an_https_forward_proxy_is_verified(tmp_path, pki, upstream):
    """squid on TLS with a certificate from a CA nobody trusts: no tunnel, no request."""
    with Squid(tls=(pki.unknown_ca_server_cert, pki.unknown_ca_server_key)) as squid:
        env = {"HTTPS_PROXY": squid.url(host="localhost")}
        with start(tmp_path, pki, upstream, env=env) as proxy:
            assert proxy.wait_exit(timeout=20) == 1
    assert f"proxy https://localhost:{squid.port}: TLS: certificate verify failed" in proxy.log_text()
    assert upstream.requests == []


def test_a_config_error_never_prints_a_value_from_the_environment(tmp_path):
    secret = "lk-put-in-the-wrong-key-5c2e"
    text = '[license]\nserver_url = "${DEEPGRAM_API_KEY}"\n'
    with ProxyProcess(tmp_path, text, env={"DEEPGRAM_API_KEY": secret}) as proxy:
        assert proxy.wait_exit() == 2
    assert proxy.log_text() == (
        f"license-proxy: {tmp_path}/license-proxy.toml: [license] server_url: expected an"
        " https:// URL with a host (the value, from ${DEEPGRAM_API_KEY}, is not shown)\n"
    )


# The state directory


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [directory, *directory.iterdir()]}


def test_a_state_directory_the_proxy_creates_is_private_whatever_the_umask(tmp_path, pki, upstream):
    with start(tmp_path, pki, upstream, umask=0) as proxy:
        proxy.wait_state("Connected")
        assert proxy.request("GET", "/v1/lic")[0] == 200
    state = tmp_path / "state"
    assert modes(state) == {"state": 0o700, "trust-cache.json": 0o600,
                            "trust-cache.json.journal": 0o600, "tls.crt": 0o600, "tls.key": 0o600}


def test_a_state_directory_others_can_write_keeps_the_files_in_a_private_one(tmp_path, pki, upstream):
    state = tmp_path / "state"
    with start(tmp_path, pki, upstream) as proxy:  # a former version, or a first start
        proxy.wait_state("Connected")
        upstream.respond(body=b'{"license":"kept"}')
        assert proxy.request("GET", "/v1/lic")[0] == 200
    os.chmod(state, 0o777)  # a Kubernetes emptyDir
    upstream.stop()
    with start(tmp_path, pki, upstream, umask=0) as proxy:
        proxy.wait_state("TrustBased")
        assert proxy.request("GET", "/v1/lic")[::2] == (200, b'{"license":"kept"}')
    assert (
        f"state directory {state} is writable by other users (mode 777), who could replace files"
        f" in it: the trust cache and the generated key are kept in {state}/private (0700) instead"
    ) in proxy.log_text()
    assert modes(state) == {"state": 0o777, "private": 0o700}
    assert modes(state / "private") == {"private": 0o700, "trust-cache.json": 0o600,
                                        "trust-cache.json.journal": 0o600, "tls.crt": 0o600,
                                        "tls.key": 0o600}


def test_a_private_directory_another_user_made_stops_the_start(tmp_path, pki, upstream):
    state = tmp_path / "state"
    (state / "private").mkdir(parents=True)
    os.chmod(state, 0o777)
    os.chown(state / "private", 65534, 65534)
    with start(tmp_path, pki, upstream) as proxy:
        assert proxy.wait_exit() == 2
    assert (
        f"license-proxy: [cache] path: state directory {state}/private: not a directory of this"
        f" user (uid {os.geteuid()}): another user made it, and could have put a trust cache of"
        " their own in it; remove it\n"
    ) in proxy.log_text()

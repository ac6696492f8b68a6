"""
End to end through real forward proxies on loopback: a real ``twistd
license-proxy`` reaches the TLS upstream through squid (CONNECT, with and
without Basic auth, and as an https:// proxy) and through dante (SOCKS5, with
and without user name/password).  Each test proves the path from the proxy's
own log, and what an operator sees: status, answers, log lines, exit status.
"""

from __future__ import annotations

import json
import socket

from tests.support.configs import config
from tests.support.forward import SOCKS_PASSWORD, SOCKS_USER, Dante, Squid
from tests.support.proxy import ProxyProcess, free_port


def start(tmp_path, pki, upstream, env=None, license=""):
    text = config(tmp_path, pki, upstream.url, license=license, trust='duration = "1h"')
    return ProxyProcess(tmp_path, text, env=env)


def relay_ok(proxy, upstream, path="/v1/through"):
    upstream.respond(body=b'{"license":"ok"}')
    code, _, body = proxy.request("GET", path)
    assert (code, body) == (200, b'{"license":"ok"}')
    assert [r.path for r in upstream.requests if r.path == path] == [path]


def test_connect_through_squid_from_https_proxy(tmp_path, pki, upstream):
    with Squid() as squid:
        with start(tmp_path, pki, upstream, env={"HTTPS_PROXY": squid.url()}) as proxy:
            proxy.wait_state("Connected")
            for n in range(3):
                relay_ok(proxy, upstream, f"/v1/through/{n}")
            assert (
                f"egress to {upstream.url}: through proxy {squid.url()} (from HTTPS_PROXY)"
                in proxy.log_text()
            )
        # squid logs a tunnel when it closes: the stopped proxy closed its pooled one,
        # which carried the check-in and all three relays.
        tunnel = f"CONNECT localhost:{upstream.port} - HIER_DIRECT"
        assert squid.wait_log(tunnel).count(tunnel) == 1
        assert (upstream.connections, len(upstream.requests)) == (1, 4)


def test_connect_with_basic_auth_from_the_config(tmp_path, pki, upstream):
    with Squid(users={"alice": "s3cret:/@"}) as squid:
        url = squid.url("alice", "s3cret%3A%2F%40")  # percent-encoded in the URL
        env = {"HTTPS_PROXY": "http://127.0.0.1:1"}  # the config wins
        with start(tmp_path, pki, upstream, env, license=f'proxy = "{url}"') as proxy:
            proxy.wait_state("Connected")
            relay_ok(proxy, upstream)
            log = proxy.log_text()
        assert f"through proxy http://alice:***@127.0.0.1:{squid.port} (from [license] proxy)" in log
        assert "s3cret" not in log
        squid.wait_log(f"CONNECT localhost:{upstream.port} alice HIER_DIRECT")


def test_a_wrong_proxy_password_stops_the_start_with_the_407(tmp_path, pki, upstream):
    with Squid(users={"alice": "right"}) as squid:
        env = {"https_proxy": squid.url("alice", "pw-not-right-7731")}
        with start(tmp_path, pki, upstream, env) as proxy:
            assert proxy.wait_exit(timeout=20) == 1
        assert (
            f"proxy http://127.0.0.1:{squid.port}: CONNECT answered 407 Proxy Authentication Required"
            in proxy.log_text()
        )
        assert "pw-not-right-7731" not in proxy.log_text()
        assert upstream.requests == []
        squid.wait_log("TCP_DENIED/407")


def test_a_failing_proxy_is_a_relay_failure_and_trust_takes_over(tmp_path, pki, upstream):
    squid = Squid(users={"alice": "first"})
    with squid:
        env = {"HTTPS_PROXY": squid.url("alice", "first")}
        with start(tmp_path, pki, upstream, env) as proxy:
            proxy.wait_state("Connected")
            relay_ok(proxy, upstream, "/v1/cached")
            # The same squid, same port, now with another password: tunnels are cut and
            # new ones get 407.
            squid.stop()
            squid.users = {"alice": "second"}
            squid.start()
            code, headers, body = proxy.request("GET", "/v1/cached")
            assert (code, body) == (200, b'{"license":"ok"}') and "Age" in headers
            # Under load the 407 may come after answer_within, the cached answer first:
            # the server is down once the state says the exchange failed.
            assert proxy.wait_state("TrustBased")
            code, _, body = proxy.request("GET", "/v1/uncached")
            reason = f"proxy http://127.0.0.1:{squid.port}: CONNECT answered 407 Proxy Authentication Required"
            assert code == 502  # at once: the 407 marked the server down
            error = f"license server unavailable: down since its last failure ({reason})"
            assert json.loads(body)["error"] == error
            assert reason in proxy.log_text()


def test_https_proxy_tls_inside_tls(tmp_path, pki, upstream):
    """squid on TLS (verified by name with the test CA), the upstream's TLS inside."""
    with Squid(tls=(pki.server_cert, pki.server_key)) as squid:
        env = {"ALL_PROXY": squid.url(host="localhost")}
        with start(tmp_path, pki, upstream, env) as proxy:
            proxy.wait_state("Connected")
            relay_ok(proxy, upstream)
        squid.wait_log(f"CONNECT localhost:{upstream.port} - HIER_DIRECT")


def test_socks5h_through_dante(tmp_path, pki, upstream):
    with Dante() as dante:
        with start(tmp_path, pki, upstream, env={"all_proxy": dante.url("socks5h")}) as proxy:
            proxy.wait_state("Connected")
            relay_ok(proxy, upstream)
            assert f"through proxy socks5h://127.0.0.1:{dante.port} (from all_proxy)" in proxy.log_text()
            dante.wait_log("tcp/connect [: 127.0.0.1.")
            assert f"127.0.0.1.{upstream.port}" in dante.log()


def test_socks5_with_username_and_password(tmp_path, pki, upstream):
    with Dante(auth=True) as dante:
        env = {"ALL_PROXY": dante.url("socks5", SOCKS_USER, SOCKS_PASSWORD)}
        with start(tmp_path, pki, upstream, env) as proxy:
            proxy.wait_state("Connected")
            relay_ok(proxy, upstream)
            log = proxy.log_text()
        assert f"socks5://{SOCKS_USER}:***@127.0.0.1:{dante.port}" in log
        assert SOCKS_PASSWORD not in log
        assert f"username%{SOCKS_USER}@127.0.0.1" in dante.wait_log(f"127.0.0.1.{upstream.port}")

        wrong = tmp_path / "wrong"
        wrong.mkdir()
        env = {"ALL_PROXY": dante.url("socks5", SOCKS_USER, "not-the-password")}
        with start(wrong, pki, upstream, env) as proxy:
            assert proxy.wait_exit(timeout=20) == 1
        assert (
            f"proxy socks5://127.0.0.1:{dante.port}: SOCKS5 proxy rejected the user name or password"
            in proxy.log_text()
        )


def test_no_proxy_bypasses_the_proxy(tmp_path, pki, upstream):
    """The proxy variable names a port nobody listens on: only a bypass can connect."""
    env = {"HTTPS_PROXY": f"http://127.0.0.1:{free_port()}", "NO_PROXY": "example.org,localhost"}
    with start(tmp_path, pki, upstream, env) as proxy:
        proxy.wait_state("Connected")
        relay_ok(proxy, upstream)
        assert f"egress to {upstream.url}: direct (localhost:{upstream.port} matches NO_PROXY)" in proxy.log_text()


def test_a_refused_or_silent_proxy_names_the_hop(tmp_path, pki, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    with start(tmp_path, pki, upstream, {"HTTPS_PROXY": dead}) as proxy:
        assert proxy.wait_exit(timeout=20) == 1
    assert f"proxy {dead}: connection refused" in proxy.log_text()

    # A proxy that accepts and never answers CONNECT: the one deadline ("2s") ends it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = tmp_path / "mute"
        mute.mkdir()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with start(mute, pki, upstream, {"HTTPS_PROXY": url}) as proxy:
            assert proxy.wait_exit(timeout=20) == 1
        assert f"proxy {url}: deadline passed waiting for its CONNECT answer" in proxy.log_text()
    assert upstream.requests == []


def test_a_bad_proxy_variable_is_a_config_error(tmp_path, pki, upstream):
    with start(tmp_path, pki, upstream, {"HTTPS_PROXY": "ftp://u:pw-x@proxy:21"}) as proxy:
        assert proxy.wait_exit() == 2
    line = proxy.log_text().strip().splitlines()[-1]
    assert line == (
        "license-proxy: environment variable HTTPS_PROXY: expected a proxy URL with scheme "
        "http, https, socks5 or socks5h, got 'ftp'"
    )

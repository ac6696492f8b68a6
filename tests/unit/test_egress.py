"""
Unit tests of route choice: which proxy variable wins, every NO_PROXY form,
proxy URLs (credentials, masking), and the config keys that override both.
"""

from __future__ import annotations

import pytest

from license_proxy.config import ConfigError, load
from license_proxy.egress import Settings, bypasses, choose
from license_proxy.proxyurl import Proxy


def route(environ, host="license.example", port=443, proxy="", no_proxy=""):
    return choose(proxy, no_proxy, environ, host, port)


# -- which proxy ----------------------------------------------------------------------


ALL = {
    "https_proxy": "http://lower-https:1",
    "HTTPS_PROXY": "http://upper-https:2",
    "all_proxy": "http://lower-all:3",
    "ALL_PROXY": "http://upper-all:4",
}


@pytest.mark.parametrize(
    "unset, winner",
    [
        ((), "https_proxy"),
        (("https_proxy",), "HTTPS_PROXY"),
        (("https_proxy", "HTTPS_PROXY"), "all_proxy"),
        (("https_proxy", "HTTPS_PROXY", "all_proxy"), "ALL_PROXY"),
    ],
)
def test_proxy_variables_in_curls_order(unset, winner):
    environ = {k: v for k, v in ALL.items() if k not in unset}
    chosen = route(environ)
    assert chosen.proxy == Proxy.parse(ALL[winner])
    assert chosen.why == f"from {winner}"


def test_http_proxy_is_not_for_https_and_empty_means_unset():
    assert route({"HTTP_PROXY": "http://p:1", "http_proxy": "http://p:1"}).proxy is None
    assert route({"https_proxy": "", "HTTPS_PROXY": "http://p:2"}).proxy.port == 2
    assert str(route({})) == "direct (no proxy configured)"


def test_config_wins_over_the_environment():
    chosen = route(ALL, proxy="socks5h://cfg:1080")
    assert (chosen.proxy.scheme, chosen.proxy.host, chosen.why) == (
        "socks5h", "cfg", "from [license] proxy"
    )
    # The config's no_proxy replaces the environment's, it does not add to it.
    environ = {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "license.example"}
    assert route(environ).proxy is None
    assert route(environ, no_proxy="other.example").proxy is not None
    assert str(route(environ, no_proxy="*")) == "direct (license.example:443 matches [license] no_proxy)"


def test_no_proxy_lowercase_first():
    environ = {"HTTPS_PROXY": "http://p:1", "no_proxy": "other.example", "NO_PROXY": "license.example"}
    assert route(environ).proxy is not None
    environ["no_proxy"] = ""
    assert str(route(environ)) == "direct (license.example:443 matches NO_PROXY)"


def test_a_bad_proxy_variable_names_the_variable_not_the_password():
    with pytest.raises(ValueError) as caught:
        route({"ALL_PROXY": "ftp://u:hunter2@p:21"})
    assert str(caught.value).startswith("ALL_PROXY: expected a proxy URL with scheme")
    assert "hunter2" not in str(caught.value)


# -- NO_PROXY forms -------------------------------------------------------------------


@pytest.mark.parametrize(
    "no_proxy, host, port",
    [
        ("*", "anything.example", 443),
        ("license.example", "license.example", 443),
        ("license.example", "LICENSE.Example.", 443),  # case, trailing dot
        ("example", "license.example", 443),  # a subdomain
        (".example", "license.example", 443),  # leading dot ignored
        (".license.example", "license.example", 443),  # ... so it matches itself too
        ("other, license.example ,x", "license.example", 443),  # spaces around entries
        ("license.example:443", "license.example", 443),
        ("10.0.0.0/8", "10.1.2.3", 443),
        ("10.1.2.3", "10.1.2.3", 443),
        ("10.1.2.3:8443", "10.1.2.3", 8443),
        ("::1", "::1", 443),  # IPv6 without brackets
        ("0:0::1", "::1", 443),  # the same address written otherwise
        ("[::1]:8443", "::1", 8443),
        ("fd00::/8", "fd12::3", 443),
    ],
)
def test_no_proxy_bypasses(no_proxy, host, port):
    assert bypasses(no_proxy, host, port)


@pytest.mark.parametrize(
    "no_proxy, host, port",
    [
        ("", "license.example", 443),
        ("cense.example", "license.example", 443),  # not a label boundary
        ("license.example.org", "license.example", 443),
        ("license.example:8443", "license.example", 443),  # another port
        ("10.0.0.0/8", "11.1.2.3", 443),
        ("10.0.0.0/8", "ten.example", 443),  # CIDR only for IP literals
        ("[::1]:8443", "::1", 443),
        ("fd00::/8", "fe80::1", 443),
        ("*.example", "license.example", 443),  # "*" only alone, as in curl
        (",,", "license.example", 443),
    ],
)
def test_no_proxy_does_not_bypass(no_proxy, host, port):
    assert not bypasses(no_proxy, host, port)


# -- proxy URLs ---------------------------------------------------------------------


def test_proxy_url_credentials_are_decoded_and_masked():
    proxy = Proxy.parse("http://us%40er:p%3Ass%20w@Proxy.Corp:3128")
    assert (proxy.username, proxy.password, proxy.host, proxy.port) == (
        "us@er", "p:ss w", "proxy.corp", 3128
    )
    assert str(proxy) == "http://us@er:***@proxy.corp:3128"
    assert proxy.name == "http://proxy.corp:3128"
    assert "p:ss" not in repr(proxy) and "p:ss" not in repr(Settings(proxy="http://u:p:ss@x", no_proxy="", environ={}))
    assert proxy.basic_credentials() == b"Basic dXNAZXI6cDpzcyB3"  # base64("us@er:p:ss w")


@pytest.mark.parametrize(
    "text, scheme, host, port",
    [
        ("proxy:3128", "http", "proxy", 3128),  # no scheme: http, as in curl
        ("http://proxy", "http", "proxy", 1080),  # curl's default port
        ("https://proxy", "https", "proxy", 443),
        ("socks5://[::1]", "socks5", "::1", 1080),
        ("SOCKS5H://proxy:9050", "socks5h", "proxy", 9050),
    ],
)
def test_proxy_url_defaults(text, scheme, host, port):
    proxy = Proxy.parse(text)
    assert (proxy.scheme, proxy.host, proxy.port, proxy.username) == (scheme, host, port, None)


@pytest.mark.parametrize(
    "text", ["socks4://proxy:1080", "http://", "http://proxy:99999", "http://proxy:port"]
)
def test_bad_proxy_urls(text):
    with pytest.raises(ValueError):
        Proxy.parse(text)


# -- the config keys ------------------------------------------------------------------


def test_config_keys(tmp_path):
    path = tmp_path / "license-proxy.toml"
    path.write_text('[license]\nproxy = "${P}"\nno_proxy = ".corp, 10.0.0.0/8"\n')
    config = load(str(path), {"P": "socks5://u:secret@proxy:1080"})
    assert (config.proxy, config.no_proxy) == ("socks5://u:secret@proxy:1080", ".corp, 10.0.0.0/8")
    assert "secret" not in repr(config)


@pytest.mark.parametrize(
    "value, message",
    [
        ('"ftp://proxy:21"', "expected a proxy URL with scheme http, https, socks5 or socks5h, got 'ftp'"),
        ("3128", "expected a string, got 3128"),
        ('"http://u:secret@:3128"', "expected a proxy URL with a host"),
    ],
)
def test_config_rejects_bad_proxies(tmp_path, value, message):
    path = tmp_path / "license-proxy.toml"
    path.write_text(f"[license]\nproxy = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path), {})
    assert str(caught.value).startswith(f"{path}: [license] proxy: {message}")
    assert "secret" not in str(caught.value)

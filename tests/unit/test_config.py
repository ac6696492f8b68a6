"""Tests for license_proxy.config: the vendor's files load, every mistake is one clear line."""

from __future__ import annotations

import math
import os
import re
import tomllib
from pathlib import Path

import attrs
import pytest

from license_proxy.config import (
    _KEYS, Bounded, Config, ConfigError, load, parse_duration, require_key,
)
from tests.support.configs import error, load_text, write

DEFAULT_FILE = Path(__file__).parents[2] / "etc" / "license-proxy.toml"

VENDOR_MINIMAL = '[server]\nhost = "0.0.0.0"\nport = 8443\nbase_url = "/"\nstatus_port = 8080\n'


def touch(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_text("-----BEGIN NOTHING-----\n")
    return str(path)


# The shipped default file


def test_default_file_loads_as_defaults():
    assert load(str(DEFAULT_FILE), {}) == Config()


def test_default_file_documents_every_key_with_its_default(tmp_path):
    """Uncommenting every `# key = value` line changes nothing, and names every known key."""
    section = None
    documented = set()
    lines = []
    for line in DEFAULT_FILE.read_text().splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header[1]
        if setting := re.fullmatch(r"# (\w+) = .*", line):
            documented.add((section, setting[1]))
            line = line.removeprefix("# ")
        lines.append(line)
    assert documented == set(_KEYS)
    assert load_text(tmp_path, "\n".join(lines)) == Config()


def test_defaults():
    config = Config()
    assert (config.host, config.port, config.base_url, config.status_port) == (
        "0.0.0.0", 8443, "/", 8080,
    )
    assert (config.tls, config.tls_cert, config.tls_key, config.fips) == (True, None, None, False)
    assert config.server_urls == ("https://license.deepgram.com",)
    assert (config.key, config.ca_file, config.client_cert, config.client_key) == (None,) * 4
    assert (config.timeout, config.startup_timeout) == (30.0, 30.0)
    assert (config.trust_duration, config.checkin_interval) == (86400.0, 60.0)
    assert config.cache_path == "/var/lib/license-proxy/trust-cache.json"
    assert config.state_dir == "/var/lib/license-proxy"


def test_empty_file_is_all_defaults(tmp_path):
    assert load_text(tmp_path, "") == Config()


# The vendor's own files


def test_vendor_minimal_file(tmp_path):
    assert load_text(tmp_path, VENDOR_MINIMAL) == Config()


def test_vendor_file_with_server_url_and_literal_key(tmp_path):
    config = load_text(
        tmp_path,
        VENDOR_MINIMAL
        + '[license]\nserver_url = "https://license.example.com"\nkey = "abc123-key"\n',
    )
    assert config.server_urls == ("https://license.example.com",)
    assert config.key == "abc123-key"
    assert attrs.evolve(config, server_urls=Config().server_urls, key=None) == Config()


def test_vendor_file_with_key_from_environment(tmp_path):
    config = load_text(
        tmp_path,
        VENDOR_MINIMAL + '[license]\nkey = "${DEEPGRAM_LICENSE_KEY}"\n',
        {"DEEPGRAM_LICENSE_KEY": "from-env-key"},
    )
    assert config.key == "from-env-key"


def test_vendor_file_with_fips_enabled(tmp_path):
    config = load_text(tmp_path, VENDOR_MINIMAL + '[fips]\nmode = "enabled"\n')
    assert config.fips is True
    assert attrs.evolve(config, fips=False) == Config()


# Every key set


def test_every_key_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tls.crt", "tls.key", "ca.pem", "client.crt", "client.key"):
        touch(tmp_path, name)
    config = load_text(
        tmp_path,
        """
        [server]
        host = "127.0.0.1"
        port = 9443
        base_url = "/v1"
        status_port = 9080
        tls = true
        tls_cert = "tls.crt"
        tls_key = "tls.key"
        [fips]
        mode = "disabled"
        [license]
        server_url = ["https://a.example:8443/", "https://b.example"]
        key = "k"
        ca_file = "ca.pem"
        client_cert = "client.crt"
        client_key = "client.key"
        timeout = 5
        startup_timeout = "2m"
        [trust]
        duration = "7d"
        checkin_interval = 12.5
        [cache]
        path = "state/cache.json"
        """,
    )
    assert config == Config(
        host="127.0.0.1",
        port=9443,
        base_url="/v1/",
        status_port=9080,
        tls=True,
        tls_cert="tls.crt",
        tls_key="tls.key",
        fips=False,
        server_urls=("https://a.example:8443/", "https://b.example"),
        key="k",
        ca_file="ca.pem",
        client_cert="client.crt",
        client_key="client.key",
        timeout=5.0,
        startup_timeout=120.0,
        trust_duration=7 * 86400.0,
        checkin_interval=12.5,
        cache_path="state/cache.json",
    )
    assert config.state_dir == "state"


def test_state_dir_of_a_bare_file_name():
    assert Config(cache_path="cache.json").state_dir == "."


# [server]


@pytest.mark.parametrize(
    "given, normalised", [("/", "/"), ("/v1", "/v1/"), ("/v1/", "/v1/"), ("/a/b", "/a/b/")]
)
def test_base_url_is_normalised(tmp_path, given, normalised):
    assert load_text(tmp_path, f'[server]\nbase_url = "{given}"\n').base_url == normalised


def test_base_url_must_start_with_slash(tmp_path):
    assert error(tmp_path, '[server]\nbase_url = "v1"\n') == (
        "[server] base_url: expected a URL path starting with \"/\" (ASCII, percent-encoded), got 'v1'"
    )


@pytest.mark.parametrize("key", ["port", "status_port"])
@pytest.mark.parametrize(
    "toml, shown",
    [
        ('"abc"', "'abc'"),
        ('"8443"', "'8443'"),
        ("true", "true"),
        ("0", "0"),
        ("-1", "-1"),
        ("65536", "65536"),
        ("8443.0", "8443.0"),
        ("[8443]", "a list"),
        ("{ number = 8443 }", "a table"),
        ("1979-05-27", "a date or time"),
    ],
)
def test_bad_port(tmp_path, key, toml, shown):
    assert error(tmp_path, f"[server]\n{key} = {toml}\n") == (
        f"[server] {key}: expected an integer from 1 to 65535, got {shown}"
    )


@pytest.mark.parametrize("port", [1, 65535])
def test_port_limits_are_allowed(tmp_path, port):
    assert load_text(tmp_path, f"[server]\nport = {port}\n").port == port


def test_host_must_not_be_empty(tmp_path):
    assert error(tmp_path, '[server]\nhost = ""\n') == (
        "[server] host: expected a non-empty string, got ''"
    )


def test_host_must_be_a_string(tmp_path):
    assert error(tmp_path, '[server]\nhost = ["a", "b"]\n') == (
        "[server] host: expected a string, got a list"
    )


def test_tls_names_add_names_to_the_generated_certificate(tmp_path):
    names = '["proxy.example.com", "*.example.org", "10.0.0.7", "fd00::7"]'
    config = load_text(tmp_path, f"[server]\ntls_names = {names}\n")
    assert config.tls_names == ("proxy.example.com", "*.example.org", "10.0.0.7", "fd00::7")


@pytest.mark.parametrize(
    "value, shown",
    [('"a.example"', "got 'a.example'"), ('["a b"]', "got 'a b'"), ("[1]", "got 1"),
     ('["-x.example"]', "got '-x.example'"), ('[""]', "got ''")],
)
def test_tls_names_must_be_a_list_of_names(tmp_path, value, shown):
    message = error(tmp_path, f"[server]\ntls_names = {value}\n")
    assert message.startswith("[server] tls_names: expected ") and message.endswith(shown)


def test_tls_names_are_refused_with_a_certificate_of_ones_own(tmp_path):
    cert, key = touch(tmp_path, "c.pem"), touch(tmp_path, "k.pem")
    for server in (f'tls_cert = "{cert}"\ntls_key = "{key}"', "tls = false"):
        assert error(tmp_path, f'[server]\n{server}\ntls_names = ["a.example"]\n') == (
            "[server] tls_names: names the generated certificate: not with tls_cert/tls_key"
            " or tls = false"
        )


def test_tls_must_be_a_boolean(tmp_path):
    assert error(tmp_path, '[server]\ntls = "yes"\n') == (
        "[server] tls: expected true or false, got 'yes'"
    )


def test_tls_false_alone_is_plain_http(tmp_path):
    assert load_text(tmp_path, "[server]\ntls = false\n").tls is False


@pytest.mark.parametrize("key", ["tls_cert", "tls_key"])
def test_tls_false_with_a_certificate_is_refused(tmp_path, key):
    pem = touch(tmp_path, "x.pem")
    assert error(tmp_path, f'[server]\ntls = false\n{key} = "{pem}"\n') == (
        "[server] tls: tls = false cannot be combined with tls_cert/tls_key"
    )


@pytest.mark.parametrize(
    "section, given, missing",
    [
        ("server", "tls_cert", "tls_key"),
        ("server", "tls_key", "tls_cert"),
        ("license", "client_cert", "client_key"),
        ("license", "client_key", "client_cert"),
    ],
)
def test_half_a_key_pair_names_the_missing_key(tmp_path, section, given, missing):
    pem = touch(tmp_path, "x.pem")
    assert error(tmp_path, f'[{section}]\n{given} = "{pem}"\n') == (
        f"[{section}] {missing}: missing, required when {given} is set"
    )


def test_empty_optional_paths_mean_unset(tmp_path):
    config = load_text(
        tmp_path,
        '[server]\ntls_cert = ""\ntls_key = ""\n'
        '[license]\nca_file = ""\nclient_cert = ""\nclient_key = ""\n',
    )
    assert config == Config()


# Referenced files


@pytest.mark.parametrize(
    "section, key",
    [("server", "tls_cert"), ("server", "tls_key"), ("license", "ca_file"),
     ("license", "client_cert"), ("license", "client_key")],
)
def test_missing_referenced_file(tmp_path, section, key):
    missing = str(tmp_path / "nope.pem")
    assert error(tmp_path, f'[{section}]\n{key} = "{missing}"\n') == (
        f"[{section}] {key}: cannot read '{missing}': No such file or directory"
    )


def test_referenced_file_is_a_directory(tmp_path):
    assert error(tmp_path, f'[license]\nca_file = "{tmp_path}"\n') == (
        f"[license] ca_file: cannot read '{tmp_path}': Is a directory"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_referenced_file(tmp_path):
    pem = touch(tmp_path, "ca.pem")
    os.chmod(pem, 0)
    assert error(tmp_path, f'[license]\nca_file = "{pem}"\n') == (
        f"[license] ca_file: cannot read '{pem}': Permission denied"
    )


def test_referenced_file_path_must_be_a_string(tmp_path):
    assert error(tmp_path, "[license]\nca_file = 1\n") == (
        "[license] ca_file: expected a string, got 1"
    )


# [fips]


@pytest.mark.parametrize("mode, fips", [("enabled", True), ("disabled", False)])
def test_fips_mode(tmp_path, mode, fips):
    assert load_text(tmp_path, f'[fips]\nmode = "{mode}"\n').fips is fips


@pytest.mark.parametrize(
    "toml, shown", [('"on"', "'on'"), ('"Enabled"', "'Enabled'"), ("true", "true")]
)
def test_bad_fips_mode(tmp_path, toml, shown):
    assert error(tmp_path, f"[fips]\nmode = {toml}\n") == (
        f'[fips] mode: expected "enabled" or "disabled", got {shown}'
    )


# [license] server_url


def test_server_url_list_is_kept_in_order_and_as_given(tmp_path):
    config = load_text(
        tmp_path,
        '[license]\nserver_url = ["https://license-proxy:8443/", "https://license.deepgram.com"]\n',
    )
    assert config.server_urls == ("https://license-proxy:8443/", "https://license.deepgram.com")


@pytest.mark.parametrize(
    "toml, reason",
    [
        ('"http://license.example.com"',
         "expected an https:// URL with a host, got 'http://license.example.com'"),
        ('"license.example.com"', "expected an https:// URL with a host, got 'license.example.com'"),
        ('"https:///path"', "expected an https:// URL with a host, got 'https:///path'"),
        ('""', "expected an https:// URL with a host, got ''"),
        ('"https://a.example#top"',
         "expected an https:// URL without a #fragment, got 'https://a.example#top'"),
        ('"https://a.example:0"',
         "expected an https:// URL with a port from 1 to 65535, got 'https://a.example:0'"),
        ('"https://a.example:99999"',
         "expected an https:// URL with a port from 1 to 65535, got 'https://a.example:99999'"),
        ("[]", "expected an https:// URL or a list of them, got an empty list"),
        ("443", "expected an https:// URL or a list of them, got 443"),
        ('["https://a.example", 443]', "expected an https:// URL, got 443"),
        ('["https://a.example", "http://b.example"]',
         "expected an https:// URL with a host, got 'http://b.example'"),
    ],
)
def test_bad_server_url(tmp_path, toml, reason):
    assert error(tmp_path, f"[license]\nserver_url = {toml}\n") == f"[license] server_url: {reason}"


def test_server_url_with_a_bad_port_number(tmp_path):
    message = error(tmp_path, '[license]\nserver_url = "https://a.example:abc"\n')
    assert message.startswith(
        "[license] server_url: expected an https:// URL, got 'https://a.example:abc': "
    )


def test_server_url_with_userinfo_is_refused_without_echoing_it(tmp_path):
    assert error(tmp_path, '[license]\nserver_url = "https://me:hunter2@a.example"\n') == (
        "[license] server_url: expected an https:// URL without a user name or password"
    )


# [license] key: a secret


def test_empty_key_is_none(tmp_path):
    assert load_text(tmp_path, '[license]\nkey = ""\n').key is None


def test_without_a_key_in_the_file_the_key_is_deepgram_api_key(tmp_path):
    assert load_text(tmp_path, VENDOR_MINIMAL, {"DEEPGRAM_API_KEY": "env-key"}).key == "env-key"
    assert load(None, {"DEEPGRAM_API_KEY": "env-key"}) == Config(key="env-key")
    # The file's key wins (the vendor's airgapped mode sets DEEPGRAM_API_KEY=airgapped-mode too).
    text = VENDOR_MINIMAL + '[license]\nkey = "file-key"\n'
    assert load_text(tmp_path, text, {"DEEPGRAM_API_KEY": "airgapped-mode"}).key == "file-key"
    assert load_text(tmp_path, VENDOR_MINIMAL, {"DEEPGRAM_API_KEY": ""}).key is None
    empty = VENDOR_MINIMAL + '[license]\nkey = ""\n'
    assert load_text(tmp_path, empty, {"DEEPGRAM_API_KEY": "env-key"}).key == "env-key"


def test_no_key_anywhere_is_refused_naming_both_places(tmp_path):
    path = write(tmp_path, VENDOR_MINIMAL)
    config = load(path, {})
    with pytest.raises(ConfigError) as info:
        require_key(path, config)
    assert str(info.value) == (
        f"{path}: no license key: set [license] key in the config file or the DEEPGRAM_API_KEY"
        " environment variable"
    )
    with pytest.raises(ConfigError, match="^the built-in defaults: no license key"):
        require_key(None, load(None, {}))
    require_key(path, load(path, {"DEEPGRAM_API_KEY": "k"}))


def test_key_is_not_in_repr(tmp_path):
    config = load_text(tmp_path, '[license]\nkey = "sekrit-4242"\n')
    assert config.key == "sekrit-4242"
    assert "sekrit-4242" not in repr(config)
    assert "key=" not in repr(config).replace("_key=", "")


@pytest.mark.parametrize(
    "toml, kind",
    [("424242", "an integer"), ('["sekrit-4242"]', "a list"), ('{ v = "sekrit-4242" }', "a table")],
)
def test_wrong_key_type_never_shows_the_key(tmp_path, toml, kind):
    assert error(tmp_path, f"[license]\nkey = {toml}\n") == (
        f"[license] key: expected a string, got {kind}"
    )


# Durations


@pytest.mark.parametrize(
    "value, seconds",
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("0.5s", 0.5),
        ("15m", 900.0),
        ("48h", 172800.0),
        ("7d", 604800.0),
        ("1h30m", 5400.0),
        ("1d12h", 129600.0),
        ("1.5h", 5400.0),
    ],
)
def test_parse_duration(value, seconds):
    result = parse_duration(value)
    assert result == seconds
    assert type(result) is float


@pytest.mark.parametrize(
    "value, shown",
    [("90", "'90'"), ("", "''"), ("1x", "'1x'"), ("h", "'h'"), ("1h 30m", "'1h 30m'"),
     ("1H", "'1H'"), (".5s", "'.5s'"), ("-5s", "'-5s'"), (True, "true"), ([], "a list"),
     (None, "a date or time")],
)
def test_parse_duration_rejects_malformed(value, shown):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == (
        'expected a number of seconds or a duration such as "90s", "15m", "48h", "1h30m",'
        f" got {shown}"
    )


@pytest.mark.parametrize(
    "value, shown",
    [(0, "0"), (-1, "-1"), (0.0, "0.0"), ("0s", "'0s'"), ("0h0m", "'0h0m'"),
     (math.inf, "inf"), (math.nan, "nan"), (10**400, str(10**400))],
)
def test_parse_duration_rejects_zero_negative_and_infinite(value, shown):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == f"expected a finite duration greater than 0, got {shown}"


@pytest.mark.parametrize(
    "section, key", [("license", "timeout"), ("license", "startup_timeout"),
                     ("trust", "duration"), ("trust", "checkin_interval")]
)
def test_bad_duration_names_the_key(tmp_path, section, key):
    assert error(tmp_path, f'[{section}]\n{key} = "soon"\n') == (
        f"[{section}] {key}: expected a number of seconds or a duration such as"
        ' "90s", "15m", "48h", "1h30m", got \'soon\''
    )


def test_zero_duration_names_the_key(tmp_path):
    assert error(tmp_path, "[trust]\nduration = 0\n") == (
        "[trust] duration: expected a finite duration greater than 0, got 0"
    )


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        # Issue 20 item 6: each of these ran.
        ("trust", "duration", '"3000000d"', "expected a duration from 1s to 3650d, got '3000000d'"),
        ("trust", "checkin_interval", "1e-9", "expected a duration from 1s to 1d, got 1e-09"),
        ("server", "header_timeout", "1e-300", "expected a duration from 1s to 1h, got 1e-300"),
        ("license", "retry_interval", "1e-300", "expected a duration from 1s to 1h, got 1e-300"),
        ("license", "answer_within", '"0.01s"', "expected a duration from 0.1s to 1h, got '0.01s'"),
        ("license", "timeout", '"2h"', "expected a duration from 1s to 1h, got '2h'"),
        ("license", "startup_timeout", '"2d"', "expected a duration from 1s to 1d, got '2d'"),
        ("server", "idle_timeout", "0.5", "expected a duration from 1s to 1d, got 0.5"),
        ("server", "max_body_size", "104857601", "expected an integer from 1 to 104857600, got 104857601"),
        ("server", "max_connections", "1048577", "expected an integer from 1 to 1048576, got 1048577"),
        ("server", "max_connections_per_peer", "9999999", "expected an integer from 1 to 1048576, got 9999999"),
        ("cache", "max_entries", "1000001", "expected an integer from 1 to 1000000, got 1000001"),
    ],
)
def test_absurd_durations_and_counts_are_refused_naming_the_key(tmp_path, section, key, value,
                                                                 message):
    assert error(tmp_path, f"[{section}]\n{key} = {value}\n") == f"[{section}] {key}: {message}"


def test_every_duration_and_count_has_bounds_and_takes_them():
    """Every number an operator sets is bounded, and both bounds load."""
    bounded = {where: spec.parse for where, spec in _KEYS.items() if isinstance(spec.parse, Bounded)}
    numeric = {where for where, spec in _KEYS.items()
               if spec.default_is_value and re.fullmatch(r'[0-9]+|"[0-9.]+[smhd]"', spec.default)}
    assert numeric - {("server", "port"), ("server", "status_port")} == set(bounded)
    for parse in bounded.values():
        assert (parse(parse.low), parse(parse.high)) == (parse.low, parse.high)


def test_nan_duration_from_toml(tmp_path):
    assert error(tmp_path, "[license]\ntimeout = nan\n") == (
        "[license] timeout: expected a finite duration greater than 0, got nan"
    )


def test_the_bound_on_connections_to_each_license_server(tmp_path):
    assert (Config().upstream_max_connections, Config().upstream_max_pending) == (32, 1024)
    text = "[license]\nmax_connections = 1\nmax_pending = 0\n"
    config = load_text(tmp_path, text)
    assert (config.upstream_max_connections, config.upstream_max_pending) == (1, 0)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max_connections", "0", "expected an integer from 1 to 1024, got 0"),
        ("max_connections", "1025", "expected an integer from 1 to 1024, got 1025"),
        ("max_connections", '"8"', "expected an integer from 1 to 1024, got '8'"),
        ("max_pending", "-1", "expected an integer from 0 to 65536, got -1"),
        ("max_pending", "true", "expected an integer from 0 to 65536, got true"),
    ],
)
def test_a_bound_out_of_range_names_the_key(tmp_path, key, value, message):
    assert error(tmp_path, f"[license]\n{key} = {value}\n") == f"[license] {key}: {message}"


# [cache]


def test_cache_max_entries(tmp_path):
    assert Config().cache_max_entries == 10_000
    assert load_text(tmp_path, "[cache]\nmax_entries = 500\n").cache_max_entries == 500


@pytest.mark.parametrize(
    "value, shown", [("0", "0"), ("-3", "-3"), ('"500"', "'500'"), ("1.5", "1.5"), ("true", "true")]
)
def test_bad_cache_max_entries_names_the_key(tmp_path, value, shown):
    assert error(tmp_path, f"[cache]\nmax_entries = {value}\n") == (
        f"[cache] max_entries: expected an integer from 1 to 1000000, got {shown}"
    )


# ${VAR} expansion


def test_variables_are_expanded_in_strings_and_lists(tmp_path):
    config = load_text(
        tmp_path,
        '[server]\nhost = "${HOST}"\n'
        '[license]\nserver_url = ["https://${PROXY}:8443", "https://license.deepgram.com"]\n'
        '[cache]\npath = "${STATE}/${FILE}.json"\n',
        {"HOST": "10.0.0.1", "PROXY": "license-proxy", "STATE": "/srv", "FILE": "cache"},
    )
    assert config.host == "10.0.0.1"
    assert config.server_urls == ("https://license-proxy:8443", "https://license.deepgram.com")
    assert config.cache_path == "/srv/cache.json"


@pytest.mark.parametrize(
    "raw, expanded",
    [
        ("a$$b", "a$b"),
        ("$${X}", "${X}"),
        ("$$$$", "$$"),
        ("a$b", "a$b"),
        ("cost$", "cost$"),
        ("$1", "$1"),
        ("${X}${X}", "xx"),
        ("${NESTED}", "${X}"),
    ],
)
def test_dollar_rules(tmp_path, raw, expanded):
    config = load_text(
        tmp_path, f'[license]\nkey = "{raw}"\n', {"X": "x", "NESTED": "${X}"}
    )
    assert config.key == expanded


def test_unset_variable_names_it_and_the_key(tmp_path):
    assert error(tmp_path, '[license]\nkey = "${DEEPGRAM_API_KEY}"\n', {"OTHER": "1"}) == (
        "[license] key: environment variable DEEPGRAM_API_KEY is not set"
    )


def test_unset_variable_in_a_list(tmp_path):
    assert error(tmp_path, '[license]\nserver_url = ["https://a.example", "https://${UP}"]\n') == (
        "[license] server_url: environment variable UP is not set"
    )


@pytest.mark.parametrize("raw", ["${", "${}", "${1X}", "${A-B}", "${ X }", "a${X"])
def test_malformed_reference_is_an_error(tmp_path, raw):
    assert error(tmp_path, f'[license]\nkey = "{raw}"\n', {"X": "x"}) == (
        '[license] key: "${" must be followed by a variable name and "}", as in ${NAME}'
    )


def test_expanded_value_is_validated(tmp_path):
    assert error(tmp_path, '[server]\nhost = "${HOST}"\n', {"HOST": ""}) == (
        "[server] host: expected a non-empty string (the value, from ${HOST}, is not shown)"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ('[server]\nbase_url = "${KEY}"', '[server] base_url: expected a URL path starting with'
         ' "/" (ASCII, percent-encoded) (the value, from ${KEY}, is not shown)'),
        ('[license]\nserver_url = ["https://a.example", "${KEY}"]', "[license] server_url:"
         " expected an https:// URL with a host (the value, from ${KEY}, is not shown)"),
        ('[license]\nca_file = "/nowhere/${KEY}"', "[license] ca_file: not a valid value"
         " (the value, from ${KEY}, is not shown)"),
        ('[cache]\nkey_headers = ["${KEY}"]', "[cache] key_headers: expected header names"
         " (the value, from ${KEY}, is not shown)"),
    ],
)
def test_a_value_from_the_environment_is_never_echoed(tmp_path, text, message):
    """A secret put in the wrong key (a license key as a URL) must not reach the log."""
    secret = "lk secret-7f3a9c"
    assert error(tmp_path, text + "\n", {"KEY": secret}) == message


# [cache] key_headers


def test_key_headers_are_case_insensitive_and_sorted(tmp_path):
    config = load_text(tmp_path, '[cache]\nkey_headers = ["X-Auth-Token", "authorization", "AUTHORIZATION"]\n')
    assert config.cache_key_headers == (b"authorization", b"x-auth-token")
    assert Config().cache_key_headers == (b"authorization", b"cookie", b"x-api-key")


@pytest.mark.parametrize(
    "value, reason",
    [
        ("[]", "expected a non-empty list of header names, got a list"),
        ('"Authorization"', "expected a non-empty list of header names, got 'Authorization'"),
        ('["X Token"]', "expected header names, got 'X Token'"),
        ('["X-Token:"]', "expected header names, got 'X-Token:'"),
        ("[1]", "expected header names, got 1"),
        ('["Proxy-Authorization"]', "Proxy-Authorization is never relayed as the client sent"
         " it, so can't identify one"),
        ('["Host"]', "Host is never relayed as the client sent it, so can't identify one"),
        ('["X_Auth_Token"]', "X_Auth_Token: a header name with _ is refused in requests (use -)"),
    ],
)
def test_bad_key_headers(tmp_path, value, reason):
    assert error(tmp_path, f"[cache]\nkey_headers = {value}\n") == f"[cache] key_headers: {reason}"


# Unknown names


def test_unknown_key(tmp_path):
    assert error(tmp_path, "[server]\nprot = 8443\n") == (
        "unknown key [server] prot (known: host, port, base_url, status_port, tls, tls_cert,"
        " tls_key, tls_names, max_body_size, header_timeout, idle_timeout, max_connections,"
        " max_connections_per_peer, backlog, drain_time)"
    )


def test_the_drain_from_the_file_or_the_environment_zero_turns_it_off(tmp_path):
    assert load(None, {}).drain_time == 5.0
    for value, seconds in (('"0s"', 0.0), ('"0m"', 0.0), ("0", 0.0), ("0.0", 0.0),
                           ('"30s"', 30.0), ('"5m"', 300.0), ("2.5", 2.5)):
        assert load_text(tmp_path, f"[server]\ndrain_time = {value}\n").drain_time == seconds
    for value in ("0s", "0", "12s"):
        assert load(None, {"LICENSE_PROXY_DRAIN_TIME": value}).drain_time == float(value[:-1] or 0)
    # the file wins where both say
    assert load_text(
        tmp_path, '[server]\ndrain_time = "1s"\n', {"LICENSE_PROXY_DRAIN_TIME": "9s"}
    ).drain_time == 1.0
    for value, shown in (('"6m"', "'6m'"), ("-1", "-1"), ("false", "false"), ('"soon"', "'soon'"),
                         ("nan", "nan"), ('"-0s"', "'-0s'")):
        assert error(tmp_path, f"[server]\ndrain_time = {value}\n") == (
            f"[server] drain_time: expected a duration from 0s to 5m, got {shown}"
        )
    with pytest.raises(ConfigError) as info:
        load(None, {"LICENSE_PROXY_DRAIN_TIME": "10m"})
    assert str(info.value) == (
        "environment variable LICENSE_PROXY_DRAIN_TIME: expected a duration from 0s to 5m,"
        " got '10m'"
    )


def test_unknown_section(tmp_path):
    assert error(tmp_path, "[foo]\nbar = 1\n") == (
        "unknown section [foo] (known: cache, fips, license, log, peers, server, trust)"
    )


def test_peers(tmp_path):
    ca, cert, key = (touch(tmp_path, f"peers-{name}.pem") for name in ("ca", "cert", "key"))
    material = f'ca_file = "{ca}"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
    text = f'[peers]\nurls = ["https://proxy-b:8443/", "https://[::1]:9443/lic/"]\n{material}'
    config = load_text(tmp_path, text)
    assert config.peer_urls == ("https://proxy-b:8443/", "https://[::1]:9443/lic/")
    assert (config.peer_ca_file, config.peer_cert_file, config.peer_key_file) == (ca, cert, key)
    # A peer proves itself by its certificate: all three, and a TLS listener to check it on.
    for missing in ("ca_file", "cert_file", "key_file"):
        partial = "".join(line + "\n" for line in material.splitlines() if missing not in line)
        variable = "LICENSE_PROXY_PEERS_" + {"ca_file": "CA", "cert_file": "CERT", "key_file": "KEY"}[missing]
        assert error(tmp_path, f'[peers]\nurls = ["https://b/"]\n{partial}') == (
            f"[peers] {missing}: missing (or {variable}), required when peers are set"
        )
    assert error(tmp_path, f"[server]\ntls = false\n[peers]\n{material}") == (
        "[server] tls: tls = false cannot be combined with [peers]"
    )
    assert error(tmp_path, '[peers]\nurls = "https://b"\n') == (
        "[peers] urls: expected a list of https:// URLs, got 'https://b'"
    )
    # The clients' credentials go to the peers: never in clear.
    assert error(tmp_path, '[peers]\nurls = ["http://b:8443"]\n') == (
        "[peers] urls: expected an https:// URL with a host, got 'http://b:8443'"
    )
    assert error(tmp_path, '[peers]\nca_file = "/nonexistent"\n').startswith(
        "[peers] ca_file: cannot read '/nonexistent'"
    )


PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEERS_ENV = {
    "LICENSE_PROXY_PEERS_NAME": "peers.ns.svc.cluster.local",
    "LICENSE_PROXY_PEERS_CA": PEM,
    "LICENSE_PROXY_PEERS_CERT": PEM,
    "LICENSE_PROXY_PEERS_KEY": PEM.replace("CERTIFICATE", "PRIVATE KEY"),
}


def test_peers_by_name_and_from_the_environment(tmp_path):
    """The vendor's chart fixes the file: everything peers need can come from extraEnv."""
    config = load_text(tmp_path, VENDOR_MINIMAL, PEERS_ENV)
    assert config.peer_name == "peers.ns.svc.cluster.local"
    assert (config.peer_ca_pem, config.peer_cert_pem) == (PEM, PEM)
    assert config.peer_key_pem.startswith("-----BEGIN PRIVATE KEY")
    assert "PRIVATE KEY" not in repr(config) and PEM not in repr(config)
    # The file's keys win where both are set.
    ca = touch(tmp_path, "ca.pem")
    text = f'[peers]\nname = "other.example"\nca_file = "{ca}"\n'
    config = load_text(tmp_path, text, PEERS_ENV)
    assert (config.peer_name, config.peer_ca_file, config.peer_ca_pem) == ("other.example", ca, None)
    assert config.peer_cert_pem == PEM
    # One line naming the variable, never its value.
    with pytest.raises(ConfigError) as info:
        load(None, {**PEERS_ENV, "LICENSE_PROXY_PEERS_KEY": "secret-ish"})
    assert str(info.value) == "environment variable LICENSE_PROXY_PEERS_KEY: expected PEM text"
    with pytest.raises(ConfigError) as info:
        load(None, {**PEERS_ENV, "LICENSE_PROXY_PEERS_NAME": "10.0.0.1"})
    assert str(info.value).startswith("environment variable LICENSE_PROXY_PEERS_NAME: expected a DNS")
    assert error(tmp_path, '[peers]\nname = "*.example"\n').startswith("[peers] name: expected a DNS")
    assert error(tmp_path, '[peers]\nurls = ["https://b/"]\n', PEERS_ENV) == (
        "[peers] name: not with urls: the peers are listed or named"
    )
    missing = {k: v for k, v in PEERS_ENV.items() if k != "LICENSE_PROXY_PEERS_CERT"}
    assert error(tmp_path, VENDOR_MINIMAL, missing) == (
        "[peers] cert_file: missing (or LICENSE_PROXY_PEERS_CERT), required when peers are set"
    )


def test_the_shared_salt_from_a_file_or_the_environment_bounded_never_shown(tmp_path):
    salt = "0123456789abcdef" * 2
    config = load_text(tmp_path, VENDOR_MINIMAL, {**PEERS_ENV, "LICENSE_PROXY_PEERS_SALT": salt})
    assert config.peer_salt == salt.encode() and salt not in repr(config)
    # The file's key wins (its last newline is no part of it).
    path = tmp_path / "salt"
    path.write_text("f" * 16 + "\n")
    text = f'[peers]\nsalt_file = "{path}"\n'
    config = load_text(tmp_path, text, {**PEERS_ENV, "LICENSE_PROXY_PEERS_SALT": salt})
    assert config.peer_salt == b"f" * 16
    # Too short (no salt) or too long (a mistake): one line naming it, never the value.
    with pytest.raises(ConfigError) as info:
        load(None, {**PEERS_ENV, "LICENSE_PROXY_PEERS_SALT": "short-secret"})
    assert str(info.value) == (
        "environment variable LICENSE_PROXY_PEERS_SALT: a salt of 16 to 1024 bytes expected, got 12"
    )
    path.write_text("x" * 1025)
    message = error(tmp_path, text)
    assert message.endswith("[peers] salt_file: a salt of 16 to 1024 bytes expected, got 1025")
    assert "xxxx" not in message
    assert error(tmp_path, '[peers]\nsalt_file = "/nonexistent"\n').startswith(
        "[peers] salt_file: cannot read '/nonexistent'"
    )


def test_unknown_names_are_quoted_when_not_bare(tmp_path):
    assert error(tmp_path, '["my section"]\n').startswith('unknown section ["my section"] ')
    assert error(tmp_path, '[server]\n"po\\nrt" = 1\n').startswith(
        'unknown key [server] "po\\nrt" '
    )
    assert error(tmp_path, '"a b" = 1\n').startswith('top-level key "a b": ')


def test_unknown_subtable_is_an_unknown_key(tmp_path):
    assert error(tmp_path, "[server.extra]\nx = 1\n").startswith("unknown key [server] extra ")


def test_key_outside_any_section(tmp_path):
    assert error(tmp_path, "port = 8443\n") == (
        "top-level key port: keys belong in a section such as [server]"
    )


def test_section_given_as_a_value(tmp_path):
    assert error(tmp_path, 'server = "x"\n') == (
        "top-level key server: keys belong in a section such as [server]"
    )


# The file itself


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert str(info.value) == f"{path}: cannot read the config file: No such file or directory"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path), {})
    assert str(info.value) == f"{tmp_path}: cannot read the config file: Is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, "")
    os.chmod(path, 0)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert str(info.value) == f"{path}: cannot read the config file: Permission denied"


def test_invalid_toml_gives_line_and_column(tmp_path):
    assert error(tmp_path, "[server]\nport = \n") == (
        "invalid TOML: Invalid value (at line 2, column 8)"
    )


def test_duplicate_key_is_invalid_toml(tmp_path):
    assert error(tmp_path, "[server]\nport = 1\nport = 2\n").startswith("invalid TOML: ")


def test_non_utf8_file(tmp_path):
    assert error(tmp_path, b'[server]\nhost = "caf\xe9"\n') == (
        "not UTF-8 text: byte 0xe9 on line 2"
    )


def test_error_names_the_file_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "[server]\nport = 0\n", name="lp.toml")
    with pytest.raises(ConfigError) as info:
        load("lp.toml", {})
    assert str(info.value) == "lp.toml: [server] port: expected an integer from 1 to 65535, got 0"


@pytest.mark.parametrize("given", ["text", "json"])
def test_log_format(tmp_path, given):
    assert load_text(tmp_path, f'[log]\nformat = "{given}"\n').log_format == given


def test_bad_log_format(tmp_path):
    with pytest.raises(ConfigError, match=r'\[log\] format: expected "text" or "json", got \'yaml\''):
        load_text(tmp_path, '[log]\nformat = "yaml"\n')


def test_status_port_must_differ_from_port(tmp_path):
    path = tmp_path / "lp.toml"
    path.write_text("[server]\nport = 9000\nstatus_port = 9000\n")
    with pytest.raises(ConfigError) as e:
        load(str(path), {})
    assert str(e.value) == f"{path}: [server] status_port: must differ from port (9000)"


@pytest.mark.parametrize("base_url", ["/lizenz-prüfung", "/a b", "/v1?x=1"])
def test_base_url_must_be_an_ascii_path(tmp_path, base_url):
    path = tmp_path / "lp.toml"
    path.write_text(f'[server]\nbase_url = "{base_url}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[server\] base_url: expected a URL path"):
        load(str(path), {})


def test_server_url_must_not_carry_a_query(tmp_path):
    path = tmp_path / "lp.toml"
    path.write_text('[license]\nserver_url = "https://h.example/api?token=s3cret"\n')
    with pytest.raises(ConfigError) as e:
        load(str(path), {})
    assert "without a ?query" in str(e.value) and "s3cret" not in str(e.value)


def test_the_reference_shows_each_key_with_its_true_default():
    """The configuration reference is built from ``_KEYS``: a default shown as a TOML value must
    be what Config has, and every group of keys has its words."""
    config = Config()
    first_keys = [spec for spec in _KEYS.values() if spec.doc is not None]
    assert list(_KEYS.values())[0].doc and all(spec.doc.strip() for spec in first_keys)
    shown = 0
    for (section, key), spec in _KEYS.items():
        if spec.default_is_value:
            value = tomllib.loads(f"v = {spec.default}")["v"]
            assert spec.parse(value) == getattr(config, spec.attribute), (section, key)
            shown += 1
    assert shown >= 20


@pytest.mark.parametrize("module", ["license_proxy.config", "license_proxy.statuscmd"])
def test_reading_a_config_imports_no_twisted_and_no_network_code(module):
    """``license-proxy check``, ``license-proxy-status`` and the config's tests load the config
    alone: no Twisted module (33 came with it once, for four constants), and the forward proxy's
    URL is parsed without the egress and tunnel code."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted' or m in"
        " ('license_proxy.egress', 'license_proxy.tunnel', 'license_proxy.connect')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

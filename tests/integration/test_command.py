"""
The ``license-proxy`` command (also ``hermes``), the vendor's command-line shape, and the rules
every way of starting the proxy shares: the key from the file or DEEPGRAM_API_KEY, refused
without one, and ``[fips] mode = "enabled"`` refused on an OpenSSL without FIPS mode.  Real
processes, a real TLS upstream, asserted on exit statuses, log lines and what the upstream saw.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from license_proxy import fips
from tests.support.configs import KEY, config
from tests.support.installed import REPO_ROOT
from tests.support.proxy import COMMAND, TEST_KEY, TWISTD, ProxyProcess

NO_KEY = {"DEEPGRAM_API_KEY": None}


def command(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """The installed ``license-proxy ARGS``; ``env`` as in ProxyProcess (no key by default)."""
    environ = {k: v for k, v in os.environ.items() if k != "DEEPGRAM_API_KEY"}
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, env=environ, cwd=cwd, timeout=60
    )


# -- serve: what twistd license-proxy runs ------------------------------------------------


def test_serve_runs_the_proxy_and_stops_on_sigterm_as_twistd_does(tmp_path, pki, upstream):
    with ProxyProcess(tmp_path, config(tmp_path, pki, upstream.url), cli=("serve",)) as proxy:
        proxy.wait_state("Connected")
        status, _, _ = proxy.request("GET", "/v1/x")
        assert status == 200
        # twistd re-raises the terminating signal after a clean stop.
        assert proxy.terminate() == -15
    log = proxy.log_text()
    assert "twistd" in log and "starting up" in log, log
    assert "state Ready -> Connected" in log and "Server Shut Down." in log, log
    assert "Traceback" not in log, log
    assert upstream.requests[0].header("Authorization") == f"Token {TEST_KEY}"


def test_serve_exits_1_when_the_key_is_rejected_and_2_on_a_bad_config(tmp_path, pki, upstream):
    upstream.respond(status=403)
    (tmp_path / "a").mkdir()
    with ProxyProcess(tmp_path / "a", config(tmp_path, pki, upstream.url), cli=("serve",)) as p:
        assert p.wait_exit() == 1
    assert "the license server rejected the key (HTTP 403)" in p.log_text()
    (tmp_path / "b").mkdir()
    with ProxyProcess(tmp_path / "b", "[server]\nport = 0\n", cli=("-v", "serve")) as p:
        assert p.wait_exit() == 2
    assert p.log_text().splitlines() == [
        f"license-proxy: {p.config_path}: [server] port: expected an integer from 1 to 65535, got 0"
    ]


def levels_logged(tmp_path, pki, upstream, *cli) -> str:
    """The log of a start, a check-in and a SIGTERM stop under ``license-proxy *cli serve``."""
    directory = tmp_path / "-".join(cli or ("default",))
    directory.mkdir()
    text = config(directory, pki, upstream.url)
    with ProxyProcess(directory, text, cli=(*cli, "serve")) as proxy:
        proxy.wait_state("Connected")
        upstream.mode = "reset"  # a relay fails: warnings
        assert proxy.request("GET", "/v1/x")[0] == 502
        proxy.wait_state("TrustBased")
        upstream.mode = "normal"
        assert proxy.terminate() == -15
    return proxy.log_text()


def test_v_raises_the_log_level_and_q_lowers_it(tmp_path, pki, upstream):
    default = levels_logged(tmp_path, pki, upstream)
    verbose = levels_logged(tmp_path, pki, upstream, "-v")
    very = levels_logged(tmp_path, pki, upstream, "-vv")
    quiet = levels_logged(tmp_path, pki, upstream, "-q")
    debug_line = "configuration from "
    assert debug_line not in default and "state Ready -> Connected" in default, default
    for text in (verbose, very):
        assert debug_line in text and "state Ready -> Connected" in text, text
        assert "key=" not in text.replace("_key=", "") and TEST_KEY not in text, text
    # -q: warnings and errors only (leaving Connected is a warning).
    assert "state Connected -> TrustBased" in quiet, quiet
    assert "starting up" not in quiet and "state Ready -> Connected" not in quiet, quiet
    assert debug_line not in quiet


def test_the_vendor_command_line_shape_and_usage_errors():
    usage = command("--help")
    assert usage.returncode == 0 and "serve" in usage.stdout and "check" in usage.stdout
    assert command("-v", "-q", "check").returncode == 2
    assert command("frobnicate").returncode == 2
    # twistd license-proxy stays the reference way, and knows the level the command passes.
    twistd = subprocess.run(
        [sys.executable, "-m", "twisted", "license-proxy", "--help"], capture_output=True,
        text=True, cwd=REPO_ROOT, timeout=60,
    )
    assert "--log-level" in twistd.stdout, twistd.stdout + twistd.stderr


# -- check: nginx -t ------------------------------------------------------------------------


def test_check_says_ok_in_one_line(tmp_path, pki, upstream):
    path = tmp_path / "license-proxy.toml"
    path.write_text(config(tmp_path, pki, upstream.url))
    ok = command("check", str(path), env={"DEEPGRAM_API_KEY": KEY})
    assert ok.returncode == 0, ok.stderr
    (line,) = ok.stdout.splitlines()
    assert line.startswith(f"license-proxy: {path}: OK: licensing on https://127.0.0.1:"), line
    assert ok.stderr == "" and KEY not in ok.stdout
    assert upstream.requests == []  # a check starts nothing and calls nobody
    defaults = command("check", env={"DEEPGRAM_API_KEY": KEY})
    assert defaults.stdout.startswith("license-proxy: the built-in defaults: OK"), defaults


@pytest.mark.parametrize(
    "section, value, expected",
    [
        ("server", 'tls_cert = "{garbage}"\ntls_key = "{pki.server_key}"',
         "[server] tls_cert: no PEM certificate in {garbage}"),
        ("server", 'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.client_key}"',
         "[server] tls_key: {pki.client_key} does not match the certificate {pki.server_cert}"),
        ("license", 'client_cert = "{pki.client_cert}"\nclient_key = "{pki.server_key}"',
         "[license] client_key: {pki.server_key} does not match the certificate {pki.client_cert}"),
        ("peers", 'ca_file = "{garbage}"\ncert_file = "{pki.peer_cert}"\nkey_file = "{pki.peer_key}"',
         "[peers] ca_file: no PEM certificate in {garbage}"),
        ("peers", 'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.peer_cert}"\nkey_file = "{pki.server_key}"',
         "[peers] key_file: {pki.server_key} does not match the certificate {pki.peer_cert}"),
        ("peers", 'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"',
         "[peers] cert_file: {pki.client_cert} is not issued by the peers' CA ([peers] ca_file)"),
        ("peers", 'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"',
         "[peers] cert_file: {pki.server_cert} lacks the extended key usage clientAuth (presented to peers)"),
        ("peers", 'name = "peers.example"\nca_file = "{pki.ca_cert}"\ncert_file = "{pki.peer_cert}"\nkey_file = "{pki.peer_key}"',
         "[peers] cert_file: {pki.peer_cert} does not name peers.example ([peers] name)"),
    ],
)
def test_check_refuses_bad_certificate_files(tmp_path, pki, section, value, expected):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    filled = value.format(pki=pki, garbage=garbage)
    path = tmp_path / "license-proxy.toml"
    text = config(tmp_path, pki, "https://localhost:1")
    if f"[{section}]\n" not in text:
        text += f"\n[{section}]\n"
    path.write_text(text.replace(f"[{section}]\n", f"[{section}]\n{filled}\n", 1))
    result = command("check", str(path), env={"DEEPGRAM_API_KEY": KEY})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"license-proxy: {expected.format(pki=pki, garbage=garbage)}"
    ]


def test_check_refuses_a_missing_file_and_no_key(tmp_path):
    missing = command("check", str(tmp_path / "nope.toml"), env={"DEEPGRAM_API_KEY": KEY})
    assert (missing.returncode, missing.stderr) == (
        2, f"license-proxy: {tmp_path}/nope.toml: cannot read the config file: No such file or"
        " directory\n",
    )
    no_key = command("check")
    assert (no_key.returncode, no_key.stderr) == (
        2, "license-proxy: the built-in defaults: no license key: set [license] key in the"
        " config file or the DEEPGRAM_API_KEY environment variable\n",
    )


# -- the key ------------------------------------------------------------------------------


def test_the_key_is_deepgram_api_key_when_the_file_has_none(tmp_path, pki, upstream):
    text = config(tmp_path, pki, upstream.url)
    assert "key =" not in text
    with ProxyProcess(tmp_path, text, env={"DEEPGRAM_API_KEY": KEY}) as proxy:
        proxy.wait_state("Connected")
        assert proxy.request("GET", "/v1/x")[0] == 200
    assert [r.header("Authorization") for r in upstream.requests[:1]] == [f"Token {KEY}"]
    assert KEY not in proxy.log_text()


@pytest.mark.parametrize("where", ["file", "environment"])
def test_a_rejected_key_from_either_place_stops_the_start(tmp_path, pki, upstream, where):
    upstream.respond(status=401, body=b'{"error":"bad key"}')
    in_file = f'key = "{KEY}"' if where == "file" else ""
    text = config(tmp_path, pki, upstream.url, license=in_file)
    env = {"DEEPGRAM_API_KEY": KEY if where == "environment" else "ignored"}
    with ProxyProcess(tmp_path, text, env=env) as proxy:
        assert proxy.wait_exit(timeout=20) == 1
    lines = [line for line in proxy.log_text().splitlines() if "cannot start" in line]
    assert len(lines) == 1, proxy.log_text()
    assert lines[0].endswith("the license server rejected the key (HTTP 401)")
    assert upstream.requests[0].header("Authorization") == f"Token {KEY}"
    assert KEY not in proxy.log_text()


def test_no_key_anywhere_refuses_to_start(tmp_path, pki, upstream):
    with ProxyProcess(tmp_path, config(tmp_path, pki, upstream.url), env=NO_KEY) as proxy:
        assert proxy.wait_exit() == 2
    assert proxy.log_text().splitlines() == [
        f"license-proxy: {proxy.config_path}: no license key: set [license] key in the config"
        " file or the DEEPGRAM_API_KEY environment variable"
    ]
    assert upstream.requests == []


# -- FIPS -----------------------------------------------------------------------------------


def test_fips_enabled_is_refused_on_an_openssl_without_fips_mode(tmp_path, pki, upstream):
    if fips.in_fips_mode():
        pytest.fail("this OpenSSL is in FIPS mode: this test is for the bundled, non-FIPS one")
    text = config(tmp_path, pki, upstream.url) + '\n[fips]\nmode = "enabled"\n'
    expected = (
        f'license-proxy: {tmp_path / "license-proxy.toml"}: [fips] mode: "enabled" needs a'
        f" FIPS-validated OpenSSL in FIPS mode, and this process's {fips.openssl_version()} is"
        " not (the cryptography wheel bundles it without a FIPS provider); install cryptography"
        " built against a system OpenSSL 3 whose FIPS provider is installed and enabled"
        ' (fips=yes in openssl.cnf), or set mode = "disabled"'
    )
    with ProxyProcess(tmp_path, text) as proxy:
        assert proxy.wait_exit() == 2
    assert proxy.log_text().splitlines() == [expected]
    assert upstream.requests == []
    checked = command("check", str(proxy.config_path), env={"DEEPGRAM_API_KEY": KEY})
    assert (checked.returncode, checked.stderr.splitlines()) == (2, [expected])


def test_fips_disabled_runs(tmp_path, pki, upstream):
    text = config(tmp_path, pki, upstream.url) + '\n[fips]\nmode = "disabled"\n'
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
    assert "FIPS" not in proxy.log_text()


def test_fips_mode_is_required_only_when_enabled():
    from license_proxy.config import Config, ConfigError

    fips.require("f.toml", Config(fips=True), True, "OpenSSL 3.0.9 FIPS")
    fips.require("f.toml", Config(fips=False), False, "OpenSSL 4")
    with pytest.raises(ConfigError, match=r'^f\.toml: \[fips\] mode: "enabled" needs'):
        fips.require("f.toml", Config(fips=True), False, "OpenSSL 4")


# -- check and serve agree (one preflight) -------------------------------------------------


def _not_own_private(tmp_path):
    state = tmp_path / "state"
    (state / "private").mkdir(parents=True)
    os.chmod(state, 0o777)
    os.chown(state / "private", 65534, 65534)
    return ""


#: name -> (what to add to a good config, environment, a setup step); every one is refused.
BAD = {
    "cache path under a file": ('[cache]\npath = "/etc/hostname/trust-cache.json"', {}, None),
    "cache path two below a file": ('[cache]\npath = "/etc/hostname/a/trust-cache.json"', {}, None),
    "another user's private/": ("", {}, _not_own_private),
    "trust duration past year 9999": ('[trust]\nduration = "3000000d"', {}, None),
    "check-ins a billion a second": ("[trust]\ncheckin_interval = 1e-9", {}, None),
    "header timeout 1e-300": ("[server]\nheader_timeout = 1e-300", {}, None),
    "key header with _": ('[cache]\nkey_headers = ["X_Api_Key"]', {}, None),
    "malformed HTTPS_PROXY": ("", {"HTTPS_PROXY": "http://"}, None),
    "no key": ("", {"DEEPGRAM_API_KEY": None}, None),
    "peers' salt too short": ("", {"LICENSE_PROXY_PEERS_SALT": "tooshort"}, None),
    "peers' salt_file unreadable": ('[peers]\nsalt_file = "/nonexistent/salt"', {}, None),
    "unknown key": ("[server]\nprot = 1", {}, None),
    "tls_cert not a certificate": ('[server]\ntls_cert = "/etc/hostname"\ntls_key = "/etc/hostname"',
                                   {}, None),
}


def _with(text: str, added: str) -> str:
    """``text`` with ``added``'s keys set in their section (the same keys' lines dropped)."""
    if not added:
        return text
    section, *lines = added.split("\n")
    for line in lines:
        text = re.sub(rf"^{re.escape(line.split(' = ')[0])} = .*\n", "", text, flags=re.M)
    if f"\n{section}\n" not in text:
        text += f"\n{section}\n"
    return text.replace(f"\n{section}\n", f"\n{added}\n", 1)


@pytest.mark.parametrize("name", list(BAD))
def test_check_and_serve_refuse_each_bad_config_with_the_same_line(tmp_path, pki, name):
    """Issue 20 item 13: ``check`` said OK where ``serve`` exited 2 (a state directory under
    a file), and serve ran what check passed (durations past the year 9999)."""
    added, env, setup = BAD[name]
    if setup is not None:
        setup(tmp_path)
    path = tmp_path / "license-proxy.toml"
    path.write_text(_with(config(tmp_path, pki, "https://localhost:1"), added))
    environ = {"DEEPGRAM_API_KEY": KEY, **env}
    checked = command("check", str(path), env=environ)
    served = command_line(
        [TWISTD, "--nodaemon", "--pidfile=", "license-proxy", "--config", str(path)], environ,
        tmp_path,
    )
    assert checked.stdout == ""
    assert len(checked.stderr.splitlines()) == 1, checked.stderr
    assert (served.returncode, served.stdout + served.stderr) == (2, checked.stderr)
    assert checked.returncode == 2
    assert "Traceback" not in served.stdout + served.stderr


def command_line(argv, env, cwd) -> subprocess.CompletedProcess:
    """``argv`` as ``command`` runs the license-proxy command: no key unless ``env`` has one."""
    environ = {k: v for k, v in os.environ.items()
               if k != "DEEPGRAM_API_KEY" and k.upper() not in ("HTTPS_PROXY", "ALL_PROXY")}
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return subprocess.run(argv, capture_output=True, text=True, env=environ, cwd=cwd, timeout=60)

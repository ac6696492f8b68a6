"""Reloading certificates in place: good files are taken, bad ones leave the old in service."""

from __future__ import annotations

import pytest

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from license_proxy.config import Config, ConfigError
from license_proxy.tls import listener_options, upstream_tls
from license_proxy.tlsreload import CertificateReload, ListenerTLS


def test_bad_new_files_keep_the_old_ones_and_good_ones_replace_them(tmp_path, pki):
    ca = tmp_path / "roots.pem"
    ca.write_bytes(pki.pairs["ca"].cert_pem)
    cert = tmp_path / "listener.crt"
    cert.write_bytes(pki.pairs["server"].cert_pem)
    config = Config(ca_file=str(ca), tls_cert=str(cert), tls_key=pki.server_key)
    listener = ListenerTLS(listener_options(config, 0))
    upstream = upstream_tls(config)
    reload = CertificateReload(Clock(), config, listener, upstream)
    old_options, old_creator = listener.options, upstream.creatorForNetloc(b"localhost", 443)

    ca.write_text("garbage")
    cert.write_bytes(pki.pairs["wrong_host"].cert_pem)  # does not match the key
    with capturedLogs() as events:
        reload()
    lines = [formatEvent(e) for e in events]
    assert listener.options is old_options
    assert upstream.creatorForNetloc(b"localhost", 443) is old_creator
    assert any("keeping the licensing listener's certificate: [server] tls_key:" in l for l in lines), lines
    assert any("keeping the license server's trust roots" in l and "[license] ca_file" in l for l in lines)

    ca.write_bytes(pki.pairs["ca"].cert_pem)
    cert.write_bytes(pki.pairs["server"].cert_pem)
    with capturedLogs() as events:
        reload()
    assert listener.options is not old_options
    assert upstream.creatorForNetloc(b"localhost", 443) is not old_creator
    assert len([e for e in events if "are reloaded" in formatEvent(e)]) == 2


def test_a_key_that_does_not_match_its_certificate_is_a_config_error(pki, tmp_path):
    mismatched = Config(tls_cert=pki.server_cert, tls_key=pki.wrong_host_key, cache_path=str(tmp_path / "c.json"))
    with pytest.raises(ConfigError, match=r"\[server\] tls_key: .* does not match the certificate"):
        listener_options(mismatched, 0.0)
    client = Config(client_cert=pki.client_cert, client_key=pki.server_key)
    with pytest.raises(ConfigError, match=r"\[license\] client_key: .* does not match the certificate"):
        upstream_tls(client)
    assert listener_options(Config(tls_cert=pki.server_cert, tls_key=pki.server_key), 0.0)

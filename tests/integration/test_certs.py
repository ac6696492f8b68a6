"""license_proxy.certs' certificates verified by a real TLS client against a real TLS server on loopback."""

from __future__ import annotations

import ssl
from datetime import datetime, timezone

import pytest

from license_proxy.tls import certs
from tests.support.tlsclient import client_context, get
from tests.support.upstream import Upstream


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_good_certificate_verifies(pki, upstream, host):
    response, body = get(upstream, context=client_context(pki.ca_cert), host=host)
    assert response.status == 200
    assert upstream.handshakes == 1


@pytest.mark.parametrize(
    "name, reason",
    [
        ("wrong_host", "Hostname mismatch"),
        ("unknown_ca_server", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
    ],
)
def test_bad_certificates_fail_verification(pki, name, reason):
    with Upstream(getattr(pki, f"{name}_cert"), getattr(pki, f"{name}_key")) as up:
        with pytest.raises(ssl.SSLCertVerificationError, match=reason):
            get(up, context=client_context(pki.ca_cert))
        assert up.requests == []


def test_self_signed_can_be_pinned(tmp_path):
    pair = certs.self_signed(["localhost", "127.0.0.1"], now=datetime.now(timezone.utc))
    pair.write(tmp_path / "c.pem", tmp_path / "k.pem")
    cert = pair.certificate
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650
    with Upstream(tmp_path / "c.pem", tmp_path / "k.pem") as up:
        response, _ = get(up, context=client_context(tmp_path / "c.pem"), host="127.0.0.1")
        assert response.status == 200



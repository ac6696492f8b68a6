"""license_proxy.tls.certs: the keys and certificates it makes (that TLS clients verify them: tests/integration/test_certs.py)."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timezone

from license_proxy.tls import certs


def test_key_file_is_private(tmp_path):
    pair = certs.make_ca("x", now=datetime.now(timezone.utc))
    pair.write(tmp_path / "c.pem", tmp_path / "k.pem")
    assert stat.S_IMODE(os.stat(tmp_path / "k.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "c.pem").st_mode) == 0o644
    assert (tmp_path / "k.pem").read_bytes() == pair.key_pem


def test_leaf_fields(pki):
    cert = pki.pairs["server"].certificate
    san = cert.extensions.get_extension_for_class(certs.x509.SubjectAlternativeName).value
    assert san.get_values_for_type(certs.x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(certs.x509.IPAddress)] == ["127.0.0.1"]
    assert cert.subject.rfc4514_string() == "CN=localhost"

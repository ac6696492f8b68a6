"""
The TLS policy, tried from outside against a real ``twistd license-proxy``: every TLS 1.2
cipher suite the local OpenSSL knows is offered alone, and only forward-secret AEAD suites
get a session; TLS 1.0 and 1.1 are refused by the proxy (the client's own floor is lowered,
so a proxy that accepted them would fail the test); TLS 1.3 works; a client may not
renegotiate.  The same holds after a certificate reload, and for what the proxy offers the
license server.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.support.configs import config
from tests.support.proxy import ProxyProcess

# Lowering the client's floor to TLS 1.0 is the point of these tests.
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")

#: Mozilla's "intermediate" TLS 1.2 suites (AES-CCM, also AEAD, is not among them).
FORWARD_SECRET_AEAD = re.compile(r"^ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$")
ECDSA_SUITES = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
}
RSA_SUITES = {s.replace("-ECDSA-", "-RSA-") for s in ECDSA_SUITES}
LOWEST = "ALL:COMPLEMENTOFALL:@SECLEVEL=0"


def tls12_suites() -> list[str]:
    """Every cipher suite the local OpenSSL can negotiate in TLS 1.2 or below."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers(LOWEST)
    return [c["name"] for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"]


def handshake(host: str, port: int, version: ssl.TLSVersion, ciphers: str = LOWEST):
    """A TLS handshake pinned to ``version``: (version, cipher) on success, else the SSLError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    context.set_ciphers(ciphers)
    try:
        with socket.create_connection((host, port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.version(), tls.cipher()[0]
    except ssl.SSLError as e:
        return e


def refused_by_server(outcome) -> bool:
    """The proxy answered the handshake with an alert (not the client giving up by itself)."""
    return isinstance(outcome, ssl.SSLError) and "ALERT" in (outcome.reason or "")


def accepted_tls12_suites(host: str, port: int) -> set[str]:
    """Each TLS 1.2 suite offered alone: those that got a session; fails on any outcome
    other than a session or the proxy's refusal (a suite the client can't offer aside)."""
    accepted, refused = set(), 0
    for suite in tls12_suites():
        outcome = handshake(host, port, ssl.TLSVersion.TLSv1_2, f"{suite}:@SECLEVEL=0")
        if isinstance(outcome, tuple):
            assert outcome == ("TLSv1.2", suite)
            assert FORWARD_SECRET_AEAD.match(suite), suite
            accepted.add(suite)
        elif refused_by_server(outcome):
            refused += 1
        else:  # PSK and SRP suites: the client won't send them without credentials
            assert outcome.reason == "NO_CIPHERS_AVAILABLE", (suite, outcome)
    assert refused > 50, refused  # the proxy really was asked about the weak ones
    return accepted


def write_rsa_pair(cert_path, key_path) -> bytes:
    """A self-signed RSA certificate for localhost (the test PKI makes EC keys only)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem


def served_pem(proxy) -> str:
    return ssl.get_server_certificate((proxy.host, proxy.port)).strip()


def test_listener_takes_tls12_and_13_with_forward_secret_aead_suites_only(tmp_path, pki, upstream):
    cert, key = tmp_path / "listener.crt", tmp_path / "listener.key"
    pki.pairs["server"].write(cert, key)  # EC: the ECDHE-ECDSA suites
    text = config(tmp_path, pki, upstream.url, server=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
        host, port = proxy.host, proxy.port

        assert accepted_tls12_suites(host, port) == ECDSA_SUITES
        for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            outcome = handshake(host, port, old)
            assert refused_by_server(outcome), (old, outcome)
            assert outcome.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
        version, suite = handshake(host, port, ssl.TLSVersion.TLSv1_3)
        assert version == "TLSv1.3" and suite.startswith("TLS_") and ("GCM" in suite or "CHACHA20" in suite)

        # A client asking to renegotiate (s_client's "R" command) gets an alert.
        renegotiation = subprocess.run(
            ["openssl", "s_client", "-connect", f"{host}:{port}", "-tls1_2"],
            input=b"R\n", capture_output=True, timeout=30,
        )
        out = renegotiation.stdout.decode() + renegotiation.stderr.decode()
        assert "RENEGOTIATING" in out and "no renegotiation" in out, out

        # The reload path builds its options again: an RSA certificate gets the ECDHE-RSA ones.
        rsa_pem = write_rsa_pair(cert, key)
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served_pem(proxy) != rsa_pem.decode().strip():
            assert time.monotonic() < deadline, proxy.log_text()
            time.sleep(0.05)
        assert accepted_tls12_suites(host, port) == RSA_SUITES
        assert refused_by_server(handshake(host, port, ssl.TLSVersion.TLSv1_1))


def _hello_from_proxy(listener: socket.socket, context: ssl.SSLContext):
    """Accept one connection and handshake: the suites the client offered, or the SSLError."""
    raw, _ = listener.accept()
    with raw:
        raw.settimeout(10)
        try:
            with context.wrap_socket(raw, server_side=True) as tls:
                return {name for name, _, _ in tls.shared_ciphers()}
        except ssl.SSLError as e:
            return e


def test_proxy_offers_the_license_server_the_same_policy(tmp_path, pki):
    """A license server that would take anything sees only TLS 1.2+ and forward-secret AEAD
    suites in the proxy's ClientHello."""
    anything = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    anything.load_cert_chain(pki.server_cert, pki.server_key)
    anything.set_ciphers(LOWEST)
    anything.minimum_version = ssl.TLSVersion.TLSv1
    old_only = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old_only.load_cert_chain(pki.server_cert, pki.server_key)
    old_only.set_ciphers(LOWEST)
    old_only.minimum_version = ssl.TLSVersion.TLSv1
    old_only.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(20)
        url = f"https://localhost:{listener.getsockname()[1]}"
        with ProxyProcess(tmp_path, config(tmp_path, pki, url)):
            offered = _hello_from_proxy(listener, anything)
            refused = _hello_from_proxy(listener, old_only)  # the check-in's retry
    tls12 = {s for s in offered if not s.startswith("TLS_")}
    assert tls12 == ECDSA_SUITES | RSA_SUITES, sorted(tls12)
    assert isinstance(refused, ssl.SSLError) and refused.reason == "UNSUPPORTED_PROTOCOL", refused

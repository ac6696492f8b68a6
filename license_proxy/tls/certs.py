"""
Small X.509 toolkit: certificate authorities, leaf certificates, self-signed certificates.

The proxy needs a certificate for its licensing listener even when the operator gives none
(containers talk HTTPS to it), and the tests need whole PKIs (a CA, good, wrong-host, expired and
unknown-CA certificates, client certificates for mutual TLS) generated on the fly.  Both use this
module.  The current time is always passed in as ``now`` so results are reproducible and nothing
here reads a clock.

Keys are EC P-256: fast to generate and understood by every TLS stack we talk to.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import datetime, timedelta
from typing import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["KeyPair", "make_ca", "issue", "self_signed"]

#: Leaf certificates issued without an explicit window are valid from an hour ago (clock skew
#: between the machines) for a year.
_SKEW = timedelta(hours=1)
_LEAF_LIFETIME = timedelta(days=365)
#: CAs and the proxy's own self-signed certificate: long-lived, nobody is there to renew them.
_LONG_LIFETIME = timedelta(days=3650)


@attrs.frozen
class KeyPair:
    """A PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def write(
        self,
        cert_path: str | os.PathLike[str],
        key_path: str | os.PathLike[str],
        cert_mode: int = 0o644,
    ) -> None:
        """
        Write both files.  The key is created with mode 0600 from the start (never readable by
        others, not even for an instant); the certificate is public, ``cert_mode``.
        """
        _write_file(key_path, self.key_pem, 0o600)
        _write_file(cert_path, self.cert_pem, cert_mode)


def _write_file(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        # O_CREAT's mode is filtered by the umask and ignored for an existing file: set it.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """IP literals become iPAddress entries (hostname checks of IPs only look there)."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures always (ECDSA); certificate and CRL signing for a CA only."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> KeyPair:
    return KeyPair(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def make_ca(common_name: str, *, now: datetime) -> KeyPair:
    """
    A self-signed certificate authority (CA:TRUE, may sign certificates, not other CAs), valid
    from an hour before ``now`` for ten years.
    """
    key = _new_key()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + _LONG_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pair(cert, key)


def issue(
    ca: KeyPair,
    hosts: Sequence[str],
    *,
    now: datetime,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    client: bool = False,
    peer: bool = False,
) -> KeyPair:
    """
    A leaf certificate for ``hosts`` signed by ``ca``: a server certificate, or a client one
    (for mutual TLS) when ``client`` is true, or both when ``peer`` is (an instance's peer
    certificate, served to its peers and presented to them). The common name is the first host;
    every host is in subjectAltName, which is what verifiers check. ``not_before``/``not_after``
    override the default window (an hour before ``now`` to a year after), e.g. to make an
    expired certificate.
    """
    if not hosts:
        raise ValueError("a certificate needs at least one host")
    ca_cert = ca.certificate
    ca_key = ca.private_key
    key = _new_key()
    public = key.public_key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
    if peer:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW if not_before is None else not_before)
        .not_valid_after(now + _LEAF_LIFETIME if not_after is None else not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _pair(cert, key)


def self_signed(hosts: Sequence[str], *, now: datetime) -> KeyPair:
    """
    The certificate the proxy makes for its licensing listener when the operator configured
    none: containers must still get HTTPS.  Valid for ten years (nobody renews it), from an hour
    before ``now``.  It is its own issuer and carries no keyUsage, so a client may pin it as a
    trust anchor directly.
    """
    if not hosts:
        raise ValueError("a certificate needs at least one host")
    key = _new_key()
    public = key.public_key()
    name = _name(hosts[0])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + _LONG_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pair(cert, key)

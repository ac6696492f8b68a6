"""
TLS material for both sides of the proxy, read from the files the config
names: the licensing listener's certificate (or one generated on first start
and kept in the state directory, so it stays the same across restarts), and
what the upstream client trusts and presents (``UpstreamTLS``), and what the peers' client
trusts and presents, and the listener asks of peers.

Every problem with a file is a ``ConfigError`` naming the key, so a bad
certificate stops the proxy with one line instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import datetime, timezone
from typing import Optional

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from attrs import define, field
from OpenSSL import crypto
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from ..config import Config, ConfigError
from . import certs, policy

GENERATED_CERT = "tls.crt"
GENERATED_KEY = "tls.key"


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def _certificates(path: str, key: str) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(_read(path, key))
    except ValueError:
        found = []
    if not found:
        raise ConfigError(f"{key}: no PEM certificate in {path}")
    return found


def _matching_key(cert: x509.Certificate, path: str, key: str, cert_path: str):
    """The private key at ``path``, which must belong to ``cert``."""
    try:
        loaded = serialization.load_pem_private_key(_read(path, key), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{key}: no usable unencrypted PEM private key in {path} ({e})") from None
    try:
        public = _public(cert.public_key())
    except UnsupportedAlgorithm as e:
        raise ConfigError(
            f"{key}: the certificate {cert_path} has an unsupported key ({e})"
        ) from None
    if _public(loaded.public_key()) != public:
        raise ConfigError(f"{key}: {path} does not match the certificate {cert_path}")
    return loaded


def _public(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


VENDOR_NAMES = ("license-proxy", "deepgram-license-proxy-internal")
"""What the vendor's files call the proxy: its compose service, its Helm chart's Service."""

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def generated_names(
    config: Config, namespace: str | None, hostname: str | None = None
) -> list[str]:
    """
    The names of the generated certificate: the host name, loopback, the vendor's names, in a
    Kubernetes ``namespace`` the Service's ``.svc`` and ``.svc.cluster.local`` forms, and
    ``[server] tls_names``.
    """
    names = [*([hostname] if hostname else []), "localhost", "127.0.0.1", "::1", *VENDOR_NAMES]
    if namespace:
        service = VENDOR_NAMES[1]
        names += [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]
    return list(dict.fromkeys([*names, *config.tls_names]))


def pod_namespace() -> str | None:
    """The pod's namespace: POD_NAMESPACE (the downward API), else the service account's."""
    namespace = os.environ.get("POD_NAMESPACE")
    if namespace:
        return namespace
    try:
        with open(NAMESPACE_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _normal(name: str) -> str:
    """An IP address as a certificate gives it back (``::1``, not ``0::1``)."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _names_in(cert_path: str) -> set[str]:
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    return {*san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


def _generated_pair(config: Config, now: float) -> tuple[str, str]:
    """The self-signed pair in the state directory (which ``make_service``
    creates), made on first start, and again when it lacks a name it must have
    (the host name aside: a container's changes with every new container)."""
    cert_path = os.path.join(config.state_dir, GENERATED_CERT)
    key_path = os.path.join(config.state_dir, GENERATED_KEY)
    required = generated_names(config, pod_namespace())
    if not (
        os.path.exists(cert_path)
        and os.path.exists(key_path)
        and _names_in(cert_path).issuperset(map(_normal, required))
    ):
        hosts = generated_names(config, pod_namespace(), socket.gethostname())
        pair = certs.self_signed(hosts, now=datetime.fromtimestamp(now, timezone.utc))
        try:
            pair.write(cert_path, key_path, cert_mode=0o600)  # the state directory's rule
        except OSError as e:
            raise ConfigError(
                f"[cache] path: cannot write a certificate to the state directory "
                f"{config.state_dir}: {e.strerror}"
            ) from None
    return cert_path, key_path


def listener_options(config: Config, now: float) -> CertificateOptions:
    """The licensing listener's certificate, under the TLS policy (``policy``)."""
    if config.tls_cert:
        cert_path, cert_key = config.tls_cert, "[server] tls_cert"
        key_path, key_key = config.tls_key, "[server] tls_key"
    else:
        cert_path, key_path = _generated_pair(config, now)
        cert_key = key_key = "[cache] path (generated certificate)"
    chain = _certificates(cert_path, cert_key)
    key = _matching_key(chain[0], key_path, key_key, cert_path)
    return CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=policy.MINIMUM_VERSION,
        acceptableCiphers=policy.ACCEPTABLE,
        # Twisted always installs an ALPN callback; with no protocol to offer it answers
        # b"", which OpenSSL turns into an "internal error" alert for every client that
        # sends ALPN (curl, Go, Rust clients).  We speak HTTP/1.1 only.
        acceptableProtocols=[b"http/1.1"],
        **_peer_authentication(config),
    )


def _peer_authentication(config: Config) -> dict:
    """
    With peers, a client certificate is asked for but not required (containers have none),
    and one that is sent must chain to ``[peers] ca_file`` and nothing else (the handshake
    fails otherwise): a connection with a client certificate is a peer's (``relay``).
    Without peers, none is asked for, so none is ever presented.
    """
    if not config.peer_ca_file:
        return {}
    authorities = _certificates(config.peer_ca_file, "[peers] ca_file")
    return {
        "verify": True,
        "requireCertificate": False,
        "caCerts": [crypto.X509.from_cryptography(c) for c in authorities],
    }


def _trust_root(path: str | None, key: str):
    """The CA certificates in ``path``, or None: the system's."""
    if not path:
        return None
    return trustRootFromCertificates(
        [Certificate(crypto.X509.from_cryptography(c)) for c in _certificates(path, key)]
    )


def peer_tls(config: Config) -> UpstreamTLS:
    """The peers are verified by ``[peers] ca_file``, and shown this instance's peer
    certificate (``[peers] cert_file``): what makes its requests a peer's."""
    trust_root = _trust_root(config.peer_ca_file, "[peers] ca_file")
    client = None
    if config.peer_cert_file:
        client = _private_certificate(
            config.peer_cert_file, "[peers] cert_file", config.peer_key_file, "[peers] key_file"
        )
    return UpstreamTLS(trust_root, client)


def upstream_tls(config: Config) -> UpstreamTLS:
    """Trust roots (``ca_file`` or the system's) and the optional client certificate."""
    trust_root = _trust_root(config.ca_file, "[license] ca_file")
    client = None
    if config.client_cert:
        client = _private_certificate(
            config.client_cert, "[license] client_cert", config.client_key, "[license] client_key"
        )
    return UpstreamTLS(trust_root, client)


def _private_certificate(
    cert_path: str, cert_key: str, key_path: str, key_key: str
) -> PrivateCertificate:
    cert = _certificates(cert_path, cert_key)[0]
    key = _matching_key(cert, key_path, key_key, cert_path)
    return PrivateCertificate.fromCertificateAndKeyPair(
        Certificate(crypto.X509.from_cryptography(cert)),
        KeyPair(crypto.PKey.from_cryptography_key(key)),
    )


@implementer(IPolicyForHTTPS)
@define
class UpstreamTLS:
    """Verify the upstream by chain and hostname, optionally presenting a
    client certificate, offering only what ``policy`` allows.  The TLS
    options are built once per host, not per request."""

    _trust_root: object = None  # from trustRootFromCertificates; None: the system's
    _client_certificate: Optional[PrivateCertificate] = None
    _creators: dict = field(factory=dict, init=False)

    def creatorForNetloc(self, hostname: bytes, port: int):
        try:
            return self._creators[hostname, port]
        except KeyError:
            creator = optionsForClientTLS(
                hostname.decode("ascii"),
                trustRoot=self._trust_root,
                clientCertificate=self._client_certificate,
                extraCertificateOptions={
                    "acceptableCiphers": policy.ACCEPTABLE,
                    "raiseMinimumTo": policy.MINIMUM_VERSION,
                },
            )
            self._creators[hostname, port] = creator
            return creator

    def replace_with(self, fresh: UpstreamTLS) -> None:
        """Use ``fresh``'s roots and certificate for new connections from now on."""
        self._trust_root = fresh._trust_root
        self._client_certificate = fresh._client_certificate
        self._creators.clear()

    def creatorForProxy(self, hostname: str):
        """TLS to an https:// forward proxy: verified with the same roots, no
        client certificate (that is for the license server only)."""
        try:
            return self._creators[hostname]  # a str: upstream entries are (bytes, port)
        except KeyError:
            creator = self._creators[hostname] = optionsForClientTLS(
                hostname, trustRoot=self._trust_root
            )
            return creator

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
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from attrs import define, field, frozen
from OpenSSL import SSL, crypto
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

from ..config import VARIABLES, Config, ConfigError
from . import certs, files, policy

GENERATED_CERT = "tls.crt"
GENERATED_KEY = "tls.key"


@frozen
class Pem:
    """PEM text from a file the config names (``key``: the key), or held in an environment
    variable (``key``: the variable's name, ``text`` its value)."""

    key: str
    path: Optional[str] = None
    text: Optional[str] = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return self.path if self.path is not None else "its value"

    def read(self) -> bytes:
        if self.path is None:
            return (self.text or "").encode("utf-8")
        try:
            return files.read(self.path)
        except OSError as e:
            raise ConfigError(f"{self.key}: cannot read {self.path}: {e.strerror}") from None


def _certificates(pem: Pem) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(pem.read())
    except ValueError:
        found = []
    if not found:
        raise ConfigError(f"{pem.key}: no PEM certificate in {pem.where}")
    return found


def _matching_key(cert: x509.Certificate, pem: Pem, cert_pem: Pem):
    """The private key in ``pem``, which must belong to ``cert`` (from ``cert_pem``)."""
    try:
        loaded = serialization.load_pem_private_key(pem.read(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError(
            f"{pem.key}: no usable unencrypted PEM private key in {pem.where} ({e})"
        ) from None
    try:
        public = _public(cert.public_key())
    except UnsupportedAlgorithm as e:
        raise ConfigError(
            f"{pem.key}: the certificate {cert_pem.where} has an unsupported key ({e})"
        ) from None
    if _public(loaded.public_key()) != public:
        raise ConfigError(
            f"{pem.key}: {pem.where} does not match the certificate {cert_pem.where}"
        )
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
    except (OSError, ValueError):
        return set()
    return _names_of(cert)


def _names_of(cert: x509.Certificate) -> set[str]:
    """The names in its subjectAltName: DNS names and IP addresses."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
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


def listener_options(config: Config, now: float):
    """The licensing listener's certificate, under the TLS policy (``policy``); with ``[peers]
    name``, the peer certificate for a client naming it (SNI), see ``_ServingPeers``."""
    if config.tls_cert:
        cert = Pem("[server] tls_cert", config.tls_cert)
        key = Pem("[server] tls_key", config.tls_key)
    else:
        cert_path, key_path = _generated_pair(config, now)
        cert = Pem("[cache] path (generated certificate)", cert_path)
        key = Pem("[cache] path (generated certificate)", key_path)
    options = _serving(cert, key, config)
    if not config.peer_name:
        return options
    peer = _serving(peer_pem(config, "cert_file"), peer_pem(config, "key_file"), config)
    return _ServingPeers(options, peer, config.peer_name.encode("ascii"))


def _serving(cert: Pem, key: Pem, config: Config) -> CertificateOptions:
    chain = _certificates(cert)
    return CertificateOptions(
        privateKey=_matching_key(chain[0], key, cert),
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


@define
class _ServingPeers:
    """
    The listener's options, serving the peer certificate to a client that names ``[peers]
    name`` (SNI): an instance found by DNS is verified against that name, whatever certificate
    the listener shows containers (the vendor's chart: a generated one). Both contexts ask for
    and check client certificates alike (``_peer_authentication``).
    """

    _options: CertificateOptions
    _peer: CertificateOptions
    _name: bytes
    _context: Optional[SSL.Context] = field(default=None, init=False)

    def getContext(self) -> SSL.Context:
        if self._context is None:
            context = self._options.getContext()
            peer = self._peer.getContext()

            def chosen(connection: SSL.Connection) -> None:
                if connection.get_servername() == self._name:
                    connection.set_context(peer)

            context.set_tlsext_servername_callback(chosen)
            self._context = context
        return self._context


def peer_pem(config: Config, key: str) -> Pem:
    """``[peers] key``'s file, else the PEM its environment variable gave (``config``)."""
    attribute = f"peer_{key}"
    if getattr(config, attribute):
        return Pem(f"[peers] {key}", getattr(config, attribute))
    held = attribute.removesuffix("_file") + "_pem"
    variable = next(name for name, a in VARIABLES.items() if a == held)
    return Pem(f"environment variable {variable}", None, getattr(config, held))


def _peers_set(config: Config) -> bool:
    """Any peer setting (``config`` then has them all: the CA, the certificate, the key)."""
    return bool(config.peer_urls or config.peer_name or config.peer_ca_file or config.peer_ca_pem)


def _peer_authentication(config: Config) -> dict:
    """
    With peers, a client certificate is asked for but not required (containers have none),
    and one that is sent must chain to ``[peers] ca_file`` and nothing else (the handshake
    fails otherwise): a connection with a client certificate is a peer's (``relay``).
    Without peers, none is asked for, so none is ever presented.
    """
    if not _peers_set(config):
        return {}
    authorities = _certificates(peer_pem(config, "ca_file"))
    return {
        "verify": True,
        "requireCertificate": False,
        "caCerts": [crypto.X509.from_cryptography(c) for c in authorities],
    }


def _trust_root(pem: Optional[Pem]):
    """The CA certificates in ``pem``, or None: the system's."""
    if pem is None:
        return None
    return trustRootFromCertificates(
        [Certificate(crypto.X509.from_cryptography(c)) for c in _certificates(pem)]
    )


def peer_tls(config: Config) -> UpstreamTLS:
    """The peers are verified by ``[peers] ca_file`` (against ``[peers] name`` when they are
    found by it), and shown this instance's peer certificate: what makes its requests a peer's."""
    if not _peers_set(config):
        return UpstreamTLS()
    _fits_peers(config)
    client = _private_certificate(peer_pem(config, "cert_file"), peer_pem(config, "key_file"))
    return UpstreamTLS(_trust_root(peer_pem(config, "ca_file")), client, config.peer_name)


def _fits_peers(config: Config) -> None:
    """The peer certificate is one the peers take: issued by their CA, for a client (and with
    ``[peers] name``, a server of that name). Said at start and by ``check``, not by a peer's
    failed handshake."""
    pem = peer_pem(config, "cert_file")
    chain = _certificates(pem)
    authorities = _certificates(peer_pem(config, "ca_file"))
    if not any(_issued(c, ca) for c in chain for ca in authorities):
        raise ConfigError(
            f"{pem.key}: {pem.where} is not issued by the peers' CA ([peers] ca_file)"
        )
    try:
        usages = chain[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None  # any use
    needed = {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth (presented to peers)"}
    if config.peer_name:
        needed[ExtendedKeyUsageOID.SERVER_AUTH] = "serverAuth (served to peers)"
        if config.peer_name not in _names_of(chain[0]):
            raise ConfigError(
                f"{pem.key}: {pem.where} does not name {config.peer_name} ([peers] name)"
            )
    for usage, why in needed.items():
        if usages is not None and usage not in usages:
            raise ConfigError(f"{pem.key}: {pem.where} lacks the extended key usage {why}")


def _issued(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True



def upstream_tls(config: Config) -> UpstreamTLS:
    """Trust roots (``ca_file`` or the system's) and the optional client certificate."""
    trust_root = _trust_root(Pem("[license] ca_file", config.ca_file) if config.ca_file else None)
    client = None
    if config.client_cert:
        client = _private_certificate(
            Pem("[license] client_cert", config.client_cert),
            Pem("[license] client_key", config.client_key),
        )
    return UpstreamTLS(trust_root, client)


def _private_certificate(cert_pem: Pem, key_pem: Pem) -> PrivateCertificate:
    cert = _certificates(cert_pem)[0]
    key = _matching_key(cert, key_pem, cert_pem)
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
    #: The name every server is verified against (peers found by it), else each one's host.
    _name: Optional[str] = None
    _creators: dict = field(factory=dict, init=False)

    def creatorForNetloc(self, hostname: bytes, port: int):
        try:
            return self._creators[hostname, port]
        except KeyError:
            creator = optionsForClientTLS(
                self._name or hostname.decode("ascii"),
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
        self._name = fresh._name
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

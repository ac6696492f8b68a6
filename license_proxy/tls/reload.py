"""
Certificates reloaded in place, so that renewing the listener's certificate or
the upstream's trust roots needs no restart and drops no connection: each new
TLS connection takes the current material, and those already open keep what
they began with.  New files that can't be used are reported, and the old ones
stay in service.

Reloads happen on SIGHUP, and when the files the config names change on disk:
Kubernetes Secrets and cert-manager replace files in place and cannot send a
signal.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable

from attrs import define, frozen
from OpenSSL import SSL
from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from zope.interface import implementer

from ..config import Config, ConfigError
from .contexts import UpstreamTLS, listener_options, peer_tls, upstream_tls


@implementer(IOpenSSLServerConnectionCreator)
@define
class ListenerTLS:
    """The licensing listener's TLS, for ``TLSMemoryBIOFactory``: swappable."""

    options: CertificateOptions

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.options.getContext(), None)


CHECK_INTERVAL = 5.0
"""Seconds between looks at the certificate files.  Far inside any renewal
margin (kubelet takes up to a minute or two to update a Secret volume;
cert-manager renews weeks ahead), and reading a few kilobytes this often
costs nothing."""


@frozen
class CertificateFiles:
    """
    What the files the config names hold, per side, as digests: a change is
    seen however the files were replaced (written in place, renamed over, or a
    Secret volume's ``..data`` symlink flipped to a new directory), and a
    ``touch`` or a flip to the same contents is not one.  The generated
    certificate is not watched: only SIGHUP reloads it.
    """

    listener: tuple
    upstream: tuple
    peers: tuple  # the listener's too: it checks peers' certificates, and serves one

    @classmethod
    def read(cls, config: Config) -> CertificateFiles:
        return cls(
            _digests(config.tls_cert, config.tls_key),
            _digests(config.ca_file, config.client_cert, config.client_key),
            _digests(config.peer_ca_file, config.peer_cert_file, config.peer_key_file),
        )


def _digests(*paths: str | None) -> tuple:
    return tuple(_digest(path) for path in paths if path)


def _digest(path: str) -> bytes | str:
    """The file's SHA-256, or why it can't be read (a change too)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()
    except OSError as e:
        return str(e.strerror)


@define
class CertificateReload:
    """
    Reads the config's certificate files again and puts them in service: all
    of them on SIGHUP (calling it), those whose contents changed on ``check``.
    ``seen`` is what the files held when last read, taken *before* reading
    them, so that a change made while they are being read is seen next time.
    ``upstream_reloaded`` is told (with the cause) once new trust roots are in
    service: a server that failed verification may pass now.
    """

    _dates: IReactorTime  # now, for a generated certificate's validity
    _config: Config
    _listener: ListenerTLS | None  # None with [server] tls = false
    _upstream: UpstreamTLS
    _seen: CertificateFiles
    _upstream_reloaded: Callable[[str], None]
    _peers: UpstreamTLS | None = None  # the peers' client, with peers set

    log = Logger()

    def __call__(self) -> None:
        self._seen = CertificateFiles.read(self._config)
        self._reload_listener("SIGHUP")
        self._reload_upstream("SIGHUP")
        self._reload_peers("SIGHUP")

    def check(self) -> None:
        """Reload what changed on disk since last read.  Files that stay
        unusable are reported once, not at every check."""
        seen, self._seen = self._seen, CertificateFiles.read(self._config)
        if self._seen.listener != seen.listener or self._seen.peers != seen.peers:
            self._reload_listener("files changed")
        if self._seen.upstream != seen.upstream:
            self._reload_upstream("files changed")
        if self._seen.peers != seen.peers:
            self._reload_peers("files changed")

    def _reload_peers(self, cause: str) -> None:
        if self._peers is None:
            return
        try:
            fresh = peer_tls(self._config)
        except ConfigError as e:
            self.log.error(
                "reload ({cause}): keeping the peers' CA and certificate: {reason}",
                cause=cause,
                reason=str(e),
            )
        else:
            self._peers.replace_with(fresh)
            self.log.info(
                "reload ({cause}): the peers' CA, certificate and key are reloaded", cause=cause
            )

    def _reload_listener(self, cause: str) -> None:
        if self._listener is None:
            return
        try:
            options = listener_options(self._config, self._dates.seconds())
            options.getContext()
        except (ConfigError, SSL.Error) as e:
            self.log.error(
                "reload ({cause}): keeping the licensing listener's certificate: {reason}",
                cause=cause,
                reason=str(e),
            )
        else:
            self._listener.options = options
            self.log.info(
                "reload ({cause}): the licensing listener's certificate and key are reloaded",
                cause=cause,
            )

    def _reload_upstream(self, cause: str) -> None:
        try:
            fresh = upstream_tls(self._config)
        except ConfigError as e:
            self.log.error(
                "reload ({cause}): keeping the license server's trust roots and client "
                "certificate: {reason}",
                cause=cause,
                reason=str(e),
            )
        else:
            self._upstream.replace_with(fresh)
            self._upstream_reloaded(f"certificates reloaded ({cause})")
            self.log.info(
                "reload ({cause}): the license server's trust roots and client certificate"
                " are reloaded",
                cause=cause,
            )


def watching(reload: CertificateReload, timers: IReactorTime) -> TimerService:
    """A service that runs ``reload.check`` every ``CHECK_INTERVAL`` seconds."""
    watch = TimerService(CHECK_INTERVAL, reload.check)
    watch.clock = timers
    return watch


class OnSignal(Service):
    """Runs ``action`` in the reactor's thread each time the process gets ``signum``."""

    def __init__(self, signum: int, reactor, action) -> None:
        self._signum = signum
        self._reactor = reactor
        self._action = action
        self._previous = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(self._signum, self._received)

    def stopService(self):
        signal.signal(self._signum, self._previous)
        return super().stopService()

    def _received(self, signum, frame) -> None:
        self._reactor.callFromThread(self._action)

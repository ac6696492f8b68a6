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
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from zope.interface import implementer

from ..config import Config, ConfigError
from . import files
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
        return hashlib.sha256(files.read(path)).digest()
    except OSError as e:
        return str(e.strerror)


def _at_once(work: Callable[[], object]) -> Deferred:
    return maybeDeferred(work)


@define
class CertificateReload:
    """
    Reads the config's certificate files again and puts them in service: all
    of them on SIGHUP (calling it), those whose contents changed on ``check``.
    ``seen`` is what the files held when last read, taken *before* reading
    them, so that a change made while they are being read is seen next time.
    ``upstream_reloaded`` is told (with the cause) once new trust roots are in
    service: a server that failed verification may pass now.

    The files are read, and the new material built, by ``run`` (a thread, in
    service): never on the event loop, where a slow disk would hold every
    connection.  What is built is put in service, and logged, on the loop.
    """

    _dates: IReactorTime  # now, for a generated certificate's validity
    _config: Config
    _listener: ListenerTLS | None  # None with [server] tls = false
    _upstream: UpstreamTLS
    _seen: CertificateFiles
    _upstream_reloaded: Callable[[str], None]
    #: Runs a function off the event loop; a Deferred of its result.
    _run: Callable[[Callable[[], object]], Deferred] = _at_once
    _peers: UpstreamTLS | None = None  # the peers' client, with peers set

    log = Logger()

    def __call__(self) -> Deferred:
        return self._reload(None, "SIGHUP")

    def check(self) -> Deferred:
        """Reload what changed on disk since last read.  Files that stay
        unusable are reported once, not at every check."""
        return self._reload(self._seen, "files changed")

    def _reload(self, since: CertificateFiles | None, cause: str) -> Deferred:
        """Everything (``since`` None), or what changed since ``since``."""
        now = self._dates.seconds()
        loaded = self._run(lambda: self._load(since, now))
        loaded.addCallback(self._put_in_service, cause)
        loaded.addErrback(lambda failure: self.log.failure("reload ({cause})", failure, cause=cause))
        return loaded

    def _load(self, since: CertificateFiles | None, now: float) -> tuple:
        """Off the loop: what the files hold now, and for each side that changed its new
        material or the error that keeps the old (None: unchanged, or no such side)."""
        seen = CertificateFiles.read(self._config)
        listener = upstream = peers = None
        # The listener checks peers' client certificates and serves the peer certificate too.
        if self._listener is not None and (
            since is None or (seen.listener, seen.peers) != (since.listener, since.peers)
        ):
            listener = _built(lambda: _listener_options(self._config, now))
        if since is None or seen.upstream != since.upstream:
            upstream = _built(lambda: upstream_tls(self._config))
        if self._peers is not None and (since is None or seen.peers != since.peers):
            peers = _built(lambda: peer_tls(self._config))
        return seen, listener, upstream, peers

    def _put_in_service(self, loaded: tuple, cause: str) -> None:
        self._seen, listener, upstream, peers = loaded
        if isinstance(peers, Exception):
            self.log.error(
                "reload ({cause}): keeping the peers' CA and certificate: {reason}",
                cause=cause,
                reason=str(peers),
            )
        elif peers is not None:
            self._peers.replace_with(peers)
            self.log.info(
                "reload ({cause}): the peers' CA, certificate and key are reloaded", cause=cause
            )
        if isinstance(listener, Exception):
            self.log.error(
                "reload ({cause}): keeping the licensing listener's certificate: {reason}",
                cause=cause,
                reason=str(listener),
            )
        elif listener is not None:
            self._listener.options = listener
            self.log.info(
                "reload ({cause}): the licensing listener's certificate and key are reloaded",
                cause=cause,
            )
        if isinstance(upstream, Exception):
            self.log.error(
                "reload ({cause}): keeping the license server's trust roots and client "
                "certificate: {reason}",
                cause=cause,
                reason=str(upstream),
            )
        elif upstream is not None:
            self._upstream.replace_with(upstream)
            self._upstream_reloaded(f"certificates reloaded ({cause})")
            self.log.info(
                "reload ({cause}): the license server's trust roots and client certificate"
                " are reloaded",
                cause=cause,
            )


def _listener_options(config: Config, now: float) -> CertificateOptions:
    options = listener_options(config, now)
    options.getContext()  # a key OpenSSL refuses is found here, not at the next handshake
    return options


def _built(build: Callable[[], object]) -> object:
    """What ``build`` returns, or the error that makes the files unusable."""
    try:
        return build()
    except (ConfigError, SSL.Error) as e:
        return e


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

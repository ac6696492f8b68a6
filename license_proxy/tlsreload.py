"""
Certificates reloaded in place (on SIGHUP), so that renewing the listener's
certificate or the upstream's trust roots needs no restart and drops no
connection: each new TLS connection takes the current material, and those
already open keep what they began with.  New files that can't be used are
reported, and the old ones stay in service.
"""

from __future__ import annotations

import signal

from attrs import define
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from zope.interface import implementer

from .config import Config, ConfigError
from .tls import listener_options, upstream_tls
from .upstream import UpstreamTLS


@implementer(IOpenSSLServerConnectionCreator)
@define
class ListenerTLS:
    """The licensing listener's TLS, for ``TLSMemoryBIOFactory``: swappable."""

    options: CertificateOptions

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.options.getContext(), None)


@define
class CertificateReload:
    """Reads the config's certificate files again and puts them in service."""

    _clock: IReactorTime
    _config: Config
    _listener: ListenerTLS | None  # None with [server] tls = false
    _upstream: UpstreamTLS

    log = Logger()

    def __call__(self) -> None:
        if self._listener is not None:
            try:
                options = listener_options(self._config, self._clock.seconds())
                options.getContext()
            except (ConfigError, SSL.Error) as e:
                self.log.error(
                    "reload: keeping the licensing listener's certificate: {reason}", reason=str(e)
                )
            else:
                self._listener.options = options
                self.log.info("reload: the licensing listener's certificate and key are reloaded")
        try:
            fresh = upstream_tls(self._config)
        except ConfigError as e:
            self.log.error(
                "reload: keeping the license server's trust roots and client certificate: "
                "{reason}",
                reason=str(e),
            )
        else:
            self._upstream.replace_with(fresh)
            self.log.info("reload: the license server's trust roots and client certificate are reloaded")


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

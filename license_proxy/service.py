"""
Service wiring: builds the proxy's parts from a ``Config`` and hands twistd
one service that opens both listeners, runs the start-up rule and the
periodic check-in, and on stop finishes what is in flight and flushes the
trust cache.
"""

from __future__ import annotations

from typing import Callable

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site

from .checkin import CheckIn, StartupFailed
from .config import Config
from .relay import Relay
from .status import Status, status_resource
from .tls import listener_options, upstream_tls
from .trustcache import TrustCache
from .upstream import Upstream

IDLE_TIMEOUT = 60
"""Seconds an idle client connection is kept open."""


class _QuietSite(Site):
    """A ``Site`` without the access log: the relay logs each outcome itself,
    without query strings, which may carry secrets."""

    noisy = False

    def log(self, request) -> None:
        pass


class _Lifecycle(Service):
    """Start-up check-in, then the periodic one; on stop, drain and flush."""

    log = Logger()

    def __init__(
        self,
        checkin: CheckIn,
        relay: Relay,
        cache: TrustCache,
        config: Config,
        clock,
        fatal: Callable[[str], None],
    ) -> None:
        self._checkin = checkin
        self._relay = relay
        self._cache = cache
        self._startup_timeout = config.startup_timeout
        self._interval = config.checkin_interval
        self._fatal = fatal
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(checkin.periodic()))
        self._loop.clock = clock
        self._starting: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._starting = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            await self._checkin.startup(self._startup_timeout)
        except StartupFailed as e:
            self._fatal(str(e))
            return
        except CancelledError:
            return
        self._loop.start(self._interval, now=False)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._starting is not None:
            self._starting.cancel()
        if self._loop.running:
            self._loop.stop()
        idle = self._relay.idle()
        idle.addCallback(lambda _: self._cache.flush())
        return idle


def make_service(config: Config, reactor, fatal: Callable[[str], None]) -> MultiService:
    """
    Everything the proxy runs.  ``fatal(line)`` is called when the instance
    must not stay up (the start-up rule failed).
    """
    cache = TrustCache.load(reactor, config.cache_path)
    status = Status(reactor, cache, config.trust_duration)
    upstream = Upstream.build(
        reactor, config.server_urls, config.timeout, upstream_tls(config)
    )
    relay = Relay(reactor, upstream, cache, status, config.base_url.encode("ascii"))
    checkin = CheckIn(reactor, upstream, status, config.key)

    top = MultiService()
    # Added first, so it stops last: the listeners stop accepting before it
    # waits for the requests in flight.
    _Lifecycle(checkin, relay, cache, config, reactor, fatal).setServiceParent(top)
    licensing = _QuietSite(relay, timeout=IDLE_TIMEOUT)
    if config.tls:
        licensing = TLSMemoryBIOFactory(
            listener_options(config, reactor.seconds()), False, licensing
        )
    strports.service(
        _tcp(config.host, config.port), licensing, reactor=reactor
    ).setServiceParent(top)
    strports.service(
        _tcp(config.host, config.status_port),
        _QuietSite(status_resource(status), timeout=IDLE_TIMEOUT),
        reactor=reactor,
    ).setServiceParent(top)
    return top


def _tcp(host: str, port: int) -> str:
    """An endpoint string; IPv6 hosts have their colons quoted."""
    return f"tcp:port={port}:interface={quoteStringArgument(host)}"

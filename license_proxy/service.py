"""
Service wiring: builds the proxy's parts from a ``Config`` and hands twistd
one service that opens both listeners, runs the start-up rule and the
periodic check-in, and on stop finishes what is in flight and flushes the
trust cache.
"""

from __future__ import annotations

import signal
import time
from functools import partial
from typing import Callable

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from . import statedir
from .cachewriter import writer_thread
from .checkin import CheckIn, StartupFailed
from .clock import HighWaterClock
from .config import Config
from .discovery import INTERVAL, Discovery, resolver
from .egress import Settings
from .health import Health
from .guards import ConnectionLimits, GuardedSite
from .metrics import (
    ListenerMetrics,
    MetricsPage,
    PeersCollector,
    RelayMetrics,
    UpstreamCollector,
    registry_for,
    version,
)
from .overview import Overview
from .peers import Peers
from .relay import Relay
from .status import Status
from .threads import own_thread
from .statuspages import status_resource
from .timeline import EVERY, Timeline
from .twistedseams import reactor_handles
from .tls.contexts import listener_options, peer_tls, upstream_tls
from .tls.reload import CertificateFiles, CertificateReload, ListenerTLS, OnSignal, watching
from .trustcache import TrustCache
from .upstream import Upstream

CLOSE_TIMEOUT = 5
"""Seconds a stop waits for clients to take their last answers."""


class _Connections(WrappingFactory):
    """
    Keeps the listener's open connections, so that a stop can close them
    gracefully: each finishes writing its last answer before the reactor
    goes down and cuts whatever is left.
    """

    noisy = False

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self._waiting: list[Deferred] = []

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def drain(self) -> None:
        """From now on each answer closes its connection (``Connection: close``); kept-alive
        connections waiting for a next request are closed now."""
        self.wrappedFactory.draining = True
        for protocol in list(self.protocols):
            protocol.wrappedProtocol.closeIfIdle()

    def close(self) -> Deferred:
        """Close every connection once written out; fires when all are gone."""
        if not self.protocols:
            return succeed(None)
        gone: Deferred = Deferred()
        self._waiting.append(gone)
        for protocol in list(self.protocols):
            protocol.loseConnection()
        return gone


class _Listener(Service):
    """
    One listener: ``factory`` on the endpoint string ``description``.  A port that can't be
    opened (another process has it, or a privileged port) stops the start with one line naming
    the listener and the port, ``fatal``'s, the same whichever listener and whenever it opens:
    the status one as twistd starts the services, the licensing one after the start-up rule.
    ``listening`` says whether it opened.
    """

    def __init__(
        self, name: str, description: str, factory, reactor, fatal: Callable[[str], None]
    ) -> None:
        self._name = name
        self._port = strports.service(description, factory, reactor=reactor)
        self._fatal = fatal
        self._tried = False
        self.listening = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._open(self._port.privilegedStartService)

    def startService(self) -> None:
        super().startService()
        if self._tried:  # by twistd's privilegedStartService: listening, or said why not
            self._port.startService()
        else:  # added to a running service
            self._open(self._port.startService)

    def _open(self, start: Callable[[], None]) -> None:
        self._tried = True
        try:
            start()
        except CannotListenError as e:
            where = f"{e.interface or '*'}:{e.port}"
            self._fatal(f"cannot listen for {self._name} requests on {where}: {e.socketError}")
        else:
            self.listening = True

    def stopService(self) -> Deferred:
        super().stopService()
        return self._port.stopService() if self._port.running else succeed(None)


class _Lifecycle(Service):
    """
    Start-up check-in, then the licensing listener and the periodic check-in; on
    stop, drain and flush.  The drain keeps the licensing listener answering for
    ``drain_time`` after SIGTERM: a Kubernetes Service takes a terminating pod out
    as it gets its SIGTERM, not before, and a check-in already on its way here must
    be answered, neither refused nor given a 503.  The licensing port opens only
    once the start-up rule holds: an instance that is about to refuse to start must
    not answer anyone in the meantime (a load balancer that has not yet seen it go
    would send it the fleet's check-ins, to get 502s; a port that refuses the
    connection sends them to the other instance, or to the next ``server_url`` of
    the containers).
    """

    log = Logger()

    def __init__(
        self,
        checkin: CheckIn,
        relay: Relay,
        cache: TrustCache,
        upstream: Upstream,
        connections: _Connections,
        licensing: _Listener,
        config: Config,
        timers,
        fatal: Callable[[str], None],
    ) -> None:
        self._checkin = checkin
        self._relay = relay
        self._cache = cache
        self._upstream = upstream
        self._connections = connections
        self._licensing = licensing
        self._startup_timeout = config.startup_timeout
        self._drain_time = config.drain_time
        self._interval = config.checkin_interval
        self._timers = timers
        self._fatal = fatal
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(checkin.periodic()))
        self._loop.clock = timers
        self._starting: Deferred | None = None
        self._looping: Deferred | None = None
        self._draining: Deferred | None = None
        self._hurried = False

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
        self._licensing.startService()  # and stopped by ``_stop``, after the drain
        if not self._licensing.listening:
            return
        self._looping = self._loop.start(self._interval, now=False)
        self._looping.addErrback(
            lambda failure: self.log.failure("the periodic check-in stopped", failure)
        )

    def stopService(self) -> Deferred:
        super().stopService()
        if self._starting is not None:
            self._starting.cancel()
        if self._loop.running:
            self._loop.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._licensing.running:
            self._connections.drain()  # every answer from now on closes its connection
            await self._drain()
            await self._licensing.stopService()
        await self._relay.stop()
        self._upstream.health.stop()
        if self._looping is not None:
            await self._looping  # a check-in in flight finishes before the flush
        await self._cache.close()  # the write in flight, then the last one
        closing = self._connections.close()
        closing.addTimeout(CLOSE_TIMEOUT, self._timers)
        try:
            await closing
        except TimeoutError:
            pass
        await self._upstream.close()

    async def _drain(self) -> None:
        if not (self._licensing.listening and self._drain_time) or self._hurried:
            return
        self.log.info(
            "stopping: licensing requests are still answered for {seconds:g} s"
            " ([server] drain_time), each connection closed after its answer",
            seconds=self._drain_time,
        )
        self._draining = deferLater(self._timers, self._drain_time)
        try:
            await self._draining
        except CancelledError:
            self.log.info("stopping: a second signal ends the drain; the licensing port closes")
        else:
            self.log.info("stopping: the drain is over; the licensing port closes")

    def hurry(self) -> None:
        """No drain, or no more of it (a second SIGTERM or SIGINT: ``_StopSignals``)."""
        self._hurried = True
        if self._draining is not None:
            self._draining.cancel()


class _StopSignals(Service):
    """
    SIGTERM or SIGINT once more (an operator's second Ctrl-C) ends the drain at once:
    ``hurry``.  The reactor's own handler turns the first into the stop; given a second, it
    would try to stop a stopping reactor, log that traceback, and the drain would go on.
    """

    def __init__(self, reactor, hurry: Callable[[], None]) -> None:
        self._reactor = reactor
        self._hurry = hurry
        self._signalled = False

    def startService(self) -> None:
        super().startService()
        # The reactor installs its handlers as it starts running: after twistd starts us.
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            if reactor_handles(self._reactor, signum):
                signal.signal(signum, partial(self._received, signal.getsignal(signum)))

    def _received(self, reactors: Callable, signum: int, frame) -> None:
        if self._signalled:
            self._reactor.callFromThread(self._hurry)
        else:
            self._signalled = True
            reactors(signum, frame)


def make_service(
    config: Config, reactor, fatal: Callable[[str], None], egress: Settings
) -> MultiService:
    """
    Everything the proxy runs.  ``fatal(line)`` is called when the instance
    must not stay up (the start-up rule failed); ``egress`` chooses the route
    to the license server.
    """
    config = statedir.prepare(config)
    # Two clocks (clock.py): dates, in which trust is measured, never run back, not even across a
    # restart; timers (the reactor's, monotonic) measure elapsed time and run the delayed calls.
    dates = HighWaterClock(reactor, time.time)
    cache = TrustCache.load(
        dates, config.cache_path, config.cache_max_entries, run=writer_thread(reactor),
        salt=config.peer_salt,
    )
    # An answer counts as one the fleet keeps asking for once asked for a check-in later.
    cache.memory.keep_after = config.checkin_interval
    dates.not_before(cache.high_water)
    health = Health.of(
        dates, config.server_urls, config.answer_within, config.retry_interval, timers=reactor
    )
    status = Status(dates, cache, config.trust_duration, health)
    certificate_files = CertificateFiles.read(config)  # before reading them: see CertificateReload
    upstream_certificates = upstream_tls(config)
    upstream = Upstream.build(
        reactor, config.server_urls, config.timeout, upstream_certificates, egress, health,
        (config.upstream_max_connections, config.upstream_max_pending),
    )
    registry = registry_for(dates, status, cache)
    registry.register(UpstreamCollector(upstream))
    relay_metrics = RelayMetrics.on(registry)
    peer_certificates = peer_tls(config)
    peers = Peers.build(
        reactor, config.peer_urls, config.answer_within, config.retry_interval, peer_certificates
    )
    peers.named = config.peer_name is not None
    pulled = None  # the peers' answers taken at start: only under a salt they share
    if config.peer_urls or config.peer_name:
        pulled = cache if config.peer_salt is not None else None
        status.peers = peers
        registry.register(PeersCollector(peers))
    relay = Relay(
        dates,
        reactor,
        upstream,
        cache,
        status,
        config.base_url.encode("ascii"),
        relay_metrics,
        config.cache_key_headers,
        peers,
    )
    checkin = CheckIn(reactor, upstream, status, config.key, peers, pulled)
    health.probe_with(lambda index: Deferred.fromCoroutine(checkin.probe(index)))

    # Bodies are relayed as they are: never parsed as forms (a multipart body twisted.web
    # cannot parse would otherwise get its 400 instead of the license server's answer).
    guarded = ListenerMetrics.on(registry)
    connections = _Connections(
        GuardedSite(relay, config, reactor, guarded.rejected, parsePOSTFormSubmission=False)
    )
    licensing = connections
    listener_tls = None
    if config.tls:
        listener_tls = ListenerTLS(listener_options(config, dates.seconds()))
        licensing = TLSMemoryBIOFactory(listener_tls, False, connections, clock=reactor)
    timeline = Timeline(dates, status, relay_metrics.outcomes)
    overview = Overview(
        dates, reactor, status, cache, health.servers, timeline, version(), config.trust_duration,
        peers=lambda: () if peers.health is None else peers.health.servers,  # DNS: they change
    )
    status_site = GuardedSite(
        status_resource(status, MetricsPage(registry), overview), config, reactor, guarded.rejected
    )

    def listener(port: int, factory, name: str) -> _Listener:
        limited = ConnectionLimits(factory, config, reactor, guarded.refused, name)
        return _Listener(name, _tcp(config.host, port, config.backlog), limited, reactor, fatal)

    top = MultiService()
    # It starts the licensing listener itself, and stops it after the drain; the status
    # listener closes at once (a load balancer checking it takes the instance out).
    lifecycle = _Lifecycle(
        checkin, relay, cache, upstream, connections,
        listener(config.port, licensing, "licensing"), config, reactor, fatal,
    )
    lifecycle.setServiceParent(top)
    _StopSignals(reactor, lifecycle.hurry).setServiceParent(top)
    # New trust roots may change the verdict on a server marked down.
    reload = CertificateReload(
        dates, config, listener_tls, upstream_certificates, certificate_files, health.try_again,
        own_thread(reactor, "certificate-reader"),  # a FIFO or a slow disk holds it, not the loop
        peer_certificates,
    )
    OnSignal(signal.SIGHUP, reactor, reload).setServiceParent(top)
    watching(reload, reactor).setServiceParent(top)
    listener(config.status_port, status_site, "status").setServiceParent(top)
    sampling = TimerService(EVERY, timeline.sample)
    sampling.clock = reactor
    sampling.setServiceParent(top)
    if config.peer_name:
        _finding(config, reactor, peers).setServiceParent(top)
    return top


def _finding(config: Config, reactor, peers: Peers) -> Service:
    """The lookups of ``[peers] name`` (``discovery``), from the start."""
    discovery = Discovery(
        resolver(reactor),
        lambda url: Deferred.fromCoroutine(peers.identify(url)),
        peers.use,
        peers.instance,
        config.peer_name,
        config.port,
        config.base_url,
    )
    finding = TimerService(INTERVAL, lambda: Deferred.fromCoroutine(discovery.refresh()))
    finding.clock = reactor
    return finding


def _tcp(host: str, port: int, backlog: int) -> str:
    """An endpoint string; IPv6 hosts have their colons quoted."""
    return f"tcp:port={port}:interface={quoteStringArgument(host)}:backlog={backlog}"

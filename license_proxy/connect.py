"""
TCP connections to a host name that fail as fast as the network allows.

Twisted's ``HostnameEndpoint`` does what is needed (every resolved address
tried, staggered, the first connection wins) but notices that all attempts
failed only at its next attempt tick, so a refused connection costs a tick
(``attemptDelay``) every time; it also sends IP literals through the resolver
thread, and its ``timeout`` bounds each attempt but not the resolution.  While
the license server refuses connections that tick was each relay's wait.  This
endpoint follows RFC 8305 with public API only: an IP literal is its own
address; a name is resolved with the reactor's resolver; the next address is
tried ``ATTEMPT_DELAY`` after the previous one or as soon as it fails; the
failure is reported as soon as the last attempt fails; one deadline covers
resolution and every attempt.
"""

from __future__ import annotations

from typing import Optional

from attrs import frozen
from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

ATTEMPT_DELAY = 0.1
"""Seconds before the next address is tried while one is still connecting
(RFC 8305's minimum; Twisted's default is 0.3)."""


def resolve(reactor, host: str, port: int = 0) -> Deferred:
    """The addresses of ``host`` (a list of ``IPv4Address``/``IPv6Address``),
    without the resolver for an IP literal."""
    if isIPAddress(host):
        return succeed([IPv4Address("TCP", host, port)])
    if isIPv6Address(host):
        return succeed([IPv6Address("TCP", host, port)])
    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, host, portNumber=port)
    return receiver.done


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self) -> None:
        self._found: list = []
        self.done: Deferred = Deferred()

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        self._found.append(address)

    def resolutionComplete(self) -> None:
        if not self.done.called:  # not given up on (cancelled by a deadline)
            self.done.callback(self._found)


@implementer(IStreamClientEndpoint)
@frozen
class FastEndpoint:
    """TCP to ``host:port`` (a name or an IP literal), within ``timeout`` seconds in all."""

    _reactor: object
    _host: str
    _port: int
    _timeout: float

    def connect(self, factory) -> Deferred:
        connecting = Deferred.fromCoroutine(self._connect(factory))
        return connecting.addTimeout(self._timeout, self._reactor, self._timed_out)

    def _timed_out(self, result, timeout: float) -> object:
        if isinstance(result, Failure):
            return Failure(error.TimeoutError(f"no connection within {timeout:g} s"))
        return result

    async def _connect(self, factory):
        found = await resolve(self._reactor, self._host, self._port)
        endpoints = [
            (TCP6ClientEndpoint if isinstance(a, IPv6Address) else TCP4ClientEndpoint)(
                self._reactor, a.host, self._port, self._timeout
            )
            for a in found
            if isinstance(a, (IPv4Address, IPv6Address))
        ]
        if not endpoints:
            raise error.DNSLookupError(f"no address for {self._host}")
        return await _first_to_connect(self._reactor, endpoints, factory)


def _first_to_connect(clock, endpoints: list, factory) -> Deferred:
    """The first connection of ``endpoints``, tried in order, each
    ``ATTEMPT_DELAY`` after the previous or as soon as it fails; the last
    failure once all have failed."""
    waiting = list(endpoints)
    pending: list[Deferred] = []
    failures: list = []
    timer: list[Optional[object]] = [None]

    def stop_timer() -> None:
        if timer[0] is not None and timer[0].active():
            timer[0].cancel()

    def give_up(_) -> None:
        stop_timer()
        waiting.clear()
        for attempt in pending[:]:
            attempt.cancel()

    winner = Deferred(give_up)

    def start_next() -> None:
        stop_timer()
        if not waiting:
            if not pending and not winner.called:
                winner.errback(failures[-1])
            return
        endpoint = waiting.pop(0)
        if waiting:
            timer[0] = clock.callLater(ATTEMPT_DELAY, start_next)
        attempt = endpoint.connect(factory)
        pending.append(attempt)
        attempt.addCallbacks(won, lost, (attempt,), None, (attempt,))

    def won(protocol, attempt) -> None:
        pending.remove(attempt)
        if winner.called:
            protocol.transport.abortConnection()
            return
        # Settled before the others are cancelled: a cancelled attempt fails at once,
        # and must not find the race still open (it would report its own cancel).
        winner.callback(protocol)
        give_up(None)

    def lost(failure, attempt) -> None:
        pending.remove(attempt)
        failures.append(failure)
        if not winner.called:
            start_next()

    start_next()
    return winner

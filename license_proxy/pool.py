"""
Pooled connections to the license server, and the one retry they need.

A kept-alive connection waiting in the pool can be closed by the server at any
moment; a request sent on it just then fails although the server never
answered it.  Twisted retries only bodiless GET/HEAD/OPTIONS/DELETE/TRACE
requests then, so a licensing POST would fail.  This pool follows the rule of
Go's net/http Transport (``persistConn.shouldRetryRequest``) instead: send the
request once more, on a new connection, only when the failed attempt ran on a
connection reused from the pool, and either nothing of the request was
written, or the request is replayable (GET, HEAD, OPTIONS, TRACE, or an
``Idempotency-Key`` header) and no byte of the answer arrived.  Never after
an answer byte, never a POST that may have reached the server, never twice;
the caller's one deadline covers both attempts.

Twisted buffers writes, so a close the reactor has not read yet would make
even a request that never left the process look sent.  Before a pooled
connection is used, its socket is polled (as urllib3 does): one with input
waiting, which on an idle HTTP/1.1 connection can only be a close, is
dropped and the request goes out on a new connection, as "nothing written".
"""

from __future__ import annotations

import select
from functools import partial
from typing import Callable

from attrs import define, frozen
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from .twistedseams import (
    ClientRequest,
    HTTP11ClientProtocol,
    RequestNotSent,
    ReuseAwarePool,
    pool_key_host,
)

IDLE_TIMEOUT = 20.0
"""Seconds an idle pooled connection is kept: below the keep-alive timeouts
servers commonly use (nginx 75 s, many load balancers 60 s), so the server
rarely closes one under us and the retry stays rare."""

_REPLAYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
_IDEMPOTENCY_KEYS = (b"idempotency-key", b"x-idempotency-key")


@implementer(IBodyProducer)
@frozen
class BytesBody:
    """A request body already in memory, written at once (no cooperator, hence
    no hidden use of the global reactor), and written again for a retry."""

    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def should_retry(request: ClientRequest, failure: Failure) -> bool:
    """Whether ``request``, which failed with ``failure`` on a connection
    reused from the pool, may be sent again."""
    if request.bodyProducer is not None and not isinstance(request.bodyProducer, BytesBody):
        return False  # a body that can't be written again
    if failure.check(RequestNotSent):
        return True  # nothing of it was written
    if not failure.check(ResponseNeverReceived):
        return False  # part of the answer arrived, or writing the request failed midway
    if any(reason.check(CancelledError) for reason in failure.value.reasons):
        return False  # the deadline, or a stop
    return request.method in _REPLAYABLE or any(
        request.headers.hasHeader(name) for name in _IDEMPOTENCY_KEYS
    )


@define
class _RetryOnce:
    """A connection reused from the pool: skipped if the server has already
    closed it, and a request that fails on it as ``should_retry`` allows is
    sent once more through ``retry``."""

    _connection: HTTP11ClientProtocol
    _retry: Callable[[ClientRequest, Failure], Deferred]

    def request(self, request: ClientRequest) -> Deferred:
        def failed(failure: Failure):
            if not should_retry(request, failure):
                return failure
            return self._retry(request, failure).addCallback(
                lambda connection: connection.request(request)
            )

        if _input_waiting(self._connection.transport):
            self._connection.abort()
            sent = fail(RequestNotSent())
        else:
            sent = self._connection.request(request)
        return sent.addErrback(failed)


def _input_waiting(transport) -> bool:
    """Whether the socket under ``transport`` (through TLS and tunnels) has
    input the reactor has not read yet."""
    while not isinstance(transport, FileDescriptor):
        transport = getattr(transport, "transport", None)
        if transport is None:
            return False  # not over a socket (in-memory tests)
    poller = select.poll()
    poller.register(transport.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class RetryingPool(ReuseAwarePool):
    """An ``HTTPConnectionPool`` with the retry above instead of Twisted's;
    ``retries`` counts the requests sent again."""

    retryAutomatically = False  # Twisted's own, narrower retry
    cachedConnectionTimeout = IDLE_TIMEOUT
    log = Logger()

    def __init__(self, reactor, persistent: bool = True) -> None:
        super().__init__(reactor, persistent)
        self.retries = 0

    def getConnection(self, key, endpoint) -> Deferred:
        connection, new = self.newOrPooled(key, endpoint)
        if new:  # no reason to retry on another
            return connection
        return connection.addCallback(_RetryOnce, partial(self._again, key, endpoint))

    def _again(self, key, endpoint, request: ClientRequest, failure: Failure) -> Deferred:
        self.retries += 1
        self.log.info(
            "{method} to {host}: the pooled connection was closed {when};"
            " sending it on a new connection",
            method=request.method.decode("ascii"),
            host=pool_key_host(key).decode("ascii"),
            when="before the request went out"
            if failure.check(RequestNotSent)
            else "before any answer",
        )
        return self.dial(key, endpoint)

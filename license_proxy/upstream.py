"""
The client side: one exchange with the license server, over verified TLS,
under one deadline, with a clear reason when it fails.

Twisted's ``Agent`` is the client, used as it is: treq's ``HTTPClient`` wraps
every request in a shared cookie jar (a cookie set for one licensee would be sent
for the next) and in gzip decoding (answers must go back as the upstream sent
them), with no public switch for either, and its timeout stops at the response
headers (the deadline here covers connect, headers and body).
"""

from __future__ import annotations

from typing import Optional, Sequence

from attrs import define, frozen
from hyperlink import DecodedURL
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from .defaults import ANSWER_WITHIN, RETRY_INTERVAL
from .egress import Egress, Settings
from .health import Health
from .pool import BytesBody, RetryingPool
from .slots import Overflow, Slots
from .tls.contexts import UpstreamTLS
from .tunnel import ProxyError

MAX_ANSWER = 16 * 1024 * 1024
"""Largest answer body accepted; licensing answers are a few kilobytes."""


class UpstreamFailure(Exception):
    """No usable answer: says which upstream and why, in words for a log line;
    ``attempted`` False when no server was asked (all known down or busy)."""

    def __init__(self, url: str, reason: str, attempted: bool = True) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
        self.attempted = attempted


@frozen
class Answer:
    """What the upstream said; ``complete`` when its end was certain
    (Content-Length met or the chunked terminator seen), not just a close."""

    status: int
    headers: Headers
    body: bytes
    complete: bool


class _BodyReader(Protocol):
    """Collect an answer body and tell whether its end was certain."""

    def __init__(self) -> None:
        self.done: Deferred = Deferred(lambda d: self.transport.stopProducing())
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_ANSWER:
            self.transport.stopProducing()
            self._finish(Failure(ValueError(f"answer larger than {MAX_ANSWER} bytes")))
        else:
            self._chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        body = b"".join(self._chunks)
        if reason.check(ResponseDone):
            self._finish((body, True))
        elif reason.check(PotentialDataLoss):
            self._finish((body, False))
        else:
            self._finish(reason)

    def _finish(self, result) -> None:
        # A cancelled read (the deadline) has already fired ``done``.
        if not self.done.called:
            self.done.callback(result)


def _read_body(response) -> Deferred:
    reader = _BodyReader()
    response.deliverBody(reader)
    return reader.done


@define
class Upstream:
    """The license server(s): each URL in turn, skipping those ``health``
    says not to wait for, until one gives a usable answer."""

    _clock: IReactorTime
    _agent: IAgent
    _urls: Sequence[bytes]
    _timeout: float
    health: Health
    _pool: Optional[RetryingPool] = None
    #: Each server's bounded connections (``slots``); none: unbounded.
    slots: Sequence[Slots] = ()

    @classmethod
    def using(
        cls,
        agent: IAgent,
        clock: IReactorTime,
        urls: Sequence[str],
        timeout: float,
        pool: Optional[RetryingPool] = None,
        health: Optional[Health] = None,
        bound: Optional[tuple[int, int]] = None,
    ) -> Upstream:
        """The client over ``agent``; ``bound``: each server's connections at once and
        requests waiting for one (None: unbounded)."""
        if health is None:
            health = Health.of(clock, urls, ANSWER_WITHIN, RETRY_INTERVAL)
        slots = () if bound is None else [Slots(clock, url, *bound) for url in urls]
        return cls(
            clock,
            agent,
            [DecodedURL.from_text(u).to_uri().to_text().encode("ascii") for u in urls],
            timeout,
            health,
            pool,
            slots,
        )

    @classmethod
    def build(
        cls,
        reactor,
        urls: Sequence[str],
        timeout: float,
        tls: UpstreamTLS,
        egress: Settings,
        health: Health,
        bound: tuple[int, int],
    ) -> Upstream:
        """The production client: pooled connections, verified TLS, direct
        or through the forward proxy ``egress`` chooses.  A connection not
        made within ``health.answer_within`` is a failure (see ``health``);
        at most ``bound`` (connections, waiting requests) per server (``slots``)."""
        pool = RetryingPool(reactor, persistent=True)
        pool.maxPersistentPerHost = min(16, bound[0])
        connect_timeout = min(timeout, health.answer_within)
        endpoints = Egress(reactor, tls, egress, connect_timeout)
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        return cls.using(agent, reactor, urls, timeout, pool, health, bound)

    @property
    def retries(self) -> int:
        """Requests sent again after a pooled connection failed (see ``pool``)."""
        return 0 if self._pool is None else self._pool.retries

    def close(self) -> Deferred:
        """Close idle pooled connections cleanly (at shutdown)."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    async def exchange(
        self,
        method: bytes,
        rest: bytes,
        headers: Headers,
        body: Optional[bytes],
        timeout: Optional[float] = None,
        every: bool = False,
    ) -> Answer:
        """
        Send ``method`` to each upstream URL + ``rest`` (path below the URL,
        and query) until one answers below 500, each attempt under one
        deadline (``timeout`` may shorten it).  Servers ``health`` finds not
        usable are skipped unless ``every``.  Raises ``UpstreamFailure``
        with the last reason when none answers.
        """
        failure = None
        for index in range(len(self._urls)):
            if not (every or self.health.usable(index)):
                if failure is None or not failure.attempted:
                    failure = self._skipped(index)
                continue
            try:
                answer = await self.attempt(index, method, rest, headers, body, timeout)
            except UpstreamFailure as e:
                failure = e
                continue
            if answer.status < 500:
                return answer
            failure = UpstreamFailure(self._urls[index].decode("ascii"), f"answered {answer.status}")
        raise failure

    def unavailable(self) -> Optional[UpstreamFailure]:
        """Why no server may be asked now (all down or busy), or None."""
        if self.health.available:
            return None
        return self._skipped(len(self._urls) - 1)

    def _skipped(self, index: int) -> UpstreamFailure:
        url = self._urls[index].decode("ascii")
        return UpstreamFailure(url, self.health.why_not(index), attempted=False)

    async def attempt(
        self,
        index: int,
        method: bytes,
        rest: bytes,
        headers: Headers,
        body: Optional[bytes],
        timeout: Optional[float] = None,
    ) -> Answer:
        """One exchange with server ``index`` (any answer, 5xx too), its
        outcome told to ``health``; ``UpstreamFailure`` when there is none.
        With a bound, it first waits for one of the server's connections
        (``slots``): up to ``answer_within``, else a failure without an attempt."""
        if not self.slots:
            return await self._attempt(index, method, rest, headers, body, timeout)
        slots = self.slots[index]
        try:
            await slots.take(self.health.answer_within)
        except Overflow as e:
            url = self._urls[index].decode("ascii")
            raise UpstreamFailure(url, str(e), attempted=False) from None
        try:
            return await self._attempt(index, method, rest, headers, body, timeout)
        finally:
            slots.give()

    async def _attempt(
        self,
        index: int,
        method: bytes,
        rest: bytes,
        headers: Headers,
        body: Optional[bytes],
        timeout: Optional[float],
    ) -> Answer:
        deadline = self._timeout if timeout is None else min(timeout, self._timeout)
        url = self._urls[index]
        token = self.health.begin(index)
        attempt = Deferred.fromCoroutine(
            self._once(method, _join(url, rest), headers.copy(), body)
        )
        attempt.addTimeout(deadline, self._clock, onTimeoutCancel=_deadline_passed)
        try:
            answer = await attempt
        except Exception as e:
            if _cancelled(e):
                # From outside (a stop): not a failure to report.  Its own deadline
                # is a TimeoutError by then (``_deadline_passed``).
                self.health.abandon(index, token)
                raise CancelledError() from None
            reason = describe(e, deadline)
            self.health.end(index, token, reason)
            raise UpstreamFailure(url.decode("ascii"), reason) from None
        down = answer.status in self.health.down_statuses
        self.health.end(index, token, f"answered {answer.status}" if down else None)
        return answer

    async def _once(
        self, method: bytes, target: bytes, headers: Headers, body: Optional[bytes]
    ) -> Answer:
        response = await self._agent.request(
            method, target, headers, None if body is None else BytesBody(body)
        )
        content, complete = await _read_body(response)
        return Answer(response.code, response.headers, content, complete)


def _join(base: bytes, rest: bytes) -> bytes:
    """The upstream URL with ``rest`` (percent-encoded path and query, as the
    client sent them) appended below its path: the scheme and host can only
    ever be the configured ones."""
    if not rest:
        return base
    return base.rstrip(b"/") + b"/" + rest


def _deadline_passed(result, timeout: float):
    """The result of an exchange its deadline cancelled: a cancel, whatever it
    became on the way (the client reports one before the answer as
    ``ResponseNeverReceived([CancelledError])``), is the deadline's; a failure
    that says more (a proxy's CONNECT never answered) stays as it is."""
    if isinstance(result, Failure) and _cancelled(result.value):
        return Failure(TimeoutError(f"no complete answer within {timeout:g} s"))
    return result


def _cancelled(e: BaseException) -> bool:
    """Whether ``e`` is a cancel, bare or as the client reports it."""
    if isinstance(e, (ResponseFailed, RequestTransmissionFailed)):
        return any(reason.check(CancelledError) for reason in e.reasons)
    return isinstance(e, CancelledError)


def describe(e: BaseException, timeout: float) -> str:
    """A failure in words an operator can act on."""
    if isinstance(e, (TimeoutError, CancelledError)):
        return f"no complete answer within {timeout:g} s"
    if isinstance(e, (ResponseFailed, RequestTransmissionFailed)) and e.reasons:
        return "; ".join(describe(r.value, timeout) for r in e.reasons)
    if isinstance(e, ProxyError):
        reason = e.reason if isinstance(e.reason, str) else describe(e.reason, timeout)
        return f"proxy {e.proxy}: {reason}"
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(e, (error.TimeoutError, error.UserError)):
        return "connect timed out"
    if isinstance(e, VerificationError):
        return f"TLS: certificate does not match the host ({e})"
    if isinstance(e, SSL.Error):
        reasons = [r[-1] for r in e.args[0] if isinstance(r, tuple)] if e.args else []
        return "TLS: " + (", ".join(reasons) or "handshake failed")
    if isinstance(e, error.ConnectionLost):
        return "connection lost before the answer was complete"
    if isinstance(e, error.ConnectionDone):
        return "connection closed before the answer was complete"
    return f"{type(e).__name__}: {e}"

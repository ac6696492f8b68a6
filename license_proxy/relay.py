"""
The licensing listener: every request under ``base_url`` is relayed to the
license server; good answers are kept in the trust cache, and when the server
can't give one, the cached answer to the same request is served while the
proxy is inside its trust window.  No request waits on a server known to be
down, nor longer than ``answer_within`` when it has a trusted answer: the
exchange then finishes in the background (rules in ``health``).

It is not an open proxy: the request target is only ever appended below the
configured upstream URL, and a target that is not a plain origin-form path
under ``base_url`` is refused before anything is sent.
"""

from __future__ import annotations

import json
import math
import re
from typing import ClassVar, Iterable, Optional

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from .metrics import (
    REJECTED,
    SERVED_FROM_TRUST,
    UNAVAILABLE,
    UPSTREAM_4XX,
    UPSTREAM_OK,
    RelayMetrics,
)
from .status import Status
from .trustcache import CREDENTIAL_HEADERS, Entry, TrustCache
from .upstream import Answer, Upstream, UpstreamFailure

#: Headers that belong to one connection, never relayed (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Set again by the relay or its client for each message.
_REQUEST_OWN = frozenset({b"host", b"content-length"})
_ANSWER_OWN = frozenset({b"content-length"})
#: Never replayed from the cache to a later client.
_NOT_CACHED = frozenset({b"set-cookie", b"age", b"date"})

# An origin-form target: RFC 3986 path characters, an optional query.
_TARGET = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*(\?[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*)?")
_DOT_SEGMENT = re.compile(rb"(^|/)(\.|%2e){1,2}(/|$)", re.IGNORECASE)


def end_to_end(headers: Headers, own: frozenset) -> list[tuple[bytes, list[bytes]]]:
    """``headers`` less hop-by-hop ones, those named in ``Connection``, and ``own``."""
    named = {
        token.strip().lower()
        for value in headers.getRawHeaders(b"connection", [])
        for token in value.split(b",")
    }
    drop = HOP_BY_HOP | named | own
    return [
        (name, values)
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in drop
    ]


@implementer(IResource)
@define
class Relay:
    """The licensing listener's one resource."""

    _clock: IReactorTime
    _upstream: Upstream
    _cache: TrustCache
    _status: Status
    _base_url: bytes
    _metrics: RelayMetrics
    _inflight: set = field(factory=set, init=False)
    _background: set = field(factory=set, init=False)
    _stopping: bool = field(default=False, init=False)

    isLeaf: ClassVar[bool] = True
    log: ClassVar[Logger] = Logger()

    def getChildWithDefault(self, name, request):
        return self

    def putChild(self, path, child):
        raise NotImplementedError("the relay has no children")

    def render(self, request: IRequest):
        if self._stopping:
            request.setHeader(b"connection", b"close")
            return _error(request, 503, "license-proxy is stopping")
        if not request.uri.startswith(self._base_url):
            return self._reject(request, 404, f"not under base_url {self._base_url.decode()}")
        rest = request.uri[len(self._base_url) :]
        if not _TARGET.fullmatch(rest) or _DOT_SEGMENT.search(rest.split(b"?")[0]):
            return self._reject(request, 400, "malformed request target")
        gone: list = []
        request.notifyFinish().addErrback(gone.append)
        done = Deferred.fromCoroutine(self._relay(request, rest, gone))
        done.addErrback(self._crashed, request, gone)
        self._inflight.add(done)
        done.addBoth(lambda _: self._inflight.discard(done))
        return NOT_DONE_YET

    def _crashed(self, failure, request: IRequest, gone: list) -> None:
        """A bug must not leave the client hanging: log it, answer 500."""
        self.log.failure("relay crashed", failure)
        if not gone and not request.finished:
            _write(request, 500, [_JSON], _error_body("internal error"))

    def _reject(self, request: IRequest, code: int, reason: str) -> bytes:
        # The target is not logged: it may be anything, query strings included.
        self._metrics.outcomes.labels(REJECTED).inc()
        self.log.info("refused a request: {reason} ({code})", reason=reason, code=code)
        return _error(request, code, reason)

    def stop(self) -> Deferred:
        """Take no new request (keep-alive clients get 503 and ``Connection:
        close``); fires once those already in flight have answered."""
        self._stopping = True
        for exchange in list(self._background):
            exchange.cancel()  # its client has its answer
        return DeferredList(list(self._inflight), consumeErrors=True)

    async def _relay(self, request: IRequest, rest: bytes, gone: list) -> None:
        started = self._clock.seconds()
        method = request.method
        key = self._cache.key(method, rest, _credentials(request.requestHeaders))
        entry = self._cache.lookup(key) if self._status.trusted() else None
        known_outage = self._upstream.unavailable()
        if known_outage is not None:
            # No server to ask (see health.py): answered now, logged once per
            # transition, not per request.
            self._answer_failure(request, entry, known_outage)
            self._metrics.outcomes.labels(SERVED_FROM_TRUST if entry else UNAVAILABLE).inc()
            return
        headers = Headers(dict(end_to_end(request.requestHeaders, _REQUEST_OWN)))
        has_body = request.requestHeaders.hasHeader(
            b"content-length"
        ) or request.requestHeaders.hasHeader(b"transfer-encoding")
        body = request.content.read() if has_body else None
        path = request.path.decode("ascii")  # the query may carry secrets: not logged
        exchange = Deferred.fromCoroutine(self._exchange(method, rest, headers, body, key))
        if entry is not None and not exchange.called:
            # A trusted answer exists: never held past answer_within for it.
            bound = self._upstream.health.answer_within
            result = await _within(self._clock, exchange, bound)
            if result is None:
                self._in_background(exchange, method, path, started)
                if not gone:
                    self._answer_failure(request, entry, None)
                self._metrics.outcomes.labels(SERVED_FROM_TRUST).inc()
                self.log.warn(
                    "relay {method} {path}: no answer within {bound:g} s; {outcome}"
                    " (cache: {cache}); the exchange goes on in the background",
                    method=method.decode("ascii"),
                    path=path,
                    bound=bound,
                    outcome=SERVED_FROM_TRUST,
                    cache="hit",
                )
                return
        else:
            result = await exchange
        latency = self._clock.seconds() - started
        if isinstance(result, UpstreamFailure):
            entry = self._cache.lookup(key) if self._status.trusted() else None
            if not gone:
                self._answer_failure(request, entry, result)
            outcome = SERVED_FROM_TRUST if entry else UNAVAILABLE
            self._metrics.outcomes.labels(outcome).inc()
            if not result.attempted:
                return  # a known outage: logged once, when the server went down
            self.log.warn(
                "relay {method} {path} failed after {ms:.1f} ms: {failure}; "
                "{outcome} (cache: {cache})",
                method=method.decode("ascii"),
                path=path,
                failure=str(result),
                outcome=outcome,
                cache="hit" if entry else "miss" if self._status.trusted() else "outside trust window",
                ms=latency * 1000,
            )
            return
        answer, cacheable = result
        if not gone:
            _write(
                request,
                answer.status,
                end_to_end(answer.headers, _ANSWER_OWN),
                answer.body,
            )
        outcome = UPSTREAM_4XX if 400 <= answer.status < 500 else UPSTREAM_OK
        self._metrics.outcomes.labels(outcome).inc()
        self.log.info(
            "relay {method} {path} -> {status} in {ms:.1f} ms; {outcome} (cache: {cache})",
            method=method.decode("ascii"),
            path=path,
            status=answer.status,
            outcome=outcome,
            cache="stored" if cacheable else "not stored",
            ms=latency * 1000,
        )

    async def _exchange(
        self, method: bytes, rest: bytes, headers: Headers, body: Optional[bytes], key: bytes
    ):
        """
        The exchange, and what its result changes whether or not a client still
        waits for it: the state, the cache, the latency histogram.  Returns the
        ``UpstreamFailure``, or the answer and whether it was stored.
        """
        started = self._clock.seconds()
        try:
            answer = await self._upstream.exchange(method, rest, headers, body)
        except UpstreamFailure as failure:
            if failure.attempted:  # no server asked: nothing new about the state
                self._metrics.latency.observe(self._clock.seconds() - started)
                self._status.failed()
            return failure
        self._metrics.latency.observe(self._clock.seconds() - started)
        self._status.succeeded()
        cacheable = 200 <= answer.status < 300 and answer.complete
        if cacheable:
            self._cache.store(key, _entry(answer, self._clock.seconds()))
        return answer, cacheable

    def _in_background(self, exchange: Deferred, method: bytes, path: str, started: float) -> None:
        """An exchange whose client was answered from trust: logged when it
        ends, cancelled by a stop."""

        def ended(result) -> None:
            self._background.discard(exchange)
            if isinstance(result, UpstreamFailure):
                what = f"failed: {result}"
            else:
                answer, cacheable = result
                what = f"-> {answer.status} (cache: {'stored' if cacheable else 'not stored'})"
            self.log.info(
                "relay {method} {path}, answered from trust, ended after {ms:.1f} ms: {what}",
                method=method.decode("ascii"),
                path=path,
                ms=(self._clock.seconds() - started) * 1000,
                what=what,
            )

        self._background.add(exchange)
        exchange.addCallback(ended).addErrback(lambda f: f.trap(CancelledError))

    def _answer_failure(
        self, request: IRequest, entry: Optional[Entry], failure: Optional[UpstreamFailure]
    ) -> None:
        if entry is None:
            message = f"license server unavailable: {failure.reason}"
            retry = str(math.ceil(self._upstream.health.retry_interval)).encode("ascii")
            _write(request, 502, [_JSON, (b"retry-after", [retry])], _error_body(message))
            return
        age = max(0, int(self._clock.seconds() - entry.stored_at))
        headers: dict[bytes, list[bytes]] = {}
        for name, value in entry.headers:
            headers.setdefault(name, []).append(value)
        headers[b"Age"] = [str(age).encode("ascii")]
        _write(request, entry.status, headers.items(), entry.body)


def _within(clock: IReactorTime, exchange: Deferred, bound: float) -> Deferred:
    """Fires with ``exchange``'s result if it comes within ``bound`` seconds,
    else with None then; ``exchange`` itself runs on either way."""
    first: Deferred = Deferred()
    timer = clock.callLater(bound, first.callback, None)

    def settled(result):
        if timer.active():
            timer.cancel()
            first.callback(result)
        return result

    exchange.addCallback(settled)
    return first


def _credentials(headers: Headers) -> Iterable[tuple[bytes, bytes]]:
    for name in CREDENTIAL_HEADERS:
        for value in headers.getRawHeaders(name, []):
            yield name, value


def _entry(answer: Answer, stored_at: float) -> Entry:
    kept = end_to_end(answer.headers, _ANSWER_OWN | _NOT_CACHED)
    return Entry(
        status=answer.status,
        headers=tuple((name, value) for name, values in kept for value in values),
        body=answer.body,
        stored_at=stored_at,
    )


def _write(request: IRequest, status: int, headers, body: bytes) -> None:
    request.setResponseCode(status)
    request.defaultContentType = None  # no Content-Type unless the answer had one
    response = request.responseHeaders
    response.removeHeader(b"server")
    for name, values in headers:
        response.setRawHeaders(name, values)
    response.setRawHeaders(b"content-length", [str(len(body)).encode("ascii")])
    request.write(body)
    request.finish()


_JSON = (b"content-type", [b"application/json"])


def _error(request: IRequest, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(_JSON[0], _JSON[1][0])
    return _error_body(message)


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode("utf-8")

"""
The relay, the licensing listener's one resource (its connections and heads are checked
before by ``guards``): every request under ``base_url`` is relayed to the
license server; good answers are kept in the trust cache, and when the server
can't give one, the cached answer to the same request is served while the
proxy is inside its trust window, and failing that a peer's (``peers``).  No
request waits on a server known to be down, nor longer than ``answer_within``
when it has a trusted answer: the exchange then finishes in the background
(rules in ``health``).

It is not an open proxy: the request target is only ever appended below the
configured upstream URL, and a target that is not a plain origin-form path
under ``base_url`` is refused before anything is sent.  Nor does it let a
client reach outside ``server_url``'s path: a path that some decoding could
read as leaving it is refused (400) rather than normalised, because the proxy
can't know how the upstream decodes (``pathrule``).  Only the methods a
licensing request can use are relayed.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Callable, ClassVar, Optional

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from . import pathrule
from .defaults import CREDENTIAL_HEADERS
from .headernames import HOP_BY_HOP, INSTANCE, PEER, REQUEST_OWN, SALT, TOKEN, UNDERSCORE
from .metrics import (
    REJECTED,
    SERVED_BY_PEER,
    SERVED_FROM_TRUST,
    UNAVAILABLE,
    UPSTREAM_4XX,
    UPSTREAM_OK,
    RelayMetrics,
)
from .peers import (
    ENTRIES,
    MALFORMED,
    PAGE,
    PAGE_BYTES,
    PROBE,
    STORE,
    TRUST,
    Peers,
    certified_peer,
)
from .status import Status
from .memorycache import finite
from .trustcache import Entry, TrustCache
from .upstream import Answer, Upstream, UpstreamFailure

#: Set again by the relay or its client for each message.
_ANSWER_OWN = frozenset({b"content-length"})
#: Never replayed from the cache to a later client.
_NOT_CACHED = frozenset({b"set-cookie", b"age", b"date"})

#: Relayed; any other method (CONNECT, TRACE, WebDAV's) gets 405.
METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")
_ALLOW = b", ".join(METHODS)

# An origin-form target: RFC 3986 path characters, an optional query.
_TARGET = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*(\?[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*)?")
# A Vary field's names: tokens (RFC 9110 5.6.2).


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
    """Relays, or answers from trust or from a peer: the licensing listener's one resource."""

    _dates: IReactorTime  # when an answer was stored, its Age (``clock``)
    _timers: IReactorTime  # answer_within, and latency (the reactor: a date jump is no latency)
    _upstream: Upstream
    _cache: TrustCache
    _status: Status
    _base_url: bytes
    _metrics: RelayMetrics
    #: Request headers that identify a licensee, lower case, sorted: in every cache key.
    _key_headers: tuple[bytes, ...] = CREDENTIAL_HEADERS
    _peers: Peers = field(factory=Peers)
    #: Whether a request comes from a peer: only then is its mark (``peers``) obeyed.
    _from_peer: Callable[[IRequest], bool] = certified_peer
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
            return _error(request, 503, "license-proxy is stopping")
        mark = request.requestHeaders.getRawHeaders(PEER)
        from_peer = mark is not None and self._from_peer(request)
        if mark is not None and not from_peer:
            # Stripped (never sent on: REQUEST_OWN), and relayed like any other request.
            self.log.warn(
                "a request carried {header} without a peer certificate: the mark is ignored",
                header=PEER.decode("ascii"),
            )
        if from_peer:
            request.setHeader(INSTANCE, self._peers.instance)  # which instance answers
            if mark == [PROBE]:
                request.setResponseCode(204)  # a peer's probe: this instance is here
                return b""
            if mark == [STORE] and request.method == b"POST":  # answers a peer just stored
                return self._take(request)
            if mark == [ENTRIES]:  # a peer starting: the answers held here (``Peers.pull``)
                return self._give(request)
            if mark == [TRUST]:  # a peer starting in an outage (``checkin``)
                request.setHeader(_JSON[0], _JSON[1][0])
                window = {
                    "last_successful_checkin": self._cache.last_checkin,
                    "trust_expiration": self._status.trust_expiration,
                }
                return json.dumps(window).encode("ascii")
        if request.method not in METHODS:
            request.setHeader(b"allow", _ALLOW)
            return self._reject(request, 405, "method not relayed")
        if not request.uri.startswith(self._base_url):
            return self._reject(request, 404, f"not under base_url {self._base_url.decode()}")
        rest = request.uri[len(self._base_url) :]
        if not _TARGET.fullmatch(rest):
            return self._reject(request, 400, "malformed request target")
        refused = pathrule.refusal(rest.split(b"?")[0])
        if refused is not None:
            return self._reject(request, 400, refused)
        if any(UNDERSCORE in name for name, _ in request.requestHeaders.getAllRawHeaders()):
            return self._reject(request, 400, "_ in a header name (read as - by many servers)")
        gone: list = []
        request.notifyFinish().addErrback(gone.append)
        done = Deferred.fromCoroutine(self._relay(request, rest, gone, from_peer))
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
        """Take no new request (503: on a connection opened before, since the listener
        is closed; its site closes it after, ``service``); fires once those already in
        flight have answered."""
        self._stopping = True
        for exchange in list(self._background):
            exchange.cancel()  # its client has its answer
        answered = DeferredList(list(self._inflight), consumeErrors=True)
        return answered.addCallback(lambda _: self._peers.stop())

    async def _relay(self, request: IRequest, rest: bytes, gone: list, from_peer: bool) -> None:
        started = self._timers.seconds()
        method = request.method
        headers = Headers(dict(end_to_end(request.requestHeaders, REQUEST_OWN)))
        has_body = request.requestHeaders.hasHeader(
            b"content-length"
        ) or request.requestHeaders.hasHeader(b"transfer-encoding")
        body = request.content.read() if has_body else None
        asked = _Asked(request, gone, method, rest, headers, body, from_peer)
        key = self._key(method, rest, headers)
        entry = self._lookup(key, headers) if self._status.trusted() else None
        known_outage = self._upstream.unavailable()
        if from_peer:
            # The peer's own exchange failed, perhaps after the license server had the request:
            # never sent again (a POST is never sent twice), answered from trust or 502.
            known_outage = _FOR_A_PEER
        if known_outage is not None:
            # No server to ask (see health.py): answered now, logged once per
            # transition, not per request.
            outcome = await self._without_server(asked, key, entry, known_outage)
            self._count(outcome)
            return
        path = request.path.decode("ascii")  # the query may carry secrets: not logged
        exchange = Deferred.fromCoroutine(self._exchange(method, rest, headers, body, key))
        if entry is not None and not exchange.called:
            # A trusted answer exists: never held past answer_within for it.
            bound = self._upstream.health.answer_within
            result = await _within(self._timers, exchange, bound)
            if result is None:
                self._in_background(exchange, method, path, started)
                if not gone:
                    self._answer_failure(request, entry, None)
                self._count(SERVED_FROM_TRUST)
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
        latency = self._timers.seconds() - started
        if isinstance(result, UpstreamFailure):
            entry = self._lookup(key, headers) if self._status.trusted() else None
            outcome = await self._without_server(asked, key, entry, result)
            self._count(outcome)
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
            _write(request, answer.status, _relayed(method, answer), answer.body)
        outcome = UPSTREAM_4XX if 400 <= answer.status < 500 else UPSTREAM_OK
        self._count(outcome)
        self.log.info(
            "relay {method} {path} -> {status} in {ms:.1f} ms; {outcome} (cache: {cache})",
            method=method.decode("ascii"),
            path=path,
            status=answer.status,
            outcome=outcome,
            cache="stored" if cacheable else "not stored",
            ms=latency * 1000,
        )

    def _count(self, outcome: str) -> None:
        """Count a relay's outcome.  An answer from trust while a license server has left
        an exchange unanswered for ``answer_within`` is the vendor's ``TrustBased``: the
        relay failed and a cached answer went out (``Connected`` again when one completes
        within ``answer_within``: see ``Status.succeeded``)."""
        self._metrics.outcomes.labels(outcome).inc()
        if outcome == SERVED_FROM_TRUST and self._upstream.health.slow:
            self._status.failed()

    def _key(self, method: bytes, rest: bytes, headers: Headers) -> str:
        """The cache key of a request the license server is sent with ``headers``:
        a credential the client named in ``Connection`` is not sent, so it must
        not select an answer either."""
        return self._cache.key(method, rest, _credentials(headers, self._key_headers))

    def _lookup(self, key: str, headers: Headers) -> Optional[Entry]:
        """The trusted answer to the request with ``key`` and ``headers``: the one
        for the same values of the headers the answers to ``key`` vary on."""
        return self._cache.lookup(self._cache.variant(key, headers))

    def _store(
        self, key: str, headers: Headers, method: bytes, answer: Answer, age: float = 0.0
    ) -> bool:
        """Keep ``answer`` (given by the license server ``age`` seconds ago) if it may be
        trusted: 2xx (a 3xx is no license), complete, and not ``Vary: *``.  Whether it
        was kept."""
        vary = _vary(answer.headers)
        if not (200 <= answer.status < 300 and answer.complete and vary is not None):
            return False
        stored = _entry(answer, _own(method), self._dates.seconds() - age)
        self._cache.store(self._cache.variant(key, headers, vary), stored)
        return True

    async def _exchange(
        self, method: bytes, rest: bytes, headers: Headers, body: Optional[bytes], key: str
    ):
        """
        The exchange, and what its result changes whether or not a client still
        waits for it: the state, the cache, the latency histogram.  Returns the
        ``UpstreamFailure``, or the answer and whether it was stored.
        """
        started = self._timers.seconds()
        try:
            answer = await self._upstream.exchange(method, rest, headers, body)
        except UpstreamFailure as failure:
            if failure.attempted:  # no server asked: nothing new about the state
                self._metrics.latency.observe(self._timers.seconds() - started)
                self._status.failed()
            return failure
        took = self._timers.seconds() - started
        self._metrics.latency.observe(took)
        self._status.succeeded(late=took >= self._upstream.health.answer_within)
        stored = self._store(key, headers, method, answer)
        if stored:
            self._peers.share(method, rest, headers, answer, self._dates.seconds())
        return answer, stored

    def _take(self, request: IRequest) -> bytes:
        """Keep the answers a peer pushed (``Peers.share``), each as the license server gave
        it, stored when the peer stored it (never later than now), unless this instance holds
        one stored later. 204, or 400 if the push is not one."""
        try:
            pushed = json.loads(request.content.read())
            taken = sum(self._taken(item) for item in pushed)
        except MALFORMED:
            return _error(request, 400, "not a push of answers")
        self._peers.took(request.requestHeaders.getRawHeaders(INSTANCE, [None])[0], taken)
        request.setResponseCode(204)
        return b""

    def _give(self, request: IRequest) -> bytes:
        """A page of the answers held (``Peers.pull``), as JSON lines: first the salt's
        fingerprint and the next page's start (null: the last), then one answer a line, with
        its key and the date it was stored. Only to a peer keying with the same salt: else 409
        and the fingerprint alone (its keys would never match)."""
        memory = self._cache.memory
        fingerprint = memory.fingerprint()
        request.setHeader(b"content-type", b"application/x-ndjson")
        if request.requestHeaders.getRawHeaders(SALT) != [fingerprint.encode("ascii")]:
            request.setResponseCode(409)
            return json.dumps({"salt": fingerprint}).encode("ascii") + b"\n"
        try:
            start = max(0, int(request.args.get(b"from", [b"0"])[0]))
        except ValueError:
            return _error(request, 400, "not a page of entries")
        page = memory.page(start, PAGE)
        lines, size = [], 0
        for key, kept in page:
            if lines and size >= PAGE_BYTES:
                break
            lines.append(
                b'{"key":%s,"stored_at":%s,%s}'
                % (json.dumps(key).encode("ascii"), json.dumps(kept.stored_at).encode(), kept.answer)
            )
            size += len(lines[-1])
        following = start + len(lines) if len(lines) < len(page) or len(page) == PAGE else None
        head = json.dumps({"salt": fingerprint, "next": following}).encode("ascii")
        self._peers.gave(request.requestHeaders.getRawHeaders(INSTANCE, [None])[0], len(lines))
        return b"\n".join([head, *lines]) + b"\n"

    def _taken(self, item: dict) -> bool:
        method = item["method"].encode("latin-1")
        rest = item["target"].encode("latin-1")
        headers = Headers()
        for name, value in item["headers"]:
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        answer_headers = Headers()
        for name, value in item["answer_headers"]:
            answer_headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        answer = Answer(int(item["status"]), answer_headers, base64.b64decode(item["body"]), True)
        stored_at = min(finite(item["stored_at"]), self._dates.seconds())
        key = self._key(method, rest, headers)
        vary = _vary(answer_headers)
        if vary is not None:
            held = self._cache.lookup(self._cache.variant(key, headers, vary))
            if held is not None and held.stored_at >= stored_at:
                return False  # a peer's answer never replaces a newer one
        return self._store(key, headers, method, answer, self._dates.seconds() - stored_at)

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
                ms=(self._timers.seconds() - started) * 1000,
                what=what,
            )

        self._background.add(exchange)
        exchange.addCallback(ended).addErrback(lambda f: f.trap(CancelledError))
        if self._stopping:
            exchange.cancel()  # answered after stop() began: it must not outlive the stop

    async def _without_server(
        self, asked: _Asked, key: str, entry: Optional[Entry], failure: UpstreamFailure
    ) -> str:
        """Answer a request no license server answered: from trust, else with a peer's
        answer (kept here if it may be trusted), else 502.  The outcome."""
        if entry is None and not asked.from_peer:
            answer = await self._peers.ask(asked.method, asked.rest, asked.headers, asked.body)
            if answer is not None:
                self._store(key, asked.headers, asked.method, answer, _age(answer.headers))
                if not asked.gone:
                    _write(asked.request, answer.status, _relayed(asked.method, answer), answer.body)
                return SERVED_BY_PEER
        if not asked.gone:
            self._answer_failure(asked.request, entry, failure)
        if entry is not None and asked.from_peer:
            self._peers.gave(asked.request.requestHeaders.getRawHeaders(INSTANCE, [None])[0])
        return SERVED_FROM_TRUST if entry else UNAVAILABLE

    def _answer_failure(
        self, request: IRequest, entry: Optional[Entry], failure: Optional[UpstreamFailure]
    ) -> None:
        if entry is None:
            message = f"license server unavailable: {failure.reason}"
            retry = str(math.ceil(self._upstream.health.retry_interval)).encode("ascii")
            _write(request, 502, [_JSON, (b"retry-after", [retry])], _error_body(message))
            return
        age = max(0, int(self._dates.seconds() - entry.stored_at))
        headers: dict[bytes, list[bytes]] = {}
        for name, value in entry.headers:
            headers.setdefault(name, []).append(value)
        headers[b"Age"] = [str(age).encode("ascii")]
        _write(request, entry.status, headers.items(), entry.body)


_FOR_A_PEER = UpstreamFailure(
    "license-proxy", "a peer's request is answered from this instance's trust cache only",
    attempted=False,
)


@define
class _Asked:
    """A request as it would be sent on, and whether it came from a peer."""

    request: IRequest
    gone: list  # holds the reason once the client has gone
    method: bytes
    rest: bytes
    headers: Headers
    body: Optional[bytes]
    from_peer: bool


def _age(headers: Headers) -> int:
    """The ``Age`` of an answer a peer gave from its trust cache (0: from the license server)."""
    values = headers.getRawHeaders(b"age", [])
    # A number of seconds a year could hold (Python's int() refuses over 4,300 digits).
    good = len(values) == 1 and values[0].isdigit() and len(values[0]) <= 10
    return int(values[0]) if good else 0


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


def _credentials(headers: Headers, names: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """Each value of each credential header, in the order sent: a repeated header's
    values are not a set (which one counts is the server's business)."""
    return [(name, value) for name in names for value in headers.getRawHeaders(name, [])]


def _vary(headers: Headers) -> Optional[tuple[bytes, ...]]:
    """The request headers the answer's ``Vary`` names (lower case, sorted), or None
    when it can't be cached: ``Vary: *`` (it varies on more than the request) or a
    name that is no header name."""
    names = {
        name.strip().lower()
        for value in headers.getRawHeaders(b"vary", [])
        for name in value.split(b",")
        if name.strip()
    }
    if b"*" in names or not all(TOKEN.fullmatch(name) for name in names):
        return None
    return tuple(sorted(names))


def _own(method: bytes) -> frozenset:
    """Answer headers set again for each message: a HEAD answer has no body, so its
    Content-Length is the upstream's to give (the GET answer's length)."""
    return frozenset() if method == b"HEAD" else _ANSWER_OWN


def _relayed(method: bytes, answer: Answer) -> list[tuple[bytes, list[bytes]]]:
    return end_to_end(answer.headers, _own(method))


def _entry(answer: Answer, own: frozenset, stored_at: float) -> Entry:
    kept = end_to_end(answer.headers, own | _NOT_CACHED)
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
    if request.method != b"HEAD" or not _length(response):
        response.setRawHeaders(b"content-length", [str(len(body)).encode("ascii")])
    request.write(body)
    request.finish()


def _length(headers: Headers) -> bool:
    """Whether ``headers`` hold one well-formed Content-Length (of a HEAD answer)."""
    values = headers.getRawHeaders(b"content-length", [])
    return len(values) == 1 and values[0].isdigit()


_JSON = (b"content-type", [b"application/json"])


def _error(request: IRequest, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(_JSON[0], _JSON[1][0])
    return _error_body(message)


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode("utf-8")

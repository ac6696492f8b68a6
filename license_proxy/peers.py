"""
The other instances (``[peers] urls``, or found by ``[peers] name``: ``discovery``), asked for
an answer this one can't give.

An instance keeps only the answers of the containers that checked in through it, and a load
balancer spreads each container over both instances: the instance restarted with an empty
state, the new one of a blue-green swap, or one that a container happened not to reach since
it started, has no trusted answer for some containers when the license server goes away. When
the other instance goes too, those containers lose their license with the trust window still
open. So a request this instance would answer 502 (no server to ask or none answered, and no
trusted answer here) is sent to each peer in turn; the first trusted answer a peer has is
relayed, and kept here, so the gap does not come back when that peer goes.

A peer is sent the client's own request: its credentials select the answer, so a peer gives
nothing the client could not get from that peer's trust cache. The request carries
``License-Proxy-Peer: ask``, and a peer answers a peer's request carrying the header from its
trust cache only (or 502): it never sends it to the license server, which may have had it
already from this instance (a POST is never sent twice), nor to its own peers (two instances
without the answer end with one 502 each, never a loop). Only a peer's mark is obeyed: the
request must come over a connection with a client certificate chaining to ``[peers] ca_file``
(each instance presents ``[peers] cert_file``); anyone else's mark is ignored and the request
relayed like any other, so no client can have an answer from trust while the license server
answers, nor keep a request from it. Peers are reached directly (never through the forward
proxy: they are neighbours), over TLS verified against ``[peers] ca_file``, within
``answer_within``. A peer that fails (refused, black-holed, TLS) is skipped until a probe
(``License-Proxy-Peer: probe``, answered 204 by the peer's relay itself) finds it back, by the
rules of ``health``; a peer's 502 only means it has no answer either. An instance starting in an
outage asks its peers for their trust window (``License-Proxy-Peer: trust``, ``checkin``), to
start ``TrustBased`` on it.

And each answer the license server gives an instance, once stored, is pushed to its peers
(``share``, ``License-Proxy-Peer: store``): the request as sent (each instance keys it with its
own salt) and the answer with the date it was stored, batched and bounded, so an answer does not
live on one instance only. When the peers share a key salt (``[peers] salt_file``), an instance
starting takes what its peers hold before it tells its state (``pull``, ``License-Proxy-Peer:
entries``, in pages, each answer by key): only from a peer keying with the same salt (their
fingerprints, ``License-Proxy-Salt``, match), since other keys would never match.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections import Counter, deque
from typing import Callable, Optional, Sequence

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IRequest

from .defaults import ANSWER_WITHIN, RETRY_INTERVAL
from .headernames import INSTANCE
from .headernames import PEER as HEADER
from .headernames import SALT
from .health import Health, Server
from .memorycache import Entry, finite
from .pool import RetryingPool
from .tls.contexts import UpstreamTLS
from .upstream import Answer, Upstream, UpstreamFailure

#: ``HEADER``'s values: a request to answer (never passed on), a probe (answered 204), or a
#: request for the peer's trust window (answered with its dates, for a start in an outage).
ASK = b"ask"
PROBE = b"probe"
TRUST = b"trust"
STORE = b"store"  # a push of answers just stored (``share``), answered 204
ENTRIES = b"entries"  # a pull of the answers a peer holds (``pull``), a page at a time

MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError)
"""What reading a peer's message raises when it is not what it should be: bad JSON, a bad
number or base64 (``binascii.Error`` is a ValueError), a member missing or of another type
(text expected, a number found: AttributeError), nesting too deep for the parser."""

PAGE = 200
"""Answers a peer sends per page of a pull: a few hundred kilobytes."""
PAGE_BYTES = 1024 * 1024
"""And about this many bytes at most (answers with large bodies: fewer a page)."""
PAGES = 100
"""Pages asked of a peer at most in one pull: its whole cache at ``[cache] max_entries``'s
default, twice over."""

PUSH_DELAY = 1.0
"""Seconds an answer just stored waits to be pushed to the peers, with those stored meanwhile."""
BATCH = 50
"""Answers pushed at most per peer and ``PUSH_DELAY``: a few kilobytes each."""
BATCH_BYTES = 256 * 1024
"""And about this many bytes at most: well under a peer's ``max_body_size`` (1 MiB by default)."""
OUTBOX = 1000
"""Answers waiting to be pushed at most; beyond, the oldest are dropped (their containers'
next check-in stores and pushes them again)."""


def _pushed(
    method: bytes, rest: bytes, headers: Headers, answer: Answer, stored_at: float
) -> dict:
    """One answer as a push carries it (``Relay._take`` reads it)."""
    return {
        "method": method.decode("latin-1"),
        "target": rest.decode("latin-1"),
        "headers": _pairs(headers),
        "status": answer.status,
        "answer_headers": _pairs(answer.headers),
        "body": base64.b64encode(answer.body).decode("ascii"),
        "stored_at": stored_at,
    }


def _pairs(headers: Headers) -> list[list[str]]:
    return [
        [name.decode("latin-1"), value.decode("latin-1")]
        for name, values in headers.getAllRawHeaders()
        for value in values
    ]


def certified_peer(request: IRequest) -> bool:
    """Whether ``request`` came over TLS with a client certificate: the listener asks for one
    only with ``[peers] ca_file``, and fails the handshake of one not chaining to it
    (``tls.contexts``), so only a peer has one."""
    transport = request.transport
    return ISSLTransport.providedBy(transport) and transport.getPeerCertificate() is not None


@frozen
class PeerRecord:
    """One peer as the status and the metrics show it."""

    url: str
    up: bool
    last_exchange: Optional[float]  # when it last answered (a request, a probe), a date
    received: int  # its answers relayed to this instance's clients
    sent: int  # this instance's answers from trust to its requests


@define
class Peers:
    """The peers: ``[peers] urls``, or those ``discovery`` finds (``use``); none until then."""

    _agent: Optional[IAgent] = None
    _clock: Optional[IReactorTime] = None
    _answer_within: float = ANSWER_WITHIN
    _retry_interval: float = RETRY_INTERVAL
    _pool: Optional[RetryingPool] = None
    #: This instance's id, in its answers to peers and its requests to them: new at each start.
    instance: bytes = field(factory=lambda: secrets.token_hex(16).encode("ascii"))
    _client: Optional[Upstream] = field(default=None, init=False)
    _answered: dict = field(factory=dict, init=False)  # URL -> when it last answered
    _ids: dict = field(factory=dict, init=False)  # URL -> its instance id, once it answered
    # Answers received and sent: asked of a peer (by URL), given to a peer's request (by its
    # id), pushed to a peer (by URL), taken from a peer's push (by its id).
    _received: Counter = field(factory=Counter, init=False)
    _sent: Counter = field(factory=Counter, init=False)
    _pushed: Counter = field(factory=Counter, init=False)
    _took: Counter = field(factory=Counter, init=False)
    _learning: set = field(factory=set, init=False)  # URLs probed for their id now
    _other_salt: set = field(factory=set, init=False)  # URLs said to key with another salt
    #: Found by ``discovery``: a pull waits for its first answer (``use``), not the empty start.
    named: bool = field(default=False, init=False)
    _found: Optional[Deferred] = field(default=None, init=False)
    _outbox: deque = field(factory=lambda: deque(maxlen=OUTBOX), init=False)
    _push_due: Optional[IDelayedCall] = field(default=None, init=False)

    log = Logger()

    @classmethod
    def build(
        cls,
        reactor,
        urls: Sequence[str],
        answer_within: float,
        retry_interval: float,
        tls: UpstreamTLS,
    ) -> Peers:
        """The production client: pooled connections, TLS verified (and this instance's peer
        certificate presented) by ``tls``, direct."""
        pool = RetryingPool(reactor, persistent=True)
        agent = Agent(reactor, contextFactory=tls, connectTimeout=answer_within, pool=pool)
        return cls.using(agent, reactor, urls, answer_within, retry_interval, pool)

    @classmethod
    def using(
        cls,
        agent: IAgent,
        clock: IReactorTime,
        urls: Sequence[str],
        answer_within: float,
        retry_interval: float,
        pool: Optional[RetryingPool] = None,
    ) -> Peers:
        """The peers over ``agent``, each answer awaited ``answer_within``, probed when down."""
        peers = cls(agent, clock, answer_within, retry_interval, pool)
        peers.use(urls)
        return peers

    @property
    def health(self) -> Optional[Health]:
        """The peers' health, None without peers."""
        return None if self._client is None else self._client.health

    def records(self) -> list[PeerRecord]:
        """The peers now, in order, as the status and the metrics show them."""
        servers = [] if self._client is None else self._client.health.servers
        return [
            PeerRecord(
                server.url,
                server.up,
                self._answered.get(server.url),
                self._received[server.url] + self._by_id(self._took, server.url),
                self._pushed[server.url] + self._by_id(self._sent, server.url),
            )
            for server in servers
        ]

    def use(self, urls: Sequence[str]) -> None:
        """Ask these peers from now on, in this order. A peer already known keeps its state (a
        down one stays down until a probe finds it back); a new one starts up."""
        self._use(urls)
        found, self._found = self._found, None
        if found is not None:  # (one a pull gave up, cancelled, ignores it: Twisted's rule)
            found.callback(None)  # a pull waiting for the first lookup goes on (``pull``)

    def _use(self, urls: Sequence[str]) -> None:
        known = {} if self._client is None else {s.url: s for s in self._client.health.servers}
        if self._client is not None:
            self._client.health.stop()
        self._client = None
        # What is kept of peers gone, pods that came and went for days, would only grow.
        for kept in (self._answered, self._ids, self._received, self._pushed):
            for url in set(kept) - set(urls):
                del kept[url]
        for kept in (self._sent, self._took):
            for instance in set(kept) - set(self._ids.values()):
                del kept[instance]
        if not urls:
            return
        health = Health(
            self._clock, self._clock, [known.get(url) or Server(url) for url in urls],
            self._answer_within, self._retry_interval,
            role="peer", down_statuses=frozenset(),
        )
        client = Upstream.using(
            self._agent, self._clock, urls, self._answer_within, self._pool, health
        )
        health.probe_with(lambda index: Deferred.fromCoroutine(self._probe(client, index)))
        self._client = client

    async def identify(self, url: str) -> Optional[bytes]:
        """The id of the instance at ``url`` (its answer to a probe), or None: no answer, or not
        from an instance that took this one for a peer."""
        once = Upstream.using(self._agent, self._clock, [url], self._answer_within)
        try:
            answer = await once.attempt(0, b"GET", b"", self._marked(PROBE), None)
        except UpstreamFailure:
            return None
        self._heard(url, answer)
        ids = answer.headers.getRawHeaders(INSTANCE, [])
        return ids[0] if answer.status == 204 and len(ids) == 1 else None

    async def ask(
        self, method: bytes, rest: bytes, headers: Headers, body: Optional[bytes]
    ) -> Optional[Answer]:
        """The first answer below 500 a usable peer gives to this request (in order), or None.
        (``Upstream.exchange``'s rule, told which peer answered.)"""
        client = self._client
        if client is None:
            return None
        marked = self._marked(ASK, headers)
        for index, server in enumerate(client.health.servers):
            if not client.health.usable(index):
                continue
            try:
                answer = await client.attempt(index, method, rest, marked, body)
            except UpstreamFailure as e:
                # Per request, as the 502 that may follow: not worth a line each (health logs
                # a peer going down; the metric counts the 502s).
                self.log.debug("peer {url}: {failure}", url=server.url, failure=str(e))
                continue
            self._heard(server.url, answer)
            if answer.status < 500:
                self._received[server.url] += 1
                return answer
        return None

    async def trust(self) -> Optional[tuple[float, float]]:
        """The latest-ending trust window a peer holds now: its last successful check-in and
        its trust expiration (dates), or None when no peer answers with one."""
        if self._client is None:
            return None
        best = None
        for index, server in enumerate(self._client.health.servers):
            try:
                answer = await self._client.attempt(index, b"GET", b"", self._marked(TRUST), None)
                window = json.loads(answer.body)
                held = (finite(window["last_successful_checkin"]), finite(window["trust_expiration"]))
                if not 0 <= held[0] <= held[1]:
                    raise ValueError("a check-in before 1970 or after the window's end")
            except (UpstreamFailure, *MALFORMED) as e:
                self.log.info(
                    "peer {url} holds no trust to start from ({why})", url=server.url, why=e
                )
                continue
            self._heard(server.url, answer)
            if held[1] > self._clock.seconds() and (best is None or held[1] > best[1]):
                best = held
        return best

    async def pull(self, fingerprint: str, offer: Callable[[str, Entry], bool]) -> int:
        """Take the answers each usable peer holds, page by page (``offer``: never replacing
        a newer one), from peers keying with the same salt (``fingerprint``) only; how many
        were taken. The caller bounds its time (a dead peer must not hold a start). Peers
        found by DNS: once the first lookup found them."""
        if self.named and self._client is None:
            self._found = Deferred()
            await self._found
        client = self._client
        taken = 0
        for index, server in enumerate([] if client is None else client.health.servers):
            if client.health.usable(index):
                taken += await self._pull_from(client, index, server.url, fingerprint, offer)
        return taken

    async def _pull_from(
        self,
        client: Upstream,
        index: int,
        url: str,
        fingerprint: str,
        offer: Callable[[str, Entry], bool],
    ) -> int:
        marked = self._marked(ENTRIES)
        marked.setRawHeaders(SALT, [fingerprint.encode("ascii")])
        taken, start = 0, 0
        for _ in range(PAGES):
            try:
                answer = await client.attempt(index, b"GET", b"?from=%d" % start, marked, None)
                lines = answer.body.splitlines()
                head = json.loads(lines[0])
                if head["salt"] != fingerprint:
                    if url not in self._other_salt:
                        self._other_salt.add(url)
                        self.log.warn(
                            "peer {url} keys its answers with another salt ([peers] salt_file):"
                            " none taken from it",
                            url=url,
                        )
                    break
                if answer.status != 200:
                    raise ValueError(f"HTTP {answer.status}")
                for line in lines[1:]:
                    item = json.loads(line)
                    taken += offer(str(item["key"]), Entry.from_json(item))
            except (UpstreamFailure, *MALFORMED) as e:
                self.log.info("peer {url}: its answers not taken ({why})", url=url, why=e)
                break
            self._heard(url, answer)
            if not isinstance(head["next"], int):
                break
            start = head["next"]
        self._received[url] += taken
        return taken

    def gave(self, asker: Optional[bytes], count: int = 1) -> None:
        """Answers from trust went to the peer whose id is ``asker``."""
        self._count(self._sent, asker, count)

    def took(self, pusher: Optional[bytes], count: int) -> None:
        """Answers the peer whose id is ``pusher`` pushed were kept here."""
        self._count(self._took, pusher, count)

    def share(
        self, method: bytes, rest: bytes, headers: Headers, answer: Answer, stored_at: float
    ) -> None:
        """An answer the license server gave, just stored here: pushed to every usable peer
        within ``PUSH_DELAY`` (in batches of ``BATCH``; the ``OUTBOX`` latest wait at most)."""
        if self._client is None:
            return
        self._outbox.append((method, rest, headers, answer, stored_at))  # encoded when sent
        if self._push_due is None:
            self._push_due = self._clock.callLater(PUSH_DELAY, self._push)

    def _push(self) -> None:
        self._push_due = None
        client = self._client
        if client is None or not self._outbox:
            return
        batch, size = [], 0
        while self._outbox and len(batch) < BATCH and size < BATCH_BYTES:
            batch.append(_pushed(*self._outbox.popleft()))
            size += len(batch[-1]["body"]) + 1024  # the rest of an item: well under 1 kB
        body = json.dumps(batch).encode("ascii")
        for index, server in enumerate(client.health.servers):
            if client.health.usable(index):
                Deferred.fromCoroutine(self._send(client, index, body, len(batch)))
        if self._outbox:
            self._push_due = self._clock.callLater(PUSH_DELAY, self._push)

    async def _send(self, client: Upstream, index: int, body: bytes, count: int) -> None:
        url = client.health.servers[index].url
        try:
            answer = await client.attempt(index, b"POST", b"", self._marked(STORE), body)
        except UpstreamFailure:
            return  # health has it; the next check-ins are pushed again
        self._heard(url, answer)
        if answer.status == 204:
            self._pushed[url] += count

    def _by_id(self, counts: Counter, url: str) -> int:
        return counts[self._ids[url]] if url in self._ids else 0

    def _count(self, counts: Counter, instance: Optional[bytes], count: int) -> None:
        """Counted by the peer's id. A peer is known by its id once it answered this
        instance: those not yet are probed once, to tell which."""
        if not instance:
            return
        counts[instance] += count
        if self._client is None or instance in self._ids.values():
            return
        for server in self._client.health.servers:
            if server.url not in self._ids and server.url not in self._learning:
                self._learning.add(server.url)
                learnt = Deferred.fromCoroutine(self.identify(server.url))
                learnt.addBoth(lambda _, url=server.url: self._learning.discard(url))

    def _marked(self, mark: bytes, headers: Optional[Headers] = None) -> Headers:
        marked = Headers() if headers is None else headers.copy()
        marked.setRawHeaders(HEADER, [mark])
        marked.setRawHeaders(INSTANCE, [self.instance])
        return marked

    def _heard(self, url: str, answer: Answer) -> None:
        """``url`` answered: when, and which instance it is."""
        self._answered[url] = self._clock.seconds()
        ids = answer.headers.getRawHeaders(INSTANCE, [])
        if len(ids) == 1:
            self._ids[url] = ids[0]

    async def _probe(self, client: Upstream, index: int) -> None:
        url = client.health.servers[index].url
        try:
            self._heard(url, await client.attempt(index, b"GET", b"", self._marked(PROBE), None))
        except UpstreamFailure:
            pass  # health has it

    def stop(self) -> Deferred:
        """No more probes nor pushes; idle connections closed."""
        if self._push_due is not None and self._push_due.active():
            self._push_due.cancel()
        if self._client is not None:
            self._client.health.stop()
        self._client = None
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

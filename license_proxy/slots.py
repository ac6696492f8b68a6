"""
At most ``[license] max_connections`` exchanges with each license server at once.

A fleet that reconnects at once (after a network blip, a swap of instances) must not become
hundreds of simultaneous connections from one address to the license server: that is what a
provider's rate limiter cuts, and what a small airgapped billing container cannot take.  The
bound is Envoy's circuit breakers' (``max_connections``, ``max_pending_requests``), per server.
One exchange holds one connection (HTTP/1.1, no pipelining) and the pool dials only when none
of its idle connections is free, so the connections to a server stay within the bound.

Requests beyond it wait in a queue of ``max_pending``, first come first served, each for
``answer_within`` at most.  One that finds the queue full, or waits that long, gets no exchange
with that server (``Overflow``) and is answered as in an outage (the next server, else from
trust, else 502); both are counted, and logged once per episode, not per request.
"""

from __future__ import annotations

from attrs import define, field
from twisted.internet.defer import DeferredSemaphore, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: ``reason`` label values of ``license_proxy_upstream_overflows_total``.
QUEUE_FULL = "queue_full"
WAITED = "waited"


class Overflow(Exception):
    """No connection for this request; ``str()`` says why, for the 502 and the logs."""


@define
class Slots:
    """The connections to one server: ``size`` at once, ``pending`` more waiting."""

    _timers: IReactorTime  # how long a request waits (the reactor)
    url: str
    size: int
    pending: int
    #: Requests turned away, by reason (``QUEUE_FULL``, ``WAITED``).
    overflows: dict = field(factory=lambda: {QUEUE_FULL: 0, WAITED: 0}, init=False)
    _semaphore: DeferredSemaphore = field(init=False)
    _turned_away: int = field(default=0, init=False)  # in the episode going on (logged)

    log = Logger()

    def __attrs_post_init__(self) -> None:
        self._semaphore = DeferredSemaphore(self.size)

    @property
    def in_use(self) -> int:
        return self.size - self._semaphore.tokens

    @property
    def waiting(self) -> int:
        return len(self._semaphore.waiting)

    async def take(self, wait: float) -> None:
        """One of the connections, within ``wait`` seconds; ``Overflow`` if none.  A
        cancel (a stop) leaves the queue at once."""
        if not self._semaphore.tokens and self.waiting >= self.pending:
            self._overflow(
                QUEUE_FULL, f"{self.size} connections in use and {self.pending} requests waiting"
            )
        taking = self._semaphore.acquire()
        if taking.called:
            return  # one was free: no timer (the common case, on every exchange)
        taking.addTimeout(wait, self._timers)
        try:
            await taking
        except TimeoutError:
            self._overflow(WAITED, f"no connection free within {wait:g} s ({self.size} in use)")

    def give(self) -> None:
        """The exchange that held one has ended."""
        self._semaphore.release()
        if self._turned_away and not self.waiting:
            self.log.info(
                "license server {server_url}: no request waits for a connection any more;"
                " {count} were answered as in an outage meanwhile",
                server_url=self.url,
                count=self._turned_away,
            )
            self._turned_away = 0

    def _overflow(self, reason: str, why: str) -> None:
        self.overflows[reason] += 1
        if not self._turned_away:
            self.log.warn(
                "license server {server_url}: {why}; requests beyond are answered as in an"
                " outage (from trust or 502) until the queue drains ([license] max_connections,"
                " max_pending)",
                server_url=self.url,
                why=why,
            )
        self._turned_away += 1
        raise Overflow(why)

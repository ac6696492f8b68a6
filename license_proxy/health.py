"""
Each license server's health: whether a client should wait for it.

Waiting on a dead server is what an outage costs the fleet, so a server the
proxy has seen fail is not asked again for clients until a background probe
finds it back.  The rules (docs/outages.md):

- **Down** after an exchange ends without a complete answer (connection
  refused or reset, a connection not established within ``answer_within``, a
  DNS or TLS failure, a body cut short, no complete answer within ``timeout``)
  or with an answer 502, 503 or 504.  Any other answer (2xx-4xx, 500, 501)
  proves the server is there: it is **up**.
- While down, a server is skipped: requests go to the next server that is
  usable, or are answered at once (from trust, or 502).  A probe (the
  check-in request) starts every ``retry_interval``, jittered between half of
  it and all of it so a fleet of proxies does not probe in step, one exchange
  at a time (the next starts when a slow one ends, if its time has come);
  its first success marks the server up.
- **Slow is not down.**  While an exchange with a server has been outstanding
  for ``answer_within`` and none with it has completed since that one began,
  the server is *busy*: skipped like a down one, so only the first request
  waits.  Being busy is not a failure: no probe starts, the gauge stays up,
  and when the slow exchange completes well the server is used again; only
  if it then fails (its ``timeout``) is the server down.  The state, though, is
  ``TrustBased`` from the first answer given from trust while an exchange has been
  outstanding for ``answer_within`` (``slow``): the relay failed and the containers are on
  cached answers; an exchange that completes makes it ``Connected`` again.

Nothing here touches the network: ``Upstream`` reports each exchange with
``begin``/``end``, and the probe is a callable given by whoever knows the
check-in request.  The same rules serve the peers (``peers``), with another
``role`` in the logs and no answer that means down: a peer's 502 is its
"I have no answer", not its absence.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: Answers that say the server cannot serve anyone now (RFC 9110 15.6).
DOWN_STATUSES = frozenset({502, 503, 504})


@define
class Server:
    """One ``server_url``, as the proxy last saw it."""

    url: str
    down_since: Optional[float] = None
    last_error: Optional[str] = None  # of the last failed exchange or probe
    last_exchange: Optional[float] = None  # when an exchange or probe last completed (a date)
    _pending: dict = field(factory=dict)  # token -> when the exchange began
    _completed: float = float("-inf")  # when an exchange last completed

    @property
    def up(self) -> bool:
        return self.down_since is None

    def slow(self, now: float, bound: float) -> bool:
        """An exchange outstanding for ``bound``."""
        return any(now - started >= bound for started in self._pending.values())

    def busy(self, now: float, bound: float) -> bool:
        """An exchange outstanding for ``bound``, and none completed since it began."""
        return any(
            started >= self._completed and now - started >= bound
            for started in self._pending.values()
        )


@define
class Health:
    """The servers, in ``server_url`` order, and the rules above."""

    _dates: IReactorTime  # down_since, for the status (``clock``)
    _timers: IReactorTime  # probes, and how long an exchange is outstanding (the reactor)
    servers: Sequence[Server]
    answer_within: float
    retry_interval: float
    _jitter: Callable[[], float] = random.random
    role: str = "license server"  # what the servers are, in the logs
    #: Answers after which a server is down; any other answer proves it is up.
    down_statuses: frozenset = DOWN_STATUSES
    _probe: Optional[Callable[[int], Deferred]] = field(default=None, init=False)
    _scheduled: dict = field(factory=dict, init=False)  # index -> IDelayedCall
    _probing: dict = field(factory=dict, init=False)  # index -> Deferred
    _stopped: bool = field(default=False, init=False)

    log = Logger()

    @classmethod
    def of(
        cls,
        dates: IReactorTime,
        urls: Sequence[str],
        answer_within: float,
        retry_interval: float,
        jitter: Callable[[], float] = random.random,
        timers: Optional[IReactorTime] = None,
        **rules,
    ) -> Health:
        """``timers``: the reactor (None: ``dates``, a test's one clock); ``rules``: ``role``
        and ``down_statuses``, for servers that are not license servers."""
        servers = [Server(url) for url in urls]
        timers = dates if timers is None else timers
        return cls(dates, timers, servers, answer_within, retry_interval, jitter, **rules)

    def usable(self, index: int) -> bool:
        """May a client's request be sent to this server now?"""
        server = self.servers[index]
        return server.up and not server.busy(self._timers.seconds(), self.answer_within)

    @property
    def available(self) -> bool:
        """Is any server usable?"""
        return any(self.usable(i) for i in range(len(self.servers)))

    @property
    def slow(self) -> bool:
        """Has an exchange with a server been outstanding for ``answer_within``?  Then a
        request answered from trust meanwhile was answered so for want of the server."""
        now = self._timers.seconds()
        return any(server.slow(now, self.answer_within) for server in self.servers)

    def why_not(self, index: int) -> str:
        """Why a server is skipped, for the 502's message and the logs."""
        server = self.servers[index]
        if not server.up:
            return f"down since its last failure ({server.last_error})"
        return f"no answer yet to an exchange outstanding for over {self.answer_within:g} s"

    def begin(self, index: int) -> object:
        """An exchange with server ``index`` starts; pass the token to ``end``."""
        token = object()
        self.servers[index]._pending[token] = self._timers.seconds()
        return token

    def end(self, index: int, token: object, failure: Optional[str]) -> None:
        """It completed: ``failure`` None if the server answered (see the
        rules), else why it is down."""
        server = self.servers[index]
        self.abandon(index, token)
        server._completed = self._timers.seconds()
        server.last_exchange = self._dates.seconds()
        if failure is None:
            self._mark_up(index, "it answered")
        else:
            server.last_error = failure
            self._mark_down(index)

    def abandon(self, index: int, token: object) -> None:
        """It was cancelled from outside (a stop): it says nothing of the server."""
        self.servers[index]._pending.pop(token, None)

    def probe_with(self, probe: Callable[[int], Deferred]) -> None:
        """Probe down servers with ``probe(index)`` from now on."""
        self._probe = probe
        for index, server in enumerate(self.servers):
            if not server.up:
                self._schedule(index)

    def stop(self) -> None:
        """No more probes; cancel those waiting or in flight."""
        self._stopped = True
        for timer in list(self._scheduled.values()):
            if timer.active():
                timer.cancel()
        for running in list(self._probing.values()):
            running.cancel()

    def _mark_down(self, index: int) -> None:
        server = self.servers[index]
        if not server.up:
            return
        server.down_since = self._dates.seconds()
        self.log.warn(
            "{role} {server_url} is down ({error}); requests are not sent to it"
            " until a probe succeeds (every {interval:g} s at most)",
            role=self.role,
            server_url=server.url,
            error=server.last_error,
            interval=self.retry_interval,
        )
        self._schedule(index)

    def try_again(self, why: str) -> None:
        """Forget that servers are down (new trust roots may change the
        verdict): the next request asks them again."""
        for index in range(len(self.servers)):
            self._mark_up(index, why)

    def _mark_up(self, index: int, why: str) -> None:
        server = self.servers[index]
        if server.up:
            return
        seconds = self._dates.seconds() - server.down_since
        server.down_since = None
        timer = self._scheduled.pop(index, None)
        if timer is not None and timer.active():
            timer.cancel()
        self.log.info(
            "{role} {server_url} is up again after {seconds:.1f} s down ({why})",
            role=self.role,
            server_url=server.url,
            seconds=seconds,
            why=why,
        )

    def _schedule(self, index: int, spent: float = 0.0) -> None:
        """The next probe, an interval after the last one began (``spent`` ago)."""
        if self._stopped or self._probe is None or index in self._probing:
            return  # a probe in flight schedules the next itself
        delay = max(0.0, self.retry_interval * (0.5 + 0.5 * self._jitter()) - spent)
        self._scheduled[index] = self._timers.callLater(delay, self._run_probe, index)

    def _run_probe(self, index: int) -> None:
        self._scheduled.pop(index, None)
        if self._stopped or self.servers[index].up:
            return
        started = self._timers.seconds()
        running = self._probing[index] = self._probe(index)

        def done(_) -> None:
            del self._probing[index]
            if not self.servers[index].up:
                self._schedule(index, self._timers.seconds() - started)

        running.addBoth(done)

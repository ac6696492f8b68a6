"""
The proxy's state, as the status endpoint reports it (the pages: ``statuspages``).

The state answers one question for operators and probes: would a container
that checks in now be licensed?  It follows the most recent relay or check-in
(``Ready`` before any; an answer from trust while the license server leaves an
exchange unanswered for ``answer_within`` counts as a failed relay, see
``relay``), and is judged against the trust window at the moment it is asked,
so ``TrustBased`` turns into ``Failed`` when the window closes even if nothing
happens in between.

The JSON is compact and on one line, with ``state`` first, because existing
readiness probes grep it: ``'^{.*"state":"\\(Connected\\|TrustBased\\)".*}$'``.
Fields added since the vendor's three come after them: ``state_since``, and
``cache_persisted`` with ``cache_error`` (why the trust cache file cannot be
written, or null), and ``license_servers``: each ``server_url`` with ``up``,
``down_since`` and the ``last_error`` of its last failed exchange or probe; with peers,
``peers``: each peer's ``url``, ``up``, ``last_exchange`` (when it last answered), the
answers ``received`` from it and ``sent`` to it (asked, or pushed).  A cache that cannot be persisted does not change the
state: the answers are in memory and containers are licensed as before; what
is at stake is the next restart, which the two fields tell operators about.

All times are dates from the injected ``dates``, in the service a ``HighWaterClock``
(``clock``): a wall clock set back does not stretch trust.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Optional

from attrs import define, field
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .health import Health
from .trustcache import TrustCache

READY = "Ready"
CONNECTED = "Connected"
TRUST_BASED = "TrustBased"
FAILED = "Failed"


@define
class Status:
    """Outcome of the most recent upstream exchange, judged against the trust window."""

    _dates: IReactorTime  # dates (``clock``); its delayed calls run on the reactor
    _cache: TrustCache
    _duration: float
    _health: Optional[Health] = None
    #: With peers set (``peers.Peers``), listed after the license servers; None without.
    peers: Optional[object] = None
    _last_ok: Optional[bool] = field(default=None, init=False)
    _reported: str = field(default=READY, init=False)
    _since: float = field(init=False)
    _window_closes: Optional[IDelayedCall] = field(default=None, init=False)

    log = Logger()

    def __attrs_post_init__(self) -> None:
        self._since = self._dates.seconds()

    def succeeded(self, late: bool = False) -> None:
        """An exchange completed: a check-in.  A ``late`` one (it took ``answer_within`` or
        more) renews trust but leaves a failed state as it is: while the license server
        answers that slowly, the containers that hold a trusted answer get it instead, so
        the state would otherwise flip at every request."""
        if not (late and self._last_ok is False):
            self._last_ok = True
        self._cache.record_checkin(self._dates.seconds())
        self._report()

    def adopt(self, last_checkin: float, expiration: float) -> None:
        """A peer's trust window, taken at a start in an outage (``checkin``): its last
        check-in, moved earlier if need be so that the window never ends after the peer's, nor
        after this instance's own clock says a window begun now would (a peer's clock ahead)."""
        now = self._dates.seconds()
        self._cache.record_checkin(min(last_checkin, expiration - self._duration, now))
        self.failed()

    def failed(self) -> None:
        self._last_ok = False
        # While trust runs down, the file's high-water mark of the clock must keep up.
        self._cache.record_time()
        self._report()

    def _report(self) -> None:
        """Log each change of state once; leaving ``Connected`` is a warning."""
        old, new = self._reported, self.state
        if old == new:
            return
        self._reported = new
        # TrustBased turns Failed when the window closes, not when someone notices.
        closed = old == TRUST_BASED and new == FAILED
        self._since = self.trust_expiration if closed else self._dates.seconds()
        if self._window_closes is not None and self._window_closes.active():
            self._window_closes.cancel()
        if new == TRUST_BASED:
            # Log the move to Failed when it happens, not at the next event.
            self._window_closes = self._dates.callLater(
                self.trust_expiration - self._dates.seconds(), self._report
            )
        emit = self.log.warn if old == CONNECTED or new == FAILED else self.log.info
        emit(
            "state {old} -> {new} (trust expires {expiration})",
            old=old,
            new=new,
            expiration=rfc3339(self.trust_expiration),
        )

    @property
    def trust_expiration(self) -> Optional[float]:
        last = self._cache.last_checkin
        return None if last is None else last + self._duration

    def trusted(self) -> bool:
        """May a failed request be answered from the cache now?"""
        expiration = self.trust_expiration
        return expiration is not None and self._dates.seconds() < expiration

    @property
    def state(self) -> str:
        if self._last_ok is None:
            return READY
        if self._last_ok:
            return CONNECTED
        return TRUST_BASED if self.trusted() else FAILED

    @property
    def state_since(self) -> float:
        """When the current state began."""
        if self.state != self._reported:
            # The trust window closed since the last relay or check-in.
            return self.trust_expiration
        return self._since

    @property
    def ready(self) -> bool:
        """Are containers being licensed?  What readiness probes ask."""
        return self.state in (CONNECTED, TRUST_BASED)

    def as_json(self) -> bytes:
        report = {
            "state": self.state,
            "last_successful_checkin": rfc3339(self._cache.last_checkin),
            "trust_expiration": rfc3339(self.trust_expiration),
            "state_since": rfc3339(self.state_since),
            "cache_persisted": self._cache.persisted,
            "cache_error": self._cache.write_error,
        }
        if self._health is not None:
            report["license_servers"] = [
                {
                    "server_url": server.url,
                    "up": server.up,
                    "down_since": rfc3339(server.down_since),
                    "last_error": server.last_error,
                }
                for server in self._health.servers
            ]
        if self.peers is not None:
            report["peers"] = [
                {
                    "url": peer.url,
                    "up": peer.up,
                    "last_exchange": rfc3339(peer.last_exchange),
                    "received": peer.received,
                    "sent": peer.sent,
                }
                for peer in self.peers.records()
            ]
        return json.dumps(report, separators=(",", ":")).encode("ascii")


def rfc3339(when: Optional[float]) -> Optional[str]:
    """UTC, microseconds, ``Z``: what the vendor's status endpoint prints."""
    if when is None:
        return None
    moment = datetime.fromtimestamp(when, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

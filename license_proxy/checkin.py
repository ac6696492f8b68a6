"""
The proxy's own check-ins with the license server.

At start a new instance must reach the license server (or still be inside the
trust window of a cache on disk) before it counts as up: that is the vendor's
rule, and what makes blue-green upgrades safe.  Afterwards it checks in every
``checkin_interval`` so the state stays true without client traffic.
"""

from __future__ import annotations

from typing import Optional

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as PullTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from .peers import Peers
from .status import Status, rfc3339
from .trustcache import TrustCache
from .upstream import Answer, Upstream, UpstreamFailure

RETRY_MAX = 5.0
"""Longest pause between start-up attempts, in seconds."""

MIN_ATTEMPT = 1.0
"""Shortest deadline of a start-up attempt, so the last one can still succeed."""

PULL_WITHIN = 5.0
"""Seconds a start waits at most for the peers' answers (``Peers.pull``): a dead or slow peer
must not hold it longer."""

_REJECTED = (401, 403)


class StartupFailed(Exception):
    """The instance must not come up; ``str()`` is the line for the operator."""


@define
class CheckIn:
    _timers: IReactorTime  # the reactor: deadlines and pauses are elapsed time, not dates
    _upstream: Upstream
    _status: Status
    _key: str = field(repr=False)  # never None: a start without a key is refused (config)
    _peers: Peers = field(factory=Peers)  # whose trust a start in an outage may take
    #: The trust cache to fill with the peers' answers before the start is told, when the
    #: peers share the key salt (``[peers] salt_file``); None: no pull.
    _shared: Optional[TrustCache] = None

    log = Logger()

    def _headers(self) -> Headers:
        return Headers({b"authorization": [b"Token " + self._key.encode()]})

    async def _exchange(self, timeout: Optional[float] = None, every: bool = False) -> Answer:
        return await self._upstream.exchange(
            b"GET", b"", self._headers(), None, timeout, every=every
        )

    async def startup(self, timeout: float) -> None:
        """
        Check in until it works, the trust cache on disk covers us, or
        ``timeout`` seconds pass (then raise ``StartupFailed``).
        """
        deadline = self._timers.seconds() + timeout
        pulling = self._pull()
        try:
            await self._check_in(deadline, timeout, pulling)
        finally:
            pulling.cancel()

    def _pull(self) -> Deferred:
        """The peers' answers taken into the trust cache (``Peers.pull``), within
        ``PULL_WITHIN``: fires once done or given up, never fails."""
        if self._shared is None:
            return succeed(None)
        cache = self._shared
        pulling = Deferred.fromCoroutine(
            self._peers.pull(cache.memory.fingerprint(), cache.offer)
        )
        pulling.addTimeout(PULL_WITHIN, self._timers)

        def pulled(taken) -> None:
            self.log.info("took {taken} answers from the peers at start", taken=taken)

        def unfinished(failure) -> None:
            failure.trap(PullTimeout, CancelledError)
            self.log.info(
                "the peers' answers not all taken at start within {within:g} s",
                within=PULL_WITHIN,
            )

        return pulling.addCallbacks(pulled, unfinished)

    async def _check_in(self, deadline: float, timeout: float, pulling: Deferred) -> None:
        """``startup``'s attempts; the state is told only once ``pulling`` is done (a start
        is ready with the peers' answers)."""
        pause = 0.5
        while True:
            try:
                left = deadline - self._timers.seconds()
                # Every server, down or not: nothing probes before the start.
                answer = await self._exchange(max(left, MIN_ATTEMPT), every=True)
            except UpstreamFailure as failure:
                # Still Ready while retrying: a slow start is not yet a failure.
                if self._status.trusted():
                    await pulling
                    self._status.failed()
                    self.log.warn(
                        "license server unreachable at start ({failure}); "
                        "serving from the trust cache until {expiration}",
                        failure=str(failure),
                        expiration=rfc3339(self._status.trust_expiration),
                    )
                    return
                left = deadline - self._timers.seconds()
                if left <= 0:
                    await pulling
                    if await self._from_peers(failure):
                        return
                    raise StartupFailed(
                        f"the license server could not be reached within "
                        f"{timeout:g} s: {failure}"
                    ) from None
                pause = min(pause * 2, RETRY_MAX)
                self.log.info(
                    "license server not reachable yet ({failure}); retrying in {pause:g} s",
                    failure=str(failure),
                    pause=pause,
                )
                await deferLater(self._timers, min(pause, left))
                continue
            if answer.status in _REJECTED:
                raise StartupFailed(
                    f"the license server rejected the key (HTTP {answer.status})"
                )
            await pulling
            self._status.succeeded()
            self.log.info("checked in with the license server: HTTP {status}", status=answer.status)
            return

    async def _from_peers(self, failure: UpstreamFailure) -> bool:
        """Start ``TrustBased`` from the trust a peer holds, if one does (never a window
        ending later than the peer's): a pod rescheduled in an outage serves."""
        window = await self._peers.trust()
        if window is None:
            return False
        self._status.adopt(*window)
        if not self._status.trusted():
            return False
        self.log.warn(
            "license server unreachable at start ({failure}); serving on a peer's trust: last"
            " check-in {last}, until {expiration}",
            failure=str(failure),
            last=rfc3339(window[0]),
            expiration=rfc3339(self._status.trust_expiration),
        )
        return True

    async def periodic(self) -> None:
        """One scheduled check-in; never raises, so the schedule goes on."""
        started = self._timers.seconds()
        try:
            answer = await self._exchange()
        except UpstreamFailure as failure:
            if failure.attempted:  # else no server may be asked now: probes are on it
                self._status.failed()
                self.log.warn("check-in failed: {failure}", failure=str(failure))
            return
        took = self._timers.seconds() - started
        self._checked_in(answer, late=took >= self._upstream.health.answer_within)

    def _checked_in(self, answer: Answer, late: bool = False) -> None:
        self._status.succeeded(late)
        if answer.status in _REJECTED:
            self.log.error(
                "the license server rejected the key (HTTP {status})",
                status=answer.status,
            )

    async def probe(self, index: int) -> None:
        """
        The check-in with server ``index`` alone, while it is down (``Health``
        runs it); its outcome marks the server.  A success is a check-in;
        a failure (no answer, or a 5xx as for any check-in) keeps the state failed
        while no server is usable, and with it the clock's high-water mark moving.
        """
        try:
            answer = await self._upstream.attempt(index, b"GET", b"", self._headers(), None)
        except UpstreamFailure:
            answer = None
        if answer is not None and answer.status < 500:
            self._checked_in(answer)
        elif not self._upstream.health.available:
            self._status.failed()

"""
The time trust is measured in: the wall clock, never running backwards.

A wall clock set back (by hand, by a broken NTP source, by a VM restored from a
snapshot) would otherwise stretch the trust window: an hour back is an hour
more of answers from the cache with nobody checking the license.  So the time
the proxy uses is ``max(wall, last + elapsed since last)``: it follows the wall
clock forwards (a jump forward past the window ends trust, as it should) but
never back, and keeps running at the pace of elapsed time while the wall clock
stands behind.  The trust cache persists the high-water mark, so a restart does
not forget it (``not_before``).

Elapsed time and timers come from the reactor, whose clock the twistd boundary
makes monotonic (``runtime.monotonic_timers``): a deadline, an idle timeout or
the next check-in is not delayed by a wall clock set back either.

So there are two clocks, with two names everywhere: ``dates`` (this class: when an
answer was stored, the last check-in, trust's expiration, what the status shows; its
delayed calls are the reactor's) and ``timers`` (the reactor: deadlines, pauses, and
every duration measured, such as a relay's latency, which a date that jumps must not
inflate).
"""

from __future__ import annotations

from typing import Callable, Optional

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer


@implementer(IReactorTime)
@define
class HighWaterClock:
    """
    ``IReactorTime`` whose ``seconds()`` is the wall clock's high-water mark;
    ``timers`` (the reactor) measures elapsed time and runs the delayed calls.
    """

    _timers: IReactorTime
    _wall: Callable[[], float]
    _last: float = field(init=False)
    _last_elapsed: float = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._last = self._wall()
        self._last_elapsed = self._timers.seconds()

    def not_before(self, mark: Optional[float]) -> None:
        """Never answer earlier than ``mark`` (a time seen before a restart)."""
        if mark is not None and mark > self.seconds():
            self._last = mark

    def seconds(self) -> float:
        elapsed = self._timers.seconds()
        self._last = max(self._wall(), self._last + elapsed - self._last_elapsed)
        self._last_elapsed = elapsed
        return self._last

    def callLater(self, delay, f, *args, **kwargs):
        return self._timers.callLater(delay, f, *args, **kwargs)

    def getDelayedCalls(self):
        return self._timers.getDelayedCalls()

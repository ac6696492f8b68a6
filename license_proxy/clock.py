"""
The time trust is measured in: the wall clock, never running backwards.

A wall clock set back (by hand, by a broken NTP source, by a VM restored from a
snapshot) would otherwise stretch the trust window: an hour back is an hour
more of answers from the cache with nobody checking the license.  So the time
the proxy uses is ``max(wall, last + monotonic elapsed since last)``: it
follows the wall clock forwards (a jump forward past the window ends trust, as
it should) but never back, and keeps running at the monotonic clock's pace
while the wall clock stands behind.  The trust cache persists the high-water
mark, so a restart does not forget it (``not_before``).

Timers still run on the reactor, which counts wall time: a wall clock set back
delays them (Twisted's reactor has no monotonic timers), but every decision
about trust is taken from ``seconds()`` when it is needed, so it stays right.
"""

from __future__ import annotations

from typing import Callable, Optional

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer


@implementer(IReactorTime)
@define
class HighWaterClock:
    """``IReactorTime`` whose ``seconds()`` is the wall clock's high-water mark."""

    _wall: IReactorTime
    _monotonic: Callable[[], float]
    _last: float = field(init=False)
    _last_monotonic: float = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._last = self._wall.seconds()
        self._last_monotonic = self._monotonic()

    def not_before(self, mark: Optional[float]) -> None:
        """Never answer earlier than ``mark`` (a time seen before a restart)."""
        if mark is not None and mark > self.seconds():
            self._last = mark

    def seconds(self) -> float:
        monotonic = self._monotonic()
        self._last = max(self._wall.seconds(), self._last + monotonic - self._last_monotonic)
        self._last_monotonic = monotonic
        return self._last

    def callLater(self, delay, f, *args, **kwargs):
        return self._wall.callLater(delay, f, *args, **kwargs)

    def getDelayedCalls(self):
        return self._wall.getDelayedCalls()

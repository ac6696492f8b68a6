"""
The time trust is measured in, with a wall clock and a monotonic clock injected
apart: a wall clock set back must not stretch trust, a jump forward past the
window must end it, and a restart resumes from the high-water mark on disk.
"""

from __future__ import annotations

import time

import pytest
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from license_proxy import runtime
from license_proxy.clock import HighWaterClock
from license_proxy.status import Status
from license_proxy.cachewriter import FLUSH_DELAY
from license_proxy.trustcache import TrustCache

T0 = 1_800_000_000.0
TRUST = 3600.0
HOUR = 3600.0


class Clocks:
    """A wall clock that can be set anywhere, and the reactor's monotonic one,
    which only advances and runs the timers."""

    def __init__(self, wall: float = T0) -> None:
        self.wall = wall
        self.monotonic = Clock()
        self.monotonic.rightNow = 500.0  # seconds since boot: unrelated to the wall
        self.clock = HighWaterClock(self.monotonic, lambda: self.wall)

    def elapse(self, seconds: float) -> None:
        """Real time passes: both clocks move, and the timers due fire."""
        self.wall += seconds
        self.monotonic.advance(seconds)

    def set_wall(self, when: float) -> None:
        """Someone sets the wall clock; no time passes."""
        self.wall = when


def test_the_wall_clock_is_followed_forwards_but_never_back():
    c = Clocks()
    assert c.clock.seconds() == T0
    c.elapse(10)
    assert c.clock.seconds() == T0 + 10
    c.set_wall(T0 + 10 - HOUR)
    assert c.clock.seconds() == T0 + 10  # never back...
    c.elapse(5)
    assert c.clock.seconds() == T0 + 15  # ...and never standing still
    c.set_wall(T0 + 15 + HOUR)
    assert c.clock.seconds() == T0 + 15 + HOUR  # forwards at once
    c.elapse(1)
    assert c.clock.seconds() == T0 + 16 + HOUR


def test_not_before_raises_the_time_only():
    c = Clocks()
    c.clock.not_before(None)
    c.clock.not_before(T0 - 50)
    assert c.clock.seconds() == T0
    c.clock.not_before(T0 + 100)
    assert c.clock.seconds() == T0 + 100
    c.elapse(1)
    assert c.clock.seconds() == T0 + 101


def trust(c: Clocks, tmp_path) -> tuple[TrustCache, Status]:
    cache = TrustCache.load(c.clock, str(tmp_path / "cache.json"))
    c.clock.not_before(cache.high_water)
    return cache, Status(c.clock, cache, TRUST)


def test_a_wall_clock_set_back_an_hour_does_not_stretch_trust(tmp_path):
    c = Clocks()
    _, status = trust(c, tmp_path)
    status.succeeded()
    c.elapse(60)
    status.failed()
    assert status.state == "TrustBased"
    c.set_wall(T0 + 60 - HOUR)
    c.elapse(TRUST - 61)
    assert status.state == "TrustBased"
    assert status.trusted()
    c.elapse(1)
    assert status.state == "Failed"
    assert not status.trusted()
    # The wall clock still reads an hour before the window closed.
    assert c.wall < status.trust_expiration


def test_timers_run_on_elapsed_time_whatever_the_wall_clock_does(tmp_path):
    c = Clocks()
    _, status = trust(c, tmp_path)
    status.succeeded()
    status.failed()
    c.set_wall(T0 - HOUR)
    with capturedLogs() as events:
        c.elapse(TRUST)  # the window closes: its log line is not an hour late
    assert any("state TrustBased -> Failed" in formatEvent(e) for e in events)
    assert status.state == "Failed"


def test_the_reactor_is_given_a_monotonic_clock_before_anything_is_scheduled():
    reactor = SelectReactor()
    runtime.monotonic_timers(reactor)
    assert reactor.seconds is time.monotonic
    call = reactor.callLater(10, lambda: None)
    assert abs(call.getTime() - (time.monotonic() + 10)) < 1
    call.cancel()


def test_a_reactor_with_timers_already_scheduled_is_left_on_the_wall_clock():
    reactor = SelectReactor()
    call = reactor.callLater(10, lambda: None)
    with capturedLogs() as events:
        runtime.monotonic_timers(reactor)
    assert reactor.seconds() == pytest.approx(time.time(), abs=1)
    assert [formatEvent(e) for e in events] == [
        "1 timer(s) already scheduled: timers stay on the wall clock, and a wall clock set"
        " back delays them"
    ]
    call.cancel()


def test_a_jump_forward_past_the_window_ends_trust(tmp_path):
    c = Clocks()
    _, status = trust(c, tmp_path)
    status.succeeded()
    status.failed()
    c.set_wall(T0 + TRUST + 1)
    assert status.state == "Failed"
    # Setting the wall clock back again does not bring trust back.
    c.set_wall(T0)
    assert status.state == "Failed"


def test_a_restart_resumes_from_the_mark_not_from_a_wall_clock_set_back(tmp_path):
    c = Clocks()
    cache, status = trust(c, tmp_path)
    status.succeeded()
    c.elapse(FLUSH_DELAY)
    c.elapse(HOUR / 2)
    status.failed()  # an outage: the mark keeps up with the time on disk
    c.elapse(FLUSH_DELAY)
    cache.flush()

    # Restarted with the wall clock a day behind, and a fresh monotonic clock.
    after = Clocks(wall=T0 - 86400)
    cache, status = trust(after, tmp_path)
    assert cache.last_checkin == T0
    assert after.clock.seconds() == T0 + HOUR / 2 + 2 * FLUSH_DELAY
    status.failed()
    # Trust runs out half an hour (less the flush lag) after the restart, not a day and a half.
    assert status.trust_expiration - after.clock.seconds() == HOUR / 2 - 2 * FLUSH_DELAY
    after.elapse(HOUR / 2 - 2 * FLUSH_DELAY - 1)
    assert status.state == "TrustBased"
    after.elapse(1)
    assert status.state == "Failed"

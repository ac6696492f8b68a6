"""A fake clock that fails, instead of looping forever, when time stops moving."""

from __future__ import annotations

from twisted.internet.task import Clock


class BoundedClock(Clock):
    """
    ``task.Clock`` whose ``advance`` schedules at most ``limit`` calls: code that keeps
    scheduling calls due now (a retry with no delay) would otherwise spin inside
    ``advance`` for ever, where no test timeout can stop it (a Deferred swallows the
    exception pytest-timeout raises).  The call past the limit raises, which ends the loop,
    and ``advance`` then fails the test.
    """

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__()
        self._limit = limit
        self._budget: int | None = None
        self._overrun = False

    def callLater(self, delay, callable, *args, **kw):
        if self._budget is not None:
            if self._budget <= 0:
                self._overrun = True
                raise RuntimeError(f"more than {self._limit} calls scheduled in one advance")
            self._budget -= 1
        return super().callLater(delay, callable, *args, **kw)

    def advance(self, amount: float) -> None:
        outer = self._budget is None
        if outer:
            self._budget, self._overrun = self._limit, False
        try:
            super().advance(amount)
        finally:
            if outer:
                self._budget = None
        if outer and self._overrun:
            raise AssertionError(
                f"advance({amount}) scheduled more than {self._limit} calls: a loop on the"
                " fake clock (a delay of 0 that repeats?)"
            )

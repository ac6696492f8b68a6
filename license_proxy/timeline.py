"""
The last 24 hours, a sample a minute, for the page at ``/`` (``overview``).

Each minute (``timers``) the state is read from ``Status`` and the relays from the
``license_proxy_relays_total`` counter, whose growth since the last sample is that
minute's relays by outcome.  The ring holds ``SAMPLES`` of them, so its memory is fixed
(about 530 KiB full: ``bench/overview.py``) whatever the traffic, and the relay is not
touched: it counts as it did.  It lives in memory only: a restart starts an empty day (the
trust cache, not this, is what a restart must keep).
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from attrs import define, field
from prometheus_client import Counter
from twisted.internet.interfaces import IReactorTime

from .metrics import OUTCOMES
from .status import Status

EVERY = 60.0
"""Seconds between samples."""

SAMPLES = 1440
"""Samples kept: a day of minutes."""


@define(frozen=True)
class Sample:
    """The minute that ended ``at`` (a date): the state then, and its relays by outcome."""

    at: float
    state: str
    relays: tuple[int, ...]  # in ``OUTCOMES`` order


@define
class Timeline:
    """A bounded ring of ``Sample``s; ``sample`` is called every ``EVERY`` seconds."""

    _dates: IReactorTime  # when each sample was taken (``clock``)
    _status: Status
    _outcomes: Counter  # ``RelayMetrics.outcomes``
    _samples: deque = field(init=False)
    _totals: tuple[int, ...] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._samples = deque(maxlen=SAMPLES)
        self._totals = self._read()

    def sample(self) -> None:
        current = self.current()
        self._totals = self._read()
        self._samples.append(current)

    def current(self) -> Sample:
        """The minute under way, as a sample taken now would be."""
        relays = tuple(now - before for now, before in zip(self._read(), self._totals))
        return Sample(self._dates.seconds(), self._status.state, relays)

    @property
    def samples(self) -> Sequence[Sample]:
        """Oldest first."""
        return tuple(self._samples)

    def _read(self) -> tuple[int, ...]:
        """The counter's totals, in ``OUTCOMES`` order (its public ``collect``)."""
        totals = dict.fromkeys(OUTCOMES, 0)
        for family in self._outcomes.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[sample.labels["outcome"]] = int(sample.value)
        return tuple(totals[outcome] for outcome in OUTCOMES)

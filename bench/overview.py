"""
What the page at ``/`` costs (license_proxy/overview.py, timeline.py): the ring's memory when
full, and the size and render time of the page for the worst day (every outcome, every
minute, in counts that never repeat, so no two bars merge).  In process, on an injected
clock; prints the figures.  ``.venv/bin/python bench/overview.py``
"""

from __future__ import annotations

import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.trial.unittest import SynchronousTestCase  # noqa: E402

from license_proxy.metrics import OUTCOMES  # noqa: E402
from license_proxy.overview import Overview  # noqa: E402
from license_proxy.timeline import EVERY, SAMPLES, Timeline  # noqa: E402
from tests.support.relayharness import TRUST, RelayHarness  # noqa: E402


def main() -> None:
    case = SynchronousTestCase()
    h = RelayHarness(case)
    h.answer(case, h.request())
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    timeline = Timeline(h.clock, h.status, h.metrics.outcomes)
    for minute in range(SAMPLES):
        for n, outcome in enumerate(OUTCOMES):
            h.metrics.outcomes.labels(outcome).inc((minute * 7 + n * 13) % 97 + 1)
        h.clock.advance(EVERY)
        timeline.sample()
    ring = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    overview = Overview(
        h.clock, h.clock, h.status, h.cache, h.upstream.health.servers, timeline, "0.1.0", TRUST
    )
    times = []
    for _ in range(50):
        started = time.perf_counter()
        page = overview.render().encode("utf-8")
        times.append(time.perf_counter() - started)
    print(f"ring of {SAMPLES} samples: {ring / 1024:.0f} KiB")
    print(f"page for the worst day: {len(page)} bytes ({len(page) / 1024:.1f} KiB)")
    print(f"render: median {statistics.median(times) * 1000:.1f} ms,"
          f" max {max(times) * 1000:.1f} ms over {len(times)} renders"
          " (served again for 1 s after each)")


if __name__ == "__main__":
    main()

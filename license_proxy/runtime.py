"""
Collector tuning for the running proxy, applied once it has started.

After start-up the heap holds some 50,000 objects that live as long as the process (modules,
classes, code), and every full run of CPython's cyclic collector walks all of them: about
15 ms during which no request moves, a stall that lands in the latency tail.  Freezing them takes
them out of the collector's sight for good.  The larger first threshold makes young
collections rarer; the collector still runs, so the reference cycles every request leaves
behind (Deferreds, Failures) stay bounded.
"""

from __future__ import annotations

import gc

THRESHOLDS = (2000, 20, 20)


def settle() -> None:
    """Freeze what start-up built and raise the thresholds (call once, when running)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)

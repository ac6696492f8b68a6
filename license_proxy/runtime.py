"""
Process tuning: the open files limit, raised before the listeners open, and the collector,
tuned once the proxy has started.

After start-up the heap holds some 50,000 objects that live as long as the process (modules,
classes, code), and every full run of CPython's cyclic collector walks all of them: about
15 ms during which no request moves, a stall that lands in the latency tail.  Freezing them takes
them out of the collector's sight for good.  The larger first threshold makes young
collections rarer; the collector still runs, so the reference cycles every request leaves
behind (Deferreds, Failures) stay bounded.
"""

from __future__ import annotations

import gc
import resource

from twisted.logger import Logger

THRESHOLDS = (2000, 20, 20)

log = Logger()


def settle() -> None:
    """Freeze what start-up built and raise the thresholds (call once, when running)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def raise_open_files_limit(wanted: int) -> None:
    """
    Raise the soft limit on open files to the hard one, so the listeners' connection limits
    can be reached (a systemd service starts with a soft limit of 1024); warn if the result
    is still below ``wanted``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):  # a seccomp filter or a hard limit we can't reach
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warn(
            "the open files limit is {soft}, below the {wanted} the connection limits allow;"
            " raise it (LimitNOFILE=, ulimit -n) or lower [server] max_connections",
            soft=soft,
            wanted=wanted,
        )

"""
Process tuning: the reactor's clock made monotonic and the open files limit raised, before
anything is scheduled or opened, and the collector, tuned once the proxy has started.

After start-up the heap holds some 50,000 objects that live as long as the process (modules,
classes, code), and every full run of CPython's cyclic collector walks all of them: about
15 ms during which no request moves, a stall that lands in the latency tail.  Freezing them takes
them out of the collector's sight for good.  The larger first threshold makes young
collections rarer; the collector still runs, so the reference cycles every request leaves
behind (Deferreds, Failures) stay bounded.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import time

from twisted.logger import Logger

from .twistedseams import replace_clock

THRESHOLDS = (2000, 20, 20)

log = Logger()


def settle() -> None:
    """Freeze what start-up built and raise the thresholds (call once, when running)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except AttributeError:  # not glibc
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """
    Hand the heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere).  A relay's buffers are freed in the middle of the heap, between objects
    that stay (cached answers), and glibc returns only its top: without this, the
    resident size keeps every peak.  Takes well under a millisecond; the trust cache's
    writer thread calls it after each write.
    """
    if _TRIM is not None:
        _TRIM(0)


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


def monotonic_timers(reactor) -> None:
    """
    Run the reactor's timers on the monotonic clock instead of the wall clock
    (Twisted's default): with the wall clock, setting it back an hour holds every
    delayed call for an hour (the upstream deadline, the listeners' timeouts, the
    periodic check-in, the cache's next write).  Nothing here reads the reactor's
    clock as a date: dates come from ``clock.HighWaterClock``.  Call before
    anything is scheduled; a call already scheduled would be stranded, so then
    the reactor is left as it is, with a warning.
    """
    pending = reactor.getDelayedCalls()
    if pending:
        log.warn(
            "{count} timer(s) already scheduled: timers stay on the wall clock, and a wall"
            " clock set back delays them",
            count=len(pending),
        )
        return
    replace_clock(reactor, time.monotonic)

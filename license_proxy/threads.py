"""
Threads of the service's own, for blocking work (an fsync, a read of a certificate file that
may be a FIFO) that must hold neither the event loop nor a thread of the reactor's pool, which
resolves names.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


def own_thread(reactor, name: str) -> Callable[[Callable[[], object]], Deferred]:
    """Runs functions on a thread named ``name``, one at a time, started with the reactor and
    stopped after the services; a Deferred of each result."""
    pool = ThreadPool(minthreads=0, maxthreads=1, name=name)
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    return partial(deferToThreadPool, reactor, pool)

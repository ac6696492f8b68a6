"""
The trust cache's writer: what changed in memory (``memorycache``) goes to the
files (``cachefile``), coalesced (at most one write every ``FLUSH_DELAY``
seconds, and only when something changed), on a thread of its own
(``writer_thread``): a disk that takes a second to fsync never holds the
reactor, and one write is in flight at most.  What a write costs follows what
changed: a check-in adds one short line, not the whole file.  The first write
after a start, every write once the journal has grown past the snapshot (and
``JOURNAL_MIN``), the first after a failed write and the last one at a stop
(``close``) replace the snapshot; the others append to the journal.

A disk that cannot be written (read-only, full, failing) does not stop the
proxy: it keeps serving from memory, retries (backing off to one attempt every
``RETRY_MAX`` seconds) and says so (``write_error``), until a write succeeds.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import runtime
from .cachefile import CacheFile
from .memorycache import MemoryCache
from .threads import own_thread

FLUSH_DELAY = 2.0
"""Seconds a change may wait before it is written: the bound on how far the
file lags behind memory (plus the write in flight, on a slow disk)."""

RETRY_MAX = 30.0
"""Longest pause, in seconds, between attempts to write while writes fail."""

MARK_LAG = 60.0
"""Seconds the file's high-water mark of the clock may fall behind when nothing
else changes (during an outage): the most a restart with a wall clock set back
can stretch trust by, bought with one write a minute."""

JOURNAL_MIN = 1 << 16
"""Bytes of journal never worth a compaction, however small the snapshot."""

Run = Callable[[Callable[[], object]], Deferred]
"""Runs a write's disk I/O and fires with its result."""


def on_this_thread(work: Callable[[], object]) -> Deferred:
    """Run ``work`` now, on the calling thread: for tools and tests with a fake clock.
    The proxy runs its writes on a thread of their own (``writer_thread``)."""
    return maybeDeferred(work)


def writer_thread(reactor) -> Run:
    """
    Runs the trust cache's writes on a thread of their own (``threads``): a disk that takes
    a second to fsync must not hold the reactor.  Stopped after the services (the last write).
    After each write, the heap's free memory goes back to the system.
    """
    run = own_thread(reactor, "trust-cache-writer")

    def then_release(work: Callable[[], object]) -> object:
        try:
            return work()
        finally:
            runtime.release_free_memory()  # here: off the reactor, every few seconds

    return lambda work: run(partial(then_release, work))


@frozen
class _Write:
    """A write in flight, as its end needs it: the mark written, and whether it
    replaced the snapshot (or appended to the journal)."""

    mark: float
    compaction: bool


@define
class CacheWriter:
    """Writes ``memory`` and the last check-in to ``file``, one write at a time."""

    _dates: IReactorTime  # dates (``clock``); its delayed calls run on the reactor
    file: CacheFile
    _memory: MemoryCache
    #: The last successful check-in, to write with the answers.
    _checkin: Callable[[], Optional[float]]
    #: Runs a write's disk I/O and fires with its result: off the reactor in the proxy.
    _run: Run = on_this_thread
    # Whether the next write replaces the snapshot, its size and the journal's.
    _compact: bool = field(default=True, init=False)
    _snapshot_size: int = field(default=0, init=False)
    _journal_size: int = field(default=0, init=False)
    _journaled: bool = field(default=False, init=False)  # lines after the header?
    _pending: Optional[IDelayedCall] = field(default=None, init=False)
    _dirty: bool = field(default=False, init=False)
    # The write in flight (one at most), whether another must follow it at once, and who
    # waits for the end of the write in flight or of the one to follow.
    _writing: Optional[Deferred] = field(default=None, init=False)
    _again: bool = field(default=False, init=False)
    _ends: list[Deferred] = field(factory=list, init=False)
    _queued: list[Deferred] = field(factory=list, init=False)
    _retry: float = field(default=FLUSH_DELAY, init=False)
    _mark_written: Optional[float] = field(default=None, init=False)
    #: Why the last write failed; None once one succeeds.
    write_error: Optional[str] = field(default=None, init=False)
    write_failures: int = field(default=0, init=False)

    log = Logger()

    @property
    def last_written(self) -> Optional[float]:
        """The date the file last took a write; None before the first since the start."""
        return self._mark_written

    def changed(self) -> None:
        """Something to write: at most ``FLUSH_DELAY`` from now."""
        self._dirty = True
        if self._pending is None:
            self._pending = self._dates.callLater(FLUSH_DELAY, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._pending = None
        self.flush()

    def record_time(self) -> None:
        """Keep the file's high-water mark of the clock within ``MARK_LAG`` of now."""
        written = self._mark_written
        if written is None or self._dates.seconds() - written >= MARK_LAG:
            self.changed()

    @property
    def persisted(self) -> bool:
        """Does the file hold what memory holds, give or take ``FLUSH_DELAY``?"""
        return self.write_error is None

    def flush(self) -> Deferred:
        """
        Write now if anything changed, off the reactor; on failure keep serving from
        memory.  One write at a time: with one in flight, the next starts when it ends.
        Fires when the write it asked for has ended (whether it succeeded or not).
        """
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        ended: Deferred = Deferred()
        if self._writing is not None:
            self._again = True
            self._queued.append(ended)
            return ended
        if not self._dirty:
            return succeed(None)
        write, work = self._prepare()
        self._dirty = False
        self._ends, self._queued = self._queued + [ended], []
        self._writing = self._run(work)
        self._writing.addBoth(self._ended, write)
        return ended

    def _prepare(self) -> tuple[_Write, Callable[[], object]]:
        """
        What to write, taken now on the reactor (cheap: references to bytes kept
        as they will be written); the work, for the writer thread.
        """
        file, checkin, mark = self.file, self._checkin(), self._dates.seconds()
        changes = self._memory.take_changes()  # a snapshot holds them too
        # The thread reads the answers' bytes (never changed: a new answer is a new Kept)
        # and times (a later one read is as good) from dicts the reactor no longer changes.
        if not self._compact:
            return _Write(mark, False), lambda: file.append(changes, checkin, mark)
        salt, kept = self._memory.salt, self._memory.kept()
        return _Write(mark, True), lambda: file.compact(salt, checkin, mark, kept)

    def _ended(self, result, write: _Write) -> None:
        """Back on the reactor after a write: report it, and start the next if one waits."""
        self._writing = None
        again, self._again = self._again, False
        ends, self._ends = self._ends, []
        if isinstance(result, Failure):
            # What the failed write held is still in memory; the next write replaces the
            # snapshot with all of it (and drops whatever part of a line reached the journal).
            self._dirty = self._compact = True
            if result.check(OSError):
                self._failed(result.value.strerror or str(result.value))
            else:
                self.log.failure("writing trust cache {path}", result, path=self.file.path)
                self._failed(result.getErrorMessage())
            again = False
        else:
            if not write.compaction:
                self._journal_size += result
                self._journaled = True
                self._compact = self._journal_size > max(self._snapshot_size, JOURNAL_MIN)
            else:
                self._snapshot_size, self._journal_size = result
                self._journaled = self._compact = False
            if self.write_error is not None:
                self.log.info(
                    "trust cache {path} is written again (it could not be: {reason})",
                    path=self.file.path,
                    reason=self.write_error,
                )
            self.write_error = None
            self._retry = FLUSH_DELAY
            self._mark_written = write.mark
        if again and self._dirty:
            self.flush()
        else:
            ends += self._queued
            self._queued = []
        for d in ends:
            d.callback(None)

    def close(self) -> Deferred:
        """
        At a stop: wait for the write in flight, then write what is left as a new
        snapshot (at rest, the snapshot alone holds everything).  If that fails too, say
        what is lost and stop retrying: no timer is left behind the last write.
        """
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        while self._writing is not None:
            ended: Deferred = Deferred()
            self._ends.append(ended)
            await ended
        self._compact = True  # after the writes in flight, whose ends decide it too
        self._dirty = self._dirty or self._journaled
        await self.flush()
        if self.write_error is None:
            return
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self.log.error(
            "trust cache {path} not written at stop ({reason}): the changes since its last"
            " write are lost",
            path=self.file.path,
            reason=self.write_error,
        )

    def _failed(self, reason: str) -> None:
        """Log a new reason once, and try again later, less often each time."""
        self.write_failures += 1
        if reason != self.write_error:
            self.log.error(
                "cannot write trust cache {path}: {reason}; serving from memory and retrying",
                path=self.file.path,
                reason=reason,
            )
        self.write_error = reason
        self._pending = self._dates.callLater(self._retry, self._scheduled_flush)
        self._retry = min(self._retry * 2, RETRY_MAX)


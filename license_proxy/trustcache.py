"""
The trust cache: the last good answer to each licensing request, and the
time of the last successful check-in, kept in files that survive restarts.

Why files and not memory alone: a restarted proxy must still know how long it
may keep the fleet licensed, and with what answers, while the license server is
away.  Writes are coalesced (at most one every ``FLUSH_DELAY`` seconds, and only
when something changed) and run on a thread of their own (``run``): a disk that
takes a second to fsync never holds the reactor, and one write is in flight at
most.  What a write costs follows what changed: a check-in adds one short line,
not the whole file.

A disk that cannot be written (read-only, full, failing) does not stop the
proxy: it keeps serving from memory, retries (backing off to one attempt every
``RETRY_MAX`` seconds) and says so (``write_error``), until a write succeeds.
The temporary file of a failed write is removed; the snapshot in place is
never touched until its replacement is whole on disk.

The answers themselves, their keys, variants and eviction are ``memorycache``'s;
the files' format, ``cachefile``'s.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

from attrs import Factory, define, field, frozen
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .cachefile import CacheFile
from .durable import Disk
from .memorycache import (  # noqa: F401 (CREDENTIAL_HEADERS, DEFAULT_MAX_ENTRIES: config's)
    CREDENTIAL_HEADERS,
    DEFAULT_MAX_ENTRIES,
    Entry,
    MemoryCache,
    RequestHeaders,
)

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

EVICTION_LOG_INTERVAL = 3600.0
"""Seconds between log lines about a full cache."""


def on_this_thread(work: Callable[[], object]) -> Deferred:
    """Run ``work`` now, on the calling thread: for tools and tests with a fake clock.
    The proxy runs its writes on a thread of their own (``service``)."""
    return maybeDeferred(work)


@frozen
class _Write:
    """A write in flight, as its end needs it: the mark written, and whether it
    replaced the snapshot (or appended to the journal)."""

    mark: float
    compaction: bool


@define
class TrustCache:
    """Cached answers and the last successful check-in, mirrored to ``path``."""

    _dates: IReactorTime  # dates (``clock``); its delayed calls run on the reactor
    _path: str
    #: The answers, their keys and eviction.
    memory: MemoryCache = field(
        default=Factory(lambda self: MemoryCache(self._dates.seconds), takes_self=True)
    )
    last_checkin: Optional[float] = None
    #: The latest time the file shows the clock had reached (None: empty cache).
    high_water: Optional[float] = None
    #: Runs a write's disk I/O and fires with its result: off the reactor in the proxy.
    _run: Callable[[Callable[[], object]], Deferred] = on_this_thread
    #: The system calls writes are made of (a recording or failing one in tests).
    _disk: Disk = field(factory=Disk)
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
    _eviction_logged_at: Optional[float] = field(default=None, init=False)

    log = Logger()

    @classmethod
    def load(
        cls,
        dates: IReactorTime,
        path: str,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        run: Callable[[Callable[[], object]], Deferred] = on_this_thread,
    ) -> TrustCache:
        """The cache the files at ``path`` hold (``CacheFile.load``); ``run`` runs the
        writes (see ``_run``)."""
        found = CacheFile(path).load(dates.seconds, max_entries)
        return cls(
            dates,
            path,
            found.memory,
            last_checkin=found.last_checkin,
            high_water=found.high_water,
            run=run,
        )

    def key(self, method: bytes, target: bytes, credentials: Iterable[tuple[bytes, bytes]]) -> str:
        """The cache key of a request (``MemoryCache.key``)."""
        return self.memory.key(method, target, credentials)

    def variant(
        self, key: str, headers: RequestHeaders, vary: Optional[Sequence[bytes]] = None
    ) -> str:
        """The key of a variant of ``key``'s answer (``MemoryCache.variant``)."""
        return self.memory.variant(key, headers, vary)

    def lookup(self, key: str) -> Optional[Entry]:
        """The answer kept for ``key``, decoded (this is the stale path: rare)."""
        return self.memory.lookup(key)

    def __len__(self) -> int:
        return len(self.memory)

    @property
    def evictions(self) -> int:
        return self.memory.evictions

    def store(self, key: str, entry: Entry) -> None:
        """
        Keep ``entry`` (``MemoryCache.store``); the file learns of it if it is a change.
        A full cache is said now and then, not at each eviction.
        """
        evictions = self.memory.evictions
        if self.memory.store(key, entry):
            self._changed()
        if self.memory.evictions != evictions:
            self._said_full()

    def offer(self, key: str, entry: Entry) -> bool:
        """Keep another instance's ``entry`` if newer than what is held
        (``MemoryCache.offer``); whether it was taken."""
        evictions = self.memory.evictions
        taken = self.memory.offer(key, entry)
        if taken:
            self._changed()
        if self.memory.evictions != evictions:
            self._said_full()
        return taken

    def _said_full(self) -> None:
        now = self._dates.seconds()
        last = self._eviction_logged_at
        if last is None or now - last >= EVICTION_LOG_INTERVAL:
            self._eviction_logged_at = now
            self.log.warn(
                "trust cache is full ({max_entries} answers): each new answer replaces the"
                " one stored longest ago, one-off requests first ({evictions} replaced so far)",
                max_entries=self.memory.max_entries,
                evictions=self.memory.evictions,
            )

    def record_checkin(self, when: float) -> None:
        self.last_checkin = when
        self._changed()

    def _changed(self) -> None:
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
            self._changed()

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
        file, checkin = CacheFile(self._path, self._disk), self.last_checkin
        mark = self._dates.seconds()
        changes = self.memory.take_changes()  # a snapshot holds them too
        # The thread reads the answers' bytes (never changed: a new answer is a new Kept)
        # and times (a later one read is as good) from dicts the reactor no longer changes.
        if not self._compact:
            return _Write(mark, False), lambda: file.append(changes, checkin, mark)
        salt, kept = self.memory.salt, self.memory.kept()
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
                self.log.failure("writing trust cache {path}", result, path=self._path)
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
                    path=self._path,
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
            path=self._path,
            reason=self.write_error,
        )

    def _failed(self, reason: str) -> None:
        """Log a new reason once, and try again later, less often each time."""
        self.write_failures += 1
        if reason != self.write_error:
            self.log.error(
                "cannot write trust cache {path}: {reason}; serving from memory and retrying",
                path=self._path,
                reason=reason,
            )
        self.write_error = reason
        self._pending = self._dates.callLater(self._retry, self._scheduled_flush)
        self._retry = min(self._retry * 2, RETRY_MAX)


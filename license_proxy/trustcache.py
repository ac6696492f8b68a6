"""
The trust cache: the last good answer to each licensing request, and the
time of the last successful check-in, kept in files that survive restarts.

Why files and not memory alone: a restarted proxy must still know how long it
may keep the fleet licensed, and with what answers, while the license server is
away.

This is what the relay, the status and the metrics use; it is made of three
parts: the answers in memory, their keys, variants and eviction
(``memorycache.MemoryCache``: no disk, no Twisted, what a hand-over between
instances uses); the files' format (``cachefile.CacheFile``); and the writer
(``cachewriter.CacheWriter``: coalescing, backoff, the writer thread, the last
write at a stop).  What stays here is what joins them: a change in memory is
a write to come, and a full cache is said in the log now and then.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from attrs import Factory, define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .cachefile import CacheFile
from .cachewriter import CacheWriter, Run, on_this_thread
from .defaults import DEFAULT_MAX_ENTRIES
from .durable import Disk
from .memorycache import Entry, MemoryCache, RequestHeaders, shared_salt

EVICTION_LOG_INTERVAL = 3600.0
"""Seconds between log lines about a full cache."""


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
    _run: Run = on_this_thread
    #: The system calls writes are made of (a recording or failing one in tests).
    _disk: Disk = field(factory=Disk)
    #: The files, their directory held open since they were read (see ``durable.Directory``).
    _file: CacheFile = field(
        default=Factory(lambda self: CacheFile(self._path, self._disk), takes_self=True)
    )
    #: Writes the answers and the times to the files at ``path``.
    writer: CacheWriter = field(init=False)
    _eviction_logged_at: Optional[float] = field(default=None, init=False)

    log = Logger()

    def __attrs_post_init__(self) -> None:
        self.writer = CacheWriter(
            self._dates, self._file, self.memory, lambda: self.last_checkin, self._run
        )

    @classmethod
    def load(
        cls,
        dates: IReactorTime,
        path: str,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        run: Run = on_this_thread,
        salt: Optional[bytes] = None,
    ) -> TrustCache:
        """The cache the files at ``path`` hold (``CacheFile.load``); ``run`` runs the
        writes (see ``_run``). With ``salt`` (``[peers] salt_file``, shared by the peers),
        the answers are keyed with a salt derived from it (``shared_salt``): those of a file
        keyed with another can't be found under it, so they are dropped (said once), the times
        kept; the first write replaces the file's salt."""
        file = CacheFile(path)
        found = file.load(dates.seconds, max_entries)
        memory = found.memory
        salt = None if salt is None else shared_salt(salt)
        if salt is not None and memory.salt != salt:
            if len(memory):
                cls.log.warn(
                    "trust cache {path}: its {count} answers are keyed with another salt than"
                    " the peers' shared one; starting without them (the peers' are taken)",
                    path=path,
                    count=len(memory),
                )
            memory = MemoryCache(dates.seconds, salt=salt, max_entries=max_entries)
        return cls(
            dates,
            path,
            memory,
            last_checkin=found.last_checkin,
            high_water=found.high_water,
            run=run,
            file=file,
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
            self.writer.changed()
        if self.memory.evictions != evictions:
            self._said_full()

    def offer(self, key: str, entry: Entry) -> bool:
        """Keep another instance's ``entry`` if newer than what is held
        (``MemoryCache.offer``); whether it was taken."""
        evictions = self.memory.evictions
        taken = self.memory.offer(key, entry)
        if taken:
            self.writer.changed()
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
        self.writer.changed()

    def record_time(self) -> None:
        """Keep the file's high-water mark of the clock within ``MARK_LAG`` of now."""
        self.writer.record_time()

    @property
    def persisted(self) -> bool:
        """Does the file hold what memory holds, give or take ``FLUSH_DELAY``?"""
        return self.writer.persisted

    @property
    def write_error(self) -> Optional[str]:
        """Why the last write failed; None once one succeeds."""
        return self.writer.write_error

    @property
    def write_failures(self) -> int:
        return self.writer.write_failures

    @property
    def last_written(self) -> Optional[float]:
        """When the file last took a write (a date); None before the first since the start."""
        return self.writer.last_written

    def flush(self) -> Deferred:
        """Write now if anything changed (``CacheWriter.flush``)."""
        return self.writer.flush()

    def close(self) -> Deferred:
        """At a stop: the last write (``CacheWriter.close``)."""
        return self.writer.close()

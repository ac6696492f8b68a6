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

The files (JSON, readable and backed up with standard tools):

``PATH`` (``trust-cache.json``), the snapshot, replaced whole (temporary file,
fsync, rename, fsync of the directory) so a crash leaves the old one or the new::

    {"format":1,"generation":"<id>","last_successful_checkin":T,
     "clock_high_water":T,"salt":"<hex>",
     "entries":{"<key>":{"status":200,"headers":[["<b64>","<b64>"]],
                         "body":"<b64>","stored_at":T}, ...}}

``PATH.journal``, what changed since, one JSON object a line, appended and
fsynced; its first line names the snapshot it follows::

    {"journal":"<id>"}
    {"store":"<key>","status":200,"headers":[...],"body":"<b64>","stored_at":T}
    {"evict":"<key>"}
    {"last_successful_checkin":T,"clock_high_water":T}

Loading reads the snapshot, then replays the journal if its id is the
snapshot's ``generation`` (a journal of another generation is left over from a
crash between the two renames of a compaction: the snapshot already holds it),
up to its first line that cannot be read (a write cut short).  The first write
after a start, every write once the journal has grown past the snapshot (and
``JOURNAL_MIN``), the first after a failed write and the last one at a stop
compact: a new snapshot from memory, then an empty journal naming it.  A file
without ``generation`` (written before the journal existed) loads as before;
an older version reads the snapshot alone.

A disk that cannot be written (read-only, full, failing) does not stop the
proxy: it keeps serving from memory, retries (backing off to one attempt every
``RETRY_MAX`` seconds) and says so (``write_error``), until a write succeeds.
The temporary file of a failed write is removed; the snapshot in place is
never touched until its replacement is whole on disk.

The file also keeps the high-water mark of the proxy's clock (see ``clock``),
so that a wall clock set back while the proxy was down cannot stretch trust.
Its size is bounded (``max_entries``): a client varying its query string adds
an entry per request.  When full, the answer stored longest ago makes room,
taken first among those not yet kept: an answer is kept once it is stored again
``keep_after`` (a check-in interval) or more after it was first stored.  A fleet
stores its own again at every check-in, so a flood of one-off requests (each sent
twice in a row, too) evicts its own kind (answers read from the file count as kept).

Each answer is kept in memory as the JSON it is written as, and decoded only
when it is served from trust: the common path stores, and rarely reads.

Requests are keyed by an HMAC over method, path, query and credentials, with a
random salt kept in the file: credentials never reach the disk in clear, and
one licensee's answer is never returned to another.  An answer whose ``Vary``
names request headers is kept under a variant of that key (``variant``) that
adds their values; the key string names those headers, so the file alone says
which headers a later request's lookup must add.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
from typing import Callable, Iterable, Iterator, Optional, Sequence

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from .defaults import DEFAULT_MAX_ENTRIES
from .durable import Disk, append, remove_leftovers, write_atomically

FLUSH_DELAY = 2.0
"""Seconds a change may wait before it is written: the bound on how far the
file lags behind memory (plus the write in flight, on a slow disk)."""

RETRY_MAX = 30.0
"""Longest pause, in seconds, between attempts to write while writes fail."""


MARK_LAG = 60.0
"""Seconds the file's high-water mark of the clock may fall behind when nothing
else changes (during an outage): the most a restart with a wall clock set back
can stretch trust by, bought with one write a minute."""

STORED_AT_LAG = 300.0
"""Seconds the time of an answer stored again unchanged may lag on disk: the
same answer is journaled again only once the time on disk is this old, so a
fleet checking in every minute does not write every answer every minute (after
a restart, its ``Age`` may read up to this much too old)."""

SHARED_ANSWERS = 16
"""Distinct answers remembered, so that an answer equal to one of them is kept once: a
fleet whose requests differ (by instance, by query) often gets the same answer to each."""

JOURNAL_MIN = 1 << 16
"""Bytes of journal never worth a compaction, however small the snapshot."""

EVICTION_LOG_INTERVAL = 3600.0
"""Seconds between log lines about a full cache."""

LATEST_TIME = 253402300799.0
"""9999-12-31T23:59:59Z, the latest time ``datetime`` (hence the status) can show."""

FORMAT = 1
"""The snapshot's format: ``generation`` and the journal beside it came later,
and a reader that knows nothing of them still reads the snapshot."""

JOURNAL = ".journal"
"""The journal is ``path + JOURNAL``."""

DEFAULT_KEEP_AFTER = 60.0
"""Seconds between two stores of an answer for it to count as kept (the check-in interval)."""

_VARIANT = ";"
"""Separates a key, the names its answer varies on, and their values' HMAC (no header name
holds it)."""


@frozen
class Entry:
    """One cached answer, as the upstream gave it."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    stored_at: float

    @classmethod
    def from_json(cls, obj: dict) -> Entry:
        return cls(
            status=int(obj["status"]),
            headers=tuple((_unb64(n), _unb64(v)) for n, v in obj["headers"]),
            body=_unb64(obj["body"]),
            stored_at=float(obj["stored_at"]),
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _answer(entry: Entry) -> bytes:
    """The answer's JSON members, without braces or time: as it is kept and written."""
    text = json.dumps(
        {
            "status": entry.status,
            "headers": [[_b64(n), _b64(v)] for n, v in entry.headers],
            "body": _b64(entry.body),
        },
        separators=(",", ":"),
    )
    return text[1:-1].encode("ascii")


@define(weakref_slot=False)
class _Kept:
    """An answer in memory: its JSON, when it was stored, and the time the disk has."""

    answer: bytes
    stored_at: float
    on_disk: float

    def entry(self) -> Entry:
        obj = json.loads(b"{" + self.answer + b"}")
        return Entry.from_json({**obj, "stored_at": self.stored_at})


def _time(value) -> bytes:
    """A time (or a key) as JSON."""
    return json.dumps(value).encode("ascii")


def _snapshot(head: bytes, entries: dict[str, _Kept]) -> Iterator[bytes]:
    """The snapshot's JSON, in pieces."""
    yield head
    separator = b""
    for key, kept in entries.items():
        yield b'%s%s:{%s,"stored_at":%s}' % (
            separator,
            _time(key),
            kept.answer,
            _time(kept.stored_at),
        )
        separator = b","
    yield b"}}"


def _lines(changes: dict[str, Optional[_Kept]], times: bytes) -> Iterator[bytes]:
    """Journal lines: each answer stored or evicted, then the times."""
    for key, kept in changes.items():
        if kept is None:
            yield b'{"evict":%s}\n' % _time(key)
        else:
            yield b'{"store":%s,%s,"stored_at":%s}\n' % (
                _time(key),
                kept.answer,
                _time(kept.stored_at),
            )
    yield times


def compact(
    path: str, generation: str, snapshot: Iterable[bytes], disk: Disk = Disk()
) -> tuple[int, int]:
    """
    Replace the snapshot, then start an empty journal naming it; returns both sizes.
    A crash between the two leaves a journal of another generation, which loading ignores.
    """
    size = write_atomically(path, snapshot, disk)
    header = b'{"journal":"%s"}\n' % generation.encode("ascii")
    write_atomically(path + JOURNAL, [header], disk)
    return size, len(header)


def on_this_thread(work: Callable[[], object]) -> Deferred:
    """Run ``work`` now, on the calling thread: for tools and tests with a fake clock.
    The proxy runs its writes on a thread of their own (``service``)."""
    return maybeDeferred(work)


class CorruptCache(Exception):
    """The cache file exists but cannot be used."""


@frozen
class _Write:
    """A write in flight, as its end needs it: the mark written, and for a compaction
    the new snapshot's generation (None: an append to the journal)."""

    mark: float
    generation: Optional[str]


@define
class TrustCache:
    """Cached answers and the last successful check-in, mirrored to ``path``."""

    _dates: IReactorTime  # dates (``clock``); its delayed calls run on the reactor
    _path: str
    _salt: bytes = field(factory=lambda: secrets.token_bytes(16))
    last_checkin: Optional[float] = None
    # In the order they were stored: the first is the one stored longest ago.
    _entries: dict[str, _Kept] = field(factory=dict)
    max_entries: int = DEFAULT_MAX_ENTRIES
    #: Seconds after its first store that a new store of an answer makes it kept.
    keep_after: float = DEFAULT_KEEP_AFTER
    #: The latest time the file shows the clock had reached (None: empty cache).
    high_water: Optional[float] = None
    #: Runs a write's disk I/O and fires with its result: off the reactor in the proxy.
    _run: Callable[[Callable[[], object]], Deferred] = on_this_thread
    #: The system calls writes are made of (a recording or failing one in tests).
    _disk: Disk = field(factory=Disk)
    # Keys not yet kept, oldest first, with the time of their first store: evicted before
    # the answers a fleet keeps asking for, so a flood of one-off requests cannot push those out.
    _once: dict[str, float] = field(factory=dict, init=False)
    # Key -> the request headers its latest answer varied on (from the variant keys), and
    # how many variants of it are kept: forgotten with the last, so a flood of answers
    # with Vary can't grow it past max_entries.
    _varies: dict[str, tuple[bytes, ...]] = field(factory=dict, init=False)
    _variants: dict[str, int] = field(factory=dict, init=False)
    # The answers stored last, each its own key: a new one equal to one of these is kept
    # as the same bytes (see ``SHARED_ANSWERS``).
    _recent: dict[bytes, bytes] = field(factory=dict, init=False)
    # Answers stored (or evicted: None) since the last write: the journal's next lines.
    _changes: dict[str, Optional[_Kept]] = field(factory=dict, init=False)
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
    evictions: int = field(default=0, init=False)
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
        """
        Read the snapshot and its journal (on this thread: nothing is served yet).  A
        missing file starts an empty cache; an unusable one is logged once, moved aside
        (so nobody loses it) and replaced.  Temporary files left by a crash inside a
        write are removed.  ``run`` runs the writes (see ``_run``).
        """
        for name in remove_leftovers(path) + remove_leftovers(path + JOURNAL):
            cls.log.info("removed {name}, left by a process stopped inside a write", name=name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return cls(dates, path, max_entries=max_entries, run=run)
        except OSError as e:
            cls.log.error(
                "trust cache {path} cannot be read ({reason}); starting without it",
                path=path,
                reason=e.strerror,
            )
            return cls(dates, path, max_entries=max_entries, run=run)
        try:
            return cls._parse(dates, path, raw, max_entries, run)
        except CorruptCache as e:
            aside = f"{path}.corrupt-{int(dates.seconds())}"
            try:
                os.replace(path, aside)
                where = f"moved aside to {aside}"
            except OSError as move:
                where = f"could not be moved aside: {move.strerror}"
            cls.log.error(
                "trust cache {path} is corrupt ({reason}); {where}; starting without it",
                path=path,
                reason=str(e),
                where=where,
            )
            return cls(dates, path, max_entries=max_entries, run=run)

    @classmethod
    def _parse(
        cls, dates: IReactorTime, path: str, raw: bytes, max_entries: int, run
    ) -> TrustCache:
        try:
            obj = json.loads(raw)
            if obj.get("format") != FORMAT:
                raise CorruptCache(f"unknown format {obj.get('format')!r}")
            salt = bytes.fromhex(obj["salt"])
            checkin = obj["last_successful_checkin"]
            checkin = None if checkin is None else float(checkin)
            found = {_ascii(k): Entry.from_json(v) for k, v in obj["entries"].items()}
            # Files written before the mark existed: the times in them were seen too.
            seen = [float(obj.get("clock_high_water") or 0), checkin or 0]
            _finite(seen + [entry.stored_at for entry in found.values()])
            generation = obj.get("generation")
        except CorruptCache:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
            raise CorruptCache(f"{type(e).__name__}: {e}") from None
        if generation is not None:
            checkin = cls._replay(path + JOURNAL, str(generation), found, seen, checkin)
        entries = sorted(found.items(), key=lambda item: item[1].stored_at)
        seen += [entry.stored_at for _, entry in entries]
        if len(entries) > max_entries:
            cls.log.info(
                "trust cache {path} holds {count} answers, more than [cache] max_entries;"
                " keeping the {max_entries} stored last",
                path=path,
                count=len(entries),
                max_entries=max_entries,
            )
            entries = entries[len(entries) - max_entries :]
        cache = cls(
            dates,
            path,
            salt=salt,
            last_checkin=checkin,
            max_entries=max_entries,
            high_water=max(seen) or None,
            run=run,
        )
        for key, entry in entries:
            cache._entries[key] = _Kept(cache._shared(_answer(entry)), *[entry.stored_at] * 2)
            cache._remember_variant(key, new=True)
        return cache

    @classmethod
    def _replay(
        cls,
        journal: str,
        generation: str,
        entries: dict[str, Entry],
        seen: list[float],
        checkin: Optional[float],
    ) -> Optional[float]:
        """
        Apply the journal that follows the snapshot of ``generation`` to what it holds;
        returns the last check-in.  A journal of another generation is ignored, and so is
        what follows a line that cannot be read (a write cut short).
        """
        try:
            with open(journal, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return checkin
        except OSError as e:
            cls.log.error(
                "trust cache journal {path} cannot be read ({reason}); starting without it",
                path=journal,
                reason=e.strerror,
            )
            return checkin
        try:
            if json.loads(lines[0]) != {"journal": generation}:
                return checkin
        except ValueError:
            return checkin
        # The last piece follows the last newline: empty unless a line was cut short.
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
                if "store" in record:
                    key = _ascii(record.pop("store"))
                    entry = Entry.from_json(record)
                    _finite([entry.stored_at])
                    entries.pop(key, None)
                    entries[key] = entry
                elif "evict" in record:
                    entries.pop(record["evict"], None)
                else:
                    times = [float(record["clock_high_water"])]
                    last = record["last_successful_checkin"]
                    if last is not None:
                        times.append(float(last))
                    _finite(times)
                    seen += times
                    checkin = checkin if last is None else max(checkin or 0, float(last))
            except (CorruptCache, ValueError, KeyError, TypeError, AttributeError, OverflowError):
                if line or number != len(lines):
                    cls.log.info(
                        "trust cache journal {path}: line {number} cannot be read (a write"
                        " cut short); what follows it is ignored",
                        path=journal,
                        number=number,
                    )
                break
        return checkin

    def key(
        self,
        method: bytes,
        target: bytes,
        credentials: Iterable[tuple[bytes, bytes]],
    ) -> str:
        """
        The cache key of a request: method, path and query (``target``), and
        the credential headers, in the order given (the caller's: names in a
        fixed order, each name's values as sent).  The body is not part of it:
        the licensing protocol is not public, and a body that carries a
        timestamp or a usage counter would never match again.
        """
        mac = hmac.new(self._salt, digestmod=hashlib.sha256)
        for part in (method, target):
            mac.update(len(part).to_bytes(4, "big") + part)
        for name, value in credentials:
            mac.update(len(name).to_bytes(4, "big") + name)
            mac.update(len(value).to_bytes(4, "big") + value)
        return mac.hexdigest()

    def variant(
        self, key: str, headers: Headers, vary: Optional[Sequence[bytes]] = None
    ) -> str:
        """
        The key, under ``key``, of the answer to a request with ``headers`` when
        answers vary (``Vary``) on the request headers ``vary`` (lower case,
        sorted): the answer's, at a store; at a lookup (None), those the latest
        answer stored for ``key`` varied on.  ``key`` itself when there are none.
        """
        names = self._varies.get(key, ()) if vary is None else tuple(vary)
        if not names:
            return key
        mac = hmac.new(self._salt, key.encode("ascii"), digestmod=hashlib.sha256)
        for name in names:
            values = headers.getRawHeaders(name)
            mac.update(b"-" if values is None else len(values).to_bytes(4, "big"))
            for value in values or ():
                mac.update(len(value).to_bytes(4, "big") + value)
        listed = b",".join(names).decode("ascii")
        return f"{key}{_VARIANT}{listed}{_VARIANT}{mac.hexdigest()}"

    def _remember_variant(self, key: str, new: bool) -> None:
        primary, _, rest = key.partition(_VARIANT)
        if not rest:
            self._varies.pop(primary, None)
            return
        listed = rest.partition(_VARIANT)[0]
        self._varies[primary] = tuple(n.encode("ascii") for n in listed.split(","))
        if new:
            self._variants[primary] = self._variants.get(primary, 0) + 1

    def _forget_variant(self, key: str) -> None:
        primary, _, rest = key.partition(_VARIANT)
        if rest:
            self._variants[primary] -= 1
            if not self._variants[primary]:
                del self._variants[primary]
                self._varies.pop(primary, None)

    def lookup(self, key: str) -> Optional[Entry]:
        """The answer kept for ``key``, decoded (this is the stale path: rare)."""
        kept = self._entries.get(key)
        return None if kept is None else kept.entry()

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, key: str, entry: Entry) -> None:
        """
        Keep ``entry``, last in line for eviction; the file learns of it only if
        the answer changed, or its time on disk is ``STORED_AT_LAG`` old.
        """
        now = self._dates.seconds()
        old = self._entries.pop(key, None)
        if old is None and len(self._entries) >= self.max_entries:
            self._evict()
        if old is None:
            self._once[key] = now
        elif now - self._once.get(key, now) >= self.keep_after:
            self._once.pop(key)  # asked for again a check-in later: kept
        self._remember_variant(key, new=old is None)
        answer = self._shared(_answer(entry))
        if old is not None and old.answer == answer:
            kept = self._entries[key] = old
            kept.stored_at = entry.stored_at
            if entry.stored_at - kept.on_disk < STORED_AT_LAG:
                return
        else:
            kept = self._entries[key] = _Kept(answer, entry.stored_at, entry.stored_at)
        kept.on_disk = entry.stored_at
        self._changes[key] = kept
        self._changed()

    def _shared(self, answer: bytes) -> bytes:
        """``answer``, or the same bytes stored recently (kept once in memory)."""
        recent = self._recent
        found = recent.pop(answer, None)
        if found is None:
            found = answer
            if len(recent) >= SHARED_ANSWERS:
                del recent[next(iter(recent))]
        recent[found] = found
        return found

    def _evict(self) -> None:
        """
        Drop the answer stored longest ago among those not yet kept, if any,
        else among all; say so now and then, not each time.
        """
        oldest = next(iter(self._once or self._entries))
        del self._entries[oldest]
        self._once.pop(oldest, None)
        self._forget_variant(oldest)
        self._changes[oldest] = None  # the journal says it is gone
        self.evictions += 1
        now = self._dates.seconds()
        last = self._eviction_logged_at
        if last is None or now - last >= EVICTION_LOG_INTERVAL:
            self._eviction_logged_at = now
            self.log.warn(
                "trust cache is full ({max_entries} answers): each new answer replaces the"
                " one stored longest ago, one-off requests first ({evictions} replaced so far)",
                max_entries=self.max_entries,
                evictions=self.evictions,
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
        self._changes = {}
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
        path, disk, mark = self._path, self._disk, self._dates.seconds()
        # The thread reads the answers' bytes (never changed: a new answer is a new _Kept)
        # and times (a later one read is as good) from dicts the reactor no longer changes.
        if not self._compact:
            changes = self._changes  # flush() starts the next
            times = b'{"last_successful_checkin":%s,"clock_high_water":%s}\n' % (
                _time(self.last_checkin),
                _time(mark),
            )
            return _Write(mark, None), lambda: append(path + JOURNAL, _lines(changes, times), disk)
        generation = secrets.token_hex(8)
        head = {
            "format": FORMAT,
            "generation": generation,
            "last_successful_checkin": self.last_checkin,
            "clock_high_water": mark,
            "salt": self._salt.hex(),
        }
        opening = json.dumps(head, separators=(",", ":"))[:-1].encode("ascii") + b',"entries":{'
        snapshot = _snapshot(opening, self._entries.copy())
        return _Write(mark, generation), lambda: compact(path, generation, snapshot, disk)

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
            if write.generation is None:
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


def _ascii(key: str) -> str:
    """A key as this module makes them (hex digests, header names): anything else in
    the file is corruption, found at load rather than when a variant reads it."""
    key.encode("ascii")
    return key


def _finite(times: Iterable[float]) -> None:
    """The mark becomes the clock's floor: a time past what a date can show would make
    every status page and state log fail, for good (the mark is rewritten)."""
    if not all(math.isfinite(t) and t <= LATEST_TIME for t in times):
        raise CorruptCache("a time that is not a finite number before the year 10000")

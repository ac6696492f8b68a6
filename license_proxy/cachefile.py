"""
The trust cache's files, over ``durable.Disk``: what ``MemoryCache`` holds, the
last successful check-in and the clock's high-water mark, as a snapshot and a
journal; loading them (migrating older files, moving a corrupt one aside), and
the two writes the writer (``cachewriter``) makes of them.

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

A file also keeps the high-water mark of the proxy's clock (see ``clock``), so
that a wall clock set back while the proxy was down cannot stretch trust.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from typing import Callable, Iterable, Iterator, Optional

from attrs import define, field, frozen
from twisted.logger import Logger

from .defaults import DEFAULT_MAX_ENTRIES
from .durable import Directory, Disk, append, remove_leftovers, replace
from .memorycache import Entry, Kept, MemoryCache

LATEST_TIME = 253402300799.0
"""9999-12-31T23:59:59Z, the latest time ``datetime`` (hence the status) can show."""

FORMAT = 1
"""The snapshot's format: ``generation`` and the journal beside it came later,
and a reader that knows nothing of them still reads the snapshot."""

JOURNAL = ".journal"
"""The journal is ``path + JOURNAL``."""


def _time(value) -> bytes:
    """A time (or a key) as JSON."""
    return json.dumps(value).encode("ascii")


def _snapshot(head: bytes, entries: dict[str, Kept]) -> Iterator[bytes]:
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


def _lines(changes: dict[str, Optional[Kept]], times: bytes) -> Iterator[bytes]:
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


class CorruptCache(Exception):
    """The cache file exists but cannot be used."""


_UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError)
"""What reading a file that is not one of ours can raise: RecursionError from JSON nested
deeper than the parser goes (``[`` a hundred thousand times)."""


@frozen
class Contents:
    """What a file holds: the answers, the last successful check-in, the clock's mark."""

    memory: MemoryCache
    last_checkin: Optional[float] = None
    #: The latest time the file shows the clock had reached (None: empty cache).
    high_water: Optional[float] = None


@define
class CacheFile:
    """The snapshot at ``path`` and its journal beside it."""

    path: str
    #: The system calls writes are made of (a recording or failing one in tests).
    disk: Disk = field(factory=Disk)
    #: The state directory: the one read at load, held open from the first write.
    _directory: Directory = field(init=False)
    _name: str = field(init=False)

    log = Logger()

    def __attrs_post_init__(self) -> None:
        directory, self._name = os.path.split(os.path.abspath(self.path))
        self._directory = Directory(directory, self.disk, private=True)

    def _read(self, name: str) -> bytes:
        """A file beside the snapshot, read without following a link."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        with open(os.open(name, flags, dir_fd=self._directory.fd()), "rb") as f:
            return f.read()

    def load(self, now: Callable[[], float], max_entries: int = DEFAULT_MAX_ENTRIES) -> Contents:
        """
        Read the snapshot and its journal (on this thread: nothing is served yet); the
        answers in a ``MemoryCache`` keeping time by ``now``.  A missing file starts an
        empty cache; an unusable one is logged once, moved aside (so nobody loses it)
        and replaced.  Temporary files left by a crash inside a write are removed.  The
        writes go to the directory read here, and no other (``durable.Directory``).
        """
        try:
            return self._load(now, max_entries)
        finally:
            self._directory.release()  # reopened at the first write: a reader holds nothing

    def _load(self, now: Callable[[], float], max_entries: int) -> Contents:
        path, directory = self.path, self._directory
        for name in remove_leftovers(directory, self._name) + remove_leftovers(
            directory, self._name + JOURNAL
        ):
            self.log.info("removed {name}, left by a process stopped inside a write", name=name)
        try:
            raw = self._read(self._name)
        except FileNotFoundError:
            return Contents(MemoryCache(now, max_entries=max_entries))
        except OSError as e:
            self.log.error(
                "trust cache {path} cannot be read ({reason}); starting without it",
                path=path,
                reason=e.strerror,
            )
            return Contents(MemoryCache(now, max_entries=max_entries))
        try:
            return self._parse(raw, now, max_entries)
        except CorruptCache as e:
            aside = f"{self._name}.corrupt-{int(now())}"
            try:
                fd = directory.fd()
                os.replace(self._name, aside, src_dir_fd=fd, dst_dir_fd=fd)
                where = f"moved aside to {os.path.join(directory.path, aside)}"
            except OSError as move:
                where = f"could not be moved aside: {move.strerror}"
            self.log.error(
                "trust cache {path} is corrupt ({reason}); {where}; starting without it",
                path=path,
                reason=str(e),
                where=where,
            )
            return Contents(MemoryCache(now, max_entries=max_entries))

    def _parse(self, raw: bytes, now: Callable[[], float], max_entries: int) -> Contents:
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
        except _UNREADABLE as e:
            raise CorruptCache(f"{type(e).__name__}: {e}") from None
        if generation is not None:
            checkin = self._replay( str(generation), found, seen, checkin)
        entries = sorted(found.items(), key=lambda item: item[1].stored_at)
        seen += [entry.stored_at for _, entry in entries]
        if len(entries) > max_entries:
            self.log.info(
                "trust cache {path} holds {count} answers, more than [cache] max_entries;"
                " keeping the {max_entries} stored last",
                path=self.path,
                count=len(entries),
                max_entries=max_entries,
            )
            entries = entries[len(entries) - max_entries :]
        memory = MemoryCache(now, salt=salt, max_entries=max_entries)
        memory.restore(entries)
        return Contents(memory, checkin, max(seen) or None)

    def _replay(
        self,
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
        journal = self.path + JOURNAL
        try:
            lines = self._read(self._name + JOURNAL).split(b"\n")
        except FileNotFoundError:
            return checkin
        except OSError as e:
            self.log.error(
                "trust cache journal {path} cannot be read ({reason}); starting without it",
                path=journal,
                reason=e.strerror,
            )
            return checkin
        try:
            if json.loads(lines[0]) != {"journal": generation}:
                return checkin
        except (ValueError, RecursionError):
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
            except (CorruptCache, *_UNREADABLE):
                if line or number != len(lines):
                    self.log.info(
                        "trust cache journal {path}: line {number} cannot be read (a write"
                        " cut short); what follows it is ignored",
                        path=journal,
                        number=number,
                    )
                break
        return checkin

    def append(
        self, changes: dict[str, Optional[Kept]], last_checkin: Optional[float], mark: float
    ) -> int:
        """Journal ``changes`` (``MemoryCache.take_changes``) and the times; returns the
        bytes written."""
        times = b'{"last_successful_checkin":%s,"clock_high_water":%s}\n' % (
            _time(last_checkin),
            _time(mark),
        )
        return append(self._directory, self._name + JOURNAL, _lines(changes, times))

    def compact(
        self, salt: bytes, last_checkin: Optional[float], mark: float, kept: dict[str, Kept]
    ) -> tuple[int, int]:
        """
        Replace the snapshot with ``kept`` (``MemoryCache.kept``) and the times, then
        start an empty journal naming it; returns both sizes.  A crash between the two
        leaves a journal of another generation, which loading ignores.
        """
        generation = secrets.token_hex(8)
        head = {
            "format": FORMAT,
            "generation": generation,
            "last_successful_checkin": last_checkin,
            "clock_high_water": mark,
            "salt": salt.hex(),
        }
        opening = json.dumps(head, separators=(",", ":"))[:-1].encode("ascii") + b',"entries":{'
        size = replace(self._directory, self._name, _snapshot(opening, kept))
        header = b'{"journal":"%s"}\n' % generation.encode("ascii")
        replace(self._directory, self._name + JOURNAL, [header])
        return size, len(header)


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

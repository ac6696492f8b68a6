"""
The trust cache: the last good answer to each licensing request, and the
time of the last successful check-in, kept in one JSON file that survives
restarts.

Why a file and not memory alone: a restarted proxy must still know how long it
may keep the fleet licensed, and with what answers, while the license server is
away.  Writes are coalesced (at most one every ``FLUSH_DELAY`` seconds, and only
when something changed) so a steady stream of check-ins is not a steady stream
of fsyncs; each write is atomic and durable (temporary file, fsync, rename,
fsync of the directory), so a crash leaves the old file or the new one.

A disk that cannot be written (read-only, full, failing) does not stop the
proxy: it keeps serving from memory, retries (backing off to one attempt every
``RETRY_MAX`` seconds) and says so (``write_error``), until a write succeeds.
The temporary file of a failed write is removed; the file in place is never
touched until its replacement is whole on disk.

The file also keeps the high-water mark of the proxy's clock (see ``clock``),
so that a wall clock set back while the proxy was down cannot stretch trust.
Its size is bounded (``max_entries``): a client varying its query string adds
an entry per request.  When full, the answer stored longest ago makes room,
taken first among those stored only once since start: a fleet stores its own
again at every check-in, so a flood of one-off requests evicts its own kind
(answers read from the file count as kept).

Requests are keyed by an HMAC over method, path, query and credentials, with a
random salt kept in the file: credentials never reach the disk in clear, and
one licensee's answer is never returned to another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
from typing import Callable, Iterable, Optional

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

FLUSH_DELAY = 2.0
"""Seconds a change may wait before it is written: the bound on how far the
file lags behind memory."""

RETRY_MAX = 30.0
"""Longest pause, in seconds, between attempts to write while writes fail."""

DEFAULT_MAX_ENTRIES = 10_000
"""Answers kept at most: about 1.2 kB of memory each for a 300-byte answer, 5 kB
for a 2 kB one (``bin/measure-cache-entry``), so ~50 MiB at most for 2 kB answers."""

MARK_LAG = 60.0
"""Seconds the file's high-water mark of the clock may fall behind when nothing
else changes (during an outage): the most a restart with a wall clock set back
can stretch trust by, bought with one write a minute."""

EVICTION_LOG_INTERVAL = 3600.0
"""Seconds between log lines about a full cache."""

LATEST_TIME = 253402300799.0
"""9999-12-31T23:59:59Z, the latest time ``datetime`` (hence the status) can show."""

FORMAT = 1

#: Request headers that identify a licensee; part of the cache key.
CREDENTIAL_HEADERS = (b"authorization", b"cookie", b"x-api-key")


@frozen
class Entry:
    """One cached answer, as the upstream gave it."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    stored_at: float

    def to_json(self) -> dict:
        return {
            "status": self.status,
            "headers": [[_b64(n), _b64(v)] for n, v in self.headers],
            "body": _b64(self.body),
            "stored_at": self.stored_at,
        }

    @classmethod
    def from_json(cls, obj: dict) -> Entry:
        return cls(
            status=int(obj["status"]),
            headers=tuple((_unb64(n), _unb64(v)) for n, v in obj["headers"]),
            body=_unb64(obj["body"]),
            stored_at=float(obj["stored_at"]),
        )

    def same_answer(self, other: Entry) -> bool:
        return (self.status, self.headers, self.body) == (
            other.status,
            other.headers,
            other.body,
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


_TEMPORARY = ".tmp-"
"""A write goes to ``path + _TEMPORARY + pid`` first."""

CHUNK = 1 << 16
"""Bytes handed to one ``write(2)``: pieces are gathered, not written one call each."""


@define
class Disk:
    """
    The system calls a durable write is made of, as one object, so that tests can record
    their order or fail one of them; the proxy uses these, the real ones.
    """

    def create(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, source: str, target: str) -> None:
        os.replace(source, target)

    def fsync_dir(self, directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: str) -> None:
        os.unlink(path)


def _write_all(disk: Disk, fd: int, pieces: Iterable[bytes]) -> int:
    """Write ``pieces`` in chunks of about ``CHUNK`` bytes; returns the bytes written."""
    total = 0
    batch: list[bytes] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= CHUNK:
            disk.write(fd, b"".join(batch))
            total += size
            batch, size = [], 0
    if batch:
        disk.write(fd, b"".join(batch))
        total += size
    return total


def write_atomically(path: str, data: Iterable[bytes], disk: Disk = Disk()) -> int:
    """
    Replace ``path`` with ``data`` (pieces) so that a crash leaves old or new, whole: the
    new file is written and fsynced under a temporary name, renamed over the old one, and
    the directory fsynced (the rename itself is durable only then).  Returns its size.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}{_TEMPORARY}{os.getpid()}"
    try:
        fd = disk.create(tmp)
        try:
            size = _write_all(disk, fd, data)
            disk.fsync(fd)
        finally:
            disk.close(fd)
        disk.rename(tmp, path)
    except BaseException:
        try:
            disk.unlink(tmp)
        except OSError:
            pass
        raise
    disk.fsync_dir(directory)
    return size


def on_this_thread(work: Callable[[], object]) -> Deferred:
    """Run ``work`` now, on the calling thread: for tools and tests with a fake clock.
    The proxy runs its writes on a thread of their own (``service``)."""
    return maybeDeferred(work)


def remove_leftovers(path: str) -> list[str]:
    """
    Delete the temporary files that processes killed inside a write left
    next to ``path`` (named after their process id, so one per crash would
    pile up for ever); those of a process still running are its own business.
    Returns the names removed.
    """
    removed = []
    prefix = os.path.basename(path) + _TEMPORARY
    directory = os.path.dirname(os.path.abspath(path))
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = _pid(name[len(prefix):]) if name.startswith(prefix) else None
        if pid is None:
            continue
        if pid != os.getpid() and _running(pid):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            continue
        removed.append(name)
    return removed


PID_MAX = 1 << 22
"""Linux's largest process id (``/proc/sys/kernel/pid_max`` can't be set higher)."""


def _pid(text: str) -> Optional[int]:
    """The process id a temporary file is named after, or None if it can't be one
    (``str.isdigit`` accepts "²", and ``os.kill`` overflows on a long number)."""
    if not (text.isascii() and text.isdigit()):
        return None
    pid = int(text)
    return pid if 0 < pid <= PID_MAX else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class CorruptCache(Exception):
    """The cache file exists but cannot be used."""


@define
class TrustCache:
    """Cached answers and the last successful check-in, mirrored to ``path``."""

    _clock: IReactorTime
    _path: str
    _salt: bytes = field(factory=lambda: secrets.token_bytes(16))
    last_checkin: Optional[float] = None
    # In the order they were stored: the first is the one stored longest ago.
    _entries: dict[str, Entry] = field(factory=dict)
    max_entries: int = DEFAULT_MAX_ENTRIES
    #: The latest time the file shows the clock had reached (None: empty cache).
    high_water: Optional[float] = None
    #: Runs a write's disk I/O and fires with its result: off the reactor in the proxy.
    _run: Callable[[Callable[[], object]], Deferred] = on_this_thread
    #: The system calls writes are made of (a recording or failing one in tests).
    _disk: Disk = field(factory=Disk)
    # Each entry as it was last written ('"key":{...}'), so that a write re-encodes only the
    # entries stored since the last one: with thousands of entries, a new check-in time alone
    # must not cost a full json.dumps (hundreds of ms, and three copies of the file in memory).
    _written: dict[str, bytes] = field(factory=dict, init=False)
    # Keys stored once since start, oldest first: evicted before the answers a fleet
    # keeps asking for, so a flood of one-off requests cannot push those out.
    _once: dict[str, None] = field(factory=dict, init=False)
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
        clock: IReactorTime,
        path: str,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        run: Callable[[Callable[[], object]], Deferred] = on_this_thread,
    ) -> TrustCache:
        """
        Read ``path`` (on this thread: nothing is served yet).  A missing file starts an
        empty cache; an unusable one is logged once, moved aside (so nobody loses it) and
        replaced.  Temporary files left by a crash inside a write are removed.  ``run``
        runs the writes (see ``_run``).
        """
        for name in remove_leftovers(path):
            cls.log.info("removed {name}, left by a process stopped inside a write", name=name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return cls(clock, path, max_entries=max_entries, run=run)
        except OSError as e:
            cls.log.error(
                "trust cache {path} cannot be read ({reason}); starting without it",
                path=path,
                reason=e.strerror,
            )
            return cls(clock, path, max_entries=max_entries, run=run)
        try:
            return cls._parse(clock, path, raw, max_entries, run)
        except CorruptCache as e:
            aside = f"{path}.corrupt-{int(clock.seconds())}"
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
            return cls(clock, path, max_entries=max_entries, run=run)

    @classmethod
    def _parse(
        cls, clock: IReactorTime, path: str, raw: bytes, max_entries: int, run
    ) -> TrustCache:
        try:
            obj = json.loads(raw)
            if obj.get("format") != FORMAT:
                raise CorruptCache(f"unknown format {obj.get('format')!r}")
            salt = bytes.fromhex(obj["salt"])
            checkin = obj["last_successful_checkin"]
            checkin = None if checkin is None else float(checkin)
            entries = sorted(
                ((k, Entry.from_json(v)) for k, v in obj["entries"].items()),
                key=lambda item: item[1].stored_at,
            )
            # Files written before the mark existed: the times in them were seen too.
            seen = [float(obj.get("clock_high_water") or 0), checkin or 0]
            seen += [entry.stored_at for _, entry in entries]
            # The mark becomes the clock's floor: one past what a date can show would
            # make every status page and state log fail, for good (the mark is rewritten).
            if not all(math.isfinite(t) and t <= LATEST_TIME for t in seen):
                raise CorruptCache("a time that is not a finite number before the year 10000")
        except CorruptCache:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
            raise CorruptCache(f"{type(e).__name__}: {e}") from None
        if len(entries) > max_entries:
            cls.log.info(
                "trust cache {path} holds {count} answers, more than [cache] max_entries;"
                " keeping the {max_entries} stored last",
                path=path,
                count=len(entries),
                max_entries=max_entries,
            )
            entries = entries[len(entries) - max_entries :]
        return cls(
            clock,
            path,
            salt=salt,
            last_checkin=checkin,
            entries=dict(entries),
            max_entries=max_entries,
            high_water=max(seen) or None,
            run=run,
        )

    def key(
        self,
        method: bytes,
        target: bytes,
        credentials: Iterable[tuple[bytes, bytes]],
    ) -> str:
        """
        The cache key of a request: method, path and query (``target``), and
        the credential headers.  The body is not part of it: the licensing
        protocol is not public, and a body that carries a timestamp or a usage
        counter would never match again.
        """
        mac = hmac.new(self._salt, digestmod=hashlib.sha256)
        for part in (method, target):
            mac.update(len(part).to_bytes(4, "big") + part)
        for name, value in sorted(credentials):
            mac.update(len(name).to_bytes(4, "big") + name)
            mac.update(len(value).to_bytes(4, "big") + value)
        return mac.hexdigest()

    def lookup(self, key: str) -> Optional[Entry]:
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, key: str, entry: Entry) -> None:
        """
        Keep ``entry``, last in line for eviction; the file learns of it
        only if the answer changed.
        """
        old = self._entries.pop(key, None)
        if old is None and len(self._entries) >= self.max_entries:
            self._evict()
        if old is None:
            self._once[key] = None
        else:
            self._once.pop(key, None)
        self._entries[key] = entry
        self._written.pop(key, None)  # its stored_at moved, if nothing else
        if old is None or not old.same_answer(entry):
            self._changed()

    def _evict(self) -> None:
        """
        Drop the answer stored longest ago among those stored only once, if
        any, else among all; say so now and then, not each time.
        """
        oldest = next(iter(self._once or self._entries))
        del self._entries[oldest]
        self._once.pop(oldest, None)
        self._written.pop(oldest, None)
        self.evictions += 1
        now = self._clock.seconds()
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
            self._pending = self._clock.callLater(FLUSH_DELAY, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._pending = None
        self.flush()

    def record_time(self) -> None:
        """Keep the file's high-water mark of the clock within ``MARK_LAG`` of now."""
        written = self._mark_written
        if written is None or self._clock.seconds() - written >= MARK_LAG:
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
        mark = self._clock.seconds()
        pieces = self._serialise(mark)
        self._dirty = False
        self._ends, self._queued = self._queued + [ended], []
        path, disk = self._path, self._disk
        self._writing = self._run(lambda: write_atomically(path, pieces, disk))
        self._writing.addBoth(self._ended, mark)
        return ended

    def _ended(self, result, mark: float) -> None:
        """Back on the reactor after a write: report it, and start the next if one waits."""
        self._writing = None
        again, self._again = self._again, False
        ends, self._ends = self._ends, []
        if isinstance(result, Failure):
            self._dirty = True
            if result.check(OSError):
                self._failed(result.value.strerror or str(result.value))
            else:
                self.log.failure("writing trust cache {path}", result, path=self._path)
                self._failed(result.getErrorMessage())
            again = False
        else:
            if self.write_error is not None:
                self.log.info(
                    "trust cache {path} is written again (it could not be: {reason})",
                    path=self._path,
                    reason=self.write_error,
                )
            self.write_error = None
            self._retry = FLUSH_DELAY
            self._mark_written = mark
        if again:
            self.flush()
        else:
            ends += self._queued
            self._queued = []
        for d in ends:
            d.callback(None)

    def close(self) -> Deferred:
        """
        At a stop: wait for the write in flight, then write what is left.  If that fails
        too, say what is lost and stop retrying: no timer is left behind the last write.
        """
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        await self.flush()  # with a write in flight, the next follows its end
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
        self._pending = self._clock.callLater(self._retry, self._scheduled_flush)
        self._retry = min(self._retry * 2, RETRY_MAX)

    def _serialise(self, mark: float) -> list[bytes]:
        """The file's JSON, in pieces: entries unchanged since the last write are reused."""
        head = {
            "format": FORMAT,
            "last_successful_checkin": self.last_checkin,
            "clock_high_water": mark,
            "salt": self._salt.hex(),
        }
        pieces = [json.dumps(head, separators=(",", ":"))[:-1].encode("ascii"), b',"entries":{']
        written = self._written
        for key, entry in self._entries.items():
            piece = written.get(key)
            if piece is None:
                piece = written[key] = (
                    json.dumps(key) + ":" + json.dumps(entry.to_json(), separators=(",", ":"))
                ).encode("ascii")
            pieces.append(piece)
            pieces.append(b",")
        if self._entries:
            pieces.pop()
        pieces.append(b"}}")
        return pieces

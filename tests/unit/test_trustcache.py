"""The trust cache on disk: durable, coalesced, private, and forgiving of a bad file."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web.http_headers import Headers

from license_proxy.durable import CHUNK, Disk
from license_proxy.cachewriter import FLUSH_DELAY, MARK_LAG, RETRY_MAX
from license_proxy.memorycache import DEFAULT_KEEP_AFTER, STORED_AT_LAG, shared_salt
from license_proxy.trustcache import EVICTION_LOG_INTERVAL, Entry, TrustCache
from tests.support.cachefiles import T0, entry_at, journal_of, two_journaled

ANSWER = Entry(200, ((b"Content-Type", b"application/json"),), b'{"ok":1}', T0)


@pytest.fixture
def clock():
    c = Clock()
    c.advance(T0)
    return c


def test_round_trip_survives_a_restart(tmp_path, clock):
    path = str(tmp_path / "cache.json")
    cache = TrustCache.load(clock, path)
    key = cache.key(b"POST", b"v1/check?x=1", [(b"authorization", b"Token secret-key-123")])
    cache.store(key, ANSWER)
    cache.record_checkin(T0 + 1)
    cache.flush()

    again = TrustCache.load(clock, path)
    assert again.last_checkin == T0 + 1
    assert again.lookup(again.key(b"POST", b"v1/check?x=1", [(b"authorization", b"Token secret-key-123")])) == ANSWER
    assert again.lookup(again.key(b"POST", b"v1/check?x=1", [(b"authorization", b"Token other")])) is None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = open(path, "rb").read()
    assert b"secret-key-123" not in raw
    assert json.loads(raw)["last_successful_checkin"] == T0 + 1
    assert sorted(os.listdir(tmp_path)) == ["cache.json", "cache.json.journal"]


def test_writes_are_coalesced_and_lag_at_most_the_flush_delay(tmp_path, clock):
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path))
    for i in range(100):
        cache.record_checkin(T0 + i / 100)
    assert not path.exists()
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(FLUSH_DELAY)
    assert json.loads(path.read_bytes())["last_successful_checkin"] == T0 + 0.99
    assert clock.getDelayedCalls() == []


def test_an_identical_answer_does_not_dirty_the_file(tmp_path, clock):
    cache = TrustCache.load(clock, str(tmp_path / "cache.json"))
    cache.store("k", ANSWER)
    clock.advance(FLUSH_DELAY)
    cache.store("k", Entry(200, ANSWER.headers, ANSWER.body, T0 + 50))
    assert clock.getDelayedCalls() == []
    cache.store("k", Entry(200, ANSWER.headers, b'{"ok":2}', T0 + 60))
    assert len(clock.getDelayedCalls()) == 1


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"format":99}',
     b'{"format":1,"salt":"00","entries":{},"last_successful_checkin":1,"clock_high_water":Infinity}', b'{"format":1,"salt":"zz","entries":{},"last_successful_checkin":null}', b"\x00" * 10,
     # An integer too large for a float: OverflowError, which is not a ValueError.
     b'{"format":1,"salt":"00","entries":{},"last_successful_checkin":1%s}' % (b"0" * 400),
     # Finite, but past what a date can show: as the clock's floor it broke every status.
     b'{"format":1,"salt":"00","entries":{},"last_successful_checkin":1,"clock_high_water":1e15}',
     # A key no cache makes (a variant naming a header that is not ASCII) broke the start.
     b'{"format":1,"salt":"00","last_successful_checkin":1,"entries":{"k;\xc3\xa9;0":'
     b'{"status":200,"headers":[],"body":"","stored_at":1}}}',
     # Nested past the parser's recursion limit: a RecursionError stopped every start.
     b"[" * 100_000, b'{"format":1,"salt":"00","entries":{"k":' + b"[" * 100_000],
)
def test_a_corrupt_file_is_moved_aside_and_logged(tmp_path, clock, content):
    path = tmp_path / "cache.json"
    path.write_bytes(content)
    with capturedLogs() as events:
        cache = TrustCache.load(clock, str(path))
    assert len(cache) == 0 and cache.last_checkin is None
    assert not path.exists()
    aside = tmp_path / f"cache.json.corrupt-{int(T0)}"
    assert aside.read_bytes() == content
    messages = [e["log_format"].format(**e) for e in events]
    assert any("is corrupt" in m and "moved aside" in m for m in messages), messages


class FailingDisk(Disk):
    """The real disk, except that while ``error`` is set, opening a file fails with it."""

    def __init__(self):
        self.error = None
        self.attempts = 0

    def create(self, dir_fd, name):
        self._attempt()
        return super().create(dir_fd, name)

    def open_append(self, dir_fd, name):
        self._attempt()
        return super().open_append(dir_fd, name)

    def _attempt(self):
        self.attempts += 1
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))


def files(path):
    """The snapshot and the journal, as they are on disk."""
    return path.read_bytes(), (path.parent / (path.name + ".journal")).read_bytes()


def messages(events):
    return [e["log_format"].format(**e) for e in events]


def test_a_failing_disk_is_reported_retried_and_recovers(tmp_path, clock):
    path = tmp_path / "cache.json"
    disk = FailingDisk()
    cache = TrustCache(clock, str(path), disk=disk)
    cache.store("old", ANSWER)
    cache.flush()
    before = files(path)
    assert (cache.persisted, cache.write_error) == (True, None)

    disk.error = errno.ENOSPC
    with capturedLogs() as events:
        cache.store("k", ANSWER)
        cache.flush()
        assert (cache.persisted, cache.write_error) == (False, "No space left on device")
        # Retries back off to one every RETRY_MAX seconds; new answers don't add attempts.
        for delay in (2, 4, 8, 16, 30, 30):
            cache.store(f"k{delay}", ANSWER)
            clock.advance(delay - 0.001)
            attempts = disk.attempts
            clock.advance(0.001)
            assert disk.attempts == attempts + 1
        assert RETRY_MAX == 30
        disk.error = errno.EROFS
        clock.advance(RETRY_MAX)
        assert cache.write_error == "Read-only file system"
    assert messages(events) == [
        f"cannot write trust cache {path}: No space left on device; serving from memory and retrying",
        f"cannot write trust cache {path}: Read-only file system; serving from memory and retrying",
    ]
    assert cache.write_failures == 8
    assert cache.lookup("k") == ANSWER  # served from memory
    assert files(path) == before

    disk.error = None
    with capturedLogs() as events:
        clock.advance(RETRY_MAX)
    assert (cache.persisted, cache.write_error) == (True, None)
    assert messages(events) == [
        f"trust cache {path} is written again (it could not be: Read-only file system)"
    ]
    assert TrustCache.load(clock, str(path)).lookup("k30") == ANSWER
    assert clock.getDelayedCalls() == []
    # Back to the normal pace after a recovery.
    disk.error = errno.EIO
    cache.record_checkin(T0)
    clock.advance(FLUSH_DELAY)
    attempts = disk.attempts
    clock.advance(FLUSH_DELAY)
    assert disk.attempts == attempts + 1


def test_a_write_failing_at_stop_says_what_is_lost_and_leaves_no_timer(tmp_path, clock):
    path = tmp_path / "cache.json"
    disk = FailingDisk()
    cache = TrustCache(clock, str(path), disk=disk)
    disk.error = errno.EROFS
    cache.store("k", ANSWER)
    cache.flush()  # failing already: a stop's attempt logs nothing new by itself
    with capturedLogs() as events:
        closed = cache.close()
    assert closed.called
    assert disk.attempts == 2
    assert clock.getDelayedCalls() == []
    assert messages(events) == [
        f"trust cache {path} not written at stop (Read-only file system): the changes since"
        " its last write are lost"
    ]
    disk.error = None
    cache.close()  # a stop that can write says nothing
    assert TrustCache.load(clock, str(path)).lookup("k") == ANSWER


def test_a_directory_renamed_away_and_replaced_is_not_written_to_and_says_so(tmp_path, clock):
    """Someone who can write the directory above (an emptyDir with fsGroup) swaps the cache's
    for their own while the proxy runs, with a journal anyone can read and links named as
    the temporary files: nothing reaches theirs, nor what the links name (issue 20, item 2)."""
    state = tmp_path / "private"
    state.mkdir(mode=0o700)
    cache = TrustCache.load(clock, str(state / "cache.json"))
    cache.store("k0", ANSWER)
    cache.flush()
    state.rename(tmp_path / "renamed-away")
    state.mkdir()
    state.chmod(0o777)
    theirs = state / "cache.json.journal"
    theirs.write_bytes(b"")
    theirs.chmod(0o666)
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    for name in ("cache.json", "cache.json.journal"):
        (state / f"{name}.tmp-{os.getpid()}").symlink_to(outside)
    with capturedLogs() as events:
        cache.store("k1", entry_at(T0 + 1))
        cache.flush()  # an append to the journal
        assert not cache.persisted
        assert "is no longer the directory opened at start" in cache.write_error
        cache.close()  # a new snapshot
    assert (theirs.read_bytes(), outside.read_bytes()) == (b"", b"precious")
    assert [m for m in messages(events) if "not written at stop" in m]


def test_a_state_directory_reached_through_a_link_is_written(tmp_path, clock):
    """systemd's DynamicUser: /var/lib/license-proxy is a link to private/license-proxy."""
    real = tmp_path / "private" / "license-proxy"
    real.mkdir(parents=True, mode=0o755)
    (tmp_path / "license-proxy").symlink_to(real)
    path = tmp_path / "license-proxy" / "cache.json"
    cache = TrustCache.load(clock, str(path))
    cache.store("k0", ANSWER)
    cache.flush()
    assert cache.persisted, cache.write_error
    cache.store("k1", entry_at(T0 + 1))
    cache.close()
    assert TrustCache.load(clock, str(path)).lookup("k1") is not None
    # A link swapped to another directory is still a replacement.
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (tmp_path / "license-proxy").unlink()
    (tmp_path / "license-proxy").symlink_to(other)
    cache.store("k2", entry_at(T0 + 2))
    cache.flush()
    assert not cache.persisted and "no longer the directory" in cache.write_error
    assert not (other / "cache.json.journal").exists()


@pytest.mark.parametrize("kind", ["journal", "temporary"])
def test_a_link_in_place_of_a_file_is_not_written_through(tmp_path, clock, kind):
    name = "cache.json.journal" if kind == "journal" else f"cache.json.tmp-{os.getpid()}"
    path = tmp_path / "cache.json"
    cache = TrustCache(clock, str(path))
    cache.store("k", ANSWER)
    cache.flush()  # a snapshot, then its journal
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "file").write_bytes(b"precious")
    (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / name).symlink_to(outside / "file")
    cache.record_checkin(T0 + 1)
    with capturedLogs():
        # An append opens the journal; a stop's snapshot creates the temporary file.
        cache.flush() if kind == "journal" else cache.close()
    assert not cache.persisted
    assert (outside / "file").read_bytes() == b"precious"
    cache.flush()  # the next write replaces the link, not what it names
    assert cache.persisted and not (tmp_path / name).is_symlink()
    assert TrustCache.load(clock, str(path)).last_checkin == T0 + 1


def test_a_missing_state_directory_is_a_write_failure_too(tmp_path, clock):
    cache = TrustCache.load(clock, str(tmp_path / "gone" / "cache.json"))
    cache.store("k", ANSWER)
    cache.flush()
    assert cache.write_error == "No such file or directory"
    (tmp_path / "gone").mkdir()
    clock.advance(FLUSH_DELAY)
    assert cache.persisted
    assert TrustCache.load(clock, str(tmp_path / "gone" / "cache.json")).lookup("k") == ANSWER
    assert sorted(os.listdir(tmp_path / "gone")) == ["cache.json", "cache.json.journal"]


def test_when_full_the_answer_stored_longest_ago_makes_room(tmp_path, clock):
    path = str(tmp_path / "cache.json")
    cache = TrustCache.load(clock, path, max_entries=3)
    for n in range(3):
        cache.store(f"k{n}", entry_at(T0 + n))
    clock.advance(DEFAULT_KEEP_AFTER)
    cache.store("k0", entry_at(T0 + 3))  # k0 is stored again a check-in later: kept
    assert (len(cache), cache.evictions) == (3, 0)
    with capturedLogs() as events:
        cache.store("k3", entry_at(T0 + 4))
        cache.store("k4", entry_at(T0 + 5))
    assert [k for k in ("k0", "k1", "k2", "k3", "k4") if cache.lookup(k)] == ["k0", "k3", "k4"]
    assert (len(cache), cache.evictions) == (3, 2)
    # Logged once, not once per eviction...
    assert messages(events) == [
        "trust cache is full (3 answers): each new answer replaces the one stored longest ago,"
        " one-off requests first (1 replaced so far)"
    ]
    # ...and again after an hour, if it is still happening.
    with capturedLogs() as events:
        clock.advance(EVICTION_LOG_INTERVAL - 1)
        cache.store("k5", entry_at(T0 + 6))
        clock.advance(1)
        cache.store("k6", entry_at(T0 + 7))
    assert [e["evictions"] for e in events if "is full" in e["log_format"]] == [4]

    cache.flush()
    again = TrustCache.load(clock, path, max_entries=3)
    # k0, stored twice, outlived the answers stored once after it.
    assert [k for k in ("k0", "k4", "k5", "k6") if again.lookup(k)] == ["k0", "k5", "k6"]
    # A lower bound after a restart keeps the answers stored last.
    with capturedLogs() as events:
        fewer = TrustCache.load(clock, path, max_entries=2)
    assert [k for k in ("k0", "k5", "k6") if fewer.lookup(k)] == ["k5", "k6"]
    assert "holds 3 answers, more than [cache] max_entries" in messages(events)[0]
    fewer.store("k7", entry_at(T0 + 8))
    assert [k for k in ("k5", "k6", "k7") if fewer.lookup(k)] == ["k6", "k7"]


def test_a_flood_of_one_off_requests_does_not_evict_the_answers_a_fleet_refreshes(
    tmp_path, clock
):
    cache = TrustCache.load(clock, str(tmp_path / "cache.json"), max_entries=100)
    fleet = [f"container-{n}" for n in range(60)]
    for minute in range(2):  # two check-ins each: answers the fleet keeps asking for
        for key in fleet:
            cache.store(key, entry_at(T0 + minute))
        clock.advance(DEFAULT_KEEP_AFTER)
    for n in range(10_000):  # then one client varies its query string
        cache.store(f"flood-{n}", entry_at(T0 + 120))
    assert all(cache.lookup(key) for key in fleet)
    assert (len(cache), cache.evictions) == (100, 10_000 - 40)
    # The flood keeps only the newest of its own.
    assert [n for n in range(10_000) if cache.lookup(f"flood-{n}")] == list(range(9960, 10_000))


def test_an_answer_stored_twice_within_a_check_in_interval_is_not_kept(tmp_path, clock):
    """The attack of issue 14: each of many distinct requests sent twice in a row."""
    cache = TrustCache.load(clock, str(tmp_path / "cache.json"), max_entries=50)
    cache.memory.keep_after = 10.0
    fleet = [f"container-{n}" for n in range(10)]
    for key in fleet:
        cache.store(key, entry_at(T0))
    clock.advance(9.9)
    for key in fleet:
        cache.store(key, entry_at(T0 + 9.9))  # not yet a check-in later: only kept at 10 s
    clock.advance(0.1)
    for key in fleet:
        cache.store(key, entry_at(T0 + 10))
    for n in range(100):
        for _ in range(2):
            cache.store(f"flood-{n}", entry_at(T0 + 10))
        clock.advance(0.05)  # the whole flood takes 5 s, within the interval
    assert all(cache.lookup(key) for key in fleet)
    assert [n for n in range(100) if cache.lookup(f"flood-{n}")] == list(range(60, 100))


def test_variants_are_found_after_a_restart_and_forgotten_with_their_last_answer(tmp_path, clock):
    path = str(tmp_path / "cache.json")
    cache = TrustCache.load(clock, path, max_entries=3)
    tenant = {n: Headers({b"X-Tenant": [n]}) for n in (b"a", b"b")}
    key = cache.key(b"GET", b"v1/lic", [(b"authorization", b"Token k")])
    for n, headers in tenant.items():
        cache.store(cache.variant(key, headers, (b"x-tenant",)), entry_at(T0))
    assert cache.variant(key, tenant[b"a"]) != cache.variant(key, tenant[b"b"])
    cache.flush()
    again = TrustCache.load(clock, path, max_entries=3)
    for headers in tenant.values():
        assert again.lookup(again.variant(key, headers)) == entry_at(T0)
    assert again.lookup(again.variant(key, Headers())) is None
    assert again.lookup(key) is None
    # In the first cache, where they are not kept, a flood of other answers evicts both
    # variants: nothing is left of them (else a flood of answers with Vary grew it for ever).
    for n in range(3):
        cache.store(f"flood-{n}", entry_at(T0))
    assert cache.evictions == 2
    assert (cache.memory._varies, cache.memory._variants) == ({}, {})
    assert cache.variant(key, tenant[b"a"]) == key


def test_the_file_keeps_the_clock_high_water_mark(tmp_path, clock):
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path))
    cache.record_checkin(T0 - 100)
    clock.advance(FLUSH_DELAY)
    assert json.loads(path.read_bytes())["clock_high_water"] == T0 + FLUSH_DELAY
    assert TrustCache.load(clock, str(path)).high_water == T0 + FLUSH_DELAY


def test_the_mark_alone_is_written_at_most_once_a_minute(tmp_path, clock):
    """During an outage nothing else changes: the mark must still keep up, cheaply."""
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path))
    cache.record_time()
    clock.advance(FLUSH_DELAY)
    assert json.loads(path.read_bytes())["clock_high_water"] == T0 + FLUSH_DELAY
    cache.record_time()
    clock.advance(MARK_LAG - 1)
    cache.record_time()
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    cache.record_time()
    clock.advance(FLUSH_DELAY)
    assert TrustCache.load(clock, str(path)).high_water == T0 + MARK_LAG + 2 * FLUSH_DELAY


def test_a_file_without_the_mark_takes_the_latest_time_in_it(tmp_path, clock):
    """Files written before the mark existed still load; the times in them were seen."""
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path))
    cache.store("k", entry_at(T0 + 50))
    cache.record_checkin(T0 + 20)
    cache.flush()
    obj = json.loads(path.read_bytes())
    del obj["clock_high_water"]
    path.write_text(json.dumps(obj))
    old = TrustCache.load(clock, str(path))
    assert (old.high_water, old.last_checkin, old.lookup("k")) == (T0 + 50, T0 + 20, entry_at(T0 + 50))
    assert TrustCache.load(clock, str(tmp_path / "none.json")).high_water is None


def test_temporary_files_left_by_killed_writers_are_removed_at_load(tmp_path, clock):
    path = tmp_path / "cache.json"
    exited = subprocess.Popen(["true"])
    exited.wait()
    leftovers = [f"cache.json.tmp-{exited.pid}", f"cache.json.tmp-{os.getpid()}"]
    leftovers += [f"cache.json.journal.tmp-{exited.pid}"]
    kept = ["cache.json.tmp-1", "cache.json.tmp-x", "other.json.tmp-99999999"]
    # Names no process id can have: kept, and no exception out of load (it stopped the start).
    kept += ["cache.json.tmp-99999999999999999999", "cache.json.tmp-\u00b2", "cache.json.tmp-0"]
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b'{"half a')
    with capturedLogs() as events:
        TrustCache.load(clock, str(path))
    names = set(os.listdir(tmp_path))
    assert not names & set(leftovers)
    assert set(kept) <= names  # pid 1 runs; the others are not our temporary files
    removed = sorted(e["name"] for e in events if "name" in e)
    assert removed == sorted(leftovers)


class Later:
    """Runs each write only when the test says so, as the writer thread does, later."""

    def __init__(self):
        self.jobs = []

    def __call__(self, work):
        done = Deferred()
        self.jobs.append((work, done))
        return done

    def finish(self):
        work, done = self.jobs.pop(0)
        try:
            result = work()
        except Exception:
            done.errback()
        else:
            done.callback(result)


def test_one_write_at_a_time_off_the_reactor_and_a_stop_waits_for_it(tmp_path, clock):
    path = tmp_path / "cache.json"
    later = Later()
    cache = TrustCache(clock, str(path), run=later)
    cache.store("a", ANSWER)
    clock.advance(FLUSH_DELAY)
    assert len(later.jobs) == 1 and not path.exists()  # handed over, not written here
    cache.store("b", ANSWER)
    clock.advance(FLUSH_DELAY)
    assert len(later.jobs) == 1  # due, but one is in flight: it waits for its end
    later.finish()
    assert len(later.jobs) == 1  # the next starts at once
    assert TrustCache.load(clock, str(path)).lookup("b") is None
    cache.record_checkin(T0 + 9)
    closed = cache.close()
    later.finish()
    assert not closed.called and len(later.jobs) == 1  # the stop waited, then the last write
    later.finish()
    assert closed.called and later.jobs == []
    again = TrustCache.load(clock, str(path))
    assert (again.lookup("a"), again.lookup("b"), again.last_checkin) == (ANSWER, ANSWER, T0 + 9)
    assert clock.getDelayedCalls() == []


def test_a_stop_during_a_journal_append_still_ends_with_a_snapshot_holding_everything(tmp_path, clock):
    path = tmp_path / "cache.json"
    later = Later()
    cache = TrustCache(clock, str(path), run=later)
    cache.store("a", ANSWER)
    cache.flush()
    later.finish()  # the first write after a start: a snapshot
    cache.store("b", ANSWER)
    cache.flush()  # an append to the journal, held in flight
    closed = cache.close()
    for _ in range(10):  # bounded: a close that keeps queuing writes fails, not hangs
        if later.jobs:
            later.finish()
    assert closed.called and not later.jobs
    assert journal_of(path).read_bytes().count(b"\n") == 1  # the header alone
    assert sorted(json.loads(path.read_bytes())["entries"]) == ["a", "b"]


def test_a_check_in_appends_a_line_and_leaves_the_answers_alone(tmp_path, clock):
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path))
    for n in range(1000):
        cache.store(f"k{n}", entry_at(T0 + n))
    cache.flush()
    snapshot, journal = files(path)
    assert len(snapshot) > 90_000
    cache.record_checkin(T0 + 5000)
    clock.advance(FLUSH_DELAY)
    assert files(path)[0] == snapshot  # not one answer rewritten
    line = files(path)[1][len(journal):]
    assert json.loads(line) == {
        "last_successful_checkin": T0 + 5000, "clock_high_water": T0 + FLUSH_DELAY
    }
    assert len(line) < 100
    assert TrustCache.load(clock, str(path)).last_checkin == T0 + 5000


def test_answers_stored_and_evicted_since_the_snapshot_come_back_from_the_journal(
    tmp_path, clock
):
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path), max_entries=2)
    cache.store("k0", entry_at(T0))
    cache.store("k1", entry_at(T0 + 1))
    cache.flush()
    cache.store("k1", entry_at(T0 + 2))  # a new answer
    cache.store("k2", entry_at(T0 + 3))  # k0 makes room
    cache.record_checkin(T0 + 4)
    cache.flush()
    assert b"k2" not in path.read_bytes()  # appended, not rewritten
    again = TrustCache.load(clock, str(path), max_entries=2)
    assert [again.lookup(k) for k in ("k0", "k1", "k2")] == [None, entry_at(T0 + 2), entry_at(T0 + 3)]
    assert again.last_checkin == T0 + 4


def test_the_journal_is_compacted_once_it_outgrows_the_snapshot(tmp_path, clock):
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path))
    big = [Entry(200, (), bytes([n]) * 30_000, T0 + n) for n in range(4)]
    cache.store("k", big[0])
    cache.flush()
    for entry in big[1:3]:  # each a line as big as the snapshot
        cache.store("k", entry)
        cache.flush()
        assert files(path)[0].count(b'"k"') == 1 and b'"generation"' in files(path)[0]
    assert len(files(path)[1]) > 65_536  # past the snapshot and JOURNAL_MIN: compact next
    snapshot = files(path)[0]
    cache.store("k", big[3])
    cache.flush()
    snapshot_now, journal = files(path)
    assert snapshot_now != snapshot and len(journal) < 100
    assert TrustCache.load(clock, str(path)).lookup("k") == big[3]


def test_a_line_cut_short_is_ignored_and_the_next_write_starts_afresh(tmp_path, clock):
    path = tmp_path / "cache.json"
    two_journaled(path, clock)
    with open(journal_of(path), "ab") as f:
        f.write(b'{"store":"k2","status":200,"hea')  # a kill inside an append
    with capturedLogs() as events:
        again = TrustCache.load(clock, str(path))
    assert [again.lookup(k) for k in ("k0", "k1", "k2")] == [entry_at(T0), entry_at(T0 + 1), None]
    assert [m for m in messages(events) if "cut short" in m]
    again.store("k3", entry_at(T0 + 3))
    again.flush()  # the first write after a start replaces the snapshot
    assert b'"k3"' in path.read_bytes() and b"hea" not in journal_of(path).read_bytes()
    assert len(TrustCache.load(clock, str(path))) == 3


@pytest.mark.parametrize("header", [False, True])
def test_a_journal_nested_past_the_recursion_limit_is_read_up_to_that_line(
    tmp_path, clock, header
):
    path = tmp_path / "cache.json"
    two_journaled(path, clock)
    deep = b"[" * 100_000 + b"\n"
    if header:
        journal_of(path).write_bytes(deep)
    else:
        with open(journal_of(path), "ab") as f:
            f.write(deep + b'{"store":"k2","status":200,"headers":[],"body":"","stored_at":1}\n')
    again = TrustCache.load(clock, str(path))
    assert [again.lookup(k) for k in ("k0", "k1", "k2")] == [
        entry_at(T0), None if header else entry_at(T0 + 1), None
    ]


def test_a_journal_of_another_generation_is_ignored(tmp_path, clock):
    """Left by a crash between the snapshot's rename and the new journal's: the snapshot
    already holds all of it, and replaying it could bring back what was changed since."""
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path))
    cache.store("k", entry_at(T0))
    cache.flush()
    cache.store("k", entry_at(T0 + 1))
    cache.flush()
    stale = journal_of(path).read_bytes()
    cache.store("k", entry_at(T0 + 2))
    cache.close()  # a new snapshot
    journal_of(path).write_bytes(stale)
    assert TrustCache.load(clock, str(path)).lookup("k") == entry_at(T0 + 2)


def test_a_file_from_before_the_journal_loads_and_is_migrated(tmp_path, clock):
    path = tmp_path / "cache.json"
    old = {
        "format": 1, "last_successful_checkin": T0, "clock_high_water": T0 + 1, "salt": "ab" * 16,
        "entries": {"k": {"status": 200, "headers": [["WC1B", "Yg=="]], "body": "b2s=",
                          "stored_at": T0}},
    }
    path.write_text(json.dumps(old))
    cache = TrustCache.load(clock, str(path))
    assert cache.lookup("k") == Entry(200, ((b"X-A", b"b"),), b"ok", T0)
    assert (cache.last_checkin, cache.high_water) == (T0, T0 + 1)
    cache.record_checkin(T0 + 2)
    cache.flush()
    snapshot = json.loads(path.read_bytes())
    assert snapshot["generation"] and snapshot["salt"] == "ab" * 16
    assert snapshot["entries"] == old["entries"]
    assert json.loads(journal_of(path).read_bytes()) == {"journal": snapshot["generation"]}


def test_a_file_keyed_with_another_salt_than_the_shared_one_starts_empty_said_once(
    tmp_path, clock
):
    """Its keys can't be found under the peers' salt: dropped (said once), the times kept, and
    the next write replaces the file's salt."""
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path))
    cache.store("k", entry_at(T0))
    cache.record_checkin(T0)
    cache.close()
    shared = b"shared-salt-" * 3
    with capturedLogs() as events:
        cache = TrustCache.load(clock, str(path), salt=shared)
    assert [e["log_format"] for e in events if "another salt" in e["log_format"]] != []
    assert len([e for e in events if "another salt" in e["log_format"]]) == 1
    assert shared.decode() not in json.dumps([str(e) for e in events])
    assert (len(cache), cache.last_checkin, cache.memory.salt) == (0, T0, shared_salt(shared))
    cache.store("k2", entry_at(T0 + 1))
    cache.close()
    again = TrustCache.load(clock, str(path), salt=shared)  # the same salt: kept, nothing said
    assert again.lookup("k2") == entry_at(T0 + 1)
    written = path.read_bytes()
    assert json.loads(written)["salt"] == shared_salt(shared).hex()
    assert shared not in written and shared.hex().encode() not in written  # the secret isn't


def test_an_answer_stored_again_unchanged_is_written_again_only_when_its_time_is_old(
    tmp_path, clock
):
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path))
    cache.store("k", entry_at(T0))
    cache.flush()
    cache.store("k", Entry(200, (), b"answer at %d" % T0, T0 + STORED_AT_LAG - 1))
    assert clock.getDelayedCalls() == []  # in memory only
    assert cache.lookup("k").stored_at == T0 + STORED_AT_LAG - 1
    cache.store("k", Entry(200, (), b"answer at %d" % T0, T0 + STORED_AT_LAG))
    cache.flush()
    assert TrustCache.load(clock, str(path)).lookup("k").stored_at == T0 + STORED_AT_LAG


def test_a_stop_leaves_the_snapshot_holding_everything(tmp_path, clock):
    path = tmp_path / "cache.json"
    cache = two_journaled(path, clock)
    cache.close()
    snapshot = json.loads(path.read_bytes())
    assert sorted(snapshot["entries"]) == ["k0", "k1"]
    assert journal_of(path).read_bytes() == b'{"journal":"%s"}\n' % snapshot["generation"].encode()


class RecordingDisk(Disk):
    """The real system calls, each recorded as (call, file name); ``fail_write`` makes that
    write (counting from 1) write half its bytes for real, then fail with EIO."""

    def __init__(self, fail_write=None):
        self.calls = []
        self.names = {}
        self.writes = 0
        self.fail_write = fail_write

    def open_dir(self, path):
        fd = super().open_dir(path)
        self.names[fd] = os.path.basename(path)
        return fd

    def create(self, dir_fd, name):
        fd = super().create(dir_fd, name)
        self.names[fd] = name
        self.calls.append(("create", name))
        return fd

    def open_append(self, dir_fd, name):
        fd = super().open_append(dir_fd, name)
        self.names[fd] = name
        self.calls.append(("open_append", name))
        return fd

    def write(self, fd, data):
        self.writes += 1
        self.calls.append(("write", self.names[fd]))
        if self.writes == self.fail_write:
            super().write(fd, data[: len(data) // 2])
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().write(fd, data)

    def fsync(self, fd):
        self.calls.append(("fsync", self.names[fd]))
        super().fsync(fd)

    def close(self, fd):
        self.calls.append(("close", self.names.pop(fd)))
        super().close(fd)

    def rename(self, dir_fd, source, target):
        self.calls.append(("rename", source, target))
        super().rename(dir_fd, source, target)

    def fsync_dir(self, dir_fd):
        self.calls.append(("fsync_dir", self.names[dir_fd]))
        super().fsync_dir(dir_fd)

    def unlink(self, dir_fd, name):
        self.calls.append(("unlink", name))
        super().unlink(dir_fd, name)


def test_a_snapshot_is_written_and_fsynced_under_another_name_renamed_then_its_directory_fsynced(
    tmp_path, clock
):
    disk = RecordingDisk()
    cache = TrustCache(clock, str(tmp_path / "cache.json"), disk=disk)
    cache.store("k", ANSWER)
    cache.flush()
    temp = f"cache.json.tmp-{os.getpid()}"
    journal_temp = f"cache.json.journal.tmp-{os.getpid()}"
    assert disk.calls == [
        ("create", temp), ("write", temp), ("fsync", temp), ("close", temp),
        ("rename", temp, "cache.json"), ("fsync_dir", tmp_path.name),
        # then the journal that follows it, the same way
        ("create", journal_temp), ("write", journal_temp), ("fsync", journal_temp),
        ("close", journal_temp), ("rename", journal_temp, "cache.json.journal"),
        ("fsync_dir", tmp_path.name),
    ]


def test_a_journal_line_is_fsynced_before_the_write_counts(tmp_path, clock):
    disk = RecordingDisk()
    later = Later()
    cache = TrustCache(clock, str(tmp_path / "cache.json"), disk=disk, run=later)
    cache.store("k", ANSWER)
    cache.flush()
    later.finish()
    del disk.calls[:]
    cache.record_checkin(T0 + 1)
    cache.flush()
    work, done = later.jobs.pop(0)
    work()  # the writer thread's part
    assert disk.calls == [
        ("open_append", "cache.json.journal"), ("write", "cache.json.journal"),
        ("fsync", "cache.json.journal"), ("close", "cache.json.journal"),
    ]
    done.callback(0)
    assert cache.persisted


def test_a_write_failing_halfway_leaves_the_files_in_place_byte_for_byte(tmp_path, clock):
    path = tmp_path / "cache.json"
    answers = {f"k{n}": Entry(200, (), b"%d" % n * 300, T0 + n) for n in range(200)}
    cache = TrustCache.load(clock, str(path))
    for key, entry in answers.items():
        cache.store(key, entry)
    cache.flush()
    before = files(path)
    assert len(before[0]) > 2 * CHUNK  # a snapshot of several writes
    disk = RecordingDisk(fail_write=2)
    failing = TrustCache(clock, str(path), disk=disk)
    for key, entry in answers.items():
        failing.store(key, Entry(201, (), entry.body, entry.stored_at))
    with capturedLogs():
        failing.flush()  # a new snapshot, which fails halfway
    assert ("write", f"cache.json.tmp-{os.getpid()}") in disk.calls  # half of it was written
    assert failing.write_error == "Input/output error"
    assert files(path) == before
    assert sorted(os.listdir(tmp_path)) == ["cache.json", "cache.json.journal"]
    assert TrustCache.load(clock, str(path)).lookup("k199") == answers["k199"]


def test_answers_kept_once_when_equal_still_come_back_each_for_its_own_request(tmp_path, clock):
    path = tmp_path / "cache.json"
    cache = TrustCache.load(clock, str(path))
    same = [Entry(200, (), b"the same answer", T0 + n) for n in range(3)]
    for n, entry in enumerate(same):
        cache.store(f"same{n}", entry)
    for n in range(40):  # more different answers than are remembered for sharing
        cache.store(f"other{n}", entry_at(T0 + n))
    cache.store("same3", Entry(200, (), b"the same answer", T0 + 50))
    cache.store("same0", Entry(200, (), b"changed", T0 + 60))
    cache.flush()
    for again in (cache, TrustCache.load(clock, str(path))):
        assert [again.lookup(f"same{n}") for n in range(4)] == [
            Entry(200, (), b"changed", T0 + 60), same[1], same[2],
            Entry(200, (), b"the same answer", T0 + 50),
        ]
        assert [again.lookup(f"other{n}") for n in range(40)] == [entry_at(T0 + n) for n in range(40)]


def test_a_flush_asked_for_during_a_write_with_nothing_new_ends_with_it(tmp_path, clock):
    later = Later()
    cache = TrustCache(clock, str(tmp_path / "cache.json"), run=later)
    cache.store("k", ANSWER)
    first = cache.flush()
    second = cache.flush()  # nothing changed since the write in flight began
    later.finish()
    assert first.called and second.called and later.jobs == []

"""
What a trust cache write costs with 100, 1,000 and 10,000 answers: the time the event loop
spends on it (taking what to write), the time the writer thread spends (encoding, writing,
fsyncing, renaming), and the bytes written.  Two kinds of write: a check-in (the common one,
every 2 s under traffic: only the check-in time moved) and a compaction (a new snapshot: the
first write after a start, when the journal has outgrown the snapshot, after a failed write,
at a stop).

    python bench/cachewrite.py [--entries 100 1000 10000] [--checkins 30] [--dir DIR]

The files go to a temporary directory in DIR (default: this one, on the disk the repository
is on; /tmp may be a tmpfs, whose fsync costs nothing).  Answers are the benchmark's ~300-byte
JSON (bench/harness.py), each for a distinct request.  Times are medians over the check-ins,
bytes their mean.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet.defer import fail, succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from bench.harness import ANSWER  # noqa: E402
from license_proxy.memorycache import MemoryCache  # noqa: E402
from license_proxy.trustcache import Disk, Entry, TrustCache  # noqa: E402

HEADERS = ((b"Content-Type", b"application/json"), (b"Server", b"nginx/1.22.1"))


class Counted(Disk):
    """The real disk, counting the bytes written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, fd: int, data: bytes) -> None:
        super().write(fd, data)
        self.written += len(data)


class Timed:
    """Runs a write's work at once, as the writer thread would, timing it apart."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, work):
        started = time.perf_counter()
        try:
            result = work()
        except Exception:
            return fail()
        finally:
            self.seconds += time.perf_counter() - started
        return succeed(result)


def one_write(cache: TrustCache, timed: Timed, disk: Counted, write) -> tuple[float, float, int]:
    """(ms on the event loop, ms on the writer thread, bytes written) of ``write()``."""
    timed.seconds, disk.written = 0.0, 0
    started = time.perf_counter()
    write()
    total = time.perf_counter() - started
    assert cache.persisted, cache.write_error
    return (total - timed.seconds) * 1000, timed.seconds * 1000, disk.written


def measure(directory: str, entries: int, checkins: int) -> dict:
    clock = Clock()
    clock.advance(1_800_000_000)
    timed, disk = Timed(), Counted()
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        memory = MemoryCache(clock.seconds, max_entries=entries)
        cache = TrustCache(clock, f"{tmp}/trust-cache.json", memory, run=timed, disk=disk)
        for n in range(entries):
            key = cache.key(b"GET", b"v1/license?instance=%d" % n, [])
            cache.store(key, Entry(200, HEADERS, ANSWER.encode(), clock.seconds()))
        first = one_write(cache, timed, disk, cache.flush)  # the first after a start compacts
        rows = []
        for _ in range(checkins):
            clock.advance(2)
            cache.record_checkin(clock.seconds())
            rows.append(one_write(cache, timed, disk, cache.flush))
        cache.record_checkin(clock.seconds())
        last = one_write(cache, timed, disk, cache.close)  # a stop compacts
    return {
        "entries": entries,
        # Times: medians; bytes: the mean, so that a compaction among the check-ins counts.
        "checkin": (*(statistics.median(r[i] for r in rows) for i in range(2)),
                    statistics.mean(r[2] for r in rows)),
        "compaction": tuple(statistics.median(r[i] for r in (first, last)) for i in range(3)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--checkins", type=int, default=30)
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args()
    print("| answers | write | on the event loop ms | on the writer thread ms | bytes written |")
    print("|---:|---|---:|---:|---:|")
    for n in args.entries:
        result = measure(args.dir, n, args.checkins)
        for kind in ("checkin", "compaction"):
            on, off, written = result[kind]
            print(f"| {n:,} | {kind} | {on:.2f} | {off:.2f} | {written:,.0f} |")


if __name__ == "__main__":
    main()

"""Trust cache files made for tests: answers stored at a given time, a snapshot and its journal."""

from __future__ import annotations

from license_proxy.trustcache import Entry, TrustCache

T0 = 1_800_000_000.0


def entry_at(when):
    return Entry(200, (), b"answer at %d" % when, when)


def journal_of(path):
    return path.parent / (path.name + ".journal")


def two_journaled(path, clock):
    """A cache at ``path`` whose first answer is in the snapshot, the second in the journal."""
    cache = TrustCache.load(clock, str(path))
    cache.store("k0", entry_at(T0))
    cache.flush()
    cache.store("k1", entry_at(T0 + 1))
    cache.flush()
    return cache

"""The trust cache in memory, alone: no clock but a number, no disk, no reactor."""

from __future__ import annotations

from license_proxy.memorycache import MemoryCache
from tests.support.cachefiles import T0, entry_at


def memory(**kwargs) -> MemoryCache:
    return MemoryCache(lambda: T0, **kwargs)


def test_entries_are_listed_with_the_dates_they_were_stored_oldest_first():
    cache = memory()
    cache.store("b", entry_at(T0 - 5))
    cache.store("a", entry_at(T0 - 1))
    assert list(cache.entries()) == [("b", entry_at(T0 - 5)), ("a", entry_at(T0 - 1))]


def test_an_offered_entry_keeps_its_date_and_is_taken_only_if_newer_than_what_is_held():
    cache = memory()
    cache.store("k", entry_at(T0 - 10))
    cache.take_changes()
    assert not cache.offer("k", entry_at(T0 - 10))  # the same date: nothing newer
    assert not cache.offer("k", entry_at(T0 - 20))
    assert cache.lookup("k") == entry_at(T0 - 10) and cache.take_changes() == {}
    assert cache.offer("k", entry_at(T0 - 3))
    assert cache.lookup("k") == entry_at(T0 - 3)  # its own date, not now
    assert cache.offer("new", entry_at(T0 - 100))
    assert sorted(cache.take_changes()) == ["k", "new"]  # for the file to learn of them


def test_offered_entries_count_as_kept_and_respect_the_bound():
    cache = memory(max_entries=2)
    cache.offer("peer", entry_at(T0 - 50))
    cache.store("one-off", entry_at(T0))
    cache.store("another", entry_at(T0))  # full: the one-off goes, not the peer's kept answer
    assert [key for key, _ in cache.entries()] == ["peer", "another"]
    assert cache.evictions == 1


def test_a_peer_with_the_same_salt_computes_the_same_keys():
    one = memory()
    other = memory(salt=one.salt)
    args = (b"POST", b"/v1/x", [(b"authorization", b"Token a")])
    assert one.key(*args) == other.key(*args) != memory().key(*args)

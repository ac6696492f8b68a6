"""The trust cache on disk: durable, coalesced, private, and forgiving of a bad file."""

from __future__ import annotations

import json
import os
import stat

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from license_proxy.trustcache import FLUSH_DELAY, Entry, TrustCache

T0 = 1_800_000_000.0
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
    assert os.listdir(tmp_path) == ["cache.json"]


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
    [b"{not json", b"[]", b'{"format":99}', b'{"format":1,"salt":"zz","entries":{},"last_successful_checkin":null}', b"\x00" * 10],
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


def test_a_failed_write_keeps_serving_from_memory_and_recovers(tmp_path, clock):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    cache = TrustCache.load(clock, str(blocker / "cache.json"))
    cache.store("k", ANSWER)
    with capturedLogs() as events:
        cache.flush()
        clock.advance(FLUSH_DELAY)
    errors = [e for e in events if "cannot write trust cache" in e["log_format"]]
    assert len(errors) == 1
    assert cache.lookup("k") == ANSWER
    blocker.unlink()
    blocker.mkdir()
    clock.advance(FLUSH_DELAY)
    assert TrustCache.load(clock, str(blocker / "cache.json")).lookup("k") == ANSWER

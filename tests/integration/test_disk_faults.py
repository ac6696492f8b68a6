"""
End to end: a real proxy whose state directory is a real, small tmpfs that
fills up (ENOSPC) or is remounted read-only under it.  The proxy must keep
serving from memory, say so in its status, log and metrics, never damage the
cache file already there, leave no temporary file, and recover by itself when
the disk does.  Mounting needs root, which CI has: no mount is a failure.
"""

from __future__ import annotations

import subprocess

import pytest
from twisted.internet.task import Clock

from license_proxy.trustcache import TrustCache

from tests.support.configs import PROBE, config
from tests.support.metrics import scrape
from tests.support.proxy import ProxyProcess

WRITE_FAILS = "cannot write trust cache"


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")


@pytest.fixture
def state(tmp_path):
    """``tmp_path/state``: a 256 kB tmpfs, unmounted after the test."""
    directory = tmp_path / "state"
    directory.mkdir()
    _run("mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(directory))
    yield directory
    _run("umount", str(directory))


@pytest.fixture
def proxy(tmp_path, pki, upstream, state):
    text = config(tmp_path, pki, upstream.url, trust='duration = "1h"\ncheckin_interval = "1s"')
    with ProxyProcess(tmp_path, text) as p:
        p.wait_state("Connected")
        upstream.respond(body=b'{"license":"first"}')
        assert p.request("GET", "/v1/first")[0] == 200
        p.wait_status(lambda _: len(on_disk(state)) == 1, "the first answer on disk")
        yield p


def on_disk(state) -> TrustCache:
    """The trust cache as a restart would find it (snapshot and journal)."""
    return TrustCache.load(Clock(), str(state / "trust-cache.json"))


def not_persisted(status: dict) -> bool:
    return status["cache_persisted"] is False


def persisted(status: dict) -> bool:
    return status["cache_persisted"] is True


def fill(state) -> None:
    with open(state / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.strerror == "No space left on device"


def test_a_full_disk_keeps_the_proxy_serving_from_memory_and_it_recovers(proxy, upstream, state):
    saved = (state / "trust-cache.json").read_bytes()
    fill(state)
    # A check-in's line may still fit in the journal's last page; a new answer of 8 kB can't.
    second = b'{"license":"second","pad":"%s"}' % (b"x" * 8192)
    upstream.respond(body=second)
    assert proxy.request("GET", "/v1/second")[0] == 200
    status = proxy.wait_status(not_persisted, "cache_persisted false")
    assert status["cache_error"] == "No space left on device"
    assert status["state"] == "Connected" and PROBE.search(proxy.raw_status)
    assert scrape(proxy)["license_proxy_cache_persisted", ()] == 0

    # New answers are kept in memory, and served from there when the license server is gone.
    upstream.stop()
    code, _, body = proxy.request("GET", "/v1/second")
    assert (code, body) == (200, second)
    assert proxy.wait_state("TrustBased")["cache_persisted"] is False
    upstream.start()
    proxy.wait_state("Connected")

    # The snapshot in place was never touched, and no temporary file was left.
    assert (state / "trust-cache.json").read_bytes() == saved
    assert not list(state.glob("*.tmp-*"))

    (state / "filler").unlink()
    status = proxy.wait_status(persisted, "cache_persisted true", timeout=40)
    assert status["cache_error"] is None
    assert scrape(proxy)["license_proxy_cache_persisted", ()] == 1
    assert len(on_disk(state)) == 2
    log = proxy.log_text()
    assert log.count(WRITE_FAILS) == 1
    assert f"{WRITE_FAILS} {state}/trust-cache.json: No space left on device" in log
    assert "is written again (it could not be: No space left on device)" in log
    assert "Traceback" not in log


def test_a_read_only_disk_is_reported_it_recovers_and_a_stop_is_still_clean(proxy, state):
    _run("mount", "-o", "remount,ro", str(state))
    status = proxy.wait_status(not_persisted, "cache_persisted false")
    assert status["cache_error"] == "Read-only file system"
    assert status["state"] == "Connected"

    _run("mount", "-o", "remount,rw", str(state))
    proxy.wait_status(persisted, "cache_persisted true", timeout=40)
    before = on_disk(state).last_checkin
    proxy.wait_status(
        lambda _: on_disk(state).last_checkin > before,
        "check-ins written again",
    )

    _run("mount", "-o", "remount,ro", str(state))
    proxy.wait_status(not_persisted, "cache_persisted false")
    assert proxy.terminate() in (0, -15)
    log = proxy.log_text()
    assert log.count(f"{WRITE_FAILS} {state}/trust-cache.json: Read-only file system") == 2
    assert f"trust cache {state}/trust-cache.json not written at stop (Read-only file system)" in log
    assert "Traceback" not in log
    assert not list(state.glob("*.tmp-*"))

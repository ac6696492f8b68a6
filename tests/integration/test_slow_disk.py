"""
A slow disk does not slow clients, end to end: two real proxies relay the same paced traffic
side by side, each under strace, one of them with every fsync and fdatasync held for a second
(``strace --seccomp-bpf -e inject=fsync,fdatasync:delay_enter=1s``, a real syscall made slow
in the real process; the other under the same strace without the delay).  The clients are wrk,
paced, one kept-alive connection each: C, outside this process, so they add little noise.
Every relay stores a new answer and moves the check-in time, so the slow proxy's writer is in
a held fsync for most of the run; its clients must not notice, measured against the normal
proxy, whose requests go at the same moments:

- no relay waited for a held fsync: the slowest is less than ``HELD`` - 100 ms slower than the
  normal proxy's slowest (a relay that waited for one is a whole ``HELD`` late);
- the relays are not slower: the 99th percentile is at most 100 ms over the normal proxy's.
  The percentile rather than the slowest, because a CPU spike on this shared machine delays one
  relay of one proxy and not the other (seen once: 237 ms against 62 ms, with five busy
  processes on two cores); a writer that held the event loop delays the ~20 relays of each
  held second, which the percentile sees.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from bench.harness import run_wrk
from license_proxy.trustcache import TrustCache
from tests.support.configs import config
from tests.support.proxy import ProxyProcess

RATE = 20  # requests per second, to each proxy
SECONDS = 10
HELD = 1.0  # seconds each fsync of the slow proxy is held
SLOWER = 0.100  # seconds the slow proxy's relays may take over the normal proxy's
DELAYED = re.compile(r"\bf(data)?sync\(.*\(DELAYED\)")


def _under_strace(log: Path, delay: str | None) -> tuple[str, ...]:
    """strace as a wrapper: only fsync and fdatasync stop the process (seccomp), logged to
    ``log``; with ``delay``, each is held that long before it runs."""
    found = shutil.which("strace")
    if found is None:  # .ci/run installs it: missing is a failure, not a skip
        pytest.fail("strace is not installed (apt-get install strace)")
    command = [found, "-f", "-qq", "--seccomp-bpf", "-e", "trace=fsync,fdatasync", "-o", str(log)]
    if delay:
        command += ["-e", f"inject=fsync,fdatasync:delay_enter={delay}"]
    return tuple(command)


def _held(log: Path) -> int:
    """fsyncs held so far."""
    try:
        return len(DELAYED.findall(log.read_text()))
    except FileNotFoundError:
        return 0


def _paced(proxy: ProxyProcess, results: dict, name: str) -> None:
    """RATE requests a second for SECONDS from wrk (C: the client adds no noise of its own)
    on a kept-alive connection, each for a new path: a new answer to store."""
    results[name] = run_wrk(
        f"https://{proxy.host}:{proxy.port}/", connections=1, seconds=SECONDS, rate=RATE,
        distinct=1_000_000, distinct_path=f"/v1/slow-disk/{name}/",
    )


@pytest.mark.timeout(120)
def test_a_disk_taking_a_second_per_fsync_does_not_slow_the_relays(tmp_path, pki, upstream):
    proxies = {}
    for name in ("normal", "slow"):
        (tmp_path / name).mkdir()
        text = config(tmp_path / name, pki, upstream.url,
                      trust='duration = "1h"\ncheckin_interval = "1s"')
        wrapper = _under_strace(tmp_path / f"{name}.strace", f"{HELD:g}s" if name == "slow" else None)
        proxies[name] = ProxyProcess(tmp_path / name, text, wrapper=wrapper)
    slow_log = tmp_path / "slow.strace"
    try:
        for proxy in proxies.values():
            proxy.start()
        for proxy in proxies.values():
            proxy.wait_state("Connected")
        # Check-ins every second make a write every 2 s: wait for a held fsync, so the
        # injection is known to work before anything is measured.
        deadline = time.monotonic() + 15
        while _held(slow_log) == 0:
            assert time.monotonic() < deadline, "no fsync was held"
            time.sleep(0.05)
        held_before = _held(slow_log)

        results: dict[str, dict] = {}
        clients = [threading.Thread(target=_paced, args=(proxy, results, name))
                   for name, proxy in proxies.items()]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        held = _held(slow_log) - held_before
    except BaseException:
        for proxy in proxies.values():
            if proxy.running:
                proxy.kill()
        raise

    normal, slow = (results[name] for name in ("normal", "slow"))
    figures = "; ".join(
        f"{name} disk: max {r['max_us'] / 1000:.1f} ms, p99 {r['p99_us'] / 1000:.1f} ms,"
        f" p50 {r['p50_us'] / 1000:.1f} ms" for name, r in results.items()
    )
    print(f"\nslow disk: {held} fsyncs held {HELD:g} s each in {SECONDS} s at {RATE}/s; {figures}")
    # The writer was held for most of the run (writes every 2 s, each at least a second)...
    assert held >= SECONDS // 3, held
    # ...and no client waited for it.
    assert slow["max_us"] < normal["max_us"] + (HELD - SLOWER) * 1e6, (slow, normal)
    assert slow["p99_us"] <= normal["p99_us"] + SLOWER * 1e6, (slow, normal)
    for r in results.values():
        assert r["requests"] >= RATE * SECONDS * 0.9, r
        assert sum(r[k] for k in ("connect", "read", "write", "status", "timeout")) == 0, r

    # The slow disk still gets everything, a second per fsync later.
    slow_proxy = proxies["slow"]
    cache = tmp_path / "slow" / "state" / "trust-cache.json"
    slow_proxy.wait_status(
        lambda s: s["cache_persisted"]
        and len(TrustCache.load(Clock(), str(cache))) >= slow["requests"],
        "every answer written", timeout=20,
    )
    for proxy in proxies.values():
        assert proxy.terminate() in (0, -15)
        assert "Traceback" not in proxy.log_text()

"""
Load test: 200 concurrent clients relaying through a real ``twistd license-proxy`` to a real
TLS upstream for 60 s, on loopback; zero errors and bounded memory, or a non-zero exit.

Run it with ``bash bench/load`` (see docs/performance.md).  The upstream is the
benchmark's nginx (a fixed JSON answer, never the bottleneck) and the proxy is the benchmark's,
with its default limits (bench/harness.py).  The clients are three wrk processes at once:

- keep-alive GETs of one request (one cache entry, answers overwritten all the time);
- keep-alive GETs of distinct requests, a new path each time in turn (new cache entries);
- POSTs with ``Connection: close``: a new TCP connection and full TLS handshake per request.

Errors are counted by kind (wrk's connect, read, write, timeout, and non-2xx answers), plus any
answered request that never reached the upstream (the relay must relay, not answer from trust).
The proxy's memory (VmRSS sampled every second, VmHWM for the peak) must stay under the memory
limit of the shipped Kubernetes manifest unless ``--max-rss-mib`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from harness import PATH, POST_BODY, REPO, Bench, UpstreamCounter, load, memory_kib, run_wrk

DEPLOYMENT = REPO / "etc" / "kubernetes" / "deployment.yaml"
ERROR_KINDS = ("status", "connect", "read", "write", "timeout")


def memory_limit_mib() -> int:
    """The container's memory limit in the shipped Kubernetes manifest (``limits: memory:``)."""
    match = re.search(r"limits:\s*\n\s*memory:\s*(\d+)Mi", DEPLOYMENT.read_text())
    if not match:
        raise SystemExit(f"load: no 'limits: memory: NMi' in {DEPLOYMENT}")
    return int(match.group(1))


def clients(connections: int) -> list[dict]:
    """The three client groups sharing ``connections`` (60 % / 20 % / 20 %)."""
    distinct = connections // 5
    fresh = connections // 5
    return [
        {"name": "keep-alive, one request", "connections": connections - distinct - fresh},
        {"name": "keep-alive, distinct requests", "connections": distinct,
         "distinct": 100000, "distinct_path": "/v1/load/"},
        {"name": "new connection per request, POST", "connections": fresh, "close": True,
         "method": "POST", "body": POST_BODY},
    ]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """The proxy's VmRSS and open descriptors, once a second, in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append((round(time.monotonic() - self._started, 1),
                                 memory_kib([self.pid], "VmRSS"), open_fds(self.pid)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--max-rss-mib", type=float, default=None,
                        help="peak RSS bound (default: the Kubernetes manifest's memory limit)")
    parser.add_argument("--out", default=str(REPO / "bench" / "load-results.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    bound_mib = args.max_rss_mib or memory_limit_mib()

    bench = Bench(argparse.Namespace(nginx_workers=1))
    ours = bench.ours
    counter = UpstreamCounter(bench.count_port)
    groups = clients(args.connections)
    load_before = load()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"load: {args.connections} clients for {args.seconds:g} s; load average "
          f"{load_before}; working in {bench.root}", flush=True)
    try:
        bench.upstream.start(bench.up_port)
        ours.start()
        pid = ours.pids()[0]
        rss_start, fds_start = memory_kib([pid], "VmRSS"), open_fds(pid)
        url = f"https://127.0.0.1:{ours.port}"
        before = counter.read()
        started = time.monotonic()
        with Sampler(pid) as sampler, ThreadPoolExecutor(len(groups)) as pool:
            runs = [
                pool.submit(run_wrk, url + g.get("distinct_path", PATH),
                            connections=g["connections"], seconds=args.seconds,
                            method=g.get("method", "GET"), body=g.get("body"),
                            close=g.get("close", False), distinct=g.get("distinct"),
                            distinct_path=g.get("distinct_path", "/"))
                for g in groups
            ]
            results = [run.result() for run in runs]
        elapsed = time.monotonic() - started
        relayed = counter.since(before)
        time.sleep(2.5)  # the trust cache file is written at most 2 s after a change
        end = {
            "rss_kib": memory_kib([pid], "VmRSS"), "hwm_kib": memory_kib([pid], "VmHWM"),
            "fds": open_fds(pid), "cache_entries": ours.cached_entries(),
        }
    finally:
        ours.stop()
        bench.upstream.stop()

    requests = sum(r["requests"] for r in results)
    errors = {kind: sum(r[kind] for r in results) for kind in ERROR_KINDS}
    errors["not relayed"] = max(0, requests - relayed)
    for group, result in zip(groups, results):
        group.update(
            requests=result["requests"], rps=result["requests"] / (result["duration_us"] / 1e6),
            p50_ms=result["p50_us"] / 1000, p99_ms=result["p99_us"] / 1000,
            max_ms=result["max_us"] / 1000,
            errors={kind: result[kind] for kind in ERROR_KINDS}, wrk=result,
        )
    peak_mib = end["hwm_kib"] / 1024
    failures = [f"{n} {kind} errors" for kind, n in errors.items() if n]
    if peak_mib > bound_mib:
        failures.append(f"peak RSS {peak_mib:.1f} MiB over the bound of {bound_mib:g} MiB")
    result = {
        "started": started_at,
        "cpus": os.cpu_count(), "load_before": load_before, "load_after": load(),
        "settings": {"seconds": args.seconds, "connections": args.connections,
                     "max_rss_mib": bound_mib},
        "requests": requests, "rps": requests / elapsed, "upstream_requests": relayed,
        "max_ms": max(g["max_ms"] for g in groups),
        "errors": errors, "error_total": sum(errors.values()),
        "rss_start_mib": rss_start / 1024, "rss_peak_mib": peak_mib,
        "rss_end_mib": end["rss_kib"] / 1024,
        "fds_start": fds_start, "fds_end": end["fds"], "cache_entries": end["cache_entries"],
        "groups": groups,
        "samples": [{"s": s, "rss_mib": round(kib / 1024, 1), "fds": fds}
                    for s, kib, fds in sampler.samples],
        "passed": not failures,
    }
    for g in groups:
        print(f"  {g['connections']:3d} x {g['name']:<34} {g['requests']:7d} requests "
              f"{g['rps']:7.0f} req/s  p50 {g['p50_ms']:7.1f} ms  p99 {g['p99_ms']:7.1f} ms  "
              f"max {g['max_ms']:7.1f} ms  errors {sum(g['errors'].values())}")
    print(f"load: {requests} requests in {elapsed:.1f} s ({result['rps']:.0f} req/s), "
          f"{relayed} reached the upstream; max latency {result['max_ms']:.0f} ms")
    print("load: errors " + ", ".join(f"{kind} {n}" for kind, n in errors.items()))
    print(f"load: RSS start {result['rss_start_mib']:.1f} MiB, peak (VmHWM) {peak_mib:.1f} MiB, "
          f"end {result['rss_end_mib']:.1f} MiB (bound {bound_mib:g} MiB); open fds "
          f"{fds_start} at start, {end['fds']} at end; {end['cache_entries']} cache entries")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"load: {'passed' if not failures else 'FAILED: ' + '; '.join(failures)}; "
          f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(bench.root, ignore_errors=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())

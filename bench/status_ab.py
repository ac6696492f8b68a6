"""
The status listener of two checkouts side by side, in one run: each checkout's proxy (its own
``.venv/bin/twistd``, its source on ``PYTHONPATH``, as bench/harness.py runs one) in front of
the same demo license server, measured with wrk on the same path, alternating round by round
so that the machine's load falls on both alike; medians are printed.  For a change that must
not make ``GET /v1/status`` (workload 4) worse:

    git archive BASE | tar -x -C /tmp/base && (cd /tmp/base && python3 -m venv .venv &&
        .venv/bin/pip install -q .)
    .venv/bin/python bench/status_ab.py --before /tmp/base --after .
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import CLK_TCK, Ours, cpu_ticks, cpu_used, free_port, run_wrk, wait_port  # noqa: E402


class Checkout(Ours):
    """``Ours``, run from another checkout: ``Ours.start`` takes the twistd and the source
    from the harness module's ``TWISTD`` and ``REPO``, so they are that checkout's while it
    starts."""

    def __init__(self, checkout: Path, *args) -> None:
        super().__init__(*args)
        self.checkout = checkout

    def start(self) -> None:
        import harness

        twistd, repo = harness.TWISTD, harness.REPO
        harness.TWISTD = str(self.checkout / ".venv" / "bin" / "twistd")
        harness.REPO = self.checkout
        try:
            super().start()
        finally:
            harness.TWISTD, harness.REPO = twistd, repo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout with its .venv")
    parser.add_argument("--after", type=Path, required=True, help="a checkout with its .venv")
    parser.add_argument("--path", action="append", help="default: /v1/status (repeatable)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    paths = args.path or ["/v1/status"]
    root = Path(tempfile.mkdtemp(prefix="license-proxy-status-ab-"))
    demo_port = free_port()
    demo = subprocess.Popen(
        [str(args.after.resolve() / ".venv" / "bin" / "license-proxy-demo-upstream"),
         "--dir", str(root / "demo"), "--port", str(demo_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    proxies = {}
    try:
        wait_port(demo_port, demo, "the demo license server", timeout=30)
        for name in ("before", "after"):
            proxies[name] = Checkout(
                getattr(args, name).resolve(), root / name, free_port(), free_port(), demo_port,
                root / "demo" / "upstream.crt", root / "demo" / "upstream.key",
                root / "demo" / "ca.crt",
            )
            proxies[name].start()
        runs: dict[tuple[str, str], list[dict]] = {}
        for round_no in range(args.rounds):
            for path in paths:
                order = ["before", "after"] if round_no % 2 == 0 else ["after", "before"]
                for name in order:
                    proxy = proxies[name]
                    before = cpu_ticks(proxy.pids())
                    result = run_wrk(f"http://127.0.0.1:{proxy.status_port}{path}",
                                     connections=args.connections, seconds=args.seconds)
                    ticks = cpu_used(before, cpu_ticks(proxy.pids()))
                    errors = sum(result[k] for k in ("connect", "read", "write", "status",
                                                     "timeout"))
                    run = {"rps": result["requests"] / (result["duration_us"] / 1e6),
                           "p50": result["p50_us"] / 1000, "p99": result["p99_us"] / 1000,
                           "cpu": ticks / CLK_TCK * 1e6 / max(1, result["requests"]),
                           "errors": errors}
                    runs.setdefault((path, name), []).append(run)
                    print(f"round {round_no + 1} {path} {name:<6} {run['rps']:7.0f} req/s"
                          f"  p50 {run['p50']:6.2f} ms  p99 {run['p99']:6.2f} ms"
                          f"  cpu {run['cpu']:5.0f} us/req  errors {errors}", flush=True)
        print(f"medians over {args.rounds} rounds of {args.seconds:g} s, {args.connections}"
              " connections, load " + open("/proc/loadavg").read().split()[0] + ":")
        for (path, name), rs in runs.items():
            print(f"  {path} {name:<6} "
                  + "  ".join(f"{k} {statistics.median(r[k] for r in rs):.2f}"
                              for k in ("rps", "p50", "p99", "cpu"))
                  + f"  errors {sum(r['errors'] for r in rs)}")
    finally:
        for proxy in proxies.values():
            proxy.stop()
        demo.terminate()
        try:
            demo.wait(10)
        except subprocess.TimeoutExpired:
            demo.kill()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

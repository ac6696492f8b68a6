"""
How long a client waits for its answer when the license server breaks in each
way issue 4 lists, and what the retry of a stale pooled connection costs.

One real ``twistd license-proxy`` (``timeout = "2s"``) in front of the tests'
TLS upstream on loopback; each fault is applied to a working upstream whose
answer to ``GET /v1/lic`` is cached, then one request (the first of the
outage) and ``--rounds`` more (each on a new client connection, as containers
make them) are timed: the first, and the median of the others, in ms.

    python bench/faults.py --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.configs import config  # noqa: E402
from tests.support.faults import FAULTS  # noqa: E402
from tests.support.pki import make_pki  # noqa: E402
from tests.support.proxy import ProxyProcess  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402


def timed(proxy, upstream, rounds: int) -> str:
    """The first GET's ms, the median ms of ``rounds`` GETs after it, upstream
    requests and connections per GET, and the answers seen, as a line of the table."""
    started = time.perf_counter()
    proxy.request("GET", "/v1/lic")
    first = (time.perf_counter() - started) * 1000
    times, codes = [], set()
    requests, connections = len(upstream.requests), upstream.connections
    for _ in range(rounds):
        started = time.perf_counter()
        code, headers, _ = proxy.request("GET", "/v1/lic")
        times.append((time.perf_counter() - started) * 1000)
        codes.add(f"{code}{' with Age' if 'Age' in headers else ''}")
    requests = (len(upstream.requests) - requests) / rounds
    connections = (upstream.connections - connections) / rounds
    return (f"{first:9.1f} {statistics.median(times):9.1f} {requests:9.1f} {connections:11.1f}"
            f"  {', '.join(sorted(codes))}")


def healthy(upstream, pki) -> None:
    """Back to a working upstream with fresh connections only."""
    upstream.stop()
    upstream.mode = "normal"
    upstream.use_certificate(pki.server_cert, pki.server_key)
    upstream.respond(body=b'{"license":"good"}')
    upstream.start()


def back(proxy) -> None:
    """Wait until the proxy's probe has found the license server back (a fault
    marks it down; see docs/outages.md)."""
    proxy.wait_status(lambda s: all(x["up"] for x in s["license_servers"]), "server up", 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pki = make_pki(tmp)
        with Upstream(pki.server_cert, pki.server_key) as upstream:
            with ProxyProcess(tmp, config(tmp, pki, upstream.url)) as proxy:
                proxy.wait_state("Connected")
                healthy(upstream, pki)
                print(f"{'upstream':40} {'first ms':>9} {'then, ms':>9} {'requests':>9}"
                      f" {'connections':>11}  answers")
                proxy.request("GET", "/v1/lic")
                print(f"{'healthy, pooled connection':40} {timed(proxy, upstream, rounds)}")
                upstream.mode = "close_reused"  # every request meets a closed pooled connection
                print(f"{'healthy, stale pooled connection':40} {timed(proxy, upstream, rounds)}")
                for name, misbehave in FAULTS.items():
                    healthy(upstream, pki)
                    back(proxy)
                    proxy.request("GET", "/v1/lic")
                    misbehave(upstream, pki)
                    print(f"{name:40} {timed(proxy, upstream, rounds)}")
                healthy(upstream, pki)


if __name__ == "__main__":
    main()

"""
A fleet arriving at once, seen from the license server: how many connections the proxy holds
open to it at the same time (issue 20: 389 for 1,000 clients, with nothing bounding them).

A real ``twistd license-proxy`` (the checkout this script is in, or ``--repo``'s) in front of
the tests' TLS license server (``tests/support/upstream.py``, which counts the connections it
has open and answers after ``--delay`` seconds, as a distant server would); ``--clients``
clients connect at once, each sends one licensing request on its own TLS connection.  Prints
one JSON line: the most connections open at the license server at once, the answers by
status, the clients' latency.

    .venv/bin/python bench/upstreamstorm.py --clients 1000 --max-connections 32
    .venv/bin/python bench/upstreamstorm.py --clients 1000 --repo /path/to/main/checkout
    .venv/bin/python bench/upstreamstorm.py --slot-cost    # what the bound costs an exchange
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from tests.support.pki import make_pki  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(root: Path, repo: Path, upstream: Upstream, ca: str, license_lines: str):
    port, status_port = free_port(), free_port()
    config = root / "license-proxy.toml"
    config.write_text(f"""[server]
host = "127.0.0.1"
port = {port}
status_port = {status_port}

[license]
server_url = "{upstream.url}"
ca_file = "{ca}"
key = "storm-key"
{license_lines}

[cache]
path = "{root}/state/trust-cache.json"
""")
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")}
    env["PYTHONPATH"] = str(repo)
    log = open(root / "proxy.log", "ab")
    proc = subprocess.Popen(
        [TWISTD, "--nodaemon", "--pidfile=", "license-proxy", "--config", str(config)],
        cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    log.close()
    status = f"http://127.0.0.1:{status_port}/v1/status"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with opener.open(status, timeout=2) as r:
                if json.loads(r.read())["state"] == "Connected":
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"upstreamstorm: the proxy did not become Connected; see {root}/proxy.log")


async def client(port: int, n: int, context: ssl.SSLContext, start: asyncio.Event):
    await start.wait()
    began = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context), 60
        )
        writer.write(b"GET /v1/lic/%d HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n" % n)
        head = await asyncio.wait_for(reader.readline(), 60)
        await asyncio.wait_for(reader.read(), 60)
        writer.close()
        status = int(head.split()[1]) if head else 0
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        status = 0
    return status, time.monotonic() - began


async def storm(port: int, clients: int):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    start = asyncio.Event()
    tasks = [asyncio.create_task(client(port, n, context, start)) for n in range(clients)]
    await asyncio.sleep(0.1)
    start.set()
    return await asyncio.gather(*tasks)


def slot_cost(exchanges: int = 100_000) -> None:
    """CPU per exchange of taking and giving back a connection slot as ``Upstream.attempt``
    does, one being free (the common case), on the real reactor."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from license_proxy.slots import Slots

    slots = Slots(reactor, "https://license.example", 32, 1024)

    async def free() -> None:
        for _ in range(exchanges):
            await slots.take(2.0)
            slots.give()

    def run() -> None:
        began = time.process_time()
        Deferred.fromCoroutine(free())
        spent = time.process_time() - began
        print(json.dumps({"slot_cost_us": round(spent / exchanges * 1e6, 2),
                          "exchanges": exchanges}), flush=True)
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.05,
                        help="seconds the license server takes to answer")
    parser.add_argument("--max-connections", type=int,
                        help="[license] max_connections (unset: not written; the default)")
    parser.add_argument("--repo", default=str(HERE), help="the checkout the proxy runs from")
    parser.add_argument("--slot-cost", action="store_true",
                        help="only measure what the bound costs an exchange")
    args = parser.parse_args(argv)
    if args.slot_cost:
        slot_cost()
        return 0
    with tempfile.TemporaryDirectory(prefix="upstreamstorm-") as tmp:
        root = Path(tmp)
        pki = make_pki(root)
        license_lines = ("" if args.max_connections is None
                         else f"max_connections = {args.max_connections}")
        with Upstream(pki.server_cert, pki.server_key) as upstream:
            upstream.delay = args.delay
            proc, port = start_proxy(root, Path(args.repo), upstream, pki.ca_cert, license_lines)
            try:
                upstream.most_open = upstream.open_connections
                began = time.monotonic()
                results = asyncio.run(storm(port, args.clients))
                took = time.monotonic() - began
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        latencies = sorted(t for _, t in results)
        codes: dict[str, int] = {}
        for status, _ in results:
            codes[str(status)] = codes.get(str(status), 0) + 1
        print(json.dumps({
            "repo": args.repo, "clients": args.clients, "delay": args.delay,
            "max_connections": args.max_connections,
            "most_upstream_connections_at_once": upstream.most_open,
            "upstream_connections_total": upstream.connections,
            "answers": codes, "seconds": round(took, 2),
            "p50": round(statistics.median(latencies), 3),
            "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 3),
            "load": os.getloadavg()[0],
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
What hostile clients cost a well-behaved one: a real ``twistd license-proxy`` in front of the
tests' TLS upstream, on loopback.  One client relays licensing requests (a fresh TLS connection
each, as the containers do) first alone, then while attackers hold slowloris connections on both
listeners, send bodies over the limit, and open connections past the per-peer limit.  Prints the
well-behaved client's answers per second and latency, what the attackers got, and the proxy's
memory.

    .venv/bin/python bench/hostile.py [--seconds 15] [--slowloris 400]
"""

from __future__ import annotations

import argparse
import collections
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.configs import config  # noqa: E402
from tests.support.pki import make_pki  # noqa: E402
from tests.support.proxy import ProxyProcess  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402


def relay_for(proxy: ProxyProcess, seconds: float) -> list[float]:
    """Latencies of back-to-back licensing requests for ``seconds``."""
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        code, _, _ = proxy.request("POST", "/v1/check", body=b'{"instance":1}')
        assert code == 200, code
        latencies.append(time.monotonic() - start)
    return latencies


def summary(latencies: list[float], seconds: float) -> str:
    ms = sorted(1000 * x for x in latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return (f"{len(ms) / seconds:7.1f} answers/s   p50 {statistics.median(ms):6.1f} ms"
            f"   p99 {p99:6.1f} ms")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Attack:
    """Attackers from 127.0.0.2 and 127.0.0.3, each in its own thread, until ``stop``."""

    def __init__(self, proxy: ProxyProcess, slowloris: int, kinds: tuple[str, ...]) -> None:
        self.proxy = proxy
        self.slowloris = slowloris
        self.stopping = threading.Event()
        self.seen: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.threads = []
        if "slowloris" in kinds:
            self.threads += [threading.Thread(target=self._slowloris, args=(port,), daemon=True)
                             for port in (proxy.port, proxy.status_port)]
        if "oversize" in kinds:
            self.threads.append(threading.Thread(target=self._oversize, daemon=True))
        if "flood" in kinds:
            self.threads.append(threading.Thread(target=self._flood, daemon=True))

    def count(self, what: str) -> None:
        with self.lock:
            self.seen[what] += 1

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def _slowloris(self, port: int) -> None:
        """Hold ``slowloris`` connections sending a head one byte a second; reopen closed ones."""
        socks: list[socket.socket] = []
        while not self.stopping.is_set():
            while len(socks) < self.slowloris:
                try:
                    socks.append(socket.create_connection(
                        (self.proxy.host, port), 5, ("127.0.0.2", 0)))
                except OSError:
                    self.count("slowloris connect failed")
                    break
            for sock in list(socks):
                try:
                    sock.send(b"G")
                except OSError:
                    self.count(f"slowloris closed by the proxy (port {port})")
                    socks.remove(sock)
                    sock.close()
            self.stopping.wait(1)
        for sock in socks:
            sock.close()

    def _oversize(self) -> None:
        """Bodies over the limit on the status port, back to back."""
        while not self.stopping.is_set():
            with socket.create_connection(
                    (self.proxy.host, self.proxy.status_port), 5, ("127.0.0.3", 0)) as sock:
                sock.sendall(b"POST /v1/status HTTP/1.1\r\nHost: p\r\nContent-Length: 99999999\r\n"
                             b"\r\n")
                self.count(sock.recv(12).decode(errors="replace") or "closed")

    def _flood(self) -> None:
        """Fill the peer's quota on the licensing listener, then connect again and again."""
        held = [socket.create_connection((self.proxy.host, self.proxy.port), 5, ("127.0.0.2", 0))
                for _ in range(self.slowloris)]
        while not self.stopping.is_set():
            try:
                with socket.create_connection(
                        (self.proxy.host, self.proxy.port), 5, ("127.0.0.2", 0)) as sock:
                    self.count("over the peer limit: "
                               + ("closed at once" if sock.recv(1) == b"" else "data"))
            except OSError as e:
                self.count(f"over the peer limit: {type(e).__name__}")
        for sock in held:
            sock.close()


PHASES = [
    ("alone", ()),
    ("slowloris on both listeners", ("slowloris",)),
    ("bodies over the limit", ("oversize",)),
    ("connections over the peer limit", ("flood",)),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--slowloris", type=int, default=400, help="per listener")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = make_pki(root)
        with Upstream(pki.server_cert, pki.server_key) as upstream:
            limit = f"max_connections_per_peer = {args.slowloris}"
            text = config(root, pki, upstream.url, server=limit)
            with ProxyProcess(root, text) as proxy:
                proxy.wait_state("Connected")
                upstream.respond(body=b'{"license":"valid"}')
                relay_for(proxy, 1)  # warm up
                print(f"{args.seconds:g} s per phase; {args.slowloris} slowloris connections per"
                      " listener, header_timeout 10 s")
                for name, kinds in PHASES:
                    attack = Attack(proxy, args.slowloris, kinds)
                    attack.start()
                    time.sleep(3 if kinds else 0)  # the attackers are in place
                    latencies = relay_for(proxy, args.seconds)
                    rss = rss_kib(proxy.process.pid)
                    attack.stop()
                    print(f"{name:32s} {summary(latencies, args.seconds)}"
                          f"   proxy RSS {rss // 1024} MiB")
                    for what, count in sorted(attack.seen.items()):
                        print(f"    {count:7d}  {what}")
                assert proxy.status()["state"] == "Connected"
                assert "Traceback" not in proxy.log_text()
    return 0


if __name__ == "__main__":
    sys.exit(main())

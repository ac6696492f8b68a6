"""
A reconnect storm: a fleet's clients all connecting at once (after a network blip, or when an
instance is swapped), against a real ``twistd license-proxy`` in front of the tests' TLS
upstream, on loopback, once per listen backlog in the same run (Twisted's default, 50, then
license-proxy's, 4,096).  Each client opens its own connection, sends one request and reads the
answer: ``GET /v1/status`` on the status listener, a TLS handshake and ``TRACE`` (answered 405 by
the proxy itself, so the license server is not what is measured) on the licensing one.  Prints,
per listener and backlog, the time from the storm's start to each client's answer (p50, p99, how
many over 1 s) and the kernel's listen-queue overflows (``ListenOverflows`` and ``ListenDrops``
of /proc/net/netstat) during the storm.  A SYN the full queue drops is retried by the client's
kernel 1 s later, then 3 s, 7 s: the tail a small backlog gives a fleet.

    .venv/bin/python bench/storm.py [--clients 1000] [--backlogs 50,4096]

Run as root, it measures in a network namespace of its own (``unshare --net``), so the
overflow counters are the storm's alone; otherwise they count the whole machine's.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.configs import config  # noqa: E402
from tests.support.pki import make_pki  # noqa: E402
from tests.support.proxy import ProxyProcess  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402

IN_NAMESPACE = "LICENSE_PROXY_STORM_NETNS"
#: Seconds a client may take before it counts as failed.
GIVE_UP = 30.0


def listen_counters() -> dict[str, int]:
    """TcpExt's ListenOverflows and ListenDrops, from /proc/net/netstat."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], map(int, values.split()[1:])))
            return {k: counters[k] for k in ("ListenOverflows", "ListenDrops")}
    raise SystemExit("storm: no TcpExt line in /proc/net/netstat")


class _Client:
    """One client of the storm: connect, (TLS,) send one request, read to the close."""

    def __init__(self, selector, address, request: bytes, context, started: float) -> None:
        self.selector, self.request, self.context, self.started = selector, request, context, started
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.connect_ex(address)
        self.state = "connecting"
        self.answer = b""
        self.elapsed: float | None = None
        selector.register(self.sock, selectors.EVENT_WRITE, self)

    def step(self) -> None:
        try:
            if self.state == "connecting":
                error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    return self._done()
                if self.context is not None:
                    self.selector.unregister(self.sock)
                    self.sock = self.context.wrap_socket(
                        self.sock, server_hostname="localhost", do_handshake_on_connect=False
                    )
                    self.selector.register(self.sock, selectors.EVENT_WRITE, self)
                    self.state = "handshake"
                else:
                    self.state = "sending"
            if self.state == "handshake":
                self.sock.do_handshake()
                self.state = "sending"
            if self.state == "sending":
                self.sock.send(self.request)  # small: one write
                self.state = "reading"
                self.selector.modify(self.sock, selectors.EVENT_READ, self)
                return
            if self.state == "reading":
                data = self.sock.recv(65536)
                if not data:
                    return self._done()
                self.answer += data
        except ssl.SSLWantReadError:
            self.selector.modify(self.sock, selectors.EVENT_READ, self)
        except ssl.SSLWantWriteError:
            self.selector.modify(self.sock, selectors.EVENT_WRITE, self)
        except (OSError, ssl.SSLError):
            self._done()

    def _done(self) -> None:
        self.elapsed = time.monotonic() - self.started
        self.selector.unregister(self.sock)
        self.sock.close()
        self.state = "done"


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def storm(port: int, clients: int, request: bytes, context, proxy_pid: int) -> dict:
    """``clients`` connections opened at once; each one's time to its whole answer, and the
    CPU the proxy and this client (one thread: its handshakes are serial) used meanwhile."""
    selector = selectors.DefaultSelector()
    before = listen_counters()
    proxy_cpu, client_cpu = cpu_seconds(proxy_pid), time.process_time()
    started = time.monotonic()
    crowd = [_Client(selector, ("127.0.0.1", port), request, context, started)
             for _ in range(clients)]
    while any(c.state != "done" for c in crowd) and time.monotonic() - started < GIVE_UP:
        for key, _ in selector.select(timeout=0.5):
            key.data.step()
    after = listen_counters()
    proxy_cpu, client_cpu = cpu_seconds(proxy_pid) - proxy_cpu, time.process_time() - client_cpu
    answered = sorted(c.elapsed for c in crowd if c.state == "done" and c.answer[9:12].isdigit())
    for c in crowd:
        if c.state != "done":
            c._done()
    selector.close()
    return {
        "answered": len(answered),
        "p50": statistics.median(answered) if answered else float("nan"),
        "p99": answered[min(len(answered) - 1, int(0.99 * len(answered)))] if answered
        else float("nan"),
        "over_1s": sum(1 for t in answered if t > 1.0),
        "proxy_cpu": proxy_cpu,
        "client_cpu": client_cpu,
        **{k: after[k] - before[k] for k in after},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--backlogs", default="50,4096", help="comma list, measured in order")
    parser.add_argument("--shared-network", action="store_true",
                        help="do not move to a network namespace of its own (as root)")
    args = parser.parse_args(argv)
    if os.geteuid() == 0 and not args.shared_network and not os.environ.get(IN_NAMESPACE):
        command = [sys.executable, *sys.argv]
        script = 'ip link set lo up && exec "$@"'
        return subprocess.run(["unshare", "--net", "--", "sh", "-c", script, "storm", *command],
                              env={**os.environ, IN_NAMESPACE: "1"}).returncode
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.clients)), hard))
    where = ("a network namespace of its own" if os.environ.get(IN_NAMESPACE)
             else "the machine's network namespace: overflows of other processes count too")
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    print(f"storm: {args.clients} clients at once, in {where}; net.core.somaxconn {somaxconn};"
          f" load {os.getloadavg()[0]:.2f}", flush=True)
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pki").mkdir()
        pki = make_pki(root / "pki")
        with Upstream(pki.server_cert, pki.server_key) as upstream:
            for backlog in (int(b) for b in args.backlogs.split(",")):
                run = root / f"backlog-{backlog}"
                run.mkdir()
                text = config(run, pki, upstream.url, server=f"backlog = {backlog}")
                with ProxyProcess(run, text) as proxy:
                    proxy.wait_state("Connected", timeout=30)
                    for listener, port, request, context in (
                        ("status", proxy.status_port,
                         b"GET /v1/status HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n", None),
                        ("licensing", proxy.port,
                         b"TRACE /v1/storm HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n", tls),
                    ):
                        time.sleep(1)  # the previous storm's connections gone
                        row = {"listener": listener, "backlog": backlog,
                               **storm(port, args.clients, request, context, proxy.pid)}
                        rows.append(row)
                        print(f"  {listener:<9} backlog {backlog:>5}: {row['answered']:>5} of "
                              f"{args.clients} answered, p50 {row['p50']:.2f} s, p99 "
                              f"{row['p99']:.2f} s, {row['over_1s']} over 1 s; ListenOverflows "
                              f"+{row['ListenOverflows']}, ListenDrops +{row['ListenDrops']}; CPU s: "
                              f"proxy {row['proxy_cpu']:.2f}, client {row['client_cpu']:.2f}",
                              flush=True)
    print("| listener | backlog | answered | p50 s | p99 s | over 1 s | ListenOverflows "
          "| ListenDrops | proxy CPU s | client CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['listener']} | {r['backlog']} | {r['answered']} of {args.clients} "
              f"| {r['p50']:.2f} | {r['p99']:.2f} | {r['over_1s']} | {r['ListenOverflows']} "
              f"| {r['ListenDrops']} | {r['proxy_cpu']:.2f} | {r['client_cpu']:.2f} |")
    return 0 if all(r["answered"] == args.clients for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

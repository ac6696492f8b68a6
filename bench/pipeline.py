"""
What one connection that pipelines requests and reads nothing costs: a real ``twistd
license-proxy`` in front of the tests' TLS upstream answering ``--answer-kib`` KiB, on loopback.
The client sends ``--requests`` GETs at once on one TLS connection with a small receive buffer,
reads nothing until the proxy stops relaying, then reads every answer.  Prints the exchanges
the proxy had with the license server while nothing was read, its resident memory before and
at that point, and whether every answer then arrived, in order.

    .venv/bin/python bench/pipeline.py [--requests 1000] [--answer-kib 256]
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
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


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--answer-kib", type=int, default=256)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pki").mkdir()
        pki = make_pki(root / "pki")
        with Upstream(pki.server_cert, pki.server_key) as upstream:
            upstream.pad = args.answer_kib * 1024
            with ProxyProcess(root, config(root, pki, upstream.url)) as proxy:
                proxy.wait_state("Connected", timeout=30)
                before = rss_mib(proxy.pid)
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(30)
                sock.connect((proxy.host, proxy.port))
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                with context.wrap_socket(sock, server_hostname="localhost") as sock:
                    sock.sendall(b"".join(b"GET /v1/pipe/%d HTTP/1.1\r\nHost: p\r\n\r\n" % n
                                          for n in range(args.requests)))
                    relayed, deadline = -1, time.monotonic() + 120
                    while time.monotonic() < deadline:  # until a second passes without one
                        time.sleep(1)
                        now = len(upstream.requests) - 1  # less the start-up check-in
                        if now == relayed:
                            break
                        relayed = now
                    held = rss_mib(proxy.pid)
                    print(f"pipeline: {args.requests} GETs pipelined, {args.answer_kib} KiB "
                          f"answers, none read: {relayed} exchanges with the license server; "
                          f"proxy RSS {before:.1f} MiB before, {held:.1f} MiB then "
                          f"(+{held - before:.1f})", flush=True)
                    reader = sock.makefile("rb")
                    numbers = []
                    started = time.monotonic()
                    for _ in range(args.requests):
                        if reader.readline()[9:12] != b"200":
                            break
                        length = 0
                        for line in iter(reader.readline, b"\r\n"):
                            if line.lower().startswith(b"content-length:"):
                                length = int(line.split(b":")[1])
                        numbers.append(json.loads(reader.read(length))["n"])
                    in_order = numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
                    print(f"pipeline: then read {len(numbers)} of {args.requests} answers in "
                          f"{time.monotonic() - started:.1f} s, "
                          f"{'in order' if in_order else 'OUT OF ORDER'}", flush=True)
    return 0 if len(numbers) == args.requests and in_order else 1


if __name__ == "__main__":
    sys.exit(main())

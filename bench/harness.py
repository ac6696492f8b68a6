"""
Side-by-side benchmark on loopback: license-proxy against nginx configured to give the same
guarantee, and against the upstream directly (the floor), measured with wrk in one run on one
machine, contenders interleaved round by round; medians are reported.

Run it with ``bash bench/run`` (see docs/performance.md).  Everything is started
here and stopped here: a local TLS upstream (nginx returning a fixed JSON answer, never the
bottleneck), the nginx relay, and a real ``twistd license-proxy`` process.

"The same guarantee" is what license-proxy promises: every complete 2xx answer is stored, every
request is relayed while the upstream is up, and the last good answer is served while it is down.
nginx's stock caching does not do that (``proxy_cache_valid 200 0s`` stores nothing useful and
answers 502 with the upstream stopped), so the nginx relay here always fetches and stores
(``proxy_cache_bypass 1`` with a long validity) and on an upstream error serves the stored answer
from a named location over the same cache zone.  Before measuring, the harness proves it: counts
at the upstream show both relays forwarding every request, and with the upstream stopped both
serve the stored answers and answer 502 to a request they never saw.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twisted.internet.task import Clock  # noqa: E402

from license_proxy.tls import certs  # noqa: E402
from license_proxy.trustcache import TrustCache  # noqa: E402
from tests.support.blackhole import BlackHole  # noqa: E402

WRK_SCRIPT = REPO / "bench" / "wrk.lua"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: The upstream's answer: about 300 bytes of JSON, like a licensing answer.
ANSWER = json.dumps(
    {
        "license": {
            "id": "3f6c1e2a-8d4b-4c1e-9a77-0b5d2e8f4c31",
            "status": "active",
            "features": ["api", "engine", "streaming", "batch", "diarization"],
            "expires": "2027-11-24T00:00:00Z",
            "seats": 128,
        },
        "signature": "c2lnbmF0dXJlLW9mLXRoZS1saWNlbnNlLWFuc3dlci1mb3ItYmVuY2htYXJrcw",
        "issued_at": "2026-11-24T00:00:00Z",
        "checkin_interval": 60,
    },
    separators=(",", ":"),
)
#: A small POST body, as a container checking in with its usage would send.
POST_BODY = '{"container":"engine-7","version":"2026.11","usage":{"hours":12.5,"requests":4096}}'
PATH = "/v1/license?instance=bench"

# -- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: {what} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: {what} is not listening on {port} after {timeout} s")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """utime + stime of each of ``pids`` still there, in clock ticks."""
    ticks = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # nginx's cache loader exits after its first minute
            continue
        ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def cpu_used(before: dict[int, int], after: dict[int, int]) -> int:
    """Ticks used between two readings by the processes alive at the second."""
    return sum(t - before.get(pid, 0) for pid, t in after.items())


def memory_kib(pids: list[int], field: str) -> int:
    """A /proc/PID/status field (VmHWM, VmRSS), summed over ``pids``."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total


class Nginx:
    """One nginx (master + workers, in the foreground) from a config text."""

    def __init__(self, name: str, binary: str, root: Path, conf: str) -> None:
        self.name = name
        self.binary = binary
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("tmp", "cache"):
            (root / sub).mkdir(exist_ok=True)
        (root / "nginx.conf").write_text(conf)
        self.proc: subprocess.Popen | None = None

    def start(self, port: int) -> None:
        log = open(self.root / "stderr.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.root), "-c", str(self.root / "nginx.conf"),
             "-e", str(self.root / "error.log")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        log.close()
        wait_port(port, self.proc, self.name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.proc = None

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *children(self.proc.pid)]


def _nginx_common(root: Path) -> str:
    temp = "\n".join(
        f"  {kind}_temp_path {root}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root root;" if os.geteuid() == 0 else ""
    return f"""{user}
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
""", temp


#: TLS on every listener: 1.2 and 1.3, no session tickets, no session cache (every new
#: connection is a full handshake).
def _tls(cert: Path, key: Path) -> str:
    return f"""    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_tickets off;
    ssl_session_cache off;"""


def upstream_conf(root: Path, port: int, count_port: int, cert: Path, key: Path) -> str:
    head, temp = _nginx_common(root)
    return f"""{head}worker_processes 1;
http {{
{temp}
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  server {{
    listen 127.0.0.1:{port} ssl;
{_tls(cert, key)}
    default_type application/json;
    location / {{ return 200 '{ANSWER}'; }}
  }}
  server {{
    listen 127.0.0.1:{count_port};
    location = /count {{ stub_status; }}
  }}
}}
"""


def relay_conf(
    root: Path, workers: int, port: int, status_port: int, upstream_port: int,
    cert: Path, key: Path, ca: Path,
) -> str:
    head, temp = _nginx_common(root)
    twoxx = "200 201 202 203 204 205 206 207 208 226"
    return f"""{head}worker_processes {workers};
http {{
{temp}
  # license-proxy logs every relay; so does this.
  access_log {root}/access.log;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  proxy_cache_path {root}/cache levels=1:2 keys_zone=trust:16m max_size=1g inactive=3650d
                   use_temp_path=off;
  upstream license {{
    server 127.0.0.1:{upstream_port};
    keepalive 16;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} ssl;
{_tls(cert, key)}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {ca};
    proxy_ssl_name localhost;  # nginx checks DNS names only, not IP addresses
    proxy_connect_timeout 30s;
    proxy_read_timeout 30s;
    proxy_send_timeout 30s;
    # The trust cache: same key as license-proxy's (method, path and query, credentials),
    # every 2xx stored whatever the upstream's caching headers say.
    proxy_cache trust;
    proxy_cache_key "$request_method $request_uri $http_authorization $http_cookie $http_x_api_key";
    proxy_cache_methods GET HEAD POST;
    proxy_cache_valid {twoxx} 3650d;
    proxy_ignore_headers Cache-Control Expires Vary X-Accel-Expires;
    location / {{
      # Always relay (never answer from the cache) and store the answer...
      proxy_pass https://license;
      proxy_cache_bypass 1;
      # ...and on an upstream failure, answer from the cache.
      proxy_intercept_errors on;
      error_page 500 502 503 504 = @stale;
    }}
    location @stale {{
      proxy_pass https://license;
      proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504;
    }}
  }}
  server {{
    listen 127.0.0.1:{status_port};
    location = /status {{ stub_status; }}
  }}
}}
"""


class Ours:
    """A real ``twistd --nodaemon --pidfile= license-proxy --config X`` process."""

    name = "ours"

    def __init__(self, root: Path, port: int, status_port: int, upstream_port: int,
                 cert: Path, key: Path, ca: Path) -> None:
        self.root = root
        self.port = port
        self.status_port = status_port
        root.mkdir(parents=True, exist_ok=True)
        self.cache_path = root / "state" / "trust-cache.json"
        self.config = root / "license-proxy.toml"
        self.config.write_text(f"""[server]
host = "127.0.0.1"
port = {port}
status_port = {status_port}
tls_cert = "{cert}"
tls_key = "{key}"

[license]
server_url = "https://127.0.0.1:{upstream_port}"
ca_file = "{ca}"
timeout = "30s"
# The bench's license server takes any key; the proxy needs one.
key = "bench-key"

[trust]
duration = "24h"
checkin_interval = "60s"

[cache]
path = "{self.cache_path}"
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")}
        env["PYTHONPATH"] = str(REPO)
        log = open(self.root / "proxy.log", "ab")
        self.proc = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", "license-proxy", "--config", str(self.config)],
            cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        log.close()
        wait_port(self.status_port, self.proc, "license-proxy", timeout=30)
        deadline = time.monotonic() + 30
        while self.state() != "Connected":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("bench: license-proxy did not become Connected; see "
                                 f"{self.root / 'proxy.log'}")
            time.sleep(0.1)

    def state(self) -> str | None:
        try:
            status, _, body = plain_get(self.status_port, "/v1/status")
            return json.loads(body).get("state") if status == 200 else None
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def wait_up(self, timeout: float = 30) -> float:
        """Seconds until Connected with every license server up (probed back)."""
        started = time.monotonic()
        while True:
            try:
                _, _, body = plain_get(self.status_port, "/v1/status")
                status = json.loads(body)
                if status["state"] == "Connected" and all(
                    s["up"] for s in status["license_servers"]
                ):
                    return time.monotonic() - started
            except (OSError, ValueError, http.client.HTTPException):
                pass
            if time.monotonic() - started > timeout:
                raise SystemExit(f"bench: license-proxy not back after {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    def cached_entries(self) -> int:
        """Entries in the trust cache file and its journal (written at most 2 s after a change)."""
        return len(TrustCache.load(Clock(), str(self.cache_path)))


# -- clients -----------------------------------------------------------------------------


def plain_get(port: int, path: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def tls_request(port: int, ca: Path, method: str, path: str,
                body: str | None = None) -> tuple[int, dict, bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=35, context=context)
    try:
        headers = {"Content-Type": "application/json"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def full_handshakes(port: int, ca: Path) -> dict:
    """
    Whether each TLS version is offered and every new connection is a full handshake: a
    client that offers the previous session back must not get it resumed.
    """
    result = {}
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = ssl.create_default_context(cafile=str(ca))
        context.minimum_version = context.maximum_version = version
        session = None
        reused = []
        try:
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1",
                                             session=session) as s:
                        s.sendall(b"GET /v1/handshake HTTP/1.1\r\nHost: x\r\n"
                                  b"Connection: close\r\n\r\n")
                        while s.recv(65536):
                            pass
                        reused.append(s.session_reused)
                        session = s.session
        except (OSError, ssl.SSLError) as e:
            result[version.name] = f"failed: {e}"
            continue
        result[version.name] = "full handshakes" if not any(reused) else "resumed"
    return result


class UpstreamCounter:
    """Requests the upstream has served, from its stub_status (which counts itself too)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def read(self) -> int:
        _, _, body = plain_get(self.port, "/count")
        return int(body.split(b"\n")[2].split()[2])

    def since(self, before: int) -> int:
        """Requests served since ``before`` was read, less the two counting requests."""
        return self.read() - before - 1


def run_wrk(url: str, *, connections: int, seconds: float, method: str = "GET",
            body: str | None = None, close: bool = False, rate: float | None = None,
            distinct: int | None = None, distinct_path: str = "/") -> dict:
    env = dict(os.environ, BENCH_METHOD=method)
    if body:
        env["BENCH_BODY"] = body
    if rate:
        env["BENCH_RATE"] = str(rate)
    if distinct:
        env["BENCH_DISTINCT"] = str(distinct)
        env["BENCH_PATH"] = distinct_path
    args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(WRK_SCRIPT)]
    if close:
        args += ["-H", "Connection: close"]
    out = subprocess.run(args + [url], env=env, capture_output=True, text=True,
                         timeout=seconds + 60)
    match = re.search(r"^BENCH_JSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not match:
        raise SystemExit(f"bench: wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return json.loads(match.group(1))


# -- the benchmark -----------------------------------------------------------------------


class Fault:
    """
    The upstream's port made to fail one way while inside: ``refused`` (nothing listens),
    ``hang`` (a listener that lets the kernel accept connections and never reads them: TLS
    never starts) or ``black hole`` (SYNs dropped: ``tests.support.blackhole``).  On the way
    out the upstream is started again and ``recovery`` is how long license-proxy took to be
    Connected with it up (its probe, every ``[license] retry_interval``).
    """

    def __init__(self, bench: "Bench", kind: str) -> None:
        self.bench, self.kind = bench, kind
        self.recovery: float | None = None
        self._hole = None

    def __enter__(self) -> "Fault":
        self.bench.upstream.stop()
        if self.kind == "hang":
            self._hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._hole.bind(("127.0.0.1", self.bench.up_port))
            self._hole.listen(4096)
        elif self.kind == "black hole":
            self._hole = BlackHole(port=self.bench.up_port)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._hole is not None:
            self._hole.close()
        self.bench.upstream.start(self.bench.up_port)
        self.recovery = self.bench.ours.wait_up()


class Bench:
    """The three contenders, the upstream they share, and every run measured."""

    def __init__(self, args) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="license-proxy-bench-"))
        self.nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        now = datetime.now(timezone.utc)
        pki = self.root / "pki"
        pki.mkdir()
        ca = certs.make_ca("license-proxy bench CA", now=now)
        self.ca = pki / "ca.pem"
        self.ca.write_bytes(ca.cert_pem)
        up = certs.issue(ca, ["127.0.0.1", "localhost"], now=now)
        relay = certs.issue(ca, ["127.0.0.1", "localhost"], now=now)
        self.up_cert, self.up_key = pki / "upstream.pem", pki / "upstream.key"
        up.write(self.up_cert, self.up_key)
        self.relay_cert, self.relay_key = pki / "relay.pem", pki / "relay.key"
        relay.write(self.relay_cert, self.relay_key)

        self.up_port, self.count_port = free_port(), free_port()
        self.upstream = Nginx("upstream nginx", self.nginx_bin, self.root / "upstream",
                              upstream_conf(self.root / "upstream", self.up_port,
                                            self.count_port, self.up_cert, self.up_key))
        self.counter = UpstreamCounter(self.count_port)
        self.nginx_port, self.nginx_status_port = free_port(), free_port()
        self.nginx = Nginx("nginx relay", self.nginx_bin, self.root / "nginx",
                           relay_conf(self.root / "nginx", args.nginx_workers, self.nginx_port,
                                      self.nginx_status_port, self.up_port, self.relay_cert,
                                      self.relay_key, self.ca))
        self.ours = Ours(self.root / "ours", free_port(), free_port(), self.up_port,
                         self.relay_cert, self.relay_key, self.ca)
        self.runs: list[dict] = []
        self.recoveries: list[dict] = []

    def contender(self, name: str) -> tuple[str, list[int]]:
        """A contender's licensing URL (no path) and its processes now."""
        if name == "ours":
            return f"https://127.0.0.1:{self.ours.port}", self.ours.pids()
        if name == "nginx":
            return f"https://127.0.0.1:{self.nginx_port}", self.nginx.pids()
        return f"https://127.0.0.1:{self.up_port}", self.upstream.pids()

    def start(self) -> None:
        self.upstream.start(self.up_port)
        self.nginx.start(self.nginx_port)
        self.ours.start()

    def stop(self) -> None:
        for part in (self.ours, self.nginx, self.upstream):
            try:
                part.stop()
            except Exception as e:  # keep stopping the others
                print(f"bench: stopping {part.name}: {e}", file=sys.stderr)

    def prove(self) -> dict:
        """The nginx relay gives license-proxy's guarantee (and so does license-proxy)."""
        proof: dict = {"tls": {}}
        for name, port in (("ours", self.ours.port), ("nginx", self.nginx_port),
                           ("direct", self.up_port)):
            proof["tls"][name] = full_handshakes(port, self.ca)
        for name, port in (("ours", self.ours.port), ("nginx", self.nginx_port)):
            before = self.counter.read()
            answers = [tls_request(port, self.ca, "GET", "/v1/proof?n=1") for _ in range(3)]
            answers += [tls_request(port, self.ca, "POST", "/v1/proof?n=1", POST_BODY)
                        for _ in range(3)]
            relayed = self.counter.since(before)
            proof[name] = {
                "answers_while_up": [a[0] for a in answers],
                "relayed_while_up": relayed,
                "always_relays": relayed >= 6 and all(a[2] == ANSWER.encode() for a in answers),
            }
        self.upstream.stop()
        try:
            for name, port in (("ours", self.ours.port), ("nginx", self.nginx_port)):
                get = tls_request(port, self.ca, "GET", "/v1/proof?n=1")
                post = tls_request(port, self.ca, "POST", "/v1/proof?n=1", POST_BODY)
                unseen = tls_request(port, self.ca, "GET", "/v1/proof?n=never-seen")
                proof[name].update(
                    stale_get=get[0], stale_post=post[0], unseen_while_down=unseen[0],
                    serves_stale=(get[0], post[0]) == (200, 200)
                    and get[2] == post[2] == ANSWER.encode() and unseen[0] == 502,
                )
        finally:
            self.upstream.start(self.up_port)
        # ours skips a server it saw fail until its probe finds it back (retry_interval).
        proof["ours"]["back_after_s"] = self.ours.wait_up()
        for name, port in (("ours", self.ours.port), ("nginx", self.nginx_port)):
            before = self.counter.read()
            again = tls_request(port, self.ca, "GET", "/v1/proof?n=1")
            relayed = self.counter.since(before)
            proof[name]["relays_again_when_back"] = again[0] == 200 and relayed >= 1
        proof["passed"] = all(
            proof[n]["always_relays"] and proof[n]["serves_stale"]
            and proof[n]["relays_again_when_back"] for n in ("ours", "nginx")
        ) and all(v == "full handshakes" for t in proof["tls"].values() for v in t.values())
        return proof

    def target(self, workload: dict, name: str) -> tuple[str, list[int]]:
        """The URL a workload requests from a contender, and the contender's processes now."""
        if workload["id"] != "4":
            base, pids = self.contender(name)
            return base + PATH, pids
        if name == "ours":
            return f"http://127.0.0.1:{self.ours.status_port}/v1/status", self.ours.pids()
        return f"http://127.0.0.1:{self.nginx_status_port}/status", self.nginx.pids()

    def measure(self, workload: dict, name: str, round_no: int) -> dict:
        url, pids = self.target(workload, name)
        first = None
        if workload.get("fault") and name == "ours":
            # Once the fault is known: the first request of the outage learns it.
            started = time.monotonic()
            tls_request(self.ours.port, self.ca, "GET", PATH)
            first = time.monotonic() - started
        counting = workload.get("relayed") and name != "direct"
        before_up = self.counter.read() if counting else 0
        before = cpu_ticks(pids)
        result = run_wrk(url, connections=workload["connections"],
                         seconds=workload.get("seconds", self.args.seconds),
                         method=workload.get("method", "GET"), body=workload.get("body"),
                         close=workload.get("close", False), rate=workload.get("rate"))
        pids = self.target(workload, name)[1]
        ticks = cpu_used(before, cpu_ticks(pids))
        requests = result["requests"]
        errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
        run = {
            "workload": workload["id"], "contender": name, "round": round_no,
            "requests": requests,
            "rps": requests / (result["duration_us"] / 1e6),
            "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000,
            "p999_ms": result["p999_us"] / 1000, "max_ms": result["max_us"] / 1000,
            "errors": errors, "wrk": result,
            "cpu_us_per_request": ticks / CLK_TCK * 1e6 / requests if requests else None,
            "hwm_kib": memory_kib(pids, "VmHWM"),
        }
        if first is not None:
            run["first_answer_s"] = first
        if counting:
            run["upstream_requests"] = self.counter.since(before_up)
            # Every answered request must have reached the upstream.
            run["relayed_all"] = run["upstream_requests"] >= requests
            if not run["relayed_all"]:
                run["errors"] += requests - run["upstream_requests"]
        self.runs.append(run)
        print(f"  round {round_no} {workload['id']:>2} {name:<6} {run['rps']:8.0f} req/s  "
              + (f"first {first:.2f} s  " if first is not None else "") +
              f"p50 {run['p50_ms']:6.2f} ms  p99 {run['p99_ms']:6.2f} ms  "
              f"errors {run['errors']}  cpu {run['cpu_us_per_request'] or 0:6.0f} us/req",
              flush=True)
        return run

    def fill(self, name: str, distinct: int) -> dict:
        """Drive ``distinct`` different requests through a relay; its memory afterwards."""
        base, pids = self.contender(name)
        result = run_wrk(base + "/v1/distinct/", connections=8,
                         seconds=max(2, distinct / 1000), distinct=distinct,
                         distinct_path="/v1/distinct/")
        errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
        info = {"requests": result["requests"], "errors": errors,
                "covered": min(result["requests"], distinct)}
        if name == "ours":
            time.sleep(2.5)  # the trust cache file is written at most 2 s after a change
            info["trust_cache_entries"] = self.ours.cached_entries()
        info["rss_kib"] = memory_kib(pids, "VmRSS")
        info["hwm_kib"] = memory_kib(pids, "VmHWM")
        return info


def workloads(args) -> list[dict]:
    c = args.connections
    return [
        {"id": "1a", "title": "relay, keep-alive, GET", "connections": c, "relayed": True,
         "contenders": ["ours", "nginx", "direct"]},
        {"id": "1b", "title": "relay, keep-alive, POST (small JSON body)", "connections": c,
         "method": "POST", "body": POST_BODY, "relayed": True,
         "contenders": ["ours", "nginx", "direct"]},
        {"id": "2", "title": "relay, new TLS connection per request (full handshake)",
         "connections": c, "close": True, "relayed": True,
         "contenders": ["ours", "nginx", "direct"]},
        {"id": "4", "title": "GET /v1/status (nginx: stub_status, its nearest counterpart)",
         "connections": c, "contenders": ["ours", "nginx"]},
        {"id": "5", "title": f"relay, keep-alive GET paced at {args.rate:g} req/s",
         "connections": 4, "rate": args.rate, "relayed": True,
         "seconds": args.paced_seconds or args.seconds,
         "contenders": ["ours", "nginx", "direct"]},
        *({"id": f"3{kind[0]}", "title": f"answers from trust, upstream {title}, keep-alive GET",
           "connections": c, "contenders": ["ours", "nginx"], "fault": kind}
          for kind, title in (("refused", "refusing connections"),
                              ("hang", "accepting and never answering"),
                              ("black hole", "black-holed (SYNs dropped)"))),
    ]


def summarise(bench: Bench, wls: list[dict]) -> list[dict]:
    rows = []
    for w in wls:
        by: dict[str, dict] = {}
        for name in w["contenders"]:
            runs = [r for r in bench.runs if r["workload"] == w["id"] and r["contender"] == name]
            cpu = [r["cpu_us_per_request"] for r in runs if r["cpu_us_per_request"] is not None]
            by[name] = {
                "workload": w["id"], "title": w["title"], "contender": name,
                "rounds": len(runs),
                "rps": statistics.median(r["rps"] for r in runs),
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "requests": sum(r["requests"] for r in runs),
                "cpu_us_per_request": statistics.median(cpu) if cpu else None,
                "peak_rss_mib": max(r["hwm_kib"] for r in runs) / 1024,
            }
        ours = by["ours"]
        for peer in ("nginx", "direct"):
            if peer in by and by[peer]["rps"]:
                ours[f"rps_vs_{peer}"] = ours["rps"] / by[peer]["rps"]
                if ours["cpu_us_per_request"] and by[peer]["cpu_us_per_request"]:
                    ours[f"cpu_vs_{peer}"] = (ours["cpu_us_per_request"]
                                              / by[peer]["cpu_us_per_request"])
        rows.extend(by.values())
    return rows


def table(rows: list[dict]) -> str:
    def ratio(row, key):
        return f"{row[key]:.2f}" if key in row else ""

    lines = [
        "| workload | contender | req/s | p50 ms | p99 ms | errors | CPU µs/req | peak RSS MiB "
        "| req/s ours/nginx | CPU ours/nginx | req/s ours/direct |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = f"{r['cpu_us_per_request']:.0f}" if r["cpu_us_per_request"] is not None else ""
        lines.append(
            f"| {r['workload']} {r['title'] if r['contender'] == 'ours' else ''} "
            f"| {r['contender']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['errors']} | {cpu} | {r['peak_rss_mib']:.1f} | {ratio(r, 'rps_vs_nginx')} "
            f"| {ratio(r, 'cpu_vs_nginx')} | {ratio(r, 'rps_vs_direct')} |"
        )
    return "\n".join(lines)


def trust_targets(bench: Bench, rows: list[dict]) -> list[str]:
    """Workload 3, per fault: ours answers from trust at p99 < 5 ms and at least twice its
    own keep-alive relay rate (1a); the first answer of the outage and the recovery."""
    relay = next((r["rps"] for r in rows if r["workload"] == "1a" and r["contender"] == "ours"),
                 None)
    lines = []
    for r in rows:
        if not r["workload"].startswith("3") or r["contender"] != "ours":
            continue
        firsts = [x["first_answer_s"] for x in bench.runs
                  if x["workload"] == r["workload"] and "first_answer_s" in x]
        back = [x["seconds"] for x in bench.recoveries if x["workload"] == r["workload"]]
        twice = relay is not None and r["rps"] >= 2 * relay
        met = r["p99_ms"] < 5 and twice
        lines.append(
            f"target {r['workload']}: p99 {r['p99_ms']:.2f} ms, {r['rps']:.0f} req/s"
            + (f" = {r['rps'] / relay:.1f}x our relay (1a: {relay:.0f} req/s)" if relay else
               " (1a not run)")
            + f"; first answer {max(firsts):.2f} s at most; Connected {max(back):.2f} s at most"
            f" after the return: {'met' if met else 'MISSED'}"
        )
    return lines


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def versions(nginx_bin: str) -> dict:
    import OpenSSL
    import twisted

    nginx = subprocess.run([nginx_bin, "-v"], capture_output=True, text=True).stderr.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return {
        "python": sys.version.split()[0], "twisted": twisted.__version__,
        "openssl": OpenSSL.SSL.SSLeay_version(
            OpenSSL.SSL.SSLEAY_VERSION).decode(),
        "nginx": nginx.split("/")[-1], "wrk": (wrk.stdout or wrk.stderr).split()[1],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5, help="per workload and contender")
    parser.add_argument("--paced-seconds", type=float, default=10,
                        help="per paced run (0: --seconds)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--distinct", type=int, default=10000,
                        help="distinct requests cached before reading memory (0: skip)")
    parser.add_argument("--nginx-workers", type=int, default=1)
    parser.add_argument("--only", default="", help="comma list of workload ids to run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    bench = Bench(args)
    wls = workloads(args)
    if args.only:
        wls = [w for w in wls if w["id"] in args.only.split(",")]
    meta = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "load_before": load(), "versions": versions(bench.nginx_bin),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
        "client": "wrk -t1, keep-alive unless the workload says otherwise; paced: wrk with "
                  "bench/wrk.lua's delay() on an absolute schedule",
    }
    print(f"bench: load {meta['load_before']}; working in {bench.root}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        bench.start()
        proof = bench.prove()
        print(f"bench: proof {'passed' if proof['passed'] else 'FAILED'}: "
              f"{json.dumps(proof)}", flush=True)
        # Warm up: pools filled, caches holding the benchmark's requests.
        for name in ("ours", "nginx"):
            url, _ = bench.contender(name)
            run_wrk(url + PATH, connections=args.connections, seconds=1)
            run_wrk(url + PATH, connections=args.connections, seconds=1, method="POST",
                    body=POST_BODY)
        load_rounds = []
        for round_no in range(1, args.rounds + 1):
            print(f"bench: round {round_no}, load {load()}", flush=True)
            load_rounds.append(load())
            for w in wls:
                contenders = w["contenders"]
                shift = (round_no - 1) % len(contenders)
                if not w.get("fault"):
                    for name in contenders[shift:] + contenders[:shift]:
                        bench.measure(w, name, round_no)
                    continue
                with Fault(bench, w["fault"]) as fault:
                    for name in contenders[shift:] + contenders[:shift]:
                        bench.measure(w, name, round_no)
                bench.recoveries.append(
                    {"workload": w["id"], "round": round_no, "seconds": fault.recovery})
                print(f"  round {round_no} {w['id']:>2} ours Connected {fault.recovery:.2f} s "
                      "after the upstream came back", flush=True)
        memory = {}
        if args.distinct:
            for name in ("ours", "nginx"):
                memory[name] = bench.fill(name, args.distinct)
                print(f"bench: {name} after {args.distinct} distinct requests: "
                      f"{json.dumps(memory[name])}", flush=True)
    finally:
        bench.stop()
    rows = summarise(bench, wls)
    meta["load_rounds"] = load_rounds
    meta["load_after"] = load()
    text = table(rows)
    print(text)
    targets = trust_targets(bench, rows)
    for line in targets:
        print(line)
    if memory:
        for name, m in memory.items():
            print(f"{name}: after {args.distinct} distinct cached requests: RSS "
                  f"{m['rss_kib'] / 1024:.1f} MiB, peak {m['hwm_kib'] / 1024:.1f} MiB"
                  + (f", trust cache entries {m['trust_cache_entries']}"
                     if "trust_cache_entries" in m else ""))
    errors = sum(r["errors"] for r in rows) + sum(m["errors"] for m in memory.values())
    result = {"meta": meta, "proof": proof, "summary": rows, "memory": memory,
              "runs": bench.runs, "table": text, "errors": errors,
              "recoveries": bench.recoveries, "trust_targets": targets}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"bench: wrote {args.out}; load {meta['load_after']}")
    if not args.keep:
        shutil.rmtree(bench.root, ignore_errors=True)
    return 0 if proof["passed"] and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

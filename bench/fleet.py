"""
A day in the life: a simulated fleet checks in through two real proxies behind a real HAProxy
while a scripted day of license-server faults, crashes and upgrades happens; how long was any
container left unlicensed?

    python bench/fleet.py            # 500 containers, 1 simulated minute = 15 s: ~20 minutes
    python bench/fleet.py --short    # 60 containers, 1 simulated minute = 3 s: ~4 minutes (CI)

Everything is real and on loopback: the license server (tests/support/upstream.py, TLS with the
test CA, faults switched on and off), two ``license-proxy`` processes (each its own state
directory, its own certificate from the test CA), HAProxy in TCP mode in front of them (health
check: ``GET /v1/ready``, 200 only in Connected or TrustBased), and the fleet: one asyncio
process where every container has its own credential (``Authorization: Token <its own>``) and
checks in on its own jittered interval, each time over a new TLS connection to HAProxy that
verifies the proxy's certificate for "localhost", giving up after its own client timeout.
The proxies are configured as an operator running two instances should: each names the others
in ``[peers] urls`` (a request it would answer 502 is asked of them first), and the blue-green
swap copies the old instance's trust cache to the new one (``bin/blue-green --copy-state``).

**Scale.** A Python proxy answers ~45 new-TLS-connection check-ins a second per process and the
machine has 2 shared cores, so the fleet's total rate is kept near 33/s (500 containers every
simulated minute, 1 simulated minute = 15 real seconds; --short: 60 containers, 3 s, 20/s).
What scales with the day is scaled: the containers' check-in interval (60 simulated seconds,
each container its own in 54-66 s, each wait jittered by +-5%), the proxies' ``[trust]
checkin_interval`` (60 simulated seconds) and ``duration`` (the trust window, 15 simulated
minutes), and the length of every phase.  What measures one exchange is real time, unscaled,
because the race that matters is between the proxy's deadline and the container's: the
containers' client timeouts (5-15 s, uniform, each its own), the proxies' ``[license]
timeout`` (30 s, the default) and ``startup_timeout`` (20 s).  HAProxy checks each proxy's
``/v1/ready`` every 2 s of a real minute, scaled (0.5 s at 15 s a minute, at least 0.1 s).
A timeout of 30 s at a scale of 15 s per minute lasts 2 simulated minutes.

**A failed check-in** is an answer other than a 200 carrying a license, a connection that failed,
or no answer within the container's timeout.  A container whose connection fails before any byte
of an answer tries once more at once within the same timeout (the vendor's containers list a
second ``server_url``; here it is the same HAProxy): a connection cut by a killed proxy is not
the proxy's failure.  **One failed check-in is one unlicensed container-minute**: the container
checks in once a simulated minute, so a failure leaves it without a license for one interval.

**The trust window** is measured from the last time the license server answered (a response
below 500, to either proxy), over the proxies' ``[trust] duration``: a check-in started less
than that after it is *inside the window* (N counts its failures: it must be 0), one started
later is *after it* (M).  M is consistent with the window when no check-in after it succeeded
unless the license server had answered again by the time it ended.  The fleet sees the last
answer at the license server, a proxy (and HAProxy's health check after it) at its own end:
check-ins within ``TOLERANCE`` (1 real second) of a window's close, or of its opening again when
the license server answers after an outage longer than the window, count as after it and are
not held to it.

Prints one line per event with the fleet's failures in that phase, then exactly one line
``unlicensed container-minutes: N inside the trust window, M after it``; writes PREFIX.json
(the raw events) and PREFIX.png (the day).  Exit status 1 when N > 0 or M is inconsistent.

bench/fleet_kubernetes.py runs a second day with this fleet, accounting and picture: pods in
the shape of the vendor's Kubernetes chart (its ``KubernetesDay`` is a ``Day``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import importlib.machinery
import importlib.util
import json
import os
import platform
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.pki import make_pki  # noqa: E402
from tests.support.processes import stop  # noqa: E402
from tests.support.proxy import ProxyProcess, free_port  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402

BLUE_GREEN = REPO / "bin" / "blue-green"


def _tool(path: Path):
    """The blue-green script as a module: its HAProxy client and its state copy."""
    loader = importlib.machinery.SourceFileLoader("blue_green", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


BLUE_GREEN_TOOL = _tool(BLUE_GREEN)
BACKEND = "license_proxy"
TOLERANCE = 1.0  # real seconds around a window's close, see the docstring
FLAP_SECONDS = 3.0  # flapping: up this long, down this long (real seconds)


#: How a proxy is started: ``license-proxy serve FILE``, as the vendor's files run it.
CLI = ("serve",)


#: The day, in simulated minutes: (when, action, what it is).  Actions are Day methods.
SCRIPT = [
    (0, "answers", "normal traffic (every container reaches both proxies)"),
    (6, "storm", "license server: 503 storm"),
    (9, "answers", "license server answers"),
    (11, "refused", "license server: connection refused"),
    (14, "answers", "license server answers"),
    (16, "hang", "license server: accepts and hangs"),
    (19, "answers", "license server answers"),
    (21, "blackhole", "license server: black hole (SYNs dropped)"),
    (24, "answers", "license server answers"),
    (26, "wrong_host", "license server: certificate for the wrong host"),
    (29, "answers", "license server answers"),
    (31, "flapping", f"license server: flapping ({FLAP_SECONDS:g} s up, {FLAP_SECONDS:g} s down)"),
    (34, "answers", "license server answers"),
    (35, "blue_green", "blue-green swap a -> c (bin/blue-green, a's trust cache copied to c)"),
    (40, "refused", "long outage begins (connection refused), longer than the trust window"),
    (42, "kill_restart", "SIGKILL proxy c, restart it from its own cache"),
    (44, "wipe_restart", "restart proxy b with its state directory wiped (it starts on c's trust)"),
    (60, "answers", "license server returns"),
    (61, "restart_b", "proxy b Connected, license server up (started again if it had exited)"),
    (66, "end", "end of the day"),
]
TRUST_MINUTES = 15
MODES = {
    "full": {"containers": 500, "minute": 15.0},
    "short": {"containers": 60, "minute": 3.0},
}


class LicenseServer(Upstream):
    """The tests' TLS upstream, remembering when it answered (below 500) and switching faults."""

    def __init__(self, pki) -> None:
        super().__init__(pki.server_cert, pki.server_key)
        self.pki = pki
        self.requests = collections.deque(maxlen=16)  # nobody reads them; keep memory flat
        self.answered: list[float] = []  # monotonic times
        self.hole: list[socket.socket] = []

    def _next_response(self):
        mode, status, headers, body = super()._next_response()
        if mode == "normal" and status < 500:
            self.answered.append(time.monotonic())
        return mode, status, headers, body

    def fresh(self, cert=None) -> None:
        """Up again with new connections only (faults must not hide in the proxies' pools)."""
        self.close_hole()
        self.stop()
        self.mode = "normal"
        self.respond(body=b'{"license":"valid"}')
        self.use_certificate(*(cert or (self.pki.server_cert, self.pki.server_key)))
        self.start()

    def black_hole(self) -> None:
        """Listening with a full accept queue of length 0: Linux drops every further SYN."""
        self.stop()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(0)
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex((self.host, self.port))
        self.hole = [listener, filler]
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect((self.host, self.port))
            raise SystemExit("fleet: the black hole accepted a connection")
        except TimeoutError:
            pass
        finally:
            probe.close()

    def close_hole(self) -> None:
        for sock in self.hole:
            sock.close()
        self.hole = []


def proxy_config(directory: Path, pki, server: LicenseServer, minute: float) -> str:
    """Intervals and the trust window scaled; timeouts real (see the docstring)."""
    return f"""[server]
host = "127.0.0.1"
port = {free_port()}
status_port = {free_port()}
tls_cert = "{pki.server_cert}"
tls_key = "{pki.server_key}"

""" + license_and_scale(directory, pki, server, minute)


def license_and_scale(directory: Path, pki, server: LicenseServer, minute: float) -> str:
    """The test license server, the day's scale, and the state directory ``directory/state``."""
    return f"""[license]
server_url = "https://127.0.0.1:{server.port}"
ca_file = "{pki.ca_cert}"
timeout = "30s"
startup_timeout = "20s"

[trust]
duration = {TRUST_MINUTES * minute}
checkin_interval = {minute}

[cache]
path = "{directory}/state/trust-cache.json"
"""


class HAProxy:
    """HAProxy in TCP mode over the proxies; those named in ``disabled`` wait in maintenance
    (the blue-green swap's c, pods not created yet) until enabled."""

    def __init__(self, root: Path, proxies: dict[str, ProxyProcess], minute: float,
                 disabled: tuple[str, ...] = ("c",)) -> None:
        if shutil.which("haproxy") is None:
            raise SystemExit("fleet: haproxy is not installed (apt-get install haproxy)")
        self.port = free_port()
        self.socket = root / "haproxy.sock"
        servers = "\n".join(
            f"    server {name} {p.host}:{p.port} check port {p.status_port}"
            + (" disabled" if name in disabled else "")
            for name, p in proxies.items()
        )
        config = root / "haproxy.cfg"
        config.write_text(f"""global
    stats socket {self.socket} mode 600 level admin
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    # A refused connection (a proxy just killed) is tried again on another proxy.
    retries 2
    option redispatch
frontend licensing
    bind 127.0.0.1:{self.port}
    default_backend {BACKEND}
backend {BACKEND}
    balance roundrobin
    option httpchk GET /v1/ready
    http-check expect status 200
    # Every 2 s of a real minute, scaled like the day.
    default-server inter {max(100, round(2000 * minute / 60))}ms fall 2 rise 1
{servers}
""")
        self.log = open(root / "haproxy.log", "wb")
        self.process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.api = BLUE_GREEN_TOOL.HAProxy(str(self.socket))
        deadline = time.monotonic() + 20
        while not (self.socket.exists() and all(
            self.status(n).startswith("UP") for n in proxies if n not in disabled
        )):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fleet: HAProxy did not start; see {root / 'haproxy.log'}")
            time.sleep(0.1)

    def status(self, name: str) -> str:
        try:
            return self.api.server(BACKEND, name)["status"]
        except (OSError, SystemExit):
            return "?"

    def stop(self) -> None:
        stop(self.process)
        self.log.close()


class Fleet:
    """The containers: each its own credential, interval and timeout; one record per check-in."""

    def __init__(
        self, count: int, minute: float, port: int, context: ssl.SSLContext, seed: int
    ) -> None:
        rng = random.Random(seed)
        self.port = port
        self.minute = minute
        self.context = context
        self.containers = [
            {
                "id": i,
                "token": f"container-{i:04d}-{rng.getrandbits(64):016x}",
                "interval": 60 * rng.uniform(0.9, 1.1),  # simulated seconds
                "timeout": rng.uniform(5, 15),  # real seconds
                "rng": random.Random(rng.getrandbits(32)),
            }
            for i in range(count)
        ]
        self.records: list[list] = []  # [container, started, ended, ok, reason], monotonic
        self.tasks: set[asyncio.Task] = set()

    async def run(self, until: float) -> None:
        await asyncio.gather(*(self._container(c, until) for c in self.containers))
        if self.tasks:
            await asyncio.wait(self.tasks)

    async def _container(self, c: dict, until: float) -> None:
        rng = c["rng"]
        at = time.monotonic() + rng.uniform(0, c["interval"]) * self.minute / 60
        while at < until:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            # On schedule, whatever the previous check-in is doing (scaled time can be shorter
            # than a timeout): the fleet's rate stays that of the real one.
            task = asyncio.create_task(self._checkin(c))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            at += c["interval"] * rng.uniform(0.95, 1.05) * self.minute / 60

    async def _checkin(self, c: dict) -> None:
        started = time.monotonic()
        body = json.dumps({"container": c["id"]}).encode()
        request = (
            f"POST /v1/license/check-in HTTP/1.1\r\nHost: localhost:{self.port}\r\n"
            f"Authorization: Token {c['token']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        ok, reason = False, ""
        try:
            async with asyncio.timeout(c["timeout"]):
                for attempt in (1, 2):
                    try:
                        ok, reason = await self._exchange(request)
                        break
                    except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
                        reason = f"connection: {type(e).__name__}"
                        if getattr(e, "answered", False) or attempt == 2:
                            break
        except TimeoutError:
            reason = "client timeout"
        self.records.append([c["id"], started, time.monotonic(), ok, reason])

    async def _exchange(self, request: bytes) -> tuple[bool, str]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.context, server_hostname="localhost"
        )
        try:
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                e.answered = bool(e.partial)
                raise
            try:
                status = int(head.split(b" ", 2)[1])
                length = int(next(
                    line.split(b":", 1)[1] for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ))
                answer = await reader.readexactly(length)
            except (ValueError, IndexError, StopIteration, asyncio.IncompleteReadError):
                return False, "malformed answer"
        finally:
            writer.transport.abort()
        if status == 200 and b'"license"' in answer:
            return True, ""
        return False, f"{status}"


class Day:
    """Runs the script against the license server, the proxies and HAProxy; records it all."""

    script = SCRIPT
    title = "A day in the life"

    def __init__(self, args, root: Path) -> None:
        mode = MODES["short" if args.short else "full"]
        self.containers = args.containers or mode["containers"]
        self.minute = args.minute or mode["minute"]
        self.root = root
        self.pki = make_pki(root)
        self.server = LicenseServer(self.pki)
        self.proxies: dict[str, ProxyProcess] = {}
        self.events: list[dict] = []
        self.server_states: list[tuple[float, bool]] = []
        self.proxy_states: list[tuple[float, str, str]] = []
        self._flapper: asyncio.Task | None = None
        self.seed = args.seed
        self.t0 = 0.0

    @classmethod
    def arguments(cls, parser: argparse.ArgumentParser) -> None:
        """This day's own command-line options (the first day has none)."""

    def meta(self) -> dict:
        """This day's own facts in PREFIX.json's meta."""
        return {}

    def sim(self, monotonic: float) -> float:
        """Simulated minutes since the day began."""
        return (monotonic - self.t0) / self.minute

    def proxy(self, name: str) -> ProxyProcess:
        directory = self.root / name
        directory.mkdir(exist_ok=True)
        text = proxy_config(directory, self.pki, self.server, self.minute)
        proxy = ProxyProcess(directory, text, ca_file=self.pki.ca_cert, cli=CLI,
                             env={"LICENSE_PROXY_DRAIN_TIME": None})  # the product's default
        self.proxies[name] = proxy
        return proxy

    def server_up(self, up: bool) -> None:
        self.server_states.append((time.monotonic(), up))

    # -- the actions of the script ------------------------------------------------------

    async def answers(self) -> None:
        await self._stop_flapping()
        await asyncio.to_thread(self.server.fresh)
        self.server_up(True)

    async def storm(self) -> None:
        self.server.respond(503, b'{"error":"overloaded"}')
        self.server_up(False)

    async def refused(self) -> None:
        await asyncio.to_thread(self.server.stop)
        self.server_up(False)

    async def hang(self) -> None:
        self.server.mode = "hang"
        self.server_up(False)

    async def blackhole(self) -> None:
        await asyncio.to_thread(self.server.black_hole)
        self.server_up(False)

    async def wrong_host(self) -> None:
        pair = (self.pki.wrong_host_cert, self.pki.wrong_host_key)
        await asyncio.to_thread(self.server.fresh, pair)
        self.server_up(False)

    async def flapping(self) -> None:
        async def flap():
            while True:
                await self.refused()
                await asyncio.sleep(FLAP_SECONDS)
                await asyncio.to_thread(self.server.fresh)
                self.server_up(True)
                await asyncio.sleep(FLAP_SECONDS)

        self._flapper = asyncio.create_task(flap())

    async def _stop_flapping(self) -> None:
        if self._flapper is not None:
            self._flapper.cancel()
            try:
                await self._flapper
            except asyncio.CancelledError:
                pass
            self._flapper = None

    async def blue_green(self) -> str:
        a, c = self.proxies["a"], self.proxies["c"]
        # bin/blue-green --copy-state, before c starts (the script's --start is a shell command;
        # the day keeps c's process to kill it later).
        BLUE_GREEN_TOOL.copy_state(str(a.tmp_path / "state"), str(c.tmp_path / "state"))
        c.start()
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(BLUE_GREEN), "--socket", str(self.haproxy.socket),
             "--backend", BACKEND, "--old", "a", "--new", "c",
             "--status-url", f"http://127.0.0.1:{c.status_port}/v1/status",
             "--timeout", "60", "--stop", f"kill -TERM {a.process.pid}"],
            capture_output=True, text=True,
        )
        await asyncio.to_thread(a.wait_exit, 30)
        if result.returncode != 0:
            raise SystemExit(f"fleet: blue-green failed:\n{result.stdout}{result.stderr}")
        took = time.monotonic() - self.t0 - self.events[-1]["minute"] * self.minute
        return f"done in {took:.1f} s"

    async def kill_restart(self) -> str:
        c = self.proxies["c"]
        await asyncio.to_thread(c.kill)
        c.start()  # as a supervisor would, at once
        state = await asyncio.to_thread(c.wait_state, ("TrustBased", "Connected", "Failed"), 60)
        return f"back {state['state']}"

    async def wipe_restart(self) -> str:
        b = self.proxies["b"]
        await asyncio.to_thread(b.terminate)
        shutil.rmtree(b.tmp_path / "state")
        b.start()
        self.refusal = asyncio.create_task(asyncio.to_thread(_started_or_exited, b, 120))
        return "restarted"

    async def restart_b(self) -> str:
        outcome = await self.refusal
        b = self.proxies["b"]
        if not b.running:
            b.start()
        state = await asyncio.to_thread(b.wait_state, "Connected", 60)
        return f"{outcome}; now {state['state']}"

    async def end(self) -> None:
        pass

    # -- observing -----------------------------------------------------------------------

    async def poll_states(self) -> None:
        """Each proxy's state (from /v1/status) every half second, kept when it changes."""
        last: dict[str, str] = {}
        while True:
            for name, proxy in self.proxies.items():
                if proxy.process is None:
                    continue  # not started yet
                state = await _state_of(proxy.host, proxy.status_port)
                if last.get(name) != state:
                    last[name] = state
                    self.proxy_states.append((time.monotonic(), name, state))
            await asyncio.sleep(0.5)

    # -- the day -------------------------------------------------------------------------

    def client_context(self) -> ssl.SSLContext:
        """How a container's TLS verifies the proxies: the test CA, for "localhost"."""
        return ssl.create_default_context(cafile=self.pki.ca_cert)

    async def start(self) -> None:
        """Proxies a and b running, c (the blue-green swap's) configured, HAProxy over them."""
        for name in ("a", "b", "c"):  # c, the blue-green swap's new one, starts later
            self.proxy(name)
        for name, proxy in self.proxies.items():  # each the others' peer
            urls = ", ".join(
                f'"https://127.0.0.1:{other.port}/"'
                for other_name, other in self.proxies.items() if other_name != name
            )
            proxy.config_text += (
                f'\n[peers]\nurls = [{urls}]\nca_file = "{self.pki.ca_cert}"\n'
                f'cert_file = "{self.pki.peer_cert}"\nkey_file = "{self.pki.peer_key}"\n'
            )
        for name in ("a", "b"):
            self.proxies[name].start()
        for name in ("a", "b"):
            await asyncio.to_thread(self.proxies[name].wait_state, "Connected", 60)
        self.haproxy = HAProxy(self.root, self.proxies, self.minute)

    async def run(self) -> None:
        self.server.respond(body=b'{"license":"valid"}')
        self.server.start()
        await self.start()
        fleet = Fleet(self.containers, self.minute, self.haproxy.port, self.client_context(),
                      self.seed)
        self.fleet = fleet
        self.t0 = time.monotonic()
        self.server_up(True)
        end = self.t0 + self.script[-1][0] * self.minute
        poller = asyncio.create_task(self.poll_states())
        traffic = asyncio.create_task(fleet.run(end))
        try:
            for minute, action, what in self.script:
                await asyncio.sleep(max(0.0, self.t0 + minute * self.minute - time.monotonic()))
                event = {"minute": round(self.sim(time.monotonic()), 3), "action": action,
                         "what": what}
                self.events.append(event)
                print(f"fleet: {event['minute']:6.1f} min  {what}", flush=True)
                note = await getattr(self, action)()
                if note:
                    event["note"] = note
                    print(f"fleet: {self.sim(time.monotonic()):6.1f} min    {note}", flush=True)
                if traffic.done():
                    traffic.result()
            await traffic
        finally:
            poller.cancel()
            traffic.cancel()
            await self._stop_flapping()

    def shutdown(self) -> None:
        for proxy in self.proxies.values():
            if proxy.running:
                proxy.terminate()
        if getattr(self, "haproxy", None) is not None:
            self.haproxy.stop()
        self.server.close_hole()
        self.server.stop()


def _started_or_exited(proxy: ProxyProcess, timeout: float) -> str:
    """How a proxy started with no trust of its own during an outage ended its start: exited
    (no peer holding trust, the vendor's rule) or started on a peer's trust window."""
    try:
        return f"it started {proxy.wait_state(('TrustBased', 'Connected'), timeout)['state']}"
    except AssertionError:
        if proxy.running:
            raise
        return f"it had exited with status {proxy.process.returncode}"


async def _state_of(host: str, port: int) -> str:
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /v1/status HTTP/1.0\r\nHost: x\r\n\r\n")
            data = await reader.read()
            writer.close()
        return json.loads(data.split(b"\r\n\r\n", 1)[1])["state"]
    except (OSError, TimeoutError, ValueError, KeyError, IndexError):
        return "down"


# -- the figures -------------------------------------------------------------------------


def judge(day: Day) -> dict:
    """Each check-in inside or after the trust window; N, M and M's consistency."""
    answered = sorted(day.server.answered)
    window = TRUST_MINUTES * day.minute
    n = m = 0
    violations = []
    rows = []
    for container, started, ended, ok, reason in sorted(day.fleet.records, key=lambda r: r[1]):
        i = bisect.bisect_right(answered, started)
        last = answered[i - 1] if i else day.t0
        close = last + window
        after = started >= close - TOLERANCE
        if i >= 2 and last - answered[i - 2] > window and started < last + TOLERANCE:
            after = True  # the window opens again as the answer reaches the proxy
        if not ok:
            if after:
                m += 1
            else:
                n += 1
        elif after and started >= close + TOLERANCE:
            # Only a license server that answered again by then can have licensed it.
            j = bisect.bisect_right(answered, close)
            if not (j < len(answered) and answered[j] <= ended):
                violations.append([container, round(day.sim(started), 3)])
        rows.append([container, round(day.sim(started), 4), round(ended - started, 3), ok,
                     reason, "after" if after else "inside"])
    return {"n": n, "m": m, "violations": violations, "rows": rows}


def closes(day: Day) -> list[tuple[float, float]]:
    """Intervals (simulated minutes) from a trust window's close to the next answer."""
    answered = sorted(day.server.answered)
    window = TRUST_MINUTES * day.minute
    gaps = [(a, b) for a, b in zip(answered, answered[1:]) if b - a > window]
    return [(day.sim(a + window), day.sim(b)) for a, b in gaps]


def timeline(day: Day, rows: list) -> list[dict]:
    phases = []
    bounds = [e["minute"] for e in day.events] + [float("inf")]
    for event, start, end in zip(day.events, bounds, bounds[1:]):
        inside = [r for r in rows if start <= r[1] < end]
        failed = [r for r in inside if not r[3]]
        reasons = collections.Counter(r[4] for r in failed)
        phases.append({
            **event, "checkins": len(inside), "failed": len(failed),
            "failed_inside": sum(r[5] == "inside" for r in failed),
            "failed_after": sum(r[5] == "after" for r in failed),
            "reasons": dict(reasons.most_common()),
        })
    return phases


def draw(day: Day, rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = day.events[-1]["minute"]
    fig, (ax1, ax2, ax3) = plt.subplots(
        3, 1, figsize=(12, 7.5), sharex=True, gridspec_kw={"height_ratios": [1, 2, 3]}
    )
    xs = [day.sim(t) for t, _ in day.server_states] + [end]
    ys = [1 if up else 0 for _, up in day.server_states]
    ax1.fill_between(xs[:-1] + [end], ys + ys[-1:], step="post", color="tab:green", alpha=0.6)
    ax1.set_yticks([0, 1], ["down", "up"])
    ax1.set_title("license server (answering)")
    levels = {"down": 0, "Ready": 1, "Failed": 2, "TrustBased": 3, "Connected": 4}
    names = sorted({name for _, name, _ in day.proxy_states})
    for k, name in enumerate(names):
        points = [(day.sim(t), levels.get(s, 0)) for t, n, s in day.proxy_states if n == name]
        points.append((end, points[-1][1]))
        ax2.step([p[0] for p in points], [p[1] + 0.08 * (k - 1) for p in points],
                 where="post", label=f"proxy {name}")
    ax2.set_yticks(list(levels.values()), list(levels))
    ax2.legend(loc="lower left", fontsize=8)
    ax2.set_title("each proxy's state (/v1/status, polled every 0.5 s)")
    minutes = int(end) + 1
    inside = [0] * minutes
    after = [0] * minutes
    total = [0] * minutes
    for r in rows:
        b = min(int(r[1]), minutes - 1)
        total[b] += 1
        if not r[3]:
            (after if r[5] == "after" else inside)[b] += 1
    ax3.bar(range(minutes), inside, width=1, align="edge", color="tab:red",
            label="failed inside the trust window")
    ax3.bar(range(minutes), after, width=1, align="edge", bottom=inside, color="tab:gray",
            label="failed after it")
    ax3.step(range(minutes), total, where="post", color="black", lw=0.8, label="check-ins")
    ax3.set_ylabel("per simulated minute")
    ax3.set_xlabel("simulated minutes")
    ax3.legend(loc="upper left", fontsize=8)
    for start, stop_ in closes(day):
        for ax in (ax1, ax2, ax3):
            ax.axvspan(start, stop_, color="gray", alpha=0.15)
    for e in day.events:
        ax3.annotate(e["action"], (e["minute"], 0), xytext=(0, -28), rotation=60,
                     textcoords="offset points", fontsize=6, ha="right", annotation_clip=False)
    fig.suptitle(f"{day.title}: {day.containers} containers, 1 simulated minute = "
                 f"{day.minute:g} s, trust window {TRUST_MINUTES} min (shaded: closed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None, day_class: type[Day] = Day, doc: str = __doc__, name: str = "fleet") -> int:
    """Runs ``day_class``'s day (``doc``: its script's docstring; ``name``: its files' default
    prefix, bench/NAME and bench/NAME-short), prints the figures and writes the files."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="60 containers, 3 s a minute")
    parser.add_argument("--containers", type=int, default=0, help="override the mode's")
    parser.add_argument("--minute", type=float, default=0, help="real seconds per simulated minute")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--out", help="PREFIX of PREFIX.json and PREFIX.png "
                                      f"(default bench/{name}, bench/{name}-short)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    day_class.arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.out or REPO / "bench" / (f"{name}-short" if args.short else name))
    root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    day = day_class(args, root)
    print(f"fleet: {day.containers} containers, 1 simulated minute = {day.minute:g} s, "
          f"trust window {TRUST_MINUTES} simulated minutes; working in {root}", flush=True)
    started = datetime.now(timezone.utc)
    try:
        asyncio.run(day.run())
    finally:
        day.shutdown()
    verdict = judge(day)
    phases = timeline(day, verdict["rows"])
    print(f"{'minute':>7}  {'event':<100} {'check-ins':>9} {'failed':>6} {'inside':>6} "
          f"{'after':>6}  reasons")
    for p in phases:
        what = p["what"] + (f" ({p['note']})" if p.get("note") else "")
        print(f"{p['minute']:7.1f}  {what[:100]:<100} {p['checkins']:9d} {p['failed']:6d} "
              f"{p['failed_inside']:6d} {p['failed_after']:6d}  "
              + ", ".join(f"{k} x{v}" for k, v in p["reasons"].items()))
    consistent = not verdict["violations"]
    for start, stop_ in closes(day):
        print(f"trust window closed at {start:.1f} min until the license server answered again "
              f"at {stop_:.1f} min")
    print("M is consistent with the trust window: no check-in after it was answered from trust"
          if consistent else
          f"M is INCONSISTENT: {len(verdict['violations'])} check-ins after the window closed "
          f"were licensed, first ones (container, minute): {verdict['violations'][:5]}")
    meta = {
        "started": started.isoformat(timespec="seconds"), "machine": platform.node(),
        "cpus": os.cpu_count(), "load": open("/proc/loadavg").read().split()[:3],
        "containers": day.containers, "real_seconds_per_minute": day.minute,
        "trust_window_minutes": TRUST_MINUTES, "client_timeouts_seconds": [5, 15],
        "proxy_timeout_seconds": 30, "start_command": ["license-proxy", *CLI, "FILE"],
        "tolerance_seconds": TOLERANCE, "unlicensed_inside": verdict["n"],
        "unlicensed_after": verdict["m"], "consistent": consistent, **day.meta(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "meta": meta, "phases": phases,
        "server": [[round(day.sim(t), 4), up] for t, up in day.server_states],
        "proxy_states": [[round(day.sim(t), 4), n, s] for t, n, s in day.proxy_states],
        "closed": closes(day),
        "checkins": {"columns": ["container", "minute", "seconds", "ok", "reason", "window"],
                     "rows": verdict["rows"]},
    }, separators=(",", ":")) + "\n")
    draw(day, verdict["rows"], out.with_suffix(".png"))
    print(f"fleet: wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    if args.keep:
        print(f"fleet: kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    print(f"unlicensed container-minutes: {verdict['n']} inside the trust window, "
          f"{verdict['m']} after it")
    return 0 if verdict["n"] == 0 and consistent else 1


if __name__ == "__main__":
    sys.exit(main())

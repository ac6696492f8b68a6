"""
A day on Kubernetes: the fleet of bench/fleet.py checks in through the vendor chart's shape (a
Deployment of two pods, no state volume, rolling updates, pods lost and replaced) while the same
license-server faults happen; how long was any container left unlicensed?

    python bench/fleet_kubernetes.py              # 500 containers, 1 simulated minute = 15 s
    python bench/fleet_kubernetes.py --short      # 60 containers, 3 s a minute (CI)
    python bench/fleet_kubernetes.py --no-peers   # the same day, the pods given no peer settings

Run as root: each pod reads a hosts file of the day's own as /etc/hosts, in a private mount
namespace (``unshare --mount``, ``tests/support/hosts.py``); the machine's is untouched.

What is Kubernetes here, and how it is played:

- **Pods.** Each pod is a real ``license-proxy serve FILE`` process on its own loopback address
  (127.0.0.2, .3, ...: one per pod ever created) with the same two ports, as pods share one
  spec. Its TOML is the vendor chart's ConfigMap: ``[server]`` only (host, port, base_url,
  status_port; no certificate, so each pod generates its own), plus the test license server's
  ``[license]`` lines (as the chart's airgapped mode adds) and the day's scale (``[trust]``, as
  in bench/fleet.py). Its state directory is new and empty (the chart mounts no volume): nothing
  of a pod survives it.
- **Peers only through the environment** (the chart's one hook is ``extraEnv``):
  ``LICENSE_PROXY_PEERS_NAME`` (the headless Service's name), and the PEM of the peers' CA (one
  of its own, signing nothing else), of the pods' shared peer certificate (for that name) and of
  its key in ``LICENSE_PROXY_PEERS_CA``, ``_CERT``, ``_KEY``, and the shared salt (a Secret's,
  in ``LICENSE_PROXY_PEERS_SALT``: a new pod pulls its peers' answers before it is ready).
  ``--no-peers``: none of them.
- **The headless Service** (etc/kubernetes/peers.yaml): the name resolves to every pod's
  address, one hosts-file line each (``/etc/host.conf`` has ``multi on``). As the shipped
  Service publishes not-ready addresses, a pod is in the name from its start until its process
  has ended (terminated, killed, its node lost). The file is rewritten in place (the bind mounts
  hold its inode), and glibc's getaddrinfo, which the pods' resolver runs, reads it at each
  lookup.
- **The Service** (ClusterIP) is HAProxy, as in bench/fleet.py: each connection to a ready pod,
  round robin, readiness by ``GET /v1/ready`` (200 in Connected or TrustBased: the vendor's
  readiness rule). A pod not created yet is a server in maintenance; it is enabled once ready
  and put back in maintenance when it goes.
- **A pod that exits** (starting in an outage with no peer holding trust) is started again
  after 10 s, CrashLoopBackOff's first delay, on a new filesystem, until it is ready.
- **Rolling update** (maxSurge 1, maxUnavailable 0): a new pod starts; once ready it joins the
  Service; then an old pod gets SIGTERM and leaves the Service 1 s later (``ENDPOINT_LAG``:
  Kubernetes removes a terminating pod's endpoint as it signals it, and kube-proxy applies the
  change a moment later), still sent new connections meanwhile; the same for the second.
  The pods run with the product's default ``drain_time`` (5 s), as the chart runs them.
- **A node lost**: the pod is SIGKILLed, its state directory deleted, it leaves the name and the
  Service, and a new pod (new address, empty state) replaces it.

The containers: bench/fleet.py's, except that they do not verify the pods' generated
certificates. Accounting, picture and last line are bench/fleet.py's: a failed check-in is one
unlicensed container-minute, ``N`` inside the trust window, ``M`` after it.  Writes
bench/fleet-kubernetes(-short).json and .png by default; exit status 1 when N > 0 or M is
inconsistent.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import ssl
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import fleet
from fleet import BACKEND, FLAP_SECONDS, HAProxy, license_and_scale

from license_proxy.tls.certs import issue, make_ca  # noqa: E402
from tests.support.hosts import private_hosts, rewrite  # noqa: E402
from tests.support.proxy import ProxyProcess, free_port  # noqa: E402

#: The headless Service's name: every ready pod's address.
NAME = "deepgram-license-proxy-peers"
#: Pods in the order they are created; pod i listens on 127.0.0.(i + 2).
PODS = "abcdef"

#: Seconds before a pod that exited is started again (CrashLoopBackOff's first delay).
CRASH_LOOP_DELAY = 10.0
#: Simulated minutes the script waits for the pod replacing one killed in the outage.
REPLACE_WAIT = 5
#: Real seconds between a terminating pod's SIGTERM and its leaving the Service.
ENDPOINT_LAG = 1.0

#: The day, in simulated minutes: (when, action, what it is).  Actions are KubernetesDay methods.
SCRIPT = [
    (0, "answers", "normal traffic (pods a and b: the Deployment's two replicas)"),
    (4, "storm", "license server: 503 storm"),
    (6, "answers", "license server answers"),
    (7, "refused", "license server: connection refused"),
    (9, "answers", "license server answers"),
    (10, "hang", "license server: accepts and hangs"),
    (12, "answers", "license server answers"),
    (13, "blackhole", "license server: black hole (SYNs dropped)"),
    (15, "answers", "license server answers"),
    (16, "wrong_host", "license server: certificate for the wrong host"),
    (18, "answers", "license server answers"),
    (19, "flapping", f"license server: flapping ({FLAP_SECONDS:g} s up, {FLAP_SECONDS:g} s down)"),
    (21, "answers", "license server answers"),
    (22, "node_loss", "node lost under pod b (SIGKILL, state gone); pod c replaces it"),
    (26, "rolling_update",
     "rolling update (maxSurge 1, maxUnavailable 0): d in, a out; e in, c out"),
    # Scheduled a minute after the update began: it starts when the update ends if that is
    # later, so always within one check-in interval after it.
    (27, "outage", "outage begins (connection refused), within one check-in interval"),
    (30, "kill_replace", "SIGKILL pod d during the outage; pod f (empty state) replaces it"),
    (38, "answers", "license server returns"),
    (42, "end", "end of the day"),
]


class KubernetesDay(fleet.Day):
    """bench/fleet.py's day with pods: created, made ready, named, replaced (see the docstring)."""

    script = SCRIPT
    title = "A day on Kubernetes"

    def __init__(self, args, root: Path) -> None:
        super().__init__(args, root)
        self.peers = not args.no_peers
        self.hosts = root / "hosts"
        self.named: list[str] = []  # the pods the name resolves to, in order
        self.created = 0  # pods created so far (PODS[:created])
        self.update_ended = 0.0  # monotonic, when the rolling update's last old pod went
        self.exiting: list[asyncio.Task] = []  # terminated pods, until they have exited
        self.pod_events: list[list] = []  # [minute, pod, what]
        self.replacing: asyncio.Task | None = None
        self.loud = False  # pod events printed as they happen
        now = datetime.now(timezone.utc)
        ca = make_ca("license-proxy peers CA", now=now)
        pair = issue(ca, [NAME], now=now, peer=True)
        self.env = {
            "LICENSE_PROXY_PEERS_NAME": NAME,
            "LICENSE_PROXY_PEERS_CA": ca.cert_pem.decode(),
            "LICENSE_PROXY_PEERS_CERT": pair.cert_pem.decode(),
            "LICENSE_PROXY_PEERS_KEY": pair.key_pem.decode(),
            "LICENSE_PROXY_PEERS_SALT": secrets.token_hex(32),  # the pull at a pod's start
        } if self.peers else {}
        self.env["LICENSE_PROXY_DRAIN_TIME"] = None  # the product's default, as on the chart

    @classmethod
    def arguments(cls, parser) -> None:
        parser.add_argument("--no-peers", action="store_true",
                            help="the pods get no peer settings (no LICENSE_PROXY_PEERS_*)")

    def meta(self) -> dict:
        return {"day": "kubernetes", "peers": self.peers, "peers_name": NAME,
                "pods": self.pod_events, "peers_found": self.peers_found()}

    def peers_found(self) -> dict[str, list[str]]:
        """Each pod's peers as it last logged them (``discovery``): which name lookups it saw."""
        found = {}
        for name, proxy in self.proxies.items():
            lines = [x for x in proxy.log_text().splitlines() if f"peers: {NAME} names" in x]
            if lines:
                urls = lines[-1].split(" now: ", 1)[1]
                found[name] = [] if urls == "none" else urls.split(", ")
        return found

    def client_context(self) -> ssl.SSLContext:
        """The chart configures no certificate: each pod's is generated, and not verified."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def pod(self, name: str, port: int, status_port: int) -> ProxyProcess:
        """Pod ``name`` as the chart makes it: the ConfigMap, the environment, a new directory."""
        directory = self.root / name
        directory.mkdir()
        address = f"127.0.0.{PODS.index(name) + 2}"
        text = f"""# The vendor chart's ConfigMap, each pod on its own address
[server]
host = "{address}"
port = {port}
base_url = "/"
status_port = {status_port}

""" + license_and_scale(directory, self.pki, self.server, self.minute)
        proxy = ProxyProcess(directory, text, env=self.env, wrapper=private_hosts(self.hosts),
                             cli=fleet.CLI)
        self.proxies[name] = proxy
        return proxy

    def name_resolves_to(self, pods: list[str]) -> None:
        self.named = pods
        rewrite(self.hosts, "127.0.0.1 localhost\n"
                + "".join(f"{self.proxies[p].host} {NAME}\n" for p in pods))

    async def start(self) -> None:
        """Every pod of the day configured; a and b running and ready; the Service over them."""
        port, status_port = free_port(), free_port()
        for name in PODS:
            self.pod(name, port, status_port)
        self.name_resolves_to(["a", "b"])
        self.created = 2
        for name in "ab":
            self.proxies[name].start()
        for name in "ab":
            await asyncio.to_thread(self.proxies[name].wait_state, "Connected", 60)
        self.haproxy = HAProxy(self.root, self.proxies, self.minute, disabled=tuple(PODS[2:]))

    # -- the pods' lifecycle -------------------------------------------------------------

    async def new_pod(self) -> str:
        """The next pod started, in the name from its start; once ready (Connected or
        TrustBased), in the Service. Its name. A pod that exits (no license server, no peer
        holding trust) is restarted after CrashLoopBackOff's first delay, on a new filesystem,
        until ready."""
        name = PODS[self.created]
        self.created += 1
        proxy = self.proxies[name]
        self.name_resolves_to([*self.named, name])  # publishNotReadyAddresses: true
        began = time.monotonic()
        for _ in range(100):
            shutil.rmtree(proxy.tmp_path / "state", ignore_errors=True)
            proxy.start()
            try:
                await asyncio.to_thread(proxy.wait_state, ("Connected", "TrustBased"), 60)
                break
            except AssertionError:
                if proxy.running:
                    raise  # alive and not ready in 60 s: the day fails with the reason
                self.pod_event(name, f"exited with status {proxy.process.returncode}; "
                                     f"restarted in {CRASH_LOOP_DELAY:g} s")
                await asyncio.sleep(CRASH_LOOP_DELAY)
        self.pod_event(name, f"ready ({proxy.status()['state']}) {self._s(began)} after its "
                             f"start")
        self.haproxy.api.command(f"enable server {BACKEND}/{name}")
        self.haproxy.api.command(f"set server {BACKEND}/{name} state ready")
        return name

    def unnamed(self, name: str) -> None:
        self.name_resolves_to([p for p in self.named if p != name])

    async def terminate(self, name: str) -> None:
        """A terminating pod: SIGTERM, out of the Service ``ENDPOINT_LAG`` later; out of the
        name once it has exited, which the rollout does not wait for (Kubernetes counts a
        terminating pod in neither maxSurge nor maxUnavailable)."""
        proxy = self.proxies[name]
        os.kill(proxy.pid, signal.SIGTERM)
        await asyncio.sleep(ENDPOINT_LAG)
        self.haproxy.api.command(f"set server {BACKEND}/{name} state maint")

        async def exited() -> None:
            status = await asyncio.to_thread(proxy.wait_exit, 30)
            self.unnamed(name)
            self.pod_event(name, f"exited with status {status} after its SIGTERM")

        self.exiting.append(asyncio.create_task(exited()))

    async def lose(self, name: str) -> None:
        """SIGKILL and its state gone; then out of the name and the Service."""
        proxy = self.proxies[name]
        await asyncio.to_thread(proxy.kill)
        shutil.rmtree(proxy.tmp_path / "state", ignore_errors=True)
        self.unnamed(name)
        self.haproxy.api.command(f"set server {BACKEND}/{name} state maint")

    def pod_event(self, name: str, what: str) -> None:
        """Kept for PREFIX.json; printed when no action is waiting for it to say it."""
        self.pod_events.append([round(self.sim(time.monotonic()), 3), name, what])
        if self.loud:
            print(f"fleet: {self.sim(time.monotonic()):6.1f} min    pod {name} {what}", flush=True)

    # -- the actions of the script ------------------------------------------------------

    async def node_loss(self) -> str:
        await self.lose("b")
        new = await self.new_pod()
        return f"pod {new} {self.pod_events[-1][2]}"

    async def rolling_update(self) -> str:
        notes = []
        for old in list(self.named):
            began = time.monotonic()
            new = await self.new_pod()
            await self.terminate(old)
            notes.append(f"{new} ready and {old} out of the Service in {self._s(began)}")
        self.update_ended = time.monotonic()
        return "; ".join(notes)

    async def outage(self) -> str:
        await self.refused()
        gap = self.sim(time.monotonic()) - self.sim(self.update_ended)
        return f"{gap:.2f} simulated minutes after the update ended"

    async def kill_replace(self) -> str:
        await self.lose("d")
        self.replacing = asyncio.create_task(self.new_pod())
        await asyncio.wait({self.replacing}, timeout=REPLACE_WAIT * self.minute)
        if self.replacing.done():
            return f"pod {self.replacing.result()} {self.pod_events[-1][2]}"
        self.loud = True  # what it does next, nobody waits to say
        return f"pod {PODS[self.created - 1]} not ready {REPLACE_WAIT} simulated minutes later"

    async def end(self) -> None:
        if self.replacing is not None and not self.replacing.done():
            self.replacing.cancel()
        for exiting in self.exiting:
            await exiting  # a pod that did not end within 30 s of its SIGTERM fails the day

    @staticmethod
    def _s(began: float) -> str:
        return f"{time.monotonic() - began:.1f} s"


if __name__ == "__main__":
    sys.exit(fleet.main(day_class=KubernetesDay, doc=__doc__, name="fleet-kubernetes"))

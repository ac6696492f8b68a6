"""
Crash safety, end to end: a real ``twistd license-proxy`` is killed with SIGKILL again and
again while clients keep relaying through it, and restarted each time.  After every kill the
trust cache file must parse and load, and hold at least every answer relayed long enough
before a kill to have been written (``FLUSH_DELAY`` plus a margin); the next restart without
upstream must serve each of those answers from trust, with its body and a true Age.

The kill moments vary round by round: any moment; inside the flush window just after an
answer (a change not yet written); and inside a new snapshot (as soon as a temporary file of
the running process appears, the snapshot's or the journal's that follows it: the first write
after each start is one).  Journal lines are appended every 2 s in between.  Restarts
alternate between an unreachable upstream (answers must come from trust, the state is
TrustBased) and a reachable one.  A round with the upstream whose kill is not tied to its
first write keeps relaying until it owes answers before its kill moment begins, so every such
round proves something, whenever its kill lands.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from pathlib import Path

import attrs
import pytest
from twisted.internet.task import Clock

from license_proxy.cachewriter import FLUSH_DELAY
from license_proxy.trustcache import TrustCache
from tests.support.configs import config
from tests.support.proxy import ProxyProcess

ROUNDS = 51  # odd: the restart after the last kill is one without upstream
CLIENTS = 3
#: How long before a kill an answer must have come back to be owed after the restart: the
#: flush delay, plus time for a busy event loop to get to the write and finish it.
MARGIN = 1.0
KILL_MOMENTS = ("any", "flush window", "write")
#: How long an up round keeps relaying after its answer that will be owed, before its kill
#: moment begins, so the answers of that second are owed too.
HOLD = 1.0
#: Seconds each client waits between two requests: ~30 answers a second in all, so that each
#: restart without upstream can serve every owed answer (hundreds a round at full speed).
PACE = 0.1


@attrs.frozen
class Answer:
    """One answer the upstream gave through the proxy."""

    path: str
    token: str
    body: bytes
    at: float  # time.monotonic() when it came back


class Clients:
    """
    Threads relaying distinct requests (a new path each time, one credential per client) on
    fresh connections, ``PACE`` apart, whatever the proxy's state; they keep every answer that came from the
    upstream (200 without an Age header).  Failures while the proxy is down are expected.
    """

    def __init__(self, proxy: ProxyProcess, count: int) -> None:
        self.proxy = proxy
        self.answers: list[Answer] = []
        self.requests = 0
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(count)]

    def __enter__(self) -> "Clients":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join()

    def _run(self, n: int) -> None:
        token = f"Token crash-client-{n}"
        seq = 0
        while not self._stopping.is_set():
            path = f"/v1/crash/{n}/{seq}"
            seq += 1
            self.requests += 1
            try:
                code, headers, body = self.proxy.request(
                    "GET", path, headers={"Authorization": token}, timeout=5
                )
            except (OSError, http.client.HTTPException):
                self._stopping.wait(0.02)  # the proxy is down: try again shortly
                continue
            if code == 200 and "Age" not in headers:
                self.answers.append(Answer(path, token, body, time.monotonic()))
            self._stopping.wait(PACE)


def _kill(proxy: ProxyProcess, clients: Clients, moment: str, temps: list[Path]) -> bool:
    """SIGKILL at a ``moment`` of this kind; whether a snapshot was being written then."""

    def writing() -> bool:
        return any(temp.exists() for temp in temps)

    if moment == "any":
        time.sleep(random.uniform(0.05, 3.0))
    elif moment == "flush window":  # a new answer is stored, and not yet written
        time.sleep(random.uniform(0, 1.0))
        seen = len(clients.answers)
        deadline = time.monotonic() + 10
        while len(clients.answers) == seen and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(random.uniform(0, FLUSH_DELAY))
    else:  # the first write after a start makes a new snapshot; more follow as answers add up
        for _ in range(random.randint(1, 2)):
            while writing():
                time.sleep(0.0002)
            deadline = time.monotonic() + 3 * FLUSH_DELAY
            while not writing() and time.monotonic() < deadline:
                time.sleep(0.0002)
    assert proxy.kill() == -9
    return writing()


def _answer_to_owe(clients: Clients, since: float) -> None:
    """
    Relay until an answer given after ``since`` is old enough to be owed if the kill came now
    (written by a flush, with the margin), and ``HOLD`` more: each round that calls this owes
    answers whatever its kill moment, instead of only when that moment happens to come late.
    """
    deadline = time.monotonic() + 10
    while not any(answer.at > since for answer in clients.answers[-1:]):
        assert time.monotonic() < deadline, "no answer from the upstream through the proxy"
        time.sleep(0.01)
    time.sleep(FLUSH_DELAY + MARGIN + HOLD)


def _serve_from_trust(proxy: ProxyProcess, owed: dict[str, Answer]) -> int:
    """Each owed answer, from the proxy restarted without upstream: same body, a true Age."""
    assert proxy.wait_state("TrustBased")["last_successful_checkin"] is not None
    for answer in owed.values():
        code, headers, body = proxy.request(
            "GET", answer.path, headers={"Authorization": answer.token}
        )
        assert (code, body) == (200, answer.body), answer
        age = time.monotonic() - answer.at
        assert int(age) - 1 <= int(headers["Age"]) <= age + 1, (answer, dict(headers))
    served = len(owed)
    owed.clear()
    return served


@pytest.mark.timeout(600)
def test_sigkill_while_relaying_never_loses_a_written_answer(tmp_path, pki, upstream):
    text = config(tmp_path, pki, upstream.url, trust='duration = "1h"\ncheckin_interval = "1s"')
    proxy = ProxyProcess(tmp_path, text)
    state = tmp_path / "state"
    cache_path = state / "trust-cache.json"
    owed: dict[str, Answer] = {}  # written before a kill, not yet served after a restart
    settled: set[str] = set()  # paths answered before a kill
    figures = dict.fromkeys(
        ("rounds", "owing rounds", "owed", "from trust", "in writes", "entries"), 0
    )
    started = time.monotonic()
    previous_kill = 0.0
    try:
        with Clients(proxy, CLIENTS) as clients:
            for rnd in range(ROUNDS + 1):
                down = rnd % 2 == 1
                if down:
                    upstream.stop()
                proxy.start()
                if down:
                    figures["from trust"] += _serve_from_trust(proxy, owed)
                    upstream.start()
                else:
                    proxy.wait_state("Connected")
                moment = KILL_MOMENTS[rnd % len(KILL_MOMENTS)]
                # A round killed inside the first write after its start can't wait first.
                owing = not down and moment != "write"
                if owing:
                    _answer_to_owe(clients, previous_kill)
                if rnd == ROUNDS:  # the last restart only checks
                    assert rnd % 2 == 1 and not owed
                    proxy.terminate()
                    break
                if rnd == 0:  # the first cache file, needed by the first restart without upstream
                    deadline = time.monotonic() + 10
                    while not cache_path.exists():
                        assert time.monotonic() < deadline, "no trust cache file was written"
                        time.sleep(0.05)
                temps = [state / f"trust-cache.json{kind}.tmp-{proxy.process.pid}"
                         for kind in ("", ".journal")]
                figures["in writes"] += _kill(proxy, clients, moment, temps)
                killed = time.monotonic()
                figures["rounds"] += 1

                json.loads(cache_path.read_bytes())
                cache = TrustCache.load(Clock(), str(cache_path))
                assert not list(state.glob("*.corrupt-*")), f"round {rnd}: the cache was unusable"
                assert cache.last_checkin is not None
                # An answer is owed if this process gave it long enough before its kill; one
                # given later may or may not have been written, and is never owed.
                owed_before = figures["owed"]
                for answer in list(clients.answers):
                    if answer.path not in settled and answer.at <= killed:
                        settled.add(answer.path)
                        if previous_kill < answer.at <= killed - FLUSH_DELAY - MARGIN:
                            owed[answer.path] = answer
                            figures["owed"] += 1
                previous_kill = killed
                if owing:
                    assert figures["owed"] > owed_before, f"round {rnd}: no answer was owed"
                    figures["owing rounds"] += 1
                assert len(cache) >= figures["owed"], f"round {rnd}: answers missing from the file"
                figures["entries"] = len(cache)
    finally:
        if proxy.running:
            proxy.kill()

    strays = list(state.glob("*.tmp-*"))
    print(
        f"\ncrash: {figures['rounds']} SIGKILLs in {time.monotonic() - started:.0f} s, "
        f"{figures['in writes']} inside a cache write; {clients.requests} requests, "
        f"{len(clients.answers)} answered by the upstream; {figures['owed']} owed over "
        f"{figures['owing rounds']} owing rounds; {figures['from trust']} served "
        f"from trust after restarts without upstream; {figures['entries']} cache entries; "
        f"{len(strays)} temporary files left"
    )
    # Each owing round (the rounds with an upstream not killed in their first write) owed
    # answers, checked round by round above; every owed answer was served.
    assert figures["from trust"] == figures["owed"] >= figures["owing rounds"] > 0
    assert figures["in writes"] > 0, "no kill landed inside a cache write"
    # A kill inside a snapshot leaves its temporary file; the next start removes it.
    assert not strays, strays

"""
Unit tests of ``peers`` through the relay: two instances a and b, each the other's peer, each
with its own in-memory license server, trust cache and clock (treq.testing's agents).
"""

from __future__ import annotations

import json

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase
from twisted.logger import capturedLogs, formatEvent
from twisted.web.http_headers import Headers

from license_proxy.checkin import PULL_WITHIN, CheckIn, StartupFailed
from license_proxy.memorycache import Kept, MemoryCache
from license_proxy.metrics import PeersCollector
from license_proxy.peers import BATCH, PAGE, PAGE_BYTES, PUSH_DELAY, Peers
from tests.support.relayharness import CERTIFIED, T0, TRUST, RelayHarness

ALICE = {"Authorization": "Token alice"}


class _ToRelay:
    """Requests to an instance's relay, found when sent (each of the two is built first), over
    a connection with a peer certificate; or refused, as by an instance that is not running."""

    def __init__(self, harness) -> None:
        self._harness = harness
        self._agents: list[RequestTraversalAgent] = []
        self.refused = False
        self.sent = 0
        self.marks: list = []  # the mark of each request sent

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.sent += 1
        self.marks.append(headers.getRawHeaders(b"license-proxy-peer"))
        if self.refused:
            return fail(ConnectionRefusedError())
        headers = headers.copy()
        headers.setRawHeaders(CERTIFIED, [b"yes"])
        agent = RequestTraversalAgent(self._harness().relay)
        self._agents.append(agent)
        return agent.request(method, uri, headers, bodyProducer)

    def flush(self) -> None:
        for agent in self._agents:
            agent.flush()


class PeerTests(SynchronousTestCase):
    def setUp(self):
        self.to_b = _ToRelay(lambda: self.b)
        self.to_a = _ToRelay(lambda: self.a)
        self.a = RelayHarness(self, peer=self.to_b)
        self.b = RelayHarness(self, peer=self.to_a)

    def ask_a(self, headers=ALICE):
        d = self.a.request(headers=headers)
        for _ in range(4):
            for flush in (self.a.pump, self.to_b.flush, self.b.pump, self.to_a.flush):
                flush()
        return self.a.answer(self, d)

    def down(self, *harnesses):
        for h in harnesses:
            h.server.code = 503
            h.server.body = b"down"

    def test_an_answer_only_the_peer_has_is_served_and_kept(self):
        self.a.answer(self, self.a.request(headers={"Authorization": "Token bob"}))
        self.to_a.refused = True  # b's push of alice's answer does not reach a
        self.b.answer(self, self.b.request(headers=ALICE))  # alice checked in through b only
        self.b.clock.advance(70)
        self.to_a.refused = False
        self.down(self.a, self.b)
        response, body = self.ask_a()
        self.assertEqual((response.code, body), (200, b'{"license":"ok"}'))
        self.assertEqual(response.headers.getRawHeaders("age"), ["70"])  # b's, from its trust
        self.assertEqual(
            self.a.registry.get_sample_value(
                "license_proxy_relays_total", {"outcome": "served_by_peer"}
            ),
            1,
        )
        # Kept by a, with its true age: b's going does not bring the gap back.
        self.to_b.refused = True
        self.a.clock.advance(10)
        response, body = self.a.answer(self, self.a.request(headers=ALICE))
        self.assertEqual((response.code, body), (200, b'{"license":"ok"}'))
        self.assertEqual(response.headers.getRawHeaders("age"), ["80"])

    def test_a_peer_answers_from_trust_only_never_sending_the_request_again(self):
        """a's exchange may have reached the license server: a POST is never sent twice."""
        self.down(self.a)
        d = self.a.request("POST", data=b'{"usage":1}', headers=ALICE)
        for _ in range(4):
            for flush in (self.a.pump, self.to_b.flush, self.b.pump, self.to_a.flush):
                flush()
        response, _ = self.a.answer(self, d)
        self.assertEqual(response.code, 502)
        self.assertEqual((self.to_b.sent, self.b.server.count), (1, 0))

    def test_no_answer_anywhere_is_one_502_each_never_a_loop(self):
        self.a.answer(self, self.a.request(headers={"Authorization": "Token bob"}))
        self.down(self.a, self.b)
        response, body = self.ask_a()
        self.assertEqual(response.code, 502)
        self.assertIn("license server unavailable", json.loads(body)["error"])
        self.assertEqual((self.to_b.sent, self.to_a.sent), (1, 0))  # b did not ask a back
        self.assertEqual(
            self.b.registry.get_sample_value("license_proxy_relays_total", {"outcome": "unavailable"}),
            1,
        )

    def test_a_mark_without_a_peer_certificate_is_ignored(self):
        """A revoked key: the license server's 401, never the 200 in trust."""
        self.assertEqual(self.a.answer(self, self.a.request(headers=ALICE))[0].code, 200)
        self.a.server.code, self.a.server.body = 401, b'{"error":"revoked"}'
        for mark in ("x", "", "ask"):
            count = self.a.server.count
            response, body = self.a.answer(
                self, self.a.request(headers={**ALICE, "License-Proxy-Peer": mark})
            )
            self.assertEqual((response.code, body), (401, b'{"error":"revoked"}'), mark)
            self.assertEqual(self.a.server.count, count + 1)
            self.assertNotIn(b"license-proxy-peer", self.a.server.seen[-1][2])
        # A usage POST with the mark reaches the license server.
        self.a.server.code = 200
        response, _ = self.a.answer(
            self, self.a.request("POST", data=b'{"usage":1}', headers={**ALICE, "License-Proxy-Peer": "ask"})
        )
        self.assertEqual((response.code, self.a.server.seen[-1][3]), (200, b'{"usage":1}'))

    def test_a_probe_is_answered_by_the_instance_itself(self):
        count = self.a.server.count
        d = self.a.client.request(
            b"GET", b"https://proxy.local:8443/v1/anything",
            Headers({b"License-Proxy-Peer": [b"probe"], CERTIFIED: [b"yes"]}),
        )
        response, body = self.a.answer(self, d)
        self.assertEqual((response.code, body), (204, b""))
        self.assertEqual(self.a.server.count, count)

    def test_a_probe_without_a_peer_certificate_is_no_probe(self):
        count = self.a.server.count
        for method, path, code in ((b"GET", b"/v1/anything", 200), (b"TRACE", b"/admin", 405)):
            d = self.a.client.request(
                method, b"https://proxy.local:8443" + path, Headers({b"License-Proxy-Peer": [b"probe"]})
            )
            self.assertEqual(self.a.answer(self, d)[0].code, code, method)
        self.assertEqual(self.a.server.count, count + 1)  # the GET was relayed

    def test_peers_are_not_asked_when_this_instance_holds_a_trusted_answer(self):
        self.a.answer(self, self.a.request(headers=ALICE))
        self.b.server.body = b'{"license":"from b"}'
        self.b.answer(self, self.b.request(headers=ALICE))
        self.down(self.a, self.b)
        response, body = self.ask_a()
        self.assertEqual((response.code, body), (200, b'{"license":"ok"}'))
        self.assertEqual(self.to_b.sent, 0)

    def test_a_peers_502_is_no_answer_not_its_absence(self):
        """b has no answer for bob (502): it is still asked for carol's, which it has."""
        self.b.answer(self, self.b.request(headers={"Authorization": "Token carol"}))
        self.down(self.a, self.b)
        self.assertEqual(self.ask_a(headers={"Authorization": "Token bob"})[0].code, 502)
        response, body = self.ask_a(headers={"Authorization": "Token carol"})
        self.assertEqual((response.code, body), (200, b'{"license":"ok"}'))
        self.assertEqual(self.to_b.sent, 2)

    def test_a_peer_that_failed_is_skipped_until_a_probe_finds_it_back(self):
        self.b.answer(self, self.b.request(headers=ALICE))
        self.down(self.a, self.b)
        self.to_b.refused = True
        self.assertEqual(self.ask_a()[0].code, 502)
        self.assertEqual(self.to_b.sent, 1)
        self.assertEqual(self.ask_a()[0].code, 502)  # at once: b is not asked again
        self.assertEqual(self.to_b.sent, 1)
        self.to_b.refused = False
        self.a.clock.advance(5)  # the probe (every retry_interval at most) finds b
        self.a.pump()
        self.to_b.flush()
        self.assertEqual(self.to_b.sent, 2)
        self.assertEqual(self.to_b.marks, [[b"ask"], [b"probe"]])  # answered by b itself
        self.assertEqual(self.b.server.count, 1)  # alice's check-in only
        response, body = self.ask_a()
        self.assertEqual((response.code, body), (200, b'{"license":"ok"}'))

    def pump_both(self):
        for _ in range(4):
            for flush in (self.a.pump, self.to_b.flush, self.b.pump, self.to_a.flush):
                flush()

    def test_a_probe_answer_names_the_instance(self):
        """How an instance finding its peers by DNS knows its own address (``discovery``)."""
        d = Deferred.fromCoroutine(self.a.peers.identify("https://peer.local/"))
        self.pump_both()
        self.assertEqual(self.successResultOf(d), self.b.peers.instance)
        self.assertNotEqual(self.a.peers.instance, self.b.peers.instance)
        self.to_b.refused = True
        d = Deferred.fromCoroutine(self.a.peers.identify("https://peer.local/"))
        self.pump_both()
        self.assertIsNone(self.successResultOf(d))

    def test_peers_found_again_keep_their_state(self):
        """A peer down before ``use`` names it again stays down until a probe finds it back."""
        self.b.answer(self, self.b.request(headers=ALICE))
        self.down(self.a, self.b)
        self.to_b.refused = True
        self.assertEqual(self.ask_a()[0].code, 502)
        self.a.peers.use(["https://peer.local/", "https://other.local/"])
        self.assertEqual(
            [s.up for s in self.a.peers.health.servers], [False, True]
        )
        self.a.peers.use([])
        self.assertIsNone(self.a.peers.health)

    def test_the_status_and_the_metrics_list_the_peers(self):
        self.a.status.peers, self.b.status.peers = self.a.peers, self.b.peers
        for h in (self.a, self.b):
            h.registry.register(PeersCollector(h.peers))
        self.b.answer(self, self.b.request(headers=ALICE))
        self.down(self.a, self.b)
        self.assertEqual(self.ask_a()[0].code, 200)  # b's answer
        self.pump_both()  # b learns which peer a is
        (a_sees,) = json.loads(self.a.status.as_json())["peers"]
        (b_sees,) = json.loads(self.b.status.as_json())["peers"]
        self.assertEqual(
            (a_sees["url"], a_sees["up"], a_sees["received"], a_sees["sent"]),
            ("https://peer.local/", True, 1, 0),
        )
        self.assertEqual(a_sees["last_exchange"], "2027-01-15T08:00:00.000000Z")
        self.assertEqual((b_sees["received"], b_sees["sent"]), (0, 1))
        self.assertEqual(list(json.loads(self.a.status.as_json()))[-1], "peers")  # the last
        labels = {"peer": "https://peer.local/"}
        sample = self.b.registry.get_sample_value
        self.assertEqual(sample("license_proxy_peer_answers_sent_total", labels), 1)
        self.assertEqual(sample("license_proxy_peer_up", labels), 1)
        self.assertEqual(
            self.a.registry.get_sample_value("license_proxy_peer_answers_received_total", labels), 1
        )
        # Down: one log line (health's), and the status and the gauge say so.
        self.to_b.refused = True
        self.assertEqual(self.ask_a(headers={"Authorization": "Token bob"})[0].code, 502)
        self.assertFalse(json.loads(self.a.status.as_json())["peers"][0]["up"])
        self.assertEqual(self.a.registry.get_sample_value("license_proxy_peer_up", labels), 0)

    def start_a_in_an_outage(self):
        """a's start-up check-in, the license servers down: its outcome, and a's state."""
        self.down(self.a, self.b)
        checkin = CheckIn(self.a.clock, self.a.upstream, self.a.status, "key", self.a.peers)
        started = Deferred.fromCoroutine(checkin.startup(3.0))
        for _ in range(10):
            self.a.clock.advance(1)
            self.pump_both()
        return self.successResultOf(started.addErrback(lambda f: f.value))

    def test_a_start_in_an_outage_takes_a_peers_trust(self):
        self.b.answer(self, self.b.request(headers=ALICE))  # b checked in
        self.b.clock.advance(100)
        self.assertIsNone(self.start_a_in_an_outage())
        self.assertEqual(self.a.status.state, "TrustBased")
        self.assertEqual(self.a.cache.last_checkin, self.b.cache.last_checkin)
        self.assertEqual(self.a.status.trust_expiration, self.b.status.trust_expiration)
        # It serves: alice's answer, through b.
        response, body = self.ask_a()
        self.assertEqual((response.code, body), (200, b'{"license":"ok"}'))

    def test_a_start_in_an_outage_without_a_peers_trust_fails(self):
        """The vendor's rule, when no peer holds trust (b never checked in) or none answers."""
        self.assertIsInstance(self.start_a_in_an_outage(), StartupFailed)
        self.to_b.refused = True
        self.assertIsInstance(self.start_a_in_an_outage(), StartupFailed)
        self.assertEqual(self.a.status.state, "Ready")

    def test_a_peers_window_never_ends_later_here(self):
        """A longer [trust] duration here does not stretch the peer's window."""
        self.a.status.adopt(T0, T0 + 1800)  # the peer's duration: 30 minutes, TRUST here
        self.assertEqual(self.a.status.trust_expiration, T0 + 1800)
        self.a.clock.advance(60)
        self.a.status.adopt(T0 + 60, T0 + 60 + 2 * TRUST)  # a longer one: its last check-in
        self.assertEqual(self.a.cache.last_checkin, T0 + 60)
        self.a.status.adopt(T0 + 3600, T0 + 3600 + TRUST)  # a peer whose clock is an hour ahead
        self.assertEqual(self.a.cache.last_checkin, T0 + 60)  # a window begun now, no later
        self.assertEqual(self.a.status.trust_expiration, T0 + 60 + TRUST)

    def push_from_a(self, seconds=PUSH_DELAY):
        self.a.clock.advance(seconds)
        self.pump_both()

    def test_an_answer_stored_reaches_the_peers_within_a_push_delay(self):
        self.b.answer(self, self.b.request(headers={"Authorization": "Token bob"}))  # b's check-in
        self.a.answer(self, self.a.request(headers=ALICE))
        self.push_from_a()
        self.down(self.a, self.b)
        self.to_a.refused = True  # b answers alone: from its own trust
        self.b.clock.advance(30)
        response, body = self.b.answer(self, self.b.request(headers=ALICE))
        self.assertEqual((response.code, body), (200, b'{"license":"ok"}'))
        self.assertEqual(response.headers.getRawHeaders("age"), ["30"])  # stored when a stored it
        self.assertEqual(
            self.b.registry.get_sample_value("license_proxy_relays_total", {"outcome": "served_from_trust"}),
            1,
        )
        self.assertEqual(self.b.peers.records()[0].received, 1)
        self.assertEqual(self.a.peers.records()[0].sent, 1)

    def test_a_peers_push_never_replaces_a_newer_answer(self):
        self.a.answer(self, self.a.request(headers=ALICE))
        self.b.clock.advance(10)
        self.b.server.body = b'{"license":"newer"}'
        self.to_a.refused = True
        self.b.answer(self, self.b.request(headers=ALICE))  # stored after a's
        self.push_from_a()
        self.down(self.b)
        response, body = self.b.answer(self, self.b.request(headers=ALICE))
        self.assertEqual(body, b'{"license":"newer"}')

    def test_a_push_without_a_peer_certificate_is_relayed_as_any_post(self):
        push = json.dumps([{"method": "GET", "target": "v1/check", "headers": [], "status": 200,
                            "answer_headers": [], "body": "", "stored_at": T0}]).encode()
        count = self.a.server.count
        response, _ = self.a.answer(
            self, self.a.request("POST", data=push, headers={"License-Proxy-Peer": "store"})
        )
        self.assertEqual(response.code, 200)  # the license server's answer
        self.assertEqual(self.a.server.count, count + 1)

    def test_pushes_are_bounded_in_size_and_rate(self):
        for n in range(BATCH + 10):
            self.a.answer(self, self.a.request(headers={"Authorization": f"Token t{n}"}))
        self.push_from_a()
        self.assertEqual(self.a.peers.records()[0].sent, BATCH)
        self.push_from_a()
        self.assertEqual(self.a.peers.records()[0].sent, BATCH + 10)

    def test_pushes_are_bounded_in_bytes(self):
        """Under a peer's max_body_size: large answers go a few at a time."""
        self.a.server.body = b"x" * 100_000  # 133 kB in base64
        for n in range(5):
            self.a.answer(self, self.a.request(headers={"Authorization": f"Token t{n}"}))
        self.push_from_a()
        self.assertEqual(self.a.peers.records()[0].sent, 2)
        self.push_from_a(2 * PUSH_DELAY)
        self.assertEqual(self.a.peers.records()[0].sent, 4)


class PullTests(SynchronousTestCase):
    """The pull at start (``Peers.pull``): a takes b's answers before its state is told."""

    down, pump_both = PeerTests.down, PeerTests.pump_both

    def setUp(self):
        PeerTests.setUp(self)
        self.a.cache.memory.salt = self.b.cache.memory.salt = b"s" * 32  # [peers] salt_file

    def b_holds(self, count=1):
        """b stores ``count`` answers a never heard of (its pushes don't reach a)."""
        self.to_a.refused = True
        for n in range(count):
            self.b.answer(self, self.b.request(headers={"Authorization": f"Token {n}"}))
        self.to_a.refused = False

    def start_a(self, within=3.0):
        """a's start-up check-in with its license server up: its outcome, and the state it
        told while the pull was under way."""
        checkin = CheckIn(
            self.a.clock, self.a.upstream, self.a.status, "key", self.a.peers, self.a.cache
        )
        started = Deferred.fromCoroutine(checkin.startup(within))
        for _ in range(10):
            self.pump_both()
            self.a.clock.advance(1)
        return self.successResultOf(started.addErrback(lambda f: f.value))

    def key(self, n):
        return self.a.relay._key(b"GET", b"v1/check", Headers({"Authorization": [f"Token {n}"]}))

    def test_a_start_takes_the_peers_answers_before_it_is_connected(self):
        self.b_holds()
        self.a.clock.advance(70)  # a starts later
        self.b.clock.advance(70)
        held, sent = [], self.to_b.request

        def later(*args):  # b answers when told
            held.append((args, Deferred()))
            return held[-1][1]

        self.to_b.request = later
        checkin = CheckIn(
            self.a.clock, self.a.upstream, self.a.status, "key", self.a.peers, self.a.cache
        )
        started = Deferred.fromCoroutine(checkin.startup(3.0))
        self.a.pump()  # its license server answered; b not yet
        self.assertNoResult(started)
        self.assertEqual(self.a.status.state, "Ready")  # not Connected before b's answers
        for args, answered in held:
            sent(*args).chainDeferred(answered)
        self.pump_both()
        self.assertIsNone(self.successResultOf(started))
        self.assertEqual(self.a.status.state, "Connected")
        self.assertEqual(self.a.cache.lookup(self.key(0)), self.b.cache.lookup(self.key(0)))
        self.assertEqual(self.a.peers.records()[0].received, 1)
        self.down(self.a, self.b)
        self.a.clock.advance(70)
        response, body = self.a.answer(self, self.a.request(headers={"Authorization": "Token 0"}))
        self.assertEqual((response.code, body), (200, b'{"license":"ok"}'))
        self.assertEqual(response.headers.getRawHeaders("age"), ["140"])  # b's age, exactly

    def test_an_answer_pulled_is_never_stored_later_than_now_here(self):
        self.b.clock.advance(100)  # b's clock is ahead of a's
        self.b_holds()
        self.assertIsNone(self.start_a())
        self.assertLessEqual(self.a.cache.lookup(self.key(0)).stored_at, self.a.clock.seconds())

    def test_a_pull_never_replaces_a_newer_answer(self):
        self.b_holds()
        self.a.clock.advance(10)
        self.a.answer(self, self.a.request(headers={"Authorization": "Token 0"}))
        newer = self.a.cache.lookup(self.key(0))
        self.assertIsNone(self.start_a())
        self.assertEqual(self.a.cache.lookup(self.key(0)), newer)

    def test_a_peer_with_another_salt_gives_nothing_said_once(self):
        self.b.cache.memory.salt = b"t" * 32
        self.b_holds()
        with capturedLogs() as events:
            self.assertIsNone(self.start_a())
            self.assertIsNone(self.start_a())
        said = [formatEvent(e) for e in events if "another salt" in formatEvent(e)]
        self.assertEqual(len(said), 1)
        self.assertNotIn("s" * 32, "".join(formatEvent(e) for e in events))
        self.assertEqual(len(self.a.cache), 0)

    def test_pages_are_bounded_and_all_are_taken(self):
        self.b_holds(PAGE + 1)
        self.assertIsNone(self.start_a())
        self.assertEqual(len(self.a.cache), PAGE + 1)
        self.assertEqual(self.to_b.marks.count([b"entries"]), 2)

    def test_pages_are_bounded_in_bytes(self):
        self.b.server.body = b"x" * (PAGE_BYTES // 2)  # large answers: two a page
        self.b_holds(3)
        self.assertIsNone(self.start_a())
        self.assertEqual(len(self.a.cache), 3)
        self.assertEqual(self.to_b.marks.count([b"entries"]), 2)

    def test_a_dead_peer_holds_the_start_no_longer_than_the_bound(self):
        self.to_b.request = lambda *args, **kwargs: Deferred()  # black-holed
        # Each exchange with it waits longer than the start may.
        self.a.peers = Peers.using(self.to_b, self.a.clock, ["https://peer.local/"], 30.0, 5.0)
        checkin = CheckIn(
            self.a.clock, self.a.upstream, self.a.status, "key", self.a.peers, self.a.cache
        )
        started = Deferred.fromCoroutine(checkin.startup(30.0))
        self.a.pump()
        self.a.clock.advance(PULL_WITHIN - 0.5)
        self.a.pump()
        self.assertNoResult(started)
        self.a.clock.advance(1)
        self.a.pump()
        self.assertIsNone(self.successResultOf(started))
        self.assertEqual(self.a.status.state, "Connected")

    def test_peers_found_by_dns_are_pulled_from_once_the_first_lookup_found_them(self):
        self.b_holds()
        self.a.peers.named = True
        self.a.peers.use([])  # none until the lookup answers
        fingerprint = self.a.cache.memory.fingerprint()
        pulling = Deferred.fromCoroutine(self.a.peers.pull(fingerprint, self.a.cache.offer))
        self.assertNoResult(pulling)
        self.a.peers.use(["https://peer.local/"])
        self.pump_both()
        self.assertEqual(self.successResultOf(pulling), 1)
        # A pull given up (the start's bound) leaves the next lookup's ``use`` unharmed.
        self.a.peers.use([])
        given_up = Deferred.fromCoroutine(self.a.peers.pull(fingerprint, self.a.cache.offer))
        given_up.cancel()
        self.failureResultOf(given_up, CancelledError)
        self.a.peers.use(["https://peer.local/"])

    def test_a_malformed_page_is_no_pull_and_never_fails_the_start(self):
        for entry in (b'"status":200,"headers":[[1,2]],"body":""',  # a name that is no text
                      b'"status":200,"headers":[],"body":7',  # a body that is no text
                      b'"status":"x","headers":[],"body":""',
                      b'"headers":[],"body":""'):
            b_gives = [("k", Kept(entry, 1.0, 1.0))]
            self.patch(MemoryCache, "page", lambda memory, start, size, b_gives=b_gives: b_gives)
            self.assertIsNone(self.start_a(), entry)
            self.assertEqual(self.a.status.state, "Connected", entry)
            self.assertEqual(len(self.a.cache), 0, entry)

    def test_entries_without_a_peer_certificate_are_no_pull(self):
        self.b_holds()
        self.b.relay._from_peer = lambda request: False
        self.assertIsNone(self.start_a())
        self.assertEqual(len(self.a.cache), 0)


class HostilePeerTests(SynchronousTestCase):
    """What a peer sends is checked like any input: a peer with a broken clock, or a buggy
    or compromised one, must not stretch trust, break an answer or crash a start."""

    def setUp(self):
        self.h = RelayHarness(self)

    def push(self, body: bytes):
        headers = {"License-Proxy-Peer": "store", CERTIFIED.decode(): "yes"}
        return self.h.answer(self, self.h.request("POST", path="/", data=body, headers=headers))

    def pushed(self, stored_at) -> bytes:
        return json.dumps([{
            "method": "GET", "target": "v1/check", "headers": [["Authorization", "Token alice"]],
            "status": 200, "answer_headers": [["Content-Type", "application/json"]],
            "body": "eyJ4IjoxfQ==", "stored_at": stored_at,
        }]).encode()

    def test_a_date_that_is_no_number_is_no_push_and_nothing_is_stored(self):
        for date in (float("nan"), float("-inf"), float("inf")):
            response, _ = self.push(self.pushed(date))
            self.assertEqual(response.code, 400, date)
        self.h.status.adopt(T0, T0 + TRUST)
        self.h.server.code = 503
        response, _ = self.h.answer(self, self.h.request(headers=ALICE))
        self.assertEqual(response.code, 502)  # nothing stored, and no 500 either

    def test_a_nested_push_is_refused_not_a_crash(self):
        response, body = self.push(b"[" * 100_000)
        self.assertEqual(response.code, 400)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_an_age_no_clock_could_hold_is_none(self):
        from license_proxy.relay import _age

        self.assertEqual(_age(Headers({b"age": [b"9" * 5000]})), 0)
        self.assertEqual(_age(Headers({b"age": [b"42"]})), 42)

    def test_a_window_from_a_clock_ahead_starts_now_at_the_latest(self):
        year = 365 * 86400.0
        self.h.status.adopt(T0 + year, T0 + year + TRUST)
        self.assertEqual(self.h.status.trust_expiration, T0 + TRUST)
        self.assertIn(b'"state":"TrustBased"', self.h.status.as_json())

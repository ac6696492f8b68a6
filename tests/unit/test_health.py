"""
The outage rules (license_proxy.health) on an injected clock: through the
relay with an in-memory license server, and the fast connect endpoint on a
memory reactor.
"""

from __future__ import annotations

import json

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET

from license_proxy.checkin import CheckIn
from license_proxy.connect import ATTEMPT_DELAY, FastEndpoint
from license_proxy.health import Health
from license_proxy.metrics import MetricsPage, UpstreamCollector
from license_proxy.relay import Relay
from license_proxy.status import Status
from license_proxy.cachewriter import FLUSH_DELAY, MARK_LAG
from license_proxy.trustcache import TrustCache
from license_proxy.upstream import Upstream
from tests.support.relayharness import TRUST, FakeLicenseServer, RelayHarness

ANSWER_WITHIN = 2.0
RETRY = 5.0
KEY = "k-probe"


class HeldServer(FakeLicenseServer):
    """A license server whose hanging requests can be answered later."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list = []

    def render(self, request):
        body = super().render(request)
        if body is NOT_DONE_YET:
            self.held.append(request)
        return body

    def release(self, body: bytes = b'{"license":"late"}') -> None:
        held, self.held = self.held, []
        for request in held:
            request.setResponseCode(200)
            request.write(body)
            request.finish()


class OutageHarness(RelayHarness):
    """The relay with a ``Health`` whose jitter is fixed (probes at exactly
    ``RETRY``) and whose probe is the check-in, as the service wires them."""

    def __init__(self, testcase, urls=("https://license.example",), bound=None):
        """``bound``: each server's connections and waiting requests (None: unbounded)."""
        self.jitter = 1.0
        self.bound = bound
        super().__init__(testcase, urls)

    def use(self, server, cache):
        from treq.testing import RequestTraversalAgent

        self.health = Health.of(
            self.clock, self.urls, ANSWER_WITHIN, RETRY, jitter=lambda: self.jitter
        )
        self.status = Status(self.clock, cache, TRUST, self.health)
        self.agent = RequestTraversalAgent(server)
        self.upstream = Upstream.using(
            self.agent, self.clock, self.urls, 30.0, health=self.health, bound=self.bound
        )
        self.relay = Relay(self.clock, self.clock, self.upstream, cache, self.status, self.base, self.metrics)
        self.client = RequestTraversalAgent(self.relay)
        self.checkin = CheckIn(self.clock, self.upstream, self.status, KEY)
        self.health.probe_with(lambda index: Deferred.fromCoroutine(self.checkin.probe(index)))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump()


class OutageTests(SynchronousTestCase):
    def setUp(self):
        self.h = OutageHarness(self)
        self.server = HeldServer()
        self.h.use(self.server, self.h.cache)
        self.h.answer(self, self.h.request())  # a trusted answer to GET /v1/check
        self.assertEqual(self.h.status.state, "Connected")

    def get(self, path="/v1/check"):
        return self.h.request(path=path)

    def test_a_known_outage_is_answered_at_once_without_asking_the_server(self):
        self.server.code = 503
        with capturedLogs() as events:
            first, _ = self.h.answer(self, self.get())
            seen = self.server.count
            for _ in range(3):
                again, body = self.h.answer(self, self.get())
                self.assertEqual((again.code, body), (200, b'{"license":"ok"}'))
                self.assertIsNotNone(again.headers.getRawHeaders("age"))
            unknown, body = self.h.answer(self, self.get("/v1/unknown"))
        self.assertEqual(first.code, 200)
        self.assertEqual(self.server.count, seen)  # no attempt for any of them
        self.assertEqual(unknown.code, 502)
        self.assertEqual(unknown.headers.getRawHeaders("retry-after"), ["5"])
        self.assertIn("down since its last failure (answered 503)", json.loads(body)["error"])
        self.assertEqual(self.h.status.state, "TrustBased")
        # One line for the transition, one for the relay that saw it: none per request.
        downs = [e for e in events if "is down" in e["log_format"]]
        self.assertEqual([e["server_url"] for e in downs], ["https://license.example"])
        self.assertEqual(len([e for e in events if e["log_format"].startswith("relay")]), 1)

    def test_a_probe_at_the_retry_interval_brings_it_back(self):
        self.server.code = 503
        self.h.answer(self, self.get())
        seen = self.server.count
        self.h.advance(RETRY - 0.01)
        self.assertEqual(self.server.count, seen)
        self.server.code = 200
        with capturedLogs() as events:
            self.h.advance(0.01)
        method, uri, headers, _ = self.server.seen[-1]
        self.assertEqual((method, uri, headers[b"Authorization"]), (b"GET", b"/", [b"Token k-probe"]))
        self.assertEqual(self.h.status.state, "Connected")
        self.assertTrue(self.h.health.servers[0].up)
        self.assertEqual(len([e for e in events if "is up again" in e["log_format"]]), 1)
        # Relaying resumes, and no more probes.
        fresh, body = self.h.answer(self, self.get())
        self.assertIsNone(fresh.headers.getRawHeaders("age"))
        count = self.server.count
        self.h.advance(RETRY * 4)
        self.assertEqual(self.server.count, count)

    def test_probes_are_jittered_and_one_at_a_time(self):
        self.h.jitter = 0.0  # the shortest pause: half the interval
        self.server.code = 503
        self.h.answer(self, self.get())
        seen = self.server.count
        self.server.hang = True
        self.h.advance(RETRY / 2)
        self.assertEqual(self.server.count, seen + 1)
        # The probe hangs: no second one while it is outstanding.
        self.h.advance(29)
        self.assertEqual(self.server.count, seen + 1)
        self.server.hang = False
        self.h.advance(1)  # its timeout; the next is overdue, so it starts now
        self.assertEqual(self.server.count, seen + 2)
        # That one is quick: the next starts an interval after it began.
        self.h.advance(RETRY / 2 - 0.01)
        self.assertEqual(self.server.count, seen + 2)
        self.h.advance(0.01)
        self.assertEqual(self.server.count, seen + 3)

    def test_the_first_request_of_an_outage_waits_answer_within_at_most(self):
        self.server.hang = True
        d = self.get()
        self.h.advance(ANSWER_WITHIN - 0.01)
        self.assertNoResult(d)
        self.h.advance(0.01)
        response, body = self.h.answer(self, d)
        self.assertEqual((response.code, body), (200, b'{"license":"ok"}'))
        # Later ones are answered at once, and the server is not asked again.
        self.assertEqual(self.server.count, 2)
        again, _ = self.h.answer(self, self.get())
        self.assertEqual(again.code, 200)
        unknown, _ = self.h.answer(self, self.get("/v1/unknown"))
        self.assertEqual(unknown.code, 502)
        self.assertEqual(self.server.count, 2)
        # Busy is not down: the server's health waits for the outcome (the state says the
        # containers are on cached answers)...
        self.assertEqual(self.h.status.state, "TrustBased")
        self.assertTrue(self.h.health.servers[0].up)
        # ...which the timeout gives: now it is down.
        self.h.advance(30)
        self.assertFalse(self.h.health.servers[0].up)
        self.assertEqual(self.h.status.state, "TrustBased")

    def test_trust_based_from_the_first_answer_from_trust_until_an_exchange_completes(self):
        """The vendor's TrustBased: the relay failed and a cached answer was returned."""
        self.server.hang = True
        unknown = self.get("/v1/unknown")  # no trusted answer: it waits for the server
        self.h.advance(ANSWER_WITHIN - 0.01)
        self.assertEqual(self.h.status.state, "Connected")
        self.h.advance(0.01)  # the server is busy now
        self.assertEqual(self.h.status.state, "Connected")  # no one answered from trust yet
        self.assertEqual(self.h.answer(self, self.get())[1], b'{"license":"ok"}')
        self.assertEqual(self.h.status.state, "TrustBased")
        self.assertTrue(self.h.health.servers[0].up)  # busy, not down
        self.server.release()
        self.h.pump()
        self.assertEqual(self.h.answer(self, unknown)[0].code, 200)
        # A late answer: a check-in, but the containers were still on cached answers.
        self.assertEqual(self.h.status.state, "TrustBased")
        self.server.hang = False
        self.h.answer(self, self.get())  # completed within answer_within
        self.assertEqual(self.h.status.state, "Connected")
        self.server.hang = True
        d = self.get()
        self.h.advance(ANSWER_WITHIN)  # its own exchange outstanding answer_within
        self.assertEqual(self.h.answer(self, d)[1], b'{"license":"ok"}')
        self.assertEqual(self.h.status.state, "TrustBased")

    def test_a_stop_is_not_taken_for_a_failure_of_the_exchange_it_cancels(self):
        self.server.hang = True
        d = self.get()
        self.h.advance(ANSWER_WITHIN)
        self.assertEqual(self.h.answer(self, d)[1], b'{"license":"ok"}')  # from trust
        with capturedLogs() as events:
            self.successResultOf(self.h.relay.stop())  # cancels the exchange going on
            self.h.advance(30)  # its deadline: had it run on, the server would be down now
        self.assertTrue(self.h.health.servers[0].up)
        self.assertEqual(self.h.status.state, "TrustBased")  # as the trusted answer left it
        self.assertEqual([e["log_format"] for e in events if "down" in e["log_format"]], [])

    def test_an_exchange_sent_to_the_background_after_a_stop_began_is_cancelled(self):
        self.server.hang = True
        d = self.get()
        stopped = self.h.relay.stop()  # the request above is still within answer_within
        self.h.advance(ANSWER_WITHIN)
        self.assertEqual(self.h.answer(self, d)[1], b'{"license":"ok"}')
        self.successResultOf(stopped)
        self.h.advance(30)  # its deadline: had it run on, the server would be down now
        self.assertTrue(self.h.health.servers[0].up)
        self.assertEqual(self.h.status.state, "Connected")

    def test_a_periodic_check_in_while_the_server_is_busy_is_no_failure(self):
        self.server.hang = True
        d = self.get()
        self.h.advance(ANSWER_WITHIN)
        self.h.answer(self, d)  # the server is busy now, not down
        with capturedLogs() as events:
            self.successResultOf(Deferred.fromCoroutine(self.h.checkin.periodic()))
        self.assertEqual(self.h.status.state, "TrustBased")  # as the trusted answer left it
        self.assertEqual([e for e in events if "check-in failed" in e["log_format"]], [])

    def test_a_slow_but_healthy_server_is_not_taken_for_dead(self):
        self.server.hang = True
        d = self.get()
        self.h.advance(ANSWER_WITHIN)
        self.assertEqual(self.h.answer(self, d)[1], b'{"license":"ok"}')
        self.h.advance(1)
        self.server.release()  # answered after 3 s
        self.h.pump()
        # Its late answer updated the cache and renewed trust, and the state stays as the
        # trusted answer left it; the server was never down.
        self.assertEqual(self.h.status.state, "TrustBased")
        self.assertTrue(self.h.health.servers[0].up)
        self.server.hang = False
        self.server.code = 503
        self.assertEqual(self.h.answer(self, self.get())[1], b'{"license":"late"}')

    def test_a_steadily_slow_server_leaves_the_state_trust_based_not_flipping(self):
        """Every answer 1.5 answer_within late: the containers are on cached answers
        throughout, so one change of state, not one per request."""
        self.server.hang = True
        with capturedLogs() as events:
            for _ in range(5):
                d = self.get()
                self.h.advance(ANSWER_WITHIN)
                self.assertEqual(self.h.answer(self, d)[0].code, 200)  # from trust
                self.assertEqual(self.h.status.state, "TrustBased")
                self.h.advance(ANSWER_WITHIN / 2)
                self.server.release()  # its late answer: a check-in
                self.h.pump()
                self.assertEqual(self.h.status.state, "TrustBased")
        changes = [e for e in events if e.get("log_namespace", "").endswith("status.Status")]
        self.assertEqual([(e["old"], e["new"]) for e in changes], [("Connected", "TrustBased")])

    def test_a_late_periodic_check_in_renews_trust_and_leaves_the_state(self):
        self.server.hang = True
        d = self.get()
        self.h.advance(ANSWER_WITHIN)
        self.h.answer(self, d)  # from trust: TrustBased
        self.server.release()
        self.h.pump()
        checkin = Deferred.fromCoroutine(self.h.checkin.periodic())
        self.h.advance(ANSWER_WITHIN)
        before = self.h.cache.last_checkin
        self.server.release()  # the check-in's answer, late
        self.h.pump()
        self.successResultOf(checkin)
        self.assertGreater(self.h.cache.last_checkin, before)  # trust renewed...
        self.assertEqual(self.h.status.state, "TrustBased")  # ...the state as it was
        self.server.hang = False
        self.successResultOf(Deferred.fromCoroutine(self.h.checkin.periodic()))
        self.assertEqual(self.h.status.state, "Connected")  # answered in time

    def test_502_503_and_504_mean_down_and_other_answers_do_not(self):
        for code, up in ((502, False), (503, False), (504, False), (500, True), (501, True)):
            self.h.health.try_again("the next answer")
            self.server.code = code
            self.h.answer(self, self.get())
            self.assertEqual(self.h.health.servers[0].up, up, code)

    def test_an_exchange_completed_since_a_slow_one_began_keeps_the_server_usable(self):
        """One slow request must not make a healthy server busy for everyone."""
        self.server.hang = True
        self.get()
        self.h.advance(ANSWER_WITHIN / 2)
        self.server.hang = False
        self.assertIsNone(self.h.answer(self, self.get())[0].headers.getRawHeaders("age"))
        self.h.advance(ANSWER_WITHIN)  # the slow one is outstanding for 1.5 answer_within
        seen = self.server.count
        response, _ = self.h.answer(self, self.get())
        self.assertEqual(self.server.count, seen + 1)  # asked, not skipped as busy
        self.assertIsNone(response.headers.getRawHeaders("age"))

    def test_failed_probes_keep_the_clock_high_water_mark_up_in_an_idle_outage(self):
        self.server.code = 503
        self.h.answer(self, self.get())  # down; no client asks again
        for _ in range(round(3 * MARK_LAG / RETRY)):
            self.h.advance(RETRY)
        mark = TrustCache.load(self.h.clock, self.h.cache_path).high_water
        self.assertGreaterEqual(mark, self.h.clock.seconds() - MARK_LAG - FLUSH_DELAY)

    def test_the_status_and_metrics_show_each_server(self):
        self.server.code = 503
        self.h.answer(self, self.get())
        report = json.loads(self.h.status.as_json())
        self.assertEqual(list(report)[:3], ["state", "last_successful_checkin", "trust_expiration"])
        self.assertEqual(
            report["license_servers"],
            [
                {
                    "server_url": "https://license.example",
                    "up": False,
                    "down_since": "2027-01-15T08:00:00.000000Z",
                    "last_error": "answered 503",
                }
            ],
        )
        self.h.registry.register(UpstreamCollector(self.h.upstream))
        page = MetricsPage(self.h.registry).render_GET(_FakeRequest())
        self.assertIn(
            b'license_proxy_license_server_up{server_url="https://license.example"} 0.0', page
        )
        self.assertNotIn(KEY.encode(), page)


class RelayBeyondTheBoundTests(SynchronousTestCase):
    """Through the relay: beyond the bound is answered as in an outage."""

    def setUp(self):
        self.h = OutageHarness(self, bound=(1, 0))
        self.server = HeldServer()
        self.h.use(self.server, self.h.cache)
        self.h.answer(self, self.h.request())  # a trusted answer to GET /v1/check

    def test_a_request_beyond_the_bound_is_answered_from_trust_or_502_at_once(self):
        self.server.hang = True
        first = self.h.request()
        trusted, body = self.h.answer(self, self.h.request())
        self.assertEqual((trusted.code, body), (200, b'{"license":"ok"}'))
        self.assertIsNotNone(trusted.headers.getRawHeaders("age"))
        unknown, _ = self.h.answer(self, self.h.request(path="/v1/unknown"))
        self.assertEqual(unknown.code, 502)
        self.assertEqual(self.server.count, 2)  # the first (and the one before): no others
        # The server is neither down nor slow: the proxy's own bound changes no state.
        self.assertEqual(self.h.status.state, "Connected")
        self.assertTrue(self.h.health.servers[0].up)
        self.server.release()
        self.h.pump()
        self.assertEqual(self.h.answer(self, first)[1], b'{"license":"late"}')


class _FakeRequest:
    def setHeader(self, name, value):
        pass


class SeveralServersTests(SynchronousTestCase):
    def test_a_down_server_is_skipped_for_the_next(self):
        h = OutageHarness(self, urls=["https://first.example", "https://second.example"])

        class Two(FakeLicenseServer):
            def render(inner, request):
                inner.count += 1
                if request.getHeader(b"host") == b"first.example":
                    inner.seen.append(b"first")
                    request.setResponseCode(503)
                    return b""
                return b"second"

        server = Two()
        h.use(server, h.cache)
        for _ in range(3):
            response, body = h.answer(self, h.request())
            self.assertEqual((response.code, body), (200, b"second"))
        self.assertEqual(server.seen, [b"first"])  # asked once, then skipped
        self.assertEqual([s.up for s in h.health.servers], [False, True])


class FastConnectTests(SynchronousTestCase):
    """Connection failures reported as soon as the last address failed."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = Factory.forProtocol(Protocol)

    def refuse(self, n):
        _, _, factory, _, _ = self.reactor.tcpClients[n]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))

    def test_an_ip_literal_refused_fails_at_once(self):
        d = FastEndpoint(self.reactor, "127.0.0.1", 443, 2.0).connect(self.factory)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 443))
        self.refuse(0)
        self.failureResultOf(d, error.ConnectionRefusedError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_every_address_is_tried_and_the_last_failure_is_reported_at_once(self):
        self.reactor.nameResolver = _Resolver([IPv6Address("TCP", "::1", 0), IPv4Address("TCP", "127.0.0.1", 0)])
        d = FastEndpoint(self.reactor, "license.example", 443, 2.0).connect(self.factory)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.refuse(0)  # the next address at once, not at the next tick
        self.assertEqual(self.reactor.tcpClients[1][:2], ("127.0.0.1", 443))
        self.refuse(1)
        self.failureResultOf(d, error.ConnectionRefusedError)

    def test_the_next_address_is_tried_a_tenth_of_a_second_later(self):
        """RFC 8305's minimum Connection Attempt Delay; Twisted's 0.3 s was each relay's wait."""
        self.reactor.nameResolver = _Resolver([IPv6Address("TCP", "::1", 0), IPv4Address("TCP", "127.0.0.1", 0)])
        FastEndpoint(self.reactor, "license.example", 443, 2.0).connect(self.factory)
        self.reactor.advance(0.09)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.02)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_a_slow_address_does_not_hold_the_next(self):
        self.reactor.nameResolver = _Resolver([IPv6Address("TCP", "::1", 0), IPv4Address("TCP", "127.0.0.1", 0)])
        FastEndpoint(self.reactor, "license.example", 443, 2.0).connect(self.factory)
        self.reactor.advance(ATTEMPT_DELAY)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_an_address_that_connects_while_another_is_pending_wins(self):
        self.reactor.nameResolver = _Resolver([IPv6Address("TCP", "::1", 0), IPv4Address("TCP", "127.0.0.1", 0)])
        d = FastEndpoint(self.reactor, "license.example", 443, 2.0).connect(self.factory)
        self.reactor.advance(ATTEMPT_DELAY)  # ::1 still connecting when 127.0.0.1 is tried
        _, _, factory, _, _ = self.reactor.tcpClients[1]
        factory.buildProtocol(None).makeConnection(StringTransport())
        self.assertIsInstance(self.successResultOf(d), Protocol)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)  # the loser is cancelled

    def test_a_hanging_resolver_is_bounded_by_the_timeout(self):
        self.reactor.nameResolver = _Resolver(None)
        d = FastEndpoint(self.reactor, "license.example", 443, 2.0).connect(self.factory)
        self.reactor.advance(1.99)
        self.assertNoResult(d)
        self.reactor.advance(0.01)
        self.failureResultOf(d, error.TimeoutError)

    def test_a_name_without_addresses_is_a_dns_failure(self):
        self.reactor.nameResolver = _Resolver([])
        d = FastEndpoint(self.reactor, "license.invalid", 443, 2.0).connect(self.factory)
        self.failureResultOf(d, error.DNSLookupError)


class _Resolver:
    """Resolves to ``addresses`` at once, or never (None)."""

    def __init__(self, addresses):
        self._addresses = addresses

    def resolveHostName(self, receiver, hostName, portNumber=0, **kwargs):
        receiver.resolutionBegan(None)
        if self._addresses is None:
            return
        for address in self._addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()

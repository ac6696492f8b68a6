"""
The bound on connections to each license server (license_proxy.slots), through the real
Agent, pool and HTTP/1.1 client protocol, the server's side of each connection in memory
(test_pool's), on a memory reactor's clock.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from license_proxy.health import Health
from license_proxy.metrics import UpstreamCollector
from license_proxy.pool import RetryingPool
from license_proxy.upstream import Upstream, UpstreamFailure
from tests.support.memoryserver import Server

URL = "https://license.example"
ANSWER_WITHIN = 2.0
CONNECTIONS, PENDING = 2, 2


class SlotsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.server = Server(self.clock)
        self.addCleanup(lambda: [sock.close() for sock in self.server.peers])
        pool = RetryingPool(self.clock)
        agent = Agent.usingEndpointFactory(self.clock, self.server, pool=pool)
        self.health = Health.of(self.clock, [URL], ANSWER_WITHIN, 5.0)
        self.upstream = Upstream.using(
            agent, self.clock, [URL], 30.0, pool, self.health, (CONNECTIONS, PENDING)
        )

    def exchange(self):
        return Deferred.fromCoroutine(self.upstream.exchange(b"GET", b"v1/lic", Headers(), None))

    def test_requests_beyond_the_bound_wait_for_a_connection_and_reuse_it(self):
        first, second, third = self.exchange(), self.exchange(), self.exchange()
        self.assertEqual(len(self.server.connections), CONNECTIONS)
        self.assertNoResult(third)
        self.server.answer(0)
        self.assertEqual(self.successResultOf(first).body, b"ok")
        # The waiting one went out at once, on the connection just freed: none dialled.
        self.assertEqual(len(self.server.connections), CONNECTIONS)
        self.assertEqual(self.server.sent(0).count(b"/v1/lic"), 2)
        self.server.answer(0)
        self.server.answer(1)
        self.assertEqual([self.successResultOf(d).status for d in (second, third)], [200, 200])

    def test_a_full_queue_is_an_outage_at_once_counted_and_logged_once(self):
        held = [self.exchange() for _ in range(CONNECTIONS + PENDING)]
        with capturedLogs() as events:
            turned_away = [self.exchange() for _ in range(3)]
        for d in turned_away:
            failure = self.failureResultOf(d, UpstreamFailure).value
            self.assertFalse(failure.attempted)  # the server was not asked: not its failure
            self.assertEqual(failure.reason, "2 connections in use and 2 requests waiting")
        self.assertEqual(len(self.server.connections), CONNECTIONS)
        self.assertTrue(self.health.servers[0].up)
        warned = [e for e in events if "until the queue drains" in e["log_format"]]
        self.assertEqual(len(warned), 1)
        with capturedLogs() as events:
            self.answer_all()
        self.assertEqual([self.successResultOf(d).status for d in held], [200] * 4)
        drained = [e for e in events if "no request waits" in e["log_format"]]
        self.assertEqual([e["count"] for e in drained], [3])
        self.assertEqual(self._scraped(b"queue_full"), 3.0)

    def answer_all(self) -> None:
        """Answer each request sent and not yet answered, those that go out meanwhile too."""
        answered = [0] * len(self.server.connections)
        for _ in range(20):
            due = [
                n for n, count in enumerate(answered) if self.server.sent(n).count(b"GET ") > count
            ]
            if not due:
                return
            for n in due:
                answered[n] += 1
                self.server.answer(n)
        raise AssertionError("requests kept coming")

    def test_a_request_waits_answer_within_at_most(self):
        for _ in range(CONNECTIONS):
            self.exchange()
        waiting = self.exchange()
        self.clock.advance(ANSWER_WITHIN - 0.01)
        self.assertNoResult(waiting)
        self.clock.advance(0.01)
        failure = self.failureResultOf(waiting, UpstreamFailure).value
        self.assertEqual(
            (failure.attempted, failure.reason),
            (False, "no connection free within 2 s (2 in use)"),
        )
        self.assertEqual(len(self.server.connections), CONNECTIONS)
        self.assertEqual(self._scraped(b"waited"), 1.0)

    def test_a_cancelled_request_leaves_the_queue(self):
        first = self.exchange()
        self.exchange()
        cancelled, next_ = self.exchange(), self.exchange()
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.server.answer(0)
        self.successResultOf(first)
        self.assertEqual(self.server.sent(0).count(b"/v1/lic"), 2)  # the next one's, not none
        self.server.answer(0)
        self.assertEqual(self.successResultOf(next_).status, 200)

    def test_the_metrics_show_connections_in_use_and_requests_waiting(self):
        for _ in range(CONNECTIONS + 1):
            self.exchange()
        page = self._page()
        url = URL.encode()
        self.assertIn(b'license_proxy_upstream_connections{server_url="%s"} 2.0' % url, page)
        self.assertIn(b'license_proxy_upstream_waiting{server_url="%s"} 1.0' % url, page)

    def _page(self) -> bytes:
        registry = CollectorRegistry()
        registry.register(UpstreamCollector(self.upstream))
        return generate_latest(registry)

    def _scraped(self, reason: bytes) -> float:
        line = b'license_proxy_upstream_overflows_total{reason="%s",server_url="%s"} ' % (
            reason, URL.encode()
        )
        for row in self._page().splitlines():
            if row.startswith(line):
                return float(row[len(line):])
        raise AssertionError(f"no {line!r} in {self._page()!r}")



"""
The one retry of a request that failed on a stale pooled connection: Go's
net/http rule, through the real Agent, pool and HTTP/1.1 client protocol,
with the license server's side of each connection in memory and a clock.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    Agent,
    Request,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

from license_proxy.metrics import UpstreamCollector
from license_proxy.pool import BytesBody, RetryingPool, should_retry
from license_proxy.upstream import Upstream, UpstreamFailure
from tests.support.memoryserver import Server

TIMEOUT = 30.0
class RetryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.server = Server(self.clock)
        self.addCleanup(lambda: [sock.close() for sock in self.server.peers])
        self.pool = RetryingPool(self.clock)
        agent = Agent.usingEndpointFactory(self.clock, self.server, pool=self.pool)
        self.upstream = Upstream.using(
            agent, self.clock, ["https://license.example"], TIMEOUT, self.pool
        )

    def exchange(self, method=b"GET", body=None, headers=None):
        return Deferred.fromCoroutine(
            self.upstream.exchange(method, b"v1/lic", Headers(headers or {}), body)
        )

    def pooled(self):
        """One exchange answered in full: its connection (0) waits in the pool."""
        d = self.exchange()
        self.server.answer(0)
        self.assertEqual(self.successResultOf(d).body, b"ok")

    def test_a_get_the_server_dropped_is_sent_again_on_a_new_connection(self):
        self.pooled()
        d = self.exchange()
        self.assertTrue(self.server.sent(0).endswith(b"\r\n\r\n"))
        self.assertEqual(self.server.sent(0).count(b"GET /v1/lic"), 2)
        self.server.close(0)
        self.assertTrue(self.server.sent(1).startswith(b"GET /v1/lic HTTP/1.1"))
        self.server.answer(1)
        self.assertEqual(self.successResultOf(d).body, b"ok")
        self.assertEqual((len(self.server.connections), self.pool.retries), (2, 1))
        registry = CollectorRegistry()
        registry.register(UpstreamCollector(self.upstream))
        self.assertEqual(registry.get_sample_value("license_proxy_upstream_retries_total"), 1)

    def test_a_post_that_may_have_been_sent_is_not_sent_again(self):
        self.pooled()
        d = self.exchange(b"POST", b'{"usage":1}')
        self.assertTrue(self.server.sent(0).endswith(b'{"usage":1}'))
        self.server.close(0)
        failure = self.failureResultOf(d, UpstreamFailure)
        self.assertEqual(failure.value.reason, "connection closed before the answer was complete")
        self.assertEqual((len(self.server.connections), self.pool.retries), (1, 0))

    def test_a_post_with_an_idempotency_key_is_sent_again_with_its_body(self):
        self.pooled()
        d = self.exchange(b"POST", b'{"usage":1}', {b"Idempotency-Key": [b"k-1"]})
        self.server.close(0)
        self.assertTrue(self.server.sent(1).endswith(b'{"usage":1}'))
        self.server.answer(1)
        self.assertEqual(self.successResultOf(d).status, 200)
        self.assertEqual(self.pool.retries, 1)

    def test_a_close_the_reactor_has_not_read_yet_sends_nothing_on_that_connection(self):
        self.pooled()
        self.server.peers[1].close()  # its FIN waits, unread, in connection 0's socket
        d = self.exchange(b"POST", b'{"usage":1}')
        self.assertNotIn(b"POST", self.server.sent(0))
        self.assertTrue(self.server.connections[0][1].disconnecting)
        self.assertTrue(self.server.sent(1).endswith(b'{"usage":1}'))
        self.server.answer(1)
        self.assertEqual(self.successResultOf(d).status, 200)
        self.assertEqual(self.pool.retries, 1)

    def test_an_idle_connection_with_nothing_waiting_is_used(self):
        self.pooled()
        d = self.exchange(b"POST", b'{"usage":1}')
        self.assertTrue(self.server.sent(0).endswith(b'{"usage":1}'))
        self.server.answer(0)
        self.assertEqual(self.successResultOf(d).body, b"ok")
        self.assertEqual((len(self.server.connections), self.pool.retries), (1, 0))

    def test_never_after_a_byte_of_the_answer(self):
        self.pooled()
        d = self.exchange()
        self.server.answer(0, b"HTTP/1.1 200 OK\r\nContent-Le")
        self.server.close(0)
        self.failureResultOf(d, UpstreamFailure)
        self.assertEqual((len(self.server.connections), self.pool.retries), (1, 0))

    def test_never_when_the_connection_was_new(self):
        d = self.exchange()
        self.server.close(0)
        self.failureResultOf(d, UpstreamFailure)
        self.assertEqual((len(self.server.connections), self.pool.retries), (1, 0))

    def test_never_twice(self):
        self.pooled()
        d = self.exchange()
        self.server.close(0)
        self.server.close(1)
        self.failureResultOf(d, UpstreamFailure)
        self.assertEqual((len(self.server.connections), self.pool.retries), (2, 1))

    def test_the_retry_stays_inside_the_one_deadline(self):
        self.pooled()
        d = self.exchange()
        self.clock.advance(5)
        self.server.hold = True  # the new connection never completes
        self.server.close(0)
        self.assertEqual(self.pool.retries, 1)
        self.clock.advance(TIMEOUT - 5 - 0.01)
        self.assertNoResult(d)
        self.clock.advance(0.02)
        failure = self.failureResultOf(d, UpstreamFailure)
        self.assertEqual(failure.value.reason, "no complete answer within 30 s")

    def test_a_connection_closed_while_idle_is_not_used(self):
        self.pooled()
        self.server.close(0)
        d = self.exchange(b"POST", b"x")
        self.server.answer(1)
        self.assertEqual(self.successResultOf(d).body, b"ok")
        self.assertEqual(self.server.sent(0).count(b"/v1/lic"), 1)
        self.assertEqual(self.pool.retries, 0)

    def test_idle_connections_are_closed_before_common_server_keep_alives(self):
        self.pooled()
        self.assertLess(self.pool.cachedConnectionTimeout, 60)
        self.clock.advance(self.pool.cachedConnectionTimeout)
        self.assertTrue(self.server.connections[0][1].disconnecting)


def _request(method=b"GET", headers=None, body=None):
    return Request(method, b"/v1/lic", Headers(headers or {}), body, persistent=True)


_NEVER_RECEIVED = ResponseNeverReceived([Failure(ConnectionDone())])


@pytest.mark.parametrize(
    "request_, error, retried",
    [
        # Nothing of the request written: any method, if its body can be written again.
        (_request(b"POST", body=BytesBody(b"x")), RequestNotSent(), True),
        (_request(b"POST", body=object()), RequestNotSent(), False),
        # Written, no byte of the answer: only replayable requests.
        (_request(b"GET"), _NEVER_RECEIVED, True),
        (_request(b"HEAD"), _NEVER_RECEIVED, True),
        (_request(b"OPTIONS"), _NEVER_RECEIVED, True),
        (_request(b"TRACE"), _NEVER_RECEIVED, True),
        (_request(b"POST", body=BytesBody(b"x")), _NEVER_RECEIVED, False),
        (_request(b"DELETE"), _NEVER_RECEIVED, False),
        (_request(b"PUT", {b"Idempotency-Key": [b"1"]}, BytesBody(b"x")), _NEVER_RECEIVED, True),
        (_request(b"POST", {b"X-Idempotency-Key": [b"1"]}, BytesBody(b"x")), _NEVER_RECEIVED, True),
        # Cancelled (the deadline, a stop), an answer byte seen, writing failed midway.
        (_request(b"GET"), ResponseNeverReceived([Failure(CancelledError())]), False),
        (_request(b"GET"), ResponseFailed([Failure(ConnectionDone())]), False),
        (_request(b"GET"), RequestTransmissionFailed([Failure(ConnectionDone())]), False),
    ],
)
def test_the_rule_of_go_net_http(request_, error, retried):
    assert should_retry(request_, Failure(error)) is retried

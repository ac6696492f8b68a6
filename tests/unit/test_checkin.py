"""The start-up rule and the periodic check-in, on an injected clock."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from license_proxy.checkin import CheckIn, StartupFailed
from tests.support.relayharness import T0, TRUST, RelayHarness


class CheckInTests(SynchronousTestCase):
    def setUp(self):
        self.h = RelayHarness(self)

    def checkin(self, key="k-test"):
        return CheckIn(self.h.clock, self.h.upstream, self.h.status, key)

    def start(self, checkin, timeout=30.0):
        d = Deferred.fromCoroutine(checkin.startup(timeout))
        self.h.pump()
        return d

    def test_startup_checks_in_with_the_key(self):
        d = self.start(self.checkin("k-123"))
        self.successResultOf(d)
        method, uri, headers, _ = self.h.server.seen[0]
        self.assertEqual((method, uri), (b"GET", b"/"))
        self.assertEqual(headers[b"Authorization"], [b"Token k-123"])
        self.assertEqual(self.h.status.state, "Connected")

    def test_startup_retries_until_the_timeout_then_fails(self):
        self.h.server.code = 503
        d = self.start(self.checkin(), timeout=10.0)
        for _ in range(20):
            self.h.clock.advance(1)
            self.h.pump()
        failure = self.failureResultOf(d, StartupFailed)
        self.assertEqual(
            str(failure.value),
            "the license server could not be reached within 10 s: https://license.example: answered 503",
        )
        # At 0, 1, 3 and 7 s, and a last one at the deadline: no busy loop.
        self.assertEqual(self.h.server.count, 5)
        # Retrying at start is not yet a failure: probes see Ready, not Failed.
        self.assertEqual(self.h.status.state, "Ready")

    def test_startup_succeeds_when_the_server_comes_back(self):
        self.h.server.code = 503
        d = self.start(self.checkin())
        self.h.clock.advance(1)
        self.h.pump()
        self.assertNoResult(d)
        self.h.server.code = 200
        self.h.clock.advance(2)
        self.h.pump()
        self.successResultOf(d)
        self.assertEqual(self.h.status.state, "Connected")

    def test_startup_inside_a_cached_trust_window_is_trust_based_at_once(self):
        self.h.cache.record_checkin(T0 - TRUST / 2)
        self.h.server.code = 502
        self.successResultOf(self.start(self.checkin()))
        self.assertEqual(self.h.server.count, 1)
        self.assertEqual(self.h.status.state, "TrustBased")

    def test_a_rejected_key_stops_the_start(self):
        self.h.server.code = 403
        failure = self.failureResultOf(self.start(self.checkin("bad")), StartupFailed)
        self.assertEqual(str(failure.value), "the license server rejected the key (HTTP 403)")

    def test_later_rejections_are_logged_each_time(self):
        checkin = self.checkin("k-123")
        self.successResultOf(self.start(checkin))
        self.h.server.code = 401
        with capturedLogs() as events:
            for _ in range(2):
                d = Deferred.fromCoroutine(checkin.periodic())
                self.h.pump()
                self.successResultOf(d)
        errors = [e for e in events if "rejected the key" in e["log_format"]]
        self.assertEqual([e["status"] for e in errors], [401, 401])
        self.assertEqual(self.h.status.state, "Connected")

    def test_a_failed_periodic_check_in_moves_the_state(self):
        checkin = self.checkin()
        self.successResultOf(self.start(checkin))
        self.h.server.code = 500
        d = Deferred.fromCoroutine(checkin.periodic())
        self.h.pump()
        self.successResultOf(d)
        self.assertEqual(self.h.status.state, "TrustBased")

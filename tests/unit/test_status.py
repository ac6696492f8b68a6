"""The state machine (license_proxy.status): states, their times, and the status JSON, on an injected clock."""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from license_proxy.status import Status
from license_proxy.cachewriter import FLUSH_DELAY
from license_proxy.trustcache import TrustCache
from tests.support.relayharness import T0, TRUST


class StatusTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        tmpdir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmpdir)
        self.cache = TrustCache(self.clock, f"{tmpdir}/cache.json")
        self.status = Status(self.clock, self.cache, TRUST)

    def test_ready_json_has_nulls(self):
        self.assertEqual(
            self.status.as_json(),
            b'{"state":"Ready","last_successful_checkin":null,"trust_expiration":null,'
            b'"state_since":"2027-01-15T08:00:00.000000Z","cache_persisted":true,"cache_error":null}',
        )

    def test_connected_json_is_compact_rfc3339(self):
        self.clock.advance(0.123456)
        self.status.succeeded()
        self.assertEqual(
            self.status.as_json(),
            b'{"state":"Connected","last_successful_checkin":"2027-01-15T08:00:00.123456Z",'
            b'"trust_expiration":"2027-01-15T09:00:00.123456Z",'
            b'"state_since":"2027-01-15T08:00:00.123456Z","cache_persisted":true,"cache_error":null}',
        )

    def test_trust_based_turns_failed_when_the_window_closes(self):
        self.status.succeeded()
        self.status.failed()
        self.assertEqual(self.status.state, "TrustBased")
        self.clock.advance(FLUSH_DELAY)
        with capturedLogs() as events:
            self.clock.advance(TRUST - FLUSH_DELAY - 1)
            self.assertEqual(events, [])
            self.clock.advance(1)
        self.assertEqual(self.status.state, "Failed")
        # Logged as it happens, with nothing else going on.
        self.assertEqual([(e["old"], e["new"]) for e in events], [("TrustBased", "Failed")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_state_since_is_when_the_state_began(self):
        self.status.succeeded()
        self.clock.advance(10)
        self.status.succeeded()
        self.assertEqual(self.status.state_since, T0)
        self.status.failed()
        self.assertEqual(self.status.state_since, T0 + 10)
        # Failed began when the window closed, before anyone noticed...
        self.clock.advance(TRUST + 50)
        self.assertEqual(self.status.state_since, T0 + 10 + TRUST)
        # ...and stays so once a later failure reports it.
        self.status.failed()
        self.assertEqual(self.status.state_since, T0 + 10 + TRUST)

    def test_failure_before_any_success_is_failed(self):
        self.status.failed()
        self.assertEqual(self.status.state, "Failed")

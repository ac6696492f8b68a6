"""
Metrics and the status listener's endpoints, on an injected clock: what a
Prometheus scrape and a probe would read after each kind of relay.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import readBody

from license_proxy.cachefile import CacheFile
from license_proxy.metrics import MetricsPage, UpstreamCollector
from license_proxy.statuspages import status_resource
from tests.support.relayharness import TRUST, RelayHarness


class MetricsTests(SynchronousTestCase):
    def setUp(self):
        self.h = RelayHarness(self)
        self.h.registry.register(UpstreamCollector(self.h.upstream))
        root = status_resource(self.h.status, MetricsPage(self.h.registry))
        self.status_client = RequestTraversalAgent(root)

    def get(self, path):
        d = self.status_client.request(b"GET", b"http://status.local:8080" + path)
        self.status_client.flush()
        response = self.successResultOf(d)
        body = readBody(response)
        self.status_client.flush()
        return response, self.successResultOf(body)

    def scrape(self) -> dict:
        """``/metrics`` as served, parsed: {(name, ((label, value), ...)): value}."""
        response, body = self.get(b"/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain;")
        )
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def relay(self, path="/v1/check"):
        return self.h.answer(self, self.h.request(path=path))

    def test_a_relay_outcome_each_and_the_state_through_an_outage(self):
        m = self.scrape()
        self.assertEqual(m["license_proxy_state", (("state", "Ready"),)], 1)
        self.assertNotIn(("license_proxy_trust_remaining_seconds", ()), m)
        self.assertEqual(m["license_proxy_relays_total", (("outcome", "upstream_ok"),)], 0)
        self.assertEqual(m["license_proxy_build_info", (("version", m_version(m)),)], 1)

        self.h.clock.advance(0.25)
        self.relay()
        self.h.server.code = 404
        self.relay()
        self.h.server.code = 503
        self.relay()  # served from trust
        self.relay("/v1/never-answered")  # 502 at once: the 503 marked the server down
        self.h.answer(self, self.h.request(path="/../etc/passwd"))  # refused
        self.h.clock.advance(100)

        m = self.scrape()
        relays = {labels[0][1]: v for (name, labels), v in m.items() if name == "license_proxy_relays_total"}
        self.assertEqual(
            relays,
            {"upstream_ok": 1, "upstream_4xx": 1, "served_from_trust": 1, "served_by_peer": 0,
             "unavailable": 1, "rejected": 1},
        )
        # Three exchanges: the 502 was answered without one.
        self.assertEqual(m["license_proxy_upstream_latency_seconds_count", ()], 3)
        self.assertEqual(
            m["license_proxy_license_server_up", (("server_url", "https://license.example"),)], 0
        )
        self.assertEqual(m["license_proxy_state", (("state", "TrustBased"),)], 1)
        self.assertEqual(m["license_proxy_state", (("state", "Connected"),)], 0)
        self.assertEqual(m["license_proxy_state_seconds", ()], 100)
        self.assertEqual(m["license_proxy_seconds_since_last_checkin", ()], 100)
        self.assertEqual(m["license_proxy_trust_remaining_seconds", ()], TRUST - 100)
        self.assertEqual(m["license_proxy_cache_entries", ()], 1)

        # The window closes with no event at all: the scrape knows.
        self.h.clock.advance(TRUST)
        m = self.scrape()
        self.assertEqual(m["license_proxy_state", (("state", "Failed"),)], 1)
        self.assertEqual(m["license_proxy_state", (("state", "TrustBased"),)], 0)
        self.assertEqual(m["license_proxy_state_seconds", ()], 100)
        self.assertEqual(m["license_proxy_trust_remaining_seconds", ()], -100)

    def test_cache_write_failures_are_counted_and_shown_until_a_write_succeeds(self):
        file = self.h.cache.writer.file
        self.assertEqual(self.scrape()["license_proxy_cache_persisted", ()], 1)
        self.h.cache.writer.file = CacheFile("/nonexistent-dir/cache.json")
        self.relay()
        self.h.clock.advance(2)
        self.h.clock.advance(4)
        m = self.scrape()
        self.assertEqual(m["license_proxy_cache_write_failures_total", ()], 2)
        self.assertEqual(m["license_proxy_cache_persisted", ()], 0)
        body = self.get(b"/v1/status")[1]
        self.assertTrue(
            body.endswith(b',"cache_persisted":false,"cache_error":"No such file or directory"}\n'),
            body,
        )
        self.assertEqual(self.get(b"/v1/ready")[0].code, 200)  # still Connected: in memory
        self.h.cache.writer.file = file
        self.h.clock.advance(8)
        self.assertEqual(self.scrape()["license_proxy_cache_persisted", ()], 1)
        self.assertIn(b',"cache_persisted":true,"cache_error":null}', self.get(b"/v1/status")[1])

    def test_evictions_are_counted_and_entries_stay_bounded(self):
        self.h.cache.memory.max_entries = 2
        for n in range(5):
            self.relay(f"/v1/check?n={n}")
        m = self.scrape()
        self.assertEqual(m["license_proxy_cache_entries", ()], 2)
        self.assertEqual(m["license_proxy_cache_evictions_total", ()], 3)

    def test_ready_and_health(self):
        self.assertEqual(self.get(b"/v1/ready")[0].code, 503)
        response, body = self.get(b"/v1/health")
        self.assertEqual((response.code, body), (200, b'{"alive":true}\n'))
        self.relay()
        response, body = self.get(b"/v1/ready")
        self.assertEqual(response.code, 200)
        self.assertTrue(body.startswith(b'{"state":"Connected",'))
        self.h.server.code = 503
        self.relay()
        self.assertEqual(self.get(b"/v1/ready")[0].code, 200)  # TrustBased
        self.h.clock.advance(TRUST)
        self.assertEqual(self.get(b"/v1/ready")[0].code, 503)  # Failed
        self.assertEqual(self.get(b"/v1/health")[0].code, 200)
        self.assertEqual(self.get(b"/v1/status")[0].code, 200)


def m_version(scrape: dict) -> str:
    (version,) = [dict(labels)["version"] for name, labels in scrape if name == "license_proxy_build_info"]
    return version

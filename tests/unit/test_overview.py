"""
The page for people at ``/`` and the day's ring behind it, on an injected clock: the state
in words through an outage, its headers, its cost (one render a second, a bounded size) and
that it shows nothing a stranger could use.
"""

from __future__ import annotations

import base64
import hashlib
import re

from treq.testing import RequestTraversalAgent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import readBody

from license_proxy.health import Server
from license_proxy.metrics import OUTCOMES, MetricsPage
from license_proxy.overview import CSP, FRESH, Overview
from license_proxy.statuspages import status_resource
from license_proxy.timeline import EVERY, SAMPLES, Timeline
from tests.support.relayharness import T0, TRUST, RelayHarness

SECRETS = {
    "Authorization": "Bearer overview-secret-token",
    "X-Api-Key": "overview-api-key-123",
}
SECRET_PATH = "/v1/licensee-9f3a/check?key=query-secret"


class OverviewTests(SynchronousTestCase):
    def setUp(self):
        self.h = RelayHarness(self)
        self.timeline = Timeline(self.h.clock, self.h.status, self.h.metrics.outcomes)
        self.peers: list[Server] = []
        self.overview = Overview(
            self.h.clock, self.h.clock, self.h.status, self.h.cache,
            self.h.upstream.health.servers, self.timeline, "9.9.9", TRUST, lambda: self.peers,
        )
        root = status_resource(self.h.status, MetricsPage(self.h.registry), self.overview)
        self.client = RequestTraversalAgent(root)

    def get(self, method=b"GET", path=b"/"):
        d = self.client.request(method, b"http://status.local:8080" + path)
        self.client.flush()
        response = self.successResultOf(d)
        body = readBody(response)
        self.client.flush()
        return response, self.successResultOf(body).decode()

    def page(self) -> str:
        self.h.clock.advance(FRESH)  # past the rendered page's life
        response, body = self.get()
        self.assertEqual(response.code, 200)
        return body

    def relay(self, path="/v1/check", headers=None):
        return self.h.answer(self, self.h.request(path=path, headers=headers))

    def test_the_state_in_words_through_an_outage(self):
        self.assertIn("<strong>Ready</strong> since", self.page())
        self.assertIn("No successful check-in yet", self.page())
        self.relay()
        body = self.page()
        self.assertIn("<strong>Connected</strong>: the license server answers.", body)
        self.assertIn("<td>https://license.example</td><td>up</td>", body)
        self.assertIn('<dd id="entries">1</dd>', body)

        self.h.clock.advance(600)
        self.h.server.code = 503
        self.relay()  # served from trust
        body = self.page()
        # T0 is 2027-01-15 08:00 UTC; the check-in just after, the failure at 08:10.
        self.assertRegex(
            body,
            '<strong>TrustBased</strong> since <time datetime="2027-01-15T08:10:0[0-9.]+Z">'
            "08:10 UTC</time> — the fleet stays licensed until <time datetime="
            '"2027-01-15T09:00:0[0-9.]+Z">09:00 UTC</time> without the license server'
            r" \(49m5[0-9]s left\)\.",
        )
        self.assertRegex(body, "49m5[0-9]s left of 1h, until 09:00 UTC")
        self.assertIn('<span class="down">DOWN</span> since', body)
        self.assertIn("answered 503", body)

        self.h.clock.advance(TRUST)
        body = self.page()
        self.assertIn("<strong>Failed</strong> since <time", body)
        self.assertIn("containers are not being licensed", body)
        self.assertIn("expired at", body)
        self.assertIn("<title>license-proxy: Failed</title>", body)

    def test_headers_head_and_other_methods(self):
        response, body = self.get()
        headers = response.headers
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders(b"content-security-policy"), [CSP.encode()])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        self.assertIn('<meta http-equiv="refresh" content="10">', body)
        response, body = self.get(b"HEAD")
        self.assertEqual((response.code, body), (200, ""))
        response, body = self.get(b"POST")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])

    def test_the_policy_allows_the_one_style_and_nothing_else(self):
        body = self.page()
        (style,) = re.findall(r"<style>(.*?)</style>", body, re.S)
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        self.assertIn(f"style-src 'sha256-{digest}'", CSP)
        self.assertTrue(CSP.startswith("default-src 'none';"))
        # Nothing the policy would block, nor anything fetched.
        for forbidden in ("<script", " style=", "<link", "<img", "<iframe", "src=", "@import",
                          "url(http", "on" + "load="):
            self.assertNotIn(forbidden, body)

    def test_rendered_at_most_once_per_fresh_seconds(self):
        first = self.get()[1]
        self.relay()
        self.assertEqual(self.get()[1], first)  # the same bytes, not rendered again
        self.h.clock.advance(FRESH)
        self.assertNotEqual(self.get()[1], first)

    def test_nothing_a_stranger_could_use(self):
        self.relay(SECRET_PATH, SECRETS)
        self.h.server.code = 503
        self.relay(SECRET_PATH, SECRETS)
        self.h.clock.advance(EVERY)
        self.timeline.sample()
        body = self.page()
        self.assertIn("answered from trust", body)
        for secret in [*SECRETS.values(), "licensee-9f3a", "query-secret"]:
            self.assertNotIn(secret, body)

    def test_peers_shown_when_there_are_any(self):
        self.assertNotIn("<h2>Peers</h2>", self.page())
        self.peers = [Server("https://peer-b.local:8443/")]
        self.assertIn("<h2>Peers</h2>", self.page())
        self.assertIn(
            "<td>https://peer-b.local:8443/</td><td>up</td><td>none yet</td>", self.page()
        )

    def test_the_day_is_drawn_within_a_few_tens_of_kilobytes(self):
        self.relay()
        # The worst day: every outcome, every minute, in counts that never repeat.
        for minute in range(SAMPLES + 10):
            for n, outcome in enumerate(OUTCOMES):
                self.h.metrics.outcomes.labels(outcome).inc((minute * 7 + n * 13) % 97 + 1)
            self.h.clock.advance(EVERY)
            self.timeline.sample()
        body = self.page()
        self.assertLess(len(body.encode()), 64 * 1024)
        self.assertIn("<title>Connected</title>", body)  # a state band
        self.assertIn("answered by the license server", body)


class TimelineTests(SynchronousTestCase):
    def setUp(self):
        self.h = RelayHarness(self)
        self.timeline = Timeline(self.h.clock, self.h.status, self.h.metrics.outcomes)

    def test_each_sample_holds_the_minute_s_relays_and_the_state(self):
        self.timeline.sample()
        self.h.answer(self, self.h.request())
        self.h.answer(self, self.h.request())
        self.h.clock.advance(EVERY)
        self.timeline.sample()
        first, second = self.timeline.samples
        self.assertEqual((first.at, first.state, sum(first.relays)), (T0, "Ready", 0))
        self.assertEqual(second.at, T0 + EVERY)
        self.assertEqual(second.state, "Connected")
        self.assertEqual(dict(zip(OUTCOMES, second.relays))["upstream_ok"], 2)
        self.assertEqual(sum(second.relays), 2)

    def test_the_ring_keeps_a_day(self):
        for _ in range(SAMPLES + 100):
            self.h.clock.advance(EVERY)
            self.timeline.sample()
        samples = self.timeline.samples
        self.assertEqual(len(samples), SAMPLES)
        self.assertEqual(samples[-1].at - samples[0].at, (SAMPLES - 1) * EVERY)

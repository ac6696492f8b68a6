"""
Unit tests of the relay path: Relay -> Upstream -> TrustCache/Status, with an
in-memory upstream (treq.testing's RequestTraversalAgent), an in-memory client
(StubTreq) and an injected clock.
"""

from __future__ import annotations

import gzip
import json

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from license_proxy.relay import Relay
from license_proxy.trustcache import TrustCache
from tests.support.relayharness import T0, TRUST, RelayHarness


class RelayTests(SynchronousTestCase):
    def setUp(self):
        self.h = RelayHarness(self)

    def test_relays_method_path_query_and_body(self):
        d = self.h.request(
            "POST",
            "/v1/check?instance=a%20b",
            data=b'{"usage":1}',
            headers={"Authorization": "Token k1", "Connection": "close, x-hop", "X-Hop": "1"},
        )
        response, body = self.h.answer(self, d)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b'{"license":"ok"}')
        method, uri, headers, sent = self.h.server.seen[0]
        # Nothing added on the way: no Server, no empty Content-Encoding.
        self.assertEqual(
            sorted(name for name, _ in response.headers.getAllRawHeaders()),
            [b"Content-Type", b"Date", b"Server"],  # the upstream's own Server
        )
        self.assertEqual((method, uri, sent), (b"POST", b"/v1/check?instance=a%20b", b'{"usage":1}'))
        self.assertEqual(headers[b"Authorization"], [b"Token k1"])
        self.assertEqual(headers[b"Host"], [b"license.example"])
        self.assertNotIn(b"X-Hop", headers)
        self.assertEqual(self.h.status.state, "Connected")
        self.assertEqual(self.h.status.trust_expiration, T0 + TRUST)

    def test_outside_base_url_is_404_and_nothing_is_sent(self):
        h = RelayHarness(self, base=b"/v1/")
        response, body = h.answer(self, h.request(path="/admin"))
        self.assertEqual(response.code, 404)
        self.assertEqual(h.server.seen, [])
        self.assertEqual(h.status.state, "Ready")

    def test_base_url_is_stripped(self):
        h = RelayHarness(self, urls=["https://license.example/api/"], base=b"/v1/")
        response, _ = h.answer(self, h.request(path="/v1/license?x=1"))
        self.assertEqual(response.code, 200)
        self.assertEqual(h.server.seen[0][1], b"/api/license?x=1")

    def test_dot_segments_and_odd_bytes_are_refused(self):
        for path in ["/v1/../etc", "/%2e%2E/x", "/a/./b", "/a/%2E"]:
            response, _ = self.h.answer(self, self.h.request(path=path))
            self.assertEqual(response.code, 400, path)
        self.assertEqual(self.h.server.seen, [])

    def test_a_header_name_with_an_underscore_is_refused_and_nothing_is_sent(self):
        # CGI/WSGI/Rack/PHP read X_Api_Key as X-Api-Key, which keys the cache: under the
        # "_" spelling, an anonymous client would get the keyed licensee's cached answer.
        for name in ("X_Api_Key", "x_api_key", "Authorization_"):
            response, body = self.h.answer(self, self.h.request(headers={name: "alice"}))
            self.assertEqual(
                (response.code, json.loads(body)),
                (400, {"error": "_ in a header name (read as - by many servers)"}),
            )
        self.assertEqual((self.h.server.seen, len(self.h.cache)), ([], 0))

    def test_other_methods_get_405_with_allow_and_nothing_is_sent(self):
        for method in ("CONNECT", "TRACE", "PROPFIND", "get"):
            response, body = self.h.answer(self, self.h.request(method))
            self.assertEqual((response.code, json.loads(body)), (405, {"error": "method not relayed"}))
            self.assertEqual(
                response.headers.getRawHeaders("allow"), ["GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"]
            )
        self.assertEqual((self.h.server.seen, len(self.h.cache)), ([], 0))

    def test_encoded_separators_are_refused(self):
        for path in ["/v1/..%2Fadmin", "/v1/%2E%2E%2Fadmin", "/v1/a%2F..%2F..%2Fadmin", "/a%5cb", "/..;/x"]:
            response, _ = self.h.answer(self, self.h.request(path=path))
            self.assertEqual(response.code, 400, path)
        self.assertEqual(self.h.server.seen, [])

    def test_failure_inside_trust_serves_the_cached_answer_with_age(self):
        self.h.answer(self, self.h.request(headers={"Authorization": "Token k1"}))
        self.h.clock.advance(125)
        self.h.server.code = 503
        self.h.server.body = b"down"
        response, body = self.h.answer(self, self.h.request(headers={"Authorization": "Token k1"}))
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b'{"license":"ok"}')
        self.assertEqual(response.headers.getRawHeaders("age"), ["125"])
        self.assertEqual(self.h.status.state, "TrustBased")

    def test_a_cached_answer_keeps_repeated_headers_and_adds_no_content_type(self):
        del self.h.server.headers[b"content-type"]
        self.h.server.headers[b"link"] = [b"<a>", b"<b>"]
        fresh, _ = self.h.answer(self, self.h.request())
        self.h.server.code = 503
        cached, _ = self.h.answer(self, self.h.request())
        for response in (fresh, cached):
            self.assertEqual(response.headers.getRawHeaders("link"), ["<a>", "<b>"])
            self.assertIsNone(response.headers.getRawHeaders("content-type"))
        self.assertEqual(cached.headers.getRawHeaders("age"), ["0"])

    def test_a_stop_waits_for_requests_in_flight_and_takes_no_new_ones(self):
        self.h.server.hang = True
        in_flight = self.h.request()
        stopped = self.h.relay.stop()
        self.assertNoResult(stopped)
        late, body = self.h.answer(self, self.h.request())
        self.assertEqual((late.code, json.loads(body)), (503, {"error": "license-proxy is stopping"}))
        self.assertEqual(self.h.server.count, 1)
        self.h.clock.advance(30)
        self.assertEqual(self.h.answer(self, in_flight)[0].code, 502)
        self.successResultOf(stopped)

    def test_cached_answer_is_never_given_to_another_licensee(self):
        self.h.answer(self, self.h.request(headers={"Authorization": "Token k1"}))
        self.h.server.code = 500
        response, body = self.h.answer(self, self.h.request(headers={"Authorization": "Token k2"}))
        self.assertEqual(response.code, 502)
        self.assertIn("license server unavailable", json.loads(body)["error"])
        self.assertEqual(self.h.status.state, "TrustBased")

    def test_failure_outside_trust_is_502_and_failed(self):
        self.h.answer(self, self.h.request())
        self.h.clock.advance(TRUST + 1)
        self.h.server.code = 502
        response, _ = self.h.answer(self, self.h.request())
        self.assertEqual(response.code, 502)
        self.assertEqual(self.h.status.state, "Failed")

    def test_4xx_is_relayed_as_success_and_not_cached(self):
        self.h.server.code = 404
        response, _ = self.h.answer(self, self.h.request())
        self.assertEqual(response.code, 404)
        self.assertEqual(self.h.status.state, "Connected")
        self.assertEqual(len(self.h.cache), 0)

    def test_5xx_answer_never_replaces_a_good_entry(self):
        self.h.answer(self, self.h.request())
        self.h.server.code = 500
        self.h.answer(self, self.h.request())
        self.h.server.code = 200
        self.h.server.hang = True
        d = self.h.request()
        self.h.clock.advance(30)
        self.h.pump()
        response, body = self.h.answer(self, d)
        self.assertEqual((response.code, body), (200, b'{"license":"ok"}'))

    def test_one_deadline_covers_a_hanging_upstream(self):
        self.h.server.hang = True
        d = self.h.request()
        self.assertNoResult(d)
        self.h.clock.advance(29.9)
        self.h.pump()
        self.assertNoResult(d)
        self.h.clock.advance(0.2)
        response, body = self.h.answer(self, d)
        self.assertEqual(response.code, 502)
        self.assertIn("no complete answer within 30 s", json.loads(body)["error"])

    def test_next_upstream_is_tried_after_a_failure(self):
        class Two(Resource):
            isLeaf = True

            def render(inner, request):
                if request.getHeader(b"host") == b"first.example":
                    request.setResponseCode(503)
                    return b""
                return b"second"

        h = RelayHarness(self, urls=["https://first.example", "https://second.example"])
        h.use(Two(), h.cache)
        response, body = h.answer(self, h.request())
        self.assertEqual((response.code, body), (200, b"second"))

    def test_a_bug_answers_500_instead_of_hanging(self):
        class BrokenCache(TrustCache):
            def store(self, key, entry):
                raise ZeroDivisionError("a bug")

        h = self.h
        h.use(h.server, BrokenCache(h.clock, "/nonexistent"))
        response, body = h.answer(self, h.request())
        self.assertEqual((response.code, json.loads(body)), (500, {"error": "internal error"}))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_redirects_are_relayed_not_followed(self):
        self.h.server.code = 302
        self.h.server.headers[b"location"] = b"https://elsewhere.example/x"
        response, _ = self.h.answer(self, self.h.request())
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders("location"), ["https://elsewhere.example/x"])
        self.assertEqual(self.h.server.count, 1)

    def test_gzip_answers_and_cookies_pass_unaltered_and_unshared(self):
        packed = gzip.compress(b'{"license":"ok"}')
        self.h.server.body = packed
        self.h.server.headers[b"content-encoding"] = b"gzip"
        self.h.server.headers[b"set-cookie"] = b"session=one; Path=/"
        response, body = self.h.answer(self, self.h.request(headers={"Accept-Encoding": "gzip"}))
        self.assertEqual(body, packed)
        self.assertEqual(response.headers.getRawHeaders("content-encoding"), ["gzip"])
        self.assertEqual(response.headers.getRawHeaders("set-cookie"), ["session=one; Path=/"])
        self.h.answer(self, self.h.request())
        first, second = self.h.server.seen
        self.assertEqual(first[2][b"Accept-Encoding"], [b"gzip"])
        self.assertNotIn(b"Accept-Encoding", second[2])
        self.assertNotIn(b"Cookie", second[2])


class _JumpingDates(Clock):
    """Dates that jump an hour forward each time they are read (an NTP step, a VM resumed)."""

    def seconds(self) -> float:
        self.advance(3600)
        return super().seconds()


class TwoClocksTests(SynchronousTestCase):
    def test_latency_is_measured_on_the_timers_and_ages_on_the_dates(self):
        """A date that jumps is no latency: the histogram measures elapsed time (the
        reactor's monotonic clock), while the stored answer's time is a date."""
        h = RelayHarness(self)
        dates = _JumpingDates()
        dates.advance(T0)
        h.relay = Relay(dates, h.clock, h.upstream, h.cache, h.status, h.base, h.metrics)
        h.client = RequestTraversalAgent(h.relay)
        response, _ = h.answer(self, h.request(headers={"Authorization": "Token k1"}))
        self.assertEqual(response.code, 200)
        samples = {
            s.name: s.value
            for family in h.registry.collect()
            if family.name == "license_proxy_upstream_latency_seconds"
            for s in family.samples
        }
        self.assertEqual(samples["license_proxy_upstream_latency_seconds_count"], 1)
        self.assertEqual(samples["license_proxy_upstream_latency_seconds_sum"], 0)
        h.server.code = 503  # the answer from trust: its Age is counted in dates
        response, _ = h.answer(self, h.request(headers={"Authorization": "Token k1"}))
        self.assertEqual(response.code, 200)
        self.assertGreaterEqual(int(response.headers.getRawHeaders("age")[0]), 3600)

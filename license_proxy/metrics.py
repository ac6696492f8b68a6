"""
Prometheus metrics, served as ``/metrics`` on the status listener.

Counters and the latency histogram are updated as relays happen; everything
that depends on the time (the state, seconds since the last check-in, seconds
of trust left) is computed when scraped, from the injected dates, so a scrape
between two events is as true as the status endpoint.  Each process has its
own ``CollectorRegistry``: nothing is global, so tests do not share values.
"""

from __future__ import annotations

from importlib import metadata

from attrs import define
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource

from .guards import LIMIT_KEYS, REJECTIONS
from .peers import Peers
from .status import CONNECTED, FAILED, READY, TRUST_BASED, Status
from .trustcache import TrustCache
from .upstream import Upstream

#: ``outcome`` label values of ``license_proxy_relays_total``.
UPSTREAM_OK = "upstream_ok"  # the license server answered below 400
UPSTREAM_4XX = "upstream_4xx"  # it answered 4xx (relayed as is; counts as reachable)
SERVED_FROM_TRUST = "served_from_trust"  # it failed; the cached answer was served
SERVED_BY_PEER = "served_by_peer"  # it failed, no cached answer; a peer's was served
UNAVAILABLE = "unavailable"  # it failed, nothing to serve: 502
REJECTED = "rejected"  # a bad request target, never sent upstream
OUTCOMES = (UPSTREAM_OK, UPSTREAM_4XX, SERVED_FROM_TRUST, SERVED_BY_PEER, UNAVAILABLE, REJECTED)

#: Seconds; licensing exchanges take tens of milliseconds, a timeout 30 s.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@define
class RelayMetrics:
    """What the relay counts as requests happen."""

    outcomes: Counter
    latency: Histogram

    @classmethod
    def on(cls, registry: CollectorRegistry) -> RelayMetrics:
        outcomes = _counter(
            "license_proxy_relays", "Licensing requests, by outcome.", "outcome", OUTCOMES, registry
        )
        latency = Histogram(
            "license_proxy_upstream_latency_seconds",
            "Time to a complete answer (or failure) from the license server, per relay.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        return cls(outcomes, latency)


@define
class ListenerMetrics:
    """What the listeners refuse: connections over a limit, requests they answer themselves."""

    refused: Counter
    rejected: Counter

    @classmethod
    def on(cls, registry: CollectorRegistry) -> ListenerMetrics:
        refused = _counter(
            "license_proxy_connections_refused",
            "Connections closed at once, over the total or the per-peer limit of a listener.",
            "reason",
            LIMIT_KEYS,
            registry,
        )
        rejected = _counter(
            "license_proxy_requests_rejected",
            "Requests a listener answered itself and closed (400, 408, 413, 414, 431).",
            "code",
            [str(code) for code in REJECTIONS],
            registry,
        )
        return cls(refused, rejected)


def _counter(
    name: str, documentation: str, label: str, values, registry: CollectorRegistry
) -> Counter:
    """A counter by ``label`` whose every series exists from the start, at 0."""
    counter = Counter(name, documentation, [label], registry=registry)
    for value in values:
        counter.labels(value)
    return counter


@define(eq=False)  # a registry keeps collectors in a dict
class StateCollector:
    """The state and its times, read from ``Status`` and the cache at scrape time."""

    _dates: IReactorTime
    _status: Status
    _cache: TrustCache

    def collect(self):
        now = self._dates.seconds()
        current = self._status.state
        state = GaugeMetricFamily(
            "license_proxy_state", "1 for the current state, 0 for the others.", labels=["state"]
        )
        for name in (READY, CONNECTED, TRUST_BASED, FAILED):
            state.add_metric([name], 1 if name == current else 0)
        yield state
        yield GaugeMetricFamily(
            "license_proxy_state_seconds",
            "Seconds since the current state began.",
            value=now - self._status.state_since,
        )
        last = self._cache.last_checkin
        if last is not None:
            yield GaugeMetricFamily(
                "license_proxy_seconds_since_last_checkin",
                "Seconds since the last successful relay or check-in.",
                value=now - last,
            )
            yield GaugeMetricFamily(
                "license_proxy_trust_remaining_seconds",
                "Seconds until failing requests stop being answered from the cache"
                " (negative: expired).",
                value=self._status.trust_expiration - now,
            )
        yield GaugeMetricFamily(
            "license_proxy_cache_entries", "Answers in the trust cache.", value=len(self._cache)
        )
        yield CounterMetricFamily(
            "license_proxy_cache_write_failures",
            "Failed writes of the trust cache file.",
            value=self._cache.write_failures,
        )
        yield GaugeMetricFamily(
            "license_proxy_cache_persisted",
            "1 while the trust cache file can be written, 0 while it cannot"
            " (answers are then kept in memory only).",
            value=1 if self._cache.persisted else 0,
        )
        yield CounterMetricFamily(
            "license_proxy_cache_evictions",
            "Answers dropped from the full trust cache ([cache] max_entries) to make room.",
            value=self._cache.evictions,
        )


@define(eq=False)
class UpstreamCollector:
    """What the client to the license server counts, read at scrape time."""

    _upstream: Upstream

    def collect(self):
        yield CounterMetricFamily(
            "license_proxy_upstream_retries",
            "Requests sent again on a new connection after a pooled one failed"
            " before any answer.",
            value=self._upstream.retries,
        )
        up = GaugeMetricFamily(
            "license_proxy_license_server_up",
            "1 while a server_url is used, 0 while it is down (skipped until it answers again).",
            labels=["server_url"],
        )
        for server in self._upstream.health.servers:
            up.add_metric([server.url], 1 if server.up else 0)
        yield up


@define(eq=False)  # a registry keeps collectors in a dict
class PeersCollector:
    """Each peer, read at scrape time (they come and go with ``[peers] name``)."""

    _peers: Peers

    def collect(self):
        labels = ["peer"]
        up = GaugeMetricFamily(
            "license_proxy_peer_up", "1 while a peer is asked, 0 while it is down.", labels=labels
        )
        received = CounterMetricFamily(
            "license_proxy_peer_answers_received",
            "A peer's answers relayed to this instance's clients or taken from its pushes.",
            labels=labels,
        )
        sent = CounterMetricFamily(
            "license_proxy_peer_answers_sent",
            "Answers from this instance's trust given to a peer's requests, or pushed to it.",
            labels=labels,
        )
        for peer in self._peers.records():
            up.add_metric([peer.url], 1 if peer.up else 0)
            received.add_metric([peer.url], peer.received)
            sent.add_metric([peer.url], peer.sent)
        yield from (up, received, sent)


def registry_for(dates: IReactorTime, status: Status, cache: TrustCache) -> CollectorRegistry:
    """A process's registry: build info and the state; ``RelayMetrics.on``,
    ``ListenerMetrics.on`` and ``UpstreamCollector`` add the rest."""
    registry = CollectorRegistry()
    Info("license_proxy_build", "The running version.", registry=registry).info(
        {"version": _version()}
    )
    registry.register(StateCollector(dates, status, cache))
    return registry


def _version() -> str:
    try:
        return metadata.version("license-proxy")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


# The classic text format, which every Prometheus server since 2.0 reads.
_TEXT_FORMAT = b"text/plain; version=0.0.4; charset=utf-8"


class MetricsPage(Resource):
    """``GET /metrics``: the registry in Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", _TEXT_FORMAT)
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self._registry)

"""
The relay path in memory: a ``Relay`` over an ``Upstream`` whose agent reaches an in-memory
license server (treq.testing's RequestTraversalAgent), a client agent to the relay, a trust
cache in a temporary directory, and one injected clock.
"""

from __future__ import annotations

import io
import shutil
import tempfile

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Cooperator
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from license_proxy.metrics import RelayMetrics, registry_for
from license_proxy.peers import Peers
from license_proxy.relay import Relay
from license_proxy.status import Status
from license_proxy.trustcache import TrustCache
from license_proxy.upstream import Upstream
from tests.support.clocks import BoundedClock

#: In these tests, what a connection with a peer certificate is (``peers.certified_peer``):
#: a request carrying this header.
CERTIFIED = b"x-test-peer-certificate"

T0 = 1_800_000_000.0
TRUST = 3600.0


class FakeLicenseServer(Resource):
    """Records what it is sent; answers as told, or not at all (hang)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []
        self.code = 200
        self.body = b'{"license":"ok"}'
        self.headers: dict[bytes, bytes] = {b"content-type": b"application/json"}
        self.hang = False
        self.count = 0

    def render(self, request):
        self.count += 1
        self.seen.append(
            (
                request.method,
                request.uri,
                dict(request.requestHeaders.getAllRawHeaders()),
                request.content.read(),
            )
        )
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        for name, value in self.headers.items():
            request.responseHeaders.setRawHeaders(name, value if isinstance(value, list) else [value])
        request.defaultContentType = None
        return self.body


class RelayHarness:
    def __init__(self, testcase, urls=("https://license.example",), base=b"/", peer=None):
        """``peer``: an agent to another instance, this one's only peer."""
        tmpdir = tempfile.mkdtemp()
        testcase.addCleanup(shutil.rmtree, tmpdir)
        self.clock = BoundedClock()
        self.clock.advance(T0)
        self.server = FakeLicenseServer()
        self.cache_path = f"{tmpdir}/cache.json"
        self.cache = TrustCache(self.clock, self.cache_path)
        self.status = Status(self.clock, self.cache, TRUST)
        self.registry = registry_for(self.clock, self.status, self.cache)
        self.metrics = RelayMetrics.on(self.registry)
        self.urls, self.base = list(urls), base
        self.peers = Peers()
        if peer is not None:
            self.peers = Peers.using(peer, self.clock, ["https://peer.local/"], 2.0, 5.0)
        self.use(self.server, self.cache)

    def use(self, server, cache):
        """(Re)build the relay over ``server`` (the upstream's resource) and ``cache``."""
        self.agent = RequestTraversalAgent(server)
        self.upstream = Upstream.using(self.agent, self.clock, self.urls, 30.0)
        self.relay = Relay(
            self.clock, self.clock, self.upstream, cache, self.status, self.base, self.metrics,
            peers=self.peers, from_peer=lambda request: request.requestHeaders.hasHeader(CERTIFIED),
        )
        self.client = RequestTraversalAgent(self.relay)

    def request(self, method="GET", path="/v1/check", data=None, headers=None):
        """A client request as sent, without treq's own rewriting."""
        d = self.client.request(
            method.encode(),
            b"https://proxy.local:8443" + path.encode(),
            Headers({k: [v] for k, v in (headers or {}).items()}),
            None if data is None else FileBodyProducer(io.BytesIO(data), _now),
        )
        self.pump()
        return d

    def pump(self):
        for _ in range(4):
            self.client.flush()
            self.agent.flush()

    def answer(self, testcase, d):
        self.pump()
        response = testcase.successResultOf(d)
        body = readBody(response)
        self.pump()
        return response, testcase.successResultOf(body)


_now = Cooperator(scheduler=lambda f: f(), started=True)

"""
Canaries for license_proxy.twistedseams: each test fails, naming the seam, when the private
Twisted code it relies on stops behaving as that module's docstring says.  In memory and fast;
CI runs them on the newest and the oldest Twisted that setup.cfg allows.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from contextlib import contextmanager

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, globalLogPublisher
from twisted.web import http
from twisted.web.client import Agent, HTTPConnectionPool, Request, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from license_proxy.guards import _GuardedChannel
from license_proxy.pool import RetryingPool
from license_proxy.twistedseams import (
    HTTP11ClientProtocol,
    HookedHTTPChannel,
    ClientRequest as SeamRequest,
    RequestNotSent,
    ReuseAwarePool,
    fips_enabled,
    pool_key_host,
    reactor_handles,
    replace_clock,
)


@contextmanager
def seam(name: str):
    """Any failure inside, an assertion's or an error's, is reported as ``name`` changed."""
    try:
        yield
    except Exception as e:
        pytest.fail(
            f"TWISTED SEAM CHANGED: {name}: {e}\nlicense_proxy/twistedseams.py relies on it;"
            " adapt that module (and its docstring) to this Twisted before using it."
        )


BAD_REQUEST = "HTTPChannel._respondToBadRequestAndDisconnect"
BARE_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"  # what it writes


class _Answer(Resource):
    isLeaf = True

    def render(self, request) -> bytes:
        return b"ok"


class _Recording(HookedHTTPChannel):
    """Counts the 400s that reach the hook."""

    badRequests = 0

    def badRequest(self) -> None:
        self.badRequests += 1
        super().badRequest()


class _Unread(HookedHTTPChannel):
    """Notes what ``unreadInput`` said after each line and request."""

    def __init__(self) -> None:
        super().__init__()
        self.unread: list[tuple[bytes, bool]] = []

    def lineReceived(self, line: bytes) -> None:
        self.unread.append((line, self.unreadInput()))
        super().lineReceived(line)

    def requestDone(self, request) -> None:
        super().requestDone(request)
        self.unread.append((b"<requestDone>", self.unreadInput()))


def _channel(protocol=_Recording, clock=None, **site):
    site = Site(_Answer(), reactor=clock or Clock(), **site)
    site.protocol = protocol
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    return channel


def test_a_malformed_request_line_is_answered_through_the_hook():
    with seam(BAD_REQUEST):
        channel = _channel()
        channel.dataReceived(b"GARBAGE\r\n")
        assert channel.badRequests == 1, "not called for a malformed request line"
        assert channel.transport.value() == BARE_400, "not the answer"
        assert channel.transport.disconnecting, "not closing"


HEAD = b"POST / HTTP/1.1\r\nHost: a\r\n"
MALFORMED = {
    "header line without a colon": HEAD + b"no colon\r\n\r\n",
    "header name not a token": HEAD + b"Bad Name: x\r\n\r\n",
    "Content-Length not a number": HEAD + b"Content-Length: x\r\n\r\n",
    "two Content-Length": HEAD + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\n",
    "unknown Transfer-Encoding": HEAD + b"Transfer-Encoding: gzip\r\n\r\n",
    "malformed chunk": HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    "over maxHeaders headers": HEAD + b"X: y\r\n" * 501 + b"\r\n",
    "over totalHeadersSize bytes": HEAD + (b"X: " + b"y" * 1000 + b"\r\n") * 17 + b"\r\n",
    "multipart body Twisted can't parse": HEAD
    + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5\r\n\r\nxxxxx",
}
MAYBE_MALFORMED = {  # refused by some supported versions only (26.x, not 24.7)
    "NUL in a header value": HEAD + b"X: a\x00b\r\n\r\n",
}


@pytest.mark.parametrize("name", [*MALFORMED, *MAYBE_MALFORMED])
def test_every_400_twisted_answers_goes_through_the_hook(name):
    with seam(BAD_REQUEST):
        channel = _channel()
        channel.dataReceived({**MALFORMED, **MAYBE_MALFORMED}[name])
        answer = channel.transport.value()
        if name in MALFORMED:
            assert channel.badRequests, f"not called for {name}"
        if channel.badRequests or b" 400 " in answer:
            assert (channel.badRequests, answer) == (1, BARE_400), (
                f"a 400 for {name} did not go through it once"
            )


def _says_400(node) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "BAD_REQUEST"
    value = getattr(node, "value", None) if isinstance(node, ast.Constant) else None
    return value == 400 or isinstance(value, bytes) and b"400" in value


def test_no_other_code_in_twisted_web_http_writes_a_400():
    """A new 400 path that bypasses the hook would escape the guard's counting and closing."""
    with seam(BAD_REQUEST):
        writers = {
            function.name
            for function in ast.walk(ast.parse(inspect.getsource(http)))
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(_says_400(node) for node in ast.walk(function))
        }
        assert writers == {"_respondToBadRequestAndDisconnect"}, (
            f"twisted.web.http has 400s outside it, in {sorted(writers)}"
        )


def test_unread_input_is_the_line_buffer():
    with seam("LineReceiver._buffer"):
        channel = _channel(_Unread)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHo")
        channel.dataReceived(b"st: a\r\n\r\n")
        assert channel.unread == [
            (b"GET / HTTP/1.1", True),
            (b"Host: a", True),
            (b"", True),
            (b"<requestDone>", True),  # the next request's start, read with this one's end
            (b"GET /next HTTP/1.1", True),
            (b"Host: a", True),
            (b"", False),
            (b"<requestDone>", False),
        ], f"not the bytes still unread: {channel.unread}"


class _Seen(HookedHTTPChannel):
    """Notes what the channel's accessors said at the points the guard asks them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        request = self.arrivingRequest()
        self.seen.append(
            (self.announcedLength(), request.requestHeaders.getRawHeaders(b"x-n"), request)
        )
        super().allHeadersReceived()

    def requestDone(self, request) -> None:
        super().requestDone(request)
        self.seen.append(("kept alive", self.keepsAlive()))


def test_the_announced_length_is_length_when_the_head_is_read():
    with seam("HTTPChannel.length"):
        channel = _channel(_Seen)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\n")
        channel.dataReceived(b"1234567")
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        channel.dataReceived(b"0\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        lengths = [seen[0] for seen in channel.seen if seen[0] != "kept alive"]
        assert lengths == [7, None, 0], f"not the announced lengths: {lengths}"


def test_the_arriving_request_is_the_last_of_requests():
    with seam("HTTPChannel.requests[-1]"):
        channel = _channel(_Seen)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX-N: 1\r\n\r\n")
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX-N: 2\r\n\r\n")
        heads = [seen for seen in channel.seen if seen[0] != "kept alive"]
        assert [headers for _, headers, _ in heads] == [[b"1"], [b"2"]], (
            f"not the head being read: {heads}"
        )
        assert all(isinstance(request, http.Request) for _, _, request in heads), heads


def test_keeps_alive_is_persistent_after_the_answer():
    with seam("HTTPChannel.persistent"):
        channel = _channel(_Seen)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        kept = [seen[1] for seen in channel.seen if seen[0] == "kept alive"]
        assert kept == [True, False], f"not whether the connection stays open: {kept}"
        assert channel.transport.disconnecting, "not closed after Connection: close"


def test_close_after_answer_in_the_resource_closes_once_answered():
    with seam("HTTPChannel.persistent (set during render)"):
        channel, held = _holding()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        channel.closeAfterAnswer()  # while the resource holds the request
        assert not channel.transport.disconnecting, "closed before the answer"
        (request,) = held.requests
        request.write(b"ok")
        request.finish()
        assert channel.transport.value().endswith(b"ok\r\n0\r\n\r\n"), channel.transport.value()
        assert channel.transport.disconnecting, "not closed once answered"


def test_idle_is_no_request_under_way_and_none_begun():
    with seam("HTTPChannel.requests, LineReceiver._buffer"):
        channel, held = _holding()
        seen = [channel.idle()]
        channel.dataReceived(b"GET / HTTP/1.1\r\nHo")
        seen.append(channel.idle())  # part of a head
        channel.dataReceived(b"st: a\r\n\r\n")
        seen.append(channel.idle())  # with the resource
        held.requests[0].finish()
        seen.append(channel.idle())  # answered
        channel.dataReceived(b"GE")
        seen.append(channel.idle())  # a next request begun
        assert seen == [True, False, False, True, False], f"not whether idle: {seen}"


class _Held(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []
        self.hold = True

    def render(self, request):
        self.requests.append(request)
        return NOT_DONE_YET if self.hold else b"ok"


def _holding() -> tuple[HookedHTTPChannel, _Held]:
    """A channel whose resource holds each request until the test answers it."""
    held = _Held()
    channel = _channel(HookedHTTPChannel)
    channel.site.resource = held
    return channel, held


class _HoldsAfterEach(HookedHTTPChannel):
    """Holds its input after each answer, as the guard does when the client reads none."""

    def requestDone(self, request) -> None:
        self.holdInput()
        super().requestDone(request)


PIPELINED = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % n for n in range(3))


def test_held_input_is_parsed_only_once_released():
    with seam("LineReceiver.paused"):
        resource = _Held()
        site = Site(resource, reactor=Clock())
        site.protocol = _HoldsAfterEach
        channel = site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        channel.dataReceived(PIPELINED[:40])
        channel.dataReceived(PIPELINED[40:])  # kept by HTTPChannel while /0 is answered
        resource.requests[0].finish()  # and handed back, held
        assert [r.path for r in resource.requests] == [b"/0"], "the replayed input was parsed"
        assert channel.holdingInput() and channel.unreadInput(), "not held as unread input"
        resource.hold = False  # answered at once: the next is held inside lineReceived
        channel.releaseInput()
        assert [r.path for r in resource.requests] == [b"/0", b"/1"], (
            f"released, it parsed {[r.path for r in resource.requests]}, not the next request"
        )
        assert channel.holdingInput() and channel.unreadInput(), "the lines after it were parsed"
        channel.releaseInput()
        assert [r.path for r in resource.requests] == [b"/0", b"/1", b"/2"], "not in order"
        assert channel.transport.value().count(b" 200 ") == 3


class _Logged(HookedHTTPChannel):
    events: list = []
    _log = Logger(observer=events.append)


def test_the_idle_close_is_logged_through_log_and_silenced():
    with seam("HTTPChannel._log"):
        _Logged.events.clear()
        clock = Clock()
        logged = _channel(_Logged, clock, timeout=60)
        clock.advance(60)
        assert logged.transport.disconnecting, "no idle close"
        formats = [e["log_format"] for e in _Logged.events]
        assert formats == ["Timing out client: {peer}"], f"the idle close logs {formats} to it"
        heard = []
        globalLogPublisher.addObserver(heard.append)
        try:
            silenced = _channel(HookedHTTPChannel, clock, timeout=60)
            clock.advance(60)
        finally:
            globalLogPublisher.removeObserver(heard.append)
        assert silenced.transport.disconnecting, "no idle close"
        assert heard == [], f"the idle close logged {heard} elsewhere"


def test_the_guard_adds_no_name_httpchannel_uses():
    """The guard's state shares HTTPChannel's namespace: a name Twisted starts using
    would be overwritten by the other's."""
    overrides = {
        "MAX_LENGTH",
        "dataReceived",
        "lineReceived",
        "lineLengthExceeded",
        "allHeadersReceived",
        "rawDataReceived",
        "allContentReceived",
        "requestDone",
        "connectionLost",
        "badRequest",
        "pauseProducing",
        "resumeProducing",
    }
    with seam("HTTPChannel's namespace"):
        seams = {"_log", "_respondToBadRequestAndDisconnect"}  # replaced on purpose
        own = {n for c in (_GuardedChannel, HookedHTTPChannel) for n in vars(c)
               if not n.startswith("__")} - overrides - seams
        channel = _channel(HookedHTTPChannel, timeout=60)
        channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok")
        channel.dataReceived(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        channel.connectionLost(None)
        used = set(dir(http.HTTPChannel)) | set(vars(channel))
        assert not own & used, f"it now uses {sorted(own & used)}, as listener's guard does"
        assert overrides <= set(dir(HookedHTTPChannel)), (
            f"the guard overrides what is gone: {sorted(overrides - set(dir(HookedHTTPChannel)))}"
        )


class _Endpoint:
    """Connects in memory at once; keeps the connections made."""

    def __init__(self) -> None:
        self.made = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.made.append(protocol)
        return succeed(protocol)


class _CountingPool(ReuseAwarePool):
    retryAutomatically = False  # as RetryingPool: Twisted's retry would wrap the connection

    def __init__(self, reactor) -> None:
        super().__init__(reactor, persistent=True)
        self.calls = []

    def _newConnection(self, key, endpoint):
        self.calls.append((key, endpoint))
        return super()._newConnection(key, endpoint)


def _answered(connection) -> None:
    """One request and its answer, after which a connection goes back to the pool."""
    connection.request(Request(b"GET", b"/", Headers({b"host": [b"a"]}), None, persistent=True))
    connection.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")


def test_the_pool_calls_new_connection_exactly_when_it_connects():
    with seam("HTTPConnectionPool._newConnection"):
        pool, endpoint, key = _CountingPool(Clock()), _Endpoint(), ("https", b"a", 443)
        got, new = pool.newOrPooled(key, endpoint)
        assert (new, pool.calls, len(endpoint.made)) == (True, [(key, endpoint)], 1), (
            "not called, or not with (key, endpoint), for a new connection"
        )
        first = endpoint.made[0]
        _answered(first)
        got, new = pool.newOrPooled(key, endpoint)
        assert (new, len(pool.calls), len(endpoint.made)) == (False, 1, 1), (
            "called although a pooled connection was usable"
        )
        assert got.result is first, "the pooled connection was not the one given"
        dialled = pool.dial(key, endpoint).result
        assert endpoint.made == [first, dialled], "calling it does not connect the endpoint"
        _answered(first)
        _answered(dialled)
        reused = {pool.newOrPooled(key, endpoint)[0].result for _ in range(2)}
        assert reused == {first, dialled} and len(endpoint.made) == 2, (
            "its connection does not go back to the pool once idle"
        )
        overrides = {"getConnection", "_newConnection", "retryAutomatically"}
        overrides |= {"cachedConnectionTimeout", "log"}
        own = {n for c in (ReuseAwarePool, RetryingPool) for n in vars(c) if n[:2] != "__"}
        used = set(dir(HTTPConnectionPool)) | set(vars(HTTPConnectionPool(Clock())))
        assert not (own - overrides) & used, (
            f"HTTPConnectionPool now uses {sorted((own - overrides) & used)}, as we do"
        )


def test_a_running_reactor_handles_sigterm_and_sigint_itself():
    script = """
import signal
from twisted.internet.selectreactor import SelectReactor
from license_proxy.twistedseams import reactor_handles
reactor = SelectReactor()
def check():
    print(reactor_handles(reactor, signal.SIGTERM), reactor_handles(reactor, signal.SIGINT))
    reactor.stop()
print(reactor_handles(reactor, signal.SIGTERM), end=" ")
reactor.callWhenRunning(check)
reactor.run()
"""
    with seam("the reactor's sigTerm and sigInt as the signal handlers once running"):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60)
        assert done.stdout.split() == ["False", "True", "True"], done.stdout + done.stderr


def test_an_attribute_on_the_reactor_is_its_clock():
    reactor = SelectReactor()
    try:
        with seam("ReactorBase.seconds"):
            now = [1000.0]
            replace_clock(reactor, lambda: now[0])
            fired = []
            call = reactor.callLater(10, fired.append, "fired")
            assert call.getTime() == 1010.0, "callLater does not schedule on it"
            assert reactor.timeout() == 10.0, "the reactor does not sleep on it"
            call.reset(5)
            assert call.getTime() == 1005.0, "a DelayedCall does not keep it"
            now[0] = 1004.9
            reactor.runUntilCurrent()
            assert fired == [], "runUntilCurrent runs a call early by it"
            now[0] = 1005.0
            reactor.runUntilCurrent()
            assert fired == ["fired"], "runUntilCurrent does not run by it"
    finally:
        reactor.removeReader(reactor.waker)
        reactor.waker.connectionLost(None)


class _KeyRecorder(HTTPConnectionPool):
    """Notes the keys ``Agent`` asks for connections with; connects nothing."""

    def __init__(self) -> None:
        super().__init__(Clock())
        self.keys = []

    def getConnection(self, key, endpoint):
        self.keys.append(key)
        return Deferred()

    def endpointForURI(self, uri):  # as the Agent's endpoint factory too
        return None


def test_the_agent_keys_its_pool_by_scheme_host_and_port():
    with seam("Agent's pool key"):
        pool = _KeyRecorder()
        agent = Agent.usingEndpointFactory(Clock(), pool, pool=pool)
        agent.request(b"GET", b"https://license.example:8443/v1/lic")
        assert pool.keys == [(b"https", b"license.example", 8443)], f"the key is {pool.keys}"
        assert pool_key_host(pool.keys[0]) == b"license.example"


def _get() -> SeamRequest:
    return SeamRequest(b"GET", b"/v1/lic", Headers({b"host": [b"a"]}), None, persistent=True)


def test_the_client_protocol_tells_a_request_not_sent_from_one_never_answered():
    with seam("twisted.web._newclient HTTP11ClientProtocol, Request, RequestNotSent"):
        request = _get()
        assert (request.method, request.bodyProducer) == (b"GET", None), "Request's fields"
        assert request.headers.getRawHeaders(b"host") == [b"a"], "Request's headers"
        closed = HTTP11ClientProtocol()
        closed.makeConnection(StringTransport())
        closed.connectionLost(Failure(ConnectionDone()))
        failure = []
        closed.request(_get()).addErrback(failure.append)
        assert failure and failure[0].check(RequestNotSent), f"on a closed one: {failure}"
        written = HTTP11ClientProtocol()
        transport = StringTransport()
        written.makeConnection(transport)
        failure = []
        written.request(_get()).addErrback(failure.append)
        assert b"GET /v1/lic" in transport.value(), "the request was not written"
        written.connectionLost(Failure(ConnectionDone()))
        assert failure and failure[0].check(ResponseNeverReceived), f"closed unanswered: {failure}"
        written.abort()  # what the pool calls on a connection it drops


def _md5_available() -> bool:
    try:
        hashes.Hash(hashes.MD5())
    except UnsupportedAlgorithm:
        return False
    return True


def test_cryptography_says_whether_its_openssl_is_in_fips_mode():
    """In FIPS mode nothing outside the FIPS provider (MD5) can be fetched: the public
    sign of the mode, against which the private flag is checked."""
    with seam("cryptography's backend._fips_enabled"):
        enabled = fips_enabled()
        assert isinstance(enabled, bool), f"not a flag: {enabled!r}"
        assert enabled is not _md5_available(), f"says {enabled} with MD5 {_md5_available()}"

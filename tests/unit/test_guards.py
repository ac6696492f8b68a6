"""
Unit tests of license_proxy.guards: each rule a hostile client meets, on a channel fed bytes
by hand, with the clock advanced by hand.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from license_proxy import runtime
from license_proxy.config import Config
from license_proxy.guards import MAX_HEAD_SIZE, MAX_HEADERS, ConnectionLimits, GuardedSite
from license_proxy.metrics import ListenerMetrics
from tests.support.configs import error, load_text

CONFIG = Config(max_body_size=10, header_timeout=10.0, idle_timeout=60.0)


class Echo(Resource):
    """Answers the body's length; ``hold`` keeps answers open until ``release``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []
        self.hold = False
        self.held: list = []

    def render(self, request) -> bytes | int:
        body = request.content.read()
        self.seen.append(body)
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return b"%d" % len(body)

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            request.write(b"late")
            request.finish()


class FillingTransport(StringTransport):
    """A transport whose client reads nothing: full (it pauses its producer, as Twisted's
    transports do) once more than ``room`` bytes are written; ``drain`` is the client reading."""

    def __init__(self, room: int = 1 << 30) -> None:
        super().__init__()
        self.room = room
        self.full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.full and len(self.value()) > self.room:
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        read = self.value()
        self.clear()
        if self.full:
            self.full = False
            self.producer.resumeProducing()
        return read


class Client:
    """One connection to a ``GuardedSite``, fed by the test."""

    def __init__(self, config: Config = CONFIG, room: int = 1 << 30) -> None:
        self.clock = MemoryReactorClock()
        self.registry = CollectorRegistry()
        self.metrics = ListenerMetrics.on(self.registry)
        self.resource = Echo()
        site = GuardedSite(self.resource, config, self.clock, self.metrics.rejected)
        self.channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
        self.transport = FillingTransport(room)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    @property
    def answer(self) -> bytes:
        return self.transport.value()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def rejected(self, code: int) -> float:
        return self.registry.get_sample_value(
            "license_proxy_requests_rejected_total", {"code": str(code)}
        )


def head(*lines: str, method: str = "POST") -> bytes:
    return "\r\n".join([f"{method} /v1/x HTTP/1.1", "Host: proxy", *lines, "", ""]).encode()


# Bodies


def test_content_length_over_the_limit_is_413_before_the_body():
    client = Client()
    client.send(head("Content-Length: 11"))
    assert client.answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"Connection: close\r\n" in client.answer
    assert client.answer.endswith(b"\r\n\r\nrequest body over 10 bytes\n")
    assert client.closed
    client.send(b"x" * 11)  # the body arriving after the answer is ignored
    assert client.resource.seen == []
    assert client.rejected(413) == 1


def test_expect_100_continue_over_the_limit_gets_413_not_100():
    client = Client()
    client.send(head("Content-Length: 11", "Expect: 100-continue"))
    assert client.answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in client.answer


def test_body_at_the_limit_is_relayed():
    client = Client()
    client.send(head("Content-Length: 10") + b"x" * 10)
    assert client.answer.startswith(b"HTTP/1.1 200 ")
    assert client.resource.seen == [b"x" * 10]
    assert not client.closed


def test_chunked_body_growing_past_the_limit_is_413_at_once():
    client = Client()
    client.send(head("Transfer-Encoding: chunked") + b"6\r\nxxxxxx\r\n")
    assert client.answer == b""
    client.send(b"5\r\nxxxxx\r\n")  # 11 bytes: no need to wait for the end of the body
    assert client.answer.startswith(b"HTTP/1.1 413 ")
    assert client.closed
    client.send(b"0\r\n\r\n")
    assert client.resource.seen == []


def test_chunked_body_over_the_limit_in_one_piece_never_reaches_the_resource():
    client = Client()
    client.send(head("Transfer-Encoding: chunked") + b"6\r\nxxxxxx\r\n6\r\nxxxxxx\r\n0\r\n\r\n")
    assert client.answer.startswith(b"HTTP/1.1 413 ")
    assert client.resource.seen == []


def test_chunked_body_within_the_limit_is_relayed():
    client = Client()
    client.send(head("Transfer-Encoding: chunked") + b"5\r\nxxxxx\r\n5\r\nyyyyy\r\n0\r\n\r\n")
    assert client.answer.startswith(b"HTTP/1.1 200 ")
    assert client.resource.seen == [b"xxxxxyyyyy"]


def test_the_body_limit_counts_each_request_of_a_connection_apart():
    client = Client()
    client.send(head("Content-Length: 8") + b"x" * 8)
    client.send(head("Content-Length: 8") + b"y" * 8)
    assert client.resource.seen == [b"x" * 8, b"y" * 8]
    assert client.answer.count(b"HTTP/1.1 200 ") == 2


# Heads


def test_as_many_headers_as_allowed_pass():
    client = Client()
    client.send(head(*(f"X-H{i}: v" for i in range(MAX_HEADERS - 1)), method="GET"))
    assert client.answer.startswith(b"HTTP/1.1 200 ")


def test_too_many_headers_is_431():
    client = Client()
    client.send(head(*(f"X-H{i}: v" for i in range(MAX_HEADERS)), method="GET"))
    assert client.answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert client.closed
    assert client.resource.seen == []
    assert client.rejected(431) == 1


def test_head_too_large_is_431():
    client = Client()
    client.send(head(*(f"X-H{i}: {'v' * 1000}" for i in range(17)), method="GET"))
    assert client.answer.startswith(b"HTTP/1.1 431 ")
    assert client.resource.seen == []


def test_one_header_line_too_long_is_431_before_its_end():
    client = Client()
    client.send(b"GET / HTTP/1.1\r\nX-Big: " + b"v" * MAX_HEAD_SIZE)
    assert client.answer.startswith(b"HTTP/1.1 431 ")
    assert client.closed


def test_request_line_too_long_is_414():
    client = Client()
    client.send(b"GET /" + b"a" * MAX_HEAD_SIZE)
    assert client.answer.startswith(b"HTTP/1.1 414 URI Too Long\r\n")
    assert client.closed


@pytest.mark.parametrize(
    "request_line",
    [b"GARBAGE", b"GET / HTTP/1.1 extra", b"GET\x00 / HTTP/1.1", b"\x16\x03\x01\x02\x00\x01"],
)
def test_malformed_request_line_is_400_and_closed(request_line):
    client = Client()
    with capturedLogs() as events:
        client.send(request_line + b"\r\nHost: proxy\r\n\r\n")
    assert client.answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert client.closed
    assert client.rejected(400) == 1
    assert not [e for e in events if "log_failure" in e]


def test_header_without_colon_is_400():
    client = Client()
    client.send(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
    assert client.answer.startswith(b"HTTP/1.1 400 ")


def test_bad_chunk_size_is_400():
    client = Client()
    client.send(head("Transfer-Encoding: chunked") + b"zz\r\n")
    assert client.answer.startswith(b"HTTP/1.1 400 ")
    assert client.resource.seen == []


@pytest.mark.parametrize(
    "lines",
    [
        # RFC 9112 6.1: the lines are one list, "chunked, identity", which is not chunked.
        ["Transfer-Encoding: chunked", "Transfer-Encoding: identity"],
        ["Transfer-Encoding: identity", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: gzip", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: identity"],
        ["Host: other"],  # a second Host: which one is the target's?
        ["X-Token: a\x01b"],
        ["X-Token: a\x7fb"],
        ["X-Token: a\x1bb"],
    ],
)
def test_what_twisted_lets_through_is_400_before_the_body(lines):
    client = Client()
    client.send(head(*lines, "Content-Length: 0" if "Transfer" not in lines[0] else "X: y"))
    client.send(b"3\r\nabc\r\n0\r\n\r\n")
    assert client.answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), client.answer
    assert client.answer.endswith(b"\r\n\r\nmalformed request\n")
    assert client.closed
    assert client.resource.seen == []
    assert client.rejected(400) == 1


@pytest.mark.parametrize(
    "data",
    [
        # obs-fold: Twisted unfolded it, and read the body as chunked.
        b"POST /v1/x HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
        b"POST /v1/x HTTP/1.1\r\nHost: proxy\r\nX-Token: a\r\n\tb\r\nContent-Length: 0\r\n\r\n",
        b"GET /v1/x HTTP/1.1\r\n Host: proxy\r\n\r\n",
        b"GET /v1/x HTTP/1.1\r\nX-Token: a\r\n\r\n",  # HTTP/1.1 needs a Host
        b"GET /v1/x HTTP/1.1\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: proxy\r\n\r\n",  # Twisted answered 200 itself
        b"GET * HTTP/1.1\r\nHost: proxy\r\n\r\n",
    ],
    ids=["folded Transfer-Encoding", "folded value", "indented first header", "no Host",
         "no header at all",
         "OPTIONS *", "GET *"],
)
def test_framing_with_more_than_one_reading_is_400(data):
    client = Client()
    client.send(data + b"3\r\nabc\r\n0\r\n\r\n")
    assert client.answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), client.answer
    assert client.closed
    assert client.resource.seen == []
    assert client.rejected(400) == 1


def test_http_1_0_without_host_is_answered():
    client = Client()
    client.send(b"GET /v1/status HTTP/1.0\r\n\r\n")  # HAProxy's httpchk, by default
    assert client.answer.startswith(b"HTTP/1.0 200 ")


def test_answers_carry_no_version_banner():
    client = Client()
    client.send(head(method="GET"))
    answer_head = client.answer.split(b"\r\n\r\n")[0].lower()
    assert answer_head.startswith(b"http/1.1 200 ")
    assert b"\r\nserver:" not in answer_head
    assert b"twisted" not in answer_head


def test_chunked_in_any_case_with_a_tab_in_a_value_is_relayed():
    client = Client()
    client.send(head("Transfer-Encoding:  Chunked ", "X-Token: a\tb\x80") + b"3\r\nabc\r\n0\r\n\r\n")
    assert client.answer.startswith(b"HTTP/1.1 200 ")
    assert client.resource.seen == [b"abc"]


# Pipelining


def test_pipelined_requests_wait_while_the_client_reads_no_answer():
    client = Client(room=10)  # full after the first answer: the client reads nothing
    client.send(head(method="GET") * 100)
    assert len(client.resource.seen) == 1
    assert client.transport.producerState == "paused"  # nothing more is read either
    client.send(head(method="GET"))  # what arrives before the pause took effect waits too
    assert len(client.resource.seen) == 1
    answers = b""
    for _ in range(200):  # the client reads, one answer a time
        answers += client.transport.drain()
        if len(client.resource.seen) == 101:
            break
    answers += client.transport.drain()
    assert len(client.resource.seen) == 101
    assert answers.count(b"HTTP/1.1 200 ") == 101
    assert not client.closed


def test_a_pipelined_request_waits_for_the_client_to_read_the_answer_before():
    client = Client(room=10)
    client.resource.hold = True
    client.send(head(method="GET") * 3)
    client.resource.release()  # the first answer fills the transport
    assert len(client.resource.seen) == 1
    client.transport.drain()
    assert len(client.resource.seen) == 2
    client.clock.advance(30)  # the deadline does not run while a request waits in line
    assert b" 408 " not in client.answer
    client.resource.hold = False
    client.resource.release()
    client.transport.drain()
    assert len(client.resource.seen) == 3
    assert not client.closed


def test_a_client_that_reads_late_gets_no_deadline_for_a_request_it_did_not_send():
    client = Client(room=10)
    client.send(head(method="GET"))
    assert client.transport.drain().startswith(b"HTTP/1.1 200 ")
    client.clock.advance(30)
    assert client.answer == b""
    assert not client.closed


def test_a_client_that_never_reads_is_closed_when_idle():
    client = Client(room=10)
    client.send(head(method="GET") * 100)
    client.clock.advance(60)
    assert client.closed
    assert len(client.resource.seen) == 1


# The request deadline


def test_head_sent_byte_by_byte_gets_408_at_the_deadline():
    client = Client()
    data = head(method="GET")
    for byte in data[:-1]:  # one byte a second: each would reset an idle timeout
        client.send(bytes([byte]))
        client.clock.advance(0.5)
        if client.closed:
            break
    assert client.clock.seconds() == pytest.approx(10.0)
    assert client.answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert client.answer.endswith(b"request not complete 10 s after its first byte\n")
    assert client.rejected(408) == 1


def test_the_deadline_starts_at_the_first_byte_not_at_the_connection():
    client = Client()
    client.clock.advance(30)
    client.send(b"GET / HT")
    client.clock.advance(9.9)
    assert client.answer == b""
    client.clock.advance(0.1)
    assert client.answer.startswith(b"HTTP/1.1 408 ")


def test_a_slow_body_gets_408():
    client = Client()
    client.send(head("Content-Length: 10") + b"x")
    client.clock.advance(10)
    assert client.answer.startswith(b"HTTP/1.1 408 ")
    assert client.closed
    assert client.resource.seen == []


def test_the_deadline_does_not_cover_the_answer_and_restarts_per_request():
    client = Client()
    client.resource.hold = True
    client.send(head(method="GET"))
    client.clock.advance(25)  # the upstream is slow: not the client's fault
    client.resource.release()
    assert client.answer.startswith(b"HTTP/1.1 200 ")
    assert not client.closed
    client.send(b"GET / HTTP/1.1\r\n")  # the next request gets its own 10 s
    client.clock.advance(9)
    assert b"408" not in client.answer
    client.clock.advance(1)
    assert b"HTTP/1.1 408 " in client.answer


def test_a_request_pipelined_behind_a_slow_answer_gets_its_own_deadline():
    client = Client()
    client.resource.hold = True
    client.send(head(method="GET") + head(method="GET"))
    client.clock.advance(25)
    client.resource.hold = False
    client.resource.release()
    assert client.answer.count(b"HTTP/1.1 200 ") == 2
    assert not client.closed


def test_a_request_arriving_with_the_end_of_an_answered_one_gets_the_deadline():
    client = Client()
    # The next head starts in the same read as a request answered at once: Twisted keeps it in
    # its line buffer, and no later read would start its deadline.
    client.send(head(method="GET") + b"GET / HT")
    client.clock.advance(10)
    assert b"HTTP/1.1 408 " in client.answer
    assert client.closed


@pytest.mark.parametrize("reads", [[b"xx", b"\r\n"], [b"xx\r\n"]], ids=["apart", "with the body"])
def test_a_stray_line_end_after_a_body_does_not_start_a_deadline(reads):
    client = Client()
    client.send(head("Content-Length: 2"))
    for data in reads:
        client.send(data)
    client.clock.advance(59)
    assert b"408" not in client.answer
    assert not client.closed
    client.send(b"GET / HTTP/1.1\r\n")  # a request after it does get one
    client.clock.advance(10)
    assert b"HTTP/1.1 408 " in client.answer


# The idle timeout


def test_a_connection_that_never_sends_is_closed_when_idle():
    client = Client()
    client.clock.advance(59)
    assert not client.closed
    client.clock.advance(1)
    assert client.closed
    assert client.answer == b""


def test_an_idle_keep_alive_connection_is_closed_without_a_log_line():
    client = Client()
    client.send(head(method="GET"))
    client.clock.advance(59)
    assert not client.closed
    with capturedLogs() as events:
        client.clock.advance(1)
    assert client.closed
    # A fleet keeping connections alive closes one per container per minute: not news.
    assert [formatEvent(e) for e in events] == []


# Connection limits


class Listener:
    """A ``ConnectionLimits`` over a ``GuardedSite``, with connections opened by the test."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.clock = MemoryReactorClock()
        self.registry = CollectorRegistry()
        metrics = ListenerMetrics.on(self.registry)
        config = Config(max_connections=total, max_connections_per_peer=per_peer)
        site = GuardedSite(Echo(), config, self.clock, metrics.rejected)
        self.limits = ConnectionLimits(site, config, self.clock, metrics.refused, "licensing")

    def connect(self, host: str):
        protocol = self.limits.buildProtocol(IPv4Address("TCP", host, 40000))
        if protocol is not None:
            protocol.makeConnection(StringTransport())
        return protocol

    def refused(self, reason: str) -> float:
        return self.registry.get_sample_value(
            "license_proxy_connections_refused_total", {"reason": reason}
        )


def test_per_peer_limit_refuses_only_that_peer():
    listener = Listener(total=10, per_peer=2)
    first = listener.connect("192.0.2.1")
    assert listener.connect("192.0.2.1") is not None
    assert listener.connect("192.0.2.1") is None
    assert listener.connect("192.0.2.2") is not None
    assert listener.refused("per_peer") == 1
    assert listener.refused("total") == 0
    first.connectionLost(Failure(ConnectionError("gone")))
    assert listener.connect("192.0.2.1") is not None


def test_total_limit_refuses_everyone():
    listener = Listener(total=3, per_peer=2)
    connections = [listener.connect(host) for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3")]
    assert listener.connect("192.0.2.4") is None
    assert listener.refused("total") == 1
    connections[0].connectionLost(Failure(ConnectionError("gone")))
    assert listener.connect("192.0.2.4") is not None


def test_refusals_are_warned_about_at_most_every_ten_seconds():
    listener = Listener(total=10, per_peer=1)
    listener.connect("192.0.2.1")
    with capturedLogs() as events:
        for _ in range(5):
            listener.connect("192.0.2.1")
            listener.clock.advance(1)
        listener.clock.advance(5)
        listener.connect("192.0.2.1")
    warnings = [formatEvent(e) for e in events if e.get("log_level").name == "warn"]
    assert warnings == [
        "licensing listener: refused 1 connection(s) over [server] max_connections_per_peer"
        " = 1 since the last warning, the latest from 192.0.2.1",
        "licensing listener: refused 5 connection(s) over [server] max_connections_per_peer"
        " = 1 since the last warning, the latest from 192.0.2.1",
    ]
    assert listener.refused("per_peer") == 6


# The open files limit


@pytest.fixture
def restored_nofile():
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield saved
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_open_files_limit_is_raised_to_the_hard_limit(restored_nofile):
    _, hard = restored_nofile
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    with capturedLogs() as events:
        runtime.raise_open_files_limit(100)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    assert events == []


def test_an_open_files_limit_below_the_connection_limits_is_warned_about(restored_nofile):
    _, hard = restored_nofile
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    with capturedLogs() as events:
        runtime.raise_open_files_limit(hard + 1)
    assert [formatEvent(e) for e in events] == [
        f"the open files limit is {hard}, below the {hard + 1} the connection limits allow;"
        " raise it (LimitNOFILE=, ulimit -n) or lower [server] max_connections"
    ]


# Configuration


def test_listener_keys_load(tmp_path):
    config = load_text(
        tmp_path,
        "[server]\nmax_body_size = 65536\nheader_timeout = \"5s\"\nidle_timeout = 120\n"
        "max_connections = 100\nmax_connections_per_peer = 10\n",
    )
    assert (config.max_body_size, config.header_timeout, config.idle_timeout) == (65536, 5, 120)
    assert (config.max_connections, config.max_connections_per_peer) == (100, 10)


def test_listener_defaults_fit_a_fleet_behind_one_address():
    config = Config()
    assert (config.max_body_size, config.header_timeout, config.idle_timeout) == (1048576, 10, 60)
    assert (config.max_connections, config.max_connections_per_peer) == (4096, 1024)


@pytest.mark.parametrize(
    "key, toml, shown",
    [
        ("max_body_size", "0", "0"),
        ("max_body_size", '"1MiB"', "'1MiB'"),
        ("max_connections", "-1", "-1"),
        ("max_connections_per_peer", "true", "true"),
        ("max_connections_per_peer", "1.5", "1.5"),
    ],
)
def test_bad_listener_count_names_the_key(tmp_path, key, toml, shown):
    ranges = {
        "max_body_size": "from 1 to 104857600",
        "max_connections": "from 1 to 1048576",
        "max_connections_per_peer": "from 1 to 1048576",
    }
    assert error(tmp_path, f"[server]\n{key} = {toml}\n") == (
        f"[server] {key}: expected an integer {ranges[key]}, got {shown}"
    )


@pytest.mark.parametrize(
    "toml, shown", [("0", "0"), ("65536", "65536"), ("true", "true"), ('"4096"', "'4096'")]
)
def test_bad_backlog_names_the_key(tmp_path, toml, shown):
    assert error(tmp_path, f"[server]\nbacklog = {toml}\n") == (
        f"[server] backlog: expected an integer from 1 to 65535, got {shown}"
    )


@pytest.mark.parametrize("key", ["header_timeout", "idle_timeout"])
def test_bad_listener_timeout_names_the_key(tmp_path, key):
    assert error(tmp_path, f"[server]\n{key} = 0\n") == (
        f"[server] {key}: expected a finite duration greater than 0, got 0"
    )


def test_systemd_unit_allows_the_files_the_default_limits_need():
    unit = (Path(__file__).parents[2] / "etc" / "license-proxy.service").read_text()
    (value,) = re.findall(r"^LimitNOFILE=(\d+)$", unit, re.M)
    assert int(value) >= 3 * Config().max_connections


# Draining (a stop: service's drain)


def test_draining_closes_a_connection_once_its_answer_is_written():
    client = Client()
    client.resource.hold = True
    client.send(head("Content-Length: 1") + b"x")  # taken before the drain began
    client.channel.site.draining = True
    client.channel.closeIfIdle()
    assert not client.closed, "closed with an answer still owed"
    client.resource.release()
    assert client.answer.startswith(b"HTTP/1.1 200 ") and client.answer.endswith(b"late\r\n0\r\n\r\n")
    assert client.closed


def test_draining_answers_with_connection_close_and_leaves_a_new_connection_open():
    client = Client()
    client.channel.site.draining = True
    client.channel.closeIfIdle()
    assert not client.closed, "a connection that has not sent its first request was closed"
    client.send(head("Content-Length: 1") + b"x")
    assert client.answer.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nConnection: close\r\n" in client.answer
    assert client.closed

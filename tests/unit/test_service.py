"""
The service wiring (license_proxy.service.make_service), in process on a memory reactor: which
listeners open when, and the one line an instance that must not start gives twistd.  The same
rules against a real process are tests/integration/test_e2e.py.
"""

from __future__ import annotations

import json
import time

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport, _FakePort
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from license_proxy.egress import Settings
from license_proxy.service import make_service
from tests.support.configs import load_text

LICENSING, STATUS = 8443, 8080
SERVER = "https://127.0.0.1:9443"


class BusyPorts(MemoryReactorClock):
    """A memory reactor on which another process has ``busy`` ports."""

    def __init__(self, busy: tuple[int, ...]) -> None:
        super().__init__()
        self.busy = busy
        self.closed: list[int] = []  # ports no longer listened on, in order

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        super().listenTCP(port, factory, backlog, interface)
        return _Port(self, port)


class _Port(_FakePort):
    def __init__(self, reactor: BusyPorts, port: int) -> None:
        super().__init__(IPv4Address("TCP", "127.0.0.1", port))
        self.reactor, self.port = reactor, port

    def stopListening(self) -> None:
        self.reactor.closed.append(self.port)


class Started:
    """``make_service`` on a memory reactor, started as twistd starts it; stopped after the test."""

    def __init__(
        self, tmp_path, trust_cache: dict | None = None, busy: tuple[int, ...] = (), server=""
    ) -> None:
        if trust_cache is not None:
            (tmp_path / "state").mkdir(mode=0o700)
            (tmp_path / "state" / "trust-cache.json").write_text(json.dumps(trust_cache))
        self.config = load_text(tmp_path, f"""
[server]
host = "127.0.0.1"
port = {LICENSING}
status_port = {STATUS}
{server}
[license]
server_url = "{SERVER}"
key = "k-service"
startup_timeout = "3s"
[cache]
path = "{tmp_path}/state/trust-cache.json"
""")
        self.reactor = BusyPorts(busy)
        self.fatal: list[str] = []
        egress = Settings(self.config.proxy, self.config.no_proxy, {})
        self.service = make_service(self.config, self.reactor, self.fatal.append, egress)
        self.service.privilegedStartService()
        self.service.startService()

    def listening(self) -> list[tuple[str, int]]:
        return [(interface, port) for port, _, _, interface in self.reactor.tcpServers]

    def backlogs(self) -> dict[int, int]:
        return {port: backlog for port, _, backlog, _ in self.reactor.tcpServers}

    def connecting(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def connect(self, port: int = LICENSING) -> StringTransport:
        """A client connected to ``port``'s listener (``tls = false``)."""
        factory = next(f for p, f, _, _ in self.reactor.tcpServers if p == port)
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.protocol = protocol
        return transport

    def refuse(self) -> None:
        """The license server's port refuses the connection attempt in flight."""
        (connector,) = self.reactor.connectors
        (_, _, factory, _, _) = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))


@pytest.fixture
def started(tmp_path):
    made = []
    yield lambda **kwargs: made.append(Started(tmp_path, **kwargs)) or made[-1]
    for each in made:
        each.service.stopService()  # gives SIGHUP back; the trust cache's writer never ran


def test_status_listens_at_once_and_licensing_only_once_the_start_up_rule_holds(started):
    s = started()
    assert s.listening() == [("127.0.0.1", STATUS)]
    assert s.connecting() == [("127.0.0.1", 9443)]  # the start-up check-in, never answered
    s.reactor.advance(s.config.startup_timeout - 0.1)
    assert s.listening() == [("127.0.0.1", STATUS)]
    assert s.fatal == []


def test_an_unreachable_license_server_without_a_trust_cache_is_one_fatal_line(started):
    s = started()
    s.reactor.advance(s.config.startup_timeout)
    assert len(s.fatal) == 1, s.fatal
    (line,) = s.fatal
    assert "\n" not in line
    assert line.startswith(f"the license server could not be reached within 3 s: {SERVER}: "), line
    assert s.listening() == [("127.0.0.1", STATUS)]  # licensing never opened
    s.reactor.advance(60)
    assert len(s.fatal) == 1


def test_a_refused_check_in_inside_the_trust_caches_window_opens_licensing_at_once(started):
    checked_in = time.time() - 60  # the wall clock: what the proxy measures trust in
    s = started(trust_cache={"format": 1, "last_successful_checkin": checked_in,
                             "salt": "00" * 16, "entries": {}})
    assert s.listening() == [("127.0.0.1", STATUS)]
    s.refuse()
    assert sorted(s.listening()) == [("127.0.0.1", STATUS), ("127.0.0.1", LICENSING)]
    assert s.fatal == []


def _trusted_cache() -> dict:
    checked_in = time.time() - 60
    return {"format": 1, "last_successful_checkin": checked_in, "salt": "00" * 16, "entries": {}}


def test_both_listeners_listen_with_a_backlog_sized_for_a_fleet(started):
    s = started(trust_cache=_trusted_cache())
    s.refuse()
    assert s.backlogs() == {STATUS: 4096, LICENSING: 4096}


def test_the_backlog_is_configurable(started):
    s = started(trust_cache=_trusted_cache(), server="backlog = 511")
    s.refuse()
    assert s.backlogs() == {STATUS: 511, LICENSING: 511}


def test_a_taken_status_port_is_one_fatal_line(started):
    s = started(busy=(STATUS,))
    assert s.fatal == [
        "cannot listen for status requests on 127.0.0.1:8080: [Errno 98] Address already in use"
    ]
    assert s.listening() == []


def test_a_taken_licensing_port_is_the_same_one_fatal_line(started):
    s = started(trust_cache=_trusted_cache(), busy=(LICENSING,))
    s.refuse()
    assert s.fatal == [
        "cannot listen for licensing requests on 127.0.0.1:8443: [Errno 98] Address already in use"
    ]
    assert s.listening() == [("127.0.0.1", STATUS)]


TRACE = b"TRACE / HTTP/1.1\r\nHost: proxy\r\n\r\n"  # answered at once (405), no license server


def test_a_stop_answers_on_for_the_drain_time_closing_each_connection_after_its_answer(started):
    """SIGTERM reaches a Kubernetes pod as it leaves the Service, not after: check-ins on their
    way still arrive, new connections too, and are answered; kept-alive ones move elsewhere."""
    s = started(trust_cache=_trusted_cache(), server='tls = false\ndrain_time = "5s"')
    s.refuse()
    kept = s.connect()
    kept.protocol.dataReceived(TRACE)
    assert kept.value().startswith(b"HTTP/1.1 405 ") and not kept.disconnecting
    opened = s.connect()  # its request not sent yet
    stopping = s.service.stopService()
    assert kept.disconnecting, "a kept-alive connection waiting for a next request stays open"
    assert not opened.disconnecting, "a connection about to send its first request was closed"
    opened.protocol.dataReceived(TRACE)
    assert opened.value().startswith(b"HTTP/1.1 405 "), opened.value()
    assert b"\r\nConnection: close\r\n" in opened.value() and opened.disconnecting
    s.reactor.advance(4.9)
    late = s.connect()  # a new connection during the drain: the listener is still open
    late.protocol.dataReceived(TRACE)
    assert late.value().startswith(b"HTTP/1.1 405 ") and late.disconnecting
    assert LICENSING not in s.reactor.closed
    s.reactor.advance(0.1)
    assert LICENSING in s.reactor.closed
    assert STATUS in s.reactor.closed  # at once: a load balancer checking it sees the stop
    assert s.reactor.closed.index(STATUS) < s.reactor.closed.index(LICENSING)
    del stopping  # the rest of the stop (the flush) is the trust cache's


def test_a_drain_time_of_zero_stops_the_licensing_listener_at_once(started):
    s = started(trust_cache=_trusted_cache(), server='tls = false\ndrain_time = "0s"')
    s.refuse()
    opened = s.connect()
    s.service.stopService()
    assert sorted(s.reactor.closed) == [STATUS, LICENSING]
    opened.protocol.dataReceived(TRACE)  # sent on a connection opened before the stop
    assert opened.value().startswith(b"HTTP/1.1 503 "), opened.value()
    assert b"\r\nConnection: close\r\n" in opened.value() and opened.disconnecting


@pytest.mark.parametrize("when", ["starting", "port taken"])
def test_an_instance_whose_licensing_port_never_opened_does_not_drain(started, when):
    if when == "starting":
        s = started(server='drain_time = "5s"')
    else:
        s = started(trust_cache=_trusted_cache(), busy=(LICENSING,), server='drain_time = "5s"')
        s.refuse()
    with capturedLogs() as events:
        s.service.stopService()
    assert s.reactor.closed == [STATUS]
    assert not [e for e in events if "drain" in e.get("log_format", "")], events

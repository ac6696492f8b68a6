"""
Unit tests of the CONNECT and SOCKS5 client handshakes over in-memory
transports: the bytes sent, the tunnel handed over (with any bytes that came
after the handshake), every error reply, and the deadline on a Clock.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from license_proxy.tunnel import ConnectTunnel, ProxyError, Socks5Tunnel, TunnelEndpoint
from license_proxy.upstream import describe

PROXY = "http://proxy:3128"


class Inner(Protocol):
    """The protocol the tunnel is for (TLS to the upstream, in production)."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class MemoryEndpoint:
    """Connects at once (or never, with ``hang``) to a StringTransport."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.transport = StringTransport()
        self.protocol = None

    def connect(self, factory):
        if self.hang:
            return Deferred()
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)

    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        sent = self.transport.value()
        self.transport.clear()
        return sent


class Refusing:
    def connect(self, factory):
        return Deferred.fromCoroutine(self._refuse())

    async def _refuse(self):
        raise error.ConnectionRefusedError()


class TunnelTests(SynchronousTestCase):
    def open(self, tunnel, endpoint=None):
        self.endpoint = endpoint or MemoryEndpoint()
        return TunnelEndpoint(self.endpoint, PROXY, tunnel).connect(Factory.forProtocol(Inner))

    def reason(self, connecting: Deferred) -> str:
        failure = self.failureResultOf(connecting, ProxyError)
        return describe(failure.value, 2)


class ConnectTests(TunnelTests):
    def test_connect_then_the_tunnel_carries_the_inner_protocol(self):
        connecting = self.open(ConnectTunnel("license.example", 443))
        self.assertEqual(
            self.endpoint.sent(),
            b"CONNECT license.example:443 HTTP/1.1\r\nHost: license.example:443\r\n\r\n",
        )
        self.assertNoResult(connecting)
        self.endpoint.answer(b"HTTP/1.1 200 Connection established\r\n")
        self.assertNoResult(connecting)
        self.endpoint.answer(b"Proxy-Agent: test\r\n\r\n\x16\x03first bytes")
        inner = self.successResultOf(connecting)
        self.assertIsInstance(inner, Inner)
        self.assertEqual(inner.received, b"\x16\x03first bytes")
        self.endpoint.answer(b"more")
        self.assertEqual(inner.received, b"\x16\x03first bytesmore")
        inner.transport.write(b"to upstream")
        self.assertEqual(self.endpoint.sent(), b"to upstream")

    def test_basic_credentials_and_ipv6(self):
        self.open(ConnectTunnel("::1", 8443, b"Basic dTpw"))
        self.assertEqual(
            self.endpoint.sent(),
            b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n"
            b"Proxy-Authorization: Basic dTpw\r\n\r\n",
        )

    def test_a_non_2xx_answer_is_the_failure_reason(self):
        connecting = self.open(ConnectTunnel("license.example", 443))
        self.endpoint.answer(
            b"HTTP/1.0 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="corp"\r\n\r\n'
        )
        self.assertEqual(
            self.reason(connecting),
            f"proxy {PROXY}: CONNECT answered 407 Proxy Authentication Required",
        )
        self.assertTrue(self.endpoint.transport.disconnecting)

    def test_not_http(self):
        connecting = self.open(ConnectTunnel("license.example", 443))
        self.endpoint.answer(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertEqual(
            self.reason(connecting), f"proxy {PROXY}: answered CONNECT with something other than HTTP"
        )

    def test_an_endless_head_is_refused(self):
        connecting = self.open(ConnectTunnel("license.example", 443))
        self.endpoint.answer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 3000)
        self.assertIn("with a head over", self.reason(connecting))

    def test_closed_before_the_answer(self):
        connecting = self.open(ConnectTunnel("license.example", 443))
        self.endpoint.answer(b"HTTP/1.1 200")
        self.endpoint.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(
            self.reason(connecting),
            f"proxy {PROXY}: closed the connection before the CONNECT answer was complete",
        )

    def test_refused(self):
        connecting = self.open(ConnectTunnel("license.example", 443), Refusing())
        self.assertEqual(self.reason(connecting), f"proxy {PROXY}: connection refused")

    def test_the_deadline_while_connecting_or_waiting_names_the_stage(self):
        clock = Clock()
        for hang, stage in ((True, "connecting to it"), (False, "waiting for its CONNECT answer")):
            connecting = self.open(ConnectTunnel("license.example", 443), MemoryEndpoint(hang))
            connecting.addTimeout(2, clock)
            clock.advance(1.9)
            self.assertNoResult(connecting)
            clock.advance(0.1)
            self.assertEqual(self.reason(connecting), f"proxy {PROXY}: deadline passed {stage}")
            if not hang:
                self.assertTrue(self.endpoint.transport.disconnecting)


class Socks5Tests(TunnelTests):
    def test_no_auth_with_a_name_for_the_proxy_to_resolve(self):
        connecting = self.open(Socks5Tunnel("license.example", 443))
        self.assertEqual(self.endpoint.sent(), b"\x05\x01\x00")
        self.endpoint.answer(b"\x05\x00")
        self.assertEqual(
            self.endpoint.sent(), b"\x05\x01\x00\x03\x0flicense.example\x01\xbb"
        )
        # The reply's bound address is a name here; bytes after it belong to the tunnel.
        self.endpoint.answer(b"\x05\x00\x00\x03\x04host")
        self.assertNoResult(connecting)
        self.endpoint.answer(b"\x01\xbbhello")
        self.assertEqual(self.successResultOf(connecting).received, b"hello")

    def test_username_and_password(self):
        connecting = self.open(Socks5Tunnel("10.1.2.3", 8443, "user", "pässword"))
        self.assertEqual(self.endpoint.sent(), b"\x05\x02\x00\x02")
        self.endpoint.answer(b"\x05\x02")
        self.assertEqual(self.endpoint.sent(), b"\x01\x04user\x09p\xc3\xa4ssword")
        self.endpoint.answer(b"\x01\x00")
        self.assertEqual(self.endpoint.sent(), b"\x05\x01\x00\x01\x0a\x01\x02\x03\x20\xfb")
        self.endpoint.answer(b"\x05\x00\x00\x04" + b"\x00" * 16 + b"\x00\x00")
        self.assertEqual(self.successResultOf(connecting).received, b"")

    def test_local_resolution_sends_an_address(self):
        resolved = []

        async def resolve(host):
            resolved.append(host)
            return "::1"

        self.open(Socks5Tunnel("license.example", 443, resolve=resolve))
        self.endpoint.answer(b"\x05\x00")
        self.assertEqual(resolved, ["license.example"])
        self.assertEqual(
            self.endpoint.sent(), b"\x05\x01\x00" + b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x01\xbb"
        )

    def test_a_failed_local_lookup(self):
        async def resolve(host):
            raise error.DNSLookupError(host)

        connecting = self.open(Socks5Tunnel("license.example", 443, resolve=resolve))
        self.assertEqual(self.reason(connecting), f"proxy {PROXY}: DNS lookup failed")

    def test_error_replies(self):
        cases = [
            (None, b"\x05\xff", "SOCKS5 proxy requires a user name and password"),
            ("u", b"\x05\xff", "SOCKS5 proxy accepts none of the authentication methods offered"),
            (None, b"\x05\x02", "SOCKS5 proxy accepts none of the authentication methods offered"),
            ("u", b"\x05\x02\x01\x01", "SOCKS5 proxy rejected the user name or password"),
            (None, b"\x04\x00", "answered with something other than SOCKS5"),
            (None, b"\x05\x00\x05\x05\x00\x01", "SOCKS5 connect to license.example:443 failed: connection refused"),
            (None, b"\x05\x00\x05\x02\x00\x01", "SOCKS5 connect to license.example:443 failed: connection not allowed by ruleset"),
            (None, b"\x05\x00\x05\x04\x00\x01", "SOCKS5 connect to license.example:443 failed: host unreachable"),
            (None, b"\x05\x00\x05\x63\x00\x01", "SOCKS5 connect to license.example:443 failed: reply 99"),
            (None, b"\x05\x00\x05\x00\x00\x07\x00", "SOCKS5 reply with unknown address type 7"),
        ]
        for username, answer, reason in cases:
            connecting = self.open(Socks5Tunnel("license.example", 443, username, "p"))
            self.endpoint.answer(answer)
            self.assertEqual(self.reason(connecting), f"proxy {PROXY}: {reason}", answer)
            self.assertTrue(self.endpoint.transport.disconnecting)

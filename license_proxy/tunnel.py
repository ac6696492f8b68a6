"""
Tunnels through a forward proxy: HTTP ``CONNECT`` (RFC 9110 §9.3.6) and
SOCKS5 (RFC 1928, with RFC 1929 user name/password).

Twisted's ``ProxyAgent`` cannot tunnel, and no maintained Twisted SOCKS5
client authenticates, so both handshakes are written here, small.  A
``TunnelEndpoint`` connects to the proxy, runs the handshake, then hands the
connection to the caller's protocol as if it were a direct one, so
``wrapClientTLS`` over it runs TLS to the upstream inside the tunnel.  Every
failure is a ``ProxyError`` naming the proxy (never its password), so a log
line says which hop failed.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Awaitable, Callable, Optional, Union

from attrs import field, frozen
from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from .connect import resolve
from .proxyurl import netloc

MAX_ANSWER_HEAD = 16 * 1024
"""Largest CONNECT answer head accepted, in bytes."""


class ProxyError(Exception):
    """The proxy hop failed: ``reason`` is words, or the exception that
    ``upstream.describe`` puts into words."""

    def __init__(self, proxy: str, reason: Union[str, BaseException]) -> None:
        super().__init__(f"proxy {proxy}: {reason}")
        self.proxy = proxy
        self.reason = reason


class _Refused(Exception):
    """The handshake failed; the endpoint adds the proxy's name."""

    def __init__(self, reason: Union[str, BaseException]) -> None:
        super().__init__(reason)
        self.reason = reason


class _Handshake(Protocol):
    """
    Speaks a proxy's handshake, then carries the caller's protocol: bytes
    after the handshake go to it, and it writes to the connection directly.
    ``done`` fires with that protocol once the tunnel is open.
    """

    kind: str  # "CONNECT" or "SOCKS5", in failure reasons

    def __init__(self, factory, greeting: bytes) -> None:
        self._factory = factory
        self._greeting = greeting
        self._buffer = b""
        self._inner: Optional[Protocol] = None
        self.done: Deferred = Deferred(self._cancel)

    def connectionMade(self) -> None:
        self.transport.write(self._greeting)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        if not self.done.called:
            self.received()

    def received(self) -> None:
        """Read what the handshake needs from ``_buffer``; ``_open`` or ``_fail``."""
        raise NotImplementedError

    def connectionLost(self, reason) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif reason.check(SSL.Error):
            self._fail(reason.value)
        else:
            self._fail(f"closed the connection before the {self.kind} answer was complete")

    def _open(self, rest: bytes) -> None:
        self._buffer = b""
        self._inner = self._factory.buildProtocol(self.transport.getPeer())
        self._inner.makeConnection(self.transport)
        self.done.callback(self._inner)
        if rest:
            self._inner.dataReceived(rest)

    def _fail(self, reason: Union[str, BaseException]) -> None:
        if not self.done.called:
            self.done.errback(_Refused(reason))
            self.transport.abortConnection()

    def _cancel(self, done: Deferred) -> None:
        done.errback(CancelledError())
        self.transport.abortConnection()


class _Connect(_Handshake):
    kind = "CONNECT"

    def received(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_ANSWER_HEAD:
                self._fail(f"answered CONNECT with a head over {MAX_ANSWER_HEAD} bytes")
            return
        status_line = self._buffer[:end].split(b"\r\n", 1)[0]
        version, _, rest = status_line.partition(b" ")
        code, _, phrase = rest.partition(b" ")
        if not (version.startswith(b"HTTP/") and len(code) == 3 and code.isdigit()):
            self._fail("answered CONNECT with something other than HTTP")
        elif code.startswith(b"2"):
            self._open(self._buffer[end + 4 :])
        else:
            words = f"{int(code)} {phrase.decode('latin-1').strip()}".strip()
            self._fail(f"CONNECT answered {words}")


@frozen
class ConnectTunnel:
    """``CONNECT host:port``, with Basic ``Proxy-Authorization`` when given."""

    host: str
    port: int
    authorization: Optional[bytes] = field(default=None, repr=False)

    async def protocol(self, factory) -> _Handshake:
        target = netloc(self.host, self.port).encode("ascii")
        lines = [b"CONNECT " + target + b" HTTP/1.1", b"Host: " + target]
        if self.authorization is not None:
            lines.append(b"Proxy-Authorization: " + self.authorization)
        return _Connect(factory, b"\r\n".join(lines) + b"\r\n\r\n")


_SOCKS_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}
_NO_AUTH, _USER_PASSWORD, _NO_METHOD = 0x00, 0x02, 0xFF
_IPV4, _NAME, _IPV6 = 0x01, 0x03, 0x04


class _Socks5(_Handshake):
    kind = "SOCKS5"

    def __init__(self, factory, target: str, credentials: Optional[bytes], request: bytes):
        methods = bytes([_NO_AUTH, _USER_PASSWORD] if credentials else [_NO_AUTH])
        super().__init__(factory, bytes([5, len(methods)]) + methods)
        self._target = target
        self._credentials = credentials
        self._request = request
        self._step = self._method

    def received(self) -> None:
        while not self.done.called and self._step():
            pass

    def _take(self, size: int) -> Optional[bytes]:
        if len(self._buffer) < size:
            return None
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    def _method(self) -> bool:
        answer = self._take(2)
        if answer is None:
            return False
        if answer[0] != 5:
            self._fail("answered with something other than SOCKS5")
        elif answer[1] == _NO_AUTH:
            self._send_request()
        elif answer[1] == _USER_PASSWORD and self._credentials:
            self.transport.write(self._credentials)
            self._step = self._authenticated
        elif answer[1] == _NO_METHOD and not self._credentials:
            self._fail("SOCKS5 proxy requires a user name and password")
        else:
            self._fail("SOCKS5 proxy accepts none of the authentication methods offered")
        return True

    def _authenticated(self) -> bool:
        answer = self._take(2)
        if answer is None:
            return False
        if answer[1] != 0:
            self._fail("SOCKS5 proxy rejected the user name or password")
        else:
            self._send_request()
        return True

    def _send_request(self) -> None:
        self.transport.write(self._request)
        self._step = self._reply

    def _reply(self) -> bool:
        if len(self._buffer) < 2:
            return False
        version, reply = self._buffer[:2]
        if version != 5:
            self._fail("answered with something other than SOCKS5")
        elif reply != 0:
            why = _SOCKS_REPLIES.get(reply, f"reply {reply}")
            self._fail(f"SOCKS5 connect to {self._target} failed: {why}")
        elif len(self._buffer) >= 5:
            kind, first = self._buffer[3:5]
            if kind not in (_IPV4, _IPV6, _NAME):
                self._fail(f"SOCKS5 reply with unknown address type {kind}")
            # version, reply, reserved, address type, bound address, bound port
            elif self._take(4 + {_IPV4: 4, _IPV6: 16, _NAME: 1 + first}[kind] + 2):
                self._open(self._buffer)
        return False


@frozen
class Socks5Tunnel:
    """
    SOCKS5 CONNECT to ``host:port``.  With ``resolve`` (``socks5://``) the
    name is resolved here and the proxy gets an address; without it
    (``socks5h://``) the proxy resolves the name.
    """

    host: str
    port: int
    username: Optional[str] = field(default=None, repr=False)
    password: Optional[str] = field(default=None, repr=False)
    resolve: Optional[Callable[[str], Awaitable[str]]] = None

    async def protocol(self, factory) -> _Handshake:
        host = self.host if self.resolve is None else await self.resolve(self.host)
        credentials = None
        if self.username is not None:
            user, password = self.username.encode(), (self.password or "").encode()
            credentials = bytes([1, len(user)]) + user + bytes([len(password)]) + password
        request = b"\x05\x01\x00" + _socks_address(host) + struct.pack("!H", self.port)
        return _Socks5(factory, netloc(self.host, self.port), credentials, request)


def _socks_address(host: str) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        return bytes([_NAME, len(name)]) + name
    return bytes([_IPV4 if address.version == 4 else _IPV6]) + address.packed


def resolver(reactor) -> Callable[[str], Awaitable[str]]:
    """Resolve a name with the reactor's resolver, for ``socks5://``:
    an IPv4 address if there is one (a SOCKS server often has no IPv6 route)."""

    async def resolve_one(host: str) -> str:
        found = await resolve(reactor, host)
        if not found:
            raise error.DNSLookupError(host)
        found.sort(key=lambda a: not isinstance(a, IPv4Address))
        return found[0].host

    return resolve_one


@implementer(IStreamClientEndpoint)
@frozen
class TunnelEndpoint:
    """Connect to the proxy at ``_proxy``, open the tunnel, and hand it to
    the caller's protocol; ``_name`` is the proxy in failure reasons."""

    _proxy: IStreamClientEndpoint
    _name: str
    _tunnel: Union[ConnectTunnel, Socks5Tunnel]

    def connect(self, factory) -> Deferred:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory):
        stage = "connecting to it"
        try:
            handshake = await self._tunnel.protocol(factory)
            await connectProtocol(self._proxy, handshake)
            stage = f"waiting for its {handshake.kind} answer"
            return await handshake.done
        except CancelledError:
            raise ProxyError(self._name, f"deadline passed {stage}") from None
        except _Refused as e:
            raise ProxyError(self._name, e.reason) from None
        except Exception as e:
            raise ProxyError(self._name, e) from None

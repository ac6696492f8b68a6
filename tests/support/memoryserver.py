"""
A license server's end of every connection an Agent's pool opens, in memory: the bytes
each connection carries, over a real socket pair (so the pool's check for a close not yet
read sees a real socket), answered or closed by the test.
"""

from __future__ import annotations

import socket

from attrs import define, field
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Socket(FileDescriptor):
    """A real socket under a connection's transport, as TCP is under TLS."""

    def __init__(self, sock: socket.socket, reactor) -> None:
        super().__init__(reactor)
        self.socket = sock

    def fileno(self) -> int:
        return self.socket.fileno()


@define
class Server:
    """The license server's end of every connection the pool opens: the bytes
    in memory, over a real socket pair whose other end is in ``peers``;
    ``hold``: new connections never complete."""

    reactor: object
    connections: list = field(factory=list)  # (client protocol, transport)
    peers: list = field(factory=list)
    hold: bool = False

    def endpointForURI(self, uri):
        return self

    def connect(self, factory):
        if self.hold:
            return Deferred()
        protocol = factory.buildProtocol(None)
        ours, theirs = socket.socketpair()
        self.peers += [ours, theirs]
        transport = StringTransport()
        transport.transport = _Socket(ours, self.reactor)
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    def sent(self, n: int) -> bytes:
        return self.connections[n][1].value()

    def answer(self, n: int, data: bytes = OK) -> None:
        self.connections[n][0].dataReceived(data)

    def close(self, n: int) -> None:
        """The server closes connection ``n`` (FIN)."""
        self.connections[n][0].connectionLost(Failure(ConnectionDone()))

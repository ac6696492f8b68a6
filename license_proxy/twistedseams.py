"""
The private Twisted code this project relies on, all of it (and cryptography's one), for want
of a public way.

The rest of the code uses only the names below.  ``tests/unit/test_seams.py`` fails, naming
the seam, when a Twisted release changes what is relied on here; setup.cfg keeps twisted
below its next major (27), and CI runs ``tests/unit`` on the oldest allowed versions too.

``HookedHTTPChannel``, an ``HTTPChannel`` (twisted.web.http) with:

- ``badRequest()``: every 400 Twisted answers itself goes through the private
  ``HTTPChannel._respondToBadRequestAndDisconnect``, which writes a bare 400 and closes (a
  malformed request line, a header line without a colon, a bad header name, NUL, CR or LF in
  a value (26.x), a bad or second Content-Length or Transfer-Encoding, too many headers or header
  bytes, malformed chunked data; ``Request.requestReceived``'s unparsable multipart form).
  It is overridden to call ``badRequest``, so a subclass answers, counts and closes those
  like its own refusals;
- ``unreadInput()``: whether ``LineReceiver._buffer`` (twisted.protocols.basic) holds bytes
  received but not yet delivered, during ``lineReceived`` and after ``requestDone``;
- the private class attribute ``HTTPChannel._log``, the logger of its idle-timeout close
  ("Timing out client"), replaced by a silent one;
- ``announcedLength()``: the undocumented ``HTTPChannel.length`` in ``allHeadersReceived``: the
  body's ``Content-Length`` (0 without one), None for a chunked body;
- ``arrivingRequest()``: the undocumented ``HTTPChannel.requests[-1]``, the request whose head
  is being read (its ``requestHeaders`` complete in ``allHeadersReceived``);
- ``keepsAlive()``: the undocumented ``HTTPChannel.persistent`` after ``requestDone``: whether
  the connection stays open for a next request;
- ``closeAfterAnswer()``: sets that ``persistent`` to False after ``allHeadersReceived`` (where
  Twisted decides it from the request), so that ``requestDone`` closes the connection;
- ``idle()``: no request under way (the undocumented ``HTTPChannel.requests``, which holds each
  request from its first line to its ``requestDone``) and no byte of one in ``_buffer``;
- ``holdInput()``, ``releaseInput()``, ``holdingInput()``: ``LineReceiver.paused``, the flag
  of its pausable mixin, which ``HTTPChannel`` (whose own ``pauseProducing`` is the
  transport's flow control) never sets: while it is set, ``LineReceiver.dataReceived``
  delivers no line, keeping what it was given in ``_buffer``, also the pipelined input
  ``HTTPChannel.requestDone`` hands back, and, within ``lineReceived``, the lines after the
  current one; ``dataReceived(b"")`` delivers them once it is unset.

A subclass's own attributes share ``HTTPChannel``'s namespace: the test checks that none of
the guard's is also a name ``HTTPChannel`` uses.

``ReuseAwarePool``, an ``HTTPConnectionPool`` (twisted.web.client) whose ``getConnection``
also says whether the connection is new, and whose ``dial`` makes one past the pool: the pool
calls its private ``_newConnection(key, endpoint)`` at once, from ``getConnection``, exactly
when no pooled connection for ``key`` is usable; it connects ``endpoint`` with a factory that
returns the connection to the pool once idle.

The Agent's client side, for ``pool``: ``HTTP11ClientProtocol``, ``Request`` (here
``ClientRequest``, not to be confused with the server's) and
``RequestNotSent`` live in the private ``twisted.web._newclient`` (``twisted.web.client``
imports them but does not export them). The pool hands ``Agent`` a connection whose
``request(Request)`` fails with ``RequestNotSent`` when nothing of the request was written
(the connection already closed), and with ``ResponseNeverReceived`` when it was written and
the connection closed before an answer byte; ``Request`` keeps ``method``, ``headers`` and
``bodyProducer``.  ``pool_key_host(key)``: ``Agent`` asks the pool for a connection with the key
``(scheme, host, port)``, undocumented.

``fips_enabled()``: cryptography has no public way to ask whether its OpenSSL is in FIPS
mode; its backend's private ``_fips_enabled`` says it (what ``fips`` refuses to start
without).  Not Twisted's, but kept here so that private library code has one place.

``reactor_handles(reactor, signum)``: once running, a reactor that installs signal handlers
(``_WithSignalHandling``, twisted.internet._signals) has made its own bound methods ``sigTerm``
and ``sigInt`` the handlers of SIGTERM and SIGINT (SIGINT only where Python's default was in
place), each of which calls ``reactor.stop`` (which raises once the reactor is stopping).

``replace_clock(reactor, seconds)``: ``ReactorBase`` (twisted.internet.base) reads the time
through ``self.seconds()`` to schedule (``callLater``), to run (``runUntilCurrent``) and to
sleep (``timeout``), and each ``DelayedCall`` keeps the ``seconds`` it was created with; so
an attribute set on the reactor instance is its clock for every call scheduled after.
"""

from __future__ import annotations

import signal
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogPublisher
# For pool (re-exported):
from twisted.web._newclient import HTTP11ClientProtocol, RequestNotSent  # noqa: F401
from twisted.web._newclient import Request as ClientRequest  # noqa: F401
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import HTTPChannel, Request


class HookedHTTPChannel(HTTPChannel):
    """An ``HTTPChannel`` whose private hooks have public names (see the module's doc)."""

    # A fleet keeping connections alive would log an idle close per container per minute.
    _log = Logger(observer=LogPublisher())

    def badRequest(self) -> None:
        """Twisted found the request malformed: answer 400 and close (Twisted's answer)."""
        HTTPChannel._respondToBadRequestAndDisconnect(self)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.badRequest()

    def unreadInput(self) -> bool:
        """Whether bytes of a next line or request are received and not yet handled."""
        return bool(self._buffer)

    def holdInput(self) -> None:
        """Parse nothing more, received or pipelined, until ``releaseInput``."""
        self.paused = True

    def holdingInput(self) -> bool:
        return self.paused

    def releaseInput(self) -> None:
        """Parse what was held, now (``dataReceived(b"")`` only when there is some)."""
        self.paused = False
        if self._buffer:
            self.dataReceived(b"")

    def announcedLength(self) -> int | None:
        """In ``allHeadersReceived``: the body's length (0: none), None when chunked."""
        return self.length

    def arrivingRequest(self) -> Request:
        """The request whose head is being read."""
        return self.requests[-1]

    def keepsAlive(self) -> bool:
        """After ``requestDone``: whether the connection stays open for a next request."""
        return bool(self.persistent)

    def closeAfterAnswer(self) -> None:
        """Once the request under way is answered, the connection closes."""
        self.persistent = False

    def idle(self) -> bool:
        """Whether the connection waits for a next request, none of it received."""
        return not self.requests and not self._buffer


class ReuseAwarePool(HTTPConnectionPool):
    """An ``HTTPConnectionPool`` that tells a new connection from a pooled one."""

    _dialled = False

    def newOrPooled(self, key, endpoint) -> tuple[Deferred, bool]:
        """``HTTPConnectionPool.getConnection``'s connection, and whether it is a new one."""
        self._dialled = False
        connection = HTTPConnectionPool.getConnection(self, key, endpoint)
        return connection, self._dialled

    def dial(self, key, endpoint) -> Deferred:
        """A new connection for ``key``, never a pooled one; pooled once idle."""
        return super()._newConnection(key, endpoint)

    def _newConnection(self, key, endpoint) -> Deferred:
        self._dialled = True
        return super()._newConnection(key, endpoint)


def reactor_handles(reactor, signum: int) -> bool:
    """Whether ``signum``'s handler is the reactor's own (one that stops it)."""
    return getattr(signal.getsignal(signum), "__self__", None) is reactor


def replace_clock(reactor, seconds: Callable[[], float]) -> None:
    """Make ``seconds`` the clock of ``reactor``'s timers scheduled from now on."""
    reactor.seconds = seconds


def pool_key_host(key: tuple) -> bytes:
    """The host in the key ``Agent`` gives ``HTTPConnectionPool.getConnection``."""
    _scheme, host, _port = key
    return host


def fips_enabled() -> bool:
    """Whether the OpenSSL cryptography links fetches every algorithm from its FIPS provider."""
    from cryptography.hazmat.backends.openssl.backend import backend

    return bool(backend._fips_enabled)

"""
The guards: what every client connection is allowed, on both listeners, before a request
reaches the relay or the status pages.

twisted.web alone trusts its clients: no limit on a request body (it spills to a temp file),
an idle timeout that every byte resets (so a head sent byte by byte never times out), and 400
for a head that is too large.  ``GuardedSite`` is a ``Site`` whose channel answers, and then
closes the connection:

- 413 when a body goes over ``max_body_size``: at once from its Content-Length, before the
  body is read, or as soon as a chunked body grows past it;
- 431 when the head has more than ``MAX_HEADERS`` header lines or more than ``MAX_HEAD_SIZE``
  bytes (414 when the request line alone is that long), 400 when it is malformed;
- 400 as well for what Twisted lets through: ``Transfer-Encoding`` over several lines that,
  joined as RFC 9112 requires, is not exactly ``chunked`` (Twisted reads each line alone, so
  ``chunked`` then ``identity`` was chunked to it and not to a front end that joins them),
  a second ``Host``, an HTTP/1.1 request without one, a control byte in a header value
  (Twisted refuses only NUL, CR, LF), a header line folded onto the one before (obs-fold,
  which Twisted unfolds: ``Transfer-Encoding:`` then `` chunked`` was chunked), and the
  asterisk-form target (``OPTIONS *``, which Twisted answers 200 itself);
- 408 when a request, head and body, is not complete ``header_timeout`` after its first byte
  (more bytes do not move that deadline; the stray line end a client may send after a body
  is not a first byte).  Licensing bodies are a few kilobytes, so a slow
  POST is the same attack as a slow head.

A refused request never reaches the resource.  Between requests the idle timeout still
applies: it also closes a connection that never sends a byte, or never starts TLS.
``ConnectionLimits`` wraps a listener's outermost factory and closes, before any TLS or HTTP
work, a connection over the listener's total or per-peer limit.

One request of a connection is answered at a time (Twisted's own rule: HTTP/1.1 answers go
in order), and the next one is not read while the client leaves its answers unread: when a
request is done while the transport says its buffer is full (``pauseProducing``), what
follows, pipelined requests included, is held unparsed and the transport paused until it
drains (``resumeProducing``).  So a client that pipelines a thousand requests and reads
nothing costs the answers the socket buffers take and one more, not a thousand exchanges
with the license server.  Answers carry no ``Server`` version banner (a relayed answer keeps
the license server's own).  While the site is ``draining`` (a stop, ``service``), every answer
closes its connection, and ``closeIfIdle`` closes a kept-alive one between requests.

The channel overrides ``HTTPChannel``'s methods ``dataReceived``, ``lineReceived``,
``allHeadersReceived``, ``allContentReceived``, ``rawDataReceived``, ``requestDone``,
``lineLengthExceeded``, ``pauseProducing`` and ``resumeProducing``; ``allHeadersReceived`` is
where the whole head is known (as ``requestHeaders`` of the request arriving) and the body
not yet read: the head's rules are checked there.  Twisted's own 400s, its unread input, the
announced length, the arriving request and whether the connection is kept alive are reached
through ``twistedseams``, the one module that touches Twisted's privates.
"""

from __future__ import annotations

import re

from prometheus_client import Counter
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import Request, Site

from .config import Config
from .twistedseams import HookedHTTPChannel

MAX_HEADERS = 100
"""Header lines in one request (nginx and Apache allow 100)."""

MAX_HEAD_SIZE = 16384
"""Bytes in one request head, request line and line ends included (Twisted's own total)."""

WARNING_INTERVAL = 10.0
"""Seconds between two warnings about refused connections for the same reason."""

BAD_REQUEST = 400
REQUEST_TIMEOUT = 408
CONTENT_TOO_LARGE = 413
URI_TOO_LONG = 414
HEADERS_TOO_LARGE = 431
REJECTIONS = (BAD_REQUEST, REQUEST_TIMEOUT, CONTENT_TOO_LARGE, URI_TOO_LONG, HEADERS_TOO_LARGE)

# A byte no header value may hold: controls other than HTAB, and DEL (RFC 9110 5.5).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

_PHRASES = {
    BAD_REQUEST: b"Bad Request",
    REQUEST_TIMEOUT: b"Request Timeout",
    CONTENT_TOO_LARGE: b"Content Too Large",
    URI_TOO_LONG: b"URI Too Long",
    HEADERS_TOO_LARGE: b"Request Header Fields Too Large",
}


class QuietSite(Site):
    """A ``Site`` without the access log: the relay (and the demo server) log
    each request themselves, without query strings, which may carry secrets."""

    noisy = False

    def log(self, request) -> None:
        pass


class _GuardedRequest(Request):
    """A request that asks its channel before taking each piece of its body."""

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel.admitBody(len(data)):
            super().handleContentChunk(data)

    def render(self, resource) -> None:
        # Twisted has just set "Server: TwistedWeb/<version>": a banner for scanners.
        self.responseHeaders.removeHeader(b"server")
        if self.channel.site.draining:  # and the channel closes once it is written
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        super().render(resource)


class _GuardedChannel(HookedHTTPChannel):
    """An ``HTTPChannel`` that refuses what ``GuardedSite`` does not allow."""

    MAX_LENGTH = MAX_HEAD_SIZE  # a longer line can't be part of an allowed head

    _headLines = 0  # lines of the head so far: the request line, then headers
    _headBytes = 0
    _bodyBytes = 0
    _deadline: IDelayedCall | None = None  # while a request is arriving
    _answering = False  # a complete request is with the resource
    _refused = False  # an answer was sent; the rest of the input is ignored
    _hostRequired = False  # the request arriving is HTTP/1.1
    _transportFull = False  # the client is not reading its answers: read no next request
    _answeredOne = False  # a kept-alive connection, once idle again

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        self._startDeadline()
        super().dataReceived(data)

    def pauseProducing(self) -> None:
        self._transportFull = True
        super().pauseProducing()

    def resumeProducing(self) -> None:
        """The client has read: the requests it sent meanwhile are read now, in order."""
        self._transportFull = False
        super().resumeProducing()  # reading again, unless a request is being answered
        if self.holdingInput():
            self.releaseInput()

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if line or self._headLines:  # not the stray line end some clients send first
            self._headBytes += len(line) + 2
            if line:
                self._headLines += 1
            if self._headBytes > MAX_HEAD_SIZE:
                self._refuse(URI_TOO_LONG if self._headLines == 1 else HEADERS_TOO_LARGE)
                return
            if self._headLines > MAX_HEADERS + 1:
                self._refuse(HEADERS_TOO_LARGE)
                return
            if line and self._headLines == 1 and not self._startLine(line):
                self._refuse(BAD_REQUEST)  # the asterisk-form
                return
            if line[:1] in (b" ", b"\t"):
                self._refuse(BAD_REQUEST)  # folded onto the line before (obs-fold), or indented
                return
        else:
            # Not the start of a request, so not of its deadline: on a kept-alive
            # connection the idle timeout covers the wait (a 408 there would be
            # read as the answer to the client's next request).
            self._cancelDeadline()
            if self.unreadInput():
                self._startDeadline()
        super().lineReceived(line)

    def _startLine(self, line: bytes) -> bool:
        """Notes the request line's version; False for the asterisk-form target."""
        parts = line.split()
        self._hostRequired = parts[2:] == [b"HTTP/1.1"]
        return parts[1:2] != [b"*"]

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(URI_TOO_LONG if self._headLines == 0 else HEADERS_TOO_LARGE)

    def allHeadersReceived(self) -> None:
        self._headLines = self._headBytes = self._bodyBytes = 0
        if not _wellFormed(self.arrivingRequest().requestHeaders, self._hostRequired):
            self._refuse(BAD_REQUEST)
            return
        length = self.announcedLength()
        if length is not None and length > self.site.config.max_body_size:
            self._refuse(CONTENT_TOO_LARGE)
            return
        super().allHeadersReceived()

    def admitBody(self, size: int) -> bool:
        """Whether ``size`` more bytes of body are allowed (if not, the answer is 413)."""
        if self._refused:
            return False
        self._bodyBytes += size
        if self._bodyBytes > self.site.config.max_body_size:
            self._refuse(CONTENT_TOO_LARGE)
            return False
        return True

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self._refused:  # the end of a body that was already answered with 413
            return
        self._cancelDeadline()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request) -> None:
        self._answering = False  # before Twisted replays the next request's bytes
        self._answeredOne = True
        if self.site.draining:  # also an answer to a request taken before the drain
            self.closeAfterAnswer()
        if self._transportFull:  # the client reads none of its answers: read on later
            self.holdInput()
            IPushProducer(self.transport).pauseProducing()
        super().requestDone(request)
        # The start of the next request may have come in the same read as the end of this
        # one (a request without a body answered at once): it is already in the line buffer,
        # and no dataReceived call will start its deadline.
        if self.unreadInput() and self.keepsAlive():
            self._startDeadline()

    def closeIfIdle(self) -> None:
        """Close now if kept alive and waiting for a next request; else leave it be (one just
        opened is about to send its first)."""
        if self._answeredOne and self.idle():
            self.loseConnection()

    def badRequest(self) -> None:
        self._refuse(BAD_REQUEST)

    def _startDeadline(self) -> None:
        """The request now arriving must be complete ``header_timeout`` from now."""
        if self._deadline is None and not (self._answering or self._refused or self.holdingInput()):
            self._deadline = self.callLater(self.site.config.header_timeout, self._tooSlow)

    def _tooSlow(self) -> None:
        self._deadline = None
        self._refuse(REQUEST_TIMEOUT)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, code: int) -> None:
        """Answer ``code`` and close, ignoring whatever else arrives."""
        if self._refused:
            return
        self._refused = True
        self._cancelDeadline()
        self.site.rejected.labels(str(code)).inc()
        body = _REASONS[code](self.site.config).encode("ascii") + b"\n"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (code, _PHRASES[code], len(body), body)
        )
        self.loseConnection()

    def connectionLost(self, reason) -> None:
        self._cancelDeadline()
        super().connectionLost(reason)


def _wellFormed(headers, hostRequired: bool) -> bool:
    """The head's rules Twisted does not check, line by line as it reads."""
    codings = b",".join(headers.getRawHeaders(b"transfer-encoding", []))
    if codings and [c.strip().lower() for c in codings.split(b",")] != [b"chunked"]:
        return False
    hosts = len(headers.getRawHeaders(b"host", []))
    if hosts > 1 or hostRequired and not hosts:  # HTTP/1.0 may send none
        return False
    return not any(
        _CONTROL.search(value) for _, values in headers.getAllRawHeaders() for value in values
    )


_REASONS = {
    BAD_REQUEST: lambda config: "malformed request",
    REQUEST_TIMEOUT: lambda config: (
        f"request not complete {config.header_timeout:g} s after its first byte"
    ),
    CONTENT_TOO_LARGE: lambda config: f"request body over {config.max_body_size} bytes",
    URI_TOO_LONG: lambda config: f"request line over {MAX_HEAD_SIZE} bytes",
    HEADERS_TOO_LARGE: lambda config: (
        f"request head over {MAX_HEAD_SIZE} bytes or {MAX_HEADERS} header lines"
    ),
}


class GuardedSite(QuietSite):
    """
    A ``QuietSite`` whose connections follow ``config``'s limits; ``rejected``
    counts the requests it answers itself, by status code.
    """

    protocol = _GuardedChannel

    def __init__(
        self, resource, config: Config, reactor: IReactorTime, rejected: Counter, **kwargs
    ) -> None:
        super().__init__(
            resource,
            requestFactory=_GuardedRequest,
            timeout=config.idle_timeout,
            reactor=reactor,
            **kwargs,
        )
        self.config = config
        self.rejected = rejected
        #: Stopping: each answer closes its connection (``Connection: close``), so that the
        #: client's next one goes to another instance (``service``'s drain).
        self.draining = False


LIMIT_KEYS = {"total": "max_connections", "per_peer": "max_connections_per_peer"}
"""The ``reason`` label of a refused connection, and the config key of its limit."""


class ConnectionLimits(WrappingFactory):
    """
    Closes a new connection at once when the listener already has
    ``max_connections``, or its peer address ``max_connections_per_peer``; counts
    each in ``refused`` and warns at most every ``WARNING_INTERVAL`` seconds per
    reason.  Outermost on a listener, so a refused connection costs no TLS.
    """

    noisy = False
    log = Logger()

    def __init__(
        self, wrapped, config: Config, timers: IReactorTime, refused: Counter, listener: str
    ) -> None:
        super().__init__(wrapped)
        self._limits = {reason: getattr(config, key) for reason, key in LIMIT_KEYS.items()}
        self._timers = timers
        self._refused = refused
        self._listener = listener
        self._peers: dict[object, str] = {}  # protocol -> peer host
        self._perPeer: dict[str, int] = {}
        self._warned: dict[str, float] = {}
        self._unwarned: dict[str, int] = {}

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        if len(self.protocols) >= self._limits["total"]:
            return self._refuse("total", host)
        if self._perPeer.get(host, 0) >= self._limits["per_peer"]:
            return self._refuse("per_peer", host)
        protocol = super().buildProtocol(addr)
        self._peers[protocol] = host
        self._perPeer[host] = self._perPeer.get(host, 0) + 1
        return protocol

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        host = self._peers.pop(p)
        self._perPeer[host] -= 1
        if not self._perPeer[host]:
            del self._perPeer[host]

    def _refuse(self, reason: str, host: str) -> None:
        self._refused.labels(reason).inc()
        now = self._timers.seconds()
        self._unwarned[reason] = self._unwarned.get(reason, 0) + 1
        if now - self._warned.get(reason, -WARNING_INTERVAL) < WARNING_INTERVAL:
            return None
        self.log.warn(
            "{listener} listener: refused {count} connection(s) over [server] {key} = {limit}"
            " since the last warning, the latest from {peer}",
            listener=self._listener,
            count=self._unwarned.pop(reason),
            key=LIMIT_KEYS[reason],
            limit=self._limits[reason],
            peer=host,
        )
        self._warned[reason] = now
        return None

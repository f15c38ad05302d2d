"""The HTTP side facing clients: a lean Request and Site around the Forwarder.  Tests: tests/test_forward.py

`ForwardRequest` enforces MAX_BODY_SIZE while the body arrives (413 before it is buffered) and hands every
complete request straight to the Forwarder, skipping twisted.web's resource traversal and form parsing,
which a forwarding proxy never needs.

`ForwardChannel` is twisted.web's HTTP/1.1 parser made strict where a lenient parser lets requests be smuggled
past a front proxy (obs-fold, any Transfer-Encoding but a lone `chunked`, Transfer-Encoding on HTTP/1.0), and
guarded against slow clients: a connection idle for CONNECTION_IDLE_SECONDS is closed, and a request head not
complete HEADER_TIMEOUT_SECONDS after its first byte gets a 408 and the connection closed, however the bytes
trickle in.  While a request is being answered twisted.web suspends the idle timeout, so running streams are
never cut by either.  Tests: tests/test_faults.py
"""

from __future__ import annotations

import weakref

from twisted.python import failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Request, Site

from fwd import access, errors
from fwd.forward import Forwarder, log, log_access, send_error


class ForwardRequest(Request):
    """A request whose body is bounded and whose processing is the Forwarder's."""

    defaultContentType = None
    rejected = False
    received = 0
    exchange = None

    def gotLength(self, length):
        limit = self.channel.site.max_body_size
        if length is not None and length > limit:
            self.reject_body()
        super().gotLength(length if not self.rejected else 0)

    def handleContentChunk(self, data):
        if self.rejected:
            return
        self.received += len(data)
        if self.received > self.channel.site.max_body_size:
            self.reject_body()
            return
        self.content.write(data)

    def reject_body(self) -> None:
        """Answer 413 now and close, without reading (or storing) the rest of the body."""
        self.rejected = True
        site = self.channel.site
        error = errors.body_too_large(site.max_body_size)
        channel = self.channel
        if isinstance(channel, HTTPChannel):
            self.method = channel._command
            self.path = channel._path.split(b"?", 1)[0]
            body = error.body()
            channel.transport.write(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            channel.transport.pauseProducing()
            channel.transport.loseConnection()
            now = site.forwarder.clock.seconds()
            self.code = 413
            self.sentLength = len(body)
            site.log(self, started=now)
        # HTTP/2: twisted.web drops the whole connection if a stream is answered while its DATA frames still
        # arrive, so the 413 goes out when the stream ends; until then its body is discarded, never kept.

    def requestReceived(self, command, path, version):
        if not self.rejected:
            return super().requestReceived(command, path, version)
        if not isinstance(self.channel, HTTPChannel):
            self.method, self.uri = command, path
            self.path = path.split(b"?", 1)[0]
            send_error(self, errors.body_too_large(self.channel.site.max_body_size))

    def process(self):
        if self.rejected:
            return
        self.site = site = self.channel.site
        self.started = site.forwarder.clock.seconds()
        try:
            site.forwarder.handle(self)
        except Exception:
            log.failure("request handling failed", failure.Failure())
            send_error(self, errors.ProxyError(500, "The proxy failed; see its log.", type="server_error"))


# A connection with no request running and no byte received for this long is closed (twisted.web's own
# default is 12 hours).  Above the keep-alive expiry of common clients, like nginx's keepalive_timeout.
CONNECTION_IDLE_SECONDS = 75
# A request head (request line and headers) must be complete this long after its first byte arrived.
HEADER_TIMEOUT_SECONDS = 20


def _raw_error(status: bytes, error: errors.ProxyError) -> bytes:
    """A whole OpenAI-shaped error response that closes the connection, for errors before a Request exists."""
    body = error.body()
    return (
        b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (status, len(body), body)
    )


BAD_REQUEST = _raw_error(
    b"400 Bad Request",
    errors.ProxyError(400, "Malformed HTTP request: the proxy could not frame it.", code="bad_http_request"),
)
HEAD_TIMEOUT = _raw_error(
    b"408 Request Timeout",
    errors.ProxyError(
        408, f"The request headers did not arrive within {HEADER_TIMEOUT_SECONDS} s.", code="request_timeout"
    ),
)


_CONTROL = bytes(c for c in range(32) if c != 9) + b"\x7f"


class ForwardChannel(HTTPChannel):
    """twisted.web's HTTP/1.1 channel, strict about message framing and with a deadline for request heads."""

    header_timeout: float = HEADER_TIMEOUT_SECONDS
    _head_deadline = None

    def dataReceived(self, data):
        if self._head_deadline is None and data and self.line_mode and not self._handlingRequest:
            self._head_deadline = self.callLater(self.header_timeout, self._head_timed_out)
        super().dataReceived(data)

    def lineReceived(self, line):
        if line[:1] in (b" ", b"\t") and not self._HTTPChannel__first_line:
            # obs-fold: a header continued on the next line; RFC 9112 5.2 lets a server reject it, and a
            # proxy must, as the hop in front of it may have read the headers differently.
            return self._respondToBadRequestAndDisconnect()
        super().lineReceived(line)

    def headerReceived(self, line):
        name, _, value = line.partition(b":")
        if name.lower() == b"transfer-encoding" and (
            value.strip(b" \t").lower() != b"chunked" or self._version != b"HTTP/1.1"
        ):
            # Only a lone `chunked` on HTTP/1.1 frames a body the same way for every hop (RFC 9112 6.1).
            self._respondToBadRequestAndDisconnect()
            return False
        if len(value.translate(None, _CONTROL)) != len(value):
            # Control characters are not field content (RFC 9110 5.5); forwarded, they trip up upstreams.
            self._respondToBadRequestAndDisconnect()
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self):
        self._cancel_head_deadline()
        super().allHeadersReceived()

    def requestDone(self, request):
        super().requestDone(request)
        if (
            self.persistent and self._buffer and self.line_mode and not self._handlingRequest
            and self._head_deadline is None and self.transport is not None
        ):
            # The next request's head was pipelined behind this one and is still incomplete.
            self._head_deadline = self.callLater(self.header_timeout, self._head_timed_out)

    def _head_timed_out(self):
        self._head_deadline = None
        if self._handlingRequest or not self.line_mode:
            return
        self.transport.write(HEAD_TIMEOUT)
        self.timeoutConnection()

    def _cancel_head_deadline(self):
        if self._head_deadline is not None:
            if self._head_deadline.active():
                self._head_deadline.cancel()
            self._head_deadline = None

    def _respondToBadRequestAndDisconnect(self):
        self._cancel_head_deadline()
        self.transport.write(BAD_REQUEST)
        self.loseConnection()

    def connectionLost(self, reason):
        self._cancel_head_deadline()
        super().connectionLost(reason)


class ForwardSite(Site):
    """The client-facing HTTP factory: every request goes to one Forwarder."""

    requestFactory = ForwardRequest
    displayTracebacks = False

    def protocol(self):
        return _GenericHTTPChannelProtocol(ForwardChannel())

    def __init__(self, forwarder: Forwarder, **kwargs):
        # Connection timeouts run on the forwarder's clock: the reactor in the daemon, a Clock in tests.
        kwargs.setdefault("timeout", CONNECTION_IDLE_SECONDS)
        kwargs.setdefault("reactor", forwarder.clock)
        super().__init__(None, parsePOSTFormSubmission=False, **kwargs)
        self.forwarder = forwarder
        self.max_body_size = forwarder.config.max_body_size
        self.connections: weakref.WeakSet = weakref.WeakSet()

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.connections.add(protocol)
        return protocol

    def open_connections(self) -> list:
        """Client connections still open, for a graceful shutdown."""
        transports = (getattr(p._channel, "transport", None) for p in self.connections)
        # Socket transports say `connected`; in-memory test transports only `disconnected`.
        return [t for t in transports if t is not None and getattr(t, "connected", not getattr(t, "disconnected", True))]

    def log(self, request, started: float | None = None):
        """Access-log requests the proxy answered itself; forwarded ones are logged when their exchange ends."""
        if request.exchange is not None:
            return
        forwarder = self.forwarder
        now = forwarder.clock.seconds()
        peer = getattr(request.getClientAddress(), "host", "unix")
        trusted = forwarder.config.trusted_proxies
        client = access.client_ip(peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for"), trusted) if trusted else peer
        log_access(
            request,
            client=client,
            status=request.code,
            sent=request.sentLength,
            started=getattr(request, "started", now) if started is None else started,
            now=now,
            caller="-",
            route="-",
        )
"""The HTTP side facing clients: a lean Request and Site around the Forwarder.  Tests: tests/test_forward.py

`ForwardRequest` enforces MAX_BODY_SIZE while the body arrives (413 before it is buffered) and hands every
complete request straight to the Forwarder, skipping twisted.web's resource traversal and form parsing,
which a forwarding proxy never needs.
"""

from __future__ import annotations

import weakref

from twisted.python import failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from fwd import errors
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
        error = errors.body_too_large(self.channel.site.max_body_size)
        channel = self.channel
        if isinstance(channel, HTTPChannel):
            body = error.body()
            channel.transport.write(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            channel.transport.pauseProducing()
            channel.transport.loseConnection()
        else:
            send_error(self, error)

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


class ForwardSite(Site):
    """The client-facing HTTP factory: every request goes to one Forwarder."""

    requestFactory = ForwardRequest
    displayTracebacks = False

    def __init__(self, forwarder: Forwarder, **kwargs):
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
        return [t for t in transports if t is not None and t.connected]

    def log(self, request):
        """Access-log requests the proxy answered itself; forwarded ones are logged when their exchange ends."""
        if request.exchange is not None:
            return
        now = self.forwarder.clock.seconds()
        log_access(
            request,
            client=getattr(request.getClientAddress(), "host", "unix"),
            status=request.code,
            sent=request.sentLength,
            started=getattr(request, "started", now),
            now=now,
            caller="-",
            route="-",
        )

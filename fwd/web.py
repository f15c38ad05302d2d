"""The HTTP side facing clients: a lean Request and Site around the Forwarder.  Tests: tests/test_forward.py

`ForwardRequest` enforces MAX_BODY_SIZE while the body arrives (413 before it is buffered) and hands every
complete request straight to the Forwarder, skipping twisted.web's resource traversal and form parsing,
which a forwarding proxy never needs.
"""

from __future__ import annotations

from twisted.python import failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from fwd import errors
from fwd.forward import Forwarder, log, send_error


class ForwardRequest(Request):
    """A request whose body is bounded and whose processing is the Forwarder's."""

    defaultContentType = None
    rejected = False
    received = 0

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

    def log(self, request):
        """Access logging happens once per exchange in the Forwarder, with secrets masked."""

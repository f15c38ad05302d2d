"""What the daemon's Site adds around the Resource tree: a request's head judged before its body is read,
bodies bounded and spooled, strict HTTP/1.1 framing, and a deadline for every byte.  Tests: tests/test_site.py

`ForwardRequest` finds the request's resource as soon as its head has arrived (route, path, IP lists and
credentials are judged then, by the resource's `judge_head`): a refused request gets its JSON answer and its
body is never stored.  An admitted body goes into a RequestBody (memory, then one temporary file), must keep
moving (BODY_TIMEOUT seconds of silence at most) and may not pass MAX_BODY_SIZE (413).

`ForwardChannel` is twisted.web's HTTP/1.1 parser made strict where a lenient parser lets requests be smuggled
past a front proxy (obs-fold, any Transfer-Encoding but a lone `chunked`, Transfer-Encoding on HTTP/1.0,
control characters), and guarded against slow clients: a connection idle for CONNECTION_IDLE_SECONDS is closed,
and a request head not complete HEADER_TIMEOUT_SECONDS after its first byte gets a 408.  While a request is
being answered twisted.web suspends the idle timeout, so running streams are never cut by either.
"""

from __future__ import annotations

import re
import weakref
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from fwd import answers, errors, http2, private
from fwd.body import RequestBody

log = Logger(namespace="fwd.site")

# A connection with no request running and no byte received for this long is closed (twisted.web's own
# default is 12 hours).  Above the keep-alive expiry of common clients, like nginx's keepalive_timeout.
CONNECTION_IDLE_SECONDS = 75
# A request head (request line and headers) must be complete this long after its first byte arrived.
HEADER_TIMEOUT_SECONDS = 20

_CONTROL = bytes(c for c in range(32) if c != 9) + b"\x7f"
# RFC 9110 5.6.2: a method is a token.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# What an upstream agent accepts in a target: printable ASCII, no space.
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")


def bad_head(method: bytes | None, target: bytes | None) -> errors.ProxyError | None:
    """Why a request line cannot be served, or None: a method that is not a token, a target with bytes an
    HTTP target may not hold, or a target that is not a path (absolute-form, authority-form, `*`)."""
    if not method or not _METHOD.match(method):
        return errors.bad_request("The request method is not a valid HTTP token.")
    if not target or not _TARGET.match(target):
        return errors.bad_request("The request target has bytes an HTTP target may not hold; percent-encode them.")
    if target[:1] != b"/":
        return errors.not_found("a target that is not a path")
    return None


class ForwardRequest(Request):
    """A request judged by its resource when its head arrives; its body bounded, spooled and timed."""

    defaultContentType = None
    refusal: errors.ProxyError | None = None
    answered_early = False
    head_resource = None
    admission = None
    limited = None  # why the limits refused it (fwd.limits.Refusal.reason), for the access event
    received = 0
    forwarded = False  # an Exchange (fwd.exchange) took it: it owns its body and logs it
    gone = False

    def gotLength(self, length):
        """The head is complete: find the resource, let it judge the head, and decide where the body goes."""
        site = self.channel.site
        self.started = site.clock.seconds()
        head = http2.request_line(self.channel)
        method, target, version = head if head is not None else (None, None, None)
        refusal = bad_head(method, target)
        if refusal is None:
            self.method, self.uri, self.clientproto = method, target, version
            self.path = target.split(b"?", 1)[0]
            self.prepath = []
            segments = self.path[1:].split(b"/")
            self.postpath = [unquote_to_bytes(s) for s in segments] if b"%" in self.path else segments
            resource = site.getResourceFor(self)
            self.head_resource = resource
            judge = getattr(resource, "judge_head", None)
            if judge is not None:
                refusal = judge(self)
        if refusal is None and length is not None and length > site.max_body_size:
            refusal = errors.body_too_large(site.max_body_size)
        self.content = None
        if refusal is not None:
            self.refuse(refusal, body_follows=length != 0)
            return
        self.content = RequestBody()
        if length != 0 and isinstance(self.channel, ForwardChannel):
            # The body must keep moving: the connection's idle timeout, which every byte resets, becomes
            # BODY_TIMEOUT until the body is complete.  Over HTTP/2 the connection keeps a deadline per stream.
            self.channel.expect_body(site.body_timeout)

    def handleContentChunk(self, data):
        content = self.content
        if content is None:
            return  # refused: the body is discarded as it arrives, never kept
        self.received += len(data)
        site = self.channel.site
        if self.received > site.max_body_size:
            content.close()
            self.content = None
            self.refuse(errors.body_too_large(site.max_body_size), body_follows=True)
            return
        content.write(data)

    def body_stalled(self):
        """The body stopped moving: answer 408 and close the connection."""
        if self.content is not None:
            self.content.close()
            self.content = None
        self.refuse(errors.body_timeout(self.channel.site.body_timeout), body_follows=True)

    def refuse(self, error: errors.ProxyError, body_follows: bool) -> None:
        """Answer `error` without reading the body.  Over HTTP/1.1 a body still on its way is not worth
        reading: the answer goes out at once and the connection closes.  Over HTTP/2 the stream is answered as
        soon as its connection knows it, and the connection discards its late DATA and resets it (fwd.http2)."""
        if self.refusal is not None:
            return
        self.refusal = error
        # No "100 Continue" for a request refused before its body: twisted.web would send one after the head.
        self.requestHeaders.removeHeader(b"expect")
        if not body_follows:
            return  # answered when the (empty) request is processed
        channel = self.channel
        site = channel.site
        if isinstance(channel, HTTPChannel):
            self.method = self.method or b"-"
            answers.write_raw_error(channel.transport, error)
            self.answered_early = True
            channel.transport.pauseProducing()
            channel.transport.loseConnection()
            self.code = error.status
            self.sentLength = len(error.body())
            site.log(self)
        else:
            site.clock.callLater(0, self._answer_stream, error)

    def _answer_stream(self, error: errors.ProxyError) -> None:
        """Answer an HTTP/2 stream refused mid-body; the rest of its body, and its end, change nothing."""
        self.answered_early = True
        answers.send_error(self, error)

    def requestReceived(self, command, path, version):
        if self.answered_early:
            return  # answered already: the connection is closing, or (HTTP/2) the stream was answered
        if self.content is None:
            self.content = RequestBody()
        super().requestReceived(command, path, version)

    def process(self):
        self.site = self.channel.site
        if self.refusal is not None:
            return answers.send_error(self, self.refusal)
        try:
            self.render(self.head_resource)
        except Exception:
            # Never the exception's text: it may quote the target or a header, and so a key.
            log.error("a request failed in {resource}", resource=type(self.head_resource).__name__)
            answers.send_error(self, errors.internal())

    def connectionLost(self, reason):
        self.gone = True
        super().connectionLost(reason)
        if self.content is not None and not self.forwarded:
            self.content.close()


class ForwardChannel(private.BadRequestHook, HTTPChannel):
    """twisted.web's HTTP/1.1 channel, strict about message framing and with a deadline for request heads."""

    head_line: tuple[bytes, bytes, bytes] | None = None
    head_lines: bytes | None = None
    _head_deadline = None
    _in_head = False
    _busy = False
    _idle_timeout = None
    _body_timeout = None  # a body is expected: its timeout, until armed at the end of the read that began it

    def dataReceived(self, data):
        # The head deadline runs from the first byte of a head, whatever those bytes are (lines need not end).
        if self._head_deadline is None and data and self.line_mode and not self._busy:
            self._start_head_deadline()
        super().dataReceived(data)
        # The body timeout is armed once the bytes at hand are parsed: a body that came with its head, the usual
        # case, never needs one (a timer made and cancelled, and the idle one put back, each request).
        if self._body_timeout is not None and self.transport is not None and not self.transport.disconnecting:
            self._arm_body_timeout()

    def lineReceived(self, line):
        if not self._in_head:
            if line:
                self._in_head = True
                if self._head_deadline is None:
                    self._start_head_deadline()  # a head behind a request answered in this same read
                parts = line.split(b" ")
                self.head_line = (parts[0], parts[1], parts[2]) if len(parts) == 3 else None
        elif line[:1] in (b" ", b"\t"):
            # obs-fold: a header continued on the next line; RFC 9112 5.2 lets a server reject it, and a
            # proxy must, as the hop in front of it may have read the headers differently.
            return self.bad_request()
        super().lineReceived(line)

    def writeHeaders(self, version, code, reason, headers):
        """The response head in one write of one bytes: twisted.web's own hands the transport a sequence that it
        checks piece by piece, four pieces a header.  `head_lines`, when set, are header lines the proxy made
        itself (the rate-limit headers of fwd.limits: fixed names, digits), already framed, for this head only."""
        if not isinstance(headers, Headers):
            return super().writeHeaders(version, code, reason, headers)
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head += (name, b": ", value, b"\r\n")
        extra = self.head_lines
        if extra:
            self.head_lines = None
            head.append(extra)
        head.append(b"\r\n")
        self.transport.write(b"".join(head))

    def headerReceived(self, line):
        name, _, value = line.partition(b":")
        if name.lower() == b"transfer-encoding" and (
            value.strip(b" \t").lower() != b"chunked" or self.head_line is None or self.head_line[2] != b"HTTP/1.1"
        ):
            # Only a lone `chunked` on HTTP/1.1 frames a body the same way for every hop (RFC 9112 6.1).
            self.bad_request()
            return False
        if len(value.translate(None, _CONTROL)) != len(value):
            # Control characters are not field content (RFC 9110 5.5); forwarded, they trip up upstreams.
            self.bad_request()
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self):
        self._in_head = False
        self._cancel_head_deadline()
        super().allHeadersReceived()

    def expect_body(self, body_timeout: float) -> None:
        """A request body is on its way: until it is complete, BODY_TIMEOUT of silence ends the connection.
        Armed when the read that brought the head is parsed, unless the body came with it."""
        self._body_timeout = body_timeout

    def _arm_body_timeout(self) -> None:
        # The idle timer is replaced, not reset to an earlier time: the reactor moves a call made sooner by a
        # linear search of its pending calls.
        body_timeout, self._body_timeout = self._body_timeout, None
        self._idle_timeout = self.setTimeout(None)
        self.setTimeout(body_timeout)

    def timeoutConnection(self):
        if self._idle_timeout is not None and self.requests:
            self.requests[-1].body_stalled()
            return
        super().timeoutConnection()

    def allContentReceived(self):
        self._body_timeout = None  # the body came with its head: no timeout was armed for it
        if self._idle_timeout is not None:
            # twisted.web saves the timeout here and restores it when the answer is done: the idle one.
            self.setTimeout(None)
            self.timeOut = self._idle_timeout
            self._idle_timeout = None
        self._busy = True
        super().allContentReceived()

    def requestDone(self, request):
        self._busy = False
        super().requestDone(request)

    def _start_head_deadline(self):
        if self._head_deadline is None and not self._busy and self.transport is not None:
            self._head_deadline = self.callLater(self.site.header_timeout, self._head_timed_out)

    def _head_timed_out(self):
        self._head_deadline = None
        if self._busy or not self.line_mode:
            return
        self._answer_and_close(errors.head_timeout(self.site.header_timeout))

    def _cancel_head_deadline(self):
        if self._head_deadline is not None:
            if self._head_deadline.active():
                self._head_deadline.cancel()
            self._head_deadline = None

    def bad_request(self):
        """A request that cannot be framed (twisted.web's parser, or our stricter checks): JSON 400, closed."""
        self._answer_and_close(errors.bad_http_request())

    def _answer_and_close(self, error: errors.ProxyError) -> None:
        """Answer a request that never became a Request (it could not be framed, or its head never ended)."""
        self._cancel_head_deadline()
        if self.transport is None:
            return
        answers.write_raw_error(self.transport, error)
        self.site.log_unframed(self, error.status)
        self.timeoutConnection() if error.status == 408 else self.loseConnection()

    def connectionLost(self, reason):
        self._cancel_head_deadline()
        super().connectionLost(reason)


class ForwardSite(Site):
    """The client-facing HTTP factory over the gateway's Resource tree."""

    requestFactory = ForwardRequest
    displayTracebacks = False

    def __init__(self, resource, *, clock, max_body_size: int, body_timeout: float, access, **kwargs):
        """`access` access-logs what the site answers itself (see fwd.answers.AccessLog)."""
        kwargs.setdefault("timeout", CONNECTION_IDLE_SECONDS)
        # Forms are forwarded as they are, never parsed by twisted.web (it would read a whole upload into memory).
        super().__init__(resource, reactor=clock, parsePOSTFormSubmission=False, **kwargs)
        self.clock = clock
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout
        self.access = access
        self.header_timeout = HEADER_TIMEOUT_SECONDS
        self.connections: weakref.WeakSet = weakref.WeakSet()

    def protocol(self):
        return http2.ForwardHTTPProtocol(ForwardChannel())

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.connections.add(protocol)
        return protocol

    def open_connections(self) -> list:
        """Client connections still open (each with a `close()`), for a graceful shutdown."""
        return [protocol for protocol in self.connections if protocol.connected]

    def log(self, request):
        """Access-log what was answered without an exchange; forwarded requests are logged when theirs ends."""
        if request.forwarded:
            return
        self.access.answered(request)

    def log_unframed(self, channel, status: int) -> None:
        """Access-log a request that could not even be framed: no method, no path, just the peer."""
        self.access.unframed(channel.transport, status)

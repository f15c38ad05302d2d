"""The two WebSocket ends of a Realtime session, on autobahn's Twisted protocols, and the hand-over of a client's
HTTP/1.1 connection to its WebSocket.  Tests: tests/test_realtime_e2e.py, tests/test_private.py

autobahn frames, masks, answers pings and runs both closing handshakes; fwd.realtime_session decides what each
frame and close means for the session.  Its upstream client is given one thing autobahn does not do: an upstream
that refuses the upgrade (401, 429, 404, …) is read like an HTTP answer (status, headers, body up to
REFUSAL_LIMIT), so the session can rest or disable the key and try the next one, or pass the refusal on.

`take_over` is the one place that reaches inside twisted.web: it has no public way to hand a connection to
another protocol (Twisted ticket #3204).  It does what autobahn's own WebSocketResource does (swap the
transport's protocol, under TLS its wrapped protocol), plus what our channel needs: its timeouts stopped and its
producer registration dropped, so the session can register its own.  tests/test_private.py fails loudly if the
names it uses go away.
"""

from __future__ import annotations

import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import parseHttpHeader
from twisted.internet import defer
from twisted.protocols.policies import ProtocolWrapper

# autobahn logs handshake details at info level; the daemon's log keeps to what the session says itself.
txaio.set_global_log_level("warn")

HEAD_LIMIT = 64 * 1024
REFUSAL_LIMIT = 64 * 1024
# The most frames one message may come in: autobahn keeps each fragment until the message ends, so a message of
# one-byte fragments would cost several times its size (and a Python call per byte).
MAX_FRAGMENTS = 256


class SessionSocket:
    """What both sockets of a session add to autobahn's: a message in too many fragments closes the connection
    with 1009, as one past the size limit does; a close frame from an open socket is told to the session, under
    the socket's `side`."""

    side = ""
    session = None
    opened = False
    fragments = 0

    def onCloseFrame(self, code, reasonRaw):
        answered = super().onCloseFrame(code, reasonRaw)
        if self.opened:
            self.session.closed_by(self.side, self.remoteCloseCode, self.remoteCloseReason)
        return answered

    def onMessageBegin(self, isBinary):
        self.fragments = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length):
        self.fragments += 1
        if self.fragments > MAX_FRAGMENTS and not self.failedByMe:
            # As autobahn fails a message past the size limit: nothing more is kept, the close handshake runs
            # (dropping the connection at once could reset it before the client read why).
            self.failedByMe = True
            self.sendCloseFrame(1009, b"a message in more than %d fragments" % MAX_FRAGMENTS)
            return
        super().onMessageFrameBegin(length)


class Refused(Exception):
    """The upstream answered the upgrade with an HTTP status other than 101."""

    def __init__(self, status: int, phrase: bytes, headers: tuple[tuple[bytes, bytes], ...], body: bytes):
        super().__init__(status)
        self.status = status
        self.phrase = phrase
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> list[bytes] | None:
        found = [value for key, value in self.headers if key == name]
        return found or None


class HandshakeFailed(Exception):
    """The upstream connection ended before the WebSocket opened, without an HTTP answer to read."""


def dechunked(body: bytes, partial: bool = False) -> bytes | None:
    """A chunked body's content, or None while its last chunk has not arrived (with `partial`, what arrived)."""
    out, at = [], 0
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            return b"".join(out) if partial else None
        size_field = body[at:end].split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16) if size_field.isalnum() else -1
        except ValueError:
            size = -1
        if size <= 0:
            return b"".join(out)  # the last chunk, or what is not a chunk size: the body ends here
        start = end + 2
        if len(body) < start + size + 2:
            if partial:
                out.append(body[start:start + size])
                return b"".join(out)
            return None
        out.append(body[start:start + size])
        at = start + size + 2


WAIT = object()


def refusal_in(data: bytes, closed: bool):
    """The HTTP answer at the start of `data` when it is not a 101: a Refused once it is whole (or the connection
    `closed`), WAIT while more of it is due, None for a 101 (autobahn's to check) or what is not HTTP."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None if closed else WAIT
    line = data[: data.find(b"\r\n")].split(b" ", 2)
    if len(line) < 2 or not line[1].isdigit() or line[1] == b"101":
        return None
    _, headers, _ = parseHttpHeader(data[: end + 4])
    body = data[end + 4:]
    length = headers.get("content-length", "").strip()
    if headers.get("transfer-encoding", "").strip().lower() == "chunked":
        content = dechunked(body)
        if content is None and not closed and len(body) < REFUSAL_LIMIT:
            return WAIT
        body = content if content is not None else dechunked(body, partial=True)
    elif length.isdigit():
        if len(body) < min(int(length), REFUSAL_LIMIT) and not closed:
            return WAIT
        body = body[: int(length)]
    elif len(body) < REFUSAL_LIMIT and not closed:
        return WAIT  # a body delimited by the close
    return Refused(int(line[1]), line[2].strip() if len(line) > 2 else b"",
                   tuple((k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers.items()),
                   body[:REFUSAL_LIMIT])


class UpstreamSocket(SessionSocket, WebSocketClientProtocol):
    """The session's connection to the upstream."""

    side = "upstream"
    refusal: Refused | None = None

    def processHandshake(self):
        if self.refusal is not None:
            return
        found = refusal_in(self.data, closed=False)
        if found is None:
            return super().processHandshake()
        if found is WAIT:
            if len(self.data) > HEAD_LIMIT + REFUSAL_LIMIT:
                self.failHandshake("the upstream's answer is too large")
            return
        self.refusal = found
        self.dropConnection(abort=True)

    def onOpen(self):
        self.opened = True
        self.factory.opening.callback(self)

    def onMessage(self, payload, isBinary):
        self.session.from_upstream(payload, isBinary)

    def onPing(self, payload):
        self.session.touch()
        super().onPing(payload)

    def onClose(self, wasClean, code, reason):
        if self.opened:
            self.session.lost("upstream", wasClean)
            return
        if self.refusal is None and self.data:
            found = refusal_in(self.data, closed=True)
            if isinstance(found, Refused):
                self.refusal = found
        opening = self.factory.opening
        if not opening.called:
            opening.errback(self.refusal if self.refusal is not None
                            else HandshakeFailed(self.wasNotCleanReason or "connection closed"))


class UpstreamFactory(WebSocketClientFactory):
    """One connection attempt to the upstream: `opening` fires with the open UpstreamSocket, or fails with
    Refused (an HTTP answer) or HandshakeFailed."""

    protocol = UpstreamSocket

    def __init__(self, session, url: str, *, protocols: list[str], headers: dict, useragent: str | None,
                 origin: str | None, max_message: int, reactor):
        super().__init__(url, protocols=protocols, headers=headers, useragent=useragent, origin=origin,
                         reactor=reactor)
        self.session = session
        self.noisy = False
        self.opening: defer.Deferred = defer.Deferred(canceller=self._abandon)
        self.built = None
        self.setProtocolOptions(maxFramePayloadSize=max_message, maxMessagePayloadSize=max_message,
                                openHandshakeTimeout=0, closeHandshakeTimeout=5, serverConnectionDropTimeout=5,
                                perMessageCompressionOffers=[], failByDrop=False)

    def buildProtocol(self, addr):
        protocol = self.built = super().buildProtocol(addr)
        protocol.session = self.session
        return protocol

    def _abandon(self, opening) -> None:
        """The attempt was given up (TIMEOUT, or the client left): drop its connection."""
        if self.built is not None and self.built.transport is not None:
            self.built.transport.abortConnection()


class ClientSocket(SessionSocket, WebSocketServerProtocol):
    """The session's connection to its client, once the upgrade is accepted."""

    side = "client"

    def onConnect(self, request):
        return self.session.accepting()

    def onOpen(self):
        self.opened = True
        self.session.client_opened(self)

    def onMessage(self, payload, isBinary):
        self.session.from_client(payload, isBinary)

    def onPing(self, payload):
        self.session.client_ping()
        super().onPing(payload)

    def onClose(self, wasClean, code, reason):
        self.session.lost("client", wasClean)


def client_factory(max_message: int, reactor) -> WebSocketServerFactory:
    """The factory of client-side sockets: frames and messages bounded, no compression (a relay that inflates
    nothing has no compression bomb to fear), no handshake deadline of its own (the session has the head already)."""
    factory = WebSocketServerFactory(reactor=reactor)
    factory.protocol = ClientSocket
    factory.setProtocolOptions(maxFramePayloadSize=max_message, maxMessagePayloadSize=max_message,
                               openHandshakeTimeout=0, closeHandshakeTimeout=5, perMessageCompressionAccept=None,
                               allowedOrigins=["*"], failByDrop=False)
    factory.server = None
    factory.noisy = False
    return factory


def take_over(request, protocol) -> None:
    """Hand the HTTP/1.1 connection of `request` (an upgrade request) to `protocol`, and replay the request's
    head to it so it can answer the handshake."""
    channel = request.channel
    transport = channel.transport
    channel.setTimeout(None)  # the HTTP idle timeout: the session keeps its own
    transport.unregisterProducer()  # twisted.web's HTTPChannel registered itself in connectionMade
    channel.transport = None
    if isinstance(transport, ProtocolWrapper):  # TLS: the TLS layer wraps our HTTP protocol
        transport.wrappedProtocol = protocol
    elif isinstance(transport.protocol, ProtocolWrapper):
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)
    transport.resumeProducing()  # twisted.web pauses a connection while it answers a request
    head = [request.method, b" ", request.uri, b" HTTP/1.1\r\n"]
    for name, values in request.requestHeaders.getAllRawHeaders():
        head += (name, b": ", b", ".join(values), b"\r\n")
    head.append(b"\r\n")
    protocol.dataReceived(b"".join(head))

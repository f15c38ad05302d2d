"""HTTP/2 for clients, hardened: bounded, with a deadline for every byte.  Tests: tests/test_http2.py

twisted.web answers HTTP/2 with `H2Connection` when TLS negotiates h2 (ALPN).  Left as it is, one client can:

- grow the daemon without bound with a header block that never ends.  h2 refuses the 65th CONTINUATION frame but
  keeps every later one in its header buffer, and keeps the unparsed rest of each read; twisted.web then calls
  `loseConnection`, which does nothing on a TLS transport while the HTTP/2 connection is its registered producer,
  so the bytes keep coming, and any partial frame resets the idle timeout.  A frame header may also announce up to
  16 MiB, which h2 buffers whole before it checks the length.
- hold streams and connections open for ever: any frame, a PING included, resets the one idle timeout, and a
  stream whose request never ends has no deadline;
- spin a core: a stream with response bytes queued and a shut flow-control window stays in the priority tree, and
  the send loop polls it with `callLater(0)` until the client opens the window, which it may never do;
- get a 500 (the forwarder fails on a target holding a space or a header value holding a control character), or
  drop the whole connection with one malformed request.

`ForwardH2Connection` closes each of these.  It follows frame headers as bytes arrive and closes the connection
(GOAWAY, then the socket, reading no more) once a header block passes HEADER_BLOCK_LIMIT or a frame is larger than
allowed, before h2 buffers it; it advertises MAX_CONCURRENT_STREAMS; a connection without streams is closed after
its idle timeout whatever the client sends meanwhile; a header block must end within HEADER_TIMEOUT_SECONDS; a
request body silent for BODY_TIMEOUT_SECONDS gets a 408; a stream whose window stays shut, or a connection whose
client stops reading, is closed after the idle timeout, and waits without polling until then; and a malformed
request gets the same JSON 400 as over HTTP/1.1, on its stream only.  `ForwardHTTPProtocol` is the per-connection
protocol that starts as the HTTP/1.1 channel and becomes a ForwardH2Connection when TLS negotiated h2.

Twisted private names used (fwd.private names the class; calls into it go through the block right below the
imports; the overrides and the replaced ivars are in ForwardH2Connection).
- `twisted.web._http2.H2Connection`: twisted.web's only HTTP/2 server protocol, subclassed here.  Besides the
  IProtocol, IPushProducer and TimeoutMixin methods, this module relies on these members of it, all named in its
  own documentation: the ivars `conn` (h2's state machine, replaced by a screened one before first use),
  `streams` (replaced by a dict that reports opens and closes) and `priority` (wrapped so shut windows park);
  the methods `writeHeaders`, `writeDataToStream` (overridden to notice a shut window; writing b"" wakes the send
  loop, which a WINDOW_UPDATE alone does not), `remainingOutboundWindow`, `abortRequest` and `timeoutConnection`
  (overridden to free the transport first); and `connectionLost(reason, ...)`, whose private keyword is passed
  through untouched.
- `twisted.web._http2.H2Stream.connectionLost`: tells a stream's Request its client is gone (the values of
  `streams`), as twisted.web does itself when a client resets a stream.
`twisted.web.http._GenericHTTPChannelProtocol` is not used: its `dataReceived` builds a plain `H2Connection()`
itself, so ForwardHTTPProtocol does the same switch with public names only.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure

from fwd import errors, private

log = Logger(namespace="fwd.http2")

# --- Twisted private names: the base class, and the calls this module makes into it ------------------------------

TwistedH2Connection = private.H2Connection  # the base of ForwardH2Connection


def _forget_stream(connection, stream_id: int, why: str) -> None:
    """Tell the stream's Request its client is gone, then reset the stream and drop twisted.web's state for it."""
    stream = connection.streams.get(stream_id)
    if stream is None:
        return
    stream.connectionLost(Failure(ConnectionLost(why)))
    try:
        connection.abortRequest(stream_id)
    except h2.exceptions.ProtocolError:
        pass  # h2 has closed the stream already


def _queued_bytes(connection, stream_id: int, window: int) -> int:
    """Response bytes queued on a stream and not yet sent."""
    return window - connection.remainingOutboundWindow(stream_id)


def _wake_send_loop(connection, stream_id: int) -> None:
    """Restart twisted.web's send loop for a stream whose window opened; an empty write wakes it and sends nothing."""
    connection.writeDataToStream(stream_id, b"")


def _send_head(connection, stream_id: int, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    """Response headers on a stream twisted.web knows, through its control-frame buffer, which keeps frame order."""
    connection.writeHeaders(b"HTTP/2", b"%d" % status, b"", headers, stream_id)


# --- limits ---------------------------------------------------------------------------------------------------

# The bytes of one request header block, as sent (HPACK-encoded), and of its decoded header list; h2's own default
# for the latter.  Common clients send well under 4 KiB.
HEADER_BLOCK_LIMIT = 64 * 1024
# Streams a client may have open at once on one connection (h2's default, now ours on purpose).
MAX_CONCURRENT_STREAMS = 100
# A header block (HEADERS and its CONTINUATION frames) must be complete this long after it started.
HEADER_TIMEOUT_SECONDS = 20.0
# A request body may be silent this long between two DATA frames.
BODY_TIMEOUT_SECONDS = 30.0
# A connection without streams, a stream whose window stays shut, a connection whose client stops reading: closed
# after this long.  The site's timeout replaces it.
IDLE_TIMEOUT_SECONDS = 75.0
# How long a connection being closed may take to say goodbye before its socket is aborted.
CLOSE_GRACE_SECONDS = 2.0

BAD_REQUEST = errors.bad_http_request()


# --- the request head ---------------------------------------------------------------------------------------

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NAME = _TOKEN - frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TARGET = frozenset(range(0x21, 0x7F))
_CONTROL = bytes(c for c in range(32) if c != 9) + b"\x7f"


def has_control_characters(value: bytes) -> bool:
    """Whether a header value holds control characters other than HTAB (RFC 9110 5.5)."""
    return len(value.translate(None, _CONTROL)) != len(value)


def request_line(channel) -> tuple[bytes, bytes, bytes] | None:
    """(method, target, version) of the request whose head just arrived on a channel: the daemon's HTTP/1.1
    channel remembers its request line, an HTTP/2 stream holds its pseudo-headers."""
    line = getattr(channel, "head_line", None)
    if line is not None:
        return line
    command = getattr(channel, "command", None)
    path = getattr(channel, "path", None)
    if command is None or path is None:
        return None
    return command, path, b"HTTP/2"
_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
# RFC 9113 8.2.2: HTTP/1.1 connection management has no place in HTTP/2.
_CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))


def _bad_value(value: bytes) -> bool:
    """Control characters (HTAB aside) or surrounding whitespace, which RFC 9113 8.2.1 makes malformed."""
    edges = value[:1] + value[-1:]
    return has_control_characters(value) or b" " in edges or b"\t" in edges


def request_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why an HTTP/2 request head is malformed (RFC 9113 8.2, 8.3), or None when it may be forwarded."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    lengths = 0
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return "pseudo-header after a regular header"
            if name not in _PSEUDO:
                return "unknown pseudo-header"
            if name in pseudo:
                return "repeated pseudo-header"
            pseudo[name] = value
            continue
        regular = True
        if not name or not _NAME.issuperset(name):
            return "header name is not a lower-case token"
        if _bad_value(value):
            return "control character or surrounding whitespace in a header value"
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
            return "connection-specific header"
        if name == b"content-length":
            lengths += 1
            if lengths > 1:
                return "repeated content-length"
    method, path = pseudo.get(b":method"), pseudo.get(b":path")
    if method is None or path is None or b":scheme" not in pseudo:
        return "missing :method, :scheme or :path"
    if not method or not _TOKEN.issuperset(method) or method == b"CONNECT":
        return "method is not a token, or is CONNECT"
    if path[:1] != b"/" or not _TARGET.issuperset(path):
        return "target is not an origin-form of visible ASCII"
    if _bad_value(pseudo.get(b":authority", b"")):
        return "control character in :authority"
    return None


# --- frames as they arrive ----------------------------------------------------------------------------------

_PREFACE_LENGTH = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", which h2 checks
_HEADERS, _PUSH_PROMISE, _CONTINUATION = 0x1, 0x5, 0x9
_END_HEADERS = 0x4


class InboundFrames:
    """Follows the frame headers in a client's bytes, so a header block or a frame is refused before h2 buffers it."""

    def __init__(self, header_block_limit: int, max_frame_size: int) -> None:
        self.header_block_limit = header_block_limit
        self.max_frame_size = max_frame_size
        self.header_block: int | None = None  # bytes so far of the header block in progress
        self._skip = _PREFACE_LENGTH  # bytes to pass over: the preface, then each frame's payload
        self._head = b""  # the start of a frame header cut by a read

    @property
    def in_header_block(self) -> bool:
        return self.header_block is not None

    def feed(self, data: bytes) -> str | None:
        """Account for the next bytes read; the reason to close the connection, or None."""
        position, end = 0, len(data)
        while True:
            if self._skip:
                step = min(self._skip, end - position)
                self._skip -= step
                position += step
                if self._skip:
                    return None
            wanted = 9 - len(self._head)
            if end - position < wanted:
                self._head += data[position:]
                return None
            head = self._head + data[position : position + wanted]
            position += wanted
            self._head = b""
            length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
            if length > self.max_frame_size:
                return "frame larger than SETTINGS_MAX_FRAME_SIZE"
            if kind in (_HEADERS, _PUSH_PROMISE):
                self.header_block = None if flags & _END_HEADERS else length
            elif kind == _CONTINUATION and self.header_block is not None:
                self.header_block += length
                if self.header_block > self.header_block_limit:
                    return "header block larger than the limit"
                if flags & _END_HEADERS:
                    self.header_block = None
            self._skip = length


# --- the connection -----------------------------------------------------------------------------------------


class _ScreenedConnection(h2.connection.H2Connection):
    """h2's server state machine with our settings, whose events pass a screen before twisted.web sees them."""

    def __init__(self, screen, max_streams: int, header_list_limit: int) -> None:
        # Inbound header validation is ours (request_problem), so that a malformed request costs its stream a 400
        # instead of costing every stream on the connection a GOAWAY.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False)
        super().__init__(config=config)
        codes = h2.settings.SettingCodes
        self.local_settings = h2.settings.Settings(
            client=False,
            initial_values={codes.MAX_CONCURRENT_STREAMS: max_streams, codes.MAX_HEADER_LIST_SIZE: header_list_limit},
        )
        self.decoder.max_header_list_size = header_list_limit
        self._screen = screen

    def receive_data(self, data):
        return self._screen(super().receive_data(data))


class _Streams(dict):
    """twisted.web's map of open streams, telling the connection when one opens or closes."""

    def __init__(self, changed) -> None:
        super().__init__()
        self._changed = changed

    def __setitem__(self, stream_id, stream) -> None:
        super().__setitem__(stream_id, stream)
        self._changed(stream_id, True)

    def __delitem__(self, stream_id) -> None:
        super().__delitem__(stream_id)
        self._changed(stream_id, False)


class _ParkingPriority:
    """twisted.web's priority tree, except that a stream whose window is shut is parked instead of polled."""

    def __init__(self, tree, shut) -> None:
        self._tree = tree
        self._shut = shut

    def __getattr__(self, name):
        return getattr(self._tree, name)

    def __iter__(self):
        return self

    def __next__(self) -> int:
        while True:
            stream_id = next(self._tree)  # DeadlockError when every stream is blocked: the send loop then waits
            if not self._shut(stream_id):
                return stream_id
            self._tree.block(stream_id)


class ForwardH2Connection(TwistedH2Connection):
    """twisted.web's HTTP/2 connection with bounded header blocks, per-stream deadlines and no polling."""

    header_block_limit: int = HEADER_BLOCK_LIMIT
    max_streams: int = MAX_CONCURRENT_STREAMS
    header_timeout: float = HEADER_TIMEOUT_SECONDS
    body_timeout: float = BODY_TIMEOUT_SECONDS
    idle_timeout: float = IDLE_TIMEOUT_SECONDS
    close_grace: float = CLOSE_GRACE_SECONDS

    def __init__(self, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(reactor)
        self.clock = reactor
        self.conn = _ScreenedConnection(self._screen, self.max_streams, self.header_block_limit)
        self.streams = _Streams(self._stream_changed)
        self.priority = _ParkingPriority(self.priority, self._window_shut)
        self._frames = InboundFrames(self.header_block_limit, self.conn.max_inbound_frame_size)
        self._closing = False
        self._client_left = False
        self._producing_for = None
        self._head_deadline = None
        self._stall_deadline = None
        self._abort_call = None
        self._body_deadlines: dict = {}
        self._window_deadlines: dict = {}

    # IProtocol

    def connectionMade(self) -> None:
        site = getattr(self, "site", None)
        self.header_timeout = getattr(site, "header_timeout", self.header_timeout)
        self.body_timeout = getattr(site, "body_timeout", self.body_timeout)
        if self.timeOut is None:
            self.timeOut = self.idle_timeout
        else:
            self.idle_timeout = self.timeOut
        super().connectionMade()
        if IPushProducer.providedBy(self.transport):
            # The transport pauses us when the client reads too slowly (twisted.web registers us the same way).
            self.transport.registerProducer(self, True)
            self._producing_for = self.transport

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return  # a connection being closed reads nothing more into memory
        problem = self._frames.feed(data)
        if problem is not None:
            code = h2.errors.ErrorCodes
            return self._refuse(problem, code.FRAME_SIZE_ERROR if "frame" in problem else code.ENHANCE_YOUR_CALM)
        self._follow_header_block()
        super().dataReceived(data)
        if self.conn.state_machine.state is h2.connection.ConnectionState.CLOSED:
            # h2 refused the bytes (twisted.web wrote its GOAWAY) or the client sent GOAWAY.
            self._close(hostile=not self._client_left)
        elif not self._closing:
            self._wake_parked()

    def connectionLost(self, reason, *args, **kwargs) -> None:
        super().connectionLost(reason, *args, **kwargs)
        self.setTimeout(None)  # closing each stream re-armed it
        for call in (self._head_deadline, self._stall_deadline, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._head_deadline = self._stall_deadline = self._abort_call = None
        for deadlines in (self._body_deadlines, self._window_deadlines):
            for call in deadlines.values():
                if call.active():
                    call.cancel()
            deadlines.clear()

    # TimeoutMixin: the idle timeout runs only while no stream is open, and no frame of the client extends it.

    def resetTimeout(self) -> None:
        pass

    def timeoutConnection(self) -> None:
        self._closing = True
        self._release_transport()
        super().timeoutConnection()

    # IPushProducer: the transport pauses us while the client does not read.

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self._stall_deadline is None and not self._closing:
            self._stall_deadline = self.clock.callLater(self.idle_timeout, self._stalled)

    def resumeProducing(self) -> None:
        if self._stall_deadline is not None:
            if self._stall_deadline.active():
                self._stall_deadline.cancel()
            self._stall_deadline = None
        super().resumeProducing()

    def writeDataToStream(self, streamID: int, data: bytes) -> None:
        super().writeDataToStream(streamID, data)
        self._window_shut(streamID)

    # What the client sends, before twisted.web acts on it

    def _screen(self, events: list) -> list:
        """Answer malformed requests, keep deadlines, and drop what twisted.web would trip over."""
        kept = []
        opened = set()
        for event in events:
            stream_id = getattr(event, "stream_id", None)
            if isinstance(event, h2.events.RequestReceived):
                if request_problem(event.headers) is not None:
                    self._answer_bad_request(stream_id, ended=event.stream_ended is not None)
                    continue
                opened.add(stream_id)
                if event.stream_ended is None:
                    self._body_deadlines[stream_id] = self.clock.callLater(
                        self.body_timeout, self._body_silent, stream_id
                    )
            elif isinstance(event, (h2.events.DataReceived, h2.events.StreamEnded, h2.events.StreamReset)):
                if stream_id not in self.streams and stream_id not in opened:
                    # A stream twisted.web has answered or we refused: its late frames must not reach it.
                    if isinstance(event, h2.events.DataReceived):
                        self._discard_data(event)
                    continue
                deadline = self._body_deadlines.get(stream_id)
                if deadline is not None:
                    if isinstance(event, h2.events.DataReceived):
                        if event.data:
                            deadline.reset(self.body_timeout)
                    else:
                        deadline.cancel()
                        del self._body_deadlines[stream_id]
            elif isinstance(event, h2.events.PriorityUpdated):
                continue  # deprecated by RFC 9113; twisted.web would add a tree node for any stream id named
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._client_left = True
                kept.append(event)
                break  # twisted.web forgets every stream on GOAWAY; later events would name streams it dropped
            kept.append(event)
        return kept

    def _log_answer(self, status: int) -> None:
        """Access-log an answer this connection gave itself (the request never became a Request)."""
        site = getattr(self, "site", None)
        if site is not None and hasattr(site, "log_unframed"):
            site.log_unframed(self, status)

    def _answer_bad_request(self, stream_id: int, ended: bool) -> None:
        """The JSON 400 HTTP/1.1 answers, on this stream only; twisted.web never sees the request."""
        self._log_answer(400)
        body = BAD_REQUEST.body()
        conn = self.conn
        try:
            fits = conn.local_flow_control_window(stream_id) >= len(body)
            headers = [(b":status", b"400"), (b"content-type", b"application/json")]
            if fits:
                headers.append((b"content-length", b"%d" % len(body)))
            conn.send_headers(stream_id, headers, end_stream=not fits)
            if fits:
                conn.send_data(stream_id, body, end_stream=True)
            if not ended:
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)  # the rest of the body is not wanted
        except h2.exceptions.ProtocolError:
            pass

    def _discard_data(self, event) -> None:
        """Hand back the window of body bytes nobody will read, and ask the client to stop sending them."""
        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        try:
            self.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.ProtocolError:
            pass  # already closed

    # Deadlines

    def _stream_changed(self, stream_id: int, opened: bool) -> None:
        if opened:
            self.setTimeout(None)
            return
        for deadlines in (self._body_deadlines, self._window_deadlines):
            call = deadlines.pop(stream_id, None)
            if call is not None and call.active():
                call.cancel()
        if not self.streams and not self._closing:
            self.setTimeout(self.idle_timeout)

    def _follow_header_block(self) -> None:
        if self._frames.in_header_block:
            if self._head_deadline is None:
                self._head_deadline = self.clock.callLater(self.header_timeout, self._head_late)
        elif self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        problem = f"request headers not complete within {self.header_timeout:g} s"
        self._refuse(problem, h2.errors.ErrorCodes.PROTOCOL_ERROR)

    def _body_silent(self, stream_id: int) -> None:
        """A 408 when the window lets it out, then RST_STREAM: the Request learns its client is gone."""
        self._body_deadlines.pop(stream_id, None)
        if stream_id not in self.streams:
            return
        error = errors.body_timeout(self.body_timeout)
        self._log_answer(error.status)
        body = error.body()
        try:
            fits = self.conn.local_flow_control_window(stream_id) >= len(body)
            headers = [(b"content-type", b"application/json")]
            if fits:
                headers.append((b"content-length", b"%d" % len(body)))
            _send_head(self, stream_id, error.status, headers)
            if fits:
                self.conn.send_data(stream_id, body, end_stream=True)
            else:
                self.conn.end_stream(stream_id)
        except h2.exceptions.ProtocolError:
            pass
        _forget_stream(self, stream_id, error.message)

    def _window_shut(self, stream_id: int) -> bool:
        """Whether the stream has response bytes queued that its flow-control window keeps in; if so, park it."""
        if stream_id not in self.streams:
            return False
        try:
            window = self.conn.local_flow_control_window(stream_id)
        except h2.exceptions.ProtocolError:
            return False
        if window > 0 or _queued_bytes(self, stream_id, window) <= 0:
            return False
        if stream_id not in self._window_deadlines:
            self._window_deadlines[stream_id] = self.clock.callLater(self.idle_timeout, self._window_expired, stream_id)
        return True

    def _wake_parked(self) -> None:
        """After WINDOW_UPDATE or SETTINGS from the client: send again on the parked streams it opened."""
        for stream_id in list(self._window_deadlines):
            try:
                window = self.conn.local_flow_control_window(stream_id)
            except h2.exceptions.ProtocolError:
                window = 0
            if window > 0 and stream_id in self.streams:
                self._window_deadlines.pop(stream_id).cancel()
                _wake_send_loop(self, stream_id)

    def _window_expired(self, stream_id: int) -> None:
        del self._window_deadlines[stream_id]
        _forget_stream(self, stream_id, f"the client kept its flow-control window shut for {self.idle_timeout:g} s")

    def _stalled(self) -> None:
        self._stall_deadline = None
        log.info("HTTP/2 client {client} read nothing for {seconds:g} s; aborting", client=self._peer(),
                 seconds=self.idle_timeout)
        self._closing = True
        self.transport.abortConnection()

    # Closing

    def close_gracefully(self) -> None:
        """Say goodbye (GOAWAY, no error) and close once the last bytes are out: the daemon is stopping."""
        if self._closing:
            return
        try:
            self.conn.close_connection()
            self.transport.write(self.conn.data_to_send())
        except h2.exceptions.ProtocolError:
            pass
        self._close(hostile=False)

    def _refuse(self, problem: str, error_code: int) -> None:
        """Close a connection whose client broke the rules: GOAWAY, streams told, socket closed without reading."""
        log.info("HTTP/2 client {client} refused: {problem}", client=self._peer(), problem=problem)
        self._closing = True
        try:
            self.conn.close_connection(error_code=error_code)
            self.transport.write(self.conn.data_to_send())
        except h2.exceptions.ProtocolError:
            pass
        self.connectionLost(Failure(ConnectionLost(problem)))
        self._close(hostile=True)

    def _close(self, hostile: bool) -> None:
        """Free the transport of us as its producer (else TLS never closes), close it, and abort it after a grace."""
        if self._abort_call is not None:
            return
        self._closing = True
        self.setTimeout(None)
        for call in (self._head_deadline, self._stall_deadline):
            if call is not None and call.active():
                call.cancel()
        self._head_deadline = self._stall_deadline = None
        self._release_transport()
        if hostile:
            self.transport.pauseProducing()
        self.transport.loseConnection()
        self._abort_call = self.clock.callLater(self.close_grace, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        self.transport.abortConnection()

    def _release_transport(self) -> None:
        if self._producing_for is not None:
            self._producing_for.unregisterProducer()
            self._producing_for = None

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return getattr(peer, "host", str(peer))


# --- choosing the protocol ----------------------------------------------------------------------------------


def _channel_setting(name: str) -> property:
    """An attribute the factory sets on the protocol, kept for whichever channel serves the connection."""

    def get(self):
        return getattr(self.channel, name)

    def set(self, value) -> None:
        self._settings[name] = value
        setattr(self.channel, name, value)

    return property(get, set, doc=f"The serving channel's {name}.")


class ForwardHTTPProtocol(proxyForInterface(IProtocol, "channel")):  # type: ignore[misc]
    """One client connection: the HTTP/1.1 channel it starts with, or a ForwardH2Connection once TLS chose h2."""

    factory = _channel_setting("factory")
    site = _channel_setting("site")
    requestFactory = _channel_setting("requestFactory")
    timeOut = _channel_setting("timeOut")
    callLater = _channel_setting("callLater")

    def __init__(self, channel, h2_connection: type = ForwardH2Connection) -> None:
        super().__init__(channel)
        self._settings: dict = {}
        self._h2_connection = h2_connection
        self._chosen = False

    def dataReceived(self, data: bytes) -> None:
        if not self._chosen:
            self._chosen = True
            if getattr(self.channel.transport, "negotiatedProtocol", None) == b"h2":
                self._become_h2()
        self.channel.dataReceived(data)

    @property
    def connected(self) -> bool:
        """Whether the client connection is still open (in-memory test transports only say `disconnected`)."""
        transport = self.channel.transport
        return transport is not None and getattr(transport, "connected", not getattr(transport, "disconnected", True))

    def close(self) -> None:
        """Close the connection once its last bytes are sent (a graceful shutdown)."""
        channel = self.channel
        if isinstance(channel, ForwardH2Connection):
            channel.close_gracefully()
        elif channel.transport is not None:
            channel.transport.loseConnection()

    def _become_h2(self) -> None:
        http11 = self.channel
        transport = http11.transport
        if IPushProducer.providedBy(transport):
            transport.unregisterProducer()  # the HTTP/1.1 channel registered itself as producer
        http11.setTimeout(None)
        connection = self._h2_connection(getattr(self._settings.get("factory"), "reactor", None))
        for name, value in self._settings.items():
            setattr(connection, name, value)
        self.channel = connection
        connection.makeConnection(transport)

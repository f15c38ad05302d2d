"""One Realtime session: what is checked before the upgrade, its upstream attempts, the relay between the two
sockets, and how it is accounted and transcribed when it ends.  Tests: tests/test_realtime_e2e.py

Before the client's upgrade is accepted, the session is an HTTP request like any other: route, IP lists and
credentials were judged on its head (a browser's key comes in a subprotocol, `credential_from_subprotocol`), its
model is checked against the forward key's list, its limits admit it (one request against `rpm`, one slot of
`max_parallel` for as long as it runs), and the upstream accepts a pool key (a key it refuses is rested or
disabled and the next one tried, as for HTTP).  Only then does the client get its 101; any refusal before is a
plain HTTP answer with the usual JSON body, and an upstream that cannot be reached is a 502 (504 past TIMEOUT).

Once open, frames go both ways as they come, in order.  A side whose write buffer is full pauses the reading of
the other side (a client that stops reading pauses the upstream socket, and the other way round), and a client
that reads nothing while the proxy answers it itself (pongs, errors) is not read either.  Close codes and
reasons pass through; a side that vanishes gets the other closed (1011 to the client, 1001 to the upstream).
IDLE_TIMEOUT seconds without a frame either way close both (1001).  A graceful shutdown lets sessions run for
GRACE_PERIOD, then closes them with 1001.

Tokens come from each `response.done`.  With token limits or a budget, each response's tokens are charged when
it is done, on a ticket of their own; a caller refused more gets an `error` event and 1008.  The session's
usage reaches the ledger and the metrics when it ends, in one access event (`GET /v1/realtime 101 …`).
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import time

from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python import failure
from twisted.web.client import URI
from twisted.web.http import HTTPChannel
from zope.interface import implementer

from fwd import errors, keys, models
from fwd.answers import send_error
from fwd.failover import UpstreamAttempts
from fwd.headers import clean_phrase, response_headers, upstream_headers
from fwd.limits import Refusal, price_for
from fwd.masking import KeyMasker
from fwd.quota import NOTHING_RESERVED, refused
from fwd.realtime import (
    client_event_id,
    echoed,
    error_event,
    handshake_headers,
    is_origin,
    model_refusal,
    offered,
    passed_on,
    response_usage,
    socket_url,
    subprotocol_key,
)
from fwd.transcripts.assembly import Ended
from fwd.transcripts.events import emit
from fwd.transcripts.realtime import SessionTranscript
from fwd.upstream import UpstreamEndpoints
from fwd.websocket import (
    HandshakeFailed,
    Refused,
    UpstreamFactory,
    client_factory,
    take_over,
)

log = Logger(namespace="fwd.realtime")

# The largest message either side may send: a Realtime event carrying audio is at most 15 MiB of base64.
MAX_MESSAGE = 16 * 1024 * 1024
UID_PREFIX = os.urandom(6).hex()
uid_counter = itertools.count()
# What autobahn's server handshake accepts (checked before an upstream session is opened for it).
HOST = re.compile(rb"\A(?:\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+)(?::[0-9]{1,5})?\Z")
TOKEN = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_OPEN = WebSocketProtocol.STATE_OPEN


def credential_from_subprotocol(request, kind: str) -> errors.ProxyError | None:
    """Take a browser-style client's key from its `openai-insecure-api-key.<key>` subprotocol into the header the
    route reads credentials from (a header the client set itself wins).  A refusal when the offer is ambiguous."""
    headers = request.requestHeaders
    key, problem = subprotocol_key(offered(headers.getRawHeaders(b"sec-websocket-protocol")))
    if problem is not None:
        return errors.bad_request(f"Refused WebSocket upgrade: {problem}.")
    if key is None or headers.hasHeader(b"authorization") or (kind == "azure" and headers.hasHeader(b"api-key")):
        return None
    encoded = key.encode("latin-1", "replace")
    if kind == "azure":
        headers.setRawHeaders(b"api-key", [encoded])
    else:
        headers.setRawHeaders(b"authorization", [b"Bearer " + encoded])
    return None


def upgrade_refusal(request, forward_key, target) -> errors.ProxyError | None:
    """Why an upgrade request cannot become a session: not HTTP/1.1, not a WebSocket handshake a client could
    finish, or (for a key limited to some models) a model it may not run, or none named."""
    if not isinstance(request.channel, HTTPChannel) or request.clientproto != b"HTTP/1.1":
        return errors.ProxyError(400, "A WebSocket needs an HTTP/1.1 connection.", code="websocket_http11")
    headers = request.requestHeaders
    if headers.getRawHeaders(b"sec-websocket-version") != [b"13"]:
        return errors.ProxyError(426, "Send Sec-WebSocket-Version: 13.", code="websocket_version",
                                 headers=((b"sec-websocket-version", b"13"),))
    if b"#" in request.uri:
        return errors.bad_request("Refused WebSocket upgrade: the target has a fragment (#).")
    host = headers.getRawHeaders(b"host")
    if host is None or len(host) != 1 or not HOST.match(host[0]):
        return errors.bad_request("Refused WebSocket upgrade: send one Host header, with a numeric port if any.")
    protocols = offered(headers.getRawHeaders(b"sec-websocket-protocol"))
    if len(set(protocols)) != len(protocols) or not all(TOKEN.match(p) for p in protocols):
        return errors.bad_request("Refused WebSocket upgrade: the subprotocols must be distinct tokens.")
    origin = headers.getRawHeaders(b"origin")
    if origin is not None and (len(origin) != 1 or not is_origin(origin[0])):
        return errors.bad_request("Refused WebSocket upgrade: Origin is not an origin (scheme://host[:port]).")
    key = headers.getRawHeaders(b"sec-websocket-key")
    try:
        valid = key is not None and len(key) == 1 and len(base64.b64decode(key[0], validate=True)) == 16
    except ValueError:
        valid = False
    if not valid:
        return errors.bad_request("Refused WebSocket upgrade: Sec-WebSocket-Key is not 16 bytes of base64.")
    if forward_key is not None and forward_key.models is not None:
        named = models.path_named(target.path) + models.query_named(target.query)
        if named.problem is None and not named.models:
            return errors.model_refused("this key is limited to some models: name one in the `model` query parameter")
        why = models.decide(forward_key.models, b"GET", target.path, named)
        if why is not None:
            return errors.model_refused(why)
    return None


def session_model(target) -> str | None:
    named = models.query_named(target.query) + models.path_named(target.path)
    return named.models[0] if named.problem is None and named.models else None


class ReadGate:
    """A socket's reading, paused while any side of its session asks (a count, so two asks need two resumes)."""

    def __init__(self, transport):
        self.transport = transport
        self.asks = 0

    def close(self) -> None:
        self.asks += 1
        if self.asks == 1:
            self.transport.pauseProducing()

    def open(self) -> None:
        if self.asks:
            self.asks -= 1
            if not self.asks:
                self.transport.resumeProducing()


@implementer(IPushProducer)
class WhileFull:
    """Registered on one socket's transport: while its write buffer is full, the gates stay closed."""

    def __init__(self, gates: list[ReadGate], on_resume=None):
        self.gates = gates
        self.paused = False
        self.on_resume = on_resume

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            for gate in self.gates:
                gate.close()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            for gate in self.gates:
                gate.open()
            if self.on_resume is not None:
                self.on_resume()

    def stopProducing(self) -> None:
        self.resumeProducing()  # the socket is gone: the other side must read on (its close, at least)


class RealtimeSession:
    """A client's WebSocket and its upstream's, from the first connect attempt to the last close."""

    def __init__(self, gateway, active, admission, request, target, ticket, plan=None):
        """`ticket` is the session's admission by its limits (None without limits), `plan` those limits
        (fwd.quota.Plan): a session whose caller has a token limit or a budget is charged response by response."""
        self.gateway = gateway
        self.config = config = gateway.config
        self.active = active
        self.admission = admission
        self.request = request
        self.target = target
        self.ticket = ticket
        self.clock = gateway.clock  # the daemon's reactor: the upstream socket connects on it
        self.started = self.clock.seconds()
        self.model = session_model(target)
        self.protocols = offered(request.requestHeaders.getRawHeaders(b"sec-websocket-protocol"))
        self.attempts = UpstreamAttempts(active, target, self.model, admission.decision.use_pool, self.clock)
        forward_key = admission.decision.forward_key
        self.allowed = forward_key.models if forward_key is not None else None
        self.max_message = min(MAX_MESSAGE, config.max_body_size)
        self.headers: list | None = None
        self.pending: defer.Deferred | None = None
        self.upstream = None
        self.client = None
        self.waiting: list[tuple[bytes, bool]] = []  # upstream frames that came before the client's socket opened
        self.status = 0
        self.ttfb: float | None = None
        self.sent = 0
        self.gone: set[str] = set()
        self.ended_by: tuple | None = None
        self.error: str | None = None
        self.done = False
        self.left_early = False
        self.last_frame = self.started
        self.idle = None
        self.tokens = [0, 0, 0]
        self.reported = False
        # With token limits or a budget, the tokens of each response are charged when it is done, on a ticket of
        # their own (fwd.quota.Plan.charges: no request counted, no parallel slot; the session's own ticket keeps
        # its slot until it ends); the next such ticket is the check that the caller may go on.
        self.plan = plan.charges() if plan is not None and (plan.tokens or plan.budget) else None
        self.segment = None  # the ticket the next response's tokens are charged on
        self.stopped = False  # its caller was refused more: what comes is charged on the session's ticket
        self.charged = [0, 0, 0]  # what has been charged on segment tickets
        self.client_full = None  # the WhileFull of the client's socket
        self.client_gate = None
        self.quieted = False  # the client's reading is paused until it reads what the proxy queued for it
        self.transcript = None
        if gateway.log_chat:
            self.transcript = SessionTranscript(
                uid=f"{UID_PREFIX}{next(uid_counter):010x}", time=time.time(), client=admission.client,
                caller=admission.caller, route=active.route.name, path=request.path.decode("latin-1"),
                model=self.model)

    # -- before the upgrade ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.gateway.exchange_started()
        self.gateway.sessions += 1
        self.request.notifyFinish().addErrback(self._left_early)
        try:
            self._attempt()
        except Exception as e:
            log.error("a Realtime session failed before connecting: {problem}", problem=type(e).__name__)
            self._refuse(errors.internal())

    def _left_early(self, reason) -> None:
        """The client left before its upgrade was answered."""
        if self.client is not None or self.done:
            return
        self.left_early = True
        if self.pending is not None:
            self.attempts.left()
            pending, self.pending = self.pending, None
            pending.cancel()
        self._end(partial=True, error="client disconnected")

    def _attempt(self) -> None:
        if self.headers is None:
            request = self.request
            self.headers = upstream_headers(
                request.requestHeaders.getAllRawHeaders(), hop_prefix=self.gateway.hop_prefix, host=None,
                decision=self.admission.decision, from_api_key=self.admission.from_api_key,
                proxy_keys=bool(self.config.proxy_keys))
        outcome = self.attempts.next(self.headers)
        if isinstance(outcome, errors.ProxyError):
            self._refuse(outcome)
            return
        headers, agent, origin = handshake_headers(outcome)
        factory = UpstreamFactory(self, socket_url(self.attempts.url), protocols=passed_on(self.protocols),
                                  headers=headers, useragent=agent, origin=origin, max_message=self.max_message,
                                  reactor=self.clock)
        left = max(self._time_left(), 0.001)
        # The endpoint (and its TLS policy) that relayed HTTP requests use for this upstream.
        endpoint = UpstreamEndpoints(self.clock, left).endpointForURI(URI.fromBytes(self.attempts.url))
        connecting = endpoint.connect(factory)
        opening = connecting.addCallback(lambda _: factory.opening)
        opening.addTimeout(left, self.clock, onTimeoutCancel=self._timed_out)
        self.pending = opening
        opening.addCallbacks(self._opened, self._not_opened)
        opening.addErrback(self._unexpected)

    def _time_left(self) -> float:
        return self.started + self.config.timeout - self.clock.seconds()

    def _timed_out(self, result, timeout):
        return failure.Failure(defer.TimeoutError(f"no upgrade within {self.config.timeout:g} s"))

    def _not_opened(self, reason) -> None:
        self.pending = None
        if self.left_early:
            return
        attempts = self.attempts
        if reason.check(Refused):
            refusal = reason.value
            if refusal.status >= 500:
                attempts.failed(f"answered {refusal.status}")
                if attempts.can_fail_over() and self._time_left() > 0:
                    attempts.fail_over()
                    self._attempt()
                    return
            else:
                attempts.answered()
            if attempts.key is not None and refusal.status in keys.RETRY_STATUSES:
                retry_after = keys.retry_after_seconds(refusal.header(b"retry-after"), time.time())
                if attempts.refused(refusal.status, refusal.body, retry_after) == "replay":
                    self._attempt()
                    return
            self._pass_on(refusal)
            return
        base = attempts.name
        if reason.check(defer.TimeoutError):
            error = errors.upstream_timeout(base, self.config.timeout)
        else:
            why = "DNS lookup failed" if reason.check(DNSLookupError) else (
                "refused the WebSocket" if reason.check(HandshakeFailed) else reason.value.__class__.__name__)
            error = errors.upstream_unreachable(base, why)
        log.warn("upstream {url} failed a Realtime session: {why}", url=base, why=error.message)
        attempts.failed(error.code or "failed")
        if attempts.can_fail_over() and self._time_left() > 0:
            attempts.fail_over()
            self._attempt()
            return
        self._refuse(error)

    def _unexpected(self, reason) -> None:
        log.error("a Realtime session failed: {problem}", problem=reason.type.__name__)
        if self.done or self.left_early:
            return
        if self.client is None:
            self._refuse(errors.internal())
        elif not self.client.opened:
            self.lost("client", False)

    def _refuse(self, error: errors.ProxyError) -> None:
        """Answer the upgrade with an error of the proxy's own."""
        self.status = error.status
        send_error(self.request, error)
        self._end(partial=False, error=error.message)

    def _pass_on(self, refusal: Refused) -> None:
        """Answer the upgrade with the upstream's refusal (its body masked: it may quote the key it refused)."""
        request = self.request
        self.status = refusal.status
        self.ttfb = self.clock.seconds()
        request.setResponseCode(refusal.status, clean_phrase(refusal.phrase or b"-"))
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in refusal.headers:
            grouped.setdefault(name, []).append(value)
        for name, values in response_headers(grouped.items(), None):
            if name not in (b"content-length", b"transfer-encoding", b"content-encoding") and not (
                    self.ticket is not None and name.startswith(b"x-ratelimit-")):
                request.responseHeaders.setRawHeaders(name, values)
        body = KeyMasker(self.secrets()).whole(refusal.body)
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self._limit_headers_on(request)
        request.write(body)
        self.sent = len(body)
        request.finish()
        self._end(partial=False, error=f"upstream refused the upgrade ({refusal.status})")

    def _limit_headers_on(self, request) -> None:
        if self.ticket is not None:
            for name, value in self.ticket.headers():
                request.responseHeaders.setRawHeaders(name, [value])

    def secrets(self) -> list[str]:
        return [key for key in (self.attempts.key, self.admission.decision.client_key) if key]

    def _opened(self, upstream) -> None:
        """The upstream accepted the session: accept the client's upgrade."""
        self.pending = None
        attempts = self.attempts
        attempts.answered()
        if attempts.key is not None:
            attempts.succeeded()
        self.upstream = upstream
        if self.left_early or self.done:
            upstream.sendCloseFrame(1001, b"client went away")
            return
        self.ttfb = self.clock.seconds()
        request = self.request
        if self.transcript is not None:
            self.transcript.opened(101, (self.ttfb - self.started) * 1000)
        content = request.content
        if content is not None and hasattr(content, "close"):
            content.close()
        site = getattr(request.channel, "site", None)
        client = client_factory(self.max_message, self.clock).buildProtocol(request.getClientAddress())
        client.session = self
        self.client = client
        connections = getattr(site, "connections", None)
        if connections is not None:
            connections.add(self)  # a graceful shutdown closes the session (see `close`)
        take_over(request, client)

    def accepting(self):
        """What the client's handshake answer says: the subprotocol accepted, and a limited caller's limits."""
        headers = {}
        if self.ticket is not None:
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in self.ticket.headers()}
        return echoed(self.protocols), headers

    # -- the open session --------------------------------------------------------------------------------------

    def client_opened(self, client) -> None:
        self.status = 101
        upstream = self.upstream
        # A side whose write buffer is full stops the reading of the other side, whose frames wait in its socket.  A
        # client that reads nothing while the proxy answers it itself (pongs, errors) stops being read too.
        self.client_gate = ReadGate(client.transport)
        upstream_gate = ReadGate(upstream.transport)
        self.client_full = WhileFull([upstream_gate], on_resume=self._client_reads)
        client.transport.registerProducer(self.client_full, True)
        upstream.transport.registerProducer(WhileFull([self.client_gate]), True)
        if self.plan is not None:
            self._next_segment()
        self.idle = self.clock.callLater(self.config.idle_timeout, self._check_idle)
        waiting, self.waiting = self.waiting, []
        for payload, binary in waiting:
            self._to_client(payload, binary)
        if upstream.state != _OPEN:
            self.closed_by("upstream", upstream.remoteCloseCode, upstream.remoteCloseReason)

    def touch(self) -> None:
        self.last_frame = self.clock.seconds()

    def client_ping(self) -> None:
        """The client pinged: its pong is queued to it."""
        self.last_frame = self.clock.seconds()
        self._answering_client()

    def _answering_client(self) -> None:
        """The proxy queues a frame of its own to the client: while the client reads nothing, read nothing of it."""
        full = self.client_full
        if full is not None and full.paused and not self.quieted:
            self.quieted = True
            self.client_gate.close()

    def _client_reads(self) -> None:
        if self.quieted:
            self.quieted = False
            self.client_gate.open()

    def from_client(self, payload: bytes, binary: bool) -> None:
        self.last_frame = self.clock.seconds()
        if self.allowed is not None:
            # Binary frames too: an upstream may read JSON in either.
            why = model_refusal(payload, self.allowed, binary)
            if why is not None:
                self._to_client(error_event(why, "model_not_allowed", client_event_id(payload)), False)
                self._answering_client()
                return
        if self.transcript is not None:
            self._transcribe(self.transcript.from_client, payload, binary)
        upstream = self.upstream
        if upstream is not None and upstream.state == _OPEN:
            upstream.sendMessage(payload, binary)

    def from_upstream(self, payload: bytes, binary: bool) -> None:
        self.last_frame = self.clock.seconds()
        used = None if binary else response_usage(payload)
        if used is not None:
            self.reported = True
            tokens = self.tokens
            tokens[0] += used.input_tokens
            tokens[1] += used.output_tokens
            tokens[2] += used.total_tokens
        if self.transcript is not None:
            self._transcribe(self.transcript.from_upstream, payload, binary)
        if self.client is None or not self.client.opened:
            self.waiting.append((payload, binary))
        else:
            self._to_client(payload, binary)
        if used is not None and self.plan is not None:
            self._charge()

    def _transcribe(self, feed, payload: bytes, binary: bool) -> None:
        """Feed the transcript; a frame it cannot take ends the transcript, never the session."""
        try:
            feed(payload, binary)
        except Exception as e:
            log.error("a Realtime transcript failed: {problem}; the session goes on without it",
                      problem=type(e).__name__)
            self.transcript = None

    def _charge(self) -> None:
        """Charge what the session used since the last charge on the current segment ticket, then take the next
        one.  Without a segment (its admission is on its way, or the caller was refused more), the tokens wait:
        the next charge, or the session's own ticket at its end, takes them."""
        segment, self.segment = self.segment, None
        if segment is None:
            return
        left = [a - b for a, b in zip(self.tokens, self.charged)]
        self.gateway.quota.settle(segment, left[2], self._cost(left[0], left[1]))
        self.charged = list(self.tokens)
        self._next_segment()

    def _next_segment(self) -> None:
        if self.stopped or self.done:
            return
        deciding = self.gateway.quota.admit(self.plan, NOTHING_RESERVED)
        if isinstance(deciding, defer.Deferred):
            deciding.addCallback(self._segment).addErrback(self._segment_failed)
        else:
            self._segment(deciding)

    def _segment_failed(self, reason) -> None:
        log.error("a Realtime session's limits could not be asked: {problem}", problem=reason.type.__name__)
        self.stopped = True  # what it uses from now on is charged when it ends

    def _segment(self, outcome) -> None:
        if not isinstance(outcome, (Refusal, errors.ProxyError)):
            if self.done:
                self.gateway.quota.release(outcome)  # it reserved nothing: the session's ticket took the rest
            else:
                self.segment = outcome
            return
        self.stopped = True
        if self.done:
            return
        error = refused(outcome) if isinstance(outcome, Refusal) else outcome
        code = error.code or "rate_limit_exceeded"
        log.info("Realtime session of {caller} closed: {code}", caller=self.admission.caller, code=code)
        self._to_client(error_event(error.message, code), False)
        self.close(code, 1008)

    def _cost(self, input_tokens: int, output_tokens: int) -> float | None:
        price = price_for(self.config.prices, self.model) if self.config.prices else None
        return price.cost(input_tokens, output_tokens) if price is not None else None

    def _to_client(self, payload: bytes, binary: bool) -> None:
        client = self.client
        if client is not None and client.state == _OPEN:
            client.sendMessage(payload, binary)
            self.sent += len(payload)

    def closed_by(self, side: str, code: int | None, reason: str | None) -> None:
        """`side` sent a close frame: the other side gets the same code and reason."""
        if self.ended_by is None:
            self.ended_by = (side, code, reason)
            if self.transcript is not None:
                self.transcript.closed(side, code, reason)
        peer = self.upstream if side == "client" else self.client
        if peer is not None and (side == "client" or peer.opened):
            close(peer, code, reason)

    def lost(self, side: str, clean: bool) -> None:
        """`side`'s connection ended; once both have, the session ends."""
        if side in self.gone:
            return
        self.gone.add(side)
        if side == "client" and self.client is not None and not self.client.opened:
            # The client's handshake failed after the upstream had accepted: nothing to relay.
            self.gone.add("upstream")
            if self.upstream is not None:
                self.upstream.dropConnection(abort=True)
            self.error = "client handshake failed"
            self.status = 400  # autobahn answered the handshake it refused with a 400
        elif not clean or self.ended_by is None:
            other = self.upstream if side == "client" else self.client
            socket = self.client if side == "client" else self.upstream
            failed = getattr(socket, "localCloseCode", None) if getattr(socket, "closedByMe", False) else None
            if failed is not None and failed != 1001:
                # autobahn failed the connection itself (a message past the limit: 1009; a protocol error: 1002).
                why, code = f"{side} connection failed with {failed}", 1001 if side == "client" else 1011
            elif side == "client":
                why, code = "client connection lost", 1001
            else:
                why, code = "upstream connection lost", 1011
                log.warn("upstream {url} lost a Realtime session; closing its client", url=self.attempts.name)
            self.error = self.error or why
            if self.ended_by is None:
                self.ended_by = (side, None, why)
                if self.transcript is not None:
                    self.transcript.closed(side, None, why)
            if other is not None and other.state == _OPEN:
                close(other, code, why)
        if self.gone >= {"client", "upstream"}:
            self._end(partial=self.error is not None, error=self.error)

    def _check_idle(self) -> None:
        self.idle = None
        silent = self.clock.seconds() - self.last_frame
        limit = self.config.idle_timeout
        if silent < limit:
            self.idle = self.clock.callLater(limit - silent, self._check_idle)
            return
        log.info("Realtime session of {client} idle for {seconds:g} s; closing it", client=self.admission.client,
                 seconds=limit)
        self.close("idle timeout")

    @property
    def connected(self) -> bool:
        """Whether the session still holds a connection (a graceful shutdown waits for it to close)."""
        return not self.done

    def close(self, why: str = "server shutting down", code: int = 1001) -> None:
        """Close both sides with `code`: 1001 for an idle session or a graceful shutdown, 1008 for a caller over
        its limits."""
        self.error = self.error or why
        if self.ended_by is None:
            self.ended_by = ("proxy", code, why)
            if self.transcript is not None:
                self.transcript.closed("proxy", code, why)
        for side in (self.client, self.upstream):
            if side is not None and side.state == _OPEN:
                close(side, code, why)

    # -- the end -----------------------------------------------------------------------------------------------

    def _end(self, *, partial: bool, error: str | None) -> None:
        if self.done:
            return
        self.done = True
        gateway = self.gateway
        if self.idle is not None and self.idle.active():
            self.idle.cancel()
        self.idle = None
        now = self.clock.seconds()
        used = None
        cost = None
        if self.reported:
            input_tokens, output_tokens, total = self.tokens
            used = {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": total,
                    "estimated": False}
            cost = self._cost(input_tokens, output_tokens)
        if self.segment is not None:
            gateway.quota.release(self.segment)  # it reserved nothing
            self.segment = None
        if self.ticket is not None:
            left = [a - b for a, b in zip(self.tokens, self.charged)]
            if self.reported:
                gateway.quota.settle(self.ticket, left[2], self._cost(left[0], left[1]))
            else:
                gateway.quota.release(self.ticket)
            self.ticket = None
        if self.transcript is not None and self.status:
            try:
                emit(Ended(self.transcript, partial=partial, error=error, latency_ms=(now - self.started) * 1000,
                           used=used, extra=self._record_extra()))
            except Exception as e:
                log.error("a transcript could not be sent: {problem}", problem=type(e).__name__)
        fields = {}
        if used is not None:
            fields = {"model": self.model or "-", "input_tokens": used["input_tokens"],
                      "output_tokens": used["output_tokens"], "estimated": False, "cost": cost}
        if self.attempts.several and self.attempts.upstream is not None:
            fields["served_by"] = self.attempts.name
        gateway.access.emit(
            method="GET", path=self.request.path.decode("latin-1"), client=self.admission.client,
            status=self.status if self.status and not self.left_early else 499, sent=self.sent, started=self.started,
            now=now, caller=self.admission.caller, route=self.active.route.name, ttfb=self.ttfb, upstream=True,
            **fields)
        gateway.sessions -= 1
        gateway.exchange_ended()

    def _record_extra(self) -> dict | None:
        if self.attempts.several and self.attempts.upstream is not None:
            return {"upstream": self.attempts.name}
        return None


def close(socket, code: int | None, reason: str | None) -> None:
    """Send a close frame with this code and reason (autobahn checked a received code; 1005, none, sends none)."""
    if socket.state != _OPEN:
        return
    reason_bytes = encode_truncate(reason, 123) if reason and code is not None else None
    socket.sendCloseFrame(code=code, reasonUtf8=reason_bytes, isReply=False)

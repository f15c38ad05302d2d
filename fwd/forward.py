"""Forwarding one request upstream and streaming the answer back.  Tests: tests/test_forward.py

The path of a request: `Forwarder.handle` picks the route and applies access control, then an `Exchange`
sends the request upstream on the shared connection pool, replays it on the next pool key after a
429/401/403, and relays the response body chunk by chunk through `Relay`, which registers the upstream
transport as the client's producer so a slow client pauses the upstream instead of filling memory.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from email.utils import parsedate_to_datetime
from urllib.parse import unquote_to_bytes, urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IWriteDescriptor
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python import failure
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.http import HTTPChannel, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from fwd import access, chatlog, errors, keys
from fwd.config import Config, Route
from fwd.headers import is_event_stream, request_headers, response_headers
from fwd.keys import KeyPool
from fwd.transcript import Ended, Transcript, transcript_kind

log = Logger(namespace="fwd.forward")
accessLog = Logger(namespace="fwd.access")

RETRY_STATUSES = frozenset({401, 403, 429})
REFUSAL_LIMIT = 64 * 1024
# Transcript uids: random per process, then counted; unique across workers and restarts, and cheap.
UID_PREFIX = os.urandom(6).hex()
uid_counter = itertools.count()
JSON = [b"application/json"]


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, body: bytes):
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@attrs.define
class ActiveRoute:
    """A configured route with what it needs at run time: its key pool and forward-key table."""

    route: Route
    pool: KeyPool
    table: access.ForwardKeyTable
    prefix: bytes
    base: bytes
    host: bytes

    @classmethod
    def build(cls, route: Route, clock) -> ActiveRoute:
        return cls(
            route=route,
            pool=KeyPool(route.api_keys, clock),
            table=access.ForwardKeyTable(route.forward_keys),
            prefix=route.prefix.encode(),
            base=route.base_url.encode(),
            host=host_header(route.base_url),
        )

    def matches(self, path: bytes) -> bool:
        prefix = self.prefix
        return not prefix or path == prefix or path.startswith(prefix + b"/")

    def upstream_url(self, uri: bytes) -> bytes:
        rest = uri[len(self.prefix) :]
        if not rest.startswith(b"/"):
            rest = b"/" + rest
        return self.base + rest


def host_header(base_url: str) -> bytes:
    """The Host an upstream expects: its host name, and its port unless that is the scheme's default."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    name = host.encode() if host.isascii() else host.encode("idna")
    if b":" in name:
        name = b"[" + name + b"]"
    port = parts.port
    if port is None or (parts.scheme, port) in (("http", 80), ("https", 443)):
        return name
    return b"%s:%d" % (name, port)


def escapes(path: bytes) -> bool:
    """Whether a path has dot-segments, plain or percent-encoded, that could climb out of a prefix."""
    if b"." not in path and b"%" not in path and b"\\" not in path:
        return False
    decoded = unquote_to_bytes(path).replace(b"\\", b"/")
    return any(segment in (b".", b"..") for segment in decoded.split(b"/"))


def retry_after_seconds(values: list[bytes] | None, now: float) -> float | None:
    """Parse a Retry-After header: seconds or an HTTP date."""
    if not values:
        return None
    text = values[0].decode("latin-1").strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - now)
    except (TypeError, ValueError, IndexError):
        return None


def describe_failure(reason) -> str:
    """A short, secret-free phrase for why the upstream could not be reached."""
    if reason.check(DNSLookupError):
        return "DNS lookup failed"
    if reason.check(ConnectError):
        return reason.value.__class__.__name__.replace("Error", "").lower() or "connect failed"
    if reason.check(ResponseNeverReceived):
        return "connection closed before a response"
    return reason.value.__class__.__name__


def log_access(request, *, client: str, status: int, sent: int, started: float, now: float, caller: str,
               route: str, ttfb: float | None = None, upstream: bool = False) -> None:
    """One access-log event per request: the twistd log line and what metrics count. No query, no keys.

    The line is formatted here with %-formatting: the logger's own brace formatting costs a tenth of a
    forwarded request.
    """
    method = request.method.decode("latin-1")
    path = request.path.decode("latin-1")
    duration_ms = (now - started) * 1000
    line = "%s %s %s %d %d %.0fms %s" % (client, method, path, status, sent, duration_ms, caller)
    accessLog.info(
        line.replace("{", "{{").replace("}", "}}"),
        client=client,
        method=method,
        path=path,
        status=status,
        bytes=sent,
        duration_ms=duration_ms,
        ttfb_ms=None if ttfb is None else (ttfb - started) * 1000,
        caller=caller,
        route=route,
        upstream=upstream,
    )


def send_error(request, error: errors.ProxyError) -> None:
    """Answer with a proxy-made OpenAI-shaped error, if the client is still there."""
    if request.finished or request._disconnected:
        return
    body = error.body()
    request.setResponseCode(error.status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", JSON)
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    for name, value in error.headers:
        headers.setRawHeaders(name, [value])
    request.write(body)
    request.finish()


class Forwarder:
    """Everything one daemon shares across requests: routes, access lists, the upstream agent."""

    def __init__(self, config: Config, agent, clock, transcripts: bool | None = None):
        self.agent = agent
        self.clock = clock
        self.transcripts_override = transcripts
        self.in_flight = 0
        self.streams = 0
        self.draining = False
        self._idle_waiters: list[defer.Deferred] = []
        self.routes: list[ActiveRoute] = []
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Serve new requests with this configuration; running exchanges keep theirs, pools keep key states."""
        old = {key: state for active in self.routes for key, state in active.pool.states_by_key().items()}
        self.config = config
        self.routes = [ActiveRoute.build(r, self.clock) for r in sorted(config.routes, key=lambda r: -len(r.prefix))]
        for active in self.routes:
            active.pool.adopt(old)
        self.hop_prefix = config.hop_header_prefix.encode()
        self.transcripts = config.log_chat if self.transcripts_override is None else self.transcripts_override

    def status(self) -> dict:
        """What the daemon is doing now, for /healthz and metrics; never a key."""
        return {
            "in_flight": self.in_flight,
            "streams": self.streams,
            "keys": [(a.route.name, masked, state) for a in self.routes for masked, state in a.pool.states()],
        }

    def exchange_ended(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def drain(self) -> defer.Deferred:
        """Fires once no request is in flight; /healthz says "draining" from now on."""
        self.draining = True
        if not self.in_flight:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def route_for(self, path: bytes) -> ActiveRoute | None:
        for active in self.routes:
            if active.matches(path):
                return active
        return None

    def handle(self, request) -> None:
        """Serve one fully received request: locally, with an error, or by forwarding it."""
        if self.draining and isinstance(request.channel, HTTPChannel):
            # Shutting down: answer, then close, so keep-alive clients take their next request elsewhere.
            request.channel.persistent = False
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        path = request.path
        if path == b"/healthz":
            return self.health(request)
        if not path.startswith(b"/"):
            return send_error(request, errors.not_found(path.decode("latin-1")))
        if escapes(path):
            return send_error(request, errors.bad_path())
        active = self.route_for(path)
        if active is None:
            return send_error(request, errors.not_found(path.decode("latin-1")))
        config = self.config
        address = request.getClientAddress()
        peer = getattr(address, "host", "unix")
        ip = peer
        if config.trusted_proxies:
            ip = access.client_ip(peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for"), config.trusted_proxies)
        if (config.ip_whitelist or config.ip_blacklist) and not access.ip_allowed(
            ip, config.ip_whitelist, config.ip_blacklist
        ):
            return send_error(request, errors.ip_denied(ip))
        route = active.route
        headers = request.requestHeaders
        credential = None
        from_api_key = False
        if route.kind == "azure":
            api_key = headers.getRawHeaders(b"api-key")
            if api_key:
                credential = api_key[0].decode("latin-1").strip() or None
                from_api_key = credential is not None
        if credential is None:
            authorization = headers.getRawHeaders(b"authorization")
            credential = access.bearer(authorization[0]) if authorization else None
        decision = access.decide(route, active.table, credential, config.proxy_keys)
        if decision.error is not None:
            return send_error(request, decision.error)
        content = request.content
        content.seek(0)
        body = content.read()
        forward_key = decision.forward_key
        if forward_key is not None and forward_key.models is not None:
            model = access.request_model(body, headers.getRawHeaders(b"content-type", [None])[0], path.decode("latin-1"))
            # Reading (listing models, fetching a file) names no model and uses none; anything else must.
            if not forward_key.allows(model) and not (model is None and request.method in (b"GET", b"HEAD")):
                return send_error(request, errors.model_denied(model))
        Exchange(self, active, request, decision, body, ip, from_api_key).start()

    def health(self, request) -> None:
        body = json.dumps(
            {
                "status": "draining" if self.draining else "ok",
                "pid": os.getpid(),
                "in_flight": self.in_flight,
                "streams": self.streams,
                "routes": [
                    {
                        "prefix": a.route.name,
                        "base_url": a.route.base_url,
                        "kind": a.route.kind,
                        "keys": a.pool.health(),
                    }
                    for a in self.routes
                ],
            }
        ).encode()
        request.setResponseCode(503 if self.draining else 200)
        request.responseHeaders.setRawHeaders(b"content-type", JSON)
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        request.write(body)
        request.finish()


class Exchange:
    """One client request and its upstream attempts, from sending to the last byte relayed."""

    def __init__(self, forwarder: Forwarder, active: ActiveRoute, request, decision, body: bytes, ip, from_api_key):
        self.forwarder = forwarder
        self.config = forwarder.config
        self.active = active
        self.request = request
        request.exchange = self
        self.decision = decision
        self.body = body
        self.ip = ip
        self.from_api_key = from_api_key
        self.clock = forwarder.clock
        self.started = self.clock.seconds()
        self.key: str | None = None
        self.tried: set[str] = set()
        self.pending: defer.Deferred | None = None
        self.relay: Relay | None = None
        self.client_gone = False
        self.done = False
        self.status = 0
        self.sent = 0
        self.transcript = None
        self.stream = False
        self.ttfb: float | None = None
        self.url = active.upstream_url(request.uri)
        self.headers = self._upstream_headers()

    def _upstream_headers(self) -> list[tuple[bytes, list[bytes]]]:
        decision = self.decision
        config = self.config
        substitute = decision.use_pool or bool(config.proxy_keys)
        headers = request_headers(
            self.request.requestHeaders.getAllRawHeaders(), self.forwarder.hop_prefix, drop_credentials=substitute
        )
        headers.append((b"host", [self.active.host]))
        if substitute and decision.client_key is not None:
            if self.from_api_key:
                headers.append((b"api-key", [decision.client_key.encode("latin-1")]))
            else:
                headers.append((b"authorization", [b"Bearer " + decision.client_key.encode("latin-1")]))
        if self.forwarder.transcripts and self.request.method == b"POST" and self._start_transcript():
            headers = [(n, v) for n, v in headers if n != b"accept-encoding"]
            headers.append((b"accept-encoding", [b"identity"]))
        return headers

    def _start_transcript(self) -> bool:
        path = self.request.path.decode("latin-1")
        kind = transcript_kind(path)
        if kind is None:
            return False
        ctype = self.request.requestHeaders.getRawHeaders(b"content-type", [b""])[0].decode("latin-1")
        self.transcript = Transcript(
            kind=kind,
            uid=f"{UID_PREFIX}{next(uid_counter):010x}",
            time=time.time(),
            client=self.ip,
            caller=self.decision.caller,
            route=self.active.route.name,
            path=path,
            request_body=self.body,
            request_content_type=ctype or None,
        )
        return True

    def start(self) -> None:
        self.forwarder.in_flight += 1
        self.request.notifyFinish().addErrback(self._client_lost)
        self._attempt()

    def _attempt(self) -> None:
        headers = list(self.headers)
        if self.decision.use_pool:
            pool = self.active.pool
            key = pool.pick(self.tried)
            if key is None:
                wait = pool.retry_after()
                return self._fail(errors.keys_exhausted(wait, rate_limited=not pool.all_disabled()))
            self.key = key
            self.tried.add(key)
            if self.active.route.kind == "azure":
                headers.append((b"api-key", [key.encode("latin-1")]))
            else:
                headers.append((b"authorization", [b"Bearer " + key.encode("latin-1")]))
        method = self.request.method
        body = self.body
        producer = BytesProducer(body) if body or method in (b"POST", b"PUT", b"PATCH") else None
        forwarder = self.forwarder
        d = forwarder.agent.request(method, self.url, Headers(dict(headers)), producer)
        d.addTimeout(self.config.timeout, self.clock, onTimeoutCancel=self._timed_out)
        self.pending = d
        d.addCallbacks(self._response, self._request_failed)
        d.addErrback(self._unexpected)

    @staticmethod
    def _timed_out(result, timeout):
        return failure.Failure(defer.TimeoutError(f"no response headers within {timeout} s"))

    def _response(self, response) -> None:
        self.pending = None
        if self.client_gone:
            response.deliverBody(Discard())
            return
        status = response.code
        key = self.key
        if key is not None:
            if status in RETRY_STATUSES:
                # Read the (small) refusal before judging the key: quota, revocation and region differ.
                collect = Collect(REFUSAL_LIMIT)
                response.deliverBody(collect)
                collect.done.addCallback(lambda body: self._refused(response, body)).addErrback(self._unexpected)
                return
            if status < 400:
                self.active.pool.succeeded(key)
        self._start_response(response)
        self.relay = Relay(self)
        response.deliverBody(self.relay)

    def _refused(self, response, body: bytes) -> None:
        """A pool key was refused: rest or reject it and replay on the next key, or pass the answer on."""
        if self.client_gone:
            self._end(partial=True, error="client disconnected")
            return
        pool = self.active.pool
        judged = keys.verdict(response.code, body)
        if judged == "relay":
            self._start_response(response)
            self.request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
            self.request.write(body)
            self.sent = len(body)
            if self.transcript is not None:
                self.transcript.feed(body)
            self.request.finish()
            self._end(partial=False, error=None)
            return
        if judged == "rest":
            retry = retry_after_seconds(response.headers.getRawHeaders(b"retry-after"), time.time())
            pool.rate_limited(self.key, retry)
        else:
            pool.rejected(self.key, response.code)
        self._attempt()

    def _start_response(self, response) -> None:
        """Send the upstream's status and end-to-end headers to the client."""
        status = response.code
        self.ttfb = self.clock.seconds()
        self.status = status
        request = self.request
        request.setResponseCode(status, response.phrase)
        out = request.responseHeaders
        for name, values in response_headers(response.headers.getAllRawHeaders()):
            out.setRawHeaders(name, values)
        content_type = response.headers.getRawHeaders(b"content-type")
        stream = is_event_stream(content_type)
        if stream:
            out.setRawHeaders(b"x-accel-buffering", [b"no"])
            self.stream = True
            self.forwarder.streams += 1
        elif response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
            out.setRawHeaders(b"content-length", [b"%d" % response.length])
        if self.transcript is not None:
            self.transcript.response_started(
                status,
                content_type[0].decode("latin-1") if content_type else None,
                (self.ttfb - self.started) * 1000,
                stream,
            )

    def _request_failed(self, reason) -> None:
        self.pending = None
        if self.client_gone:
            return
        base = self.active.route.base_url
        if reason.check(defer.TimeoutError):
            error = errors.upstream_timeout(base, self.config.timeout)
        else:
            error = errors.upstream_unreachable(base, describe_failure(reason))
        log.warn("upstream {url} failed: {why}", url=base, why=error.message)
        self._fail(error)

    def _unexpected(self, reason) -> None:
        log.failure("forwarding failed", reason)
        if not self.client_gone:
            self._fail(errors.ProxyError(500, "The proxy failed; see its log.", type="server_error"))

    def _fail(self, error: errors.ProxyError) -> None:
        self.status = error.status
        send_error(self.request, error)
        self._end(partial=False, error=error.message, body=error.body())

    def _client_lost(self, reason) -> None:
        self.client_gone = True
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()
            self._end(partial=True, error="client disconnected")
        elif self.relay is not None:
            self.relay.stop()

    def body_done(self, reason) -> None:
        """The upstream body ended: finish cleanly, or make the client see a broken stream."""
        request = self.request
        if not request._disconnected:
            request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            if not request._disconnected and not request.finished:
                request.finish()
            self._end(partial=self.client_gone, error="client disconnected" if self.client_gone else None)
            return
        if self.client_gone:
            self._end(partial=True, error="client disconnected")
            return
        why = "upstream went silent" if self.relay is not None and self.relay.timed_out else "upstream connection lost"
        log.warn("{why} mid-body on {url}; aborting the client connection", why=why, url=self.active.route.base_url)
        abort(request)
        self._end(partial=True, error=why)

    def _end(self, *, partial: bool, error: str | None, body: bytes | None = None) -> None:
        if self.done:
            return
        self.done = True
        forwarder = self.forwarder
        if self.stream:
            forwarder.streams -= 1
        now = self.clock.seconds()
        if self.transcript is not None:
            transcript = self.transcript
            if self.ttfb is None:
                transcript.response_started(self.status, "application/json", (now - self.started) * 1000)
                if body:
                    transcript.feed(body)
            try:
                chatlog.emit(Ended(transcript, partial=partial, error=error, latency_ms=(now - self.started) * 1000))
            except Exception:
                log.failure("transcript could not be built")
        log_access(
            self.request,
            client=self.ip,
            status=self.status if self.status and not (partial and self.client_gone) else 499,
            sent=self.sent,
            started=self.started,
            now=now,
            caller=self.decision.caller,
            route=self.active.route.name,
            ttfb=self.ttfb,
            upstream=True,
        )
        forwarder.exchange_ended()


def abort(request) -> None:
    """Break the client's connection so a truncated answer never looks complete."""
    channel = request.channel
    if channel is None:
        return
    abort_stream = getattr(channel, "abortConnection", None)
    if abort_stream is not None:
        abort_stream()
    elif channel.transport is not None:
        transport = channel.transport
        if IWriteDescriptor.providedBy(transport):
            # Hand the kernel what was already relayed: a reset discards anything still in our buffer,
            # and the client should see the partial answer, then the break.
            transport.doWrite()
        transport.abortConnection()


class Discard(Protocol):
    """Reads and drops a response body so its connection can go back to the pool."""

    def connectionLost(self, reason):
        pass


class Collect(Protocol):
    """Reads a short response body (an error) into memory, keeping at most `limit` bytes of it."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done = defer.Deferred()

    def dataReceived(self, data):
        if self.size < self.limit:
            self.parts.append(data[: self.limit - self.size])
        self.size += len(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.parts))


class Relay(Protocol):
    """Streams an upstream response body to the client as it arrives, with the client's backpressure."""

    def __init__(self, exchange: Exchange):
        self.exchange = exchange
        self.request = exchange.request
        self.transcript = exchange.transcript
        self.timed_out = False
        self.idle = None
        self.send = self._first_write

    def connectionMade(self):
        exchange = self.exchange
        if exchange.client_gone:
            self.transport.stopProducing()
            return
        self.request.registerProducer(self.transport, True)
        self.idle_timeout = exchange.config.idle_timeout
        self.idle = exchange.clock.callLater(self.idle_timeout, self._silent)

    def dataReceived(self, data):
        exchange = self.exchange
        if exchange.client_gone:
            return
        self.send(data)
        exchange.sent += len(data)
        if self.transcript is not None:
            self.transcript.feed(data)
        self.idle.reset(self.idle_timeout)

    def _first_write(self, data: bytes) -> None:
        """The first write sends the headers; later ones can skip twisted.web's per-write bookkeeping."""
        request = self.request
        request.write(data)
        channel = request.channel
        if not isinstance(channel, HTTPChannel) or request.method == b"HEAD" or channel.transport is None:
            self.send = request.write
        elif request.chunked:
            write = channel.transport.write
            self.send = lambda data: write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.send = channel.transport.write

    def connectionLost(self, reason):
        if self.idle is not None and self.idle.active():
            self.idle.cancel()
        self.exchange.body_done(reason)

    def _silent(self):
        self.timed_out = True
        self.stop()

    def stop(self):
        """Stop reading the upstream body and close its connection."""
        if self.idle is not None and self.idle.active():
            self.idle.cancel()
        if self.transport is not None:
            self.transport.stopProducing()

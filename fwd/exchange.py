"""One forwarded request: its upstream attempts, the answer's head to the client, and how it ended.
Tests: tests/test_forward.py

The body is relayed by fwd.relay.Relay; which pool key each attempt uses, and what a refusal means for the
key, is fwd.keys.KeyAttempts' business.
"""

from __future__ import annotations

import itertools
import os
import time

from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.logger import Logger
from twisted.python import failure
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from fwd import access, cache, errors, keys
from fwd.answers import send_error
from fwd.body import BytesProducer, RequestBody, body_producer
from fwd.caching import Capture, EntrySender
from fwd.failover import UpstreamAttempts
from fwd.headers import (
    clean_phrase,
    is_event_stream,
    response_headers,
    upstream_headers,
)
from fwd.intake import body_size
from fwd.limits import price_for
from fwd.masking import KeyMasker
from fwd.metering import Metering, wants_usage_injected, with_usage_asked
from fwd.relay import Collect, Discard, Relay, abort
from fwd.transcripts.assembly import Ended, Transcript, transcript_kind
from fwd.transcripts.events import emit

log = Logger(namespace="fwd.exchange")

REFUSAL_LIMIT = 64 * 1024
# A cache hit this large or smaller is written at once; a larger one as the client reads it.
REPLAY_AT_ONCE = 256 * 1024
# Transcript uids: random per process, then counted; unique across workers and restarts, and cheap.
UID_PREFIX = os.urandom(6).hex()
uid_counter = itertools.count()
# What of a request body a transcript keeps: a record holds at most this much of anything.
TRANSCRIPT_LIMIT = 1_048_576


def describe_failure(reason) -> str:
    """A short, secret-free phrase for why the upstream could not be reached."""
    if reason.check(DNSLookupError):
        return "DNS lookup failed"
    if reason.check(ConnectError):
        return reason.value.__class__.__name__.replace("Error", "").lower() or "connect failed"
    if reason.check(ResponseNeverReceived):
        return "connection closed before a response"
    return reason.value.__class__.__name__


class Exchange:
    """One client request and its upstream attempts, from sending to the last byte relayed."""

    # One Exchange lives as long as its answer: slots instead of a __dict__ keep a held stream ~1.2 KB smaller.
    __slots__ = (
        "active", "admission", "attempts", "body", "body_size", "cached", "capture", "client_gone", "clock",
        "config", "data_loss", "done", "facts", "gateway", "headers", "hit", "leading", "masker", "metering",
        "pending", "relay", "replaying", "request", "sent", "started", "status", "stored_head", "stream", "ticket",
        "transcribed", "transcript", "ttfb", "upstream_body", "waiting",
    )

    def __init__(self, gateway, active, admission: access.Admission, request, target, facts, terms=None, ticket=None,
                 cached=None):
        """`target` says where the request goes upstream, `facts` what was read from its body (fwd.intake),
        `terms` the limits it met and whether its usage is counted, `ticket` its admission (fwd.quota), `cached`
        what the response cache does for it (a fwd.caching.CachePlan, or None)."""
        self.gateway = gateway
        self.config = gateway.config
        self.active = active
        self.admission = admission
        self.request = request
        # Not a reference back to this exchange: with one, each request would end as a reference cycle, left
        # for the garbage collector (whose pauses are a tail of the latency) instead of freed as it ends.
        request.forwarded = True
        self.clock = gateway.clock
        self.started = self.clock.seconds()
        model = facts.values.get("model")
        if model is None and cached is not None:
            model = cached.model
        self.attempts = UpstreamAttempts(active, target, model, admission.decision.use_pool, self.clock)
        self.pending: defer.Deferred | None = None
        self.relay: Relay | None = None
        self.client_gone = False
        self.done = False
        self.status = 0
        self.sent = 0
        self.stream = False
        self.masker: KeyMasker | None = None
        self.ttfb: float | None = None
        self.transcript: Transcript | None = None
        self.facts = facts
        self.ticket = ticket
        self.body = body = request.content
        self.body_size = body_size(body)
        self.cached = cached
        self.waiting: defer.Deferred | None = None  # the cache's answer on its way
        self.leading = False  # the one request of its burst that goes upstream for the cache
        self.capture: Capture | None = None
        self.stored_head: tuple = ()
        self.hit = False
        self.data_loss = False  # the upstream closed a body of unknown length: it may be cut short
        self.replaying: EntrySender | None = None
        self.upstream_body: bytes | None = cached.body if cached is not None else None
        self.metering: Metering | None = None
        if terms is not None and terms.metered:
            self.metering = self._meter(terms)
        self.headers: list | None = None  # built when the request goes upstream (a cache hit never does)
        self.transcribed = gateway.log_chat and request.method == b"POST" and self._start_transcript()

    def _upstream_headers(self) -> list:
        """The request's headers for the upstream, before each attempt's Host and key."""
        request = self.request
        headers = upstream_headers(
            request.requestHeaders.getAllRawHeaders(),
            hop_prefix=self.gateway.hop_prefix,
            host=None,  # each upstream's own, per attempt
            decision=self.admission.decision,
            from_api_key=self.admission.from_api_key,
            proxy_keys=bool(self.config.proxy_keys),
        )
        cached = self.cached
        if self.transcribed or self.metering is not None or cached is not None and cached.stores:
            # Transcripts, usage and the cache read the answer: it must come uncompressed.
            headers = [(n, v) for n, v in headers if n != b"accept-encoding"]
            headers.append((b"accept-encoding", [b"identity"]))
        return headers

    def _meter(self, terms) -> Metering:
        """Count this exchange's usage; ask a stream's usage of the upstream when the client did not."""
        facts = self.facts
        injected = False
        body = self.upstream_body if self.upstream_body is not None else facts.body
        if terms.ask_usage and body is not None and wants_usage_injected(terms.kind, facts.values):
            asked = with_usage_asked(body, facts.values)
            if asked is not None:
                self.upstream_body = asked
                injected = True
        return Metering(terms.kind, facts.json_size, injected)

    def _start_transcript(self) -> bool:
        path = self.request.path.decode("latin-1")
        kind = transcript_kind(path)
        if kind is None:
            return False
        ctype = self.request.requestHeaders.getRawHeaders(b"content-type", [b""])[0].decode("latin-1")
        body = self.body
        if body is None:
            start = b""
        elif hasattr(body, "head"):
            start = body.head(TRANSCRIPT_LIMIT)
        else:
            body.seek(0)
            start = body.read(TRANSCRIPT_LIMIT)
        self.transcript = Transcript(
            kind=kind,
            uid=f"{UID_PREFIX}{next(uid_counter):010x}",
            time=time.time(),
            client=self.admission.client,
            caller=self.admission.caller,
            route=self.active.route.name,
            path=path,
            request_body=start,
            request_size=self.body_size,
            request_members=self.facts.members.values if self.facts.members is not None else None,
            request_content_type=ctype or None,
        )
        return True

    def start(self, lookup=None) -> None:
        """Answer the request: from the cache's `lookup` (an entry, or a Deferred of one) when it found one,
        else upstream."""
        self.gateway.exchange_started()
        if isinstance(lookup, defer.Deferred):
            self.waiting = lookup
            lookup.addCallbacks(self._looked_up, self._lookup_failed).addErrback(self._unexpected)
            return
        self._looked_up(lookup)

    def _looked_up(self, entry) -> None:
        self.waiting = None
        if self.client_gone:
            return
        if entry is not None:
            self._replay(entry)
            return
        cached = self.cached
        if cached is not None:
            self.gateway.cache.going_upstream(cached)
            self.leading = cached.stores
        self._attempt()

    def _lookup_failed(self, reason) -> None:
        self.waiting = None
        if reason.check(defer.CancelledError) and self.client_gone:
            return
        log.error("cache lookup failed: {problem}", problem=reason.type.__name__)
        self._looked_up(None)

    def _replay(self, entry: cache.Entry) -> None:
        """Answer from the cache: the stored head and body, with x-fwd-cache: HIT and Age."""
        request = self.request
        self.hit = True
        self.ttfb = now = self.clock.seconds()
        self.status = 200
        request.setResponseCode(200)
        out = request.responseHeaders
        for name, value in entry.headers:
            out.addRawHeader(name, value)
        out.setRawHeaders(b"x-fwd-cache", [cache.HIT])
        out.setRawHeaders(b"age", [cache.age(now, entry.stored_at)])
        if entry.stream:
            out.setRawHeaders(b"x-accel-buffering", [b"no"])
        out.setRawHeaders(b"content-length", [b"%d" % len(entry.body)])
        self._limit_headers()
        if self.transcript is not None:
            content_type = out.getRawHeaders(b"content-type")
            self.transcript.response_started(200, content_type[0].decode("latin-1") if content_type else None, 0.0,
                                             entry.stream)
            self.transcript.feed(entry.body)
        if len(entry.body) <= REPLAY_AT_ONCE:
            request.write(entry.body)
            self.sent = len(entry.body)
            request.finish()
            self._end(partial=False, error=None)
            return
        # A large entry goes as the client reads it: a client that stops reading holds no copy of it.
        self.replaying = EntrySender(entry.body, request, self.clock, self.config.idle_timeout)
        self.replaying.done.addCallback(self._replayed)

    def _replayed(self, sent: int) -> None:
        self.sent = sent
        self.replaying = None
        if self.client_gone:
            self._end(partial=True, error="client disconnected")
            return
        self.request.finish()
        self._end(partial=False, error=None)

    def _attempt(self) -> None:
        if self.headers is None:
            self.headers = self._upstream_headers()
        outcome = self.attempts.next(self.headers)
        if isinstance(outcome, errors.ProxyError):
            return self._fail(outcome)
        method = self.request.method
        producer = None
        if self.upstream_body is not None:
            producer = BytesProducer(self.upstream_body)
        elif self.body_size or method in (b"POST", b"PUT", b"PATCH"):
            producer = body_producer(self.body, self.gateway.cooperator) if self.body is not None else BytesProducer(b"")
        d = self.gateway.agent.request(method, self.attempts.url, Headers(dict(outcome)), producer)
        # TIMEOUT bounds the whole wait for response headers, across replays on other keys and upstreams.
        d.addTimeout(max(self._time_left(), 0.001), self.clock, onTimeoutCancel=self._timed_out)
        self.pending = d
        d.addCallbacks(self._response, self._request_failed)
        d.addErrback(self._unexpected)

    def _time_left(self) -> float:
        return self.started + self.config.timeout - self.clock.seconds()

    def _timed_out(self, result, timeout):
        timeout = self.config.timeout
        return failure.Failure(defer.TimeoutError(f"no response headers within {timeout} s"))

    def _response(self, response) -> None:
        self.pending = None
        if self.client_gone:
            response.deliverBody(Discard())
            return
        status = response.code
        attempts = self.attempts
        if status >= 500 and self._fails_over(status):
            response.deliverBody(Discard())
            self._attempt()
            return
        if status < 500:
            attempts.answered()
        if self.attempts.key is not None:
            if status in keys.RETRY_STATUSES:
                # Read the (small) refusal before judging the key: quota, revocation and region differ.
                collect = Collect(REFUSAL_LIMIT)
                response.deliverBody(collect)
                collect.done.addCallback(lambda body: self._refused(response, body)).addErrback(self._unexpected)
                return
            if status < 400:
                self.attempts.succeeded()
        self._start_response(response)
        self.relay = Relay(self)
        response.deliverBody(self.relay)

    def _fails_over(self, status: int) -> bool:
        """A 5xx: rest the upstream; True when the request goes to another one instead of relaying it."""
        attempts = self.attempts
        attempts.failed(f"answered {status}")
        if self.request.method == b"POST" and not self.active.route.retry_post_5xx:
            return False
        if not attempts.can_fail_over() or self._time_left() <= 0:
            return False
        log.warn("upstream {url} answered {status}; trying another", url=attempts.name, status=status)
        attempts.fail_over()
        return True

    def _refused(self, response, body: bytes) -> None:
        """A pool key was refused: rest or reject it and replay on the next key, or pass the answer on."""
        if self.client_gone:
            self._end(partial=True, error="client disconnected")
            return
        retry_after = keys.retry_after_seconds(response.headers.getRawHeaders(b"retry-after"), time.time())
        if self.attempts.refused(response.code, body, retry_after) == "replay":
            self._attempt()
            return
        self._start_response(response)
        body = self.masker.whole(body)
        self.request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.request.write(body)
        self.sent = len(body)
        if self.transcript is not None:
            self.transcript.feed(body)
        self.request.finish()
        self._end(partial=False, error=None)

    def secrets(self) -> list[str]:
        """The keys the upstream saw on this exchange, which an error body could quote back."""
        return [key for key in (self.attempts.key, self.admission.decision.client_key) if key]

    def _start_response(self, response) -> None:
        """Send the upstream's status and end-to-end headers to the client.  An error's body may quote the key
        it refused: it is relayed masked (fwd.masking), so its length is not known in advance."""
        self._let_go_of_body()
        status = response.code
        self.masker = KeyMasker(self.secrets()) if status >= 400 else None
        self.ttfb = self.clock.seconds()
        self.status = status
        request = self.request
        request.setResponseCode(status, clean_phrase(response.phrase))
        out = request.responseHeaders
        ticket = self.ticket
        for name, values in response_headers(response.headers.getAllRawHeaders(), getattr(response, "connection", None)):
            if ticket is not None and name.startswith(b"x-ratelimit-"):
                continue  # a limited caller sees its own limits, in OpenAI's header names, not the organisation's
            out.setRawHeaders(name, values)
        content_type = response.headers.getRawHeaders(b"content-type")
        stream = is_event_stream(content_type)
        if stream:
            out.setRawHeaders(b"x-accel-buffering", [b"no"])
            self.stream = True
            self.gateway.streams += 1
        elif self.masker is not None and self.masker.keys:
            out.removeHeader(b"content-length")
        elif response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
            out.setRawHeaders(b"content-length", [b"%d" % response.length])
        cached = self.cached
        if cached is not None:
            if self.leading and cache.storable(status, response.headers.getRawHeaders(b"cache-control")):
                self.stored_head = cache.stored_headers(out.getAllRawHeaders())
                self.capture = self.gateway.cache.capture()
            out.setRawHeaders(b"x-fwd-cache", [cached.label])
        if ticket is not None:
            self._limit_headers()
        if self.metering is not None:
            self.metering.started(status, stream)
        if self.transcript is not None:
            self.transcript.response_started(
                status,
                content_type[0].decode("latin-1") if content_type else None,
                (self.ttfb - self.started) * 1000,
                stream,
            )

    def _let_go_of_body(self) -> None:
        """No attempt follows the one being answered: the request body held in memory, the copies read from it
        and the headers built for the attempts are let go, so that a long stream does not hold its prompt (nor
        its share of the memory budget of bodies) until it ends.  A body spooled to a file stays until the
        exchange ends: an upstream may answer before it has read all of it, while its producer still sends."""
        body = self.body
        if isinstance(body, RequestBody) and not body.spooled:
            body.close()
            if self.request.content is body:
                self.request.content = None
            self.body = None
        self.upstream_body = None
        self.headers = None
        if self.facts.body is not None:
            self.facts = self.facts.without_body()

    def _limit_headers(self) -> None:
        """The x-ratelimit-* headers of a limited caller."""
        ticket = self.ticket
        if ticket is None:
            return
        request = self.request
        channel = request.channel
        if hasattr(channel, "head_lines"):
            channel.head_lines = ticket.head_lines()  # the daemon's own channel writes them as they are
        else:
            for name, value in ticket.headers():
                request.responseHeaders.setRawHeaders(name, [value])

    def _request_failed(self, reason) -> None:
        self.pending = None
        if self.client_gone:
            return
        attempts = self.attempts
        base = attempts.name
        if reason.check(defer.TimeoutError):
            error = errors.upstream_timeout(base, self.config.timeout)
        else:
            error = errors.upstream_unreachable(base, describe_failure(reason))
        log.warn("upstream {url} failed: {why}", url=base, why=error.message)
        attempts.failed(error.code or "failed")
        # A POST the upstream may have received (no answer came) is replayed only where the route allows it.
        never_sent = reason.check(ConnectError, DNSLookupError) is not None
        replayable = never_sent or self.request.method != b"POST" or self.active.route.retry_post_5xx
        if replayable and attempts.can_fail_over() and self._time_left() > 0:
            attempts.fail_over()
            self._attempt()
            return
        self._fail(error)

    def _unexpected(self, reason) -> None:
        # The class only: an exception's text may quote the request (its target, a header, a key).
        log.error("forwarding failed: {problem}", problem=reason.type.__name__)
        if not self.client_gone:
            self._fail(errors.internal())

    def _fail(self, error: errors.ProxyError) -> None:
        self.status = error.status
        if self.cached is not None and not self.request.finished:
            self.request.responseHeaders.setRawHeaders(b"x-fwd-cache", [self.cached.label])
        send_error(self.request, error)
        self._end(partial=False, error=error.message, body=error.body())

    def client_lost(self, reason) -> None:
        """The client went away (its notifyFinish errback): stop the upstream side at once."""
        self.client_gone = True
        self.request.gone = True
        if self.waiting is not None:
            # Not cancelled: a Redis lookup goes on to its answer (a cancelled call would count against Redis), a
            # wait for another request's answer is simply not followed.
            self.waiting = None
            self._end(partial=True, error="client disconnected")
        elif self.pending is not None:
            self.attempts.left()
            pending, self.pending = self.pending, None
            pending.cancel()
            self._end(partial=True, error="client disconnected")
        elif self.relay is not None:
            self.relay.stop()
        elif self.replaying is not None:
            self.replaying.stopProducing()

    def client_stalled(self) -> None:
        """The client stopped reading its answer: disconnect it, which ends the exchange as a client that left."""
        log.info("client {client} read nothing for {seconds:g} s; disconnecting it", client=self.admission.client,
                 seconds=self.config.idle_timeout)
        abort(self.request)

    def body_done(self, reason) -> None:
        """The upstream body ended: finish cleanly, or make the client see a broken stream."""
        request = self.request
        if self.relay is not None:
            self.relay.flush()
        if not self.client_gone:
            request.unregisterProducer()
        self.data_loss = reason.check(PotentialDataLoss) is not None
        if reason.check(ResponseDone, PotentialDataLoss):
            if not self.client_gone and not request.finished:
                request.finish()
            self._end(partial=self.client_gone, error="client disconnected" if self.client_gone else None)
            return
        if self.client_gone:
            self._end(partial=True, error="client disconnected")
            return
        why = "upstream went silent" if self.relay is not None and self.relay.timed_out else "upstream connection lost"
        log.warn("{why} mid-body on {url}; aborting the client connection", why=why, url=self.attempts.name)
        abort(request)
        self._end(partial=True, error=why)

    def _end(self, *, partial: bool, error: str | None, body: bytes | None = None) -> None:
        if self.done:
            return
        self.done = True
        gateway = self.gateway
        if self.stream:
            gateway.streams -= 1
        now = self.clock.seconds()
        stored = self._land(partial or error is not None, now) if self.leading else 0
        used = self.metering.usage(partial) if self.metering is not None and not self.hit else None
        cost = None
        if used is not None and self.config.prices:
            price = price_for(self.config.prices, self.facts.values.get("model"))
            cost = price.cost(used.input_tokens, used.output_tokens) if price is not None else None
        if self.ticket is not None:
            if used is not None:
                gateway.quota.settle(self.ticket, used.total_tokens, cost)
            else:
                gateway.quota.release(self.ticket)
        if self.transcript is not None:
            transcript = self.transcript
            if self.ttfb is None:
                transcript.response_started(self.status, "application/json", (now - self.started) * 1000)
                if body:
                    transcript.feed(body)
            try:
                emit(Ended(transcript, partial=partial, error=error, latency_ms=(now - self.started) * 1000,
                           extra=self._record_extra(),
                           used=None if used is None else {
                               "input_tokens": used.input_tokens, "output_tokens": used.output_tokens,
                               "total_tokens": used.total_tokens, "estimated": used.estimated,
                           }))
            except Exception as e:
                log.error("a transcript could not be sent: {problem}", problem=type(e).__name__)
        request = self.request
        gateway.access.emit(
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            client=self.admission.client,
            status=self.status if self.status and not (partial and self.client_gone) else 499,
            sent=self.sent,
            started=self.started,
            now=now,
            caller=self.admission.caller,
            route=self.active.route.name,
            ttfb=self.ttfb,
            upstream=True,
            **(hit_fields(self.cached.model) if self.hit else usage_fields(used, self.facts.values.get("model"), cost)),
            **({} if self.cached is None else cache_fields(self.cached, self.hit, stored)),
            **({"served_by": self.attempts.name} if self.attempts.several and self.attempts.upstream else {}),
        )
        if isinstance(self.body, RequestBody):
            self.body.close()
        self.relay = None  # the relay points back here: without this the pair would wait for the garbage collector
        gateway.exchange_ended()

    def _record_extra(self) -> dict | None:
        """What a transcript record adds: a cache hit, and which of several upstreams answered."""
        extra = {}
        if self.hit:
            extra["cache"] = "hit"
        elif self.attempts.several and self.attempts.upstream is not None:
            extra["upstream"] = self.attempts.name
        return extra or None

    def _land(self, broken: bool, now: float) -> int:
        """Give the cache this answer to keep (a whole 200 it may store), or tell it none came; the bytes kept."""
        capture = self.capture
        entry = None
        if capture is not None:
            if not broken and not self.data_loss and capture.whole and self.status == 200:
                body = capture.body()
                if not self.stream or cache.complete_stream(body):
                    entry = cache.Entry(self.stored_head, body, self.stream, now)
            capture.release()
        return self.gateway.cache.landed(self.cached, entry)


def cache_fields(cached, hit: bool, stored: int) -> dict:
    """The cache fields of an access event (metrics count them): HIT, MISS or SKIP, and the bytes stored."""
    return {"cache": "HIT" if hit else cached.label.decode(), "cache_stored": stored}


def hit_fields(model) -> dict:
    """The usage fields of a cache hit's access event: it reached no upstream and used no tokens."""
    return {"model": model if isinstance(model, str) else "-", "input_tokens": 0, "output_tokens": 0,
            "estimated": False, "cost": None, "cached": True}


def usage_fields(used, model, cost) -> dict:
    """The usage fields of an access event (the usage ledger and the metrics read them), or none."""
    if used is None:
        return {}
    return {
        "model": model if isinstance(model, str) else "-",
        "input_tokens": used.input_tokens,
        "output_tokens": used.output_tokens,
        "estimated": used.estimated,
        "cost": cost,
    }

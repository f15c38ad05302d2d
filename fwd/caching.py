"""The response cache on the request path: what a request asks of it, lookups, one upstream call per burst of
identical misses, and the answers it keeps.  The rules are fwd.cache, the stores fwd.cache_store.
Tests: tests/test_caching.py, tests/test_cache_e2e.py
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from fwd import cache, errors
from fwd.cache import Entry
from fwd.cache_store import MemoryStore, RedisStore
from fwd.intake import body_bytes, body_size, json_object
from fwd.models import body_kind


@attrs.frozen
class CachePlan:
    """What the cache does for one request: `mode` (USE, REFRESH, SKIP), under `key` (None when the request
    cannot be cached: it goes upstream and its answer says SKIP), for `ttl` seconds; `stream` is what the request
    asked; `body`, when the client sent the caching flag, is the body to forward without it; `model`, the model it
    names."""

    mode: str
    key: str | None = None
    ttl: float = 0.0
    stream: bool = False
    body: bytes | None = attrs.field(default=None, repr=False)
    model: str | None = None

    @property
    def stores(self) -> bool:
        return self.key is not None and self.mode != cache.SKIP

    @property
    def label(self) -> bytes:
        """x-fwd-cache of an answer that went upstream."""
        return cache.MISS if self.stores else cache.SKIPPED


SKIPPED = CachePlan(cache.SKIP)
# Scopes remembered (one keyed hash each) before the memory of them starts again: a client sending a new key with
# every request costs a hash a request, as it would without the memory, and no more memory.
MAX_SCOPES = 4096


@attrs.define
class Counts:
    hits: int = 0
    misses: int = 0
    skips: int = 0
    waited: int = 0
    stored: int = 0


class ResponseCache:
    """The gateway's cache: its store (memory, or Redis shared by instances), the misses on their way upstream,
    and its counts."""

    def __init__(self, max_bytes: int, default_ttl: float, clock, secret: bytes):
        self.memory = MemoryStore(max_bytes, clock)
        self.store: MemoryStore | RedisStore = self.memory
        self.default_ttl = default_ttl
        self.clock = clock
        self.secret = secret
        self.flights: dict[str, list[defer.Deferred]] = {}
        self.capturing = 0  # bytes held by the answers being captured now, at most the store's size
        self.scopes: dict = {}  # forward key, or a client's own key (or None: anonymous) -> its scope
        self.counts = Counts()
        self.file = None  # a fwd.cache_store.CacheFile, when entries persist

    def share(self, shared) -> None:
        """Keep entries in Redis (fwd.shared.SharedState) from now on."""
        self.store = RedisStore(shared, self.memory)

    # What a request asks

    def plan(self, request, active, admission, target, facts) -> CachePlan | errors.ProxyError | None:
        """The cache's plan for a request on a route (fwd.gateway.ActiveRoute), an error for a bad x-fwd-cache
        header, or None when the cache has nothing to do with it (its route does not cache and it did not ask)."""
        route = active.route
        header = request.requestHeaders.getRawHeaders(b"x-fwd-cache")
        concerned = route.cache or header is not None
        method = request.method
        if not concerned:
            # The common case, kept cheap: only openai-forward's body flag can involve the cache.
            if method != b"POST" or not flag_in(request, facts):
                return None
        passing = SKIPPED if concerned else None
        document = None
        path = target.path
        cacheable = cache.cacheable_endpoint(method, path)
        if not cacheable:
            if header is None:
                return passing
        elif method == b"POST":
            size = facts.json_size or json_size(request)
            if not size or size > cache.MAX_KEYED_BODY:
                return passing  # not JSON, or more than the cache reads
            document = json_object(facts.body if facts.body is not None else body_bytes(request.content))
            if document is None:
                return passing
        try:
            mode = cache.asked_mode(header, document.get(cache.BODY_FLAG) if document is not None else None)
        except cache.BadCacheHeader as e:
            return errors.bad_cache_header(str(e))
        if not cacheable:
            return passing
        try:
            stripped = cache.without_flag(document) if document is not None and cache.BODY_FLAG in document else None
            canonical = cache.canonical(document) if document is not None else b""
        except cache.Uncanonical:
            return passing  # nested deeper than the cache writes: forwarded as it came
        if mode is None:
            if not route.cache:
                return None if stripped is None else CachePlan(cache.SKIP, body=stripped)
            mode = cache.USE
        if mode == cache.SKIP or document is not None and cache.stateful(document, path):
            return CachePlan(cache.SKIP, body=stripped)
        decision = admission.decision
        shared = route.cache_scope == "shared"
        if shared and decision.client_key is not None:
            # A hit never reaches the upstream, so a shared entry would answer a key nobody checked.
            return CachePlan(cache.SKIP, body=stripped)
        forward_key = decision.forward_key
        if shared:
            scope = cache.caller_scope(True, None, None, self.secret)
        else:
            # One keyed hash per forward key or client key, not per request: the object or the key names it.
            caller = forward_key if forward_key is not None else decision.client_key
            scope = self.scopes.get(caller)
            if scope is None:
                if len(self.scopes) >= MAX_SCOPES:
                    self.scopes.clear()
                named = (forward_key.name, forward_key.key) if forward_key is not None else None
                scope = self.scopes[caller] = cache.caller_scope(False, named, decision.client_key, self.secret)
        key = cache.cache_key(active.cache_identity, scope, method, path, target.query, canonical)
        stream = document is not None and document.get("stream") is True
        model = document.get("model") if document is not None else None
        return CachePlan(mode, key, route.cache_ttl or self.default_ttl, stream, stripped,
                         model if isinstance(model, str) else None)

    # Lookups and flights

    def lookup(self, plan: CachePlan):
        """For a USE plan: the entry to replay, None to go upstream (as the one call of its burst), or a Deferred
        of either (Redis answering; or an identical request already upstream, whose answer it waits for)."""
        if plan.mode != cache.USE:
            return None
        found = self.store.get(plan.key)
        if isinstance(found, defer.Deferred):
            return found.addCallback(self._found, plan)
        return self._found(found, plan)

    def _found(self, entry: Entry | None, plan: CachePlan):
        if entry is not None and entry.stream == plan.stream:
            self.counts.hits += 1
            return entry
        waiting = self.flights.get(plan.key)
        if waiting is None:
            return None
        self.counts.waited += 1
        flight = defer.Deferred()
        waiting.append(flight)
        return flight

    def going_upstream(self, plan: CachePlan) -> None:
        """This request goes upstream: identical ones arriving meanwhile wait for its answer."""
        if not plan.stores:
            self.counts.skips += 1
            return
        self.counts.misses += 1
        if plan.key not in self.flights:
            self.flights[plan.key] = []

    def landed(self, plan: CachePlan, entry: Entry | None) -> int:
        """The upstream answered (`entry`, to keep), or failed (None): keep it, and wake those waiting; the bytes
        kept."""
        stored = 0
        if entry is not None and self.store.put(plan.key, entry, plan.ttl):
            self.counts.stored += 1
            stored = entry.size
            if self.file is not None and self.store is self.memory:
                self.file.stored(plan.key, entry, self.clock.seconds() + plan.ttl)
        waiting = self.flights.pop(plan.key, None)
        for flight in waiting or ():
            if flight.called:
                continue  # its client left meanwhile
            if entry is not None and entry.stream == plan.stream:
                self.counts.hits += 1
                flight.callback(entry)
            else:
                flight.callback(None)
        return stored

    def capture(self) -> Capture:
        """A capture for one answer on its way: at most a quarter of the store, and all captures together at most
        the store's size (past that, an answer is relayed but not kept)."""
        return Capture(self, self.memory.max_bytes // 4)

    def status(self) -> dict:
        counts = self.counts
        return {
            "entries": len(self.memory), "bytes": self.memory.bytes, "hits": counts.hits, "misses": counts.misses,
            "skips": counts.skips, "waited": counts.waited, "stored": counts.stored,
            "store": "redis" if self.store is not self.memory else "memory",
        }


class Capture:
    """Keeps the bytes of an answer as the client receives them, up to `limit`, within the cache's budget for
    all captures; past either, nothing is kept.  `release` gives its bytes back to the budget."""

    __slots__ = ("cache", "parts", "size", "limit", "whole")

    def __init__(self, owner: ResponseCache, limit: int):
        self.cache = owner
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.whole = True

    def feed(self, data: bytes) -> None:
        if not self.whole:
            return
        owner = self.cache
        if self.size + len(data) > self.limit or owner.capturing + len(data) > owner.memory.max_bytes:
            self.release()
            self.whole = False
            return
        self.parts.append(data)
        self.size += len(data)
        owner.capturing += len(data)

    def body(self) -> bytes:
        return b"".join(self.parts)

    def release(self) -> None:
        self.cache.capturing -= self.size
        self.size = 0
        self.parts = []


def json_size(request) -> int:
    """The size of a request's body when it is JSON (uncompressed, not a form), else 0: for requests nothing else
    read (fwd.intake reads a body only for limits, usage, model lists and transcripts)."""
    headers = request.requestHeaders
    size = body_size(request.content)
    kind = body_kind(headers.getRawHeaders(b"content-type"), headers.getRawHeaders(b"content-encoding"), size)
    return size if kind == "json" else 0


@implementer(IPushProducer)
class EntrySender:
    """Writes a cached answer to the client a slice at a time while its connection takes them, pausing when the
    connection's buffer is full (the client's backpressure); a client that reads nothing for `idle_timeout`
    seconds is disconnected.  `done` fires with the bytes sent."""

    SLICE = 64 * 1024

    def __init__(self, body: bytes, request, clock, idle_timeout: float):
        self.view = memoryview(body)
        self.request = request
        self.at = 0
        self.paused = False
        self.done = defer.Deferred()
        self.idle_timeout = idle_timeout
        self.idle = clock.callLater(idle_timeout, self._stalled)
        request.registerProducer(self, True)
        self._send()

    def _send(self) -> None:
        while not self.paused and not self.done.called:
            piece = self.view[self.at : self.at + self.SLICE]
            self.at += len(piece)
            self.idle.reset(self.idle_timeout)
            if self.at >= len(self.view):
                self.request.write(bytes(piece))
                self._finish()
                return
            self.request.write(bytes(piece))  # may pause us: the connection's buffer is full

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._send()

    def stopProducing(self) -> None:
        if not self.done.called:
            self._finish()

    def _stalled(self) -> None:
        from fwd.relay import abort

        abort(self.request)
        self.stopProducing()

    def _finish(self) -> None:
        if self.idle.active():
            self.idle.cancel()
        if not getattr(self.request, "gone", False):
            self.request.unregisterProducer()
        self.done.callback(self.at)


def flag_in(request, facts) -> bool:
    """Whether a request body the cache could read mentions the caching flag at all."""
    body = facts.body
    if body is None:
        if body_size(request.content) > cache.MAX_KEYED_BODY:
            return False
        body = body_bytes(request.content)
    return b'"caching"' in body

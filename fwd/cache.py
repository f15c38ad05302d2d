"""The response cache's rules: which requests it may answer, what a request asks of it, the key that keeps
tenants apart, and a stored answer's shape.  Pure logic; the glue is fwd.caching.  Tests: tests/test_cache.py

A key is SHA-256 over the route, the caller's scope, the method, the path and query, and the request's JSON
body in canonical form (keys sorted at every level, openai-forward's `caching` flag left out).  Two requests
that differ in any parameter never share an entry; two callers never do unless their route says
`cache_scope = "shared"`.
"""

from __future__ import annotations

import hashlib
import hmac
import re

import attrs
import orjson

USE = "use"
SKIP = "skip"
REFRESH = "refresh"
MODES = (USE, SKIP, REFRESH)

# What an answer on a caching route says in x-fwd-cache.
HIT = b"HIT"
MISS = b"MISS"
SKIPPED = b"SKIP"

# openai-forward's per-request switch in the body; honoured and never forwarded.
BODY_FLAG = "caching"
# The largest JSON body the cache reads (canonical form needs the whole document parsed in the reactor: orjson
# reads 1 MiB of the worst shape, millions of tiny objects, in about 10 ms).  Larger requests go upstream, SKIP.
MAX_KEYED_BODY = 1024 * 1024

# Answers to these are the same every time the same request is sent, and sending it changes nothing upstream.
_POST = re.compile(rb"/(?:chat/completions|completions|embeddings|responses)/?\Z")
_GET = re.compile(rb"/models(?:/[^/]+)?/?\Z")
_RESPONSES = re.compile(rb"/responses/?\Z")
# Body members that make a request depend on, or write to, state kept upstream: never answered from the cache.
STATEFUL = ("background", "previous_response_id", "conversation")

# Response headers that describe one transfer, or one caller's limits: not stored, not replayed.
_NOT_STORED = frozenset(
    (b"date", b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"set-cookie", b"age",
     b"x-fwd-cache", b"server", b"vary")
)


def cacheable_endpoint(method: bytes, path: bytes) -> bool:
    """Whether the endpoint's answers may be cached at all (path below the route's mount point)."""
    if method == b"POST":
        return _POST.search(path) is not None
    if method == b"GET":
        return _GET.search(path) is not None
    return False


class BadCacheHeader(ValueError):
    """An x-fwd-cache request header that is not use, skip or refresh."""


def asked_mode(header: list[bytes] | None, body_flag: object) -> str | None:
    """What the request asks of the cache: USE, SKIP, REFRESH, or None when it says nothing.  The header wins
    over the body flag; the body flag is openai-forward's `"caching": true|false`."""
    if header:
        values = {value.strip().lower().decode("latin-1") for value in header}
        value = values.pop()
        if values or value not in MODES:
            raise BadCacheHeader(value)
        return value
    if body_flag is True:
        return USE
    if body_flag is False:
        return SKIP
    return None


def stateful(document: dict, path: bytes = b"") -> bool:
    """Whether a request body depends on or writes to state kept upstream: a stored chat completion, a Responses
    request that is stored (the Responses API stores unless told `"store": false`), in the background, or bound
    to a conversation."""
    stored = document.get("store", True if _RESPONSES.search(path) else None)
    if stored is not None and stored is not False:
        return True
    return any(document.get(name) not in (None, False) for name in STATEFUL)


class Uncanonical(ValueError):
    """A body the cache cannot write back in canonical form (nesting deeper than orjson writes)."""


def canonical(document: dict) -> bytes:
    """The request body as the key sees it: sorted keys at every level, without the caching flag."""
    if BODY_FLAG in document:
        document = {k: v for k, v in document.items() if k != BODY_FLAG}
    try:
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError) as e:
        raise Uncanonical(str(e)) from None


def without_flag(document: dict) -> bytes:
    """The body to forward when the client sent the caching flag: the same document without it."""
    try:
        return orjson.dumps({k: v for k, v in document.items() if k != BODY_FLAG})
    except (orjson.JSONEncodeError, TypeError) as e:
        raise Uncanonical(str(e)) from None


def caller_scope(shared: bool, forward_key: tuple[str, str] | None, client_key: str | None, secret: bytes) -> str:
    """Whose entries a request may see: everyone's on a shared route; else its forward key's (name and key,
    `forward_key`: the name given to another key later sees nothing of the old one's), or those of the client's
    own upstream key, or the anonymous callers'.  Keys appear only as keyed hashes."""
    if shared:
        return "shared"
    if forward_key is not None:
        name, key = forward_key
        return "fk:" + name + ":" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:32]
    if client_key is not None:
        return "own:" + hmac.new(secret, client_key.encode(), hashlib.sha256).hexdigest()[:32]
    return "anonymous"


def route_identity(name: str, upstreams) -> str:
    """A route as the key sees it: its prefix and where it sends requests (a reload that points it elsewhere
    starts afresh)."""
    return name + "\0" + "\0".join(f"{u.kind}:{u.base_url}" for u in upstreams)


def cache_key(route: str, scope: str, method: bytes, path: bytes, query: bytes | None, body: bytes) -> str:
    """The entry's name: every part length-prefixed, so no two different requests hash the same bytes."""
    parts = (route.encode(), scope.encode(), method, path, b"" if query is None else b"?" + query, body)
    return hashlib.sha256(b"".join(b"%d:%b" % (len(part), part) for part in parts)).hexdigest()


@attrs.frozen
class Entry:
    """A stored answer: status 200, the headers to replay, the body as the client received it (a stream's
    events, byte for byte), and when it was stored."""

    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes = attrs.field(repr=False)
    stream: bool
    stored_at: float

    @property
    def size(self) -> int:
        """What it takes to keep, roughly: its bytes plus a fixed overhead."""
        return len(self.body) + sum(len(n) + len(v) for n, v in self.headers) + 200

    def encode(self) -> bytes:
        """One byte string for a store (SQLite, Redis): a JSON head line, then the body."""
        head = orjson.dumps({
            "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
            "s": self.stream,
            "t": self.stored_at,
        })
        return head + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        """The entry `encode` wrote, or None for anything else (a damaged or foreign value is a miss)."""
        head, newline, body = data.partition(b"\n")
        if not newline:
            return None
        try:
            fields = orjson.loads(head)
            headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in fields["h"])
            return cls(headers, body, bool(fields["s"]), float(fields["t"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeEncodeError):
            return None


def stored_headers(headers) -> tuple[tuple[bytes, bytes], ...]:
    """The response headers an entry keeps (of (name, [values]) pairs as sent to the client)."""
    kept = []
    for name, values in headers:
        name = name.lower()
        if name in _NOT_STORED or name.startswith(b"x-ratelimit-"):
            continue
        kept.extend((name, value) for value in values)
    return tuple(kept)


def complete_stream(body: bytes) -> bool:
    """Whether a stream the client received ended as the API ends one: `data: [DONE]` (chat, completions), or a
    Responses stream's `response.completed` event.  One cut short is never stored."""
    tail = body[-65536:]
    return tail.rstrip().endswith(b"data: [DONE]") or b"event: response.completed" in tail


def storable(status: int, cache_control: list[bytes] | None) -> bool:
    """Whether an answer may be stored: a 200 the upstream did not mark no-store (or private to one caller is fine:
    entries are scoped to their caller)."""
    if status != 200:
        return False
    for value in cache_control or ():
        if b"no-store" in value.lower():
            return False
    return True


def age(now: float, stored_at: float) -> bytes:
    """The Age header of a hit: whole seconds since the entry was stored."""
    return b"%d" % max(0, int(now - stored_at))

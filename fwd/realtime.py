"""The Realtime API over WebSocket: what an upgrade request offers, what goes upstream, and what a session's
events say about usage and models.  Pure.  Tests: tests/test_realtime.py

A Realtime client opens a WebSocket at the upstream's own path (`/v1/realtime?model=…`, Azure's
`/openai/realtime?api-version=…&deployment=…`).  Its key comes in `Authorization` (or `api-key` on Azure
routes), or, from a browser, which cannot set headers, in the subprotocol `openai-insecure-api-key.<key>` next
to `realtime` (and `openai-beta.realtime-v1` for the beta API).  The proxy decides access on that key before
it accepts the upgrade; the upstream gets the pool key in a header and the client's other subprotocols, never
the one that carried a key; the client gets `realtime` back when it offered it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import orjson

from fwd.usage import Usage

INSECURE_KEY = "openai-insecure-api-key."
REALTIME = "realtime"
# Request headers that belong to one WebSocket handshake (or that the upstream handshake sets itself).
HANDSHAKE_HEADERS = frozenset((
    b"upgrade", b"connection", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"sec-websocket-accept", b"host", b"pragma", b"cache-control", b"content-length",
    b"transfer-encoding", b"expect",
))
# How deep a limited key's client event is searched for the models it names.
MODEL_DEPTH = 64


def tokens_of(values: list[bytes] | None) -> list[str]:
    """The comma-separated tokens of a header's values, lower-cased."""
    return [token.lower() for token in offered(values)]


def is_upgrade(method: bytes, upgrade: list[bytes] | None, connection: list[bytes] | None) -> bool:
    """Whether a request asks to become a WebSocket (RFC 6455 4.1: GET, `Upgrade: websocket`, and `upgrade` among
    the Connection options)."""
    return method == b"GET" and "websocket" in tokens_of(upgrade) and "upgrade" in tokens_of(connection)


def offered(values: list[bytes] | None) -> list[str]:
    """The subprotocols a client offers, in its order (case kept: a key is case-sensitive)."""
    found = []
    for value in values or ():
        found += [t.strip() for t in value.decode("latin-1").split(",") if t.strip()]
    return found


def subprotocol_key(protocols: list[str]) -> tuple[str | None, str | None]:
    """(the key a browser-style client sent in `openai-insecure-api-key.<key>`, why the offer is refused)."""
    keys = {p[len(INSECURE_KEY):] for p in protocols if p.startswith(INSECURE_KEY)}
    if len(keys) > 1:
        return None, "the subprotocols carry more than one key"
    key = keys.pop() if keys else None
    return (key or None), None


def passed_on(protocols: list[str]) -> list[str]:
    """The subprotocols the upstream is offered: the client's, minus the one that carried a key."""
    return [p for p in protocols if not p.startswith(INSECURE_KEY)]


def echoed(protocols: list[str]) -> str | None:
    """The subprotocol the proxy accepts: `realtime` when the client offered it (OpenAI's answer), else none."""
    return REALTIME if REALTIME in protocols else None


def socket_url(http_url: bytes) -> str:
    """The ws:// or wss:// URL of an upstream request's http:// or https:// URL."""
    url = http_url.decode("ascii")
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    raise ValueError("an upstream URL is http or https")


def handshake_headers(headers: list[tuple[bytes, list[bytes]]]) -> tuple[dict[str, str], str | None, str | None]:
    """(the headers of the upstream handshake, its User-Agent, its Origin) from the headers a request would send
    upstream (fwd.headers.upstream_headers with the pool key added): one value per name, as the WebSocket client
    writes them; the handshake's own headers dropped."""
    out: dict[str, str] = {}
    agent = origin = None
    for name, values in headers:
        lowered = name.lower()
        if lowered in HANDSHAKE_HEADERS:
            continue
        text = ", ".join(v.decode("latin-1") for v in values)
        if not text.isascii():
            continue  # the handshake is written as UTF-8; latin-1 bytes would change on the way
        if lowered == b"user-agent":
            agent = text
        elif lowered == b"origin":
            origin = text
        else:
            out[name.decode("latin-1")] = text
    return out, agent, origin


def is_origin(value: bytes) -> bool:
    """Whether an Origin header is one a WebSocket server can read: `null`, or scheme://host[:port]."""
    text = value.decode("latin-1").strip()
    if text.lower() == "null":
        return True
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return False
    return parts.scheme.lower() == "file" or bool(parts.hostname)


def response_usage(payload: bytes) -> Usage | None:
    """The usage a `response.done` server event reports (the Realtime API's only account of tokens), or None.
    Cheap for every other frame: only a frame that mentions `response.done` is parsed."""
    if b"response.done" not in payload:
        return None
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("type") != "response.done":
        return None
    return usage_of(event.get("response"))


def usage_of(response) -> Usage | None:
    """The usage of a Realtime response object: input_tokens, output_tokens, total_tokens."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    numbers = [usage.get(name) for name in ("input_tokens", "output_tokens", "total_tokens")]
    input_tokens, output_tokens, total = (n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None
                                          for n in numbers)
    if input_tokens is None and output_tokens is None and total is None:
        return None
    input_tokens = input_tokens or 0
    output_tokens = output_tokens or 0
    return Usage(input_tokens, output_tokens, total if total is not None else input_tokens + output_tokens)


def model_refusal(payload: bytes, allowed: frozenset[str], binary: bool = False) -> str | None:
    """Why a client event is refused for a key limited to `allowed` models: somewhere in it (a `session.update`'s
    session, its transcription settings, a `response.create`'s response, …) a member named `model` names a model
    the key may not run.  A frame that names no model, or is not an event, passes (the upstream rejects what it
    cannot read); a text frame that cannot be read one way only (not JSON, too deep) is refused.  A binary frame
    is checked when it is JSON (an upstream may read it as an event)."""
    if b"model" not in payload and b"\\" not in payload:
        return None  # no member is named model, not even with escapes
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None if binary else "the event is not valid JSON, so the models it names cannot be read"
    named: list = []
    if not _models_in(event, named, 0):
        return "the event nests too deeply to read the models it names"
    for model in named:
        if not isinstance(model, str) or model not in allowed:
            return f"this key may not use the model {model!r}"
    return None


def _models_in(value, found: list, depth: int) -> bool:
    """Collect every value of a member named `model` in `value`; False past MODEL_DEPTH levels."""
    if depth > MODEL_DEPTH:
        return False
    if isinstance(value, dict):
        for name, inner in value.items():
            if name == "model":
                found.append(inner)
            elif isinstance(inner, (dict, list)) and not _models_in(inner, found, depth + 1):
                return False
    elif isinstance(value, list):
        for inner in value:
            if isinstance(inner, (dict, list)) and not _models_in(inner, found, depth + 1):
                return False
    return True


def error_event(message: str, code: str, event_id: str | None = None) -> bytes:
    """A Realtime `error` server event, as the upstream sends them (the SDKs raise or surface it)."""
    return orjson.dumps({
        "type": "error",
        "event_id": f"event_fwd_{code}",
        "error": {"type": "invalid_request_error", "code": code, "message": message, "param": None,
                  "event_id": event_id},
    })


def client_event_id(payload: bytes) -> str | None:
    """The `event_id` a client gave an event, for the error that answers it."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    value = event.get("event_id") if isinstance(event, dict) else None
    return value if isinstance(value, str) else None

"""Token usage of each proxied exchange: the upstream's own figures, or an estimate.  Tests: tests/test_usage.py

Pure and cheap on the relay path. Stream chunks cost a few byte scans each; only the event that carries usage is
decoded. Huge JSON answers are searched from their ends, never decoded whole. A JSON member is proven to be
top-level by parsing what precedes or follows it with one brace added (only a top-level member makes that a
complete object), so neither a string nor a nested object can pass for the top-level `usage`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Protocol

import attrs
import orjson

# The value of `stream_options` in a request that has none (`body.get("stream_options", ABSENT)`).
ABSENT: Any = object()

# One stream event is rewritten or searched whole up to this size; past it, it is passed through.
MAX_EVENT = 1 << 20
# JSON answers up to this size are decoded; larger ones are searched for their usage from both ends.
LARGE_ANSWER = 1 << 20
_WINDOW = 64 * 1024
# At most this many candidate positions are tried for one member, so a hostile body costs a bounded few parses.
_CANDIDATES = 8

_USAGE = b'"usage"'
_USAGE_NULL = b'"usage":null'
_TRAILING_NULL = b',"usage":null'
_WS = b" \t\r\n"
# A blank line ends an event; a line ends in CRLF, LF or a CR not followed by LF.
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE = re.compile(rb"[^\r\n]+")
_SCALAR = re.compile(rb'null|true|false|-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|"(?:[^"\\]|\\.)*"')

_NAMES = {
    "chat": (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")),
    "completions": (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")),
    "embeddings": (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")),
    "responses": (("input_tokens", "output_tokens"), ("prompt_tokens", "completion_tokens")),
    "audio": (("input_tokens", "output_tokens"), ("prompt_tokens", "completion_tokens")),
    "images": (("input_tokens", "output_tokens"), ("prompt_tokens", "completion_tokens")),
}
KINDS = tuple(_NAMES)
# Stream events of chat and completions that carry no generated text: the role chunk and the finish chunk.
_FRAMING = {"chat": 2, "completions": 1}


@attrs.frozen
class Usage:
    """Tokens one exchange used, as the upstream reported them or, when `estimated`, as guessed; `seconds` is
    the audio duration of a transcription billed by time."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    estimated: bool = False
    seconds: float | None = None


def _tokens(value: Any) -> int | None:
    """A token count as an upstream may write it (an int, or a float with no fraction); None otherwise."""
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is float and value.is_integer() and value >= 0:
        return int(value)
    return None


def usage_from_json(kind: str, obj: Any) -> Usage | None:
    """The Usage of one API's decoded `usage` object, None when it says nothing countable.

    chat, completions, embeddings: prompt_tokens / completion_tokens / total_tokens. responses, images, audio:
    input_tokens / output_tokens / total_tokens. Each kind also reads the other family's names when its own are
    absent (compatible upstreams mix them). audio billed by time (`"type": "duration"`) gives `seconds`."""
    try:
        families = _NAMES[kind]
    except KeyError:
        raise ValueError(f"unknown usage kind {kind!r}") from None
    if type(obj) is not dict:
        return None
    if kind == "audio" and obj.get("type") == "duration":
        seconds = obj.get("seconds")
        if type(seconds) in (int, float) and math.isfinite(seconds) and seconds >= 0:
            return Usage(0, 0, 0, seconds=float(seconds))
        return None
    input_name, output_name = families[0]
    if input_name not in obj and output_name not in obj:
        other = families[1]
        if other[0] in obj or other[1] in obj:
            input_name, output_name = other
    input_tokens = _tokens(obj.get(input_name))
    output_tokens = _tokens(obj.get(output_name))
    total = _tokens(obj.get("total_tokens"))
    if input_tokens is None and output_tokens is None and total is None:
        return None
    input_tokens = input_tokens or 0
    output_tokens = output_tokens or 0
    return Usage(input_tokens, output_tokens, input_tokens + output_tokens if total is None else total)


def parse_answer(kind: str, body: bytes) -> Usage | None:
    """The upstream's usage in a complete JSON answer body, None when it has none.

    Bodies up to LARGE_ANSWER are decoded; larger ones (embeddings, images) and ones orjson rejects are searched
    for a top-level `usage` in their last and first 64 KiB only."""
    if len(body) <= LARGE_ANSWER:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            return usage_from_json(kind, obj.get("usage")) if type(obj) is dict else None
    found = _usage_from_tail(body[-_WINDOW:], 1)
    if found is None:
        found = _usage_from_head(body[:_WINDOW])
    return usage_from_json(kind, found)


# -- finding one member without decoding the document ---------------------------------------------------------


def _key_positions(data: bytes, key: bytes, reverse: bool = False):
    """Positions of `key` (a quoted name) that can open a JSON string: not preceded by a backslash, which in valid
    JSON only happens inside a string. At most _CANDIDATES of them."""
    start, end = 0, len(data)
    for _ in range(_CANDIDATES):
        pos = data.rfind(key, 0, end) if reverse else data.find(key, start)
        if pos < 0:
            return
        end, start = pos, pos + 1
        if pos and data[pos - 1] != 0x5C:
            yield pos


def _colon_after(data: bytes, pos: int, key: bytes) -> int | None:
    """Where the value of the member whose key starts at pos begins, or None when the key is not a member's."""
    j = pos + len(key)
    n = len(data)
    while j < n and data[j] in _WS:
        j += 1
    if j >= n or data[j] != 0x3A:
        return None
    j += 1
    while j < n and data[j] in _WS:
        j += 1
    return j


def _value_end(data: bytes, start: int) -> int | None:
    """The end of the JSON value starting at start: a scalar, or an object or array that ends at one of the next
    few closing brackets (each is tried)."""
    closer = {0x7B: b"}", 0x5B: b"]"}.get(data[start]) if start < len(data) else None
    if closer is None:
        m = _SCALAR.match(data, start)
        return m.end() if m else None
    k = start
    for _ in range(_CANDIDATES):
        k = data.find(closer, k + 1)
        if k < 0:
            return None
        try:
            orjson.loads(data[start : k + 1])
        except orjson.JSONDecodeError:
            continue
        return k + 1
    return None


def _is_top_level_key(data: bytes, pos: int) -> bool:
    """Whether the key starting at pos of the complete JSON object `data` is one of its own members.

    Only a top-level key position makes `{` + what follows, or what precedes + `"":0}`, a complete object; the
    shorter side is parsed."""
    try:
        if pos <= len(data) - pos:
            orjson.loads(data[:pos] + b'"":0}')
        else:
            orjson.loads(b"{" + data[pos:])
    except orjson.JSONDecodeError:
        return False
    return True


def _top_level_value(data: bytes, key: bytes) -> tuple[int, int, int] | None:
    """(key start, value start, value end) of the top-level member `key` of the JSON object `data`."""
    for pos in _key_positions(data, key):
        value = _colon_after(data, pos, key)
        if value is None or not _is_top_level_key(data, pos):
            continue
        end = _value_end(data, value)
        return None if end is None else (pos, value, end)
    return None


def _member_span(data: bytes, key: bytes) -> tuple[int, int] | None:
    """The bytes to cut to remove the top-level member `key` from the JSON object `data`: the member, the
    whitespace around it and one comma (the one before it, else the one after it)."""
    found = _top_level_value(data, key)
    if found is None:
        return None
    pos, _, end = found
    before = len(data[:pos].rstrip(_WS)) - 1
    if data[before] == 0x2C:
        return before, end
    after = len(data) - len(data[end:].lstrip(_WS))
    if data[after : after + 1] == b",":
        return pos, len(data) - len(data[after + 1 :].lstrip(_WS))
    return pos, end


def _usage_from_tail(tail: bytes, depth: int) -> Any:
    """The decoded `usage` member at `depth` (1: the document's own, 2: one object down) found in the end of a
    JSON document, or None. What follows the key, behind `depth` opening braces, must be a complete object."""
    opener = b'{"":' * (depth - 1) + b"{"
    for pos in _key_positions(tail, _USAGE, reverse=True):
        try:
            obj = orjson.loads(opener + tail[pos:])
        except orjson.JSONDecodeError:
            continue
        for _ in range(depth - 1):
            obj = obj.get("")
            if type(obj) is not dict:
                break
        else:
            return obj.get("usage")
    return None


def _usage_from_head(head: bytes) -> Any:
    """The decoded top-level `usage` member found in the start of a JSON document, or None."""
    for pos in _key_positions(head, _USAGE):
        value = _colon_after(head, pos, _USAGE)
        if value is None:
            continue
        try:
            orjson.loads(head[:pos] + b'"":0}')
        except orjson.JSONDecodeError:
            continue
        end = _value_end(head, value)
        try:
            return None if end is None else orjson.loads(head[value:end])
        except orjson.JSONDecodeError:
            return None
    return None


# -- event streams ---------------------------------------------------------------------------------------------


def _complete_end(buf: bytes) -> int:
    """Where the last complete event of buf ends (after its blank line), 0 when none is complete.

    Every blank line holds LF LF, CR CR or LF CR; a final CR waits for the next chunk, which may bring its LF."""
    limit = len(buf) - 1 if buf[-1:] == b"\r" else len(buf)
    p = max(buf.rfind(b"\n\n", 0, limit), buf.rfind(b"\r\r", 0, limit), buf.rfind(b"\n\r", 0, limit))
    if p < 0:
        return 0
    if buf[p + 1] == 0x0D and buf[p + 2 : p + 3] == b"\n":
        return p + 3
    return p + 2


def _events(block: bytes) -> list[tuple[int, int, int]]:
    """(start, content end, end) of each event of a block of whole events; a block of LF or CRLF line ends only
    is cut with find, a mixed one with the regular expression."""
    separator = None
    if b"\r" not in block:
        separator = b"\n\n"
    elif block.count(b"\r") == block.count(b"\n") == block.count(b"\r\n"):
        separator = b"\r\n\r\n"
    if separator is None:
        spans = []
        start = 0
        for m in _BOUNDARY.finditer(block):
            spans.append((start, m.start(), m.end()))
            start = m.end()
        return spans
    spans = []
    start = 0
    find = block.find
    size = len(separator)
    while True:
        p = find(separator, start)
        if p < 0:
            return spans
        spans.append((start, p, p + size))
        start = p + size


def _maybe_boundary(data: bytes) -> bool:
    """Whether data may complete an event (it holds a blank line's first two bytes)."""
    return b"\n\n" in data or b"\r\r" in data or b"\n\r" in data


def _event_data(event: bytes) -> bytes | None:
    """The joined `data:` lines of one event, None when it has none."""
    if event.startswith(b"data: ") and b"\n" not in event and b"\r" not in event:
        return event[6:]
    lines = [line for line in _LINE.findall(event) if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line[5:6] == b" " else line[5:] for line in lines)


def _single_data(event: bytes) -> tuple[bytes, int] | None:
    """The value of an event's only `data:` line and where it starts in the event; None unless exactly one."""
    if event.startswith(b"data: ") and b"\n" not in event and b"\r" not in event:
        return event[6:], 6
    found = None
    for m in _LINE.finditer(event):
        if event.startswith(b"data:", m.start()):
            if found is not None:
                return None
            found = m
    if found is None:
        return None
    start = found.start() + (6 if event[found.start() + 5 : found.start() + 6] == b" " else 5)
    return event[start : found.end()], start


def _without_trailing_null(event: bytes) -> bytes | None:
    """The event without a `,"usage":null` member that closes its last data line's object, when that member is
    provably top-level: only scalar members (no `}` or `]`) stand between it and the object's final `}`."""
    n = len(event)
    if event[n - 1 : n] != b"}":
        return None
    i = event.rfind(_TRAILING_NULL)
    if i < 0:
        return None
    line = max(event.rfind(b"\n", 0, i), event.rfind(b"\r", 0, i)) + 1
    if not event.startswith(b"data:", line):
        return None
    rest = event[i + 13 : n - 1]
    if rest and (b"}" in rest or b"]" in rest or b"\n" in rest or b"\r" in rest):
        return None
    return event[:i] + event[i + 13 :]


def _usage_in(obj: Any) -> Any:
    """An event's usage object: its own `usage`, or its `response.usage` (Responses API terminal events)."""
    usage = obj.get("usage")
    if type(usage) is not dict:
        response = obj.get("response")
        usage = response.get("usage") if type(response) is dict else None
    return usage


class StreamCounts(Protocol):
    """What an estimate needs from a relayed stream."""

    events: int
    deltas: int
    done: bool


class StreamMeter:
    """Watches an event stream as it is relayed: the upstream's usage, and the counts an estimate needs.

    Per chunk it only counts `data:` fields and keeps a reference to the last three chunks that had one: the
    upstream's final usage is in the last events (chat's usage chunk before [DONE], the Responses API's
    `response.completed`, audio's and images' `….done`/`….completed`), so only those are ever searched and only
    an event with a non-null `usage` is decoded. Memory is bounded: those three blocks, one partial event up to
    max_event bytes, and the last 64 KiB of an over-long event (searched for its usage when it ends)."""

    def __init__(self, kind: str, max_event: int = MAX_EVENT) -> None:
        if kind not in _NAMES:
            raise ValueError(f"unknown usage kind {kind!r}")
        self.kind = kind
        self.max_event = max_event
        # `data:` fields relayed ([DONE] included) and `….delta"` event types (Responses and audio streams only).
        self.events = 0
        self.deltas = 0
        # Events too long to hold whole.
        self.overflowed = 0
        self._count_deltas = kind in ("responses", "audio")
        self._held = bytearray()
        self._long: bytearray | None = None
        self._a = self._b = self._c = b""
        # The latest usage of the events that left the last three blocks (usage is usually at the end, but an
        # upstream may send it earlier).
        self._earlier: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        """Take one relayed chunk."""
        if self._held or self._long is not None or not chunk.endswith(b"\n\n"):
            self._feed_split(chunk)
            return
        n = chunk.count(b"data:")
        if n:
            self.events += n
            self._keep(chunk)
            if self._count_deltas:
                self.deltas += chunk.count(b'.delta"')

    def _keep(self, block: bytes) -> None:
        """Make `block` the newest of the three kept; the oldest leaves, with its usage if it had one."""
        leaving = self._a
        if _USAGE in leaving and leaving.count(_USAGE) != leaving.count(_USAGE_NULL):
            found = self._in_block(leaving)
            if found is not None:
                self._earlier = found
        self._a, self._b, self._c = self._b, self._c, block

    def close(self) -> None:
        """The upstream body ended: take in an event it left without its blank line."""
        if self._long is not None:
            self._end_long(self._long)
        elif self._held:
            rest = bytes(self._held)
            self._held = bytearray()
            self._complete(rest + b"\n\n")

    @property
    def usage(self) -> Usage | None:
        """The usage the upstream reported last, None when none arrived (yet)."""
        for block in (self._c, self._b, self._a):
            if _USAGE in block and block.count(_USAGE) != block.count(_USAGE_NULL):
                found = self._in_block(block)
                if found is not None:
                    return found
        return self._earlier

    def _in_block(self, block: bytes) -> Usage | None:
        """The last usage in one block of whole events."""
        for start, end, _ in reversed(_events(block)):
            event = block[start:end]
            if _USAGE in event and event.count(_USAGE) != event.count(_USAGE_NULL):
                found = self._read(event)
                if found is not None:
                    return found
        return None

    @property
    def done(self) -> bool:
        """Whether the stream's `data: [DONE]` arrived."""
        return b"data: [DONE]" in self._c or b"data: [DONE]" in self._b or b"data: [DONE]" in self._a

    def _complete(self, block: bytes) -> None:
        """Count whole events, and keep them if they are among the last with data."""
        n = block.count(b"data:")
        if n:
            self.events += n
            self._keep(block)
            if self._count_deltas:
                self.deltas += block.count(b'.delta"')

    def _read(self, event: bytes) -> Usage | None:
        """The usage of one event, if it carries one."""
        data = _event_data(event)
        if data is None:
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        return usage_from_json(self.kind, _usage_in(obj)) if type(obj) is dict else None

    def _feed_split(self, chunk: bytes) -> None:
        """Take a chunk that does not end an event, or that follows one that did not."""
        if self._long is not None:
            chunk = self._feed_long(chunk)
            if not chunk:
                return
        held = self._held
        if held:
            if not _maybe_boundary(held[-2:] + chunk):
                held += chunk
                if len(held) > self.max_event:
                    self._overflow()
                return
            chunk = bytes(held) + chunk
            held.clear()
        end = _complete_end(chunk)
        if end:
            self._complete(chunk[:end] if end < len(chunk) else chunk)
        if end < len(chunk):
            held += chunk[end:]
            if len(held) > self.max_event:
                self._overflow()

    def _overflow(self) -> None:
        """Stop holding an over-long event: keep its tail only."""
        self.overflowed += 1
        self.events += self._held.count(b"data:")
        self._long = self._held[-_WINDOW:]
        self._held = bytearray()

    def _feed_long(self, chunk: bytes) -> bytes:
        """Take a chunk inside an over-long event; return what follows the event's end (b"" while inside it)."""
        long = self._long
        edge = bytes(long[-2:])
        probe = edge + chunk
        m = _BOUNDARY.search(probe, 0, len(probe) - 1 if probe[-1:] == b"\r" else len(probe))
        if m is None:
            long += chunk
            if len(long) > 2 * _WINDOW:
                del long[:-_WINDOW]
            return b""
        start, end = m.start() - len(edge), max(m.end() - len(edge), 0)
        if start >= 0:
            long += chunk[:start]
        else:
            del long[start:]
        self._end_long(long)
        return chunk[end:]

    def _end_long(self, long: bytearray) -> None:
        """An over-long event ended: its usage, from its tail, is now the latest."""
        self._long = None
        tail = bytes(long[-_WINDOW:]).rstrip(_WS)
        found = None
        if _USAGE in tail:
            found = usage_from_json(self.kind, _usage_from_tail(tail, 2 if self.kind == "responses" else 1))
        self._earlier = found if found is not None else self.usage
        self._a = self._b = self._c = b""


class UsageStripper:
    """Relays a chat or completions stream for which the proxy asked `include_usage` as the client would have
    received it without: the usage-only chunk and every top-level `"usage":null` member are removed, every other
    byte and every event boundary is kept. `usage` is what the upstream reported.

    Chunks are cut anywhere; a partial event is held (up to max_event bytes) until its blank line arrives. An
    over-long event is passed through unchanged (counted in `overflowed`) and rewriting resumes after it."""

    # Only chat and completions streams are stripped; their estimate counts events, not deltas.
    deltas = 0

    def __init__(self, kind: str = "chat", max_event: int = MAX_EVENT) -> None:
        if kind not in _FRAMING:
            raise ValueError(f"only chat and completions streams carry include_usage, not {kind!r}")
        self.kind = kind
        self.max_event = max_event
        self.usage: Usage | None = None
        self.events = 0
        self.done = False
        self.overflowed = 0
        self._held = bytearray()
        self._skipping = False
        self._edge = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take one relayed chunk; return the bytes to relay now."""
        if self._held or self._skipping:
            return self._feed(chunk)
        n = len(chunk)
        # One whole one-line event, the shape almost every chunk has: `data: {…,"usage":null}\n\n`, or with
        # only scalar members such as `"obfuscation":"…"` after the usage.
        if (
            chunk.find(b"\n") == n - 2 and chunk.endswith(b"}\n\n") and chunk.startswith(b"data:")
            and b"\r" not in chunk
        ):
            if chunk.endswith(b',"usage":null}\n\n'):
                self.events += 1
                return chunk[:-16] + b"}\n\n"
            i = chunk.rfind(_TRAILING_NULL, 0, n - 3)
            if i > 0:
                rest = chunk[i + 13 : n - 3]
                if b"}" not in rest and b"]" not in rest:
                    self.events += 1
                    return chunk[:i] + chunk[i + 13 :]
        return self._feed(chunk)

    def close(self) -> bytes:
        """The upstream body ended: return what is still held, rewritten like a whole event."""
        if self._skipping or not self._held:
            self._skipping = False
            return b""
        rest = bytes(self._held)
        self._held = bytearray()
        event = rest.lstrip(b"\r\n")
        return rest[: len(rest) - len(event)] + (self._rewrite(event) or b"")

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        if self._skipping:
            passed, chunk = self._skip(chunk)
            if not chunk:
                return passed
            out.append(passed)
        held = self._held
        if held:
            if not _maybe_boundary(held[-2:] + chunk):
                held += chunk
                return b"".join(out) + (self._overflow() if len(held) > self.max_event else b"")
            chunk = bytes(held) + chunk
            held.clear()
        end = _complete_end(chunk)
        if end:
            out.append(self._rewrite_block(chunk[:end] if end < len(chunk) else chunk))
        if end < len(chunk):
            held += chunk[end:]
            if len(held) > self.max_event:
                out.append(self._overflow())
        return b"".join(out)

    def _overflow(self) -> bytes:
        """Give up holding an over-long event: relay it as it is and pass the rest of it through."""
        self.overflowed += 1
        self.events += 1
        passed = bytes(self._held)
        self._held = bytearray()
        self._skipping = True
        self._edge = passed[-2:]
        return passed

    def _skip(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Split a chunk inside an over-long event into what belongs to it and what follows its end."""
        edge = self._edge
        probe = edge + chunk
        m = _BOUNDARY.search(probe, 0, len(probe) - 1 if probe[-1:] == b"\r" else len(probe))
        if m is None:
            self._edge = probe[-2:]
            return chunk, b""
        self._skipping = False
        end = max(m.end() - len(edge), 0)
        return chunk[:end], chunk[end:]

    def _rewrite_block(self, block: bytes) -> bytes:
        """Rewrite whole events."""
        if _USAGE not in block:
            self.events += block.count(b"data:")
            if b"data: [DONE]" in block:
                self.done = True
            return block
        out = []
        end = 0
        for start, content_end, end in _events(block):
            if block[start] in b"\r\n":
                # Line ends that open an event belong to the blank lines before it: kept, however cut.
                lead = start
                while lead < content_end and block[lead] in b"\r\n":
                    lead += 1
                out.append(block[start:lead])
                start = lead
            kept = self._rewrite(block[start:content_end])
            if kept is not None:
                out.append(kept)
                out.append(block[content_end:end])
        out.append(block[end:])
        return b"".join(out)

    def _rewrite(self, event: bytes) -> bytes | None:
        """One event as the client would have had it; None for the usage-only chunk."""
        if _USAGE not in event:
            self.events += event.count(b"data:")
            if b"data: [DONE]" in event:
                self.done = True
            return event
        quick = _without_trailing_null(event)
        if quick is not None:
            self.events += quick.count(b"data:")
            return quick
        found = _single_data(event)
        if found is None:
            self.events += event.count(b"data:")
            return event
        data, offset = found
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is not dict or "usage" not in obj:
            self.events += 1
            return event
        if obj["usage"] is not None:
            usage = usage_from_json(self.kind, obj["usage"])
            if usage is not None:
                self.usage = usage
            if not obj.get("choices"):
                return None
        self.events += 1
        span = _member_span(data, _USAGE)
        if span is None:
            return event
        return event[: offset + span[0]] + event[offset + span[1] :]


# -- the request side ------------------------------------------------------------------------------------------


def with_include_usage(body: bytes, stream_options: Any) -> bytes | None:
    """The streaming request body asking for usage (`"stream_options":{"include_usage":true}`), every other byte
    kept; None when it cannot be done safely or the client already asked (then: do not inject, do not strip).

    `stream_options` is the body's decoded top-level value, or ABSENT. Absent: the member is added before the
    closing brace. null or an object: only that member's value changes (an object keeps its own bytes and gets
    `"include_usage":true` first, replacing an `include_usage` that was false)."""
    if stream_options is ABSENT:
        end = len(body.rstrip(_WS)) - 1
        if end < 1 or body[end] != 0x7D:
            return None
        last = len(body[:end].rstrip(_WS)) - 1
        if last < 0:
            return None
        comma = b"" if body[last] == 0x7B else b","
        return body[:end] + comma + b'"stream_options":{"include_usage":true}' + body[end:]
    if stream_options is not None and (type(stream_options) is not dict or stream_options.get("include_usage")):
        return None
    found = _top_level_value(body, b'"stream_options"')
    if found is None:
        return None
    _, start, end = found
    value = body[start:end]
    try:
        if orjson.loads(value) != stream_options:
            return None
    except orjson.JSONDecodeError:
        return None
    if stream_options is None:
        new = b'{"include_usage":true}'
    else:
        if "include_usage" in stream_options:
            span = _member_span(value, b'"include_usage"')
            if span is None:
                return None
            value = value[: span[0]] + value[span[1] :]
        empty = value[1:].lstrip(_WS).startswith(b"}")
        new = b'{"include_usage":true' + (b"" if empty else b",") + value[1:]
    try:
        if orjson.loads(new) != {**(stream_options or {}), "include_usage": True}:
            return None
    except orjson.JSONDecodeError:
        return None
    return body[:start] + new + body[end:]


# -- estimates -------------------------------------------------------------------------------------------------


def _answer_text_bytes(kind: str, body: bytes) -> int:
    """UTF-8 bytes of the text a JSON answer generated (see estimate)."""
    if kind in ("embeddings", "images"):
        return 0
    if len(body) > LARGE_ANSWER:
        return 0 if kind == "audio" else len(body)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        if kind != "audio":
            return 0
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return 0
        return len(body)
    if type(obj) is not dict:
        return 0
    texts: list[Any] = []
    if kind == "audio":
        texts.append(obj.get("text"))
    elif kind == "responses":
        for item in _dicts(obj.get("output")):
            texts.append(item.get("arguments"))
            for part in _dicts(item.get("content")):
                texts.append(part.get("text"))
                texts.append(part.get("refusal"))
    else:
        for choice in _dicts(obj.get("choices")):
            texts.append(choice.get("text"))
            message = choice.get("message")
            if type(message) is dict:
                texts.append(message.get("content"))
                texts.append(message.get("refusal"))
                for call in _dicts(message.get("tool_calls")):
                    function = call.get("function")
                    if type(function) is dict:
                        texts.append(function.get("arguments"))
                function = message.get("function_call")
                if type(function) is dict:
                    texts.append(function.get("arguments"))
    return sum(len(text.encode("utf-8", "replace")) for text in texts if type(text) is str)


def _dicts(value: Any) -> list[dict]:
    """The dict items of a list (nothing for anything else)."""
    return [item for item in value if type(item) is dict] if type(value) is list else []


def estimate(kind: str, prompt_bytes: int, answer: StreamCounts | bytes | None = None) -> Usage:
    """A Usage (estimated=True) for an exchange whose upstream reported none, by this rule:

    input = ceil(prompt_bytes / 4), about four bytes of text per token (the caller passes the request body's
    size, or for uploads the size of its text fields).
    output, for a stream (a StreamMeter or UsageStripper): chat and completions count one token per `data:`
    event, less [DONE] and the events that carry no text (chat: the role and finish chunks; completions: the
    finish chunk); Responses and audio streams count one per `….delta` event; embeddings and images none.
    output, for a JSON answer: ceil(generated text bytes / 4) (chat: message content, refusal, tool-call
    arguments; completions: text; Responses: output text, refusals, call arguments; audio: `text`, or the whole
    answer when it is UTF-8 text and not JSON); embeddings and images none; a chat, completions or Responses
    answer over 1 MiB counts all its bytes.
    total = input + output."""
    if kind not in _NAMES:
        raise ValueError(f"unknown usage kind {kind!r}")
    input_tokens = -(-max(prompt_bytes, 0) // 4)
    if answer is None:
        output_tokens = 0
    elif isinstance(answer, (bytes, bytearray, memoryview)):
        output_tokens = -(-_answer_text_bytes(kind, bytes(answer)) // 4)
    elif kind in _FRAMING:
        output_tokens = max(0, answer.events - answer.done - _FRAMING[kind])
    elif kind in ("responses", "audio"):
        output_tokens = answer.deltas
    else:
        output_tokens = 0
    return Usage(input_tokens, output_tokens, input_tokens + output_tokens, estimated=True)

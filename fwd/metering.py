"""What one exchange used: the upstream's own usage as it was relayed, or the documented estimate
(fwd.usage.estimate) when none came back.  Tests: tests/test_metering.py

A streamed chat or completions answer whose client did not ask for `stream_options.include_usage` has it asked
for upstream (unless STREAM_USAGE or the route's `stream_usage` says not to); the usage-only chunk and the
`"usage":null` members it brings are removed from what the client receives (fwd.usage.UsageStripper).
"""

from __future__ import annotations

import re

from fwd.usage import (
    ABSENT,
    StreamMeter,
    Usage,
    UsageStripper,
    estimate,
    parse_answer,
    with_include_usage,
)

# What a JSON answer's body keeps for its usage: all of it up to this, else its start and its end.
KEEP = 1 << 20
_WINDOW = 64 * 1024
_KINDS = (
    (re.compile(rb"/chat/completions/?\Z"), "chat"),
    (re.compile(rb"/completions/?\Z"), "completions"),
    (re.compile(rb"/responses/?\Z"), "responses"),
    (re.compile(rb"/embeddings/?\Z"), "embeddings"),
    (re.compile(rb"/audio/(?:transcriptions|translations|speech)/?\Z"), "audio"),
    (re.compile(rb"/images/(?:generations|edits|variations)/?\Z"), "images"),
)
# The request parameters metering and the token reservation read from a JSON body.
PARAMETERS = ("model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "max_output_tokens", "n")


def kind_of(method: bytes, path: bytes) -> str | None:
    """Which usage shape a request's answer has (fwd.usage.KINDS), None for requests that use no tokens."""
    if method != b"POST":
        return None
    for pattern, kind in _KINDS:
        if pattern.search(path):
            return kind
    return None


def wants_usage_injected(kind: str | None, members: dict) -> bool:
    """Whether a request streams chat or completions without asking for include_usage."""
    if kind not in ("chat", "completions") or members.get("stream") is not True:
        return False
    options = members.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def with_usage_asked(body: bytes, members: dict) -> bytes | None:
    """The request body asking for include_usage, or None when it cannot be changed safely."""
    return with_include_usage(body, members.get("stream_options", ABSENT))


class Metering:
    """Follows one exchange's answer as it is relayed; `usage` is what it used."""

    def __init__(self, kind: str, prompt_bytes: int, injected: bool = False):
        self.kind = kind
        self.prompt_bytes = prompt_bytes
        self.injected = injected
        self.status = 0
        self.meter: StreamMeter | UsageStripper | None = None
        self.head = bytearray()
        self.tail = b""
        self.size = 0

    def started(self, status: int, stream: bool) -> None:
        self.status = status
        if stream and status < 400:
            if self.injected:
                self.meter = UsageStripper(self.kind)
            else:
                self.meter = StreamMeter(self.kind)

    def chunk_filter(self):
        """What each relayed chunk goes through, once the answer has started: the stripper's own `feed` when the
        proxy asked a stream's usage (one call a chunk), else `relay`."""
        if self.injected and self.meter is not None:
            return self.meter.feed
        return self.relay

    def relay(self, data: bytes) -> bytes:
        """Take a chunk of the answer; return what the client gets of it."""
        meter = self.meter
        if meter is not None:
            if self.injected:
                return meter.feed(data)
            meter.feed(data)
            return data
        self.size += len(data)
        if len(self.head) < KEEP:
            self.head += data[: KEEP - len(self.head)]
        if self.size > KEEP:
            self.tail = (self.tail + data)[-_WINDOW:]
        return data

    def close(self) -> bytes:
        """The answer ended: what the client still gets (a stripped stream may hold the last bytes)."""
        meter = self.meter
        if meter is None:
            return b""
        if self.injected:
            return meter.close()
        meter.close()
        return b""

    def usage(self, partial: bool) -> Usage:
        """What the exchange used: the upstream's usage, or an estimate (a failure, a cut stream, no usage)."""
        if self.status >= 400:
            return Usage(0, 0, 0)
        if self.meter is not None:
            found = self.meter.usage
            return found if found is not None else estimate(self.kind, self.prompt_bytes, self.meter)
        if not self.status:
            return Usage(0, 0, 0)
        body = bytes(self.head) if self.size <= KEEP else bytes(self.head[:_WINDOW]) + self.tail
        found = None if partial else parse_answer(self.kind, body)
        return found if found is not None else estimate(self.kind, self.prompt_bytes, body)

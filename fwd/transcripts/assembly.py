"""One exchange's transcript: the request as sent and the response bytes as relayed, assembled into the
record written to chat.jsonl.  Pure.  Tests: tests/test_transcript.py"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from fwd.sse import SSEParser
from fwd.transcripts.shapes import (
    JSON_ERRORS,
    Answer,
    StreamAssembly,
    clip,
    complete_prefix,
    loads,
    upstream_error,
)

_KINDS = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/embeddings", "embeddings"),
)

DEFAULT_LIMIT = 1_048_576
_SSE_LINE_LIMIT = 1_048_576
# Relayed stream bytes wait here and are folded into the assembly in bulk: one SSE parse and one JSON decode
# per fold instead of one per chunk keeps transcripts cheap on the relay path, and memory stays bounded.
FOLD_AT = 64 * 1024
_EMBEDDING_MARK = b'"index"'
_USAGE_TAIL = 4096
_USAGE_RE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')
_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')


def transcript_kind(path: str) -> str | None:
    """Which transcript a request path gets ('chat', 'completions', 'responses', 'embeddings'), or None."""
    path = path.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    for suffix, kind in _KINDS:
        if path.endswith(suffix):
            return kind
    return None


_second_rendered: list = [None, ""]


def iso_utc(when: float) -> str:
    """Render a Unix time as ISO-8601 UTC with milliseconds (the date part is computed once a second)."""
    second = int(when)
    if _second_rendered[0] != second:
        _second_rendered[:] = [second, datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second_rendered[1]}.{int((when - second) * 1000):03d}Z"


def is_event_stream(content_type: str | None) -> bool:
    """Whether a Content-Type header names an SSE stream."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


class Transcript:
    """One exchange's transcript: fed the response as it is relayed, it yields the record dict at finish.

    `request_body` is the request as sent, or its first bytes when `request_size` says it was longer: a record
    holds at most `limit` of anything, so a huge request is recorded from its start, with `request_members`
    (its small top-level parameters, read by the serving process) added.
    """

    def __init__(
        self,
        *,
        kind: str,
        uid: str,
        time: float,
        client: str,
        caller: str,
        route: str,
        path: str,
        request_body: bytes,
        request_content_type: str | None,
        limit: int = DEFAULT_LIMIT,
        request_size: int | None = None,
        request_members: dict[str, Any] | None = None,
    ) -> None:
        self.kind = kind
        self.uid = uid
        self.time = time
        self.client = client
        self.caller = caller
        self.route = route
        self.path = path
        self.request_body = request_body
        self.request_size = len(request_body) if request_size is None else request_size
        self.request_members = request_members
        self.request_content_type = request_content_type
        self.limit = limit
        self.status: int | None = None
        self.content_type: str | None = None
        self.ttfb_ms: float | None = None
        self.mode = "plain"
        self.body = bytearray()
        self.body_size = 0
        self.body_cut = False
        self.parser: SSEParser | None = None
        self.stream = StreamAssembly(kind, limit)
        self.events = 0
        self.done = False
        self.failure: str | None = None
        # Embeddings bodies are mostly vectors: count items on the fly so an oversized body still gives a count.
        self.embeddings = 0
        self._carry = b""
        self._tail = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.folded = False

    def response_started(
        self, status: int, content_type: str | None, ttfb_ms: float, stream: bool | None = None
    ) -> None:
        """Note the upstream status and headers' arrival; choose how the body will be read.  `stream` says
        whether the content type is an event stream, when the caller already knows."""
        if not isinstance(status, int):
            return
        self.status = status
        self.content_type = content_type
        self.ttfb_ms = ttfb_ms
        if status >= 400:
            self.mode = "error"
        elif stream if stream is not None else is_event_stream(content_type):
            self.mode = "sse"
            # One event line can carry more than a small content limit; the parser bound is about memory only.
            self.parser = SSEParser(max_line=max(self.limit, _SSE_LINE_LIMIT))
            self.feed = self._feed_stream  # called per relayed chunk: the shortest path there is
        elif self.kind == "embeddings":
            self.mode = "embeddings"
        else:
            self.mode = "plain"

    def feed(self, chunk: bytes) -> None:
        """Take one relayed body chunk."""
        try:
            self._feed(chunk)
        except Exception as e:
            # Whatever upstream sends, the transcript must never break the relay: stop assembling instead.
            self._failed(e)

    def _failed(self, problem: Exception) -> None:
        self.mode = "failed"
        self.failure = f"transcript assembly failed: {problem!r}"

    def _feed_stream(self, chunk: bytes) -> None:
        """Take one relayed chunk of an event stream: keep it for the next bulk fold."""
        self.body_size += len(chunk)
        if self.done or self.mode != "sse":
            return
        self.pending.append(chunk)
        self.pending_size += len(chunk)
        if self.pending_size >= FOLD_AT:
            try:
                self.fold()
            except Exception as e:
                self._failed(e)

    def _feed(self, chunk: bytes) -> None:
        """Route one chunk to the stream parser or the bounded body buffer."""
        if self.mode == "failed":
            return
        if self.mode == "sse":
            return self._feed_stream(chunk)
        if self.mode == "embeddings":
            # A mark split across chunks lies within the previous chunk's last 6 bytes plus this one's first 6.
            edge = len(_EMBEDDING_MARK) - 1
            self.embeddings += chunk.count(_EMBEDDING_MARK) + (self._carry + chunk[:edge]).count(_EMBEDDING_MARK)
            self._carry = (self._carry + chunk)[-edge:]
            self._tail = (self._tail + chunk)[-_USAGE_TAIL:] if len(chunk) < _USAGE_TAIL else chunk[-_USAGE_TAIL:]
        self.body_size += len(chunk)
        room = self.limit - len(self.body)
        if len(chunk) <= room:
            self.body += chunk
        else:
            if room > 0:
                self.body += chunk[:room]
            self.body_cut = True

    def fold(self) -> None:
        """Parse the stream bytes waiting since the last fold and add their events to the assembly."""
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending = []
        self.pending_size = 0
        self.folded = True
        payloads = []
        for event in self.parser.feed(data):
            self.events += 1
            if event.data == "[DONE]":
                self.done = True
                break
            payloads.append(event.data)
        if not payloads:
            return
        try:
            # One decode for the whole batch; a batch with a bad event is decoded event by event instead.
            objects = loads("[" + ",".join(payloads) + "]")
            if len(objects) != len(payloads):
                raise ValueError("an event held more than one value")
        except JSON_ERRORS:
            objects = []
            for payload in payloads:
                try:
                    objects.append(loads(payload))
                except JSON_ERRORS:
                    objects.append(None)
        stream = self.stream
        for obj in objects:
            stream.add(obj)
        self.done = self.done or stream.done

    # -- the record ------------------------------------------------------------------------------------

    def _request(self) -> tuple[Any, str | None, bool]:
        """The parsed request body (None with a note when it is not JSON) and whether only its start was kept."""
        if self.request_size > len(self.request_body):
            request = complete_prefix(self.request_body)
            if not isinstance(request, dict):
                request = {}
            for name, value in (self.request_members or {}).items():
                request.setdefault(name, value)
            return request, None, True
        try:
            return loads(self.request_body), None, False
        except JSON_ERRORS:
            return None, "request body is not JSON", False

    def finish(self, *, partial: bool, error: str | None, latency_ms: float) -> dict[str, Any]:
        """Build the record; never raises on what the client or upstream sent."""
        request, request_problem, truncated = self._request()
        problems = [request_problem] if request_problem else []
        try:
            response, own_error, model, usage, cut = self._response(partial, problems)
        except Exception as e:
            response, own_error, model, usage, cut = None, None, None, None, False
            self.failure = f"transcript assembly failed: {e!r}"
        truncated = truncated or cut
        if self.failure:
            problems.append(self.failure)

        stream = self.mode == "sse"
        request_model = None
        if isinstance(request, dict):
            if isinstance(request.get("model"), str):
                request_model = request["model"]
            stream = request.get("stream") is True

        if isinstance(request, (dict, list)) and self.request_size > self.limit:
            # The body is bounded only by MAX_BODY_SIZE; the record holds at most `limit` of it.
            truncated = clip(request, self.limit) or truncated

        errors = [e for e in (error, own_error) if e]
        return {
            "uid": self.uid,
            "time": iso_utc(self.time),
            "client": self.client,
            "caller": self.caller,
            "route": self.route,
            "path": self.path,
            "model": request_model or model,
            "stream": stream,
            "request": request,
            "response": response,
            "usage": usage if self.mode != "error" else None,
            "status": self.status,
            "partial": bool(partial),
            "error": "; ".join(errors) if errors else None,
            "latency_ms": round(latency_ms, 3),
            "ttfb_ms": None if self.ttfb_ms is None else round(self.ttfb_ms, 3),
            "truncated": truncated,
            "parse_error": "; ".join(problems) if problems else None,
            "usage_estimated": None,
        }

    def _response(self, partial: bool, problems: list[str]) -> tuple[Any, str | None, str | None, Any, bool]:
        """The response shape, the upstream's own error, the model and usage it names, and whether it was cut;
        appends to problems."""
        body = bytes(self.body)
        mode = self.mode
        if mode == "error":
            return None, upstream_error(body, self.status or 0), None, None, False
        if mode == "sse":
            self.fold()
            stream = self.stream
            cut = stream.budget.cut
            if stream.bad_events:
                problems.append(f"{stream.bad_events} of {self.events} stream events were not JSON")
            elif not self.events and self.body_size:
                problems.append("response stream had no events")
            if self.parser.dropped:
                cut = True
                problems.append(f"{self.parser.dropped} over-long stream lines dropped")
            return stream.response(), stream.error, stream.model, stream.usage, cut
        if mode == "failed" or self.status is None:
            return None, None, None, None, False
        if self.body_cut:
            if mode == "embeddings":
                usage = model = None
                found = _USAGE_RE.search(self._tail)
                if found:
                    try:
                        usage = loads(found.group(1))
                    except JSON_ERRORS:
                        pass
                found = _MODEL_RE.search(body)
                if found:
                    model = found.group(1).decode("utf-8", "replace")
                return {"count": self.embeddings}, None, model, usage, False
            problems.append(f"response body of {self.body_size} bytes exceeds the {self.limit}-byte limit; not parsed")
            return None, None, None, None, True
        if body or not partial:
            try:
                parsed = loads(body)
            except JSON_ERRORS:
                problems.append("response body is not JSON")
                return None, None, None, None, False
            answer = Answer(self.kind, parsed)
            if answer.response is None:
                problems.append("response body is not a recognised response object")
            return answer.response, answer.error, answer.model, answer.usage, False
        return None, None, None, None, False


class Ended:
    """An exchange that has ended: its transcript, how it ended, and what it used as the gateway counted it
    (`used`: input_tokens, output_tokens, total_tokens, estimated; fwd.metering).  The record is built when first
    asked for, by whichever process writes it."""

    __slots__ = ("transcript", "partial", "error", "latency_ms", "used", "extra", "_record")

    def __init__(
        self, transcript: Transcript, *, partial: bool, error: str | None, latency_ms: float, used: dict | None = None,
        extra: dict | None = None,
    ) -> None:
        self.transcript = transcript
        self.partial = partial
        self.error = error
        self.latency_ms = latency_ms
        self.used = used
        self.extra = extra  # fields the record gains: "cache": "hit", "upstream": the base URL that answered
        self._record: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """The transcript record (built once)."""
        if self._record is None:
            record = self.transcript.finish(partial=self.partial, error=self.error, latency_ms=self.latency_ms)
            self._record = with_usage_counted(record, self.used, self.transcript.kind)
            if self.extra:
                self._record.update(self.extra)
        return self._record


def with_usage_counted(record: dict[str, Any], used: dict | None, kind: str) -> dict[str, Any]:
    """A record with the usage the gateway counted: `usage_estimated` says whether it was estimated (None when
    usage was not counted), and `usage`, when the answer relayed none (no usage came back, or the proxy asked
    for a stream's usage and removed it), holds the counted figures in the API's own names."""
    if used is None:
        return record
    record["usage_estimated"] = bool(used.get("estimated"))
    if record.get("usage") is None and record.get("status") is not None and record["status"] < 400:
        first, second = ("prompt_tokens", "completion_tokens") if kind in PROMPT_NAMED else ("input_tokens", "output_tokens")
        record["usage"] = {
            first: used["input_tokens"], second: used["output_tokens"], "total_tokens": used["total_tokens"]
        }
    return record


# The transcript kinds whose APIs name usage prompt_tokens / completion_tokens.
PROMPT_NAMED = frozenset({"chat", "completions", "embeddings"})

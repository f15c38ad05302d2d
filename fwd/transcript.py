"""Assembly of one exchange's transcript record from the request body and the relayed response chunks."""

from __future__ import annotations

import json
import re
import struct
from datetime import datetime, timezone
from typing import Any

import orjson

from fwd.sse import SSEParser

_KINDS = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/embeddings", "embeddings"),
)

_ERROR_SNIPPET = 1000
_SSE_LINE_LIMIT = 1_048_576
# Relayed stream bytes wait here and are folded into the assembly in bulk: one SSE parse and one JSON decode
# per fold instead of one per chunk keeps transcripts cheap on the relay path, and memory stays bounded.
_FOLD_AT = 64 * 1024
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


def _iso_utc(when: float) -> str:
    """Render a Unix time as ISO-8601 UTC with milliseconds (the date part is computed once a second)."""
    second = int(when)
    if _second_rendered[0] != second:
        _second_rendered[:] = [second, datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second_rendered[1]}.{int((when - second) * 1000):03d}Z"


def _is_event_stream(content_type: str | None) -> bool:
    """Whether a Content-Type header names an SSE stream."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def _upstream_error(body: bytes, status: int) -> str:
    """The message of an upstream error body: OpenAI's error.message, else the start of the body."""
    try:
        parsed = _loads(body)
    except _JSON_ERRORS:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    text = body.decode("utf-8", "replace").strip()[:_ERROR_SNIPPET]
    return text or f"upstream returned HTTP {status}"


_JSON_ERRORS = (ValueError, TypeError, RecursionError)


def _loads(data: str | bytes) -> Any:
    """Decode JSON fast with orjson; what only the lenient standard parser accepts (NaN, deep nesting, lone
    surrogates) still decodes, and what neither accepts raises one of _JSON_ERRORS."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _clip(root: Any, limit: int) -> bool:
    """Cut a parsed request in place to about `limit` characters, keeping what comes first; True when cut.

    Within a dict the cheap values go first (numbers, then strings shortest first, then nested values), so
    model and parameters survive a huge prompt; lists keep their order. Strings are cut to what is left, and once
    nothing is left the remaining items of every list and dict are dropped. Iterative: depth costs no recursion.
    """
    left = limit
    cut = False
    stack = [root]
    while stack:
        node = stack.pop()
        nested = []
        if isinstance(node, dict):
            keys = sorted(node, key=lambda k: _clip_order(node[k]))
            for n, key in enumerate(keys):
                if left <= 0:
                    for gone in keys[n:]:
                        del node[gone]
                    cut = True
                    break
                value = node[key]
                left -= len(key) + 1
                if isinstance(value, str):
                    if len(value) > left:
                        node[key] = value[: max(left, 0)]
                        cut = True
                    left -= len(value)
                elif isinstance(value, (dict, list)):
                    nested.append(value)
        elif isinstance(node, list):
            for n, value in enumerate(node):
                if left <= 0:
                    del node[n:]
                    cut = True
                    break
                left -= 1
                if isinstance(value, str):
                    if len(value) > left:
                        node[n] = value[: max(left, 0)]
                        cut = True
                    left -= len(value)
                elif isinstance(value, (dict, list)):
                    nested.append(value)
        stack.extend(reversed(nested))
    return cut


def _clip_order(value: Any) -> tuple[int, int]:
    """Sort key of a dict value for _clip: scalars, then strings by length, then lists and dicts."""
    if isinstance(value, str):
        return (1, len(value))
    if isinstance(value, (dict, list)):
        return (2, 0)
    return (0, 0)


def _index(value: Any, default: int) -> int:
    """A choice or tool-call index, falling back when a server sends something odd."""
    return value if isinstance(value, int) else default


class _Budget:
    """Characters of assembled text still allowed in the record, shared by every choice and tool call."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.cut = False

    def take(self, pieces: list[str], text: str) -> None:
        """Append text to pieces, cutting it once the budget is spent."""
        if len(text) <= self.left:
            pieces.append(text)
            self.left -= len(text)
            return
        if self.left > 0:
            pieces.append(text[: self.left])
            self.left = 0
        self.cut = True


class _Choice:
    """One choice (or one Responses output) being assembled from stream deltas."""

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] | None = None
        self.tools: dict[int, dict[str, Any]] = {}
        self.tool_args: dict[int, list[str]] = {}
        self.function_call: dict[str, Any] | None = None
        self.function_args: list[str] = []
        self.finish_reason: str | None = None

    def add_text(self, text: Any, budget: _Budget) -> None:
        """Append a content/text delta exactly as relayed."""
        if not isinstance(text, str):
            return
        if self.content is None:
            self.content = []
        budget.take(self.content, text)

    def add_tool_call(self, delta: dict[str, Any], budget: _Budget, default_index: int = 0) -> None:
        """Fold one tool-call delta in: identity from the index's first delta, arguments concatenated."""
        index = _index(delta.get("index"), default_index)
        fn = delta.get("function") or {}
        if not isinstance(fn, dict):
            fn = {}
        call = self.tools.get(index)
        if call is None:
            call = self.tools[index] = {
                "id": delta.get("id"),
                "type": delta.get("type") or "function",
                "function": {"name": fn.get("name"), "arguments": ""},
            }
            self.tool_args[index] = []
        else:
            # Some servers send the name/id only on a later delta.
            if call["id"] is None and delta.get("id"):
                call["id"] = delta["id"]
            if call["function"]["name"] is None and fn.get("name"):
                call["function"]["name"] = fn["name"]
        args = fn.get("arguments")
        if isinstance(args, str):
            budget.take(self.tool_args[index], args)

    def add_function_call(self, delta: dict[str, Any], budget: _Budget) -> None:
        """Fold a legacy `function_call` delta in."""
        if self.function_call is None:
            self.function_call = {"name": delta.get("name"), "arguments": ""}
        elif self.function_call["name"] is None and delta.get("name"):
            self.function_call["name"] = delta["name"]
        args = delta.get("arguments")
        if isinstance(args, str):
            budget.take(self.function_args, args)

    def tool_calls(self) -> list[dict[str, Any]] | None:
        """The assembled tool calls in index order, or None when there were none."""
        if not self.tools:
            return None
        calls = []
        for index in sorted(self.tools):
            call = self.tools[index]
            call["function"]["arguments"] = "".join(self.tool_args[index])
            calls.append(call)
        return calls

    def message(self, kind: str) -> dict[str, Any]:
        """The response shape for this choice."""
        content = None if self.content is None else "".join(self.content)
        if kind == "completions":
            return {"text": content, "finish_reason": self.finish_reason}
        out = {
            "role": self.role or "assistant",
            "content": content,
            "tool_calls": self.tool_calls(),
            "finish_reason": self.finish_reason,
        }
        if self.function_call is not None:
            self.function_call["arguments"] = "".join(self.function_args)
            out["function_call"] = self.function_call
        return out


class Transcript:
    """One exchange's transcript: fed the response as it is relayed, it yields the record dict at finish."""

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
        limit: int = 1_048_576,
    ) -> None:
        self.kind = kind
        self.uid = uid
        self.time = time
        self.client = client
        self.caller = caller
        self.route = route
        self.path = path
        self.request_body = request_body
        self.request_content_type = request_content_type
        self.limit = limit
        self.status: int | None = None
        self.content_type: str | None = None
        self.ttfb_ms: float | None = None
        self._mode = "plain"
        self._body = bytearray()
        self._body_size = 0
        self._body_cut = False
        self._parser: SSEParser | None = None
        self._budget = _Budget(limit)
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None
        self._model: str | None = None
        self._stream_error: str | None = None
        self._events = 0
        self._bad_events = 0
        self._done = False
        self._failure: str | None = None
        # Embeddings bodies are mostly vectors: count items on the fly so an oversized body still gives a count.
        self._embeddings = 0
        self._carry = b""
        self._tail = b""
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._folded = False

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
            self._mode = "error"
        elif stream if stream is not None else _is_event_stream(content_type):
            self._mode = "sse"
            # One event line can carry more than a small content limit; the parser bound is about memory only.
            self._parser = SSEParser(max_line=max(self.limit, _SSE_LINE_LIMIT))
            self.feed = self._feed_stream  # called per relayed chunk: the shortest path there is
        elif self.kind == "embeddings":
            self._mode = "embeddings"
        else:
            self._mode = "plain"

    def feed(self, chunk: bytes) -> None:
        """Take one relayed body chunk."""
        try:
            self._feed(chunk)
        except Exception as e:
            # Whatever upstream sends, the transcript must never break the relay: stop assembling instead.
            self._mode = "failed"
            self._failure = f"transcript assembly failed: {e!r}"

    def _feed_stream(self, chunk: bytes) -> None:
        """Take one relayed chunk of an event stream: keep it for the next bulk fold."""
        self._body_size += len(chunk)
        if self._done or self._mode != "sse":
            return
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size >= _FOLD_AT:
            try:
                self._fold()
            except Exception as e:
                self._mode = "failed"
                self._failure = f"transcript assembly failed: {e!r}"

    def _feed(self, chunk: bytes) -> None:
        """Route one chunk to the stream parser or the bounded body buffer."""
        if self._mode == "failed":
            return
        if self._mode == "sse":
            return self._feed_stream(chunk)
        if self._mode == "embeddings":
            # A mark split across chunks lies within the previous chunk's last 6 bytes plus this one's first 6.
            edge = len(_EMBEDDING_MARK) - 1
            self._embeddings += chunk.count(_EMBEDDING_MARK) + (self._carry + chunk[:edge]).count(_EMBEDDING_MARK)
            self._carry = (self._carry + chunk)[-edge:]
            self._tail = (self._tail + chunk)[-_USAGE_TAIL:] if len(chunk) < _USAGE_TAIL else chunk[-_USAGE_TAIL:]
        self._body_size += len(chunk)
        room = self.limit - len(self._body)
        if len(chunk) <= room:
            self._body += chunk
        else:
            if room > 0:
                self._body += chunk[:room]
            self._body_cut = True

    # -- streams ---------------------------------------------------------------------------------------

    def _fold(self) -> None:
        """Parse the stream bytes waiting since the last fold and add their events to the assembly."""
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending = []
        self._pending_size = 0
        self._folded = True
        payloads = []
        for event in self._parser.feed(data):
            self._events += 1
            if event.data == "[DONE]":
                self._done = True
                break
            payloads.append(event.data)
        if not payloads:
            return
        try:
            # One decode for the whole batch; a batch with a bad event is decoded event by event instead.
            objects = _loads("[" + ",".join(payloads) + "]")
            if len(objects) != len(payloads):
                raise ValueError("an event held more than one value")
        except _JSON_ERRORS:
            objects = []
            for payload in payloads:
                try:
                    objects.append(_loads(payload))
                except _JSON_ERRORS:
                    objects.append(None)
        for obj in objects:
            self._on_object(obj)

    def _on_object(self, obj: Any) -> None:
        """Fold one decoded stream event into the assembly."""
        if not isinstance(obj, dict):
            self._bad_events += 1
            return
        if self.kind == "responses":
            self._on_responses_event(obj)
            return
        if self._model is None and isinstance(obj.get("model"), str):
            self._model = obj["model"]
        usage = obj.get("usage")
        if usage:
            self._usage = usage
        err = obj.get("error")
        if err:
            self._stream_error = err.get("message") if isinstance(err, dict) else str(err)
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        budget = self._budget
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            index = _index(ch.get("index"), 0)
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = _Choice()
            if self.kind == "completions":
                state.add_text(ch.get("text"), budget)
            else:
                delta = ch.get("delta")
                if isinstance(delta, dict):
                    role = delta.get("role")
                    if role:
                        state.role = role
                    state.add_text(delta.get("content"), budget)
                    tool_calls = delta.get("tool_calls")
                    if isinstance(tool_calls, list):
                        for n, tc in enumerate(tool_calls):
                            if isinstance(tc, dict):
                                state.add_tool_call(tc, budget, n)
                    fc = delta.get("function_call")
                    if isinstance(fc, dict):
                        state.add_function_call(fc, budget)
                elif "text" in ch:
                    state.add_text(ch.get("text"), budget)
            reason = ch.get("finish_reason")
            if reason:
                state.finish_reason = reason

    def _on_responses_event(self, obj: dict[str, Any]) -> None:
        """Fold one Responses API stream event into the assembly."""
        kind = obj.get("type")
        state = self._choices.get(0)
        if state is None:
            state = self._choices[0] = _Choice()
            state.role = "assistant"
        if kind == "response.output_text.delta":
            state.add_text(obj.get("delta"), self._budget)
        elif kind == "response.output_item.added":
            item = obj.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                state.add_tool_call(
                    {
                        "index": obj.get("output_index", 0),
                        "id": item.get("call_id") or item.get("id"),
                        "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""},
                    },
                    self._budget,
                )
        elif kind == "response.function_call_arguments.delta":
            state.add_tool_call(
                {"index": obj.get("output_index", 0), "function": {"arguments": obj.get("delta")}}, self._budget
            )
        elif kind in ("response.created", "response.in_progress", "response.completed",
                      "response.incomplete", "response.failed"):
            resp = obj.get("response")
            if isinstance(resp, dict):
                if self._model is None and isinstance(resp.get("model"), str):
                    self._model = resp["model"]
                if resp.get("usage"):
                    self._usage = resp["usage"]
                if kind != "response.created" and kind != "response.in_progress":
                    state.finish_reason = resp.get("status")
                    self._done = True
                err = resp.get("error")
                if isinstance(err, dict) and err.get("message"):
                    self._stream_error = err["message"]
        elif kind == "error":
            msg = obj.get("message")
            if not msg and isinstance(obj.get("error"), dict):
                msg = obj["error"].get("message")
            self._stream_error = msg or "error event in stream"

    # -- plain bodies ----------------------------------------------------------------------------------

    def _parse_plain(self, body: Any) -> dict[str, Any] | None:
        """The response shape of a complete JSON body, also noting model and usage."""
        if not isinstance(body, dict):
            return None
        if isinstance(body.get("model"), str):
            self._model = body["model"]
        self._usage = body.get("usage")
        if self.kind == "embeddings":
            data = body.get("data")
            return {"count": len(data) if isinstance(data, list) else 0}
        if self.kind == "responses":
            return self._responses_body(body)
        choices = body.get("choices")
        if not isinstance(choices, list):
            return None
        out = []
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            if self.kind == "completions":
                shaped = {"text": ch.get("text"), "finish_reason": ch.get("finish_reason")}
            else:
                msg = ch.get("message")
                if not isinstance(msg, dict):
                    msg = {}
                shaped = {
                    "role": msg.get("role", "assistant"),
                    "content": msg.get("content"),
                    "tool_calls": msg.get("tool_calls"),
                    "finish_reason": ch.get("finish_reason"),
                }
                if msg.get("function_call") is not None:
                    shaped["function_call"] = msg["function_call"]
            out.append((_index(ch.get("index"), len(out)), shaped))
        return self._with_choices(out)

    def _responses_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The response shape of a complete Responses API object."""
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        output = body.get("output")
        for item in output if isinstance(output, list) else []:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                parts = item.get("content")
                for part in parts if isinstance(parts, list) else []:
                    if isinstance(part, dict) and part.get("type") == "output_text":
                        texts.append(part.get("text") or "")
            elif item.get("type") == "function_call":
                calls.append({
                    "id": item.get("call_id") or item.get("id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")},
                })
        if not texts and isinstance(body.get("output_text"), str):
            texts.append(body["output_text"])
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            self._stream_error = err["message"]
        return {
            "role": "assistant",
            "content": "".join(texts) if texts else None,
            "tool_calls": calls or None,
            "finish_reason": body.get("status"),
        }

    @staticmethod
    def _with_choices(shaped: list[tuple[Any, dict[str, Any]]]) -> dict[str, Any] | None:
        """Choice 0 as the response, with every choice listed when there are several."""
        if not shaped:
            return None
        shaped.sort(key=lambda pair: pair[0])
        first = dict(shaped[0][1])
        if len(shaped) > 1:
            first["choices"] = [dict(s, index=i) for i, s in shaped]
        return first

    # -- another process finishes it ------------------------------------------------------------------

    def capture(self) -> tuple[dict[str, Any], bytes] | None:
        """What rebuilds this transcript in another process: its metadata and every response byte fed so far.

        None once it holds less than that (a stream already folded, a body cut at the limit) or its assembly
        failed: then only `finish` here sees the whole exchange.
        """
        mode = self._mode
        if mode == "sse":
            if self._folded:
                return None
            response = b"".join(self._pending)
        elif mode == "failed" or self._body_cut:
            return None
        else:
            response = bytes(self._body)
        meta = {
            "kind": self.kind,
            "uid": self.uid,
            "time": self.time,
            "client": self.client,
            "caller": self.caller,
            "route": self.route,
            "path": self.path,
            "request_content_type": self.request_content_type,
            "limit": self.limit,
            "status": self.status,
            "content_type": self.content_type,
            "ttfb_ms": self.ttfb_ms,
        }
        return meta, response

    @classmethod
    def rebuild(cls, meta: dict[str, Any], request_body: bytes, response: bytes) -> Transcript:
        """The transcript `capture` described, fed the same bytes: its `finish` gives the same record."""
        transcript = cls(
            kind=meta["kind"],
            uid=meta["uid"],
            time=meta["time"],
            client=meta["client"],
            caller=meta["caller"],
            route=meta["route"],
            path=meta["path"],
            request_body=request_body,
            request_content_type=meta["request_content_type"],
            limit=meta["limit"],
        )
        if meta["status"] is not None:
            transcript.response_started(meta["status"], meta["content_type"], meta["ttfb_ms"])
        if response:
            transcript.feed(response)
        return transcript

    # -- the record ------------------------------------------------------------------------------------

    def _request(self) -> tuple[Any, str | None]:
        """The parsed request body, or None with a note when it is not JSON."""
        try:
            return _loads(self.request_body), None
        except _JSON_ERRORS:
            return None, "request body is not JSON"

    def finish(self, *, partial: bool, error: str | None, latency_ms: float) -> dict[str, Any]:
        """Build the record; never raises on what the client or upstream sent."""
        request, request_problem = self._request()
        problems = [request_problem] if request_problem else []
        try:
            response, own_error, truncated = self._response(partial, problems)
        except Exception as e:
            response, own_error, truncated = None, None, False
            self._failure = f"transcript assembly failed: {e!r}"
        if self._failure:
            problems.append(self._failure)

        model = None
        stream = self._mode == "sse"
        if isinstance(request, dict):
            if isinstance(request.get("model"), str):
                model = request["model"]
            stream = request.get("stream") is True
        if model is None:
            model = self._model

        if len(self.request_body) > self.limit and isinstance(request, (dict, list)):
            # The body is bounded only by MAX_BODY_SIZE; the record holds at most `limit` of it.
            truncated = _clip(request, self.limit) or truncated

        errors = [e for e in (error, own_error) if e]
        return {
            "uid": self.uid,
            "time": _iso_utc(self.time),
            "client": self.client,
            "caller": self.caller,
            "route": self.route,
            "path": self.path,
            "model": model,
            "stream": stream,
            "request": request,
            "response": response,
            "usage": self._usage if self._mode != "error" else None,
            "status": self.status,
            "partial": bool(partial),
            "error": "; ".join(errors) if errors else None,
            "latency_ms": round(latency_ms, 3),
            "ttfb_ms": None if self.ttfb_ms is None else round(self.ttfb_ms, 3),
            "truncated": truncated,
            "parse_error": "; ".join(problems) if problems else None,
        }

    def _response(self, partial: bool, problems: list[str]) -> tuple[dict[str, Any] | None, str | None, bool]:
        """The response shape, the upstream's own error and the truncation flag; appends to problems."""
        own_error: str | None = None
        response: dict[str, Any] | None = None
        truncated = False
        body = bytes(self._body)

        if self._mode == "error":
            own_error = _upstream_error(body, self.status or 0)
        elif self._mode == "sse":
            self._fold()
            truncated = self._budget.cut
            if self._choices:
                response = self._with_choices([(i, c.message(self.kind)) for i, c in self._choices.items()])
            if self._bad_events:
                problems.append(f"{self._bad_events} of {self._events} stream events were not JSON")
            elif not self._events and self._body_size:
                problems.append("response stream had no events")
            if self._parser.dropped:
                truncated = True
                problems.append(f"{self._parser.dropped} over-long stream lines dropped")
            own_error = self._stream_error
        elif self._mode == "failed" or self.status is None:
            pass
        elif self._body_cut:
            if self._mode == "embeddings":
                response = {"count": self._embeddings}
                usage = _USAGE_RE.search(self._tail)
                if usage:
                    try:
                        self._usage = _loads(usage.group(1))
                    except _JSON_ERRORS:
                        pass
                model = _MODEL_RE.search(body)
                if model:
                    self._model = model.group(1).decode("utf-8", "replace")
            else:
                truncated = True
                problems.append(
                    f"response body of {self._body_size} bytes exceeds the {self.limit}-byte limit; not parsed"
                )
        elif body or not partial:
            try:
                parsed = _loads(body)
            except _JSON_ERRORS:
                parsed = None
                problems.append("response body is not JSON")
            if parsed is not None:
                response = self._parse_plain(parsed)
                if response is None:
                    problems.append("response body is not a recognised response object")
        return response, own_error, truncated


class Ended:
    """An exchange that has ended: its transcript and how it ended.

    The record is built when first asked for, by whichever process writes it; `frame` hands the exchange to
    another process without building it here.
    """

    __slots__ = ("transcript", "partial", "error", "latency_ms", "_record")

    def __init__(self, transcript: Transcript, *, partial: bool, error: str | None, latency_ms: float) -> None:
        self.transcript = transcript
        self.partial = partial
        self.error = error
        self.latency_ms = latency_ms
        self._record: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """The transcript record (built once)."""
        if self._record is None:
            self._record = self.transcript.finish(partial=self.partial, error=self.error, latency_ms=self.latency_ms)
        return self._record

    def frame(self) -> bytes:
        """This exchange on the wire to a transcript writer: its capture when it has one, else its record."""
        captured = self.transcript.capture() if self._record is None else None
        if captured is None:
            return record_frame(encode_record(self.record()))
        meta, response = captured
        meta["partial"] = self.partial
        meta["error"] = self.error
        meta["latency_ms"] = self.latency_ms
        head = orjson.dumps(meta)
        request = self.transcript.request_body
        return b"".join((_FRAME.pack(_CAPTURE, len(head), len(request), len(response)), head, request, response))


def encode_record(record: dict[str, Any]) -> bytes:
    """One record as UTF-8 JSON: orjson, or the standard encoder for what orjson refuses (integers beyond
    64 bits, non-string keys)."""
    try:
        return orjson.dumps(record, default=str)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8", "replace")


# -- the wire between a serving process and the transcript writer --------------------------------------
#
# A frame is a 13-byte head (type, then three big-endian lengths) and up to three parts.  A capture frame holds
# the capture's metadata as JSON, the request body and the response bytes: the writer rebuilds the transcript
# and builds the record.  A record frame holds a record already encoded (the serving process had to finish it).

_FRAME = struct.Struct(">BIII")
_CAPTURE = 1
_RECORD = 2
MAX_FRAME = 1 << 31


def record_frame(line: bytes) -> bytes:
    """A frame carrying one encoded record."""
    return _FRAME.pack(_RECORD, len(line), 0, 0) + line


def frame_line(frame: bytes) -> bytes:
    """The chat.jsonl line (without its newline) of one frame."""
    kind, head, request, response = _FRAME.unpack_from(frame)
    at = _FRAME.size
    if kind == _RECORD:
        return frame[at : at + head]
    meta = orjson.loads(frame[at : at + head])
    at += head
    transcript = Transcript.rebuild(meta, frame[at : at + request], frame[at + request : at + request + response])
    ended = Ended(transcript, partial=meta["partial"], error=meta["error"], latency_ms=meta["latency_ms"])
    return encode_record(ended.record())


class FrameError(ValueError):
    """The byte stream is not frames (from here on): `frames` holds the whole frames read before."""

    def __init__(self, message: str, frames: list[bytes]) -> None:
        super().__init__(message)
        self.frames = frames


class FrameReader:
    """Cuts a byte stream into whole frames, whatever sizes it is read in."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Take bytes; return the frames they complete.  Raises FrameError on a stream that is not frames."""
        buffer = self._buffer
        buffer += data
        frames = []
        at = 0
        size = _FRAME.size
        while len(buffer) - at >= size:
            kind, head, request, response = _FRAME.unpack_from(buffer, at)
            length = size + head + request + response
            if kind not in (_CAPTURE, _RECORD) or length > MAX_FRAME:
                del buffer[:]
                raise FrameError(f"not a transcript frame (type {kind}, {length} bytes)", frames)
            if len(buffer) - at < length:
                break
            frames.append(bytes(buffer[at : at + length]))
            at += length
        del buffer[:at]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer)

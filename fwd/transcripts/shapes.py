"""What each API's answer looks like in a transcript: stream events folded into choices, complete bodies
shaped, huge requests clipped.  Pure.  Tests: tests/test_transcript.py"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

ERROR_SNIPPET = 1000
JSON_ERRORS = (ValueError, TypeError, RecursionError)


def loads(data: str | bytes) -> Any:
    """Decode JSON fast with orjson; what only the lenient standard parser accepts (NaN, deep nesting, lone
    surrogates) still decodes, and what neither accepts raises one of JSON_ERRORS."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def upstream_error(body: bytes, status: int) -> str:
    """The message of an upstream error body: OpenAI's error.message, else the start of the body."""
    try:
        parsed = loads(body)
    except JSON_ERRORS:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    text = body.decode("utf-8", "replace").strip()[:ERROR_SNIPPET]
    return text or f"upstream returned HTTP {status}"


def clip(root: Any, limit: int) -> bool:
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
        if isinstance(node, dict):
            keys = sorted(node, key=lambda k: _clip_order(node[k]))
            slots = [(node, key, key) for key in keys]
        elif isinstance(node, list):
            slots = [(node, n, None) for n in range(len(node))]
        else:
            continue
        nested = []
        for n, (container, slot, key) in enumerate(slots):
            if left <= 0:
                if key is None:
                    del container[slot:]
                else:
                    for _, gone, _ in slots[n:]:
                        del container[gone]
                cut = True
                break
            left -= 1 if key is None else len(key) + 1
            value = container[slot]
            if isinstance(value, str):
                if len(value) > left:
                    container[slot] = value[: max(left, 0)]
                    cut = True
                left -= len(value)
            elif isinstance(value, (dict, list)):
                nested.append(value)
        stack.extend(reversed(nested))
    return cut


_TOKEN = re.compile(
    rb'[ \t\n\r]*(?:"((?:[^"\\]|\\.)*)("?)|([\[\]{},:])|(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null)(?=[ \t\n\r,\]}:]))'
)
_CLOSERS = {ord("["): b"]", ord("{"): b"}"}


def complete_prefix(start: bytes) -> Any:
    """Parse the first bytes of a JSON document cut anywhere: what came before the cut, with an unfinished
    string value closed and the open containers closed (a transcript keeps the start of a huge request).
    None when nothing could be read."""
    stack = bytearray()
    expect_key = False
    good = -1  # where the document last was whole up to its open containers
    open_string = None  # (start of an unterminated string value, its text so far)
    pos = 0
    end = len(start)
    while pos < end:
        token = _TOKEN.match(start, pos)
        if token is None:
            break
        text, closed, punct, scalar = token.groups()
        if text is not None:
            if not closed:
                if not expect_key and stack:
                    open_string = (token.start(1) - 1, text)
                break
            if expect_key:
                expect_key = False
            else:
                good = token.end()
        elif scalar is not None:
            good = token.end()
        elif punct in (b"[", b"{"):
            stack.append(punct[0])
            expect_key = punct == b"{"
            good = token.end()
        elif punct in (b"]", b"}"):
            if not stack:
                break
            stack.pop()
            good = token.end()
            expect_key = False
        elif punct == b",":
            expect_key = bool(stack) and stack[-1] == ord("{")
        pos = token.end()
    if open_string is not None:
        at, text = open_string
        text = re.sub(rb"\\u?[0-9a-fA-F]{0,3}$|\\$", b"", text)
        document = start[:at] + b'"' + text + b'"' + _closers(start[:at])
    elif good > 0:
        document = start[:good] + _closers(start[:good])
    else:
        return None
    try:
        return loads(document)
    except JSON_ERRORS:
        return None


def _closers(prefix: bytes) -> bytes:
    """The brackets that close what is open at the end of a well-formed prefix."""
    stack = bytearray()
    pos = 0
    while True:
        token = _TOKEN.match(prefix, pos)
        if token is None:
            break
        punct = token.group(3)
        if punct in (b"[", b"{"):
            stack.append(punct[0])
        elif punct in (b"]", b"}") and stack:
            stack.pop()
        pos = token.end()
    return b"".join(_CLOSERS[c] for c in reversed(stack))


def _clip_order(value: Any) -> tuple[int, int]:
    """Sort key of a dict value for clip: scalars, then strings by length, then lists and dicts."""
    if isinstance(value, str):
        return (1, len(value))
    if isinstance(value, (dict, list)):
        return (2, 0)
    return (0, 0)


def _index(value: Any, default: int) -> int:
    """A choice or tool-call index, falling back when a server sends something odd."""
    return value if isinstance(value, int) else default


class TextBudget:
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


class Choice:
    """One choice (or one Responses output) being assembled from stream deltas."""

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] | None = None
        self.tools: dict[int, dict[str, Any]] = {}
        self.tool_args: dict[int, list[str]] = {}
        self.function_call: dict[str, Any] | None = None
        self.function_args: list[str] = []
        self.finish_reason: str | None = None

    def add_text(self, text: Any, budget: TextBudget) -> None:
        """Append a content/text delta exactly as relayed."""
        if not isinstance(text, str):
            return
        if self.content is None:
            self.content = []
        budget.take(self.content, text)

    def add_tool_call(self, delta: dict[str, Any], budget: TextBudget, default_index: int = 0) -> None:
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

    def add_function_call(self, delta: dict[str, Any], budget: TextBudget) -> None:
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


def with_choices(shaped: list[tuple[Any, dict[str, Any]]]) -> dict[str, Any] | None:
    """Choice 0 as the response, with every choice listed when there are several."""
    if not shaped:
        return None
    shaped.sort(key=lambda pair: pair[0])
    first = dict(shaped[0][1])
    if len(shaped) > 1:
        first["choices"] = [dict(s, index=i) for i, s in shaped]
    return first


class StreamAssembly:
    """The answer of a stream, folded from its decoded events: choices, model, usage, an in-stream error."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.budget = TextBudget(limit)
        self.choices: dict[int, Choice] = {}
        self.model: str | None = None
        self.usage: Any = None
        self.error: str | None = None
        self.bad_events = 0
        self.done = False

    def add(self, obj: Any) -> None:
        """Fold one decoded stream event into the assembly."""
        if not isinstance(obj, dict):
            self.bad_events += 1
            return
        if self.kind == "responses":
            self._add_responses_event(obj)
            return
        if self.model is None and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        usage = obj.get("usage")
        if usage:
            self.usage = usage
        err = obj.get("error")
        if err:
            self.error = err.get("message") if isinstance(err, dict) else str(err)
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        budget = self.budget
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            index = _index(ch.get("index"), 0)
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = Choice()
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

    def _add_responses_event(self, obj: dict[str, Any]) -> None:
        """Fold one Responses API stream event into the assembly."""
        kind = obj.get("type")
        state = self.choices.get(0)
        if state is None:
            state = self.choices[0] = Choice()
            state.role = "assistant"
        if kind == "response.output_text.delta":
            state.add_text(obj.get("delta"), self.budget)
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
                    self.budget,
                )
        elif kind == "response.function_call_arguments.delta":
            state.add_tool_call(
                {"index": obj.get("output_index", 0), "function": {"arguments": obj.get("delta")}}, self.budget
            )
        elif kind in ("response.created", "response.in_progress", "response.completed",
                      "response.incomplete", "response.failed"):
            resp = obj.get("response")
            if isinstance(resp, dict):
                if self.model is None and isinstance(resp.get("model"), str):
                    self.model = resp["model"]
                if resp.get("usage"):
                    self.usage = resp["usage"]
                if kind != "response.created" and kind != "response.in_progress":
                    state.finish_reason = resp.get("status")
                    self.done = True
                err = resp.get("error")
                if isinstance(err, dict) and err.get("message"):
                    self.error = err["message"]
        elif kind == "error":
            msg = obj.get("message")
            if not msg and isinstance(obj.get("error"), dict):
                msg = obj["error"].get("message")
            self.error = msg or "error event in stream"

    def response(self) -> dict[str, Any] | None:
        """The response shape of what was folded so far."""
        if not self.choices:
            return None
        return with_choices([(i, c.message(self.kind)) for i, c in self.choices.items()])


class Answer:
    """A complete JSON answer shaped for the record, with the model and usage it names."""

    def __init__(self, kind: str, body: Any) -> None:
        self.kind = kind
        self.model: str | None = None
        self.usage: Any = None
        self.error: str | None = None
        self.response = self._shape(body)

    def _shape(self, body: Any) -> dict[str, Any] | None:
        if not isinstance(body, dict):
            return None
        if isinstance(body.get("model"), str):
            self.model = body["model"]
        self.usage = body.get("usage")
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
        return with_choices(out)

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
            self.error = err["message"]
        return {
            "role": "assistant",
            "content": "".join(texts) if texts else None,
            "tool_calls": calls or None,
            "finish_reason": body.get("status"),
        }

"""One Realtime session's transcript: its events in both directions assembled into one record.  Pure.
Tests: tests/test_realtime.py

The record has the fields of every transcript (uid, time, client, caller, route, path, model, status, partial,
error, latency_ms, ttfb_ms, usage) and, for a session:

- `session`: the session's configuration, as the upstream last confirmed it (`session.created`,
  `session.updated`), else as the client last asked (`session.update`);
- `items`: the conversation in order: what the client added (`conversation.item.create`: role and text, audio
  as a size), its committed audio with the transcription the upstream made of it, and each response the upstream
  gave (`response.created` … `response.done`): text and audio transcripts assembled from their deltas, audio as a
  byte count, function calls with their arguments concatenated, and the response's status;
- `usage`: summed over the responses' `response.done`; `responses`: how many;
- `audio_bytes`: the audio each side sent (decoded size of the base64 in the events, binary frames counted whole);
- `frames`: how many frames each side sent; `ended`: who closed (client, upstream, proxy), the close code and
  reason.

Both the events the upstream (beta) and the GA API name are read: `response.text.delta` and
`response.output_text.delta`, `response.audio_transcript.delta` and `response.output_audio_transcript.delta`, and
so on.  A record holds at most `limit` characters of text; beyond, text is dropped and `truncated` is set.
"""

from __future__ import annotations

from typing import Any

import orjson

from fwd.realtime import usage_of
from fwd.transcripts.assembly import iso_utc

DEFAULT_LIMIT = 1_048_576
# The largest frame parsed for the transcript; a larger one is counted as a frame not read (`parse_error`).
PARSE_LIMIT = 4 * 1024 * 1024
MAX_ITEMS = 10_000
MAX_ERRORS = 100

_TEXT_DELTAS = ("response.text.delta", "response.output_text.delta")
_TRANSCRIPT_DELTAS = ("response.audio_transcript.delta", "response.output_audio_transcript.delta")
_AUDIO_DELTAS = ("response.audio.delta", "response.output_audio.delta")
_ARGUMENT_DELTAS = ("response.function_call_arguments.delta",)


def audio_size(encoded: object) -> int:
    """The bytes a base64 string decodes to."""
    if not isinstance(encoded, str):
        return 0
    padding = len(encoded) - len(encoded.rstrip("="))
    return max(0, len(encoded) * 3 // 4 - padding)


class SessionTranscript:
    """A Realtime session's transcript, fed each frame as it is relayed."""

    kind = "realtime"

    def __init__(self, *, uid: str, time: float, client: str, caller: str, route: str, path: str,
                 model: str | None, limit: int = DEFAULT_LIMIT) -> None:
        self.uid = uid
        self.time = time
        self.client = client
        self.caller = caller
        self.route = route
        self.path = path
        self.model = model
        self.limit = limit
        self.status: int | None = None
        self.ttfb_ms: float | None = None
        self.session: Any = None
        self.asked_session: Any = None
        self.items: list[dict] = []
        self.responses: dict[str, dict] = {}
        self.frames = {"client": 0, "upstream": 0}
        self.audio = {"client": 0, "upstream": 0}
        self.errors: list[Any] = []
        self.text_left = limit
        self.truncated = False
        self.unread = 0  # frames that were not events (not JSON, or too large to read)
        self.ended: dict | None = None
        self._input_audio = 0  # appended to the input buffer since its last commit

    def opened(self, status: int, ttfb_ms: float) -> None:
        self.status = status
        self.ttfb_ms = ttfb_ms

    def closed(self, by: str, code: int | None, reason: str | None) -> None:
        if self.ended is None:
            self.ended = {"by": by, "code": code, "reason": reason or None}

    def from_client(self, payload: bytes, binary: bool) -> None:
        self.frames["client"] += 1
        event = self._event(payload, binary, "client")
        if event is None:
            return
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            size = audio_size(event.get("audio"))
            self.audio["client"] += size
            self._input_audio += size
        elif kind == "session.update":
            self.asked_session = self._kept(event.get("session"))
        elif kind == "conversation.item.create":
            item = event.get("item")
            if isinstance(item, dict):
                added = self._item(item, "client")
                self.audio["client"] += added.get("audio_bytes", 0)
                self._add_item(added)
        elif kind == "input_audio_buffer.clear":
            self._input_audio = 0

    def from_upstream(self, payload: bytes, binary: bool) -> None:
        self.frames["upstream"] += 1
        event = self._event(payload, binary, "upstream")
        if event is None:
            return
        kind = event.get("type")
        if not isinstance(kind, str):
            return
        if kind in _AUDIO_DELTAS:
            size = audio_size(event.get("delta"))
            self.audio["upstream"] += size
            answer = self._response(event.get("response_id"))
            answer["audio_bytes"] = answer.get("audio_bytes", 0) + size
        elif kind in _TEXT_DELTAS:
            self._append(self._response(event.get("response_id")), "text", event.get("delta"))
        elif kind in _TRANSCRIPT_DELTAS:
            self._append(self._response(event.get("response_id")), "transcript", event.get("delta"))
        elif kind in _ARGUMENT_DELTAS:
            answer = self._response(event.get("response_id"))
            calls = answer.setdefault("tool_calls", {})
            call = calls.setdefault(str(event.get("call_id") or event.get("item_id")), {"arguments": ""})
            self._append(call, "arguments", event.get("delta"))
        elif kind == "response.output_item.added":
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                answer = self._response(event.get("response_id"))
                call = answer.setdefault("tool_calls", {}).setdefault(
                    str(item.get("call_id") or item.get("id")), {"arguments": ""})
                call["name"] = item.get("name")
        elif kind == "response.created":
            self._response(_id_of(event.get("response")))
        elif kind == "response.done":
            response = event.get("response")
            answer = self._response(_id_of(response))
            if isinstance(response, dict):
                answer["status"] = response.get("status")
                details = response.get("status_details")
                if details:
                    answer["status_details"] = self._kept(details)
                usage = usage_of(response)
                if usage is not None:
                    answer["usage"] = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                                       "total_tokens": usage.total_tokens}
        elif kind in ("session.created", "session.updated"):
            self.session = self._kept(event.get("session"))
            model = self.session.get("model") if isinstance(self.session, dict) else None
            if isinstance(model, str) and model:
                self.model = model
        elif kind == "input_audio_buffer.committed":
            self._add_item({"from": "client", "role": "user", "type": "input_audio", "item_id": event.get("item_id"),
                            "audio_bytes": self._input_audio})
            self._input_audio = 0
        elif kind == "conversation.item.input_audio_transcription.completed":
            found = self._find_item(event.get("item_id"))
            if found is not None:
                self._append(found, "transcript", event.get("transcript"))
        elif kind == "error" and len(self.errors) < MAX_ERRORS:
            self.errors.append(self._kept(event.get("error")))

    def _event(self, payload: bytes, binary: bool, side: str) -> dict | None:
        if binary:
            self.audio[side] += len(payload)
            return None
        if len(payload) > PARSE_LIMIT:
            self.unread += 1
            return None
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.unread += 1
            return None
        return event if isinstance(event, dict) else None

    def _response(self, response_id: object) -> dict:
        key = str(response_id)
        answer = self.responses.get(key)
        if answer is None and len(self.responses) >= MAX_ITEMS:
            self.truncated = True
            return {}  # fed and forgotten
        if answer is None:
            answer = self.responses[key] = {"from": "upstream", "role": "assistant", "type": "response",
                                            "response_id": response_id}
            self._add_item(answer)
        return answer

    def _add_item(self, item: dict) -> None:
        if len(self.items) < MAX_ITEMS:
            self.items.append(item)
        else:
            self.truncated = True

    def _find_item(self, item_id: object) -> dict | None:
        for item in reversed(self.items):
            if item.get("item_id") == item_id:
                return item
        return None

    def _item(self, item: dict, side: str) -> dict:
        """A conversation item a side added: its role and text, audio as a size."""
        found: dict[str, Any] = {"from": side, "role": item.get("role"), "type": item.get("type"),
                                 "item_id": item.get("id")}
        content = item.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if isinstance(part.get("text"), str):
                    self._append(found, "text", part["text"])
                if isinstance(part.get("transcript"), str):
                    self._append(found, "transcript", part["transcript"])
                if "audio" in part:
                    found["audio_bytes"] = found.get("audio_bytes", 0) + audio_size(part.get("audio"))
        for name in ("call_id", "name", "output", "arguments"):
            if isinstance(item.get(name), str):
                self._append(found, name, item[name])
        return found

    def _append(self, into: dict, name: str, text: object) -> None:
        if not isinstance(text, str):
            return
        if len(text) > self.text_left:
            text = text[: self.text_left]
            self.truncated = True
        if text:
            self.text_left -= len(text)
            into[name] = into.get(name, "") + text

    def _kept(self, value: Any) -> Any:
        """A configuration or error object, as it came when it is small, else cut to the record's limit."""
        if value is None:
            return None
        try:
            size = len(orjson.dumps(value))
        except (TypeError, orjson.JSONEncodeError):
            self.truncated = True  # nested past what the encoder takes
            return None
        if size > self.text_left:
            self.truncated = True
            return None
        self.text_left -= size
        return value

    def usage(self) -> dict | None:
        """The usage of every response, summed; None when none reported any."""
        reported = [a["usage"] for a in self.responses.values() if "usage" in a]
        if not reported:
            return None
        return {name: sum(u[name] for u in reported) for name in ("input_tokens", "output_tokens", "total_tokens")}

    def finish(self, *, partial: bool, error: str | None, latency_ms: float) -> dict[str, Any]:
        """The record; never raises on what either side sent."""
        items = []
        for item in self.items:
            shown = {k: v for k, v in item.items() if v is not None and k != "tool_calls"}
            calls = item.get("tool_calls")
            if calls:
                shown["tool_calls"] = [{"call_id": call_id, **call} for call_id, call in calls.items()]
            items.append(shown)
        errors = [e for e in (error,) if e]
        return {
            "uid": self.uid,
            "time": iso_utc(self.time),
            "client": self.client,
            "caller": self.caller,
            "route": self.route,
            "path": self.path,
            "model": self.model,
            "stream": True,
            "realtime": True,
            "session": self.session if self.session is not None else self.asked_session,
            "items": items,
            "responses": len(self.responses),
            "usage": self.usage(),
            "upstream_errors": self.errors or None,
            "audio_bytes": dict(self.audio),
            "frames": dict(self.frames),
            "ended": self.ended,
            "status": self.status,
            "partial": bool(partial),
            "error": "; ".join(errors) if errors else None,
            "latency_ms": round(latency_ms, 3),
            "ttfb_ms": None if self.ttfb_ms is None else round(self.ttfb_ms, 3),
            "truncated": self.truncated,
            "parse_error": f"{self.unread} frames were not events" if self.unread else None,
            "usage_estimated": None,
        }


def _id_of(response: object) -> object:
    return response.get("id") if isinstance(response, dict) else None

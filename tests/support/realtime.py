"""
A fake Realtime API (WebSocket) for the fake upstream: tests.support.upstream hands it every upgrade request
whose path ends in `/realtime` and whose key it accepts.

It speaks enough of the Realtime protocol for the SDK's realtime client and a browser-style client:

- on open: `session.created` (its model from the `model` or `deployment` query parameter);
- `session.update` -> `session.updated`; `conversation.item.create` -> `conversation.item.created`;
- `input_audio_buffer.append` / `.commit` -> `input_audio_buffer.committed` and the transcription of it;
- `response.create` -> `response.created`, text deltas (`response.output_text.delta`, or `response.text.delta`
  when the client asked for the beta with `OpenAI-Beta: realtime=v1` or the `openai-beta.realtime-v1`
  subprotocol), audio and audio-transcript deltas when the session's modalities include audio, then
  `response.done` with usage (input: words of the conversation, output: words answered);
- binary frames are echoed as they came.

Test controls, sent as client events:

- `{"type": "fake.close", "code": 4000, "reason": "…"}`: close with this code and reason;
- `{"type": "fake.drop"}`: drop the TCP connection without a close;
- `{"type": "fake.flood", "count": N, "size": S}`: send N text frames of S bytes as fast as the connection
  takes them (a producer: it stops while its transport is paused); `GET /__fake/realtime` says how many went
  and how often the connection was paused.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


class Stats:
    def __init__(self) -> None:
        self.sessions = 0
        self.open = 0
        self.flood_sent = 0
        self.paused = 0
        self.client_frames = 0
        self.closes: list[dict[str, Any]] = []

    def to_json(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "open": self.open, "flood_sent": self.flood_sent, "paused": self.paused,
                "client_frames": self.client_frames, "closes": self.closes}


@implementer(IPushProducer)
class _Flood:
    def __init__(self, protocol: FakeRealtime, count: int, size: int) -> None:
        self.protocol = protocol
        self.left = count
        self.frame = json.dumps({"type": "fake.flood", "data": "x" * max(0, size - 32)}).encode()
        self.paused = False

    def start(self) -> None:
        transport = self.protocol.transport
        transport.unregisterProducer()  # the HTTP channel the socket came from registered itself
        transport.registerProducer(self, True)
        self.protocol.factory.reactor.callLater(0, self._run)

    def _run(self) -> None:
        stats = self.protocol.factory.stats
        sent = 0
        while self.left and not self.paused and self.protocol.state == self.protocol.STATE_OPEN and sent < 64:
            self.protocol.sendMessage(self.frame, False)
            self.left -= 1
            stats.flood_sent += 1
            sent += 1
        if self.left and not self.paused and self.protocol.state == self.protocol.STATE_OPEN:
            self.protocol.factory.reactor.callLater(0, self._run)

    def pauseProducing(self) -> None:
        if not self.paused:
            self.protocol.factory.stats.paused += 1
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.protocol.factory.reactor.callLater(0, self._run)

    def stopProducing(self) -> None:
        self.left = 0


class FakeRealtime(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> Any:
        query = parse_qs(urlsplit(request.path if "?" in request.path else "/").query)
        params = {k: v[0] for k, v in request.params.items()} if request.params else {}
        params.update({k: v[0] for k, v in query.items()})
        self.model = params.get("model") or params.get("deployment") or "gpt-realtime"
        self.beta = request.headers.get("openai-beta", "") == "realtime=v1" or "openai-beta.realtime-v1" in (
            request.protocols or [])
        self.session: dict[str, Any] = {"id": "sess_fake", "object": "realtime.session", "model": self.model,
                                        "modalities": ["text"], "instructions": ""}
        self.words_in = 0
        self.counter = 0
        self.audio_buffered = 0
        self.last_text = ""
        return "realtime" if "realtime" in (request.protocols or []) else None

    opened = False

    def onOpen(self) -> None:
        self.opened = True
        stats = self.factory.stats
        stats.sessions += 1
        stats.open += 1
        self._send({"type": "session.created", "session": self.session})

    def _id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def _send(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", self._id("event"))
        self.sendMessage(json.dumps(event).encode(), False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.stats.client_frames += 1
        if isBinary:
            self.sendMessage(payload, True)
            return
        try:
            event = json.loads(payload)
        except ValueError:
            self._send({"type": "error", "error": {"type": "invalid_request_error", "message": "not JSON"}})
            return
        kind = event.get("type")
        if kind == "session.update":
            self.session.update(event.get("session") or {})
            self._send({"type": "session.updated", "session": self.session})
        elif kind == "conversation.item.create":
            item = dict(event.get("item") or {})
            item.setdefault("id", self._id("item"))
            for part in item.get("content") or []:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    self.last_text = text
                    self.words_in += len(text.split())
            self._send({"type": "conversation.item.created", "item": item})
        elif kind == "input_audio_buffer.append":
            self.audio_buffered += len(base64.b64decode(event.get("audio") or ""))
        elif kind == "input_audio_buffer.commit":
            item_id = self._id("item")
            self._send({"type": "input_audio_buffer.committed", "item_id": item_id})
            heard = f"heard {self.audio_buffered} bytes"
            self.last_text = heard
            self.words_in += len(heard.split())
            self.audio_buffered = 0
            self._send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                        "content_index": 0, "transcript": heard})
        elif kind == "response.create":
            self._respond()
        elif kind == "fake.close":
            self.factory.stats.closes.append({"code": event.get("code"), "reason": event.get("reason")})
            self.sendClose(event.get("code"), event.get("reason"))
        elif kind == "fake.drop":
            self.transport.abortConnection()
        elif kind == "fake.flood":
            _Flood(self, int(event.get("count", 100)), int(event.get("size", 1024))).start()

    def _respond(self) -> None:
        response_id = self._id("resp")
        item_id = self._id("item")
        words = ("Echo: " + self.last_text).split()
        text_delta = "response.text.delta" if self.beta else "response.output_text.delta"
        audio_delta = "response.audio.delta" if self.beta else "response.output_audio.delta"
        transcript_delta = "response.audio_transcript.delta" if self.beta else "response.output_audio_transcript.delta"
        audio = "audio" in (self.session.get("modalities") or self.session.get("output_modalities") or [])
        self._send({"type": "response.created", "response": {"id": response_id, "object": "realtime.response",
                                                             "status": "in_progress", "output": []}})
        self._send({"type": "response.output_item.added", "response_id": response_id, "output_index": 0,
                    "item": {"id": item_id, "type": "message", "role": "assistant", "content": []}})
        for n, word in enumerate(words):
            piece = word if n == 0 else " " + word
            if audio:
                self._send({"type": audio_delta, "response_id": response_id, "item_id": item_id,
                            "output_index": 0, "content_index": 0,
                            "delta": base64.b64encode(bytes(240)).decode()})
                self._send({"type": transcript_delta, "response_id": response_id, "item_id": item_id,
                            "output_index": 0, "content_index": 0, "delta": piece})
            else:
                self._send({"type": text_delta, "response_id": response_id, "item_id": item_id,
                            "output_index": 0, "content_index": 0, "delta": piece})
        usage = {"input_tokens": self.words_in, "output_tokens": len(words),
                 "total_tokens": self.words_in + len(words)}
        self._send({"type": "response.done", "response": {
            "id": response_id, "object": "realtime.response", "status": "completed", "usage": usage,
            "output": [{"id": item_id, "type": "message", "role": "assistant",
                        "content": [{"type": "text", "text": " ".join(words)}]}]}})

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        stats = self.factory.stats
        if self.opened:
            stats.open -= 1
        stats.closes.append({"code": code, "reason": reason, "clean": wasClean, "by": "client"})


def realtime_factory(reactor: Any) -> WebSocketServerFactory:
    factory = WebSocketServerFactory(reactor=reactor)
    factory.protocol = FakeRealtime
    factory.stats = Stats()
    factory.setProtocolOptions(maxFramePayloadSize=32 * 1024 * 1024, maxMessagePayloadSize=32 * 1024 * 1024)
    return factory

"""
A fake OpenAI upstream for tests, in memory or as a subprocess.

L{FakeUpstream} is a Twisted resource that answers like a small OpenAI API,
records every request it gets and misbehaves on demand.  Drive it in memory
with C{treq.testing.StubTreq(FakeUpstream(reactor=clock))}, or for real with
`python -m tests.support.upstream` and tests.support.processes.FakeUpstreamProcess.

Per-request controls, read from request headers (all optional)::

    x-fake-status: CODE          answer CODE with an OpenAI-shaped error body
    x-fake-retry-after: SECONDS  ... and a Retry-After header
    x-fake-error-code: CODE      ... and this error.code (e.g. insufficient_quota)
    x-fake-echo-key: 1           ... whose message quotes the key the request carried, as some servers do
    x-fake-chunks: N             content deltas in a streamed reply (default 5)
    x-fake-interval: SECONDS     delay between the writes of a streamed body
    x-fake-bytes: N              answer N bytes of application/octet-stream,
                                 byte i being i % 256, in 64 KiB writes
    x-fake-fail: MODE            hang-before-headers, close-before-headers,
                                 hang-mid-stream, reset-mid-stream
    x-fake-cache-control: VALUE  answer with this Cache-Control header

A streamed body is a list of writes: the first goes out with the headers, each
next one C{x-fake-interval} seconds later.  C{hang-mid-stream} stops after the
first write, C{reset-mid-stream} resets the connection after the second; a
non-streamed body hit by these is written in three parts.

An upgrade to a WebSocket at a path ending in C{/realtime} (C{/openai/realtime} for Azure's shape) is a Realtime
session once its key passes: see tests.support.realtime.

Control endpoints, not recorded: C{GET /__fake/received}, C{GET /__fake/realtime}, C{POST /__fake/reset},
C{POST /__fake/keys}, C{GET /__fake/disconnects}.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.utils
import hashlib
import json
import re
import struct
from email.message import Message
from http import HTTPStatus
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import unquote

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime, IWriteDescriptor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

__all__ = [
    "DEFAULT_MODELS",
    "FakeUpstream",
    "FormPart",
    "Received",
    "main",
    "parse_multipart",
]

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "whisper-1")
DEFAULT_CHUNKS = 5
EMBEDDING_DIMENSIONS = 8
RATE_LIMIT_REQUESTS = 10000
FAIL_MODES = (
    "hang-before-headers",
    "close-before-headers",
    "hang-mid-stream",
    "reset-mid-stream",
)

# 64 KiB whose byte i is i % 256, so any prefix of a repeat of it keeps that rule.
_BLOCK = bytes(range(256)) * 256
_DONE = b"data: [DONE]\n\n"
_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    429: ("requests", "rate_limit_exceeded"),
}
_MESSAGES = {
    401: "Incorrect API key provided.",
    429: "Rate limit reached for requests.",
}


@attrs.frozen
class Received:
    """One request as the fake upstream got it, for tests to inspect."""

    method: bytes
    uri: bytes
    # Names as Twisted canonicalises them, repeated names grouped, else in order.
    headers: list[tuple[bytes, bytes]]
    body: bytes
    key: str | None
    request_id: str = ""

    def header(self, name: bytes | str) -> bytes | None:
        """The last value of header C{name} (any case), or None."""
        if isinstance(name, str):
            name = name.encode("latin-1")
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[-1] if values else None

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def to_json(self) -> dict[str, Any]:
        """This record as JSON-ready data, the body as base64 plus its sha256."""
        return {
            "method": self.method.decode("latin-1"),
            "uri": self.uri.decode("latin-1"),
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
            "body_base64": base64.b64encode(self.body).decode("ascii"),
            "body_sha256": hashlib.sha256(self.body).hexdigest(),
            "body_length": len(self.body),
            "key": self.key,
            "request_id": self.request_id,
        }


@attrs.frozen
class FormPart:
    """One part of a multipart/form-data body."""

    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes

    def summary(self) -> dict[str, Any]:
        """Name, filename, type, length and sha256 of the part, as JSON-ready data."""
        return {
            "name": self.name,
            "filename": self.filename,
            "content_type": self.content_type,
            "bytes": len(self.data),
            "sha256": hashlib.sha256(self.data).hexdigest(),
        }


def parse_multipart(content_type: bytes | str, body: bytes) -> list[FormPart]:
    """Split a multipart/form-data body into its parts, byte for byte; ValueError if malformed."""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_maintype() != "multipart" or not boundary:
        raise ValueError("expected a multipart body with a boundary")
    delimiter = b"\r\n--" + email.utils.collapse_rfc2231_value(boundary).encode("latin-1")
    sections = (b"\r\n" + body).split(delimiter)
    parts = []
    for section in sections[1:]:
        if section.startswith(b"--"):
            return parts
        # Drop transport padding and the line break that end the delimiter line.
        section = section.partition(b"\r\n")[2]
        if section.startswith(b"\r\n"):
            head, data = b"", section[2:]
        else:
            head, found, data = section.partition(b"\r\n\r\n")
            if not found:
                raise ValueError("multipart part without a header end")
        headers = email.parser.HeaderParser().parsestr(head.decode("utf-8", "replace"))
        name = headers.get_param("name", header="content-disposition")
        parts.append(
            FormPart(
                name=None if name is None else email.utils.collapse_rfc2231_value(name),
                filename=headers.get_filename(),
                content_type=headers.get("content-type"),
                data=data,
            )
        )
    raise ValueError("multipart body without its closing delimiter")


class _BadRequest(Exception):
    """The request cannot be answered; the message goes into a 400 error body."""


_AZURE = re.compile(rb"\A/openai/deployments/([^/]+)/(.+)\Z")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _sse(payload: Any, event: str | None = None) -> bytes:
    prefix = b"event: %s\n" % event.encode("ascii") if event else b""
    return prefix + b"data: " + _dumps(payload) + b"\n\n"


def _writes(head: list[bytes], body: list[bytes], tail: list[bytes]) -> list[bytes]:
    """Group stream events into writes: head with the first body event, then one each, then the tail."""
    return [b"".join(head + body[:1]), *body[1:], b"".join(tail)]


def _split(text: str, count: int) -> list[str]:
    """Cut C{text} into C{count} consecutive pieces, at word starts when it has enough words."""
    words = re.split(r"(?<=\s)(?=\S)", text)
    total = len(words) if len(words) >= count else len(text)
    items: Any = words if len(words) >= count else text
    return ["".join(items[i * total // count : (i + 1) * total // count]) for i in range(count)]


def _thirds(body: bytes) -> list[bytes]:
    size = len(body)
    return [body[: size // 3], body[size // 3 : 2 * size // 3], body[2 * size // 3 :]]


def _octets(size: int) -> Iterator[bytes]:
    while size > 0:
        piece = _BLOCK if size >= len(_BLOCK) else _BLOCK[:size]
        size -= len(piece)
        yield piece


def _text(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def _words(*texts: str) -> int:
    return sum(len(text.split()) for text in texts)


def _seconds(value: float) -> bytes:
    return f"{value:g}".encode("ascii")


def _request_key(request: Request) -> str | None:
    """The bearer token, else the C{api-key} header, else None."""
    authorization = request.getHeader(b"authorization")
    if authorization:
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() == b"bearer":
            return token.strip().decode("latin-1")
    api_key = request.getHeader(b"api-key")
    return None if api_key is None else api_key.decode("latin-1")


def _header(request: Request, name: bytes, convert: Any, minimum: float) -> Any:
    raw = request.getHeader(name)
    if raw is None:
        return None
    try:
        value = convert(raw.decode("ascii"))
    except ValueError:
        raise _BadRequest(f"bad {name.decode()} header: {raw!r}") from None
    if value < minimum:
        raise _BadRequest(f"{name.decode()} must be at least {minimum}")
    return value


@implementer(IPushProducer)
class _Stream:
    """Writes a body to a request, C{interval} seconds apart, holding back while the client is slow."""

    def __init__(self, exchange: _Exchange, writes: Iterable[bytes]) -> None:
        self._exchange = exchange
        self._writes = iter(writes)
        self._upcoming = next(self._writes, None)
        self._sent = 0
        self._paused = False
        self._due = False
        self._done = False
        self._call: Any = None

    def start(self) -> None:
        self._exchange.request.registerProducer(self, True)
        self._next()

    def _next(self) -> None:
        self._call = None
        exchange = self._exchange
        while not self._done:
            if self._paused:
                self._due = True
                return
            data, self._upcoming = self._upcoming, next(self._writes, None)
            if data is None:
                return self._end()
            exchange.request.write(data)
            self._sent += 1
            if exchange.fail == "hang-mid-stream" and self._sent == 1:
                self._done = True
            elif exchange.fail == "reset-mid-stream" and self._sent == 2:
                self._done = True
                exchange.reset()
            elif self._upcoming is None:
                return self._end()
            elif exchange.interval:
                self._call = exchange.upstream.reactor.callLater(exchange.interval, self._next)
                return

    def _end(self) -> None:
        self._done = True
        if self._exchange.fail == "hang-mid-stream":
            return
        if self._exchange.fail == "reset-mid-stream":
            return self._exchange.reset()
        self._exchange.request.unregisterProducer()
        self._exchange.request.finish()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._due and not self._done:
            self._due = False
            self._next()

    def stopProducing(self) -> None:
        self._done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


@attrs.define
class _Exchange:
    """One request being answered, with its controls."""

    upstream: FakeUpstream
    request: Request
    number: int
    body: bytes
    fail: str | None = None
    chunks: int = DEFAULT_CHUNKS
    interval: float = 0.0
    aborted: bool = False
    stream: _Stream | None = None

    def reset(self) -> None:
        """Reset the connection after pushing what was written to the kernel, so the peer reads it first."""
        self.aborted = True
        channel = self.request.channel
        if channel is None:
            return
        transport = channel.transport
        if IWriteDescriptor.providedBy(transport):
            transport.doWrite()
        transport.abortConnection()

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.stopProducing()

    def json_body(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body)
        except ValueError:
            raise _BadRequest("We could not parse the JSON body of your request.") from None
        if not isinstance(value, dict):
            raise _BadRequest("The request body must be a JSON object.")
        return value

    def form(self) -> list[FormPart]:
        try:
            return parse_multipart(self.request.getHeader(b"content-type") or b"", self.body)
        except ValueError as error:
            raise _BadRequest(str(error)) from None

    def send(self, content_type: bytes, body: bytes, code: int = 200) -> Any:
        """Answer a whole body; a mid-stream fault cuts it into three writes."""
        try:
            phrase: bytes | None = HTTPStatus(code).phrase.encode("ascii")
        except ValueError:
            phrase = None
        self.request.setResponseCode(code, phrase)
        self.request.setHeader(b"content-type", content_type)
        if self.fail in ("hang-mid-stream", "reset-mid-stream"):
            return self.write_stream(_thirds(body))
        return body

    def json(self, value: Any, code: int = 200) -> Any:
        return self.send(b"application/json", _dumps(value), code)

    def error(
        self, code: int, message: str | None = None, retry_after: float | None = None, error_code: str | None = None
    ) -> Any:
        """Answer an OpenAI-shaped error."""
        kind, default_code = _ERRORS.get(code, ("server_error" if code >= 500 else "invalid_request_error", None))
        if message is None:
            try:
                message = _MESSAGES.get(code, HTTPStatus(code).phrase)
            except ValueError:
                message = f"HTTP {code}"
        if retry_after is not None:
            self.request.setHeader(b"retry-after", _seconds(retry_after))
        payload = {"message": message, "type": kind, "param": None, "code": error_code or default_code}
        return self.json({"error": payload}, code)

    def events(self, writes: list[bytes]) -> Any:
        self.request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        self.request.setHeader(b"cache-control", b"no-cache")
        return self.write_stream(writes)

    def write_stream(self, writes: Iterable[bytes]) -> Any:
        self.stream = _Stream(self, writes)
        self.stream.start()
        return NOT_DONE_YET


class FakeUpstream(Resource):
    """
    A small OpenAI API as a Twisted resource, recording requests and injecting faults.

    @ivar received: every request answered, oldest first.
    @ivar disconnects: how many requests the client dropped before their answer ended.
    @ivar key_status: key -> (status, Retry-After or None[, error code]) to refuse that key with.
    @ivar expected_keys: when not None, any other key gets 401.
    """

    isLeaf = True

    def __init__(
        self,
        reactor: IReactorTime | None = None,
        *,
        models: Iterable[str] = DEFAULT_MODELS,
        key_status: Mapping[str, tuple] | None = None,
        expected_keys: Iterable[str] | None = None,
        delay: float = 0.0,
    ) -> None:
        super().__init__()
        self.delay = delay
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor  # type: ignore[assignment]
        self.reactor: Any = reactor
        self.models = list(models)
        self.received: list[Received] = []
        self.disconnects = 0
        self.key_status: dict[str, tuple] = dict(key_status or {})
        self.expected_keys: set[str] | None = None if expected_keys is None else set(expected_keys)
        self._count = 0
        from tests.support.realtime import realtime_factory

        self.realtime = realtime_factory(reactor)
        self._routes = {
            (b"GET", b"/v1/models"): self._models,
            (b"POST", b"/v1/chat/completions"): self._chat,
            (b"POST", b"/v1/completions"): self._completions,
            (b"POST", b"/v1/embeddings"): self._embeddings,
            (b"POST", b"/v1/responses"): self._responses,
            (b"POST", b"/v1/files"): self._files,
            (b"POST", b"/v1/audio/transcriptions"): self._transcription,
            (b"POST", b"/v1/audio/translations"): self._transcription,
        }

    def reset(self) -> None:
        """Forget recorded requests, disconnects and Realtime figures."""
        self.received.clear()
        self.disconnects = 0
        from tests.support.realtime import Stats

        self.realtime.stats = Stats()

    def set_keys(self, changes: Mapping[str, Any]) -> None:
        """Apply C{{key: {"status": int, "retry_after": float|None} | None}}; None removes the key."""
        for key, value in changes.items():
            if value is None:
                self.key_status.pop(key, None)
                continue
            retry_after = value.get("retry_after")
            self.key_status[key] = (int(value["status"]), None if retry_after is None else float(retry_after))
            if value.get("code"):
                self.key_status[key] += (str(value["code"]),)

    def render(self, request: Request) -> Any:
        body = request.content.read()
        if request.path.startswith(b"/__fake/"):
            return self._control(request, body)
        self._count += 1
        key = _request_key(request)
        self.received.append(
            Received(
                method=request.method,
                uri=request.uri,
                headers=[(n, v) for n, values in request.requestHeaders.getAllRawHeaders() for v in values],
                body=body,
                key=key,
                request_id=f"req_{self._count}",
            )
        )
        exchange = _Exchange(self, request, self._count, body)
        request.notifyFinish().addErrback(self._lost, exchange)
        request.setHeader(b"x-request-id", b"req_%d" % (self._count,))
        request.setHeader(b"openai-processing-ms", b"0")
        cache_control = request.getHeader(b"x-fake-cache-control")
        if cache_control is not None:
            request.setHeader(b"cache-control", cache_control)
        request.setHeader(b"x-ratelimit-limit-requests", b"%d" % (RATE_LIMIT_REQUESTS,))
        remaining = max(RATE_LIMIT_REQUESTS - self._count, 0)
        request.setHeader(b"x-ratelimit-remaining-requests", b"%d" % (remaining,))
        if self.delay:
            gone: list = []
            request.notifyFinish().addErrback(gone.append)
            self.reactor.callLater(self.delay, self._later, exchange, key, gone)
            return NOT_DONE_YET
        return self._answered(exchange, key)

    def _answered(self, exchange: _Exchange, key: str | None) -> Any:
        try:
            return self._answer(exchange, key)
        except _BadRequest as error:
            return exchange.error(400, str(error))

    def _later(self, exchange: _Exchange, key: str | None, gone: list) -> None:
        """Answer after --delay seconds (a slow upstream), unless the client left meanwhile."""
        request = exchange.request
        if request.finished or gone:
            return
        answer = self._answered(exchange, key)
        if answer is not NOT_DONE_YET:
            request.write(answer)
            request.finish()

    def _answer(self, exchange: _Exchange, key: str | None) -> Any:
        request = exchange.request
        fail = request.getHeader(b"x-fake-fail")
        if fail is not None and fail.decode("latin-1") not in FAIL_MODES:
            raise _BadRequest(f"x-fake-fail must be one of {', '.join(FAIL_MODES)}")
        exchange.fail = None if fail is None else fail.decode("latin-1")
        if exchange.fail == "hang-before-headers":
            return NOT_DONE_YET
        if exchange.fail == "close-before-headers":
            exchange.reset()
            return NOT_DONE_YET
        exchange.chunks = _header(request, b"x-fake-chunks", int, 1) or DEFAULT_CHUNKS
        exchange.interval = _header(request, b"x-fake-interval", float, 0) or 0.0

        if key in self.key_status:
            status, retry_after, *code = self.key_status[key]
            return exchange.error(status, retry_after=retry_after, error_code=code[0] if code else None)
        if self.expected_keys is not None and key not in self.expected_keys:
            return exchange.error(401)
        status = _header(request, b"x-fake-status", int, 100)
        if status is not None:
            code = request.getHeader(b"x-fake-error-code")
            message = f"Incorrect API key provided: {key}." if request.getHeader(b"x-fake-echo-key") else None
            return exchange.error(
                status,
                message,
                retry_after=_header(request, b"x-fake-retry-after", float, 0),
                error_code=code.decode("latin-1") if code else None,
            )
        if request.getHeader(b"upgrade") is not None and request.path.rstrip(b"/").endswith(b"/realtime"):
            return self._realtime(exchange)
        size = _header(request, b"x-fake-bytes", int, 0)
        if size is not None:
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % (size,))
            return exchange.write_stream(_octets(size))

        path = request.path
        azure = _AZURE.match(path)
        if azure is not None:
            # Azure OpenAI's shape: /openai/deployments/{deployment}/{operation}?api-version=…, the key in api-key.
            if not request.args.get(b"api-version") or request.getHeader(b"api-key") is None:
                return exchange.error(404, "Resource not found")
            path = b"/v1/" + azure.group(2)
        route = self._routes.get((request.method, path))
        if route is not None:
            return route(exchange)
        if request.method == b"GET" and request.path.startswith(b"/v1/models/"):
            return self._model(exchange, unquote(request.path[len(b"/v1/models/") :].decode("utf-8", "replace")))
        return self._echo(exchange)

    def _realtime(self, exchange: _Exchange) -> Any:
        """A Realtime session (tests.support.realtime); Azure's shape needs api-version, deployment and api-key."""
        from autobahn.twisted.resource import WebSocketResource

        request = exchange.request
        if request.path.startswith(b"/openai/") and (
            not request.args.get(b"api-version") or not request.args.get(b"deployment")
            or request.getHeader(b"api-key") is None
        ):
            return exchange.error(404, "Resource not found")
        return WebSocketResource(self.realtime).render(request)

    def _lost(self, reason: Any, exchange: _Exchange) -> None:
        if not exchange.aborted:
            self.disconnects += 1
        exchange.stop()

    def _control(self, request: Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        route = (request.method, request.path)
        if route == (b"GET", b"/__fake/received"):
            return _dumps([record.to_json() for record in self.received])
        if route == (b"GET", b"/__fake/realtime"):
            return _dumps(self.realtime.stats.to_json())
        if route == (b"GET", b"/__fake/disconnects"):
            return _dumps({"disconnects": self.disconnects})
        if route == (b"POST", b"/__fake/reset"):
            self.reset()
            return _dumps({"reset": True})
        if route == (b"POST", b"/__fake/keys"):
            try:
                changes = json.loads(body)
                self.set_keys(changes)
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                request.setResponseCode(400)
                return _dumps({"error": {"message": f"bad key table: {error}", "type": "invalid_request_error"}})
            return _dumps(
                {
                    key: {"status": s, "retry_after": r, **({"code": c[0]} if c else {})}
                    for key, (s, r, *c) in self.key_status.items()
                }
            )
        request.setResponseCode(404)
        return _dumps({"error": {"message": "unknown control endpoint", "type": "invalid_request_error"}})

    def _created(self) -> int:
        return int(self.reactor.seconds())

    def _model_object(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "fake"}

    def _models(self, exchange: _Exchange) -> Any:
        return exchange.json({"object": "list", "data": [self._model_object(m) for m in self.models]})

    def _model(self, exchange: _Exchange, model_id: str) -> Any:
        if model_id not in self.models:
            return exchange.error(404, f"The model '{model_id}' does not exist", error_code="model_not_found")
        return exchange.json(self._model_object(model_id))

    def _chat(self, exchange: _Exchange) -> Any:
        request = exchange.json_body()
        model = request.get("model", DEFAULT_MODELS[0])
        messages = request.get("messages")
        prompt = " ".join(_text(m.get("content")) for m in messages or [] if isinstance(m, dict))
        user = _last_user_text(messages)
        reply = "echo: " + user
        base = {"id": f"chatcmpl-{exchange.number}", "created": self._created(), "model": model}
        tool = _tool_name(request)
        arguments = _dumps({"text": user}).decode("utf-8")
        answer = arguments if tool else reply
        usage = {
            "prompt_tokens": _words(prompt),
            "completion_tokens": _words(answer),
            "total_tokens": _words(prompt, answer),
        }
        finish = "tool_calls" if tool else "stop"
        call = {"id": f"call_{exchange.number}", "type": "function", "function": {"name": tool, "arguments": arguments}}

        if not request.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": reply, "refusal": None}
            if tool:
                message.update(content=None, tool_calls=[call])
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            return exchange.json({**base, "object": "chat.completion", "choices": [choice], "usage": usage})

        with_usage = bool((request.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            # As OpenAI does: with include_usage every chunk carries "usage": null, as its last member.
            usage_member = {"usage": None} if with_usage else {}
            return _sse({**base, "object": "chat.completion.chunk", "choices": [choice], **usage_member})

        pieces = _split(answer, exchange.chunks)
        if tool:
            opening = {**call, "index": 0, "function": {"name": tool, "arguments": ""}}
            first = {"role": "assistant", "content": None, "tool_calls": [opening]}
            body = [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces]
        else:
            first = {"role": "assistant", "content": ""}
            body = [chunk({"content": p}) for p in pieces]
        tail = [chunk({}, finish)]
        if with_usage:
            tail.append(_sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
        return exchange.events(_writes([chunk(first)], body, tail + [_DONE]))

    def _completions(self, exchange: _Exchange) -> Any:
        request = exchange.json_body()
        prompt = request.get("prompt", "")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
        prompt = prompt if isinstance(prompt, str) else ""
        text = "echo: " + prompt
        base = {
            "id": f"cmpl-{exchange.number}",
            "object": "text_completion",
            "created": self._created(),
            "model": request.get("model", DEFAULT_MODELS[0]),
        }
        usage = {"prompt_tokens": _words(prompt), "completion_tokens": _words(text), "total_tokens": _words(prompt, text)}

        def choice(piece: str, finish: str | None) -> dict[str, Any]:
            return {"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}

        if not request.get("stream"):
            return exchange.json({**base, "choices": [choice(text, "stop")], "usage": usage})
        with_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        null = {"usage": None} if with_usage else {}
        body = [_sse({**base, "choices": [choice(p, None)], **null}) for p in _split(text, exchange.chunks)]
        tail = [_sse({**base, "choices": [choice("", "stop")], **null})]
        if with_usage:
            tail.append(_sse({**base, "choices": [], "usage": usage}))
        return exchange.events(_writes([], body, tail + [_DONE]))

    def _embeddings(self, exchange: _Exchange) -> Any:
        request = exchange.json_body()
        inputs = request.get("input", "")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list):
            raise _BadRequest("input must be a string or a list")
        dimensions = request.get("dimensions") or EMBEDDING_DIMENSIONS
        data = []
        for index, item in enumerate(inputs):
            seed = hashlib.shake_256(_dumps(item)).digest(int(dimensions))
            # Multiples of 1/256 in [-0.5, 0.5): exact in float32, so base64 round-trips.
            floats = [(byte - 128) / 256 for byte in seed]
            vector: Any = floats
            if request.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(floats)}f", *floats)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": vector})
        words = _words(*(item for item in inputs if isinstance(item, str)))
        return exchange.json(
            {
                "object": "list",
                "data": data,
                "model": request.get("model", "text-embedding-3-small"),
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
        )

    def _responses(self, exchange: _Exchange) -> Any:
        request = exchange.json_body()
        given = request.get("input", "")
        user = given if isinstance(given, str) else _last_user_text(given)
        prompt = given if isinstance(given, str) else " ".join(
            _text(item.get("content")) for item in given or [] if isinstance(item, dict)
        )
        text = "echo: " + user
        number = exchange.number
        usage = {
            "input_tokens": _words(prompt),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": _words(text),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": _words(prompt, text),
        }
        part = {"type": "output_text", "text": text, "annotations": []}
        message = {"type": "message", "id": f"msg_{number}", "status": "completed", "role": "assistant", "content": [part]}

        def response(status: str, output: list[Any], usage: Any) -> dict[str, Any]:
            return {
                "id": f"resp_{number}",
                "object": "response",
                "created_at": self._created(),
                "status": status,
                "error": None,
                "incomplete_details": None,
                "instructions": request.get("instructions"),
                "model": request.get("model", DEFAULT_MODELS[0]),
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": usage,
            }

        if not request.get("stream"):
            return exchange.json(response("completed", [message], usage))

        sequence = iter(range(1 << 30))

        def event(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(sequence), **fields}, event=kind)

        where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
        head = [
            event("response.created", response=response("in_progress", [], None)),
            event("response.output_item.added", output_index=0, item={**message, "status": "in_progress", "content": []}),
            event("response.content_part.added", **where, part={**part, "text": ""}),
        ]
        body = [event("response.output_text.delta", **where, delta=p) for p in _split(text, exchange.chunks)]
        tail = [
            event("response.output_text.done", **where, text=text),
            event("response.content_part.done", **where, part=part),
            event("response.output_item.done", output_index=0, item=message),
            event("response.completed", response=response("completed", [message], usage)),
        ]
        return exchange.events(_writes(head, body, tail))

    def _upload(self, exchange: _Exchange) -> tuple[FormPart, dict[str, Any]]:
        """The main file part of a multipart upload, and a summary of all its parts."""
        parts = exchange.form()
        files = [part for part in parts if part.filename is not None]
        if not files:
            raise _BadRequest("'file' is a required property")
        main = next((part for part in files if part.name == "file"), files[0])
        fields = {part.name: part.data.decode("utf-8", "replace") for part in parts if part.filename is None}
        return main, {"parts": [part.summary() for part in files], "fields": fields}

    def _files(self, exchange: _Exchange) -> Any:
        main, summary = self._upload(exchange)
        return exchange.json(
            {
                "id": f"file-{exchange.number}",
                "object": "file",
                "bytes": len(main.data),
                "created_at": self._created(),
                "filename": main.filename,
                "purpose": summary["fields"].get("purpose", ""),
                "status": "processed",
                "status_details": None,
                "sha256": hashlib.sha256(main.data).hexdigest(),
                **summary,
            }
        )

    def _transcription(self, exchange: _Exchange) -> Any:
        main, summary = self._upload(exchange)
        kind = exchange.request.path.rsplit(b"/", 1)[-1].decode("ascii").rstrip("s")
        text = f"fake {kind} of {main.filename} ({len(main.data)} bytes)"
        if summary["fields"].get("response_format") in ("text", "srt", "vtt"):
            return exchange.send(b"text/plain; charset=utf-8", text.encode("utf-8"))
        digest = hashlib.sha256(main.data).hexdigest()
        return exchange.json({"text": text, "sha256": digest, "bytes": len(main.data), **summary})

    def _echo(self, exchange: _Exchange) -> Any:
        request = exchange.request
        return exchange.json(
            {
                "method": request.method.decode("latin-1"),
                "path": request.uri.decode("latin-1"),
                "headers": [
                    [name.decode("latin-1"), value.decode("latin-1")]
                    for name, values in request.requestHeaders.getAllRawHeaders()
                    for value in values
                ],
                "body_sha256": hashlib.sha256(exchange.body).hexdigest(),
                "body_length": len(exchange.body),
            }
        )


def _tool_name(request: dict[str, Any]) -> str | None:
    """The function a tool-using chat request should call: the forced one, else the first tool."""
    tools = request.get("tools")
    if not tools:
        return None
    choice = request.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return str(choice["function"].get("name", "tool"))
    first = tools[0] if isinstance(tools, list) and isinstance(tools[0], dict) else {}
    function = first.get("function") if isinstance(first.get("function"), dict) else first
    return str(function.get("name", "tool"))


def _key_status_argument(text: str) -> tuple[str, tuple[int, float | None]]:
    key, found, rest = text.rpartition("=")
    status, _, retry_after = rest.partition(":")
    try:
        if not found or not key:
            raise ValueError(text)
        return key, (int(status), float(retry_after) if retry_after else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=STATUS[:RETRY_AFTER], got {text!r}") from None


async def _serve(reactor: Any, arguments: argparse.Namespace) -> None:
    from twisted.internet.endpoints import serverFromString
    from twisted.web.server import Site

    upstream = FakeUpstream(
        reactor, key_status=dict(arguments.key_status), expected_keys=arguments.expected_keys, delay=arguments.delay
    )
    site = Site(upstream)
    site.noisy = False
    port = await serverFromString(reactor, arguments.port).listen(site)
    print(f"listening on {port.getHost().port}", flush=True)
    await Deferred()


def main(argv: list[str] | None = None) -> None:
    """Command line: serve a L{FakeUpstream} until terminated."""
    from twisted.internet.task import react

    parser = argparse.ArgumentParser(prog="python -m tests.support.upstream", description="Fake OpenAI upstream for tests.")
    parser.add_argument("--port", default="tcp:0:interface=127.0.0.1", help="server endpoint description")
    parser.add_argument(
        "--key-status",
        action="append",
        default=[],
        type=_key_status_argument,
        metavar="KEY=STATUS[:RETRY_AFTER]",
        help="refuse KEY with STATUS",
    )
    parser.add_argument("--expected-key", action="append", dest="expected_keys", metavar="KEY", help="accept only these keys")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="answer every request this much later")
    react(_serve, (parser.parse_args(argv),))


if __name__ == "__main__":
    main()

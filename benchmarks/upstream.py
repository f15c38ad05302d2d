#!/usr/bin/env python3
"""A fast fake OpenAI upstream for the side-by-side benchmark.

Hand-written HTTP/1.1 keep-alive server on asyncio.Protocol (uvloop when it is
importable), no framework, so that it stays far faster than the proxies under
test. Listens on 127.0.0.1 only.

Endpoints
  POST /v1/chat/completions
        body {"stream": true, ...} -> text/event-stream, chunked: N
        `data: {chat.completion.chunk}` events, then `data: [DONE]` (with
        stream_options.include_usage, a usage chunk before it, as OpenAI sends).
        N and the pause between events come from --chunks/--interval, and can be
        overridden per request with the query (?chunks=3&interval=0.05) or the
        headers x-bench-chunks / x-bench-interval (the query survives every
        proxy; some proxies drop unknown headers).
        otherwise -> a fixed ~300-byte chat.completion JSON.
  GET  /v1/models      small JSON list.
  GET  /bytes?n=N      N bytes (Content-Length) in 64 KiB writes that respect the
                       transport's flow control (pause_writing/resume_writing).

  python benchmarks/upstream.py --port 9100 [--chunks 20] [--interval 0.0]
"""

import argparse
import asyncio
import json
import logging
import signal
from urllib.parse import parse_qsl

try:  # optional
    import uvloop  # type: ignore
except Exception:  # pragma: no cover - depends on the environment
    uvloop = None

MODEL = "gpt-3.5-turbo-0125"
CREATED = 1700000000

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
        "system_fingerprint": None,
    },
    separators=(",", ":"),
).encode()

MODELS = json.dumps(
    {
        "object": "list",
        "data": [
            {"id": MODEL, "object": "model", "created": CREATED, "owned_by": "openai"},
            {"id": "gpt-4o", "object": "model", "created": CREATED, "owned_by": "openai"},
        ],
    },
    separators=(",", ":"),
).encode()

NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}'
BAD_REQUEST = b'{"error":{"message":"bad request","type":"invalid_request_error","param":null,"code":null}}'


def _response(status, ctype, body, keep_alive):
    return b"".join(
        (
            b"HTTP/1.1 ", status, b"\r\nServer: fake-upstream\r\nContent-Type: ", ctype,
            b"\r\nContent-Length: ", str(len(body)).encode(),
            b"\r\nConnection: keep-alive\r\n\r\n" if keep_alive else b"\r\nConnection: close\r\n\r\n",
            body,
        )
    )


JSON = b"application/json"
RESP_COMPLETION = {ka: _response(b"200 OK", JSON, COMPLETION, ka) for ka in (True, False)}
RESP_MODELS = {ka: _response(b"200 OK", JSON, MODELS, ka) for ka in (True, False)}
RESP_404 = {ka: _response(b"404 Not Found", JSON, NOT_FOUND, ka) for ka in (True, False)}
RESP_400 = {ka: _response(b"400 Bad Request", JSON, BAD_REQUEST, ka) for ka in (True, False)}
STREAM_HEAD = {
    ka: b"HTTP/1.1 200 OK\r\nServer: fake-upstream\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
    + (b"Connection: keep-alive\r\n\r\n" if ka else b"Connection: close\r\n\r\n")
    for ka in (True, False)
}
CHUNK_END = b"0\r\n\r\n"
BLOCK = b"x" * 65536
MAX_HEAD = 65536


def _frame(payload):
    return b"%x\r\n%s\r\n" % (len(payload), payload)


_events_cache = {}


def stream_events(n, usage=False):
    """The n+1 chunked-framed SSE events of one streamed completion (cached); with `usage` (the request asked
    for stream_options.include_usage) every chunk carries "usage":null and a usage-only chunk comes last before
    [DONE], as OpenAI streams it."""
    ev = _events_cache.get((n, usage))
    if ev is None:
        ev = []
        for i in range(n):
            if i == 0:
                delta = {"role": "assistant", "content": ""}
            else:
                delta = {"content": "tok%d " % i}
            obj = {
                "id": "chatcmpl-bench0000000000000000000000",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": MODEL,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta if i < n - 1 or n == 1 else {},
                        "logprobs": None,
                        "finish_reason": "stop" if i == n - 1 and n > 1 else None,
                    }
                ],
            }
            if usage:
                obj["usage"] = None
            ev.append(_frame(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"))
        if usage:
            last = {"id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk",
                    "created": CREATED, "model": MODEL, "system_fingerprint": None, "choices": [],
                    "usage": {"prompt_tokens": 9, "completion_tokens": max(0, n - 2),
                              "total_tokens": 9 + max(0, n - 2)}}
            ev.append(_frame(b"data: " + json.dumps(last, separators=(",", ":")).encode() + b"\n\n"))
        ev.append(_frame(b"data: [DONE]\n\n"))
        ev = tuple(ev)
        if len(_events_cache) < 256:
            _events_cache[(n, usage)] = ev
    return ev


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("transport", "buf", "busy", "paused", "closed", "_pump_left", "_pump_ka",
                 "_stream_ev", "_stream_i", "_stream_ka", "_timer", "_continue_sent", "_interval")

    chunks = 20
    interval = 0.0
    joined = False

    def __init__(self):
        self.transport = None
        self.buf = bytearray()
        self.busy = False  # a streamed response is in progress: hold later pipelined requests
        self.paused = False
        self.closed = False
        self._pump_left = 0
        self._pump_ka = True
        self._stream_ev = None
        self._stream_i = 0
        self._stream_ka = True
        self._timer = None
        self._continue_sent = False
        self._interval = 0.0

    # -- transport callbacks -------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stream_ev = None
        self._pump_left = 0

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self._pump_left:
            self._pump()

    def data_received(self, data):
        self.buf += data
        if not self.busy:
            self._process()

    def eof_received(self):
        return False  # close our side too

    # -- request parsing -----------------------------------------------------
    def _process(self):
        buf = self.buf
        while buf and not self.busy and not self.closed:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self.transport.write(RESP_400[False])
                    self.transport.close()
                    self.closed = True
                return
            head = bytes(buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self.transport.write(RESP_400[False])
                self.transport.close()
                self.closed = True
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            body_start = end + 4
            te = headers.get("transfer-encoding", "")
            if "chunked" in te.lower():
                res = _dechunk(buf, body_start)
                if res is None:
                    self._maybe_continue(headers)
                    return
                body, consumed = res
            else:
                try:
                    clen = int(headers.get("content-length", "0") or 0)
                except ValueError:
                    clen = 0
                if len(buf) < body_start + clen:
                    self._maybe_continue(headers)
                    return
                body = bytes(buf[body_start:body_start + clen])
                consumed = body_start + clen
            del buf[:consumed]
            self._continue_sent = False
            conn = headers.get("connection", "").lower()
            keep_alive = ("close" not in conn) if version == "HTTP/1.1" else ("keep-alive" in conn)
            self._handle(method, target, headers, body, keep_alive)
            if not keep_alive and not self.busy:
                self.transport.close()
                self.closed = True
                return

    def _maybe_continue(self, headers):
        if not self._continue_sent and headers.get("expect", "").lower() == "100-continue":
            self._continue_sent = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- routing -------------------------------------------------------------
    def _handle(self, method, target, headers, body, ka):
        path, _, query = target.partition("?")
        if path == "/v1/chat/completions" and method == "POST":
            if b'"stream"' in body:
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = None
                if isinstance(payload, dict) and payload.get("stream") is True:
                    options = payload.get("stream_options")
                    usage = isinstance(options, dict) and options.get("include_usage") is True
                    self._start_stream(query, headers, ka, usage)
                    return
            self.transport.write(RESP_COMPLETION[ka])
        elif path == "/v1/models" and method in ("GET", "HEAD"):
            self.transport.write(RESP_MODELS[ka])
        elif path == "/bytes" and method == "GET":
            q = dict(parse_qsl(query))
            try:
                n = max(0, int(q.get("n", "1048576")))
            except ValueError:
                n = 1048576
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nServer: fake-upstream\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n%s\r\n" % (n, b"Connection: keep-alive\r\n" if ka else b"Connection: close\r\n")
            )
            if n:
                self.busy = True
                self._pump_left = n
                self._pump_ka = ka
                self._pump()
        else:
            self.transport.write(RESP_404[ka])

    # -- /bytes: flow-controlled bulk body -------------------------------------
    def _pump(self):
        t = self.transport
        while self._pump_left and not self.paused and not self.closed:
            if t.is_closing():
                self._pump_left = 0
                return
            n = self._pump_left
            if n >= 65536:
                t.write(BLOCK)
                self._pump_left = n - 65536
            else:
                t.write(BLOCK[:n])
                self._pump_left = 0
        if not self._pump_left and not self.closed and self.busy:
            self._done(self._pump_ka)

    # -- SSE stream ------------------------------------------------------------
    def _start_stream(self, query, headers, ka, usage=False):
        chunks, interval = self.chunks, self.interval
        if query:
            q = dict(parse_qsl(query))
            chunks = int(q.get("chunks", chunks))
            interval = float(q.get("interval", interval))
        if "x-bench-chunks" in headers:
            chunks = int(headers["x-bench-chunks"])
        if "x-bench-interval" in headers:
            interval = float(headers["x-bench-interval"])
        ev = stream_events(max(1, chunks), usage)
        t = self.transport
        t.write(STREAM_HEAD[ka])
        if interval <= 0:
            if self.joined:
                t.write(b"".join(ev) + CHUNK_END)
                if not ka:
                    t.close()
                    self.closed = True
                return
            # one send per event, so the proxy sees (up to) separate segments
            for e in ev:
                if t.is_closing():
                    return
                t.write(e)
            t.write(CHUNK_END)
            if not ka:
                t.close()
                self.closed = True
            return
        self.busy = True
        self._stream_ev = ev
        self._stream_i = 0
        self._stream_ka = ka
        self._interval = interval
        self._next_event()

    def _next_event(self):
        self._timer = None
        ev = self._stream_ev
        if ev is None or self.closed or self.transport.is_closing():
            return
        i = self._stream_i
        self.transport.write(ev[i])
        i += 1
        if i == len(ev):
            self.transport.write(CHUNK_END)
            self._stream_ev = None
            self._done(self._stream_ka)
            return
        self._stream_i = i
        self._timer = asyncio.get_event_loop().call_later(self._interval, self._next_event)

    def _done(self, ka):
        self.busy = False
        if not ka:
            self.transport.close()
            self.closed = True
            return
        if self.buf:
            self._process()


def _dechunk(buf, pos):
    """Decode a complete chunked body starting at pos; None if incomplete."""
    out = bytearray()
    n = len(buf)
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_s = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_s, 16)
        except ValueError:
            size = 0
        pos = eol + 2
        if size == 0:
            # trailers until an empty line
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return bytes(out), eol + 2
                pos = eol + 2
        if n < pos + size + 2:
            return None
        out += buf[pos:pos + size]
        pos += size + 2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--host", default="127.0.0.1", help="loopback only (default 127.0.0.1)")
    ap.add_argument("--chunks", type=int, default=20, help="SSE events per streamed completion")
    ap.add_argument("--interval", type=float, default=0.0, help="seconds between SSE events")
    ap.add_argument("--joined", action="store_true",
                    help="with interval 0, send all events of a stream in one write (default: one send per event)")
    ap.add_argument("--backlog", type=int, default=4096)
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("::1", "localhost"):
        ap.error("the fake upstream listens on loopback only")
    # writes racing a peer reset are expected under load; don't spam stderr
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    UpstreamProtocol.chunks = args.chunks
    UpstreamProtocol.interval = args.interval
    UpstreamProtocol.joined = args.joined
    stream_events(args.chunks)

    if uvloop is not None and not args.no_uvloop:
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(UpstreamProtocol, args.host, args.port, backlog=args.backlog, reuse_address=True)
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, loop.stop)
    print(
        "fake upstream on http://%s:%d (%s, chunks=%d, interval=%s)"
        % (args.host, args.port, "uvloop" if (uvloop and not args.no_uvloop) else "asyncio", args.chunks, args.interval),
        flush=True,
    )
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()


if __name__ == "__main__":
    main()

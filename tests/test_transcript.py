"""Tests for transcript assembly: what ends up in chat.jsonl for each kind of exchange."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwd.transcripts.assembly import Transcript, transcript_kind

RECORD_KEYS = {
    "uid", "time", "client", "caller", "route", "path", "model", "stream", "request", "response", "usage",
    "status", "partial", "error", "latency_ms", "ttfb_ms", "truncated", "parse_error", "usage_estimated",
}


def make(kind="chat", body=None, raw=None, limit=1_048_576, path="/v1/chat/completions"):
    if raw is None:
        raw = json.dumps(body if body is not None else {"model": "gpt-4o", "messages": []}).encode()
    return Transcript(
        kind=kind, uid="u-1", time=1_700_000_000.25, client="10.0.0.1", caller="team-a", route="/",
        path=path, request_body=raw, request_content_type="application/json", limit=limit,
    )


def sse(*objs):
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objs)


def chunk(delta=None, finish=None, index=0, **extra):
    return {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024", **extra,
            "choices": [{"index": index, "delta": delta or {}, "finish_reason": finish}]}


def finish(t, partial=False, error=None):
    record = t.finish(partial=partial, error=error, latency_ms=12.3456)
    json.dumps(record)  # must always be serialisable
    assert set(record) == RECORD_KEYS
    return record


@pytest.mark.parametrize("path,kind", [
    ("/v1/chat/completions", "chat"),
    ("/proxy/v1/chat/completions/", "chat"),
    ("/openai/deployments/gpt4/chat/completions?api-version=2024-02-01", "chat"),
    ("/v1/completions", "completions"),
    ("/openai/deployments/d/completions?api-version=x", "completions"),
    ("/v1/responses", "responses"),
    ("/v1/embeddings", "embeddings"),
    ("/v1/models", None),
    ("/v1/responses/resp_123", None),
    ("/v1/audio/transcriptions", None),
])
def test_transcript_kind(path, kind):
    assert transcript_kind(path) == kind


def test_streamed_chat_content_is_the_joined_deltas():
    body = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}
    t = make(body=body)
    t.response_started(200, "text/event-stream; charset=utf-8", 41.5)
    pieces = ["Hel", "lo", ", ", "wörld", " ", "\n", "!"]
    stream = sse(chunk({"role": "assistant", "content": ""}),
                 *[chunk({"content": p}) for p in pieces],
                 chunk({}, finish="stop"),
                 {"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}},
                 b"[DONE]")
    for i in range(0, len(stream), 7):  # chunk boundaries inside events and inside UTF-8 sequences
        t.feed(stream[i:i + 7])
    r = finish(t)
    assert r["response"] == {"role": "assistant", "content": "Hello, wörld \n!", "tool_calls": None,
                             "finish_reason": "stop"}
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert r["request"] == body
    assert (r["model"], r["stream"], r["status"], r["partial"], r["error"]) == ("gpt-4o", True, 200, False, None)
    assert (r["ttfb_ms"], r["latency_ms"], r["truncated"], r["parse_error"]) == (41.5, 12.346, False, None)
    assert r["time"] == "2023-11-14T22:13:20.250Z"
    assert (r["uid"], r["client"], r["caller"], r["route"]) == ("u-1", "10.0.0.1", "team-a", "/")


def test_tool_call_arguments_joined_per_index():
    t = make()
    t.response_started(200, "text/event-stream", 1)
    t.feed(sse(
        chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Par'}}]}),
        chunk({"tool_calls": [
            {"index": 1, "id": "call_b", "type": "function", "function": {"name": "time", "arguments": '{"tz"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": ': "CET"}'}}]}),
        chunk({}, finish="tool_calls"),
        b"[DONE]",
    ))
    r = finish(t)
    assert r["response"]["content"] is None
    assert r["response"]["finish_reason"] == "tool_calls"
    assert r["response"]["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": '{"tz": "CET"}'}},
    ]


def test_several_choices_assembled_separately():
    t = make(body={"model": "m", "n": 2, "stream": True, "messages": []})
    t.response_started(200, "text/event-stream", 1)
    t.feed(sse(chunk({"content": "A"}, index=0), chunk({"content": "x"}, index=1),
               chunk({"content": "B"}, index=0), chunk({}, index=1, finish="length"),
               chunk({}, index=0, finish="stop")))
    r = finish(t)
    assert r["response"]["content"] == "AB"
    assert r["response"]["finish_reason"] == "stop"
    assert [(c["index"], c["content"], c["finish_reason"]) for c in r["response"]["choices"]] == [
        (0, "AB", "stop"), (1, "x", "length")]


def test_partial_stream_keeps_what_was_relayed():
    t = make(body={"model": "m", "stream": True, "messages": []})
    t.response_started(200, "text/event-stream", 3)
    t.feed(sse(chunk({"role": "assistant", "content": "The answer"}), chunk({"content": " is"})))
    t.feed(b'data: {"choices": [{"index": 0, "delta": {"content": " 4')  # cut mid-event
    r = finish(t, partial=True, error="upstream connection lost")
    assert r["partial"] is True
    assert r["error"] == "upstream connection lost"
    assert r["response"]["content"] == "The answer is"
    assert r["response"]["finish_reason"] is None


def test_streamed_completions():
    t = make(kind="completions", body={"model": "m", "prompt": "1+1=", "stream": True}, path="/v1/completions")
    t.response_started(200, "text/event-stream", 1)
    t.feed(sse({"choices": [{"index": 0, "text": "2", "finish_reason": None}]},
               {"choices": [{"index": 0, "text": ".", "finish_reason": "stop"}]}, b"[DONE]"))
    r = finish(t)
    assert r["response"] == {"text": "2.", "finish_reason": "stop"}
    assert r["request"]["prompt"] == "1+1="


def test_responses_api_streamed():
    body = {"model": "gpt-4.1", "input": "Say hi", "instructions": "Be brief", "stream": True}
    t = make(kind="responses", body=body, path="/v1/responses")
    t.response_started(200, "text/event-stream", 5)
    events = [
        ("response.created", {"type": "response.created", "response": {"model": "gpt-4.1-2025", "status": "in_progress"}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": " there"}),
        ("response.output_text.done", {"type": "response.output_text.done", "text": "Hi there"}),
        ("response.completed", {"type": "response.completed", "response": {
            "status": "completed", "usage": {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11}}}),
    ]
    t.feed(b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events))
    r = finish(t)
    assert r["response"] == {"role": "assistant", "content": "Hi there", "tool_calls": None,
                             "finish_reason": "completed"}
    assert r["usage"] == {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11}
    assert r["request"]["instructions"] == "Be brief"


def test_responses_api_plain():
    t = make(kind="responses", body={"model": "gpt-4.1", "input": "hi"}, path="/v1/responses")
    t.response_started(200, "application/json", 5)
    t.feed(json.dumps({"status": "completed", "model": "gpt-4.1", "usage": {"total_tokens": 3}, "output": [
        {"type": "reasoning", "summary": []},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Hel"}, {"type": "output_text", "text": "lo"}]}]}).encode())
    r = finish(t)
    assert r["response"]["content"] == "Hello"
    assert r["response"]["finish_reason"] == "completed"
    assert r["usage"] == {"total_tokens": 3}


def test_plain_chat_response():
    t = make()
    t.response_started(200, "application/json", 9)
    body = {"model": "gpt-4o-2024", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hi!"}}], "usage": {"total_tokens": 4}}
    data = json.dumps(body).encode()
    t.feed(data[:10])
    t.feed(data[10:])
    r = finish(t)
    assert r["response"] == {"role": "assistant", "content": "Hi!", "tool_calls": None, "finish_reason": "stop"}
    assert r["usage"] == {"total_tokens": 4}
    assert r["stream"] is False


def test_embeddings_record_a_count_never_vectors():
    t = make(kind="embeddings", body={"model": "text-embedding-3-small", "input": ["a", "b"]}, path="/v1/embeddings")
    t.response_started(200, "application/json", 2)
    body = {"object": "list", "model": "text-embedding-3-small", "usage": {"prompt_tokens": 2, "total_tokens": 2},
            "data": [{"object": "embedding", "index": i, "embedding": [0.123456789] * 50} for i in range(2)]}
    t.feed(json.dumps(body).encode())
    r = finish(t)
    assert r["response"] == {"count": 2}
    assert r["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert "0.123456789" not in json.dumps(r)


def test_embeddings_larger_than_limit_still_counted():
    t = make(kind="embeddings", body={"model": "e", "input": ["x"] * 30}, path="/v1/embeddings", limit=500)
    t.response_started(200, "application/json", 2)
    body = json.dumps({"object": "list", "data": [
        {"object": "embedding", "index": i, "embedding": [0.5] * 40} for i in range(30)],
        "model": "e", "usage": {"prompt_tokens": 30, "total_tokens": 30}}, indent=2).encode()
    for i in range(0, len(body), 5):  # the "index" key split across chunks
        t.feed(body[i:i + 5])
    r = finish(t)
    assert r["response"] == {"count": 30}
    assert r["usage"] == {"prompt_tokens": 30, "total_tokens": 30}
    assert r["truncated"] is False


@pytest.mark.parametrize("raw", [b'{"model": "gpt-4o", "messages": [', b"\x89PNG\r\n\x1a\n\x00\xff",
                                 b"--boundary\r\nContent-Disposition: form-data; name=file\r\n\r\nx\r\n--boundary--"])
def test_request_that_is_not_json_still_gives_a_record(raw):
    t = make(raw=raw)
    t.response_started(200, "application/json", 1)
    t.feed(b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}')
    r = finish(t)
    assert r["request"] is None
    assert r["parse_error"] == "request body is not JSON"
    assert r["response"]["content"] == "ok"


def test_response_that_is_not_json():
    t = make()
    t.response_started(200, "text/html", 1)
    t.feed(b"<html>gateway says hello</html>")
    r = finish(t)
    assert r["response"] is None
    assert r["parse_error"] == "response body is not JSON"
    assert r["status"] == 200


def test_garbage_event_stream():
    t = make()
    t.response_started(200, "text/event-stream", 1)
    t.feed(b"data: not json\n\n" + sse(chunk({"content": "ok"})))
    r = finish(t)
    assert r["response"]["content"] == "ok"
    assert r["parse_error"] == "1 of 2 stream events were not JSON"
    t = make()
    t.response_started(200, "text/event-stream", 1)
    t.feed(b"<html>\n<body>oops</body>\n")
    r = finish(t)
    assert r["response"] is None
    assert r["parse_error"] == "response stream had no events"


def test_upstream_429_records_the_error_message():
    t = make(body={"model": "gpt-4o", "stream": True, "messages": []})
    t.response_started(429, "application/json", 30)
    t.feed(json.dumps({"error": {"message": "Rate limit reached for gpt-4o", "type": "requests",
                                 "code": "rate_limit_exceeded"}}).encode())
    r = finish(t)
    assert (r["status"], r["response"], r["usage"]) == (429, None, None)
    assert r["error"] == "Rate limit reached for gpt-4o"


def test_upstream_error_that_is_not_openai_shaped():
    t = make()
    t.response_started(502, "text/html", 30)
    t.feed(b"<h1>Bad Gateway</h1>" + b"x" * 5000)
    r = finish(t)
    assert r["error"].startswith("<h1>Bad Gateway</h1>xxx")
    assert len(r["error"]) == 1000


def test_glue_error_and_stream_error_both_kept():
    t = make()
    t.response_started(200, "text/event-stream", 1)
    t.feed(sse(chunk({"content": "par"}), {"error": {"message": "The server had an error"}}))
    r = finish(t, partial=True, error="client disconnected")
    assert r["error"] == "client disconnected; The server had an error"


def test_limit_cuts_streamed_content_and_marks_truncated():
    t = make(limit=100)
    t.response_started(200, "text/event-stream", 1)
    for _ in range(50):
        t.feed(sse(chunk({"content": "0123456789"})))
    r = finish(t)
    assert r["response"]["content"] == "0123456789" * 10
    assert r["truncated"] is True


def test_limit_shared_with_tool_arguments():
    t = make(limit=30)
    t.response_started(200, "text/event-stream", 1)
    t.feed(sse(chunk({"content": "a" * 20}),
               chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "b" * 20}}]})))
    r = finish(t)
    assert r["response"]["content"] == "a" * 20
    assert r["response"]["tool_calls"][0]["function"]["arguments"] == "b" * 10
    assert r["truncated"] is True


def test_limit_bounds_a_plain_body():
    t = make(limit=64)
    t.response_started(200, "application/json", 1)
    for _ in range(100):
        t.feed(b'{"choices": [' + b" " * 100)
    assert len(t.body) == 64
    r = finish(t)
    assert r["truncated"] is True
    assert r["response"] is None
    assert "exceeds the 64-byte limit" in r["parse_error"]


def test_no_response_at_all():
    t = make()
    r = finish(t, partial=True, error="upstream timed out")
    assert (r["status"], r["response"], r["ttfb_ms"], r["parse_error"]) == (None, None, None, None)
    assert r["error"] == "upstream timed out"
    assert r["model"] == "gpt-4o"


def test_odd_shapes_from_upstream_never_raise():
    t = make(raw=b"[" * 100_000)  # deeper than the JSON parser's recursion limit
    t.response_started(200, "text/event-stream", 1)
    t.feed(sse({"choices": [{"index": [1], "delta": "text"}]}, {"choices": "nope"}, [1, 2],
               {"choices": [{"index": 0, "delta": {"content": 5, "tool_calls": [{"index": "x"}]}}]},
               {"choices": [{"delta": {"content": "still here"}}]}))
    r = finish(t)
    assert r["parse_error"] == "request body is not JSON; 1 of 5 stream events were not JSON"
    assert r["response"]["content"] == "still here"
    t = make()
    t.response_started(200, "application/json", 1)
    t.feed(b'{"choices": [{"message": "flat string", "finish_reason": "stop"}]}')
    assert finish(t)["response"]["finish_reason"] == "stop"


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["chat", "completions", "responses", "embeddings"]),
       st.sampled_from(["text/event-stream", "application/json", None]),
       st.lists(st.binary(max_size=40), max_size=8))
def test_any_bytes_from_upstream_make_a_record_of_what_was_relayed_within_the_limit(kind, content_type, chunks):
    t = make(kind=kind, limit=64)
    t.response_started(200, content_type, 1)
    for c in chunks:
        t.feed(b"data: " + c + b"\n\n" if c[:1] == b"{" else c)
    r = finish(t, partial=True)
    assert (r["status"], r["partial"]) == (200, True)
    response = r["response"] or {}
    for text in (response.get("content"), response.get("text")):
        assert text is None or len(text) <= 64, "assembled text never exceeds the record limit"
    assert r["parse_error"] is not None or r["response"] is not None or not any(chunks), "nothing is silently lost"


def test_response_started_without_a_status_is_ignored():
    t = make()
    t.response_started(None, "application/json", 5)
    r = finish(t, partial=True, error="upstream connection refused")
    assert (r["status"], r["response"], r["error"]) == (None, None, "upstream connection refused")


# -- handing an exchange to the transcript writer process -------------------------------------------------

from fwd.transcripts.assembly import Ended  # noqa: E402
from fwd.transcripts.frames import FrameReader, ended_frame, frame_line  # noqa: E402


def _tool_stream():
    return sse(
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                   "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, finish="tool_calls"),
    ) + b"data: [DONE]\n\n"


def _long_stream():
    return sse(*[chunk({"content": f"token {n} "}) for n in range(600)], chunk(finish="stop")) + b"data: [DONE]\n\n"


EXCHANGES = {
    "plain": (200, "application/json", [json.dumps({
        "model": "gpt-4o", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hé"}}],
        "usage": {"total_tokens": 3}}).encode()], False, None),
    "stream with tool calls": (200, "text/event-stream", [_tool_stream()[:50], _tool_stream()[50:]], False, None),
    "stream cut by the client": (200, "text/event-stream", [sse(chunk({"content": "half"}))], True,
                                 "client disconnected"),
    "upstream error": (429, "application/json", [b'{"error":{"message":"slow down","type":"requests"}}'], False, None),
    "not JSON": (200, "application/json", [b"<html>oops</html>"], False, None),
    "no response": (None, None, [], False, "upstream unreachable"),
    "stream past the fold size": (200, "text/event-stream", [_long_stream()], False, None),
    "body past the limit": (200, "application/json", [b'{"choices": [' + b" " * 5000 + b"]}"], False, None),
}


def _ended(name, **make_args):
    status, ctype, chunks, partial, error = EXCHANGES[name]
    t = make(body={"model": "gpt-4o", "stream": ctype == "text/event-stream", "messages": [{"role": "user", "content": "hi"}]},
             **make_args)
    if status is not None:
        t.response_started(status, ctype, 4.5)
    for piece in chunks:
        t.feed(piece)
    return Ended(t, partial=partial, error=error, latency_ms=9.25)


@pytest.mark.parametrize("name", sorted(EXCHANGES))
def test_the_writer_builds_the_same_record_as_the_serving_process(name):
    limit = 4096 if name == "body past the limit" else 1_048_576
    here = _ended(name, limit=limit).record()
    there = json.loads(frame_line(ended_frame(_ended(name, limit=limit))))
    assert there == json.loads(json.dumps(here))
    assert set(there) == RECORD_KEYS


def test_a_short_exchange_travels_as_its_raw_bytes_a_folded_one_as_its_record():
    short = _ended("stream with tool calls")
    frame = ended_frame(short)
    assert frame[0] == 1 and _tool_stream() in frame, "the capture: request and response bytes as relayed"
    folded = _ended("stream past the fold size")
    assert ended_frame(folded)[0] == 2, "a stream that was already folded here is finished here"


def test_frames_survive_any_split_of_the_byte_stream():
    frames = [ended_frame(_ended(name)) for name in ("plain", "upstream error", "no response")]
    data = b"".join(frames)
    for cut in range(len(data) + 1):
        reader = FrameReader()
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == frames
        assert reader.pending == 0


def test_a_stream_that_is_not_frames_is_refused():
    with pytest.raises(ValueError, match="not a transcript frame"):
        FrameReader().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

"""Token usage: the upstream's figures from answers and streams, include_usage stripped byte-exactly, estimates."""

import json
import tracemalloc

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwd import usage as usage_module
from fwd.usage import (
    ABSENT,
    StreamMeter,
    Usage,
    UsageStripper,
    estimate,
    parse_answer,
    usage_from_json,
    with_include_usage,
)

CHAT_USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}


# -- building streams the way OpenAI serialises them ----------------------------------------------------------


def chat_chunk(delta, finish=None, *, include_usage, obfuscation=None, nested=False, choices=True):
    """One chat.completion.chunk as OpenAI writes it: `"usage":null` is the last member but for `obfuscation`."""
    chunk = {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": "gpt-4o-2024-08-06",
        "service_tier": "default",
        "system_fingerprint": "fp_eb9dce56a8",
        "choices": [],
    }
    if choices:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if nested:
            # A member named usage inside a choice is the upstream's own, with or without include_usage.
            choice["usage"] = None
        chunk["choices"] = [choice]
    if include_usage:
        chunk["usage"] = None
    if obfuscation is not None:
        chunk["obfuscation"] = obfuscation
    return chunk


def sse(obj, newline=b"\n"):
    return b"data: " + orjson.dumps(obj) + newline + newline


def chat_stream(texts, *, include_usage, obfuscation=False, nested=False, newline=b"\n", comment=False):
    """A whole chat stream: role chunk, one chunk per text, finish chunk, usage chunk (with include_usage), [DONE]."""
    deltas = [({"role": "assistant", "content": "", "refusal": None}, None)]
    deltas += [({"content": text}, None) for text in texts]
    deltas += [({}, "stop")]
    out = [b": keep-alive" + newline + newline] if comment else []
    for n, (delta, finish) in enumerate(deltas):
        obj = chat_chunk(delta, finish, include_usage=include_usage, obfuscation="x" * (n % 7) if obfuscation else None,
                         nested=nested)
        out.append(sse(obj, newline))
    if include_usage:
        last = chat_chunk(None, include_usage=False, choices=False)
        last["usage"] = CHAT_USAGE
        if obfuscation:
            last["obfuscation"] = "abc"
        out.append(sse(last, newline))
    out.append(b"data: [DONE]" + newline + newline)
    return b"".join(out)


def strip(stream, cuts=()):
    """Feed a stream cut at the given positions; return what was relayed and the stripper."""
    stripper = UsageStripper()
    pieces, start = [], 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        pieces.append(stripper.feed(stream[start:cut]))
        start = cut
    pieces.append(stripper.close())
    return b"".join(pieces), stripper


def meter(stream, kind="chat", cuts=(), **kw):
    m = StreamMeter(kind, **kw)
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        m.feed(stream[start:cut])
        start = cut
    m.close()
    return m


TEXTS = ["Hello", "! How", ' can I "help"', " you\n today", "?", ' {"usage":null}', "\\", "é€😀"]


# -- usage values -----------------------------------------------------------------------------------------------


def test_each_api_reports_its_tokens_in_its_own_shape():
    assert usage_from_json("chat", CHAT_USAGE) == Usage(19, 10, 29)
    assert usage_from_json("completions", {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}) == Usage(5, 7, 12)
    assert usage_from_json("embeddings", {"prompt_tokens": 8, "total_tokens": 8}) == Usage(8, 0, 8)
    responses = {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 87,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 123}
    assert usage_from_json("responses", responses) == Usage(36, 87, 123)
    images = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50,
              "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}
    assert usage_from_json("images", images) == Usage(50, 50, 100)
    tokens = {"type": "tokens", "input_tokens": 14, "input_token_details": {"text_tokens": 0, "audio_tokens": 14},
              "output_tokens": 45, "total_tokens": 59}
    assert usage_from_json("audio", tokens) == Usage(14, 45, 59)


def test_a_transcription_billed_by_duration_reports_seconds_and_no_tokens():
    assert usage_from_json("audio", {"type": "duration", "seconds": 9.5}) == Usage(0, 0, 0, seconds=9.5)
    assert usage_from_json("audio", {"type": "duration", "seconds": "9"}) is None


def test_a_compatible_upstream_using_the_other_apis_names_is_still_counted():
    assert usage_from_json("chat", {"input_tokens": 3, "output_tokens": 4}) == Usage(3, 4, 7)
    assert usage_from_json("responses", {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) == Usage(3, 4, 7)
    assert usage_from_json("chat", {"prompt_tokens": 3.0, "completion_tokens": 4}) == Usage(3, 4, 7)


@pytest.mark.parametrize("junk", [None, [], "12", {}, {"prompt_tokens": -1}, {"prompt_tokens": True},
                                  {"prompt_tokens": "3", "completion_tokens": None}, {"prompt_tokens": 1.5}])
def test_a_usage_that_counts_nothing_is_no_usage(junk):
    assert usage_from_json("chat", junk) is None


def test_an_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError):
        usage_from_json("moderations", CHAT_USAGE)
    with pytest.raises(ValueError):
        UsageStripper("responses")


# -- JSON answers -----------------------------------------------------------------------------------------------


def test_a_json_answer_gives_its_top_level_usage():
    body = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}], "usage": CHAT_USAGE})
    assert parse_answer("chat", body) == Usage(19, 10, 29)


@pytest.mark.parametrize("body", [b'{"id":"x","choices":[]}', b"Hello there, a plain-text transcript.", b"[1,2]",
                                  b'{"usage":null}', b'{"data":[{"usage":{"prompt_tokens":4}}]}', b""])
def test_an_answer_without_usage_gives_none(body):
    assert parse_answer("chat", body) is None


def huge_embeddings(n, usage_first=False):
    item = b'{"object":"embedding","index":%d,"embedding":[' + b",".join([b"-0.0069292834"] * 1536) + b"]}"
    data = b"[" + b",".join(item % i for i in range(n)) + b"]"
    use = b'"usage":{"prompt_tokens":8,"total_tokens":8}'
    if usage_first:
        return b'{"object":"list",' + use + b',"data":' + data + b',"model":"text-embedding-3-small"}\n'
    return b'{"object":"list","data":' + data + b',"model":"text-embedding-3-small",' + use + b"}\n"


def count_parses(monkeypatch):
    sizes = []
    real = orjson.loads

    class Spy:
        JSONDecodeError = orjson.JSONDecodeError

        @staticmethod
        def loads(data):
            sizes.append(len(data))
            return real(data)

        dumps = staticmethod(orjson.dumps)

    monkeypatch.setattr(usage_module, "orjson", Spy)
    return sizes


def test_a_huge_embeddings_answer_finds_its_usage_without_parsing_the_vectors(monkeypatch):
    body = huge_embeddings(100)
    assert len(body) > 1_500_000
    sizes = count_parses(monkeypatch)
    assert parse_answer("embeddings", body) == Usage(8, 0, 8)
    assert sizes and max(sizes) < 1000


def test_a_huge_answer_with_its_usage_first_finds_it_at_the_start(monkeypatch):
    body = huge_embeddings(100, usage_first=True)
    sizes = count_parses(monkeypatch)
    assert parse_answer("embeddings", body) == Usage(8, 0, 8)
    assert max(sizes) <= 64 * 1024 + 10


def test_a_huge_answer_never_takes_a_nested_usage_for_its_own():
    filler = b'"' + b"A" * 1_200_000 + b'"'
    body = b'{"created":1,"data":[{"b64_json":' + filler + b',"usage":{"input_tokens":9,"output_tokens":9}}]}'
    assert parse_answer("images", body) is None
    body = (b'{"created":1,"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3},"data":[{"b64_json":'
            + filler + b',"usage":{"input_tokens":9,"output_tokens":9}}]}')
    assert parse_answer("images", body) == Usage(1, 2, 3)


# -- stream meter -----------------------------------------------------------------------------------------------


def test_a_meter_reads_the_final_usage_chunk_and_counts_the_stream():
    m = meter(chat_stream(TEXTS, include_usage=True))
    assert m.usage == Usage(19, 10, 29)
    assert m.events == len(TEXTS) + 4 and m.done


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 4000), max_size=12), crlf=st.booleans())
def test_a_meter_finds_the_same_usage_however_the_stream_is_cut(cuts, crlf):
    stream = chat_stream(TEXTS, include_usage=True, obfuscation=True, newline=b"\r\n" if crlf else b"\n", comment=True)
    m = meter(stream, cuts=[c for c in cuts if c <= len(stream)])
    assert m.usage == Usage(19, 10, 29)
    assert m.done and m.events == len(TEXTS) + 4


def responses_stream(usage):
    def event(kind, **fields):
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"

    def response(status, use):
        return {"id": "resp_1", "object": "response", "status": status, "model": "gpt-4.1",
                "output": [] if status != "completed" else [{"type": "message", "content": [
                    {"type": "output_text", "text": 'Hi "usage": {"input_tokens": 999}'}]}],
                "usage": use, "user": None, "metadata": {}}

    return b"".join([
        event("response.created", sequence_number=0, response=response("in_progress", None)),
        event("response.in_progress", sequence_number=1, response=response("in_progress", None)),
        event("response.output_text.delta", sequence_number=2, delta="Hi"),
        event("response.output_text.delta", sequence_number=3, delta=' "usage"'),
        event("response.output_text.done", sequence_number=4, text='Hi "usage"'),
        event("response.completed", sequence_number=5, response=response("completed", usage)),
    ])


def test_responses_api_usage_comes_from_response_completed():
    use = {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 87,
           "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 123}
    stream = responses_stream(use)
    for cut in range(0, len(stream), 37):
        m = meter(stream, "responses", cuts=[cut])
        assert m.usage == Usage(36, 87, 123)
        assert m.deltas == 2
    assert meter(responses_stream(None), "responses").usage is None


def test_an_event_longer_than_the_limit_still_gives_its_usage_from_its_end():
    b64 = "Q" * 300_000
    stream = (b"event: image_generation.partial_image\ndata: "
              + orjson.dumps({"type": "image_generation.partial_image", "b64_json": b64}) + b"\n\n"
              + b"event: image_generation.completed\ndata: "
              + orjson.dumps({"type": "image_generation.completed", "b64_json": b64, "usage": {
                  "total_tokens": 100, "input_tokens": 50, "output_tokens": 50,
                  "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}}) + b"\n\n")
    m = meter(stream, "images", cuts=range(0, len(stream), 4096), max_event=100_000)
    assert m.overflowed == 2
    assert m.usage == Usage(50, 50, 100)


def test_a_responses_event_longer_than_the_limit_gives_the_responses_usage_not_a_nested_one():
    output = [{"type": "message", "content": [{"type": "output_text", "text": "w" * 200_000}], "usage": {"input_tokens": 7}}]
    completed = {"type": "response.completed", "response": {"id": "resp_1", "output": output, "usage": {
        "input_tokens": 3, "output_tokens": 4, "total_tokens": 7}, "metadata": {}}}
    m = meter(b"data: " + orjson.dumps(completed) + b"\n\n", "responses", cuts=range(0, 210_000, 1000),
              max_event=50_000)
    assert m.overflowed == 1
    assert m.usage == Usage(3, 4, 7)


def peak_bytes_while(feed, pieces):
    tracemalloc.start()
    try:
        for piece in pieces:
            feed(piece)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_endless_event_costs_the_meter_and_the_stripper_bounded_memory():
    event = b'data: {"type":"image_generation.partial_image","b64_json":"' + b"Q" * 4_000_000
    pieces = [event[i : i + 16384] for i in range(0, len(event), 16384)]
    m = StreamMeter("images")
    assert peak_bytes_while(m.feed, pieces) < 2_000_000
    stripper = UsageStripper()
    relayed = []
    assert peak_bytes_while(lambda piece: relayed.append(len(stripper.feed(piece))), pieces) < 3_000_000
    assert sum(relayed) == len(event)


def test_a_meter_reads_a_last_event_the_upstream_left_unterminated():
    stream = chat_stream(["a"], include_usage=True)
    stream = stream[: stream.rindex(b"data: [DONE]")].rstrip(b"\n")
    assert meter(stream).usage == Usage(19, 10, 29)


def test_a_stream_without_usage_gives_none_and_its_counts():
    m = meter(chat_stream(TEXTS, include_usage=False), cuts=[50, 51, 300])
    assert m.usage is None
    assert (m.events, m.done) == (len(TEXTS) + 3, True)


# -- stripping include_usage ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(max_size=12) | st.sampled_from(TEXTS), min_size=1, max_size=20),
    obfuscation=st.booleans(),
    nested=st.booleans(),
    crlf=st.booleans(),
    comment=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=15),
)
def test_a_stripped_stream_is_byte_identical_to_the_stream_without_include_usage(
    texts, obfuscation, nested, crlf, comment, cuts
):
    kw = dict(obfuscation=obfuscation, nested=nested, newline=b"\r\n" if crlf else b"\n", comment=comment)
    plain = chat_stream(texts, include_usage=False, **kw)
    with_usage = chat_stream(texts, include_usage=True, **kw)
    relayed, stripper = strip(with_usage, [c for c in cuts if c <= len(with_usage)])
    assert relayed == plain
    assert stripper.usage == Usage(19, 10, 29)
    assert stripper.done and stripper.events == len(texts) + 3


EVENT_BODIES = [
    b'data: {"id":"1","choices":[{"delta":{"content":"a"}}],"usage":null}',
    b'data: {"id":"2","choices":[{"delta":{}}],"usage":null,"obfuscation":"Qx"}',
    b'data: {"usage":null,"id":"3","choices":[{"delta":{},"usage":null}]}',
    b'data: { "id": "4", "usage" : null }',
    b'data: {"id":"5","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}',
    b'data: {"id":"6","choices":[{"delta":{"content":"\\"usage\\":null}"}}]}',
    b'event: x\ndata: {"id":"7","usage":null}',
    b"data: {not json,\"usage\":null}",
    b": comment",
    b"data: [DONE]",
    b"",
]
LINE_ENDS = [b"\n", b"\r\n", b"\r"]


@settings(max_examples=100, deadline=None)
@given(
    parts=st.lists(st.tuples(st.sampled_from(EVENT_BODIES), st.sampled_from(LINE_ENDS), st.integers(2, 4)), max_size=8),
    cuts=st.lists(st.integers(0, 1000), max_size=10),
)
def test_how_a_stream_is_cut_never_changes_what_is_relayed_or_counted(parts, cuts):
    stream = b"".join(body.replace(b"\n", end) + end * blank for body, end, blank in parts)
    whole, whole_stripper = strip(stream)
    cut, cut_stripper = strip(stream, [c for c in cuts if c <= len(stream)])
    assert cut == whole
    assert cut_stripper.usage == whole_stripper.usage
    assert meter(stream, cuts=[c for c in cuts if c <= len(stream)]).usage == meter(stream).usage


def test_extra_blank_lines_before_the_usage_chunk_are_kept_wherever_the_stream_is_cut():
    stream = (b'data: {"id":"1","usage":null}\n\n\n'
              b'data: {"id":"5","choices":[],"usage":{"prompt_tokens":1}}\r\n\r\n\r\n'
              b"data: [DONE]\n\n")
    expected = b'data: {"id":"1"}\n\n\n\r\ndata: [DONE]\n\n'
    for cut in range(len(stream) + 1):
        assert strip(stream, [cut])[0] == expected, cut


def test_a_stream_split_at_every_byte_position_is_stripped_identically():
    texts = ["Hello", ' {"usage":null}', "\\"]
    for kw in ({}, {"obfuscation": True, "newline": b"\r\n"}):
        plain = chat_stream(texts, include_usage=False, **kw)
        with_usage = chat_stream(texts, include_usage=True, **kw)
        for cut in range(len(with_usage) + 1):
            relayed, stripper = strip(with_usage, [cut])
            assert relayed == plain, cut
            assert stripper.usage == Usage(19, 10, 29)


def test_a_stream_fed_byte_by_byte_is_stripped_identically():
    with_usage = chat_stream(TEXTS, include_usage=True, obfuscation=True)
    relayed, _ = strip(with_usage, range(len(with_usage)))
    assert relayed == chat_stream(TEXTS, include_usage=False, obfuscation=True)


def test_a_usage_member_inside_a_nested_object_is_kept():
    events = [
        b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"a"},"usage":null}],"usage":null}\n\n',
        b'data: {"id":"2","usage":null,"choices":[{"index":0,"delta":{"tool":{"usage":null}}}]}\n\n',
        b'data: {"id":"3","choices":[{"index":0,"delta":{},"x":{"a":1,"usage":null}}],"usage":null,"o":"]"}\n\n',
        b'data: {"id":"4","choices":[{"delta":{"content":"\\",\\"usage\\":null}"}}],"usage":null}\n\n',
        b'data: {"id":"5","usage":null,"choices":[{"delta":{},"usage":null}]}\n\n',
        b'data: {"id":"6","choices":[{"delta":{},"usage":null}]}\n\n',
    ]
    expected = [
        b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"a"},"usage":null}]}\n\n',
        b'data: {"id":"2","choices":[{"index":0,"delta":{"tool":{"usage":null}}}]}\n\n',
        b'data: {"id":"3","choices":[{"index":0,"delta":{},"x":{"a":1,"usage":null}}],"o":"]"}\n\n',
        b'data: {"id":"4","choices":[{"delta":{"content":"\\",\\"usage\\":null}"}}]}\n\n',
        b'data: {"id":"5","choices":[{"delta":{},"usage":null}]}\n\n',
        b'data: {"id":"6","choices":[{"delta":{},"usage":null}]}\n\n',
    ]
    for event, want in zip(events, expected):
        assert strip(event)[0] == want
    assert strip(b"".join(events))[0] == b"".join(expected)


def test_a_top_level_usage_null_anywhere_is_removed_with_one_comma():
    assert strip(b'data: {"usage":null,"id":"1","choices":[]}\n\n')[0] == b'data: {"id":"1","choices":[]}\n\n'
    assert strip(b'data: { "id": "1", "usage": null, "choices": [] }\n\n')[0] == \
        b'data: { "id": "1", "choices": [] }\n\n'
    assert strip(b'data: {"usage": null}\n\n')[0] == b"data: {}\n\n"


def test_usage_sent_on_a_content_chunk_is_taken_and_only_that_member_removed():
    event = b'data: {"id":"1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,' \
            b'"completion_tokens":1,"total_tokens":4},"x":1}\n\n'
    relayed, stripper = strip(event)
    assert relayed == b'data: {"id":"1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"x":1}\n\n'
    assert stripper.usage == Usage(3, 1, 4)


def test_an_upstream_that_ignores_include_usage_is_relayed_unchanged():
    plain = chat_stream(TEXTS, include_usage=False, comment=True)
    relayed, stripper = strip(plain, [10, 300, 301])
    assert relayed == plain
    assert stripper.usage is None


def test_an_over_long_event_passes_through_and_stripping_resumes_after_it():
    long = sse(chat_chunk({"content": "z" * 5000}, include_usage=True))
    plain = chat_stream(["a"], include_usage=False)
    with_usage = chat_stream(["a"], include_usage=True)
    stream = long + with_usage
    stripper = UsageStripper(max_event=1000)
    relayed = b"".join(stripper.feed(stream[i : i + 700]) for i in range(0, len(stream), 700)) + stripper.close()
    assert relayed == long + plain
    assert stripper.overflowed == 1
    assert stripper.usage == Usage(19, 10, 29)


def test_a_cut_stream_relays_its_held_bytes_at_close():
    with_usage = chat_stream(TEXTS, include_usage=True)
    cut = with_usage.index(b"Hello") + 3
    stripper = UsageStripper()
    relayed = stripper.feed(with_usage[:cut])
    assert stripper.close() == with_usage[with_usage.rindex(b"\n\n", 0, cut) + 2 : cut]
    assert relayed + with_usage[with_usage.rindex(b"\n\n", 0, cut) + 2 : cut] == with_usage[:cut].replace(b',"usage":null', b"")


# -- the request side -------------------------------------------------------------------------------------------


def test_a_body_without_stream_options_gets_it_before_its_closing_brace():
    assert with_include_usage(b'{"model":"gpt-4o","stream":true}', ABSENT) == \
        b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}'
    assert with_include_usage(b'{\n  "model": "m",\n  "stream": true\n}\n', ABSENT) == \
        b'{\n  "model": "m",\n  "stream": true\n,"stream_options":{"include_usage":true}}\n'
    assert with_include_usage(b" { } ", ABSENT) == b' { "stream_options":{"include_usage":true}} '
    assert with_include_usage(b"[1]", ABSENT) is None


def test_existing_stream_options_is_the_only_member_changed():
    assert with_include_usage(b'{"stream":true,"stream_options":null,"n":1}', None) == \
        b'{"stream":true,"stream_options":{"include_usage":true},"n":1}'
    assert with_include_usage(b'{"stream_options": {"include_obfuscation": false}, "stream": true}',
                              {"include_obfuscation": False}) == \
        b'{"stream_options": {"include_usage":true,"include_obfuscation": false}, "stream": true}'
    assert with_include_usage(b'{"stream_options":{"include_usage":false},"stream":true}', {"include_usage": False}) == \
        b'{"stream_options":{"include_usage":true},"stream":true}'


def test_a_nested_stream_options_is_not_mistaken_for_the_top_level_one():
    body = (b'{"tools":[{"type":"function","function":{"name":"f","parameters":{"stream_options":{}}}}],'
            b'"messages":[{"role":"user","content":"\\"stream_options\\":{}"}],"stream_options":{},"stream":true}')
    out = with_include_usage(body, {})
    assert out == body.replace(b'"stream_options":{},"stream"', b'"stream_options":{"include_usage":true},"stream"')


def test_a_client_that_already_asks_for_usage_or_sends_odd_options_gets_no_injection():
    assert with_include_usage(b'{"stream_options":{"include_usage":true},"stream":true}', {"include_usage": True}) is None
    assert with_include_usage(b'{"stream_options":"yes","stream":true}', "yes") is None
    # The decoded value given does not match the body: better not to guess.
    assert with_include_usage(b'{"stream_options":{"a":1},"stream":true}', {"a": 2}) is None


def test_a_body_crowded_with_nested_stream_options_is_left_alone():
    body = b'{"tools":[' + b",".join([b'{"stream_options":{}}'] * 50) + b'],"stream_options":{},"stream":true}'
    assert with_include_usage(body, {}) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "stream_options", "usage", "x"]),
                                                                inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(
    extra=st.dictionaries(st.sampled_from(["model", "messages", "tools", "n", "user"]), json_values, max_size=4),
    options=st.sampled_from([ABSENT, None, {}, {"include_usage": False}, {"include_obfuscation": True, "x": "}"}]),
    first=st.booleans(),
    layout=st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"separators": (" , ", " : ")}]),
)
def test_the_injected_body_decodes_to_the_request_with_include_usage(extra, options, first, layout):
    request = {"stream": True, **extra}
    if options is not ABSENT:
        request = {"stream_options": options, **request} if first else {**request, "stream_options": options}
    body = json.dumps(request, **layout).encode()
    out = with_include_usage(body, options)
    if out is None:
        # Only a body crowded with nested members of that name is left alone: too many candidates to try.
        assert body.count(b'"stream_options"') > 8
        return
    given_options = {} if options is ABSENT or options is None else options
    assert json.loads(out) == {**request, "stream_options": {**given_options, "include_usage": True}}


# -- estimates --------------------------------------------------------------------------------------------------


def test_a_stream_cut_before_its_usage_chunk_is_estimated():
    with_usage = chat_stream(["one", "two", "three", "four"], include_usage=True)
    cut = with_usage.index(b'"finish_reason":"stop"')
    relayed, stripper = strip(with_usage[:cut], [100])
    assert stripper.usage is None
    # Relayed: the role chunk, four content chunks and the start of the finish chunk; the rule counts each event
    # but the role and finish chunks.
    assert estimate("chat", 401, stripper) == Usage(101, 4, 105, estimated=True)
    m = meter(with_usage[:cut])
    assert m.usage is None and estimate("chat", 401, m) == Usage(101, 4, 105, estimated=True)


def test_a_whole_stream_without_usage_is_estimated_from_its_content_events():
    m = meter(chat_stream(["one", "two", "three"], include_usage=False))
    assert estimate("chat", 8, m) == Usage(2, 3, 5, estimated=True)
    assert estimate("responses", 0, meter(responses_stream(None), "responses")).output_tokens == 2


def test_a_json_answer_without_usage_is_estimated_from_its_generated_text():
    chat = orjson.dumps({"choices": [{"message": {"content": "12345678", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}}]})
    assert estimate("chat", 10, chat) == Usage(3, 3, 6, estimated=True)
    assert estimate("completions", 0, b'{"choices":[{"text":"abcde"}]}').output_tokens == 2
    responses = orjson.dumps({"output": [{"type": "message", "content": [{"type": "output_text", "text": "é" * 4}]},
                                         {"type": "function_call", "arguments": '{"a":1}'}]})
    assert estimate("responses", 0, responses).output_tokens == 4
    assert estimate("audio", 0, b"plain text transcript").output_tokens == 6
    assert estimate("audio", 0, b"\xff\xfb\x90\x00 mp3 frames").output_tokens == 0
    assert estimate("embeddings", 40, huge_embeddings(1)) == Usage(10, 0, 10, estimated=True)
    assert estimate("chat", 0) == Usage(0, 0, 0, estimated=True)


def test_an_event_ended_by_cr_lines_before_an_lf_one_is_stripped_the_same_in_one_chunk_or_two():
    event = b'data: {"id":"1","choices":[{"delta":{"content":"a"}}],"usage":null}'
    stream = event + b"\r\r" + event + b"\n\n"
    expected = b'data: {"id":"1","choices":[{"delta":{"content":"a"}}]}'
    assert strip(stream)[0] == expected + b"\r\r" + expected + b"\n\n"
    assert strip(stream, [1])[0] == strip(stream)[0]

"""Microbenchmarks of fwd.usage on the relay path: per chunk, per stream, per answer (best of several runs).

    PYTHONPATH=. python benchmarks/usage_micro.py      # from the repository root

A calibration line (an empty method call and one `bytes.count` over a chunk) comes first: on a busy machine
every figure grows with it.
"""

from __future__ import annotations

import timeit

import orjson

from fwd.usage import (
    ABSENT,
    StreamMeter,
    UsageStripper,
    parse_answer,
    with_include_usage,
)

USAGE = {"prompt_tokens": 19, "completion_tokens": 20, "total_tokens": 39,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}


def chunk(n: int, include_usage: bool, obfuscation: bool) -> bytes:
    obj = {"id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion.chunk", "created": 1741569952,
           "model": "gpt-4o-2024-08-06", "service_tier": "default", "system_fingerprint": "fp_eb9dce56a8",
           "choices": [{"index": 0, "delta": {"content": f" word{n}"}, "logprobs": None, "finish_reason": None}]}
    if include_usage:
        obj["usage"] = None
    if obfuscation:
        obj["obfuscation"] = "Xy3kq"
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream(include_usage: bool, obfuscation: bool = False) -> list[bytes]:
    """20 chunks as OpenAI sends them: 18 content chunks, the usage chunk (with include_usage), [DONE]."""
    chunks = [chunk(n, include_usage, obfuscation) for n in range(18)]
    if include_usage:
        chunks.append(b'data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk",'
                      b'"created":1741569952,"model":"gpt-4o-2024-08-06","choices":[],"usage":'
                      + orjson.dumps(USAGE) + b"}\n\n")
    chunks.append(b"data: [DONE]\n\n")
    return chunks


def best(fn, number: int) -> float:
    """Microseconds per call, best of 7 runs."""
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main() -> None:
    ordinary = chunk(3, True, False)
    rows = []

    class Empty:
        def feed(self, chunk):
            pass

    empty = Empty()
    rows.append(("calibration: empty method call", best(lambda: empty.feed(ordinary), 200_000)))
    rows.append(("calibration: bytes.count over a 330-byte chunk", best(lambda: ordinary.count(b"data:"), 200_000)))

    m = StreamMeter("chat")
    rows.append(("StreamMeter.feed, one ordinary chunk", best(lambda: m.feed(ordinary), 200_000)))
    m = StreamMeter("responses")
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":5,' \
            b'"item_id":"msg_1","output_index":0,"content_index":0,"delta":" word"}\n\n'
    rows.append(("StreamMeter.feed, one Responses delta event", best(lambda: m.feed(delta), 200_000)))

    for label, chunks in (("without include_usage", stream(False)), ("with include_usage", stream(True))):
        def run(chunks=chunks):
            meter = StreamMeter("chat")
            for c in chunks:
                meter.feed(c)
            meter.close()
            return meter.usage
        assert (run() is not None) == (label == "with include_usage")
        rows.append((f"StreamMeter, 20-chunk stream {label}, usage read", best(run, 5_000)))

    for label, obf in (("", False), (" with obfuscation", True)):
        one = chunk(3, True, obf)
        s = UsageStripper()
        rows.append((f"UsageStripper.feed, one ordinary chunk{label}", best(lambda: s.feed(one), 200_000)))
        chunks = stream(True, obf)
        plain = b"".join(stream(False, obf))

        def run(chunks=chunks):
            stripper = UsageStripper()
            out = [stripper.feed(c) for c in chunks]
            out.append(stripper.close())
            return b"".join(out)
        assert run() == plain
        rows.append((f"UsageStripper, 20-chunk stream{label} (whole, incl. usage chunk)", best(run, 5_000)))

        joined = b"".join(chunks)
        pieces = [joined[i : i + 1000] for i in range(0, len(joined), 1000)]

        def run_cut(pieces=pieces):
            stripper = UsageStripper()
            out = [stripper.feed(p) for p in pieces]
            out.append(stripper.close())
            return b"".join(out)
        assert run_cut() == plain
        rows.append((f"UsageStripper, same stream{label} cut in 1000-byte pieces", best(run_cut, 5_000)))

    answer = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1741569952,
                           "model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "message": {
                               "role": "assistant", "content": "Hello! How can I help you today?", "refusal": None},
                               "logprobs": None, "finish_reason": "stop"}], "usage": USAGE,
                           "service_tier": "default", "system_fingerprint": "fp_eb9dce56a8"})
    rows.append((f"parse_answer, {len(answer)}-byte chat answer", best(lambda: parse_answer("chat", answer), 100_000)))
    item = b'{"object":"embedding","index":%d,"embedding":[' + b",".join([b"-0.0069292834"] * 1536) + b"]}"
    huge = (b'{"object":"list","data":[' + b",".join(item % i for i in range(200)) +
            b'],"model":"text-embedding-3-small","usage":{"prompt_tokens":800,"total_tokens":800}}')
    rows.append((f"parse_answer, {len(huge) // 1_000_000} MB embeddings answer",
                 best(lambda: parse_answer("embeddings", huge), 2_000)))
    rows.append(("  (orjson.loads of that whole body, for scale)", best(lambda: orjson.loads(huge), 10)))

    request = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello " * 50}],
                            "stream": True})
    rows.append((f"with_include_usage, {len(request)}-byte request, no stream_options",
                 best(lambda: with_include_usage(request, ABSENT), 100_000)))
    request2 = request[:-1] + b',"stream_options":{"include_obfuscation":false}}'
    rows.append(("with_include_usage, same with stream_options present",
                 best(lambda: with_include_usage(request2, {"include_obfuscation": False}), 50_000)))

    width = max(len(label) for label, _ in rows)
    for label, us in rows:
        print(f"{label:<{width}}  {us:10.2f} us")


if __name__ == "__main__":
    main()

"""Tests for the incremental SSE parser: same events however the stream is chunked."""

from hypothesis import given, settings
from hypothesis import strategies as st

from fwd.sse import Event, SSEParser

STREAM = (
    b": keep-alive comment\r\n"
    b"data: {\"a\": \"h\xc3\xa9llo\"}\r\n"
    b"\r\n"
    b"event: response.output_text.delta\n"
    b"data: first\n"
    b"data:second\n"
    b"id: 7\n"
    b"retry: 1500\n"
    b"\n"
    b"data: cr only\r"
    b"\r"
    b"data\n"
    b"\n"
    b"data: \xe2\x82\xac euro\r\n"
    b"\r\n"
    b"data: [DONE]\n\n"
)

EXPECTED = [
    Event(None, '{"a": "h\u00e9llo"}'),
    Event("response.output_text.delta", "first\nsecond"),
    Event(None, "cr only"),
    Event(None, ""),
    Event(None, "\u20ac euro"),
    Event(None, "[DONE]"),
]


def feed_all(chunks, **kw):
    parser = SSEParser(**kw)
    events = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return parser, events


def test_whole_stream():
    parser, events = feed_all([STREAM])
    assert events == EXPECTED
    assert parser.last_event_id == "7"
    assert parser.retry == 1500


def test_every_single_split_point():
    for i in range(len(STREAM) + 1):
        _, events = feed_all([STREAM[:i], STREAM[i:]])
        assert events == EXPECTED, f"split at {i}"


def test_byte_by_byte():
    _, events = feed_all([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert events == EXPECTED


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_random_chunkings(cuts):
    cuts = sorted(cuts)
    bounds = [0, *cuts, len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(bounds, bounds[1:])]
    _, events = feed_all(chunks)
    assert events == EXPECTED


def test_cr_then_lf_across_chunks_is_one_line_end():
    # "data: x\r" + "\n\n": CRLF then a blank line, so exactly one event.
    _, events = feed_all([b"data: x\r", b"\n", b"\n"])
    assert events == [Event(None, "x")]
    # Whereas CR, CR is a line end and then a blank line.
    _, events = feed_all([b"data: x\r", b"\r"])
    assert events == [Event(None, "x")]


def test_only_one_leading_space_stripped_and_unknown_fields_ignored():
    _, events = feed_all([b"data:  two spaces\nfoo: bar\nevent:\n\n"])
    assert events == [Event(None, " two spaces")]


def test_blank_line_without_data_dispatches_nothing_and_resets_event_name():
    _, events = feed_all([b"event: ping\n\ndata: x\n\n"])
    assert events == [Event(None, "x")]


def test_incomplete_event_at_end_is_not_dispatched():
    _, events = feed_all([b"data: a\n\ndata: b\n"])
    assert events == [Event(None, "a")]


def test_leading_bom_ignored():
    _, events = feed_all([b"\xef\xbb", b"\xbfdata: x\n\n"])
    assert events == [Event(None, "x")]


def test_invalid_utf8_replaced_not_raised():
    _, events = feed_all([b"data: \xff\xfe\n\n"])
    assert events == [Event(None, "\ufffd\ufffd")]


def test_overlong_line_dropped_in_one_chunk():
    parser, events = feed_all([b"data: " + b"x" * 100 + b"\n\ndata: ok\n\n"], max_line=50)
    assert events == [Event(None, "ok")]
    assert parser.dropped == 1


def test_overlong_line_dropped_across_chunks_without_buffering_it():
    parser = SSEParser(max_line=50)
    assert parser.feed(b"data: ") == []
    for _ in range(100):
        assert parser.feed(b"x" * 30) == []
        assert len(parser._buf) <= 50
    assert parser.feed(b"tail\n\ndata: ok\n\n") == [Event(None, "ok")]
    assert parser.dropped == 1


def test_line_of_exactly_max_line_is_kept():
    line = b"data: " + b"y" * 44  # 50 bytes
    for i in range(len(line) + 1):
        parser, events = feed_all([line[:i], line[i:] + b"\n\n"], max_line=50)
        assert events == [Event(None, "y" * 44)]
        assert parser.dropped == 0


_lines = st.lists(
    st.tuples(
        st.sampled_from([b"data", b"data: ", b"event: ", b": ", b"id: ", b"", b"retry: "]),
        st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.sampled_from([b"\n", b"\r", b"\r\n"]),
    ),
    max_size=20,
)


@settings(max_examples=150, deadline=None)
@given(_lines, st.data())
def test_generated_streams_parse_the_same_however_chunked(lines, data):
    stream = b"".join(a + b + c for a, b, c in lines)
    whole_parser, whole = feed_all([stream], max_line=10)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    parser, events = feed_all([stream[a:b] for a, b in zip(bounds, bounds[1:])], max_line=10)
    assert events == whole
    assert parser.dropped == whole_parser.dropped

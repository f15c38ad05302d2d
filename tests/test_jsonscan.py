"""Reading a request body's top-level members: what json.loads would say, found in bounded slices of work."""

import base64
import json
import math
import random
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwd import jsonscan
from fwd.jsonscan import (
    MALFORMED,
    MAX_DEPTH,
    NOT_OBJECT,
    OBJECT,
    Members,
    Scanner,
    scan,
)

NAMES = ("model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "caching")


class Sliced(Scanner):
    """A scanner that looks at a few bytes at a time and never reads a body whole, so that every token of a small
    body meets the edge of a window somewhere."""

    min_window = 8
    fast_max = 0


def scan_in_steps(body: bytes, budget: int, scanner_type=Scanner, names=NAMES, **kw):
    """Scan to the end in steps of `budget`; the result and the work each step did."""
    scanner = scanner_type(body, names, **kw)
    work = []
    while True:
        before = scanner.work
        done = scanner.step(budget)
        work.append(scanner.work - before)
        if done:
            return scanner.result, work


class _Pairs(dict):
    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs


def reference(body: bytes, names=NAMES) -> Members:
    """What json.loads says, with every top-level pair kept: the members as the scanner must report them."""
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        return Members(MALFORMED)
    if not isinstance(doc, _Pairs):
        return Members(NOT_OBJECT)
    values, duplicates = {}, set()
    for name in names:
        found = [value for key, value in doc.pairs if key.casefold() == name.casefold()]
        if len(found) > 1:
            duplicates.add(name)
        elif found:
            values[name] = found[0]
    return Members(OBJECT, values, frozenset(duplicates))


def same(found: Members, expected: Members) -> bool:
    """Equal members, comparing values by their JSON text (NaN, -0.0, 1 against 1.0, key order)."""

    def text(members):
        values = {name: json.dumps(value) for name, value in members.values.items()}
        return members.kind, values, members.duplicates, members.too_large

    return text(found) == text(expected)


# Generated JSON text: nested containers, escapes, unicode, numbers in every form, duplicate and folded keys.

spaces = st.sampled_from(["", "", " ", "\n", "\t", "\r\n  "])


def quoted(text: str, escapes: list) -> str:
    """`text` as a JSON string, each character flagged in `escapes` written as a \\u escape."""
    out = []
    for char, escape in zip(text, escapes + [False] * len(text)):
        if char in '"\\' or char < " " or escape:
            out.append(json.dumps(char)[1:-1] if not escape or ord(char) > 0xFFFF else "\\u%04x" % ord(char))
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


KEYS = ["model", "Model", "MODEL", "stream", "\u017ftream", "max_to\u212aens", "max_tokens", "n", "N", "caching", "x"]
LETTERS = list('aZ0 "\\/\n\x01\x7f\u00e9\u017f\u212a\u4e2d\U0001f600')
strings = st.builds(
    quoted,
    st.sampled_from(KEYS) | st.text(st.sampled_from(LETTERS), max_size=6),
    st.lists(st.booleans(), max_size=8),
)
NUMBERS = ["-0", "0.0", "1E5", "1e-5", "-1.5E+3", "1e400", "NaN", "Infinity", "-Infinity", "9" * 40 + ".5"]
numbers = (
    st.integers(-(10**30), 10**30).map(str)
    | st.floats(allow_nan=False, allow_infinity=False).map(repr)
    | st.sampled_from(NUMBERS)
)
scalars = strings | numbers | st.sampled_from(["true", "false", "null"])


def containers(children):
    element = st.builds(lambda a, value, b: a + value + b, spaces, children, spaces)
    member = st.builds(lambda key, a, value: key + a + ":" + value, strings, spaces, element)
    return st.builds(lambda items: "[" + ",".join(items) + "]", st.lists(element, max_size=4)) | st.builds(
        lambda items: "{" + ",".join(items) + "}", st.lists(member, max_size=4)
    )


values = st.recursive(scalars, containers, max_leaves=8)


def chain(inner: str, arrays: list) -> str:
    """`inner` inside one container per flag, deeper than one regular expression reaches."""
    for array in arrays:
        inner = "[" + inner + "]" if array else '{"k" :' + inner + "}"
    return inner


deep_values = st.builds(chain, values, st.lists(st.booleans(), min_size=5, max_size=12))
members = st.builds(lambda key, a, value: key + a + ":" + a + value, strings, spaces, values | deep_values)
documents = st.builds(
    lambda a, doc, b: a + doc + b,
    spaces,
    st.builds(lambda items: "{" + ",".join(items) + "}", st.lists(members, max_size=6)) | values | deep_values,
    spaces,
).map(lambda text: text.encode("utf-8"))


STRAY = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"0", b"\t", b"\x01", b"\xff"]


def mutated(body: bytes, data) -> bytes:
    """`body` with a few bytes deleted or stray ones inserted: most often no longer JSON."""
    body = bytearray(body)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body)))
        if data.draw(st.booleans()) and at < len(body):
            del body[at]
        else:
            body[at:at] = data.draw(st.sampled_from(STRAY))
    return bytes(body)


# Properties ---------------------------------------------------------------------------------------------------


def check_against_json_loads(body: bytes, budget: int) -> None:
    """Read whole, and a few bytes at a time in steps of `budget`: the same members as json.loads gives, and no
    step over its budget but for decoding one requested value (of at most max_value bytes) in a step of its own."""
    expected = reference(body)
    assert same(scan(body, NAMES), expected)
    assert same(scan_in_steps(body, budget, Sliced)[0], expected)
    scanner = Sliced(body, NAMES, max_value=100)
    while True:
        before = scanner.work
        done = scanner.step(budget)
        assert scanner.work - before <= max(budget, scanner.least_budget, 100 + jsonscan.TOKEN_COST)
        if done:
            break
    assert scanner.result.kind == expected.kind


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(documents, st.sampled_from([1, 300, 5000]))
def test_every_valid_document_gives_the_members_json_loads_gives_in_any_slices(body, budget):
    check_against_json_loads(body, budget)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(documents, st.data(), st.sampled_from([1, 300, 5000]))
def test_a_body_json_loads_rejects_is_malformed_and_one_it_accepts_is_read_alike(body, data, budget):
    check_against_json_loads(mutated(body, data), budget)


def random_key(rng: random.Random) -> str:
    text = rng.choice(KEYS) if rng.random() < 0.6 else "".join(rng.choices(LETTERS, k=rng.randrange(6)))
    return quoted(text, [rng.random() < 0.2 for _ in range(8)])


def random_text(rng: random.Random, depth: int = 0) -> str:
    """A random JSON value, drawn fast: many more documents than the strategies above can draw in a second."""
    roll = rng.random()
    if depth > 3 or roll < 0.45:
        kind = rng.randrange(4)
        if kind == 0:
            return random_key(rng)
        if kind == 1:
            return rng.choice(["0", "-0", "17", "-3.5e-7", "1E400", "NaN", "-Infinity", str(rng.getrandbits(90))])
        return rng.choice(["true", "false", "null"])
    space = rng.choice(["", "", " ", "\n  "])
    items = [random_text(rng, depth + 1) for _ in range(rng.randrange(5))]
    if roll < 0.6:
        return chain(rng.choice(items or ["1"]), [rng.random() < 0.5 for _ in range(rng.randrange(5, 12))])
    if roll < 0.8:
        return "[" + space + ("," + space).join(items) + "]"
    return "{" + ",".join(random_key(rng) + space + ":" + item for item in items) + space + "}"


def random_document(rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return random_text(rng).encode("utf-8")
    members = [random_key(rng) + ":" + random_text(rng, 1) for _ in range(rng.randrange(8))]
    return ("{" + ",".join(members) + "}").encode("utf-8")


def test_a_thousand_random_documents_and_their_mutations_agree_with_json_loads():
    rng = random.Random(20261130)
    for _ in range(500):
        body = random_document(rng)
        check_against_json_loads(body, rng.choice([1, 300, 5000]))
        body = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(body) + 1)
            if rng.random() < 0.5 and at < len(body):
                del body[at]
            else:
                body[at:at] = rng.choice(STRAY)
        check_against_json_loads(bytes(body), rng.choice([1, 300, 5000]))


# The request model ----------------------------------------------------------------------------------------------


def test_a_chat_request_gives_its_model_stream_and_token_limits():
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 256,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    found = scan(body, NAMES)
    assert found == Members(
        OBJECT, {"model": "gpt-4o-mini", "max_tokens": 256, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert scan_in_steps(body, 64, Sliced)[0] == found


def test_a_model_hidden_in_a_nested_object_is_not_the_request_model():
    body = b'{"messages":[{"role":"user","content":"hi","model":"gpt-4o"}],"tools":[{"model":"o1"}]}'
    assert scan(body, NAMES) == Members(OBJECT)
    assert scan_in_steps(body, 64, Sliced)[0] == Members(OBJECT)


def test_a_model_after_a_nested_one_is_the_request_model():
    body = b'{"metadata":{"model":"o1","deep":[[[[[[{"model":"o3"}]]]]]]},"model":"gpt-4o-mini"}'
    assert scan(body, NAMES).values == {"model": "gpt-4o-mini"}
    assert scan_in_steps(body, 64, Sliced)[0].values == {"model": "gpt-4o-mini"}


def test_a_duplicated_model_is_reported_as_a_duplicate_and_given_no_value():
    found = scan(b'{"model":"gpt-4o-mini","model":"o1"}', NAMES)
    assert found == Members(OBJECT, duplicates=frozenset({"model"}))


def test_a_duplicated_model_spelled_with_an_escape_is_reported_as_a_duplicate():
    found = scan(b'{"model":"gpt-4o-mini","mod\\u0065l":"o1"}', NAMES)
    assert found.duplicates == {"model"} and "model" not in found.values


def test_escapes_in_values_neither_hide_a_duplicated_model_nor_make_one():
    messages = b'"messages":[{"role":"user","content":"say \\"model\\"\\n\\u4f60 \\"model"}]'
    assert scan(b"{" + messages + b',"model":"gpt-4o-mini"}', NAMES).values == {"model": "gpt-4o-mini"}
    for second in (b'"MODEL"', b'"\\u004Dodel"', b'"mod\\u0065l"'):
        found = scan(b"{" + messages + b',"model":"gpt-4o-mini",' + second + b':"o1"}', NAMES)
        assert found.duplicates == {"model"}


def test_a_model_spelled_in_another_case_is_a_duplicate_of_the_model():
    for spelling in (b"Model", b"MODEL", b"mOdEl"):
        found = scan(b'{"model":"gpt-4o-mini","' + spelling + b'":"o1"}', NAMES)
        assert found.duplicates == {"model"}


def test_a_key_that_folds_to_a_requested_name_counts_as_that_name():
    kelvin = "max_to\u212aens".encode()  # the Kelvin sign folds to "k"
    assert scan(b'{"max_tokens":5,"' + kelvin + b'":6000}', NAMES).duplicates == {"max_tokens"}
    assert scan(b'{"\\u017ftream":true}', NAMES).values == {"stream": True}  # a long s folds to "s"


def test_a_lone_case_variant_is_read_as_the_member_an_upstream_matching_leniently_would_see():
    assert scan(b'{"Model":"o1"}', NAMES).values == {"model": "o1"}


def test_every_letter_that_folds_to_ascii_is_known_to_the_shortcut():
    folding = [
        chr(c) for c in range(0x80, 0x110000) if not 0xD800 <= c < 0xE000 and chr(c).casefold().isascii()
    ]
    assert sorted(jsonscan.FOLDS_TO_ASCII) == folding


def test_values_are_decoded_as_json_loads_decodes_them():
    body = (
        b'{"model":"gpt-\\u00e9\\ud800","max_tokens":123456789012345678901234567890,'
        b'"n":-0,"stream":NaN,"caching":1e400,"max_completion_tokens":1.5E+3}'
    )
    found = scan(body, NAMES)
    assert same(found, reference(body))
    assert found.values["model"] == "gpt-\u00e9\ud800"
    assert found.values["max_tokens"] == 123456789012345678901234567890
    assert math.isnan(found.values["stream"]) and found.values["caching"] == math.inf


def test_a_value_longer_than_max_value_is_too_large_and_not_decoded():
    body = b'{"model":"' + b"a" * 100 + b'","stream":true}'
    found = scan(body, NAMES, max_value=50)
    assert found == Members(OBJECT, {"stream": True}, too_large=frozenset({"model"}))
    assert scan_in_steps(body, 64, Sliced, max_value=50)[0] == found


def test_a_requested_value_nested_down_to_max_depth_is_decoded():
    body = b'{"model":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    expected = []
    for _ in range(MAX_DEPTH - 2):
        expected = [expected]
    assert scan(body, NAMES).values == {"model": expected}
    assert scan_in_steps(body, 300, Sliced)[0].values == {"model": expected}


# What kind of JSON --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"[1,2]", b'"model"', b"12", b"null", b'  [{"model":"x"}]\n'])
def test_a_body_that_is_not_an_object_has_no_members(body):
    assert scan(body, NAMES) == Members(NOT_OBJECT)
    assert scan_in_steps(body, 64, Sliced)[0] == Members(NOT_OBJECT)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o"} x',
        b'{"model":"gpt-4o"}}',
        b'{"model":"gpt-4o"}{}',
        b'{"model":"gpt-4o",}',
        b'{"model":"gpt-4o"',
        b'{"model" "gpt-4o"}',
        b'{"model":"gpt-4o\x01"}',
        b'{"model":"gpt-4o","n":01}',
        b'{"model":"gpt-4o","x":[1,]}',
        b"",
        b"   ",
    ],
)
def test_a_body_json_loads_rejects_never_gives_a_model(body):
    assert scan(body, NAMES) == Members(MALFORMED)
    assert scan_in_steps(body, 64, Sliced)[0] == Members(MALFORMED)


def test_a_byte_order_mark_is_malformed_and_leading_whitespace_is_not():
    assert scan(b'\xef\xbb\xbf{"model":"gpt-4o"}', NAMES).kind == MALFORMED
    assert scan(b' \r\n\t{"model":"gpt-4o"}\n', NAMES).values == {"model": "gpt-4o"}


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])
def test_invalid_utf8_anywhere_is_malformed(bad):
    for body in (b'{"model":"gpt-4o","messages":[{"content":"' + bad + b'"}]}', b'{"model":"gpt-4o"}' + bad):
        assert scan(body, NAMES).kind == MALFORMED
        assert scan_in_steps(body, 64, Sliced)[0].kind == MALFORMED


def test_an_integer_longer_than_python_converts_is_malformed_as_json_loads_says():
    digits = sys.get_int_max_str_digits()
    assert scan(b'{"a":[' + b"7" * digits + b"]}", NAMES).kind == OBJECT
    assert scan(b'{"a":[' + b"7" * (digits + 1) + b"]}", NAMES).kind == MALFORMED
    assert scan(b'{"a":[' + b"7" * (digits + 1) + b".5]}", NAMES).kind == OBJECT
    assert scan_in_steps(b'{"n":' + b"7" * (digits + 1) + b"}", 64, Sliced)[0].kind == MALFORMED


@pytest.mark.parametrize("opener,closer", [(b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")])
def test_nesting_down_to_max_depth_is_read_and_one_level_more_is_malformed(opener, closer):
    levels = MAX_DEPTH // (opener.count(b"[") + opener.count(b"{"))
    for depth, kind in ((levels, OBJECT), (levels + 1, MALFORMED)):
        body = b'{"model":"gpt-4o","x":' + opener * (depth - 1) + b"1" + closer * (depth - 1) + b"}"
        assert scan(body, NAMES).kind == kind
        assert scan_in_steps(body, 300, Sliced)[0].kind == kind


# Hostile bodies, in bounded slices -------------------------------------------------------------------------------


def test_a_body_of_three_million_tiny_objects_is_scanned_in_bounded_slices():
    body = b'{"messages":[' + b"{}," * 3_000_000 + b'{}],"model":"gpt-4o-mini"}'
    found, work = scan_in_steps(body, jsonscan.BUDGET)
    assert found == Members(OBJECT, {"model": "gpt-4o-mini"})
    assert len(work) > 100
    assert max(work) <= jsonscan.BUDGET


def test_scanning_a_large_body_takes_a_small_fraction_of_its_size_in_memory():
    body = b'{"messages":[' + b'{"role":"user","content":"hi"},' * 30_000 + b'{}],"model":"gpt-4o-mini"}'
    scanner = Scanner(body, NAMES)
    tracemalloc.start()
    try:
        while not scanner.step():
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scanner.result.values == {"model": "gpt-4o-mini"}
    assert peak < len(body) // 10


def test_five_million_open_brackets_are_malformed_without_recursion_in_one_step():
    found, work = scan_in_steps(b"[" * 5_000_000, jsonscan.BUDGET)
    assert found == Members(MALFORMED)
    assert len(work) == 1


def test_a_five_megabyte_base64_value_is_skipped_a_window_at_a_time_not_a_character():
    audio = base64.b64encode(bytes(3_750_000))
    body = b'{"model":"gpt-4o-audio-preview","input_audio":"' + audio + b'","stream":true}'
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += 1

    sys.setprofile(count)
    try:
        found, work = scan_in_steps(body, jsonscan.BUDGET)
    finally:
        sys.setprofile(None)
    assert found == Members(OBJECT, {"model": "gpt-4o-audio-preview", "stream": True})
    assert len(work) <= len(body) // jsonscan.BUDGET + 3
    assert calls < len(body) // 100  # calls and returns, C ones included: a few dozen per window, none per byte


def test_a_five_megabyte_model_is_too_large_and_skipped_a_budget_at_a_time():
    body = b'{"model":"' + base64.b64encode(bytes(3_750_000)) + b'"}'
    found, work = scan_in_steps(body, jsonscan.BUDGET)
    assert found == Members(OBJECT, too_large=frozenset({"model"}))
    assert len(work) <= len(body) // jsonscan.BUDGET + 3


def test_long_runs_of_whitespace_keys_and_numbers_are_read_across_windows():
    body = b" " * 3000 + b'{"' + b"k" * 3000 + b'":1.' + b"5" * 3000 + b',"model"' + b" " * 3000 + b':"o1"}'
    assert same(scan_in_steps(body, 64, Sliced)[0], reference(body))
    assert scan(body, NAMES).values == {"model": "o1"}


# The scanner's contract ------------------------------------------------------------------------------------------


def test_a_result_is_only_given_once_the_scan_is_finished():
    scanner = Scanner(b'{"messages":[' + b"{}," * 10_000 + b'{}],"model":"o1"}', NAMES)
    assert not scanner.step(1000)
    with pytest.raises(RuntimeError):
        scanner.result
    while not scanner.step(1000):
        pass
    assert scanner.result.values == {"model": "o1"}
    assert scanner.step(1000)


def test_names_given_as_one_string_are_refused():
    with pytest.raises(TypeError):
        scan(b'{"model":"o1"}', "model")

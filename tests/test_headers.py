"""Which headers cross the proxy: end-to-end ones do, hop-by-hop ones and (when asked) credentials do not."""

from hypothesis import given
from hypothesis import strategies as st

from fwd.headers import HOP_BY_HOP, is_event_stream, request_headers, response_headers

END_TO_END = [
    (b"Content-Type", [b"application/json"]),
    (b"X-Request-Id", [b"req_123"]),
    (b"OpenAI-Organization", [b"org-1"]),
    (b"OpenAI-Processing-Ms", [b"42"]),
    (b"X-RateLimit-Remaining-Requests", [b"499"]),
    (b"X-RateLimit-Reset-Tokens", [b"6ms"]),
    (b"Retry-After", [b"3"]),
    (b"Set-Cookie", [b"a=1", b"b=2"]),
]
HOP = [
    (b"Connection", [b"keep-alive"]),
    (b"Keep-Alive", [b"timeout=5"]),
    (b"Proxy-Authenticate", [b"Basic"]),
    (b"Proxy-Authorization", [b"Basic abc"]),
    (b"Proxy-Connection", [b"keep-alive"]),
    (b"TE", [b"trailers"]),
    (b"Trailer", [b"X-Checksum"]),
    (b"Transfer-Encoding", [b"chunked"]),
    (b"Upgrade", [b"h2c"]),
    (b"HTTP2-Settings", [b"AAMAAABkAAQAAP__"]),
]


def names(headers):
    return [name for name, _ in headers]


def lower(headers):
    return [(name.lower(), values) for name, values in headers]


def test_end_to_end_response_headers_reach_the_client_with_their_values():
    assert response_headers(HOP + END_TO_END) == lower(END_TO_END)


def test_end_to_end_request_headers_reach_the_upstream_with_their_values():
    assert request_headers(HOP + END_TO_END) == lower(END_TO_END)


def test_hop_by_hop_headers_never_cross_in_either_direction():
    assert request_headers(HOP) == []
    assert response_headers(HOP) == []


def test_headers_named_in_connection_are_dropped_in_both_directions():
    headers = [(b"Connection", [b"X-Debug-Token, close", b"X-Other"]), (b"X-Debug-Token", [b"t"]),
               (b"x-other", [b"o"]), (b"X-Request-Id", [b"r"])]
    assert names(request_headers(headers)) == [b"x-request-id"]
    assert names(response_headers(headers)) == [b"x-request-id"]


def test_every_connection_header_counts_not_just_the_first():
    headers = [(b"Connection", [b"x-a"]), (b"connection", [b"x-b"]), (b"X-A", [b"1"]), (b"X-B", [b"2"])]
    assert request_headers(headers) == []
    assert response_headers(headers) == []


def test_host_length_and_expect_are_left_to_the_upstream_agent():
    headers = [(b"Host", [b"proxy.local"]), (b"Content-Length", [b"5"]), (b"Expect", [b"100-continue"])]
    assert request_headers(headers) == []


def test_the_response_keeps_its_content_length():
    assert response_headers([(b"Content-Length", [b"5"])]) == [(b"content-length", [b"5"])]


def test_headers_with_the_hop_prefix_are_dropped_whatever_their_case():
    headers = [(b"X-SCF-Request-Id", [b"1"]), (b"x-scf-uin", [b"2"]), (b"X-Scf-Foo", [b"3"]), (b"X-Request-Id", [b"4"])]
    assert request_headers(headers, hop_prefix=b"x-scf-") == [(b"x-request-id", [b"4"])]


def test_without_a_hop_prefix_nothing_extra_is_dropped():
    assert request_headers([(b"X-SCF-Request-Id", [b"1"])]) == [(b"x-scf-request-id", [b"1"])]


def test_client_credentials_are_dropped_only_when_the_proxy_substitutes_a_key():
    headers = [(b"Authorization", [b"Bearer fk-alice"]), (b"api-key", [b"fk-alice"]), (b"Accept", [b"*/*"])]
    assert request_headers(headers, drop_credentials=True) == [(b"accept", [b"*/*"])]
    assert request_headers(headers) == lower(headers)


def test_event_streams_are_recognised_with_or_without_parameters():
    assert is_event_stream([b"text/event-stream"])
    assert is_event_stream([b"Text/Event-Stream; charset=utf-8"])
    assert not is_event_stream([b"application/json"])
    assert not is_event_stream(None)


# Property: nothing hop-by-hop ever crosses ------------------------------------------------------------------

CUSTOM = [b"x-request-id", b"x-debug", b"openai-model", b"x-ratelimit-limit-tokens", b"content-type", b"x-a"]
base_name = st.sampled_from(sorted(HOP_BY_HOP) + CUSTOM)
any_case = st.tuples(base_name, st.sampled_from([bytes.lower, bytes.upper, bytes.title, bytes.swapcase])).map(
    lambda pair: pair[1](pair[0])
)
tokens = st.lists(st.tuples(any_case, st.sampled_from([b"", b" ", b"  "])), max_size=4).map(
    lambda items: b",".join(pad + name + pad for name, pad in items)
)
value = st.binary(max_size=8)
header = st.one_of(
    st.tuples(any_case, st.lists(value, min_size=1, max_size=2)),
    st.tuples(st.sampled_from([b"Connection", b"connection", b"CONNECTION"]), st.lists(tokens, min_size=1, max_size=2)),
)


def check(out, headers):
    connection_named = {
        token.strip().lower()
        for name, values in headers
        if name.lower() == b"connection"
        for v in values
        for token in v.split(b",")
    }
    for name, _ in out:
        assert name == name.lower()
        assert name not in HOP_BY_HOP
        assert name not in connection_named
    return connection_named


@given(st.lists(header, max_size=10))
def test_no_hop_by_hop_or_connection_named_header_ever_reaches_the_client(headers):
    out = response_headers(headers)
    dropped = check(out, headers) | HOP_BY_HOP
    clean = [(n.lower(), [x.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"") for x in v]) for n, v in headers]
    assert out == [(n, v) for n, v in clean if n not in dropped]
    assert not any(c in value for _, values in out for value in values for c in (b"\r", b"\n", b"\x00"))


@given(st.lists(header, max_size=10), st.lists(st.sampled_from([b"x-hop", b"X-Secret, keep-alive", b" x-a "]), max_size=3))
def test_headers_the_upstreams_connection_header_names_never_reach_the_client_though_the_agent_hides_it(
    headers, connection
):
    hidden = {t.strip().lower() for v in connection for t in v.split(b",") if t.strip()}
    out = response_headers(headers, connection)
    assert not hidden & {name for name, _ in out}


@given(st.lists(header, max_size=10), st.sampled_from([b"", b"x-a", b"openai-"]))
def test_no_hop_by_hop_or_connection_named_header_ever_reaches_the_upstream(headers, prefix):
    out = request_headers(headers, hop_prefix=prefix)
    check(out, headers)
    for name, _ in out:
        assert not (prefix and name.startswith(prefix))

"""The response cache's rules (fwd.cache) and its embedded stores (fwd.cache_store)."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from fwd import cache
from fwd.cache_store import CacheFile, MemoryStore


def key(body: dict, scope: str = "fk:alice", path: bytes = b"/v1/chat/completions", query=None) -> str:
    return cache.cache_key("/", scope, b"POST", path, query, cache.canonical(body))


BASE = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}


def test_the_key_ignores_key_order_and_the_caching_flag_only():
    reordered = {"temperature": 0.5, "messages": [{"content": "hi", "role": "user"}], "model": "gpt-4o-mini"}
    assert key(BASE) == key(reordered) == key({**BASE, "caching": True})


@pytest.mark.parametrize("change", [
    {"temperature": 0.7}, {"temperature": 1}, {"seed": 1}, {"user": "u"}, {"tools": []}, {"stream": True},
    {"model": "gpt-4o"}, {"messages": [{"role": "user", "content": "hi "}]}, {"n": 2},
])
def test_any_parameter_that_shapes_the_answer_changes_the_key(change):
    assert key({**BASE, **change}) != key(BASE)


def test_callers_paths_queries_and_routes_never_share_a_key():
    assert key(BASE, scope="fk:bob") != key(BASE)
    assert key(BASE, path=b"/v1/completions") != key(BASE)
    assert key(BASE, query=b"api-version=1") != key(BASE)
    assert cache.cache_key("/a", "s", b"GET", b"/x", None, b"") != cache.cache_key("/", "s", b"GET", b"/a/x", None, b"")


@given(st.text(max_size=8), st.text(max_size=8), st.text(max_size=8), st.text(max_size=8))
def test_length_prefixes_keep_shifted_parts_apart(a, b, c, d):
    if (a, b) != (c, d):
        assert cache.cache_key(a, b, b"GET", b"/", None, b"") != cache.cache_key(c, d, b"GET", b"/", None, b"")


def test_the_scope_of_a_callers_key_is_a_keyed_hash_not_the_key():
    secret = b"s" * 32
    scope = cache.caller_scope(False, None, "sk-own-key-1234", secret)
    assert "sk-own" not in scope and scope.startswith("own:")
    assert scope != cache.caller_scope(False, None, "sk-own-key-1235", secret)
    assert scope != cache.caller_scope(False, None, "sk-own-key-1234", b"t" * 32)
    alice = cache.caller_scope(False, ("alice", "fk-alice-1"), None, secret)
    assert cache.caller_scope(True, ("alice", "fk-alice-1"), None, secret) == "shared"
    assert alice.startswith("fk:alice:") and "fk-alice-1" not in alice
    assert alice != cache.caller_scope(False, ("alice", "fk-alice-2"), None, secret), "the name given to a new key"


def test_a_route_pointed_at_another_upstream_starts_afresh():
    from fwd.config import Upstream

    before = cache.route_identity("/", [Upstream("https://api.openai.com")])
    assert before != cache.route_identity("/", [Upstream("https://other.example")])
    assert before != cache.route_identity("/", [Upstream("https://api.openai.com", kind="general")])
    assert before == cache.route_identity("/", [Upstream("https://api.openai.com", api_keys=("sk-new",))])


@pytest.mark.parametrize("method,path,cacheable", [
    (b"POST", b"/v1/chat/completions", True), (b"POST", b"/v1/completions", True),
    (b"POST", b"/v1/embeddings", True), (b"POST", b"/v1/responses", True), (b"GET", b"/v1/models", True),
    (b"GET", b"/v1/models/gpt-4o", True), (b"POST", b"/v1/audio/speech", False), (b"POST", b"/v1/files", False),
    (b"POST", b"/v1/batches", False), (b"POST", b"/v1/fine_tuning/jobs", False), (b"POST", b"/v1/uploads", False),
    (b"DELETE", b"/v1/models/ft-x", False), (b"GET", b"/v1/responses/resp_1", False),
    (b"POST", b"/v1/images/generations", False), (b"GET", b"/v1/files", False),
])
def test_only_answers_without_side_effects_are_cacheable(method, path, cacheable):
    assert cache.cacheable_endpoint(method, path) is cacheable


def test_a_stream_is_whole_only_when_it_ended_as_the_api_ends_one():
    assert cache.complete_stream(b'data: {"x": 1}\n\ndata: [DONE]\n\n')
    assert cache.complete_stream(b"event: response.completed\ndata: {}\n\n")
    assert not cache.complete_stream(b'data: {"choices": []}\n\n')
    assert not cache.complete_stream(b'data: {"content": "response.completed"}\n\n')


def test_nesting_deeper_than_orjson_writes_is_uncanonical_not_a_crash():
    deep: list = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(cache.Uncanonical):
        cache.canonical({"x": deep})
    with pytest.raises(cache.Uncanonical):
        cache.without_flag({"caching": True, "x": deep})


def test_responses_requests_are_stored_upstream_unless_they_say_otherwise():
    assert cache.stateful({"model": "m"}, b"/v1/responses")
    assert not cache.stateful({"model": "m", "store": False}, b"/v1/responses")
    assert not cache.stateful({"model": "m"}, b"/v1/chat/completions")


def test_requests_bound_to_state_kept_upstream_are_not_cached():
    assert cache.stateful({"background": True})
    assert cache.stateful({"previous_response_id": "resp_1"})
    assert cache.stateful({"conversation": "conv_1"})
    assert cache.stateful({"store": True})
    assert not cache.stateful({"store": False, "background": False, "previous_response_id": None})


def test_what_a_request_asks():
    assert cache.asked_mode(None, None) is None
    assert cache.asked_mode(None, True) == cache.USE
    assert cache.asked_mode(None, False) == cache.SKIP
    assert cache.asked_mode([b" Refresh "], True) == cache.REFRESH
    assert cache.asked_mode([b"skip"], True) == cache.SKIP, "the header wins over the body flag"
    for bad in ([b"maybe"], [b"use", b"skip"], [b""]):
        with pytest.raises(cache.BadCacheHeader):
            cache.asked_mode(bad, None)
    assert cache.asked_mode(None, "yes") is None, "only a JSON boolean is the flag"


def test_only_a_200_the_upstream_allows_is_stored():
    assert cache.storable(200, None)
    assert cache.storable(200, [b"private, max-age=60"])
    assert not cache.storable(200, [b"No-Store"])
    assert not cache.storable(500, None) and not cache.storable(206, None)


def test_stored_headers_leave_out_transfer_and_limit_headers():
    kept = cache.stored_headers([
        (b"Content-Type", [b"application/json"]), (b"Date", [b"x"]), (b"Content-Length", [b"5"]),
        (b"x-ratelimit-remaining-requests", [b"9"]), (b"Set-Cookie", [b"a=b"]), (b"x-request-id", [b"req_1"]),
    ])
    assert kept == ((b"content-type", b"application/json"), (b"x-request-id", b"req_1"))


def test_an_entry_survives_encoding_and_garbage_is_a_miss():
    entry = cache.Entry(((b"content-type", b"text/event-stream"),), b"data: {}\n\n\xff\x00", True, 12.5)
    assert cache.Entry.decode(entry.encode()) == entry
    for garbage in (b"", b"no newline", b"{}\nbody", b"[1]\n", b"\xff\n"):
        assert cache.Entry.decode(garbage) is None


def entry(size: int, stored_at: float = 0.0) -> cache.Entry:
    return cache.Entry((), b"x" * size, False, stored_at)


def test_the_memory_store_expires_entries_on_its_clock():
    clock = Clock()
    store = MemoryStore(10_000, clock)
    store.put("a", entry(10), 5)
    clock.advance(4.9)
    assert store.get("a") is not None
    clock.advance(0.1)
    assert store.get("a") is None and store.bytes == 0


def test_the_memory_store_stays_within_its_bytes_dropping_the_least_recently_used():
    clock = Clock()
    store = MemoryStore(4 * 1000, clock)
    for name in "abcd":
        store.put(name, entry(700), 60)
    store.get("a")  # a is used again: b is now the oldest
    store.put("e", entry(700), 60)
    assert store.bytes <= 4000
    assert store.get("b") is None and all(store.get(n) is not None for n in "acde")
    assert "b" in store.evicted


def test_one_answer_larger_than_a_quarter_of_the_store_is_not_kept():
    store = MemoryStore(4000, Clock())
    assert not store.put("big", entry(1000), 60)
    assert store.get("big") is None and store.bytes == 0


def test_the_file_keeps_entries_across_a_restart_and_forgets_evicted_and_expired_ones(tmp_path):
    clock = Clock()
    clock.advance(1000)
    memory = MemoryStore(10_000, clock)
    cache_file = CacheFile(str(tmp_path), memory, clock)
    cache_file.connection = cache_file._connect()
    for name, ttl in (("kept", 60), ("short", 1), ("evicted", 60)):
        memory.put(name, entry(10, clock.seconds()), ttl)
        cache_file.stored(name, entry(10, clock.seconds()), clock.seconds() + ttl)
    memory.drop("evicted")
    cache_file._write(*cache_file.take(), clock.seconds())
    clock.advance(2)
    restarted = MemoryStore(10_000, clock)
    assert CacheFile(str(tmp_path), restarted, clock).load() == 1
    assert restarted.get("kept") == entry(10, 1000) and restarted.get("short") is None
    rows = sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT key FROM entries").fetchall()
    assert rows == [("kept",), ("short",)], "the evicted entry was never written"


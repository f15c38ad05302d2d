"""The response cache on the request path, in memory on one Clock: bursts of identical misses, clients that
leave while they wait or while they lead, and what each answer says."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tests.support.memory import MemoryProxy, split_response

KEY = "fk-memory-cache-00000000000000001"


def proxy() -> MemoryProxy:
    return MemoryProxy(api_key="sk-pool-memory-000000000000001", forward_key=KEY, cache=True, check_keys=False)


def request(stream: bool = True, interval: float = 1.0, extra: bytes = b"") -> bytes:
    body = json.dumps({"model": "gpt-4o-mini", "stream": stream,
                       "messages": [{"role": "user", "content": "once"}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nx-fake-chunks: 3\r\nx-fake-interval: %g\r\n" % interval
            + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def chats(memory: MemoryProxy) -> int:
    return sum(1 for r in memory.upstream.received if r.uri.endswith(b"/chat/completions"))


def leave(memory: MemoryProxy, protocol) -> None:
    protocol.connectionLost(Failure(ConnectionLost("client went away")))
    memory.flush()


def test_a_waiting_client_that_leaves_costs_nothing_and_the_leader_still_stores():
    memory = proxy()
    leader = memory.raw(request())
    leader_protocol = memory.raw_protocol
    memory.raw(request())
    waiter_protocol = memory.raw_protocol
    assert memory.gateway.cache.counts.waited == 1 and memory.gateway.in_flight == 2
    leave(memory, waiter_protocol)
    assert memory.gateway.in_flight == 1
    for _ in range(4):
        memory.advance(1.0)
    status, headers, body = split_response(leader.value())
    assert (status, headers[b"x-fwd-cache"]) == (200, b"MISS") and body.endswith(b"data: [DONE]\n\n")
    assert memory.gateway.cache.counts.stored == 1 and memory.gateway.in_flight == 0
    assert chats(memory) == 1
    leader_protocol.connectionLost(Failure(ConnectionLost()))
    again = memory.raw(request())
    status, headers, replayed = split_response(again.value())
    assert (status, headers[b"x-fwd-cache"], replayed) == (200, b"HIT", body)


def test_when_the_leaders_client_leaves_its_waiters_go_upstream_themselves():
    memory = proxy()
    memory.raw(request())
    leader_protocol = memory.raw_protocol
    waiter = memory.raw(request())
    memory.advance(1.0)
    leave(memory, leader_protocol)
    for _ in range(4):
        memory.advance(1.0)
    status, headers, body = split_response(waiter.value())
    assert (status, headers[b"x-fwd-cache"]) == (200, b"MISS") and body.endswith(b"data: [DONE]\n\n")
    assert chats(memory) == 2, "the broken stream was not stored: the waiter made its own call"
    assert memory.gateway.cache.counts.stored == 1 and memory.gateway.in_flight == 0


def test_a_failed_leader_sends_its_waiters_upstream_and_stores_nothing():
    memory = proxy()
    failing = request(extra=b"x-fake-status: 503\r\n")
    first = memory.raw(failing)
    assert split_response(first.value())[0] == 503
    second = memory.raw(failing)
    assert split_response(second.value())[:2] == (503, split_response(second.value())[1])
    assert chats(memory) == 2 and memory.gateway.cache.counts.stored == 0
    assert split_response(second.value())[1][b"x-fwd-cache"] == b"MISS"


def test_a_bad_cache_header_is_a_400_before_anything_goes_upstream():
    memory = proxy()
    answer = memory.raw(request(extra=b"x-fwd-cache: always\r\n"))
    status, _, body = split_response(answer.value())
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_cache_header"
    assert chats(memory) == 0 and memory.gateway.in_flight == 0


def test_a_body_nested_deeper_than_the_cache_writes_goes_upstream_as_it_came():
    memory = proxy()
    deep = b'{"model": "gpt-4o-mini", "messages": [], "x": ' + b"[" * 600 + b"]" * 600 + b"}"
    for size_note in (deep, deep + b" " * 40_000):  # read at once, and in slices
        answer = memory.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(size_note)
                            + size_note)
        memory.advance(0.1)
        status, headers, _ = split_response(answer.value())
        assert (status, headers[b"x-fwd-cache"]) == (200, b"SKIP")
    assert chats(memory) == 2 and memory.upstream.received[-1].body == deep + b" " * 40_000


def test_answers_captured_at_once_stay_within_the_store_and_give_their_bytes_back():
    memory = MemoryProxy(api_key="sk-pool-memory-000000000000001", forward_key=KEY, cache=True, check_keys=False,
                         cache_max_size="8000")
    cache = memory.gateway.cache
    first, second = cache.capture(), cache.capture()
    first.feed(b"x" * 1500)
    second.feed(b"y" * 1500)
    assert cache.capturing == 3000
    first.feed(b"x" * 600)
    assert not first.whole and cache.capturing == 1500, "past a quarter of the store, a capture lets go"
    third = [cache.capture() for _ in range(5)]
    for capture in third:
        capture.feed(b"z" * 1400)
    assert cache.capturing <= 8000 and not all(c.whole for c in third)
    for capture in [second, *third]:
        capture.release()
    assert cache.capturing == 0


class SlowClient(StringTransport):
    """A connection whose client stops reading: past 128 KiB buffered it pauses its producer, as a socket does."""

    def write(self, data):
        super().write(data)
        if len(self.value()) > 128 * 1024 and self.producer is not None and self.streaming:
            self.producer.pauseProducing()


def test_a_large_hit_goes_as_the_client_reads_and_a_client_that_never_reads_is_let_go():
    from fwd.cache import Entry

    memory = proxy()
    listing = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
    first = memory.raw(listing)
    assert split_response(first.value())[1][b"x-fwd-cache"] == b"MISS"
    cache = memory.gateway.cache
    (key,) = list(cache.memory.entries)
    headers = cache.memory.entries[key][0].headers
    cache.memory.put(key, Entry(headers, b"m" * 2_000_000, False, 0.0), 600)  # a 2 MB answer under that key

    address = IPv4Address("TCP", "127.0.0.1", 40001)
    protocol = memory.site.buildProtocol(address)
    transport = SlowClient(peerAddress=address)
    protocol.makeConnection(transport)
    protocol.dataReceived(listing)
    memory.flush()
    status, head, body = split_response(transport.value())
    assert (status, head[b"x-fwd-cache"], head[b"content-length"]) == (200, b"HIT", b"2000000")
    assert len(body) < 300_000, "the connection's buffer stopped it: no copy of the whole entry waits there"
    assert memory.gateway.in_flight == 1
    transport.clear()
    transport.producer.resumeProducing()  # the client read: more comes
    assert 0 < len(transport.value()) < 300_000
    memory.advance(memory.config.idle_timeout + 1)
    assert transport.disconnecting, "a client that reads nothing more is disconnected"
    protocol.connectionLost(Failure(ConnectionLost()))
    assert memory.gateway.in_flight == 0


def test_a_shared_scope_never_answers_a_callers_own_key_which_nobody_checked():
    import attrs

    from tests.support.memory import make_config

    config = make_config(api_key="sk-pool-memory-000000000000001", forward_key=KEY, cache=True, check_keys=False)
    config = attrs.evolve(config, routes=(attrs.evolve(config.routes[0], cache_scope="shared"),))
    memory = MemoryProxy(config=config)

    def ask(key: str) -> bytes:
        answer = memory.raw(request(stream=False).replace(KEY.encode(), key.encode()))
        memory.advance(0.1)
        return split_response(answer.value())[1][b"x-fwd-cache"]

    assert [ask(KEY), ask(KEY)] == [b"MISS", b"HIT"]
    assert [ask("sk-made-up-000000000000000000001"), ask("sk-made-up-000000000000000000002")] == [b"SKIP", b"SKIP"]
    assert chats(memory) == 3


def test_callers_own_keys_each_see_their_own_entries_only_and_what_is_remembered_of_them_stays_bounded(monkeypatch):
    from fwd import caching

    monkeypatch.setattr(caching, "MAX_SCOPES", 3)
    memory = proxy()

    def ask(key: str) -> bytes:
        answer = memory.raw(request(stream=False).replace(KEY.encode(), key.encode()))
        memory.advance(0.1)
        return split_response(answer.value())[1][b"x-fwd-cache"]

    own = ["sk-own-cache-key-%015d" % n for n in range(6)]
    assert [ask(own[0]), ask(own[0]), ask(own[1]), ask(own[1])] == [b"MISS", b"HIT", b"MISS", b"HIT"]
    assert [ask(key) for key in own[2:]] == [b"MISS"] * 4, "no key is answered from another key's entry"
    assert len(memory.gateway.cache.scopes) <= 3
    assert [ask(own[0]), ask(own[5])] == [b"HIT", b"HIT"], "a scope worked out again is the same scope"
    assert not any(key in str(memory.gateway.cache.scopes.values()) for key in own), "scopes are keyed hashes"

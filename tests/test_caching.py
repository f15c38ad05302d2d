"""The response cache on the request path, in memory on one Clock: bursts of identical misses, clients that
leave while they wait or while they lead, and what each answer says."""

from __future__ import annotations

import json

from twisted.internet.error import ConnectionLost
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

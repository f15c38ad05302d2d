"""The response cache end to end: the official openai SDK against `twistd openai-forward` and the fake upstream."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import httpx2
import openai
import pytest

from tests.support.processes import DaemonProcess, with_checkout_on_path

pytestmark = pytest.mark.slow

POOL = "sk-cache-pool-0000000000000000001"
ALICE = "fk-cache-alice-000000000000000001"
BOB = "fk-cache-bob-00000000000000000001"
LIMITED = "fk-cache-limited-0000000000000001"
MESSAGES = [{"role": "user", "content": "tell me twice"}]


def write_config(directory, upstream_url: str, extra: str = "") -> None:
    with open(os.path.join(directory, "gateway.toml"), "w") as f:
        f.write(
            f'[[route]]\nbase_url = "{upstream_url}"\napi_keys = ["{POOL}"]\ncache = true\n{extra}forward_keys = [\n'
            f'  {{ key = "{ALICE}", name = "alice" }},\n'
            f'  {{ key = "{BOB}", name = "bob" }},\n'
            f'  {{ key = "{LIMITED}", name = "limited", rpm = "3/minute" }},\n'
            "]\n"
            '[[route]]\nprefix = "/plain"\n'
            f'base_url = "{upstream_url}"\napi_keys = ["{POOL}"]\nforward_keys = [{{ key = "{ALICE}", name = "alice" }}]\n'
        )


@pytest.fixture
def daemon(tmp_path, upstream):
    write_config(str(tmp_path), upstream.url)
    upstream.reset()
    with DaemonProcess(["--config", "gateway.toml", "--data-dir", "data", "--log-chat"], cwd=str(tmp_path)) as proxy:
        yield proxy


def client(daemon, key=ALICE, prefix=""):
    return openai.OpenAI(base_url=daemon.url + prefix + "/v1", api_key=key, max_retries=0, timeout=20)


def chat(daemon, key=ALICE, prefix="", headers=None, **params):
    raw = client(daemon, key, prefix).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers, **params
    )
    return raw.headers, raw.http_response.content


def upstream_chats(upstream) -> list:
    return [r for r in upstream.received() if "/chat/completions" in r["uri"]]


def test_a_repeated_request_is_a_hit_with_the_same_body_and_other_parameters_or_callers_miss(daemon, upstream):
    first_headers, first = chat(daemon, temperature=0.5)
    assert first_headers["x-fwd-cache"] == "MISS"
    again_headers, again = chat(daemon, temperature=0.5)
    assert again_headers["x-fwd-cache"] == "HIT" and again == first
    assert int(again_headers["age"]) >= 0 and again_headers["content-type"].startswith("application/json")
    assert len(upstream_chats(upstream)) == 1

    assert chat(daemon, temperature=0.7)[0]["x-fwd-cache"] == "MISS", "another temperature"
    assert chat(daemon, temperature=0.5, seed=7)[0]["x-fwd-cache"] == "MISS", "another seed"
    assert chat(daemon, temperature=0.5, user="u2")[0]["x-fwd-cache"] == "MISS", "another user parameter"
    bob_headers, bob = chat(daemon, key=BOB, temperature=0.5)
    assert bob_headers["x-fwd-cache"] == "MISS" and bob != first, "another forward key never sees alice's entry"
    assert len(upstream_chats(upstream)) == 5


def test_a_stream_is_replayed_as_the_same_events_and_a_plain_request_does_not_take_it(daemon, upstream):
    def stream():
        raw = client(daemon).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"x-fake-chunks": "6"}
        )
        chunks = list(raw.parse())
        return raw.headers, [c.model_dump() for c in chunks]

    first_headers, first = stream()
    again_headers, again = stream()
    assert (first_headers["x-fwd-cache"], again_headers["x-fwd-cache"]) == ("MISS", "HIT")
    assert again_headers["content-type"].startswith("text/event-stream")
    assert again == first and len(first) >= 6
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in again if c["choices"])
    assert text == "echo: tell me twice"
    assert chat(daemon)[0]["x-fwd-cache"] == "MISS", "the same request without stream is another entry"
    assert len(upstream_chats(upstream)) == 2


def test_a_hundred_identical_concurrent_misses_make_one_upstream_call(daemon, upstream):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "burst"}], "stream": True}
    headers = {"authorization": f"Bearer {ALICE}", "x-fake-interval": "0.1", "x-fake-chunks": "5"}

    async def run():
        limits = httpx2.Limits(max_connections=100)
        async with httpx2.AsyncClient(timeout=30, limits=limits) as http:
            async def one():
                answer = await http.post(daemon.url + "/v1/chat/completions", json=body, headers=headers)
                return answer.status_code, answer.headers.get("x-fwd-cache"), answer.content
            return await asyncio.gather(*(one() for _ in range(100)))

    answers = asyncio.run(run())
    assert {status for status, _, _ in answers} == {200}
    assert len({content for _, _, content in answers}) == 1, "every client got the same events"
    labels = [label for _, label, _ in answers]
    assert labels.count("MISS") == 1 and labels.count("HIT") == 99
    assert len(upstream_chats(upstream)) == 1


def test_failed_aborted_and_no_store_answers_are_not_kept(daemon, upstream):
    assert chat_status(daemon, {"x-fake-status": "500"}) == 500
    assert chat_status(daemon, {"x-fake-status": "500"}) == 500
    assert len(upstream_chats(upstream)) == 2, "an error is never stored"

    headers, _ = chat(daemon, headers={"x-fake-cache-control": "no-store"}, temperature=0.1)
    again, _ = chat(daemon, headers={"x-fake-cache-control": "no-store"}, temperature=0.1)
    assert (headers["x-fwd-cache"], again["x-fwd-cache"]) == ("MISS", "MISS"), "no-store is never stored"

    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "temperature": 0.3}).encode()
    with socket.create_connection(("127.0.0.1", daemon.ports[0])) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode()
                  + b"\r\nContent-Type: application/json\r\nx-fake-chunks: 10\r\nx-fake-interval: 0.2\r\n"
                  + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert b"data:" in s.recv(65536)
    time.sleep(0.3)
    raw = client(daemon).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, temperature=0.3, extra_headers={"x-fake-chunks": "10"}
    )
    assert raw.headers["x-fwd-cache"] == "MISS", "an aborted stream is not stored"
    list(raw.parse())


def chat_status(daemon, headers) -> int:
    try:
        chat(daemon, headers=headers)
    except openai.APIStatusError as e:
        assert e.response.headers["x-fwd-cache"] == "MISS"
        return e.status_code
    return 200


def test_the_body_flag_and_the_header_ask_for_the_cache_and_are_never_forwarded(daemon, upstream):
    first, _ = chat(daemon, prefix="/plain", extra_body={"caching": True})
    second, _ = chat(daemon, prefix="/plain", extra_body={"caching": True})
    assert (first["x-fwd-cache"], second["x-fwd-cache"]) == ("MISS", "HIT"), "asked for on a route that does not cache"
    assert "x-fwd-cache" not in chat(daemon, prefix="/plain")[0], "not asked, not cached"
    sent = upstream_chats(upstream)
    assert len(sent) == 2 and all("caching" not in json.loads(base64.b64decode(r["body_base64"])) for r in sent)

    assert chat(daemon, extra_body={"caching": False})[0]["x-fwd-cache"] == "SKIP"
    assert chat(daemon, headers={"x-fwd-cache": "skip"})[0]["x-fwd-cache"] == "SKIP"
    assert chat(daemon)[0]["x-fwd-cache"] == "MISS"
    assert chat(daemon)[0]["x-fwd-cache"] == "HIT"
    refreshed, body = chat(daemon, headers={"x-fwd-cache": "refresh"})
    assert refreshed["x-fwd-cache"] == "MISS"
    assert chat(daemon)[1] == body, "refresh stored the fresh answer"
    assert all(not any(n.lower() == "x-fwd-cache" for n, _ in r["headers"]) for r in upstream.received())
    with pytest.raises(openai.BadRequestError) as refused:
        chat(daemon, headers={"x-fwd-cache": "sometimes"})
    assert refused.value.code == "invalid_cache_header"


def test_a_hit_counts_against_the_rate_and_the_transcript_says_hit(daemon, upstream, tmp_path):
    for _ in range(3):
        chat(daemon, key=LIMITED)
    with pytest.raises(openai.RateLimitError):
        chat(daemon, key=LIMITED)
    assert len(upstream_chats(upstream)) == 1
    deadline = time.monotonic() + 5
    while True:
        text = (tmp_path / "Log" / "chat.jsonl").read_text() if (tmp_path / "Log" / "chat.jsonl").exists() else ""
        records = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
        if len(records) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [r.get("cache") for r in records[:3]] == [None, "hit", "hit"]
    assert records[1]["response"] == records[0]["response"]
    deadline = time.monotonic() + 5
    while True:  # the ledger is written every second
        out = subprocess.run(
            [sys.executable, "-m", "fwd.cli", "usage", "--data-dir", str(tmp_path / "data"), "--by", "caller", "--json"],
            capture_output=True, text=True, env=with_checkout_on_path(dict(os.environ)), check=True).stdout
        row = [r for r in json.loads(out)["rows"] if r["caller"] == "limited"]
        if row and row[0]["requests"] >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (row[0]["requests"], row[0]["cached"]) == (3, 2), "the two hits are counted, as cached"
    assert row[0]["input_tokens"] > 0, "the one upstream answer's tokens, and no more"


def test_entries_survive_a_restart_in_the_data_directory(tmp_path, upstream):
    write_config(str(tmp_path), upstream.url)
    upstream.reset()
    with DaemonProcess(["--config", "gateway.toml", "--data-dir", "data"], cwd=str(tmp_path)) as proxy:
        _, first = chat(proxy)
        time.sleep(1.5)  # written behind, every second
    with DaemonProcess(["--config", "gateway.toml", "--data-dir", "data"], cwd=str(tmp_path)) as proxy:
        headers, again = chat(proxy)
    assert headers["x-fwd-cache"] == "HIT" and again == first
    assert len(upstream_chats(upstream)) == 1


def test_entries_expire_after_the_routes_ttl(tmp_path, upstream):
    write_config(str(tmp_path), upstream.url, "cache_ttl = 1\n")
    upstream.reset()
    with DaemonProcess(["--config", "gateway.toml", "--data-dir", "data"], cwd=str(tmp_path)) as proxy:
        assert chat(proxy)[0]["x-fwd-cache"] == "MISS"
        assert chat(proxy)[0]["x-fwd-cache"] == "HIT"
        time.sleep(1.2)
        assert chat(proxy)[0]["x-fwd-cache"] == "MISS"


def test_with_redis_two_instances_share_entries(tmp_path, upstream, redis_server):
    write_config(str(tmp_path), upstream.url)
    upstream.reset()
    arguments = ["--config", "gateway.toml", "--data-dir", "data", "--redis-url", redis_server.url]
    with DaemonProcess(arguments, cwd=str(tmp_path)) as a, DaemonProcess(arguments, cwd=str(tmp_path)) as b:
        headers, first = chat(a, temperature=0.9)
        assert headers["x-fwd-cache"] == "MISS"
        time.sleep(0.3)  # the entry is written to Redis as the answer ends, not waited for
        headers, again = chat(b, temperature=0.9)
        assert headers["x-fwd-cache"] == "HIT" and again == first, "b answers from the entry a stored"
        assert chat(b, key=BOB, temperature=0.9)[0]["x-fwd-cache"] == "MISS"
        stream = [c.model_dump() for c in client(a).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"x-fake-chunks": "4"})]
        time.sleep(0.2)
        raw = client(b).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"x-fake-chunks": "4"})
        assert raw.headers["x-fwd-cache"] == "HIT" and [c.model_dump() for c in raw.parse()] == stream
    assert not (tmp_path / "data" / "cache.sqlite").exists(), "entries live in Redis, not in the file"


def test_the_single_route_caches_with_the_cache_flag_embeddings_and_model_listings_too(tmp_path, upstream):
    upstream.reset()
    env = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": POOL, "FORWARD_KEY": ALICE, "CHECK_KEYS": "false"}
    with DaemonProcess(["--cache", "--data-dir", "data"], env=env, cwd=str(tmp_path)) as proxy:
        assert [chat(proxy)[0]["x-fwd-cache"] for _ in range(2)] == ["MISS", "HIT"]
        sdk = client(proxy)
        vectors = [sdk.embeddings.with_raw_response.create(model="text-embedding-3-small", input="same words")
                   for _ in range(2)]
        assert [v.headers["x-fwd-cache"] for v in vectors] == ["MISS", "HIT"]
        assert vectors[0].parse().data[0].embedding == vectors[1].parse().data[0].embedding
        listings = [sdk.models.with_raw_response.list() for _ in range(2)]
        assert [m.headers["x-fwd-cache"] for m in listings] == ["MISS", "HIT"]
        assert [m.id for m in listings[1].parse()] == [m.id for m in listings[0].parse()]
        upload = sdk.files.with_raw_response.create(file=("a.jsonl", b"{}\n"), purpose="batch")
        assert upload.headers["x-fwd-cache"] == "SKIP", "uploads are never cached"
    assert len(upstream_chats(upstream)) == 1


def test_a_stream_the_upstream_cut_short_is_never_stored(tmp_path):
    """A close-delimited stream broken before [DONE], and a chunked one that ends without it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    calls = []

    def serve():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            calls.append(data)
            event = b'data: {"choices":[{"index":0,"delta":{"content":"Hal"}}]}\n\n'
            if len(calls) % 2:
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                                   + event)
            else:
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked"
                                   b"\r\nConnection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": MESSAGES}).encode()
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:%d" % server.getsockname()[1], "OPENAI_API_KEY": POOL,
           "FORWARD_KEY": ALICE, "CHECK_KEYS": "false"}
    try:
        with DaemonProcess(["--cache", "--data-dir", "data"], env=env, cwd=str(tmp_path)) as proxy:
            labels = []
            for _ in range(4):
                answer = httpx2.post(proxy.url + "/v1/chat/completions", content=body, timeout=10,
                                     headers={"authorization": f"Bearer {ALICE}", "content-type": "application/json"})
                labels.append(answer.headers["x-fwd-cache"])
    finally:
        server.close()
    assert labels == ["MISS"] * 4 and len(calls) == 4


def test_clients_that_hang_up_during_a_redis_lookup_do_not_count_against_redis(tmp_path, upstream, redis_server):
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode()
               + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    env = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": POOL, "FORWARD_KEY": ALICE, "CHECK_KEYS": "false"}
    with DaemonProcess(["--cache", "--redis-url", redis_server.url], env=env, cwd=str(tmp_path)) as proxy:
        for _ in range(4):
            sockets = [socket.create_connection(("127.0.0.1", proxy.ports[0])) for _ in range(5)]
            for s in sockets:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.sendall(request)
            for s in sockets:
                s.close()  # a reset right after the request: the lookup is on its way
            time.sleep(0.3)
        redis = httpx2.get(proxy.url + "/healthz").json()["redis"]
        assert redis["state"] == "shared" and redis["failures"] == 0, redis
        assert "timed out" not in proxy.output

"""The Realtime API over WebSocket end to end: the official openai SDK's realtime client and a browser-style client
(subprotocols only) against `twistd openai-forward` and the fake upstream's Realtime server."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.support.processes import DaemonProcess, rss_kib, with_checkout_on_path

pytestmark = pytest.mark.slow

POOL_A = "sk-realtime-pool-a-000000000000001"
POOL_B = "sk-realtime-pool-b-000000000000002"
ALICE = "fk-realtime-alice-0000000000000001"
LIMITED = "fk-realtime-limited-00000000000001"
SERIAL = "fk-realtime-serial-000000000000001"
THRIFTY = "fk-realtime-thrifty-00000000000001"
MODEL = "gpt-realtime"


def write_config(directory: str, upstream_url: str, extra: str = "") -> None:
    with open(os.path.join(directory, "gateway.toml"), "w") as f:
        f.write(
            f'[[route]]\nbase_url = "{upstream_url}"\napi_keys = ["{POOL_A}", "{POOL_B}"]\n{extra}forward_keys = [\n'
            f'  {{ key = "{ALICE}", name = "alice" }},\n'
            f'  {{ key = "{LIMITED}", name = "limited", models = ["{MODEL}"], rpm = "2/minute" }},\n'
            f'  {{ key = "{SERIAL}", name = "serial", max_parallel = 1 }},\n'
            f'  {{ key = "{THRIFTY}", name = "thrifty", budget = {{ tokens = 6, period = "day" }} }},\n'
            "]\n"
        )


@pytest.fixture
def daemon(tmp_path, upstream):
    write_config(str(tmp_path), upstream.url)
    upstream.reset()
    upstream.set_keys({POOL_A: None, POOL_B: None})
    with DaemonProcess(["--config", "gateway.toml", "--data-dir", "data", "--log-chat"], cwd=str(tmp_path)) as proxy:
        # The startup key check asks the upstream about each pool key: a test that changes what the upstream says
        # of a key must not race it.
        for key in (POOL_A, POOL_B):
            assert "key check of sk-…" + key[-4:] + ": accepted" in proxy.wait_for("key check of sk-…" + key[-4:])
        yield proxy


def ws_url(daemon, query: str = f"model={MODEL}") -> str:
    return daemon.url.replace("http://", "ws://") + "/v1/realtime?" + query


def browser(daemon, key: str | None = ALICE, protocols=("realtime",), query: str = f"model={MODEL}", **options):
    """A browser-style client: no headers of its own, the key in a subprotocol."""
    offered = list(protocols) + ([f"openai-insecure-api-key.{key}"] if key else [])
    return connect(ws_url(daemon, query), subprotocols=offered, proxy=None, compression=None, open_timeout=10,
                   **options)


def events(socket_, until: str, limit: int = 100) -> list[dict]:
    found = []
    for _ in range(limit):
        event = json.loads(socket_.recv(timeout=10))
        found.append(event)
        if event["type"] == until:
            return found
    raise AssertionError(f"no {until} in {[e['type'] for e in found]}")


def say(ws, text: str) -> list[dict]:
    """Add a user message and ask for a response: the events until its `response.done`."""
    ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    ws.send(json.dumps({"type": "response.create"}))
    return events(ws, "response.done")


def refusal(daemon, **kwargs) -> tuple[int, dict, dict]:
    with pytest.raises(InvalidStatus) as raised:
        browser(daemon, **kwargs).close()
    response = raised.value.response
    return response.status_code, dict(response.headers), json.loads(response.body)


def handshakes(upstream) -> list[dict]:
    return [r for r in upstream.received() if r["uri"].startswith("/v1/realtime")]


def header(record: dict, name: str) -> str | None:
    found = [v for n, v in record["headers"] if n.lower() == name]
    return found[0] if found else None


def transcripts(directory) -> list[dict]:
    path = os.path.join(directory, "Log", "chat.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines(keepends=True) if line.endswith("\n")]


def wait_for(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    return check()


def test_the_sdk_realtime_client_talks_through_the_proxy_with_the_pool_key(daemon, upstream, tmp_path):
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=ALICE, max_retries=0)
    with client.realtime.connect(model=MODEL) as connection:
        assert connection.recv().type == "session.created"
        connection.session.update(session={"type": "realtime", "instructions": "be brief"})
        assert connection.recv().type == "session.updated"
        connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]})
        assert connection.recv().type == "conversation.item.created"
        connection.response.create()
        text, usage = "", None
        for event in connection:
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.done":
                usage = event.response.usage
                break
    assert text == "Echo: hello there"
    assert usage.total_tokens == 5
    (handshake,) = handshakes(upstream)
    assert header(handshake, "authorization") in (f"Bearer {POOL_A}", f"Bearer {POOL_B}")
    assert ALICE not in json.dumps(upstream.received())
    records = wait_for(lambda: transcripts(tmp_path))
    (record,) = records
    assert record["realtime"] is True and record["caller"] == "alice" and record["model"] == MODEL
    assert record["session"]["instructions"] == "be brief"
    assert [(i["from"], i.get("text")) for i in record["items"]] == [("client", "hello there"),
                                                                    ("upstream", "Echo: hello there")]
    assert record["usage"] == {"input_tokens": 2, "output_tokens": 3, "total_tokens": 5}
    assert record["ended"]["by"] == "client" and record["status"] == 101
    log = daemon.wait_for("/v1/realtime 101")
    assert "GET /v1/realtime 101" in log and ALICE not in log and POOL_A not in log


def test_a_browser_style_client_authenticates_with_subprotocols_only(daemon, upstream):
    with browser(daemon, protocols=("realtime", "openai-beta.realtime-v1")) as ws:
        assert ws.subprotocol == "realtime"
        assert events(ws, "session.created")[-1]["session"]["model"] == MODEL
        deltas = [e["delta"] for e in say(ws, "from a browser") if e["type"] == "response.text.delta"]
        assert "".join(deltas) == "Echo: from a browser"  # the beta's event names: the subprotocol went upstream
    (handshake,) = handshakes(upstream)
    assert header(handshake, "sec-websocket-protocol") == "realtime,openai-beta.realtime-v1"
    assert header(handshake, "authorization").startswith("Bearer sk-realtime-pool-")
    assert "openai-insecure-api-key" not in json.dumps(handshake)


def test_refusals_are_plain_http_answers_before_any_upgrade(daemon, upstream):
    status, _, body = refusal(daemon, key="fk-realtime-nobody-00000000000001")
    assert status == 401 and body["error"]["code"]
    status, _, body = refusal(daemon, key=None)
    assert status == 401
    status, _, body = refusal(daemon, key=LIMITED, query="model=gpt-4o-realtime-preview")
    assert status == 403 and "gpt-4o-realtime-preview" in body["error"]["message"]
    status, _, body = refusal(daemon, key=LIMITED, query="")
    assert status == 403 and "model" in body["error"]["message"]
    # Two different keys offered: ambiguous.
    status, _, body = refusal(daemon, protocols=("realtime", "openai-insecure-api-key.fk-other-0000000000000001"))
    assert status == 400
    assert handshakes(upstream) == []  # none of them reached the upstream


def test_rpm_and_max_parallel_refuse_with_429_and_openai_headers(daemon, upstream):
    for _ in range(2):
        with browser(daemon, key=LIMITED) as ws:
            events(ws, "session.created")
    assert wait_for(lambda: health(daemon)["sessions"] == 0)
    status, headers, body = refusal(daemon, key=LIMITED)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-limit-requests"] == "2"
    with browser(daemon, key=SERIAL) as first:
        events(first, "session.created")
        status, _, body = refusal(daemon, key=SERIAL)
        assert status == 429 and "at once" in body["error"]["message"]
    # The slot came back when the first session ended.
    assert wait_for(lambda: health(daemon)["sessions"] == 0)
    with browser(daemon, key=SERIAL) as again:
        events(again, "session.created")


def test_tokens_from_response_done_are_charged_to_the_budget(daemon, upstream, tmp_path):
    with browser(daemon, key=THRIFTY) as ws:
        events(ws, "session.created")
        done = say(ws, "one two three")[-1]
        assert done["response"]["usage"]["total_tokens"] == 7
    # The budget of 6 tokens is spent: the next session is refused as OpenAI refuses an exhausted quota.
    daemon.wait_for("GET /v1/realtime 101")  # the session has ended: its tokens are charged
    status, _, body = refusal(daemon, key=THRIFTY)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"
    daemon.stop()
    report = subprocess.run(
        [sys.executable, "-m", "fwd.cli", "usage", "--data-dir", "data", "--json", "--by", "caller"],
        cwd=str(tmp_path), env=with_checkout_on_path(dict(os.environ)), capture_output=True, text=True, timeout=30)
    (row,) = [r for r in json.loads(report.stdout)["rows"] if r["caller"] == "thrifty"]
    assert (row["input_tokens"], row["output_tokens"], row["requests"]) == (3, 4, 1)


def test_a_pool_key_the_upstream_refuses_is_disabled_and_the_next_one_used(daemon, upstream):
    upstream.set_keys({POOL_A: {"status": 401}, POOL_B: None})
    for _ in range(3):
        with browser(daemon) as ws:
            events(ws, "session.created")
    keys = [header(h, "authorization") for h in handshakes(upstream)]
    assert keys.count(f"Bearer {POOL_A}") == 1  # tried once, then disabled
    assert keys.count(f"Bearer {POOL_B}") == 3
    upstream.set_keys({POOL_A: None, POOL_B: {"status": 429, "retry_after": 30}})
    upstream.set_keys({POOL_B: {"status": 429, "retry_after": 30}})
    status, headers, body = refusal(daemon)
    assert status in (429, 503) and "retry-after" in headers


def test_an_upstream_refusal_that_is_not_about_the_key_is_passed_on_masked(daemon, upstream):
    upstream.set_keys({POOL_A: {"status": 404, "code": "model_not_found"},
                       POOL_B: {"status": 404, "code": "model_not_found"}})
    status, _, body = refusal(daemon)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    upstream.set_keys({POOL_A: None, POOL_B: None})


def test_close_codes_and_reasons_pass_through_both_ways(daemon, upstream):
    with browser(daemon) as ws:
        events(ws, "session.created")
        ws.send(json.dumps({"type": "fake.close", "code": 4000, "reason": "session expired"}))
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
        assert ws.close_code == 4000 and ws.close_reason == "session expired"
    with browser(daemon) as ws:
        events(ws, "session.created")
        ws.close(4001, "user hung up")
    closes = wait_for(lambda: [c for c in fake_realtime(upstream)["closes"] if c.get("code") == 4001])
    assert closes and closes[0]["reason"] == "user hung up"


def test_binary_frames_and_pings_are_relayed_in_order(daemon, upstream):
    with browser(daemon) as ws:
        events(ws, "session.created")
        for n in range(20):
            ws.send(bytes([n]) * (n + 1))
        echoed = [ws.recv(timeout=10) for _ in range(20)]
        assert echoed == [bytes([n]) * (n + 1) for n in range(20)]
        ws.ping(b"are you there").wait(5)


def test_an_upstream_that_vanishes_closes_the_client_with_1011(daemon, upstream):
    with browser(daemon) as ws:
        events(ws, "session.created")
        ws.send(json.dumps({"type": "fake.drop"}))
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
        assert ws.close_code == 1011


def test_an_unreachable_upstream_is_a_502_before_the_upgrade(tmp_path):
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
    write_config(str(tmp_path), f"http://127.0.0.1:{port}")
    with DaemonProcess(["--config", "gateway.toml"], cwd=str(tmp_path)) as proxy:
        status, _, body = refusal(proxy)
        assert status == 502 and body["error"]["type"]


def test_a_limited_key_cannot_switch_models_inside_the_session(daemon, upstream):
    with browser(daemon, key=LIMITED) as ws:
        events(ws, "session.created")
        ws.send(json.dumps({"type": "session.update", "event_id": "evt_1",
                            "session": {"model": "gpt-4o-realtime-preview"}}))
        answer = json.loads(ws.recv(timeout=10))
        assert answer["type"] == "error" and answer["error"]["code"] == "model_not_allowed"
        assert answer["error"]["event_id"] == "evt_1"
        ws.send(json.dumps({"type": "session.update", "session": {"model": MODEL}}))
        assert json.loads(ws.recv(timeout=10))["type"] == "session.updated"
    assert fake_realtime(upstream)["client_frames"] >= 1


def test_a_message_past_the_limit_closes_the_session_with_1009(tmp_path, upstream):
    write_config(str(tmp_path), upstream.url)
    with DaemonProcess(["--config", "gateway.toml", "--max-body-size", "65536"], cwd=str(tmp_path)) as proxy:
        with browser(proxy) as ws:
            events(ws, "session.created")
            ws.send(b"x" * 70000)
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=10)
            assert ws.close_code == 1009


def test_an_idle_session_is_closed_and_sigterm_closes_sessions_after_the_grace_period(tmp_path, upstream):
    write_config(str(tmp_path), upstream.url)
    arguments = ["--config", "gateway.toml", "--idle-timeout", "1", "--grace-period", "1"]
    with DaemonProcess(arguments, cwd=str(tmp_path)) as proxy:
        with browser(proxy) as ws:
            events(ws, "session.created")
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=10)
            assert ws.close_code == 1001 and 0.9 < time.monotonic() - started < 4
        ws = browser(proxy, ping_interval=0.3)
        events(ws, "session.created")
        proxy.process.send_signal(15)
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
        closed = time.monotonic() - started
        assert ws.close_code == 1001 and ws.close_reason == "server shutting down"
        assert 0.9 < closed < 4, "the session ran through the grace period, then was closed"
        proxy.process.wait(10)
        assert time.monotonic() - started < 5


def test_a_client_that_stops_reading_pauses_the_upstream_and_memory_stays_flat(daemon, upstream):
    """The fake floods 2,000 frames of 64 KiB (125 MiB) at a client that reads nothing."""
    pid = daemon.process.pid
    before = rss_kib(pid)
    with browser(daemon, max_queue=1, max_size=None) as ws:
        events(ws, "session.created")
        sock = ws.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        ws.send(json.dumps({"type": "fake.flood", "count": 2000, "size": 65536}))
        time.sleep(2.0)
        stats = fake_realtime(upstream)
        grown = rss_kib(pid) - before
        print(f"\nflooded a reader that stopped: {stats['flood_sent']} of 2000 frames sent, upstream paused "
              f"{stats['paused']} times, proxy RSS grew {grown} KiB")
        assert stats["paused"] >= 1 and stats["flood_sent"] < 2000
        assert grown < 32 * 1024


def fake_realtime(upstream) -> dict:
    return upstream._call("GET", "/__fake/realtime")


def test_concurrent_sessions_cost_little_memory_each(daemon, upstream):
    count = 50
    pid = daemon.process.pid
    before = rss_kib(pid)
    sockets = []
    try:
        for _ in range(count):
            ws = browser(daemon)
            events(ws, "session.created")
            sockets.append(ws)
        held = rss_kib(pid) - before
        print(f"\n{count} Realtime sessions held: {held / count:.1f} KiB each")
        assert held / count < 200
    finally:
        for ws in sockets:
            ws.close()


def test_base64_audio_never_reaches_the_transcript(daemon, upstream, tmp_path):
    audio = base64.b64encode(bytes(range(256)) * 40).decode()
    with browser(daemon) as ws:
        events(ws, "session.created")
        ws.send(json.dumps({"type": "session.update", "session": {"modalities": ["text", "audio"]}}))
        events(ws, "session.updated")
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events(ws, "conversation.item.input_audio_transcription.completed")
        ws.send(json.dumps({"type": "response.create"}))
        events(ws, "response.done")
    (record,) = wait_for(lambda: transcripts(tmp_path))
    assert record["audio_bytes"]["client"] == 10240 and record["audio_bytes"]["upstream"] > 0
    spoken = [i for i in record["items"] if i.get("type") == "input_audio"]
    assert spoken and spoken[0]["transcript"] == "heard 10240 bytes"
    assert audio[:200] not in json.dumps(record)


def test_sessions_through_threads_do_not_interfere(daemon, upstream):
    results = []

    def talk(n):
        with browser(daemon) as ws:
            events(ws, "session.created")
            deltas = [e["delta"] for e in say(ws, f"number {n}") if e["type"].endswith("text.delta")]
            results.append("".join(deltas) == f"Echo: number {n}")

    threads = [threading.Thread(target=talk, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True] * 10


def test_an_openai_realtime_client_is_served_by_an_azure_deployment(tmp_path, upstream):
    upstream.reset()
    (tmp_path / "gateway.toml").write_text(
        f'check_keys = false\n[[route]]\nforward_keys = [{{ key = "{ALICE}", name = "alice" }}]\n'
        f'[[route.upstream]]\nbase_url = "{upstream.url}"\nkind = "azure"\napi_keys = ["{POOL_A}"]\n'
        f'api_version = "2024-10-01-preview"\ndeployments = {{ "{MODEL}" = "my-realtime" }}\n')
    with DaemonProcess(["--config", "gateway.toml"], cwd=str(tmp_path)) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0)
        with client.realtime.connect(model=MODEL) as connection:
            assert connection.recv().session.model == "my-realtime"
    (handshake,) = [r for r in upstream.received() if "/realtime" in r["uri"]]
    assert handshake["uri"] == "/openai/realtime?deployment=my-realtime&api-version=2024-10-01-preview"
    assert header(handshake, "api-key") == POOL_A and header(handshake, "authorization") is None


def test_an_azure_route_takes_its_clients_key_in_api_key(tmp_path, upstream):
    upstream.reset()
    (tmp_path / "gateway.toml").write_text(
        f'check_keys = false\n[[route]]\nkind = "azure"\nbase_url = "{upstream.url}"\napi_keys = ["{POOL_A}"]\n'
        f'forward_keys = [{{ key = "{ALICE}", name = "alice" }}]\n')
    query = "api-version=2024-10-01-preview&deployment=my-realtime"
    with DaemonProcess(["--config", "gateway.toml"], cwd=str(tmp_path)) as proxy:
        url = proxy.url.replace("http://", "ws://") + "/openai/realtime?" + query
        with connect(url, additional_headers={"api-key": ALICE}, proxy=None, compression=None) as ws:
            assert events(ws, "session.created")[-1]["session"]["model"] == "my-realtime"
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers={"api-key": "fk-realtime-nobody-00000000000001"}, proxy=None)
        assert refused.value.response.status_code == 401
    (handshake,) = [r for r in upstream.received() if "/realtime" in r["uri"]]
    assert handshake["uri"] == "/openai/realtime?" + query
    assert header(handshake, "api-key") == POOL_A


def test_sessions_in_workers_share_the_limits_and_reach_the_transcript(tmp_path, upstream):
    write_config(str(tmp_path), upstream.url)
    with DaemonProcess(["--config", "gateway.toml", "--workers", "2", "--log-chat"], cwd=str(tmp_path)) as proxy:
        admitted = 0
        for _ in range(6):
            try:
                with browser(proxy, key=LIMITED) as ws:
                    events(ws, "session.created")
                    admitted += 1
            except InvalidStatus as refused:
                assert refused.response.status_code == 429
    assert admitted == 2, "rpm = 2/minute across both workers"
    records = transcripts(tmp_path)
    assert len(records) == 2 and all(r["realtime"] and r["caller"] == "limited" for r in records)


# --- hostile clients ----------------------------------------------------------------------------------------------

def raw_handshake(port: int, target: str, headers: dict[str, str], host: str | None = None):
    """A WebSocket handshake written by hand (what a hostile client sends): the socket, and the answer's head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"GET {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="] + [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def health(daemon) -> dict:
    import urllib.request

    with urllib.request.urlopen(daemon.url + "/healthz", timeout=5) as answer:
        return json.loads(answer.read())


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    else:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    mask = b"\x01\x02\x03\x04"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_handshakes_the_websocket_side_would_refuse_are_refused_before_the_upstream_is_asked(daemon, upstream):
    port = daemon.ports[0]
    auth = {"Authorization": f"Bearer {ALICE}"}
    host = f"127.0.0.1:{port}"
    cases = [
        ("/v1/realtime#frag?model=gpt-realtime", auth, host),  # a fragment: the upstream URL cannot hold it
        ("/v1/realtime?model=gpt-realtime", auth, None),  # no Host
        ("/v1/realtime?model=gpt-realtime", auth, "127.0.0.1:abc"),
        ("/v1/realtime?model=gpt-realtime", {**auth, "Sec-WebSocket-Protocol": "realtime, realtime"}, host),
        ("/v1/realtime?model=gpt-realtime", {**auth, "Origin": "http://"}, host),
    ]
    for target, headers, host_header in cases:
        sock, answer = raw_handshake(port, target, headers, host_header)
        sock.close()
        assert answer.split(b" ", 2)[1] == b"400", (target, headers, host_header, answer[:100])
    assert handshakes(upstream) == []
    assert wait_for(lambda: (lambda h: h if h["in_flight"] == 0 and h["sessions"] == 0 else None)(health(daemon)))


def test_a_message_in_too_many_fragments_closes_the_session_with_1009(daemon, upstream):
    with browser(daemon) as ws:
        events(ws, "session.created")
        with pytest.raises(ConnectionClosed):
            ws.send(iter([b"x"] * 300))
            while True:
                ws.recv(timeout=10)
        assert ws.close_code == 1009
    assert fake_realtime(upstream)["client_frames"] == 0


def test_a_client_that_pings_without_reading_is_paused_not_buffered(daemon, upstream):
    port = daemon.ports[0]
    pid = daemon.process.pid
    sock, answer = raw_handshake(port, f"/v1/realtime?model={MODEL}", {"Authorization": f"Bearer {ALICE}"},
                                 f"127.0.0.1:{port}")
    assert b" 101 " in answer.split(b"\r\n")[0]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(0.5)
    before = rss_kib(pid)
    ping = masked(0x9, b"p" * 125)
    sent = 0
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline and sent < 64 * 1024 * 1024:
            sock.sendall(ping * 64)
            sent += len(ping) * 64
    except (TimeoutError, OSError):
        pass  # the proxy stopped reading: the send buffers are full
    grown = rss_kib(pid) - before
    sock.close()
    print(f"\npings sent by a client that reads nothing: {sent // 1024} KiB before the proxy stopped reading; "
          f"proxy RSS grew {grown} KiB")
    assert sent < 32 * 1024 * 1024 and grown < 16 * 1024


def test_a_session_that_spends_the_budget_is_closed_after_the_response(daemon, upstream):
    with browser(daemon, key=THRIFTY) as ws:
        events(ws, "session.created")
        done = say(ws, "one two three")[-1]
        assert done["response"]["usage"]["total_tokens"] == 7  # the response came whole
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["error"]["code"] == "insufficient_quota"
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
        assert ws.close_code == 1008


def test_a_limited_key_cannot_name_another_model_in_a_binary_frame_or_a_transcription(daemon, upstream):
    with browser(daemon, key=LIMITED) as ws:
        events(ws, "session.created")
        for frame in (json.dumps({"type": "session.update", "session": {"model": "gpt-4o-realtime-preview"}}).encode(),
                      json.dumps({"type": "session.update",
                                  "session": {"input_audio_transcription": {"model": "whisper-1"}}})):
            ws.send(frame)
            answer = json.loads(ws.recv(timeout=10))
            assert answer["type"] == "error" and answer["error"]["code"] == "model_not_allowed"
    assert fake_realtime(upstream)["client_frames"] == 0


def test_a_deeply_nested_event_does_not_break_a_transcribed_session(daemon, upstream, tmp_path):
    deep = '{"type":"session.update","session":{"instructions":"deep","metadata":' + '{"a":' * 300 + '1' \
           + '}' * 300 + '}}'
    with browser(daemon) as ws:
        events(ws, "session.created")
        ws.send(deep)
        events(ws, "session.updated")
        ws.send(json.dumps({"type": "response.create"}))
        events(ws, "response.done")
    (record,) = wait_for(lambda: transcripts(tmp_path))
    assert record["truncated"] is True and record["usage"]["total_tokens"] > 0


def test_with_redis_a_session_keeps_its_slot_through_its_responses_and_gives_it_back_at_shutdown(
        tmp_path, upstream, redis_server):
    """A key with max_parallel and tpm, limits in Redis: each response is charged without the session contesting
    its own parallel slot, and a SIGTERM's last settlements reach Redis before the connection closes."""
    client = redis_server.client()
    client.flushall()
    upstream.reset()
    key = "fk-realtime-metered-00000000000001"
    (tmp_path / "gateway.toml").write_text(
        f'[[route]]\nbase_url = "{upstream.url}"\napi_keys = ["{POOL_A}"]\nforward_keys = [\n'
        f'  {{ key = "{key}", name = "metered", max_parallel = 1, tpm = "100000/minute" }},\n]\n')
    arguments = ["--config", "gateway.toml", "--redis-url", redis_server.url, "--grace-period", "1"]
    with DaemonProcess(arguments, cwd=str(tmp_path)) as proxy:
        assert wait_for(lambda: health(proxy)["redis"]["state"] == "shared"), "sharing through Redis"
        ws = browser(proxy, key=key)
        events(ws, "session.created")
        for n in range(3):
            ws.send(json.dumps({"type": "response.create"}))
            found = events(ws, "response.done")
            assert not [e for e in found if e["type"] == "error"], f"response {n} was charged without a refusal"
        slots = [k for k in client.keys("fwd:par:*")]
        assert slots and client.zcard(slots[0]) == 1, ("the session holds its slot", client.keys("*"))
        proxy.process.send_signal(15)
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
        proxy.process.wait(10)
    assert client.zcard(slots[0]) == 0, "the last settlement reached Redis"


def test_a_client_that_writes_before_it_reads_is_not_stalled(daemon, upstream):
    """The upstream floods the client; the client, single-threaded, sends 8 MiB of audio before it reads."""
    port = daemon.ports[0]
    sock, answer = raw_handshake(port, f"/v1/realtime?model={MODEL}", {"Authorization": f"Bearer {ALICE}"},
                                 f"127.0.0.1:{port}")
    assert b" 101 " in answer.split(b"\r\n")[0]
    sock.sendall(masked(0x1, json.dumps({"type": "fake.flood", "count": 400, "size": 65536}).encode()))
    time.sleep(0.5)  # the proxy's buffer towards the client fills
    chunk = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (1 << 20)}).encode()
    frame = bytes([0x81, 0x80 | 127]) + len(chunk).to_bytes(8, "big") + b"\0\0\0\0" + chunk  # a zero mask
    sock.settimeout(10)
    started = time.monotonic()
    for _ in range(8):
        sock.sendall(frame)
    took = time.monotonic() - started
    sock.close()
    print(f"\n8 MiB sent by a client that had not read its flood yet, in {took:.2f} s")
    assert took < 5

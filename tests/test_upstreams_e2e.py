"""Several upstreams behind one route, end to end: the official openai SDK against `twistd openai-forward` and two
fake upstreams on loopback, one of them broken, slow, or Azure-shaped."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
import time

import httpx2
import openai
import pytest

from tests.support.network import free_port, reserved_port
from tests.support.processes import DaemonProcess, FakeUpstreamProcess

pytestmark = pytest.mark.slow

GOOD_KEY = "sk-upstream-good-00000000000001"
BAD_KEY = "sk-upstream-bad-000000000000001"
TEAM = "fk-upstreams-team-0000000000001"
MESSAGES = [{"role": "user", "content": "which one"}]


def write_config(directory, first: str, second: str, extra_second: str = "") -> None:
    with open(os.path.join(directory, "gateway.toml"), "w") as f:
        f.write(
            f'check_keys = false\n[[route]]\nforward_keys = [{{ key = "{TEAM}", name = "team" }}]\n'
            f'[[route.upstream]]\nbase_url = "{first}"\napi_keys = ["{GOOD_KEY}"]\n'
            f'[[route.upstream]]\nbase_url = "{second}"\napi_keys = ["{BAD_KEY}"]\n{extra_second}'
        )


def health(proxy) -> dict:
    return httpx2.get(proxy.url + "/healthz").json()


def upstream_states(proxy) -> dict:
    return {u["base_url"]: u for u in health(proxy)["routes"][0]["upstreams"]}


async def load(url: str, count: int, concurrency: int = 16) -> list[int]:
    """`count` chat requests, `concurrency` at a time; the statuses."""
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    statuses: list[int] = []
    async with httpx2.AsyncClient(timeout=20) as http:
        async def worker(n):
            for _ in range(n):
                try:
                    answer = await http.post(url + "/v1/chat/completions", json=body,
                                             headers={"authorization": f"Bearer {TEAM}"})
                    statuses.append(answer.status_code)
                except httpx2.HTTPError:
                    statuses.append(0)
        await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))
    return statuses


class ResettingServer:
    """Accepts TCP connections and resets each at once (RST), as a server dying mid-handshake does."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(128)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.accepted = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted += 1
            self.accepted_one(connection)

    def accepted_one(self, connection):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()

    def close(self):
        self.socket.close()


@pytest.fixture(scope="module")
def good():
    with FakeUpstreamProcess() as fake:
        yield fake


@pytest.mark.parametrize("broken", ["refusing", "answering 500", "resetting", "with every key resting"])
def test_with_one_upstream_broken_for_the_whole_run_2000_requests_almost_all_succeed(tmp_path, good, broken):
    good.reset()
    resetting = failing = None
    if broken == "refusing":
        second = f"http://127.0.0.1:{free_port()}"
    elif broken == "resetting":
        resetting = ResettingServer()
        second = resetting.url
    else:
        status = (500, None) if broken == "answering 500" else (429, 60)
        failing = FakeUpstreamProcess(key_status={BAD_KEY: status}).start()
        second = failing.url
    write_config(str(tmp_path), good.url, second)
    try:
        with DaemonProcess(["--config", "gateway.toml"], cwd=str(tmp_path)) as proxy:
            statuses = asyncio.run(load(proxy.url, 2000))
            states = upstream_states(proxy)
            metrics_seen = health(proxy)
            failing_received = failing.received() if failing is not None else []
    finally:
        if resetting is not None:
            resetting.close()
        if failing is not None:
            failing.stop()
    errors = len([s for s in statuses if s != 200])
    print(f"{broken}: {errors} client errors in {len(statuses)} requests")
    assert len(statuses) == 2000 and errors / len(statuses) < 0.001
    if broken == "with every key resting":
        # only the requests already on their way when the first 429 came (16 at once) met the key
        assert states[second]["keys"]["cooling"] == 1 and len(failing_received) <= 16
    else:
        assert states[second]["errors"] >= 1 and states[second]["state"] in ("resting", "trial")
    assert states[good.url]["state"] == "serving" and metrics_seen["status"] == "ok"
    assert len(good.received()) >= 1990


def test_a_slower_upstream_gets_less_traffic(tmp_path, good):
    good.reset()
    with FakeUpstreamProcess(delay=0.2) as slow:
        write_config(str(tmp_path), good.url, slow.url, 'weight = 1\n')
        slow_key_config = (tmp_path / "gateway.toml").read_text().replace(BAD_KEY, GOOD_KEY)
        (tmp_path / "gateway.toml").write_text(slow_key_config)
        with DaemonProcess(["--config", "gateway.toml"], cwd=str(tmp_path)) as proxy:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=TEAM, max_retries=0)
            for _ in range(100):
                reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                assert reply.choices[0].message.content == "echo: which one"
            fast_share = len(good.received()) / 100
            latency = {u["base_url"]: u["latency_ms"] for u in upstream_states(proxy).values()}
        print(f"fast upstream served {fast_share:.0%}; latency seen {latency}")
        assert fast_share >= 0.8 and len(slow.received()) >= 1


def test_a_broken_upstream_is_tried_again_after_its_rest_and_serves_when_it_recovers(tmp_path, good):
    good.reset()
    port = reserved_port()
    second = f"http://127.0.0.1:{port}"
    write_config(str(tmp_path), good.url, second)
    (tmp_path / "gateway.toml").write_text((tmp_path / "gateway.toml").read_text().replace(BAD_KEY, GOOD_KEY))
    with DaemonProcess(["--config", "gateway.toml"], cwd=str(tmp_path)) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=TEAM, max_retries=0)
        for _ in range(10):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert upstream_states(proxy)[second]["state"] in ("resting", "trial")
        assert "answered" in upstream_states(proxy)[second]["why"] or upstream_states(proxy)[second]["why"]
        revived = FakeUpstreamProcess()
        revived.arguments[1] = f"tcp:{port}:interface=127.0.0.1"
        with revived:
            deadline = time.monotonic() + 20
            while not revived.received() and time.monotonic() < deadline:
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                time.sleep(0.05)
            assert revived.received(), "the recovered upstream got a trial request"
            assert upstream_states(proxy)[second]["state"] == "serving"
            for _ in range(40):
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert len(revived.received()) >= 5, "and serves its share again"


def test_an_openai_client_is_served_by_an_azure_deployment(tmp_path, good):
    good.reset()
    with open(tmp_path / "gateway.toml", "w") as f:
        f.write(
            f'check_keys = false\n[[route]]\nforward_keys = [{{ key = "{TEAM}", name = "team" }}]\n'
            f'[[route.upstream]]\nbase_url = "{good.url}"\nkind = "azure"\napi_keys = ["{GOOD_KEY}"]\n'
            'api_version = "2024-10-21"\ndeployments = { "gpt-4o" = "my-gpt4o", "text-embedding-3-small" = "emb", "whisper-1" = "whisper" }\n'
        )
    with DaemonProcess(["--config", "gateway.toml", "--log-chat"], cwd=str(tmp_path)) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=TEAM, max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert reply.choices[0].message.content == "echo: which one"
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: which one"
        vectors = client.embeddings.create(model="text-embedding-3-small", input="words")
        assert len(vectors.data) == 1
        heard = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF0000WAVE", "audio/wav"))
        assert heard.text
        with pytest.raises(openai.NotFoundError) as unserved:
            client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
        assert unserved.value.code == "model_not_found"
    sent = good.received()
    assert [r["uri"] for r in sent] == [
        "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21",
        "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21",
        "/openai/deployments/emb/embeddings?api-version=2024-10-21",
        "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21",
    ]
    for record in sent:
        headers = {n.lower(): v for n, v in record["headers"]}
        assert headers["api-key"] == GOOD_KEY and "authorization" not in headers


def test_models_choose_the_upstream_and_transcripts_and_the_access_log_name_it(tmp_path, good):
    good.reset()
    with FakeUpstreamProcess() as other:
        write_config(str(tmp_path), good.url, other.url, 'models = ["gpt-4o"]\n')
        (tmp_path / "gateway.toml").write_text(
            (tmp_path / "gateway.toml").read_text().replace(
                f'api_keys = ["{GOOD_KEY}"]\n', f'api_keys = ["{GOOD_KEY}"]\nmodels = ["gpt-4o-mini"]\n'))
        with DaemonProcess(["--config", "gateway.toml", "--log-chat"], cwd=str(tmp_path)) as proxy:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=TEAM, max_retries=0)
            for model in ("gpt-4o-mini", "gpt-4o", "gpt-4o-mini"):
                client.chat.completions.create(model=model, messages=MESSAGES)
            log = proxy.wait_for(f"via {other.url}")
        assert len(good.received()) == 2 and len(other.received()) == 1
        assert f"via {good.url}" in log
    chat_log = tmp_path / "Log" / "chat.jsonl"
    deadline = time.monotonic() + 5
    while (not chat_log.exists() or chat_log.read_text().count("\n") < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    records = [json.loads(line) for line in chat_log.read_text().splitlines()]
    assert [r["upstream"] for r in records] == [good.url, other.url, good.url]


def test_a_reload_keeps_the_health_of_upstreams_that_stay(tmp_path, good):
    port = free_port()
    second = f"http://127.0.0.1:{port}"
    write_config(str(tmp_path), good.url, second)
    with DaemonProcess(["--config", "gateway.toml"], cwd=str(tmp_path)) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=TEAM, max_retries=0)
        for _ in range(10):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        before = upstream_states(proxy)[second]
        assert before["errors"] >= 1
        with FakeUpstreamProcess() as third:
            write_config(str(tmp_path), second, third.url)
            proxy.process.send_signal(1)
            proxy.wait_for("reloaded", timeout=10)
            after = upstream_states(proxy)
            assert set(after) == {second, third.url}
            assert after[second]["errors"] == before["errors"], "the surviving upstream kept its state"
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert len(third.received()) == 1, "new requests use the new list"


class SilentServer(ResettingServer):
    """Accepts connections and reads requests but never answers: an upstream that took the request and hangs."""

    def __init__(self):
        self.held = []  # kept open, unanswered
        super().__init__()

    def accepted_one(self, connection):
        self.held.append(connection)


def test_a_post_that_may_have_reached_a_hanging_upstream_is_not_replayed_where_the_route_says_so(tmp_path, good):
    good.reset()
    silent = SilentServer()
    try:
        write_config(str(tmp_path), good.url, silent.url)
        text = (tmp_path / "gateway.toml").read_text().replace(BAD_KEY, GOOD_KEY)
        (tmp_path / "gateway.toml").write_text(text.replace("[[route]]\n", "[[route]]\nretry_post_5xx = false\n"))
        with DaemonProcess(["--config", "gateway.toml", "--timeout", "1"], cwd=str(tmp_path)) as proxy:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=TEAM, max_retries=0, timeout=10)
            outcomes = []
            for _ in range(10):
                began = time.monotonic()
                try:
                    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                    outcomes.append(("ok", time.monotonic() - began))
                except openai.APIStatusError as e:
                    outcomes.append((e.status_code, time.monotonic() - began))
    finally:
        silent.close()
    timed_out = [t for what, t in outcomes if what == 504]
    assert timed_out, f"the hanging upstream was never chosen: {outcomes}"
    assert all(t < 2.5 for t in timed_out), "TIMEOUT bounds the whole wait"
    assert len(good.received()) == len([o for o in outcomes if o[0] == "ok"]), "no POST was sent twice"

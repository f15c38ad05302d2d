"""End to end for issue #4, transcripts: a real twistd with LOG_CHAT on, the fake upstream on loopback, and the
official openai SDK as the client. Every test reads back LOG_DIR/chat.jsonl as written by the daemon."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from fwd.settings import mask
from tests.support.processes import DaemonProcess, twistd_command

pytestmark = pytest.mark.slow

FIELDS = {
    "uid", "time", "client", "caller", "route", "path", "model", "stream", "request", "response", "usage",
    "status", "partial", "error", "latency_ms", "ttfb_ms",
}
CLIENT_KEY = "sk-client-own-key-e2e-0123456789"
POOL_KEY = "sk-pool-key-e2e-abcdefghijklmnop"
FK_PLAIN = "fk-plain-e2e-0123456789abcdef"
FK_NAMED = "fk-named-e2e-fedcba9876543210"


# -- fixtures and helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("translog")


@pytest.fixture(scope="module")
def daemon(upstream, log_dir):
    env = {"OPENAI_BASE_URL": upstream.url, "LOG_CHAT": "true", "LOG_DIR": str(log_dir), "IDLE_TIMEOUT": "1"}
    with DaemonProcess(env=env) as proxy:
        yield proxy


@pytest.fixture
def client(daemon):
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20)


def read_records(directory: Path) -> list[dict]:
    path = directory / "chat.jsonl"
    if not path.exists():
        return []
    # A record being written may be seen half-way: only whole lines count.
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def wait_record(directory: Path, match, timeout: float = 5.0, after: int = 0) -> dict:
    """The one record (from index `after` on) for which match(record) holds, waiting up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in read_records(directory)[after:] if match(r)]
        if found:
            assert len(found) == 1, f"more than one record matched: {found}"
            return found[0]
        assert time.monotonic() < deadline, f"no matching record in {directory}/chat.jsonl: {read_records(directory)}"
        time.sleep(0.02)


def mentions(marker: str):
    """A matcher for the record whose request mentions marker."""
    return lambda record: marker in json.dumps(record.get("request"))


def marker() -> str:
    return "m" + uuid.uuid4().hex[:12]


def assert_complete(record: dict, *, path: str, stream: bool, model: str = "gpt-4o-mini") -> None:
    assert FIELDS <= set(record), FIELDS - set(record)
    assert record["path"] == path
    assert record["stream"] is stream
    assert record["model"] == model
    assert record["status"] == 200
    assert record["partial"] is False
    assert record["error"] is None
    assert record["client"] == "127.0.0.1"
    assert record["caller"] == "own-key"
    assert len(record["uid"]) >= 16
    assert record["time"].endswith("Z")
    assert record["latency_ms"] >= record["ttfb_ms"] >= 0


# -- point 1 and 2: one complete record per exchange, with the right content ----------------------------------


def test_plain_chat_records_the_message_and_usage(client, log_dir):
    m = marker()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hello {m}"}]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages, temperature=0.5)
    record = wait_record(log_dir, mentions(m))
    assert_complete(record, path="/v1/chat/completions", stream=False)
    assert record["request"]["messages"] == messages
    assert record["request"]["temperature"] == 0.5
    assert record["response"]["role"] == "assistant"
    assert record["response"]["content"] == reply.choices[0].message.content == f"echo: hello {m}"
    assert record["response"]["finish_reason"] == "stop"
    assert record["usage"] == reply.usage.model_dump(exclude_none=True)


def test_streamed_chat_records_what_the_client_assembled_and_the_usage(client, log_dir):
    m = marker()
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"one two three four five six {m}"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fake-chunks": "7"},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    record = wait_record(log_dir, mentions(m))
    assert_complete(record, path="/v1/chat/completions", stream=True)
    assert record["response"]["content"] == text == f"echo: one two three four five six {m}"
    assert record["response"]["finish_reason"] == finish == "stop"
    assert usage and record["usage"] == usage


def test_streamed_tool_calls_join_their_arguments_per_index(client, log_dir):
    m = marker()
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"find the thing called {m} please"}],
        tools=tools,
        stream=True,
        extra_headers={"x-fake-chunks": "6"},
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or delta.id
                if delta.function:
                    call["name"] = call["name"] or delta.function.name
                    call["arguments"] += delta.function.arguments or ""
    record = wait_record(log_dir, mentions(m))
    assert_complete(record, path="/v1/chat/completions", stream=True)
    assert record["request"]["tools"] == tools
    recorded = record["response"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in recorded] == [
        (calls[0]["id"], calls[0]["name"], calls[0]["arguments"])
    ]
    assert json.loads(recorded[0]["function"]["arguments"]) == {"text": f"find the thing called {m} please"}
    assert record["response"]["finish_reason"] == finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_record_the_prompt_and_text(client, log_dir, stream):
    m = marker()
    if stream:
        chunks = client.completions.create(
            model="gpt-4o-mini", prompt=f"say {m}", stream=True, stream_options={"include_usage": True}
        )
        text, usage = "", None
        for chunk in chunks:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage.model_dump(exclude_none=True) if chunk.usage else usage
    else:
        reply = client.completions.create(model="gpt-4o-mini", prompt=f"say {m}", max_tokens=7)
        text, usage = reply.choices[0].text, reply.usage.model_dump(exclude_none=True)
    record = wait_record(log_dir, mentions(m))
    assert_complete(record, path="/v1/completions", stream=stream)
    assert record["request"]["prompt"] == f"say {m}"
    assert record["response"]["text"] == text == f"echo: say {m}"
    assert record["response"]["finish_reason"] == "stop"
    assert usage and record["usage"] == usage


def test_responses_api_plain(client, log_dir):
    m = marker()
    reply = client.responses.create(model="gpt-4o-mini", input=f"tell me {m}", instructions="short")
    record = wait_record(log_dir, mentions(m))
    assert_complete(record, path="/v1/responses", stream=False)
    assert record["request"]["input"] == f"tell me {m}"
    assert record["request"]["instructions"] == "short"
    assert record["response"]["content"] == reply.output_text == f"echo: tell me {m}"
    assert record["response"]["finish_reason"] == "completed"
    assert record["usage"] == reply.usage.model_dump(exclude_none=True)


def test_responses_api_streamed(client, log_dir):
    m = marker()
    events = client.responses.create(
        model="gpt-4o-mini", input=[{"role": "user", "content": f"stream me {m} now"}], stream=True
    )
    text, usage = "", None
    for event in events:
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.completed":
            usage = event.response.usage.model_dump(exclude_none=True)
    record = wait_record(log_dir, mentions(m))
    assert_complete(record, path="/v1/responses", stream=True)
    assert record["response"]["content"] == text == f"echo: stream me {m} now"
    assert record["response"]["finish_reason"] == "completed"
    assert usage and record["usage"] == usage


@pytest.mark.parametrize("encoding", ["float", None])
def test_embeddings_record_input_and_usage_but_no_vectors(client, log_dir, encoding):
    """None: the SDK's default, base64 on the wire, decoded by the SDK."""
    m = marker()
    inputs = [f"first {m}", "second text", "third"]
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=inputs, encoding_format=encoding or openai.NOT_GIVEN
    )
    reply, body = raw.parse(), raw.http_response.json()
    assert len(reply.data) == 3 and len(reply.data[0].embedding) == 8
    record = wait_record(log_dir, mentions(m))
    assert_complete(record, path="/v1/embeddings", stream=False, model="text-embedding-3-small")
    assert record["request"]["input"] == inputs
    assert record["request"]["encoding_format"] == (encoding or "base64")
    assert record["usage"] == reply.usage.model_dump(exclude_none=True)
    assert record["response"] == {"count": 3}
    line = json.dumps(record)
    for item in body["data"]:
        vector = item["embedding"]
        if isinstance(vector, str):
            assert vector not in line
        else:
            assert json.dumps(vector) not in line
            assert sum(repr(v) in line for v in vector if v not in (0.0, 0.5, -0.5)) == 0


def test_a_get_on_a_chat_path_makes_no_record(daemon, client, log_dir):
    before = len(read_records(log_dir))
    listing = httpx.get(daemon.url + "/v1/chat/completions?limit=3", headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert listing.status_code == 200
    assert httpx.get(daemon.url + "/v1/responses/resp_1").status_code == 200
    m = marker()
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": m}])
    wait_record(log_dir, mentions(m), after=before)
    new = read_records(log_dir)[before:]
    assert len(new) == 1, new


def test_no_client_key_reaches_the_transcripts(log_dir):
    text = (log_dir / "chat.jsonl").read_text(encoding="utf-8")
    assert text and CLIENT_KEY not in text and "Bearer" not in text


# -- point 3: partial and failed exchanges -------------------------------------------------------------------


def sse_content(raw: bytes) -> str:
    """The chat content assembled from the complete events in raw SSE bytes."""
    text = ""
    for block in raw.split(b"\n\n")[:-1]:
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    return text


def test_client_disconnect_mid_stream_is_a_partial_record_of_what_was_relayed(daemon, upstream, log_dir):
    m = marker()
    before = upstream.disconnects()
    raw = b""
    with httpx.stream(
        "POST",
        daemon.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"a b c d e f g h {m}"}], "stream": True},
        headers={"x-fake-chunks": "9", "x-fake-interval": "0.6"},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        for data in response.iter_raw():
            raw += data
            if raw.count(b"\n\n") >= 2:  # the first write: the role chunk and the first piece
                break
    record = wait_record(log_dir, mentions(m))
    assert record["partial"] is True
    assert record["status"] == 200 and record["stream"] is True
    assert record["error"] == "client disconnected"
    received = sse_content(raw)
    assert received and record["response"]["content"] == received
    assert f"echo: a b c d e f g h {m}".startswith(received) and len(received) < len(f"echo: a b c d e f g h {m}")
    deadline = time.monotonic() + 3
    while upstream.disconnects() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.disconnects() == before + 1


@pytest.mark.parametrize(
    ("fail", "error"), [("reset-mid-stream", "upstream connection lost"), ("hang-mid-stream", "upstream went silent")]
)
def test_upstream_failure_mid_stream_is_a_partial_record_with_an_error(client, log_dir, fail, error):
    m = marker()
    full = f"echo: one two three four five six seven eight {m}"
    text = ""
    started = time.monotonic()
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": full.removeprefix("echo: ")}],
            stream=True,
            extra_headers={"x-fake-fail": fail, "x-fake-chunks": "8"},
        )
        for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
    elapsed = time.monotonic() - started
    record = wait_record(log_dir, mentions(m))
    assert record["partial"] is True
    assert record["status"] == 200
    assert record["error"] == error
    relayed = record["response"]["content"]
    # The record holds what the proxy relayed; the client saw a prefix of it before its stream broke.
    assert relayed and full.startswith(relayed) and relayed != full
    assert relayed.startswith(text)
    if fail == "hang-mid-stream":
        assert 0.9 < elapsed < 4, "IDLE_TIMEOUT=1 ended the silent stream"


@pytest.mark.parametrize(("status", "message"), [(429, "Rate limit reached for requests."), (400, "Bad Request")])
def test_an_upstream_error_status_is_recorded_with_its_error(client, log_dir, status, message):
    m = marker()
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": m}],
            stream=True,
            extra_headers={"x-fake-status": str(status)},
        )
    assert raised.value.status_code == status
    record = wait_record(log_dir, mentions(m))
    assert record["status"] == status
    assert record["error"] == message
    assert record["partial"] is False
    assert record["response"] is None and record["usage"] is None


# -- point 4: malformed bodies, the event stream stays out of the main log, bounded records -------------------


def test_a_malformed_request_body_is_forwarded_byte_exact_and_recorded_as_unparsed(daemon, upstream, log_dir):
    body = b'{"model": \x00\xff garbage \xe2\x82'
    before = len(read_records(log_dir))
    response = httpx.post(
        daemon.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400  # the upstream's own answer, passed through
    assert upstream.received()[-1]["body_base64"] == base64.b64encode(body).decode()
    record = wait_record(log_dir, lambda r: r["path"] == "/v1/chat/completions", after=before)
    assert record["request"] is None
    assert "request body is not JSON" in record["parse_error"]
    assert record["status"] == 400


def test_a_non_json_response_is_relayed_untouched_and_recorded_as_unparsed(daemon, log_dir):
    m = marker()
    response = httpx.post(
        daemon.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": m}]},
        headers={"x-fake-bytes": "3000"},
    )
    assert response.content == (bytes(range(256)) * 12)[:3000]
    record = wait_record(log_dir, mentions(m))
    assert record["status"] == 200 and record["partial"] is False
    assert record["response"] is None
    assert "response body is not JSON" in record["parse_error"]


def test_a_huge_streamed_answer_is_cut_in_the_record_with_a_marker(client, log_dir):
    m = marker()
    word = "abcdefghij "
    content = f"{m} " + word * 110_000  # about 1.2 MB echoed back, above the 1 MiB record cap
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], stream=True,
        extra_headers={"x-fake-chunks": "40"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "echo: " + content
    record = wait_record(log_dir, mentions(m))
    assert record["partial"] is False and record["status"] == 200
    assert record["truncated"] is True
    recorded = record["response"]["content"]
    assert text.startswith(recorded) and len(recorded) == 1_048_576


def test_a_huge_request_is_cut_in_the_record_too(client, log_dir):
    m = marker()
    history = [{"role": "user", "content": f"{m} " + "x" * 1_500_000}, {"role": "assistant", "content": "ok"}]
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[*history, {"role": "user", "content": "y" * 1_000_000}], temperature=0.25
    )
    assert reply.choices[0].message.content == "echo: " + "y" * 1_000_000
    record = wait_record(log_dir, lambda r: r["path"] == "/v1/chat/completions" and m in json.dumps(r["request"])[:100])
    assert len(json.dumps(record, ensure_ascii=False)) < 2 * 1_048_576 + 10_000, "a record holds about 2 x 1 MiB at most"
    assert record["truncated"] is True
    assert record["model"] == "gpt-4o-mini" and record["stream"] is False
    assert record["request"]["model"] == "gpt-4o-mini" and record["request"]["temperature"] == 0.25
    first = record["request"]["messages"][0]
    assert first["role"] == "user" and history[0]["content"].startswith(first["content"]) and len(first["content"]) > 1000


def test_the_main_log_does_not_repeat_transcripts(daemon, client, log_dir):
    m = marker()
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"secret words {m}"}])
    wait_record(log_dir, mentions(m))
    output = daemon.output
    assert "/v1/chat/completions" in output  # the access line is there...
    assert m not in output  # ...but not the transcript
    for record in read_records(log_dir):
        content = (record.get("response") or {}).get("content")
        if isinstance(content, str) and len(content) > 12:
            assert content not in output


# -- forward keys: caller is a name or a short hash, never a key ----------------------------------------------


def writer_pids(daemon_pid: int) -> list[int]:
    """The daemon's transcript writer process(es)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().split(b"\0")
        except OSError:
            continue
        if parent == daemon_pid and b"fwd.transcripts.writer" in command:
            pids.append(int(entry))
    return pids


def test_records_are_built_by_a_writer_process_that_comes_back_if_killed(upstream, tmp_path):
    import signal

    env = {"OPENAI_BASE_URL": upstream.url, "LOG_CHAT": "true", "LOG_DIR": str(tmp_path / "Log")}
    with DaemonProcess(env=env) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20)
        first = marker()
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": first}])
        wait_record(tmp_path / "Log", mentions(first))
        [writer] = writer_pids(proxy.process.pid)
        os.kill(writer, signal.SIGKILL)
        proxy.wait_for("transcript writer exited")
        # Answers keep flowing while the writer is away, and their records are written once it is back.
        markers = [marker() for _ in range(5)]
        for m in markers:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": m}], stream=True)
        for m in markers:
            assert wait_record(tmp_path / "Log", mentions(m))["response"]["content"] == f"echo: {m}"
        [again] = writer_pids(proxy.process.pid)
        assert again != writer
        last = marker()
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": last}])
        os.killpg(proxy.process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, writer included
        proxy.process.wait(timeout=30)
    assert wait_record(tmp_path / "Log", mentions(last))["status"] == 200, "the writer wrote everything first"
    assert len(read_records(tmp_path / "Log")) == 7
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{again}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{again}"), "the writer ends with the daemon"


def test_caller_is_the_forward_keys_configured_name(upstream, tmp_path):
    config = tmp_path / "fwd.toml"
    config.write_text(
        f'[[route]]\nbase_url = "{upstream.url}"\napi_keys = ["{POOL_KEY}"]\n'
        f'forward_keys = [{{ key = "{FK_NAMED}", name = "alice" }}, "{FK_PLAIN}"]\n'
    )
    logs = tmp_path / "logs"
    env = {"LOG_CHAT": "true", "LOG_DIR": str(logs)}
    with DaemonProcess(["--config", str(config)], env=env) as proxy:
        callers = {}
        for key in (FK_NAMED, FK_PLAIN):
            m = marker()
            sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=20)
            stream = sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": m}], stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == f"echo: {m}"
            assert upstream.received()[-1]["key"] == POOL_KEY
            callers[key] = wait_record(logs, mentions(m))["caller"]
    assert callers == {FK_NAMED: "alice", FK_PLAIN: mask(FK_PLAIN)}
    text = (logs / "chat.jsonl").read_text(encoding="utf-8")
    for secret in (FK_NAMED, FK_PLAIN, POOL_KEY):
        assert secret not in text


def test_caller_of_a_plain_forward_key_is_its_masked_form(upstream, tmp_path):
    env = {
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_API_KEY": POOL_KEY,
        "FORWARD_KEY": FK_PLAIN,
        "LOG_CHAT": "true",
        "LOG_DIR": str(tmp_path),
    }
    m = marker()
    with DaemonProcess(env=env) as proxy:
        sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key=FK_PLAIN, max_retries=0, timeout=20)
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": m}])
        record = wait_record(tmp_path, mentions(m))
        output = proxy.output
    assert record["caller"] == mask(FK_PLAIN) and record["status"] == 200
    text = (tmp_path / "chat.jsonl").read_text(encoding="utf-8")
    assert FK_PLAIN not in text and POOL_KEY not in text
    assert FK_PLAIN not in output and POOL_KEY not in output


# -- point 5: an unusable LOG_DIR -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["a-file", "a-file/below", "read-only"])
def test_an_unusable_log_dir_stops_startup_with_one_clear_line(tmp_path, where):
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "read-only").mkdir(mode=0o500)
    if where == "read-only" and os.access(tmp_path / "read-only", os.W_OK):
        pytest.skip("running as root: a mode 0500 directory is still writable")
    result = subprocess.run(
        [*twistd_command(), "-n", "--pidfile=", "openai-forward", "--port", "tcp:0:interface=127.0.0.1"],
        cwd=tmp_path,
        env=DaemonProcess.base_env({"LOG_CHAT": "true", "LOG_DIR": str(tmp_path / where)}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert "LOG_DIR" in output and str(tmp_path / where) in output


# -- point 6: openai-forward convert --------------------------------------------------------------------------

SEED_LOG = """\
{'messages': [{'user': 'hi'}], 'model': 'gpt-3.5-turbo', 'host': '', 'uid': '467a17ec'}
{'assistant': 'Hello! How can I assist you today?', 'uid': '467a17ec'}
{'messages': [{'system': 'Be terse'}, {'user': 'Hello!'}], 'model': 'gpt-4', 'host': '1.2.3.4', 'uid': 'f844d156'}
this line is not a record
{'assistant': 'Hi there!', 'uid': 'f844d156'}
{'messages': [{'user': 'never answered'}], 'model': 'gpt-4', 'host': '', 'uid': 'dead'}
"""


@pytest.mark.parametrize("how", ["module", "console-script"])
def test_convert_turns_a_seed_chat_log_into_jsonl(tmp_path, how):
    command = [sys.executable, "-m", "fwd.cli", "convert"]
    if how == "console-script":
        script = Path(sys.executable).with_name("openai-forward")
        if not script.exists():
            pytest.skip(f"no console script at {script} (fwd is on the path via a .pth, not pip-installed)")
        command = [str(script), "convert"]
    src, dst = tmp_path / "chat.log", tmp_path / "out" / "chat.jsonl"
    src.write_text(SEED_LOG, encoding="utf-8")
    dst.parent.mkdir()
    result = subprocess.run(
        [*command, str(src), str(dst)],
        cwd=tmp_path, env=DaemonProcess.base_env({}), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "converted 2 exchanges, skipped 2"
    rows = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"uid": "467a17ec", "model": "gpt-3.5-turbo", "host": "",
         "messages": [{"role": "user", "content": "hi"}], "assistant": "Hello! How can I assist you today?"},
        {"uid": "f844d156", "model": "gpt-4", "host": "1.2.3.4",
         "messages": [{"role": "system", "content": "Be terse"}, {"role": "user", "content": "Hello!"}],
         "assistant": "Hi there!"},
    ]


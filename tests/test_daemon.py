"""End to end: a real twistd process, the fake upstream on loopback, the official openai SDK as the client."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.support.network import free_port, make_certificate
from tests.support.processes import DaemonProcess, twistd_command

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def daemon(upstream):
    with DaemonProcess(env={"OPENAI_BASE_URL": upstream.url}) as proxy:
        yield proxy


@pytest.fixture
def client(daemon):
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="sk-client-own-key", max_retries=0, timeout=20)


def test_twistd_lists_the_plugin():
    out = subprocess.run([*twistd_command(), "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "openai-forward" in out


def test_the_sdk_lists_models_and_chats_through_the_proxy(client, upstream):
    assert "gpt-4o-mini" in [m.id for m in client.models.list()]
    reply = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}]
    )
    assert reply.headers["x-request-id"].startswith("req_")
    assert reply.headers["x-ratelimit-remaining-requests"]
    assert reply.parse().choices[0].message.content == "echo: ping"
    received = upstream.received()[-1]
    assert received["key"] == "sk-client-own-key"
    host = [v for n, v in received["headers"] if n.lower() == "host"]
    assert host == [upstream.url.removeprefix("http://")]


def test_a_stream_arrives_chunk_by_chunk_as_the_upstream_sends_it(client):
    started = time.monotonic()
    arrivals = []
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        extra_headers={"x-fake-chunks": "5", "x-fake-interval": "0.4"},
    )
    text = ""
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == "echo: one two three four"
    assert arrivals[0] < 1.0, "the first chunk came long before the stream ended"
    assert arrivals[-1] > 1.9


def test_event_streams_pass_byte_for_byte_with_x_accel_buffering_off(daemon, upstream):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body)
    proxied = httpx.post(daemon.url + "/v1/chat/completions", json=body)
    assert proxied.headers["x-accel-buffering"] == "no"
    assert proxied.headers["content-type"] == direct.headers["content-type"]

    def same_apart_from_ids(body: bytes) -> bytes:
        return re.sub(rb'"(id|created)":("[^"]*"|\d+)', b"", body)

    assert same_apart_from_ids(proxied.content) == same_apart_from_ids(direct.content)
    assert proxied.content.endswith(b"data: [DONE]\n\n")


def test_multipart_uploads_arrive_byte_exact(client):
    data = bytes(range(256)) * 2048 + b"\r\n--boundary-lookalike\r\n"
    uploaded = client.files.create(file=("batch.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data)
    assert uploaded.model_extra["sha256"] == hashlib.sha256(data).hexdigest()
    audio = bytes(reversed(range(256))) * 512
    transcript = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio))
    assert transcript.model_extra["sha256"] == hashlib.sha256(audio).hexdigest()


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
def test_every_method_and_query_string_reach_the_upstream(daemon, upstream, method):
    path = "/v1/anything/x?b=2&a=%2F%20&c"
    response = httpx.request(method, daemon.url + path, content=b"{}" if method in ("POST", "PUT", "PATCH") else None)
    assert response.status_code == 200
    received = upstream.received()[-1]
    assert (received["method"], received["uri"]) == (method, path)


def test_hop_by_hop_headers_stay_on_their_hop_and_end_to_end_ones_pass(daemon, upstream):
    httpx.get(
        daemon.url + "/v1/models",
        headers={"Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1", "OpenAI-Organization": "org-1", "TE": "trailers"},
    )
    names = {n.lower(): v for n, v in upstream.received()[-1]["headers"]}
    assert names["openai-organization"] == "org-1"
    assert "x-drop-me" not in names and "te" not in names


def test_hop_header_prefix_drops_matching_request_headers(upstream):
    with DaemonProcess(env={"OXY_TARGET": upstream.url, "OXY_HOP_HEADER_PREFIX": "X-SCF"}) as proxy:
        httpx.get(proxy.url + "/v1/models", headers={"X-Scf-Request-Id": "1", "X-Other": "2"})
    names = {n.lower() for n, _ in upstream.received()[-1]["headers"]}
    assert "x-other" in names and "x-scf-request-id" not in names


def test_upstream_errors_pass_through_untouched(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], extra_headers={"x-fake-status": "400"}
        )
    assert raised.value.status_code == 400


def test_an_unreachable_upstream_is_a_502_that_says_what_to_check():
    with DaemonProcess(env={"OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}"}) as proxy:
        response = httpx.get(proxy.url + "/v1/models")
    assert response.status_code == 502
    assert "OPENAI_BASE_URL" in response.json()["error"]["message"]


def test_no_response_headers_within_timeout_is_a_504(upstream):
    with DaemonProcess(env={"OPENAI_BASE_URL": upstream.url, "TIMEOUT": "1"}) as proxy:
        started = time.monotonic()
        response = httpx.get(proxy.url + "/v1/models", headers={"x-fake-fail": "hang-before-headers"}, timeout=10)
        elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert 0.9 < elapsed < 3


def test_an_upstream_reset_mid_stream_breaks_the_clients_stream(client):
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "a b c d e f"}],
            stream=True,
            extra_headers={"x-fake-fail": "reset-mid-stream"},
        )
        for _ in stream:
            pass


def test_a_client_that_disconnects_cancels_its_upstream_request(daemon, upstream):
    before = upstream.disconnects()
    with httpx.stream(
        "POST",
        daemon.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x y z"}], "stream": True},
        headers={"x-fake-chunks": "50", "x-fake-interval": "0.5"},
    ) as response:
        next(response.iter_raw())
    deadline = time.monotonic() + 3
    while upstream.disconnects() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.disconnects() == before + 1


def test_route_prefix_serves_under_it_and_nothing_outside(upstream):
    with DaemonProcess(env={"OPENAI_BASE_URL": upstream.url, "ROUTE_PREFIX": "/openai"}) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/openai/v1", api_key="sk-x", max_retries=0)
        assert client.models.list().data
        outside = httpx.get(proxy.url + "/v1/models")
        with socket.create_connection(("127.0.0.1", proxy.ports[0])) as raw:
            raw.sendall(b"GET /openai/%2e%2e/admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            escaped = raw.recv(4096)
        health = httpx.get(proxy.url + "/healthz").json()
    assert outside.status_code == 404 and outside.json()["error"]["code"] == "not_found"
    assert escaped.startswith(b"HTTP/1.1 400")
    assert health["status"] == "ok" and health["pid"] > 0


def test_tls_and_plain_listeners_at_once(upstream, tmp_path):
    key, cert = make_certificate(tmp_path)
    arguments = [
        "--port", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1",
        "--port", "tcp:0:interface=127.0.0.1",
    ]
    proxy = DaemonProcess(arguments, env={"OPENAI_BASE_URL": upstream.url})
    with proxy.start(expect_ports=2):
        tls_port, plain_port = proxy.ports
        tls = openai.OpenAI(
            base_url=f"https://127.0.0.1:{tls_port}/v1",
            api_key="sk-x",
            http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(cert))),
            max_retries=0,
        )
        stream = tls.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "secure hello"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        plain = httpx.get(f"http://127.0.0.1:{plain_port}/v1/models")
    assert text == "echo: secure hello"
    assert plain.status_code == 200


def get_when_listening(url: str, process: subprocess.Popen | None = None, timeout: float = 15):
    """GET url once the daemon listens (polling for a bounded time), failing early if its process exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"nothing listens at {url}"
            assert process is None or process.poll() is None, "the daemon exited"
            time.sleep(0.1)


def wait_for_file(path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def wait_for_exit(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, "the daemon did not exit"
        time.sleep(0.05)


def test_daemon_mode_with_pidfile_and_logfile_stops_on_sigterm(upstream, tmp_path):
    port = free_port()
    env = DaemonProcess.base_env({"OPENAI_BASE_URL": upstream.url})
    subprocess.run(
        [*twistd_command(), "--pidfile", "fwd.pid", "--logfile", "fwd.log", "openai-forward",
         "--port", f"tcp:{port}:interface=127.0.0.1"],
        cwd=tmp_path, env=env, check=True, timeout=30,
    )
    wait_for_file(tmp_path / "fwd.pid")
    pid = int((tmp_path / "fwd.pid").read_text())
    try:
        response = get_when_listening(f"http://127.0.0.1:{port}/healthz")
        assert response.json()["pid"] == pid
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for_exit(pid)
    assert not (tmp_path / "fwd.pid").exists()
    assert "starting on" in (tmp_path / "fwd.log").read_text()


def test_the_tac_file_serves_the_daemon_configured_from_the_environment(upstream, tmp_path):
    port = free_port()
    env = DaemonProcess.base_env({"OPENAI_BASE_URL": upstream.url, "PORT": str(port)})
    process = subprocess.Popen(
        [*twistd_command(), "-ny", str(ROOT / "fwd.tac"), "--pidfile="],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        models = get_when_listening(f"http://127.0.0.1:{port}/v1/models", process)
        assert models.status_code == 200
    finally:
        process.terminate()
        process.wait(15)


def test_dotenv_in_the_working_directory_configures_the_daemon(upstream, tmp_path):
    (tmp_path / ".env").write_text(f"OPENAI_BASE_URL={upstream.url}\nROUTE_PREFIX=/dotenv\n")
    with DaemonProcess(cwd=str(tmp_path)) as proxy:
        assert httpx.get(proxy.url + "/dotenv/v1/models").status_code == 200


@pytest.mark.parametrize(
    ("arguments", "env", "mentions"),
    [
        (["--port", "tcp:notaport"], {}, "tcp:notaport"),
        ([], {"OPENAI_BASE_URL": "not a url"}, "OPENAI_BASE_URL"),
        ([], {"TIMEOUT": "soon"}, "TIMEOUT"),
        (["--port", "ssl:0:privateKey=/nonexistent/key.pem:certKey=/nonexistent/cert.pem"], {}, "--port"),
    ],
)
def test_a_bad_configuration_stops_startup_with_one_clear_line(tmp_path, arguments, env, mentions):
    result = subprocess.run(
        [*twistd_command(), "-n", "--pidfile=", "openai-forward", *arguments],
        cwd=tmp_path, env=DaemonProcess.base_env(env), capture_output=True, text=True, timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert mentions in output


def test_a_port_in_use_stops_startup_with_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*twistd_command(), "-n", "--pidfile=", "openai-forward", "--port", f"tcp:{port}:interface=127.0.0.1"],
            cwd=tmp_path, env=DaemonProcess.base_env({}), capture_output=True, text=True, timeout=60,
        )
        daemonized = subprocess.run(
            [*twistd_command(), "--pidfile", "fwd.pid", "--logfile", "fwd.log", "openai-forward",
             "--port", f"tcp:{port}:interface=127.0.0.1"],
            cwd=tmp_path, env=DaemonProcess.base_env({}), capture_output=True, text=True, timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if "cannot listen" in line] == [
        line for line in output.splitlines() if "Address already in use" in line
    ]
    assert output.count("cannot listen") == 1
    assert daemonized.returncode != 0
    assert "Address already in use" in daemonized.stderr
    deadline = time.monotonic() + 10  # the daemonized child removes its pid file as it exits, after reporting
    while (tmp_path / "fwd.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (tmp_path / "fwd.pid").exists()

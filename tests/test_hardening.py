"""A hostile client against a real twistd on loopback: what it may send, and what the daemon must hold to.

Each test is one attack, bounded in count and time, with what the user would notice asserted: the answer, the
daemon's memory, disk, descriptors and CPU from /proc, its log.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fwd.settings import mask
from tests.support.network import free_port, make_certificate
from tests.support.processes import DaemonProcess, FakeUpstreamProcess, twistd_command

pytestmark = pytest.mark.slow

POOL_KEY = "sk-hardening-pool-key-000000000001"
FORWARD_KEY = "fk-hardening-forward-key-0000001"
SECRET_MARKER = "sk-QUERY-SECRET-MARKER-0123456789"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes on a fresh connection and read until the daemon closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                if b"\r\n\r\n" in out:
                    head, _, body = out.partition(b"\r\n\r\n")
                    length = re.search(rb"(?i)content-length: (\d+)", head)
                    if length and len(body) >= int(length.group(1)):
                        break
        except (socket.timeout, ConnectionResetError):
            pass
    return out


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstreamProcess() as fake:
        yield fake


# -- 1. decide before reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("refusal", ["ip", "key"])
def test_eight_refused_clients_sending_100_mb_each_cost_no_disk_and_no_memory(upstream, tmp_path, refusal):
    spool = tmp_path / "tmp"
    spool.mkdir()
    env = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": POOL_KEY, "FORWARD_KEY": FORWARD_KEY,
           "TMPDIR": str(spool)}
    if refusal == "ip":
        env["IP_WHITELIST"] = "10.0.0.0/8"
    with DaemonProcess(env=env) as proxy:
        pid, port = proxy.process.pid, proxy.ports[0]
        raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        before = rss_kb(pid)
        answers = []
        totals: list[int] = []

        def attack():
            size = 100 * 1024 * 1024
            head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Authorization: Bearer fk-not-a-key\r\nContent-Length: %d\r\n\r\n" % size)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(head)
                sent = 0
                block = b"x" * 65536
                try:
                    while sent < size:
                        s.sendall(block)
                        sent += len(block)
                except OSError:
                    pass
                totals.append(sent)
                try:
                    answers.append(s.recv(4096))
                except OSError:
                    answers.append(b"")

        threads = [threading.Thread(target=attack) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        grown = rss_kb(pid) - before
        print(f"\n8 refused clients ({refusal}) sent {sum(totals) / 2**20:.0f} MB: RSS +{grown / 1024:.1f} MB, "
              f"{disk_bytes(spool) / 2**20:.1f} MB on disk")
        assert grown < 5 * 1024, f"RSS grew {grown} KB"
        assert disk_bytes(spool) < 5 * 1024 * 1024
        expected = 403 if refusal == "ip" else 401
        assert any(status_of(a) == expected for a in answers), answers[:2]
    assert upstream.received() == [] or all(r["uri"] != "/v1/chat/completions" for r in upstream.received())


def test_a_request_body_that_stops_moving_is_answered_408(upstream):
    with DaemonProcess(env={"OPENAI_BASE_URL": upstream.url, "BODY_TIMEOUT": "1"}) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.ports[0]), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
            started = time.monotonic()
            data = s.recv(4096)
            waited = time.monotonic() - started
        assert status_of(data) == 408 and b"request_timeout" in data
        assert 0.8 < waited < 5


# -- 2. deadlines: a client that never reads ---------------------------------------------------------------------


def test_a_client_that_never_reads_its_stream_is_cut_after_the_idle_timeout_and_costs_no_cpu_meanwhile(upstream):
    with DaemonProcess(env={"OPENAI_BASE_URL": upstream.url, "IDLE_TIMEOUT": "3"}) as proxy:
        pid = proxy.process.pid
        s = socket.create_connection(("127.0.0.1", proxy.ports[0]), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /v1/big HTTP/1.1\r\nHost: x\r\nx-fake-bytes: 500000000\r\n\r\n")
        time.sleep(0.5)
        start = cpu_seconds(pid)
        time.sleep(2)
        assert cpu_seconds(pid) - start < 0.05 * 2, "waiting on a client that does not read must cost nothing"
        rss = rss_kb(pid)
        deadline = time.monotonic() + 10
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                s.settimeout(0.2)
                if s.recv(1 << 20) == b"":
                    closed = True
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed = True
            time.sleep(0.3)  # read slowly: just enough to notice the end
        s.close()
        assert closed, "the stalled client was never disconnected"
        assert rss_kb(pid) < rss + 10 * 1024
        assert "read nothing for 3 s; disconnecting it" in proxy.output


# -- 3. bounded resources ------------------------------------------------------------------------------------------


def test_running_out_of_descriptors_recovers_by_itself_as_connections_close(upstream, tmp_path):
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    env = DaemonProcess.base_env({"OPENAI_BASE_URL": upstream.url})
    process = subprocess.Popen(
        [*twistd_command(), "-n", "--pidfile=", "openai-forward", "--port", f"tcp:{(port := free_port())}:interface=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, preexec_fn=low_limit,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        held = []
        for _ in range(120):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        start = cpu_seconds(process.pid)
        time.sleep(1.5)
        assert cpu_seconds(process.pid) - start < 0.3, "out of descriptors, the daemon must not spin"
        for s in held:
            s.close()
        time.sleep(0.5)
        answer = raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 200, "serving again once connections closed"
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0].decode()
    assert "open file limit 64 (was 64)" in output


# -- 5. any byte in, a clean answer out ----------------------------------------------------------------------------


def sweep_requests() -> list[tuple[str, int, bytes]]:
    """One request per byte value in each place a client controls."""
    requests = []
    for b in range(256):
        byte = bytes([b])
        query = b"?api-key=" + SECRET_MARKER.encode() + b"&x=" + byte
        requests += [
            ("method", b, b"GE" + byte + b" /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("target", b, b"GET /v1/mod" + byte + b"els" + query + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("query", b, b"GET /v1/models" + query + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("header name", b, b"GET /v1/models" + query + b" HTTP/1.1\r\nHost: x\r\nX-N" + byte + b"me: v\r\n\r\n"),
            ("header value", b, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Secret: " + SECRET_MARKER.encode() + byte
             + b"v\r\n\r\n"),
        ]
    return requests


def test_every_byte_in_every_place_gets_a_forward_or_a_json_400_an_access_line_and_leaves_nothing_in_flight(upstream):
    requests = sweep_requests()
    with DaemonProcess(env={"OPENAI_BASE_URL": upstream.url}) as proxy:
        port = proxy.ports[0]
        outcomes = {}
        for place, byte, data in requests:
            answer = raw(port, data)
            status = status_of(answer)
            assert status in (200, 400, 404), (place, byte, answer[:200])
            if status != 200:
                body = answer.partition(b"\r\n\r\n")[2]
                assert json.loads(body)["error"]["type"] == "invalid_request_error", (place, byte)
            outcomes.setdefault(place, set()).add(status)
        health = json.loads(raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").partition(b"\r\n\r\n")[2])
        assert health["in_flight"] == 0
        log = proxy.output
    assert "Traceback" not in log
    assert SECRET_MARKER not in log, "a query string or a header value reached the log"
    access_lines = [line for line in log.splitlines() if "[fwd.access#info]" in line]
    assert len(access_lines) >= len(requests), "every request is access-logged"
    assert outcomes["query"] == {200, 400} and 400 in outcomes["method"]


# -- 6. nothing secret leaves ----------------------------------------------------------------------------------------


def test_an_upstream_error_that_quotes_the_pool_key_reaches_client_and_transcript_masked(upstream, tmp_path):
    env = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": POOL_KEY, "FORWARD_KEY": FORWARD_KEY,
           "LOG_CHAT": "true", "LOG_DIR": str(tmp_path / "Log")}
    with DaemonProcess(env=env) as proxy:
        body = b'{"model": "gpt-4o-mini", "messages": []}'
        answer = raw(proxy.ports[0], b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + FORWARD_KEY.encode() + b"\r\nx-fake-status: 400\r\nx-fake-echo-key: 1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert status_of(answer) == 400
        assert POOL_KEY.encode() not in answer and mask(POOL_KEY).encode() in answer
        deadline = time.monotonic() + 10
        records = tmp_path / "Log" / "chat.jsonl"
        while time.monotonic() < deadline and not (records.exists() and records.read_text().strip()):
            time.sleep(0.1)
        text = records.read_text()
        assert mask(POOL_KEY) in text and POOL_KEY not in text


def test_healthz_obeys_the_ip_lists_and_shows_no_credentials(upstream):
    with DaemonProcess(env={"OPENAI_BASE_URL": upstream.url, "IP_BLACKLIST": "127.0.0.1"}) as proxy:
        answer = raw(proxy.ports[0], b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 403 and b"ip_denied" in answer


def test_a_base_url_with_a_password_stops_startup_without_echoing_it(tmp_path):
    result = subprocess.run(
        [*twistd_command(), "-n", "--pidfile=", "openai-forward"],
        env=DaemonProcess.base_env({"OPENAI_BASE_URL": "https://user:hunter2-secret@api.example.com"}),
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "user name or password" in output
    assert "hunter2" not in output


# -- 7. response hygiene -------------------------------------------------------------------------------------------


class RawUpstream:
    """An upstream that answers every request with the same raw bytes."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(self.answer)

    def close(self):
        self.sock.close()


def test_headers_the_upstream_names_in_connection_and_cr_lf_nul_in_its_answer_never_reach_the_client():
    upstream = RawUpstream(
        b"HTTP/1.1 200 OK\rInjected: yes\r\nConnection: keep-alive, X-Hop\r\nX-Hop: upstream-internal\r\n"
        b"X-Nul: a\x00b\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    try:
        with DaemonProcess(env={"OPENAI_BASE_URL": upstream.url}) as proxy:
            answer = raw(proxy.ports[0], b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        upstream.close()
    head = answer.partition(b"\r\n\r\n")[0]
    assert status_of(answer) == 200
    assert b"x-hop" not in head.lower()
    assert b"\x00" not in head and b"\rInjected" not in head
    assert all(line.count(b"\r") == 0 for line in head.split(b"\r\n"))


# -- 8. workers survive a bad reload -------------------------------------------------------------------------------


def test_a_worker_started_after_a_refused_reload_serves_the_last_good_configuration(upstream, tmp_path):
    config = tmp_path / "fwd.toml"
    config.write_text(f'[[route]]\nprefix = "/good"\nbase_url = "{upstream.url}"\n')
    with DaemonProcess(["--workers", "2", "--config", str(config)], cwd=str(tmp_path)) as proxy:
        port = proxy.ports[0]
        assert status_of(raw(port, b"GET /good/v1/models HTTP/1.1\r\nHost: x\r\n\r\n")) == 200
        config.write_text("[[route]\nthis is not toml")
        os.kill(proxy.process.pid, 1)
        proxy.wait_for("reload refused", timeout=10)
        pids = {json.loads(raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").partition(b"\r\n\r\n")[2])["pid"]
                for _ in range(20)}
        for pid in pids:
            os.kill(pid, 9)
        deadline = time.monotonic() + 20
        served = False
        while time.monotonic() < deadline and not served:
            try:
                served = status_of(raw(port, b"GET /good/v1/models HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2)) == 200
            except OSError:
                pass
            time.sleep(0.2)
        assert served, "after a refused reload and dead workers, new workers serve the last good configuration"


# -- 9. TLS worth its name -----------------------------------------------------------------------------------------


def test_tls_offers_forward_secret_aead_suites_only_and_refuses_static_rsa_and_cbc(upstream, tmp_path):
    key, cert = make_certificate(tmp_path)
    port = free_port()
    endpoint = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    with DaemonProcess(["--port", endpoint], env={"OPENAI_BASE_URL": upstream.url}):
        def handshake(ciphers: str, version=ssl.TLSVersion.TLSv1_2, maximum=ssl.TLSVersion.TLSv1_2):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.minimum_version = version
            context.maximum_version = maximum
            context.set_ciphers(ciphers)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                with context.wrap_socket(s) as tls:
                    return tls.cipher()[0]

        assert "GCM" in handshake("ECDHE+AESGCM")
        for weak in ("AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256"):
            with pytest.raises(ssl.SSLError):
                handshake(weak)
        with pytest.raises(ssl.SSLError):
            handshake("DEFAULT:@SECLEVEL=0", ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1)
        assert handshake("DEFAULT", ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)


# -- 4. model allow-lists hold, and their check never stalls the reactor ------------------------------------------

LIMITED_KEY = "fk-hardening-limited-0000000001"


def limited_daemon(upstream, tmp_path, *arguments) -> DaemonProcess:
    config = tmp_path / "limited.toml"
    config.write_text(
        f'[[route]]\nbase_url = "{upstream.url}"\napi_keys = ["{POOL_KEY}"]\n'
        f'forward_keys = [{{ key = "{LIMITED_KEY}", name = "limited", models = ["gpt-4o-mini"] }}, "{FORWARD_KEY}"]\n'
    )
    return DaemonProcess(["--config", str(config), *arguments], env={"CHECK_KEYS": "false"})


def test_a_limited_key_is_held_to_its_models_through_the_sdk_and_every_way_around_it_is_refused(upstream, tmp_path):
    import openai

    with limited_daemon(upstream, tmp_path) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=LIMITED_KEY, max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "echo: hi"
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.body["code"] == "model_not_allowed" and "'gpt-4o'" in refused.value.body["message"]
        with pytest.raises(openai.PermissionDeniedError):
            client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF....WAVE"))
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.batches.create(input_file_id="file-1", endpoint="/v1/chat/completions", completion_window="24h")
        assert "batches" in refused.value.body["message"].lower()
        assert [m.id for m in client.models.list()], "reading names no model and is allowed"

        def post(path: bytes, body: bytes, ctype: bytes = b"application/json") -> int:
            return status_of(raw(proxy.ports[0], b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                 + LIMITED_KEY.encode() + b"\r\nContent-Type: " + ctype
                                 + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))

        upstream.reset()
        tricks = [
            (b"/v1/chat/completions", b'{"model": "gpt-4o-mini", "model": "gpt-4o"}', b"application/json"),
            (b"/v1/chat/completions", b'{"model": "gpt-4o-mini", "Mod\\u0065l": "gpt-4o"}', b"application/json"),
            (b"/openai/Deployments/gpt-4o/chat/completions", b'{"messages": []}', b"application/json"),
            (b"/openai/%64eployments/gpt-4o/chat/completions", b'{"messages": []}', b"application/json"),
            (b"/v1/audio/transcriptions",
             b'--a\r\nContent-Disposition: form-data; name = "model"\r\n\r\ngpt-4o\r\n--a--\r\n',
             b"multipart/form-data; boundary=a"),
            (b"/v1/audio/transcriptions",
             b'--a\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-mini\r\n--a--\r\n',
             b"multipart/form-data; boundary=a; boundary=b"),
            (b"/v1/audio/transcriptions",
             b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o\r\n--b--\r\n',
             b"multipart/form-data; boundary=a; xboundary=b"),
            (b"/v1/images/generations", b'{"prompt": "a cat"}', b"application/json"),
        ]
        for path, body, ctype in tricks:
            assert post(path, body, ctype) == 403, (path, body, ctype)
        assert upstream.received() == [], "no trick reached the upstream"


def test_a_10_mb_body_of_three_million_objects_never_stalls_another_clients_stream(upstream, tmp_path):
    body = b'{"messages": [' + b",".join([b"{}"] * 3_000_000) + b'], "model": "gpt-4o"}'
    with limited_daemon(upstream, tmp_path, "--max-body-size", "20M") as proxy:
        pid, port = proxy.process.pid, proxy.ports[0]
        raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        baseline = rss_kb(pid)
        peak = [baseline]
        arrivals: list[float] = []
        done = threading.Event()

        def stream():
            chat = b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "tick"}]}'
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + FORWARD_KEY.encode()
                          + b"\r\nx-fake-chunks: 150\r\nx-fake-interval: 0.02\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(chat), chat))
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    arrivals.append(time.monotonic())
                    if b"[DONE]" in data:
                        break

        def sample():
            while not done.wait(0.02):
                peak[0] = max(peak[0], rss_kb(pid))

        watcher = threading.Thread(target=sample)
        streamer = threading.Thread(target=stream)
        watcher.start()
        streamer.start()
        time.sleep(0.5)
        started = time.monotonic()
        answer = raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + LIMITED_KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body, timeout=30)
        checked = time.monotonic()
        streamer.join(30)
        done.set()
        watcher.join()
    assert status_of(answer) == 403 and b"'gpt-4o'" in answer
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if started <= a <= checked]
    assert during, "the stream ran while the body was checked"
    print(f"\n10 MB adversarial body: longest gap in another client's stream {max(during) * 1000:.0f} ms, "
          f"RSS +{(peak[0] - baseline) / 1024:.0f} MB")
    assert max(during) < 0.1, f"another client's stream stalled {max(during) * 1000:.0f} ms"
    assert (peak[0] - baseline) * 1024 < 3 * len(body), f"RSS grew {(peak[0] - baseline) / 1024:.0f} MB"


# -- 10. the transcript writer stays bounded -----------------------------------------------------------------------


def writer_pid(daemon_pid: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read()
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == daemon_pid and b"fwd.transcripts.writer" in command:
                return int(entry)
    raise AssertionError("no transcript writer")


def peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def test_the_transcript_writer_stays_within_a_few_record_limits_whatever_the_body_size(upstream, tmp_path):
    env = {"OPENAI_BASE_URL": upstream.url, "LOG_CHAT": "true", "LOG_DIR": str(tmp_path / "Log"),
           "MAX_BODY_SIZE": "100M"}
    with DaemonProcess(env=env) as proxy:
        port = proxy.ports[0]
        small = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "warm"}]}'
        raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(small), small))
        records = tmp_path / "Log" / "chat.jsonl"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (records.exists() and records.read_text()):
            time.sleep(0.1)
        writer = writer_pid(proxy.process.pid)
        before = peak_kb(writer)
        body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + b"x" * 72_000_000 + b'"}]}'
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body))
            s.sendall(body)
            received = 0
            s.settimeout(60)
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
                if received > len(body):
                    break
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and records.read_text().count("\n") < 2:
            time.sleep(0.2)
        lines = records.read_text().splitlines()
        assert len(lines) == 2 and json.loads(lines[1])["truncated"] is True
        grown = peak_kb(writer) - before
    print(f"\ntranscript writer: peak +{grown / 1024:.1f} MB for a 72 MB body")
    assert grown < 8 * 1024, f"the writer grew {grown / 1024:.0f} MB for a 72 MB body"

"""`--workers N` end to end: several processes serve one port, a dead one comes back, one log and one chat.jsonl."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx2 as httpx
import openai
import pytest

from tests.support.processes import DaemonProcess

pytestmark = pytest.mark.slow


def serving_pids(url: str, count: int = 40, **client) -> set[int]:
    """The pids that answer /healthz over fresh connections (`client`: httpx.Client options, for TLS or a UNIX
    socket)."""
    with httpx.Client(**client) as http:
        return {http.get(url + "/healthz", headers={"Connection": "close"}).json()["pid"] for _ in range(count)}


def wait_until(predicate, timeout: float = 10.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_share_the_port_and_a_dead_worker_is_replaced(upstream, tmp_path):
    env = {"OPENAI_BASE_URL": upstream.url, "LOG_CHAT": "true", "LOG_DIR": str(tmp_path / "Log")}
    with DaemonProcess(["--workers", "2"], env=env) as proxy:
        pids = wait_until(lambda: len(serving_pids(proxy.url)) == 2 and serving_pids(proxy.url))
        assert len(pids) == 2, "both workers answer on the one port"
        assert proxy.process.pid not in pids, "the supervisor itself does not serve"

        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-own", max_retries=0)
        for n in range(4):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {n}"}])

        chat_log = tmp_path / "Log" / "chat.jsonl"
        records = wait_until(lambda: chat_log.exists() and chat_log.read_text().count("\n") >= 4 and chat_log)
        assert records, "every worker's transcripts land in the one chat.jsonl"
        contents = sorted(json.loads(line)["response"]["content"] for line in chat_log.read_text().splitlines())
        assert contents == [f"echo: hi {n}" for n in range(4)]

        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        replaced = wait_until(lambda: (now := serving_pids(proxy.url, 20)) and victim not in now and len(now) == 2 and now)
        assert replaced and victim not in replaced and len(replaced) == 2
        log = proxy.wait_for("exited")
        assert "starting it again" in log
        assert "POST /v1/chat/completions 200" in log, "workers' access lines reach the supervisor's log"
        workers = serving_pids(proxy.url)
    assert wait_until(lambda: not any(alive(pid) for pid in workers), timeout=15), "SIGTERM stops every worker"


def test_connections_opened_at_once_are_spread_over_the_workers(upstream):
    # Workers sharing one socket took such a burst 31 to 1; with a socket each the kernel spreads them.
    import http.client

    with DaemonProcess(["--workers", "2"], env={"OPENAI_BASE_URL": upstream.url}) as proxy:
        wait_until(lambda: len(serving_pids(proxy.url)) == 2)
        for _ in range(3):
            connections = [http.client.HTTPConnection("127.0.0.1", proxy.ports[0], timeout=10) for _ in range(32)]
            for connection in connections:
                connection.connect()
            served: dict[int, int] = {}
            for connection in connections:
                connection.request("GET", "/healthz")
                pid = json.loads(connection.getresponse().read())["pid"]
                served[pid] = served.get(pid, 0) + 1
            for connection in connections:
                connection.close()
            assert len(served) == 2 and min(served.values()) >= 6, served


def test_a_worker_told_twice_to_stop_stops_once_without_an_error(upstream):
    # systemd (and `timeout`, and Ctrl-C) signal the whole process group: a worker gets the supervisor's
    # SIGTERM and its own, the second while it drains.
    import http.client

    with DaemonProcess(["--workers", "2"], env={"OPENAI_BASE_URL": upstream.url}) as proxy:
        wait_until(lambda: len(serving_pids(proxy.url)) == 2)
        held = http.client.HTTPConnection("127.0.0.1", proxy.ports[0], timeout=10)
        held.request("GET", "/healthz")
        victim = json.loads(held.getresponse().read())["pid"]
        body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        held.request("POST", "/v1/chat/completions", body=body, headers={
            "Authorization": "Bearer sk-own", "Content-Type": "application/json",
            "x-fake-chunks": "3", "x-fake-interval": "0.5"})
        stream = held.getresponse()  # under way on the victim, which drains it before it stops
        os.kill(victim, signal.SIGTERM)
        time.sleep(0.2)  # two signals sent at once are delivered as one
        os.kill(victim, signal.SIGTERM)
        assert stream.read().endswith(b"data: [DONE]\n\n"), "the stream under way ends whole"
        held.close()
        assert wait_until(lambda: not alive(victim)), "the worker stopped"
        log = proxy.wait_for("starting it again")
        assert "ReactorNotRunning" not in log and "critical" not in log, log


def test_tls_and_plain_ports_each_give_every_worker_a_socket_and_a_unix_socket_is_shared(upstream, tmp_path):
    import ssl

    from tests.support.network import make_certificate

    key, cert = make_certificate(tmp_path)
    unix = tmp_path / "fwd.sock"
    arguments = ["--workers", "2", "--port", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1",
                 "--port", "tcp:0:interface=127.0.0.1", "--port", f"unix:{unix}"]
    with DaemonProcess(arguments, env={"OPENAI_BASE_URL": upstream.url}).start(expect_ports=2) as proxy:
        tls_port, plain_port = proxy.ports[:2]
        assert "2 sockets of ssl:0" in proxy.output and "2 sockets of tcp:0" in proxy.output
        context = ssl.create_default_context(cafile=str(cert))
        assert wait_until(lambda: len(serving_pids(f"https://127.0.0.1:{tls_port}", verify=context)) == 2), "TLS"
        assert wait_until(lambda: len(serving_pids(f"http://127.0.0.1:{plain_port}")) == 2), "plain TCP"
        assert wait_until(lambda: len(serving_pids("http://fwd", transport=httpx.HTTPTransport(uds=str(unix)))) == 2), \
            "the UNIX socket"


def test_each_worker_reloads_on_sighup_sent_to_the_supervisor(upstream, tmp_path):
    (tmp_path / ".env").write_text("FORWARD_KEY=fk-before01\nOPENAI_API_KEY=sk-pool-0001\n")
    with DaemonProcess(["--workers", "2"], env={"OPENAI_BASE_URL": upstream.url}, cwd=str(tmp_path)) as proxy:
        wait_until(lambda: len(serving_pids(proxy.url)) == 2)

        def status(key: str) -> set[int]:
            return {
                httpx.get(proxy.url + "/v1/models", headers={"Authorization": f"Bearer {key}", "Connection": "close"}).status_code
                for _ in range(12)
            }

        assert status("fk-before01") == {200}
        (tmp_path / ".env").write_text("FORWARD_KEY=fk-after0002\nOPENAI_API_KEY=sk-pool-0001\n")
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: status("fk-after0002") == {200} and status("fk-before01") == {401})


def test_workers_auto_starts_one_worker_per_available_core(upstream):
    import os

    cores = len(os.sched_getaffinity(0))
    with DaemonProcess(["--workers", "auto"], env={"OPENAI_BASE_URL": upstream.url}) as proxy:
        if cores == 1:
            assert serving_pids(proxy.url) == {proxy.process.pid}
            return
        pids = wait_until(lambda: len(serving_pids(proxy.url)) == cores and serving_pids(proxy.url))
        assert pids and len(pids) == cores and proxy.process.pid not in pids

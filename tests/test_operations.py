"""Running the daemon in production (issue #6): /healthz, Prometheus metrics, the access log, SIGHUP reload,
graceful SIGTERM, HTTP/2 over TLS and `openai-forward run`.

Pure logic is driven in memory (a task.Clock, tests.harness.MemoryProxy); the rest against a real twistd and the
fake upstream subprocess on loopback.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from fwd import config as configuration
from fwd.daemon import serving_reloader
from fwd.lifecycle import Drain, Reloader
from fwd.metrics import Metrics
from fwd.settings import mask
from tests.support.memory import MemoryProxy, make_config, split_response
from tests.support.network import free_port, make_certificate
from tests.support.processes import DaemonProcess

POOL_KEYS = ("sk-ops-pool-key-aaaa1111", "sk-ops-pool-key-bbbb2222")
FORWARD_KEY = "fk-ops-forward-key-cccc3333"
SECRETS = (*POOL_KEYS, FORWARD_KEY)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def chat_body(stream: bool = False, text: str = "one two three four") -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "stream": stream}
    return json.dumps(body).encode()


def result(d: defer.Deferred):
    """The result of a Deferred that must already have fired."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def fetch(proxy: MemoryProxy, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """Status and body of one in-memory request."""
    d = proxy.client.request(method, "http://proxy.test" + path, data=body, headers=headers or {})
    proxy.flush()
    response = result(d)
    d = response.content()
    proxy.flush()
    return response.code, result(d)


def start_stream(proxy: MemoryProxy, headers: dict):
    """Start an in-memory streamed chat; returns the chunks received so far (a growing list) and its end."""
    headers = {"x-fake-interval": "1", **headers}
    d = proxy.client.post("http://proxy.test/v1/chat/completions", data=chat_body(stream=True), headers=headers)
    proxy.flush()
    response = result(d)
    received: list[bytes] = []
    finished = response.collect(received.append)
    proxy.flush()
    return received, finished


@pytest.fixture
def logged():
    """Every log event published while the test runs."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def messages(events: list[dict], namespace: str) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == namespace]


def samples(exposition: bytes | str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(exposition, name: str, **labels) -> float:
    return samples(exposition).get((name, tuple(sorted(labels.items()))), 0.0)


def access_event(**fields) -> dict:
    event = {"log_namespace": "fwd.access", "route": "/", "method": "GET", "status": 200, "duration_ms": 1.0,
             "ttfb_ms": None, "upstream": False}
    event.update(fields)
    return event


def same_apart_from_ids(body: bytes) -> bytes:
    return re.sub(rb'"(id|created)":("[^"]*"|\d+)', b"", body)


def wait_until(condition, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class BackgroundStream:
    """A streamed chat read on a thread, as a slow SDK user would: keeps every byte and when it arrived."""

    def __init__(self, url: str, headers: dict, text: str = "one two three four", client: httpx.Client | None = None):
        self.url, self.headers, self.text = url, headers, text
        self.client = client
        self.body = b""
        self.arrivals: list[float] = []
        self.error: Exception | None = None
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        client = self.client or httpx.Client(timeout=30)
        headers = {"content-type": "application/json", **self.headers}
        try:
            with client.stream("POST", self.url, content=chat_body(True, self.text), headers=headers) as response:
                self.status = response.status_code
                self.http_version = response.http_version
                for chunk in response.iter_raw():
                    self.body += chunk
                    self.arrivals.append(time.monotonic())
        except Exception as e:  # the test looks at it
            self.error = e
        finally:
            self.ended_at = time.monotonic()
            if self.client is None:
                client.close()

    def wait_for_first_chunk(self, timeout: float = 5.0):
        wait_until(lambda: self.arrivals or self.error, timeout, "the first chunk")
        assert self.error is None, self.error

    def join(self, timeout: float = 15.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream never ended"


# ---------------------------------------------------------------------------------------------------------------
# metrics, in memory


def test_metrics_count_requests_by_route_method_and_status():
    metrics = Metrics()
    metrics(access_event(route="/openai", method="POST", status=200, upstream=True, ttfb_ms=5.0))
    metrics(access_event(route="/openai", method="POST", status=200, upstream=True, ttfb_ms=5.0))
    metrics(access_event(route="-", method="GET", status=401))
    metrics(access_event(route="/openai", method="BREW", status=405, upstream=True))
    metrics({"log_namespace": "fwd.forward", "route": "/openai", "method": "POST", "status": 200})
    out = metrics.exposition()
    assert sample(out, "fwd_requests_total", route="/openai", method="POST", status="200") == 2
    assert sample(out, "fwd_requests_total", route="-", method="GET", status="401") == 1
    assert sample(out, "fwd_requests_total", route="/openai", method="OTHER", status="405") == 1, "odd methods pooled"
    assert sum(v for (name, _), v in samples(out).items() if name == "fwd_requests_total") == 4, "other logs ignored"


def test_upstream_states_and_cache_results_are_metrics_added_up_across_workers():
    status = {"in_flight": 0, "streams": 0, "keys": [], "transcript_write_errors": 0,
              "upstreams": [("/", "http://a.test", "serving", 2, 0, 0.02), ("/", "http://b.test", "resting", 0, 3, None),
                            ("/", "http://a.test", "serving", 1, 1, 0.04)],
              "cache": {"entries": 4, "bytes": 4096}}
    metrics = Metrics(lambda: status)
    metrics(access_event(route="/", upstream=True, cache="HIT", cache_stored=0))
    metrics(access_event(route="/", upstream=True, cache="MISS", cache_stored=900))
    out = metrics.exposition()
    assert sample(out, "fwd_upstream_state", route="/", upstream="http://a.test", state="serving") == 2
    assert sample(out, "fwd_upstream_state", route="/", upstream="http://b.test", state="resting") == 1
    assert sample(out, "fwd_upstream_in_flight", route="/", upstream="http://a.test") == 3
    assert sample(out, "fwd_upstream_errors_total", route="/", upstream="http://b.test") == 3
    assert sample(out, "fwd_upstream_latency_ewma_seconds", route="/", upstream="http://a.test") == pytest.approx(0.03)
    assert sample(out, "fwd_cache_requests_total", route="/", result="HIT") == 1
    assert sample(out, "fwd_cache_stored_bytes_total", route="/") == 900
    assert sample(out, "fwd_cache_entries") == 4 and sample(out, "fwd_cache_bytes") == 4096


def test_upstream_latency_and_ttfb_are_histograms_of_forwarded_requests_only():
    metrics = Metrics()
    metrics(access_event(route="/openai", upstream=True, duration_ms=1500.0, ttfb_ms=200.0))
    metrics(access_event(route="/openai", upstream=True, duration_ms=30.0, ttfb_ms=None, status=502))
    metrics(access_event(route="-", status=404, duration_ms=0.5))
    out = metrics.exposition()
    assert sample(out, "fwd_upstream_latency_seconds_count", route="/openai") == 2
    assert sample(out, "fwd_upstream_latency_seconds_sum", route="/openai") == pytest.approx(1.53)
    assert sample(out, "fwd_upstream_latency_seconds_bucket", route="/openai", le="1.0") == 1
    assert sample(out, "fwd_upstream_latency_seconds_bucket", route="/openai", le="2.5") == 2
    assert sample(out, "fwd_upstream_ttfb_seconds_count", route="/openai") == 1, "no headers, no time to first byte"
    assert sample(out, "fwd_upstream_ttfb_seconds_sum", route="/openai") == pytest.approx(0.2)
    assert sample(out, "fwd_upstream_latency_seconds_count", route="-") == 0, "local answers are not upstream latency"


def test_gauges_show_running_streams_and_key_states_with_masked_keys():
    proxy = MemoryProxy(api_key=" ".join(POOL_KEYS), forward_key=FORWARD_KEY)
    proxy.upstream.key_status[POOL_KEYS[0]] = (401, None)
    metrics = Metrics(lambda: {**proxy.gateway.status(), "transcript_write_errors": 3})
    received, finished = start_stream(proxy, {"authorization": f"Bearer {FORWARD_KEY}", "x-fake-chunks": "3"})
    during = metrics.exposition()
    for _ in range(5):
        proxy.advance(1)
    result(finished)
    after = metrics.exposition()
    assert (sample(during, "fwd_streams_in_flight"), sample(during, "fwd_requests_in_flight")) == (1, 1)
    assert (sample(after, "fwd_streams_in_flight"), sample(after, "fwd_requests_in_flight")) == (0, 0)
    assert sample(after, "fwd_upstream_key_state", route="/", key="sk-…1111", state="disabled") == 1
    assert sample(after, "fwd_upstream_key_state", route="/", key="sk-…2222", state="available") == 1
    assert sample(after, "fwd_transcript_write_errors") == 3
    for secret in SECRETS:
        assert secret.encode() not in after


# ---------------------------------------------------------------------------------------------------------------
# /healthz, in memory


def test_healthz_counts_keys_per_route_and_shows_no_secret():
    proxy = MemoryProxy(api_key=" ".join(POOL_KEYS), forward_key=FORWARD_KEY, route_prefix="/openai")
    proxy.upstream.key_status[POOL_KEYS[0]] = (401, None)
    assert fetch(proxy, "GET", "/openai/v1/models", headers={"authorization": f"Bearer {FORWARD_KEY}"})[0] == 200
    asked = len(proxy.upstream.received)
    status, body = fetch(proxy, "GET", "/healthz")
    health = json.loads(body)
    assert status == 200
    assert health["status"] == "ok" and health["pid"] > 0
    assert (health["in_flight"], health["streams"]) == (0, 0)
    assert health["routes"] == [
        {"prefix": "/openai", "base_url": "http://upstream.test", "kind": "openai",
         "keys": {"available": 1, "cooling": 0, "disabled": 1}}
    ]
    assert len(proxy.upstream.received) == asked, "/healthz is answered locally"
    for secret in SECRETS:
        assert secret.encode() not in body


def test_healthz_says_draining_with_503_once_shutdown_begins():
    proxy = MemoryProxy()
    proxy.gateway.drain()
    status, body = fetch(proxy, "GET", "/healthz")
    assert (status, json.loads(body)["status"]) == (503, "draining")


# ---------------------------------------------------------------------------------------------------------------
# graceful shutdown and reload, in memory on a Clock


def test_shutdown_waits_for_a_running_stream_to_finish(logged):
    proxy = MemoryProxy(grace_period="30")
    received, finished = start_stream(proxy, {"x-fake-chunks": "3"})
    stopped = Drain(proxy.gateway, proxy.site, proxy.clock).stopService()
    proxy.flush()
    assert not stopped.called, "the daemon does not stop while a stream runs"
    for _ in range(5):
        proxy.advance(1)
    result(finished)
    assert b"".join(received).endswith(b"data: [DONE]\n\n")
    assert stopped.called and proxy.clock.seconds() < 30
    assert not any("cutting" in m for m in messages(logged, "fwd.startup"))


def test_shutdown_cuts_what_still_runs_when_the_grace_period_ends(logged):
    proxy = MemoryProxy(grace_period="3")
    received, finished = start_stream(proxy, {"x-fake-chunks": "50"})
    stopped = Drain(proxy.gateway, proxy.site, proxy.clock).stopService()
    proxy.advance(2.9)
    assert not stopped.called
    proxy.advance(0.2)
    assert stopped.called, "the daemon stops once the grace period is over"
    assert any("grace period over: cutting 1 running requests" in m for m in messages(logged, "fwd.startup"))
    assert b"[DONE]" not in b"".join(received)


def reloadable(proxy: MemoryProxy, load) -> Reloader:
    return serving_reloader(proxy.gateway, proxy.root, proxy.site, load)


def test_reload_serves_new_requests_with_the_new_keys_and_forward_keys(logged):
    proxy = MemoryProxy(api_key="sk-old-pool-key-1111", forward_key="fk-old-forward-key-1111")
    new = make_config(api_key="sk-new-pool-key-2222", forward_key="fk-new-forward-key-2222", route_prefix="/v2")
    assert reloadable(proxy, lambda: new).reload() is True
    old_status, _ = fetch(proxy, "GET", "/v2/v1/models", headers={"authorization": "Bearer fk-old-forward-key-1111"})
    new_status, _ = fetch(proxy, "GET", "/v2/v1/models", headers={"authorization": "Bearer fk-new-forward-key-2222"})
    assert (old_status, new_status) == (401, 200)
    assert proxy.upstream.received[-1].key == "sk-new-pool-key-2222"
    assert "reloaded the configuration" in messages(logged, "fwd.startup")


def test_a_stream_running_across_a_reload_finishes_with_its_old_key():
    proxy = MemoryProxy(api_key="sk-old-pool-key-1111", forward_key="fk-old-forward-key-1111")
    received, finished = start_stream(proxy, {"authorization": "Bearer fk-old-forward-key-1111", "x-fake-chunks": "3"})
    new = make_config(api_key="sk-new-pool-key-2222", forward_key="fk-new-forward-key-2222")
    assert not finished.called
    reloadable(proxy, lambda: new).reload()
    for _ in range(5):
        proxy.advance(1)
    result(finished)
    assert b"".join(received).endswith(b"data: [DONE]\n\n")
    assert proxy.upstream.received[-1].key == "sk-old-pool-key-1111"
    assert proxy.gateway.status()["in_flight"] == 0


def test_a_bad_new_configuration_is_refused_and_the_running_one_stays(logged):
    proxy = MemoryProxy(api_key="sk-old-pool-key-1111", forward_key="fk-old-forward-key-1111")

    def broken():
        raise configuration.ConfigError("TIMEOUT in .env='soon' is not a number of seconds, e.g. 30")

    assert reloadable(proxy, broken).reload() is False
    status, _ = fetch(proxy, "GET", "/v1/models", headers={"authorization": "Bearer fk-old-forward-key-1111"})
    assert status == 200
    assert [m for m in messages(logged, "fwd.startup") if m.startswith("reload refused")] == [
        "reload refused, the running configuration stays: TIMEOUT in .env='soon' is not a number of seconds, e.g. 30"
    ]


def test_a_config_file_that_is_not_utf8_is_refused_on_reload(tmp_path, logged):
    path = tmp_path / "fwd.toml"
    path.write_text('[[route]]\nprefix = "/a"\nbase_url = "http://upstream.test"\n')
    load = lambda: configuration.load({}, environ={}, dotenv_path=None, config_file=str(path))  # noqa: E731
    proxy = MemoryProxy(config=load())
    path.write_bytes(b'# caf\xe9 menu\n[[route]]\nprefix = "/b"\nbase_url = "http://upstream.test"\n')
    assert reloadable(proxy, load).reload() is False
    assert any(m.startswith("reload refused") for m in messages(logged, "fwd.startup"))
    assert fetch(proxy, "GET", "/a/v1/models")[0] == 200


def test_settings_that_need_a_restart_keep_their_running_values_on_reload(logged):
    proxy = MemoryProxy(port="tcp:8000", max_body_size="1M")
    new = make_config(port="tcp:9000", metrics_port="tcp:9100", max_body_size="10")
    reloadable(proxy, lambda: new).reload()
    assert proxy.gateway.config.ports == ("tcp:8000",)
    assert proxy.gateway.config.metrics_port is None
    assert any("ports, metrics_port change only on restart" in m for m in messages(logged, "fwd.startup"))
    transport = proxy.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 11\r\n\r\n12345678901")
    assert split_response(transport.value())[0] == 413, "MAX_BODY_SIZE applies at once"


def test_a_reload_does_not_bring_back_a_key_the_upstream_rejected():
    proxy = MemoryProxy(api_key=" ".join(POOL_KEYS))
    proxy.upstream.key_status[POOL_KEYS[0]] = (401, None)
    assert fetch(proxy, "GET", "/v1/models")[0] == 200
    reloadable(proxy, lambda: make_config(api_key=" ".join([*POOL_KEYS, "sk-ops-pool-key-dddd4444"]))).reload()
    assert proxy.gateway.routes["/"].pool.health() == {"available": 2, "cooling": 0, "disabled": 1}


# ---------------------------------------------------------------------------------------------------------------
# the access log, in memory: what the twistd log line is made of


def test_behind_a_trusted_proxy_a_refused_request_is_logged_with_the_real_client(logged):
    proxy = MemoryProxy(api_key=POOL_KEYS[0], forward_key=FORWARD_KEY, trusted_proxies="127.0.0.1")
    headers = {"authorization": "Bearer fk-not-a-known-key-0000", "x-forwarded-for": "203.0.113.7"}
    assert fetch(proxy, "GET", "/v1/models", headers=headers)[0] == 401
    assert fetch(proxy, "GET", "/v1/models", headers={**headers, "authorization": f"Bearer {FORWARD_KEY}"})[0] == 200
    clients = [e["client"] for e in logged if e.get("log_namespace") == "fwd.access"]
    assert clients == ["203.0.113.7", "203.0.113.7"]


def test_a_request_refused_as_too_large_has_an_access_log_line(logged):
    proxy = MemoryProxy(max_body_size="1000")
    transport = proxy.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 5000\r\n\r\n")
    assert split_response(transport.value())[0] == 413
    assert [(e["method"], e["path"], e["status"]) for e in logged if e.get("log_namespace") == "fwd.access"] == [
        ("POST", "/v1/chat/completions", 413)
    ]


# ---------------------------------------------------------------------------------------------------------------
# end to end: a real twistd


@pytest.fixture(scope="module")
def ops(upstream):
    """A daemon as an operator runs it: a prefix, a key pool, a forward key and a metrics listener."""
    env = {
        "OPENAI_BASE_URL": upstream.url,
        "ROUTE_PREFIX": "/openai",
        "OPENAI_API_KEY": " ".join(POOL_KEYS),
        "FORWARD_KEY": FORWARD_KEY,
        "METRICS_PORT": "tcp:0:interface=127.0.0.1",
        "CHECK_KEYS": "false",  # these tests count what reaches the upstream
    }
    proxy = DaemonProcess(env=env)
    proxy.start(expect_ports=2)
    try:
        proxy.metrics_url = "http://127.0.0.1:%s/metrics" % re.search(r"\] Site starting on (\d+)", proxy.output)[1]
        yield proxy
    finally:
        proxy.stop()


FORWARDED = {"authorization": f"Bearer {FORWARD_KEY}"}


class _AnyMilliseconds(str):
    """Equal to any whole number of milliseconds in an access-log line."""

    def __eq__(self, other):
        return isinstance(other, str) and other.isdigit()

    __hash__ = str.__hash__


ANY_MS = _AnyMilliseconds("<ms>")
ACCESS_LINE = re.compile(r"\[fwd\.access#info\] (\S+) (\S+) (\S+) (\d+) (\d+) (\d+)ms (\S+)$", re.M)


def access_lines(proxy: DaemonProcess, path: str, count: int = 1) -> list[tuple]:
    """The access-log lines for `path`, once `count` of them are in the daemon's log."""
    def found():
        lines = [m.groups() for m in ACCESS_LINE.finditer(proxy.output) if m[3] == path]
        return lines if len(lines) >= count else None

    return wait_until(found, 5, f"an access-log line for {path}")


def test_healthz_is_answered_by_the_daemon_with_its_pid_and_routes(ops, upstream):
    asked = len(upstream.received())
    response = httpx.get(ops.url + "/healthz")
    health = response.json()
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert health["status"] == "ok" and health["pid"] == ops.process.pid
    assert health["routes"] == [
        {"prefix": "/openai", "base_url": upstream.url, "kind": "openai",
         "keys": {"available": 2, "cooling": 0, "disabled": 0}}
    ]
    assert len(upstream.received()) == asked
    for secret in SECRETS:
        assert secret not in response.text


def test_the_metrics_listener_counts_real_traffic_without_showing_a_key(ops):
    before = httpx.get(ops.metrics_url).text
    chat = httpx.post(ops.url + "/openai/v1/chat/completions", content=chat_body(), headers=FORWARDED)
    refused = httpx.get(ops.url + "/openai/v1/models", headers={"authorization": "Bearer fk-unknown-key-0000"})
    assert (chat.status_code, refused.status_code) == (200, 401)
    response = httpx.get(ops.metrics_url)
    after = response.text

    def moved(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert response.headers["content-type"].startswith("text/plain")
    assert moved("fwd_requests_total", route="/openai", method="POST", status="200") == 1
    assert moved("fwd_requests_total", route="-", method="GET", status="401") == 1
    assert moved("fwd_upstream_latency_seconds_count", route="/openai") == 1
    assert moved("fwd_upstream_ttfb_seconds_count", route="/openai") == 1
    assert sample(after, "fwd_upstream_key_state", route="/openai", key="sk-…1111", state="available") == 1
    assert sample(after, "fwd_upstream_key_state", route="/openai", key="sk-…2222", state="available") == 1
    assert ("fwd_transcript_write_errors", ()) in samples(after)
    for secret in SECRETS:
        assert secret not in after


def test_the_in_flight_gauges_show_a_stream_while_it_runs(ops):
    def gauges():
        text = httpx.get(ops.metrics_url).text
        return sample(text, "fwd_streams_in_flight"), sample(text, "fwd_requests_in_flight")

    stream = BackgroundStream(ops.url + "/openai/v1/chat/completions",
                              {**FORWARDED, "x-fake-chunks": "5", "x-fake-interval": "0.3"})
    stream.wait_for_first_chunk()
    running = gauges()
    stream.join()
    assert running == (1, 1)
    assert wait_until(lambda: gauges() == (0, 0), 3, "the gauges to drop")


def test_metrics_are_not_served_on_the_public_port(ops, upstream):
    outside = httpx.get(ops.url + "/metrics")
    forwarded = httpx.get(ops.url + "/openai/metrics", headers=FORWARDED)
    assert outside.status_code == 404 and outside.json()["error"]["code"] == "not_found"
    assert forwarded.status_code == 200 and upstream.received()[-1]["uri"] == "/metrics"
    assert "fwd_" not in outside.text and "fwd_" not in forwarded.text


def test_every_request_has_an_access_log_line_without_query_or_keys(ops):
    answered = httpx.get(ops.url + "/openai/v1/models/gpt-4o?api_key=sk-in-the-query-9999&x=1", headers=FORWARDED)
    refused = httpx.get(ops.url + "/openai/v1/models/whoami", headers={"authorization": "Bearer fk-not-known-00000000"})
    missing = httpx.get(ops.url + "/nowhere/v1/models", headers=FORWARDED)
    assert (answered.status_code, refused.status_code, missing.status_code) == (200, 401, 404)
    assert access_lines(ops, "/openai/v1/models/gpt-4o") == [
        ("127.0.0.1", "GET", "/openai/v1/models/gpt-4o", "200", str(len(answered.content)), ANY_MS,
         mask(FORWARD_KEY))
    ]
    assert access_lines(ops, "/openai/v1/models/whoami") == [
        ("127.0.0.1", "GET", "/openai/v1/models/whoami", "401", str(len(refused.content)), ANY_MS, "-")
    ]
    assert access_lines(ops, "/nowhere/v1/models") == [
        ("127.0.0.1", "GET", "/nowhere/v1/models", "404", str(len(missing.content)), ANY_MS, "-")
    ]
    log = ops.output
    for secret in (*SECRETS, "sk-in-the-query-9999", "fk-not-known-00000000"):
        assert secret not in log


# --- SIGHUP -----------------------------------------------------------------------------------------------------


def dotenv(upstream, pool_key: str, forward_key: str) -> str:
    return f"OPENAI_BASE_URL={upstream.url}\nOPENAI_API_KEY={pool_key}\nFORWARD_KEY={forward_key}\n"


def sighup(proxy: DaemonProcess, expect: str) -> None:
    """Send SIGHUP and wait until the daemon logs `expect` once more."""
    seen = proxy.output.count(expect)
    proxy.process.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.output.count(expect) > seen, 5, f"{expect!r} after SIGHUP")


def test_sighup_rereads_dotenv_while_a_running_stream_completes_byte_exact(upstream, tmp_path):
    (tmp_path / ".env").write_text(dotenv(upstream, "sk-old-pool-key-1111", "fk-old-forward-key-1111"))
    stream_headers = {"x-fake-chunks": "6", "x-fake-interval": "0.25"}
    with DaemonProcess(cwd=str(tmp_path)) as proxy:
        old = {"authorization": "Bearer fk-old-forward-key-1111"}
        stream = BackgroundStream(proxy.url + "/v1/chat/completions", {**old, **stream_headers})
        stream.wait_for_first_chunk()
        (tmp_path / ".env").write_text(dotenv(upstream, "sk-new-pool-key-2222", "fk-new-forward-key-2222"))
        sighup(proxy, "reloaded the configuration")
        reloaded = time.monotonic()
        new_key = httpx.get(proxy.url + "/v1/models", headers={"authorization": "Bearer fk-new-forward-key-2222"})
        used = upstream.received()[-1]["key"]
        old_key = httpx.get(proxy.url + "/v1/models", headers=old)
        stream.join()
    direct = httpx.post(upstream.url + "/v1/chat/completions", content=chat_body(stream=True),
                        headers={"content-type": "application/json", "x-fake-chunks": "6"})
    assert (new_key.status_code, used, old_key.status_code) == (200, "sk-new-pool-key-2222", 401)
    assert stream.error is None and stream.status == 200
    assert stream.arrivals[-1] > reloaded, "the stream was still running when the reload happened"
    assert same_apart_from_ids(stream.body) == same_apart_from_ids(direct.content)
    assert stream.body.endswith(b"data: [DONE]\n\n")


def test_sighup_with_a_broken_dotenv_keeps_the_running_configuration(upstream, tmp_path):
    (tmp_path / ".env").write_text(dotenv(upstream, "sk-old-pool-key-1111", "fk-old-forward-key-1111"))
    with DaemonProcess(cwd=str(tmp_path)) as proxy:
        broken = dotenv(upstream, "sk-new-pool-key-2222", "fk-new-forward-key-2222") + "TIMEOUT=soon\n"
        (tmp_path / ".env").write_text(broken)
        sighup(proxy, "reload refused")
        still = httpx.get(proxy.url + "/v1/models", headers={"authorization": "Bearer fk-old-forward-key-1111"})
        log = proxy.output
    assert still.status_code == 200
    assert "reload refused, the running configuration stays: TIMEOUT in .env='soon' is not a number" in log
    assert "Traceback" not in log


def route_table(upstream, prefix: str, pool_key: str, forward_key: str, name: str) -> str:
    return (f'[[route]]\nprefix = "{prefix}"\nbase_url = "{upstream.url}"\napi_keys = ["{pool_key}"]\n'
            f'forward_keys = [{{key = "{forward_key}", name = "{name}"}}]\n')


def test_sighup_rereads_the_config_file_adding_routes_and_refuses_a_broken_one(upstream, tmp_path):
    config = tmp_path / "fwd.toml"
    alice = route_table(upstream, "/a", "sk-route-a-key-1111", "fk-alice-forward-key-1111", "alice")
    bob = route_table(upstream, "/b", "sk-route-b-key-2222", "fk-bob-forward-key-2222", "bob")
    config.write_text(alice)
    with DaemonProcess(["--config", str(config)], cwd=str(tmp_path)) as proxy:
        as_bob = {"authorization": "Bearer fk-bob-forward-key-2222"}
        before = httpx.get(proxy.url + "/b/v1/models", headers=as_bob).status_code
        config.write_text(alice + bob)
        sighup(proxy, "reloaded the configuration")
        after = httpx.get(proxy.url + "/b/v1/models", headers=as_bob).status_code
        used = upstream.received()[-1]["key"]
        config.write_text(alice + bob + "[[route]\n")
        sighup(proxy, "reload refused")
        kept = httpx.get(proxy.url + "/b/v1/models", headers=as_bob).status_code
        lines = access_lines(proxy, "/b/v1/models", 3)
    assert (before, after, used, kept) == (404, 200, "sk-route-b-key-2222", 200)
    assert [line[6] for line in lines] == ["-", "bob", "bob"], "the caller is the forward key's name"


# --- SIGTERM ----------------------------------------------------------------------------------------------------


def connection_refused(port: int) -> bool:
    """No new connection is served: refused outright, or reset from the backlog of a listener that closed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except (ConnectionRefusedError, ConnectionResetError):
        return True


def test_sigterm_refuses_new_connections_and_lets_a_running_stream_finish(upstream):
    with DaemonProcess(env={"OPENAI_BASE_URL": upstream.url, "GRACE_PERIOD": "20"}) as proxy:
        port = proxy.ports[0]
        keep_alive = httpx.Client()
        assert keep_alive.get(proxy.url + "/healthz").status_code == 200
        stream = BackgroundStream(proxy.url + "/v1/chat/completions", {"x-fake-chunks": "6", "x-fake-interval": "0.25"})
        stream.wait_for_first_chunk()
        proxy.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: connection_refused(port), 2, "the listener to close")
        health = keep_alive.get(proxy.url + "/healthz")
        assert proxy.process.poll() is None, "still running while the stream runs"
        stream.join()
        proxy.process.wait(10)
        exited = time.monotonic()
    assert (health.status_code, health.json()["status"], health.json()["streams"]) == (503, "draining", 1)
    assert stream.error is None and stream.body.endswith(b"data: [DONE]\n\n")
    assert stream.ended_at <= exited < signalled + 5


def test_a_stream_finishing_during_shutdown_still_gets_its_transcript(upstream, tmp_path):
    env = {"OPENAI_BASE_URL": upstream.url, "LOG_CHAT": "true", "GRACE_PERIOD": "20"}
    with DaemonProcess(env=env, cwd=str(tmp_path)) as proxy:
        stream = BackgroundStream(proxy.url + "/v1/chat/completions", {"x-fake-chunks": "4", "x-fake-interval": "0.25"},
                                  text="drained words")
        stream.wait_for_first_chunk()
        proxy.process.send_signal(signal.SIGTERM)
        stream.join()
        proxy.process.wait(10)
    assert stream.body.endswith(b"data: [DONE]\n\n")
    records = [json.loads(line) for line in (tmp_path / "Log" / "chat.jsonl").read_text().splitlines()]
    assert [r["response"]["content"] for r in records] == ["echo: drained words"]


def test_sigterm_cuts_a_stream_longer_than_the_grace_period_and_exits_soon_after(upstream):
    with DaemonProcess(env={"OPENAI_BASE_URL": upstream.url, "GRACE_PERIOD": "1"}) as proxy:
        stream = BackgroundStream(proxy.url + "/v1/chat/completions", {"x-fake-chunks": "60", "x-fake-interval": "0.2"})
        stream.wait_for_first_chunk()
        proxy.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        proxy.process.wait(10)
        exited = time.monotonic()
        stream.join()
        log = proxy.output
    assert 0.9 < exited - signalled < 3, "exits soon after the one-second grace period, not when the stream ends"
    assert isinstance(stream.error, httpx.RemoteProtocolError), "the client sees a broken stream, not a clean end"
    assert b"[DONE]" not in stream.body
    assert "grace period over: cutting 1 running requests" in log


# --- HTTP/2 -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(upstream, tmp_path_factory):
    """A daemon on one TLS port, and a CA context that trusts its certificate."""
    key, cert = make_certificate(tmp_path_factory.mktemp("tls"))
    endpoint = f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    with DaemonProcess(["--port", endpoint], env={"OPENAI_BASE_URL": upstream.url, "MAX_BODY_SIZE": "16K"}) as proxy:
        proxy.url = f"https://127.0.0.1:{proxy.ports[0]}"
        proxy.verify = ssl.create_default_context(cafile=str(cert))
        yield proxy


def test_http2_over_tls_streams_chunk_by_chunk_and_http11_still_works_on_the_same_port(tls):
    with httpx.Client(http2=True, verify=tls.verify, timeout=20) as h2, httpx.Client(verify=tls.verify) as h11:
        models = h2.get(tls.url + "/v1/models")
        started = time.monotonic()
        stream = BackgroundStream(tls.url + "/v1/chat/completions", {"x-fake-chunks": "5", "x-fake-interval": "0.3"},
                                  text="over two", client=h2)
        stream.join()
        plain = h11.get(tls.url + "/v1/models")
    lines = access_lines(tls, "/v1/chat/completions")
    assert (models.http_version, models.status_code) == ("HTTP/2", 200)
    assert (stream.http_version, stream.status) == ("HTTP/2", 200)
    assert len(stream.arrivals) >= 5, "each upstream write arrives as its own chunk"
    assert stream.arrivals[0] - started < 1.0 and stream.arrivals[-1] - started > 1.1
    deltas = "".join(
        choice["delta"].get("content") or ""
        for line in stream.body.decode().split("\n\n") if line.startswith("data: {")
        for choice in json.loads(line[6:])["choices"]
    )
    assert deltas == "echo: over two" and stream.body.endswith(b"data: [DONE]\n\n")
    assert (plain.http_version, plain.status_code) == ("HTTP/1.1", 200)
    assert lines[0][3:5] == ("200", str(len(stream.body)))


def test_over_http2_a_body_above_max_body_size_gets_a_413(tls):
    # 40 KiB fits the client's first flow-control window, so the whole body has left it when the 413 and the
    # RST_STREAM(NO_ERROR) that follows it arrive.  A client still sending then (a body past the window) is,
    # by RFC 9113 8.1, to keep the response; httpcore instead raises on its next write, whatever the server did.
    # Ten times, on fresh connections: the stream's end may come after its 413 went out, which once made the
    # daemon process the answered request again and drop the connection.
    for _ in range(10):
        with httpx.Client(http2=True, verify=tls.verify, timeout=10) as h2:
            too_large = h2.post(tls.url + "/v1/chat/completions", content=b"x" * (40 * 1024))
        assert (too_large.http_version, too_large.status_code) == ("HTTP/2", 413)
        assert too_large.json()["error"]["code"] == "body_too_large"
    assert "Unhandled Error" not in tls.output


# --- openai-forward run -----------------------------------------------------------------------------------------


def run_commands():
    yield pytest.param([sys.executable, "-m", "fwd.cli"], id="python -m fwd.cli")
    script = Path(sys.executable).with_name("openai-forward")
    yield pytest.param(
        [str(script)], id="openai-forward",
        marks=pytest.mark.skipif(not script.exists(), reason=f"{script} is not installed"),
    )


@pytest.mark.parametrize("command", list(run_commands()))
def test_openai_forward_run_serves_with_the_seeds_command_line(upstream, tmp_path, command):
    port = free_port()
    pool, forward = "sk-cli-pool-key-5555", "fk-cli-forward-key-5555"
    proxy = DaemonProcess(cwd=str(tmp_path)).watch(subprocess.Popen(
        [*command, "run", f"--port=tcp:{port}:interface=127.0.0.1", f"--base_url={upstream.url}", f"--api_key={pool}",
         f"--forward_key={forward}", "--route_prefix=/cli", "--log_chat=true"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=DaemonProcess.base_env({}), cwd=tmp_path,
    ))
    try:
        assert f"starting on {port}" in proxy.wait_for(f"starting on {port}", timeout=15), proxy.output
        base = f"http://127.0.0.1:{port}"
        reply = httpx.post(base + "/cli/v1/chat/completions", content=chat_body(text="from the cli"),
                           headers={"authorization": f"Bearer {forward}", "content-type": "application/json"})
        used = upstream.received()[-1]["key"]
        as_forward_key = {"authorization": f"Bearer {forward}"}
        outside = httpx.post(base + "/v1/chat/completions", content=chat_body(), headers=as_forward_key)
        transcripts = tmp_path / "Log" / "chat.jsonl"
        record = json.loads(wait_until(lambda: transcripts.exists() and transcripts.read_text(), 5, "a transcript"))
    finally:
        proxy.stop()
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "echo: from the cli"
    assert used == pool and outside.status_code == 404
    assert record["caller"] == mask(forward) and record["route"] == "/cli"

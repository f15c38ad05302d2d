"""Limits, usage and budgets end to end: the official openai SDK against `twistd openai-forward` and the fake
upstream, with the usage ledger on disk and `openai-forward usage` reading it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx2
import openai
import pytest

from tests.support.processes import DaemonProcess, with_checkout_on_path

pytestmark = pytest.mark.slow

POOL = "sk-limits-pool-000000000000000001"
TEN = "fk-limits-ten-0000000000000000001"
ONE = "fk-limits-one-0000000000000000001"
METERED = "fk-limits-metered-000000000000001"
CAPPED = "fk-limits-capped-0000000000000001"
KILLED = "fk-limits-killed-0000000000000001"
MESSAGES = [{"role": "user", "content": "one two three"}]


def write_config(directory, upstream_url: str) -> str:
    path = os.path.join(directory, "gateway.toml")
    with open(path, "w") as f:
        f.write(
            f'[[route]]\nbase_url = "{upstream_url}"\napi_keys = ["{POOL}"]\nforward_keys = [\n'
            f'  {{ key = "{TEN}", name = "ten", rpm = "10/second" }},\n'
            f'  {{ key = "{ONE}", name = "one", rpm = "1/second" }},\n'
            f'  {{ key = "{METERED}", name = "metered", tpm = "1000000/minute" }},\n'
            f'  {{ key = "{CAPPED}", name = "capped", budget = {{ tokens = 60, period = "day" }} }},\n'
            f'  {{ key = "{KILLED}", name = "killed", budget = {{ tokens = 60, period = "month" }} }},\n'
            "]\n"
        )
    return path


@pytest.fixture
def gateway_dir(tmp_path, upstream):
    write_config(str(tmp_path), upstream.url)
    return tmp_path


def start(directory, *extra: str) -> DaemonProcess:
    return DaemonProcess(
        ["--config", "gateway.toml", "--data-dir", "data", "--metrics-port", "tcp:0:interface=127.0.0.1", *extra],
        cwd=str(directory),
    ).start(expect_ports=2)


def usage(directory, *arguments: str) -> dict:
    """`openai-forward usage --json` as a user runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "fwd.cli", "usage", "--data-dir", os.path.join(directory, "data"), "--json", *arguments],
        capture_output=True, text=True, env=with_checkout_on_path(dict(os.environ)), check=True,
    ).stdout
    return json.loads(out)


def caller_row(directory, caller: str, minimum_requests: int = 1, timeout: float = 5.0) -> dict:
    """The ledger's row for one caller, once it holds `minimum_requests` (it is written every second)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in usage(directory, "--by", "caller")["rows"] if r["caller"] == caller]
        if rows and rows[0]["requests"] >= minimum_requests:
            return rows[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no usage row for {caller} with {minimum_requests} requests: {rows}")
        time.sleep(0.2)


async def burst(url: str, key: str, count: int) -> list:
    """`count` chat completions at once over warm connections: the answers, or the SDK's errors."""
    async with httpx2.AsyncClient(limits=httpx2.Limits(max_connections=count, max_keepalive_connections=count)) as http:
        await asyncio.gather(*(http.get(url + "/healthz") for _ in range(count)))  # connections open first
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, http_client=http)

        async def one():
            try:
                return await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
            except openai.APIStatusError as e:
                return e

        started = time.monotonic()
        answers = await asyncio.gather(*(one() for _ in range(count)))
        return answers, time.monotonic() - started


def admitted_within_the_limit(answers, elapsed: float) -> list:
    ok = [a for a in answers if not isinstance(a, Exception)]
    refused = [a for a in answers if isinstance(a, openai.RateLimitError)]
    assert len(ok) + len(refused) == len(answers)
    # GCRA lets 10 through at once and one more each 0.1 s: a burst that took longer than 0.1 s may see more,
    # and one that took a second or more would show nothing (two workers with a limit each would admit 20).
    assert elapsed < 0.9, f"the burst took {elapsed:.2f} s: too slow to judge a limit of 10 a second"
    assert 10 <= len(ok) <= 10 + int(elapsed * 10), (len(ok), elapsed)
    print(f"burst of {len(answers)}: {len(ok)} admitted in {elapsed * 1000:.0f} ms")
    return refused


def test_a_key_limited_to_10_a_second_gets_10_of_50_and_the_sdks_own_retry_succeeds(gateway_dir):
    with start(gateway_dir) as proxy:
        answers, elapsed = asyncio.run(burst(proxy.url, TEN, 50))
        refused = admitted_within_the_limit(answers, elapsed)
        error = refused[0]
        assert error.status_code == 429 and error.code == "rate_limit_exceeded"
        headers = error.response.headers
        assert headers["x-ratelimit-limit-requests"] == "10"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"].endswith("ms") or headers["x-ratelimit-reset-requests"].endswith("s")
        assert headers["retry-after"] == "1"
        admitted = next(a for a in answers if not isinstance(a, Exception))
        assert admitted.headers["x-ratelimit-limit-requests"] == "10", "every answer to a limited caller has them"

        # The SDK's own retry honours Retry-After: a key limited to one a second gets its second request through.
        patient = openai.OpenAI(base_url=proxy.url + "/v1", api_key=ONE, max_retries=3)
        first = patient.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        second = patient.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        assert first.retries_taken == 0 and second.retries_taken >= 1
        assert second.parse().choices[0].message.content == "echo: one two three"

        metrics = httpx2.get(f"http://127.0.0.1:{proxy.ports[1]}/metrics").text
        assert 'fwd_limit_refusals_total{caller="ten",reason="rate"}' in metrics
        assert TEN not in metrics and TEN not in proxy.output


def test_a_stream_is_charged_its_exact_usage_and_the_client_never_sees_the_chunk_asked_for(gateway_dir):
    with start(gateway_dir) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=METERED, max_retries=0)
        own = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        asked_by_client = [chunk for chunk in own]
        usage_chunk = asked_by_client[-1]
        assert usage_chunk.choices == [] and usage_chunk.usage.total_tokens > 0, "a client that asks gets its chunk"

        plain = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
        assert all(chunk.choices for chunk in plain), "no usage-only chunk reaches a client that did not ask"
        assert all(chunk.usage is None for chunk in plain)
        assert "".join(c.choices[0].delta.content or "" for c in plain) == "echo: one two three"

        row = caller_row(gateway_dir, "metered", minimum_requests=2)
        assert row["input_tokens"] == 2 * usage_chunk.usage.prompt_tokens
        assert row["output_tokens"] == 2 * usage_chunk.usage.completion_tokens
        assert row["estimated_tokens"] == 0
        metrics = httpx2.get(f"http://127.0.0.1:{proxy.ports[1]}/metrics").text
        expected = float(2 * usage_chunk.usage.completion_tokens)
        assert f'fwd_tokens_total{{caller="metered",kind="output",model="gpt-4o-mini"}} {expected}' in metrics


def test_an_aborted_stream_is_charged_its_estimate(gateway_dir):
    with start(gateway_dir) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=METERED, max_retries=0)
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            extra_headers={"x-fake-chunks": "50", "x-fake-interval": "0.05"},
        )
        for number, _ in enumerate(stream):
            if number == 5:
                break
        stream.close()
        row = caller_row(gateway_dir, "metered")
        assert row["estimated_tokens"] == row["input_tokens"] + row["output_tokens"] > 0
        assert 4 <= row["output_tokens"] < 50, "what was relayed, not what was asked for"
        assert "499" in proxy.wait_for(" 499 ")


def test_a_budget_runs_out_with_insufficient_quota_and_stays_spent_across_a_restart_and_kill_9(gateway_dir):
    def spend(url: str, key: str) -> openai.APIStatusError:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=2)
        for _ in range(20):
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
            except openai.APIStatusError as e:
                return e
        raise AssertionError("the budget never ran out")

    with start(gateway_dir) as proxy:
        spent = spend(proxy.url, CAPPED)
        assert spent.status_code == 429 and spent.code == "insufficient_quota"
        assert "T00:00:00Z" in spent.message and spent.response.headers["x-should-retry"] == "false"
        killed = spend(proxy.url, KILLED)
        assert killed.code == "insufficient_quota"
        caller_row(gateway_dir, "killed")  # written (at most a second after)
    with start(gateway_dir) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=CAPPED, max_retries=0)
        with pytest.raises(openai.RateLimitError) as again:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        assert again.value.code == "insufficient_quota", "a restart does not renew a budget"
        os.killpg(proxy.process.pid, signal.SIGKILL)
        proxy.process.wait()
    with start(gateway_dir) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KILLED, max_retries=0)
        with pytest.raises(openai.RateLimitError) as again:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        assert again.value.code == "insufficient_quota", "nor does kill -9"
        assert "T00:00:00Z" in again.value.message


def test_workers_2_hold_the_limit_of_one(gateway_dir):
    with start(gateway_dir, "--workers", "2") as proxy:
        deadline = time.monotonic() + 15
        while len({httpx2.get(proxy.url + "/healthz", headers={"Connection": "close"}).json()["pid"] for _ in range(20)}) < 2:
            assert time.monotonic() < deadline, "both workers serve"
            time.sleep(0.1)
        answers, elapsed = asyncio.run(burst(proxy.url, TEN, 50))
        admitted_within_the_limit(answers, elapsed)
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=METERED, max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert caller_row(gateway_dir, "metered")["input_tokens"] > 0, "the supervisor's ledger counts every worker"

"""Issue #3 end to end: key pool, forward keys, failover, PROXY_KEY, IP control, TOML routes, no secret in logs.

Every test runs a real `twistd -n openai-forward` against the fake upstream subprocess and talks to it the way
a user would: the official openai SDK (OpenAI / AzureOpenAI, max_retries=0) where a client would use it, raw
httpx where the headers themselves are the point.  Key pools keep state, so each scenario that changes a key's
state has a pool of its own (its own daemon, or its own [[route]]).
"""

from __future__ import annotations

import collections
import json
import subprocess
import time

import httpx2 as httpx
import openai
import pytest

from fwd.settings import mask
from tests.support.processes import DaemonProcess, FakeUpstreamProcess, twistd_command

pytestmark = pytest.mark.slow


def daemon_process(arguments=(), env=None, **kw) -> DaemonProcess:
    """The daemon without its startup key check: these tests are about the refusals requests meet, and the
    check would find the same keys first (tests/test_keycheck.py covers it)."""
    return DaemonProcess(arguments, env={"CHECK_KEYS": "false", **(env or {})}, **kw)

HI = [{"role": "user", "content": "hi"}]

# Point 1: the pool behind forward keys, configured from the environment.
POOL = ("sk-pool-alpha-a1a1", "sk-pool-bravo-b2b2", "sk-pool-charlie-c3c3")
FORWARD = ("fk-team-one-d4d4", "fk-team-two-e5e5")
OWN_KEY = "sk-client-own-f6f6"
OPEN_POOL = ("sk-open-one-g7g7", "sk-open-two-h8h8")

# Point 2: one [[route]] per failover scenario, each with its own pool; the fake upstream refuses some keys.
COOL_BUSY, COOL_OK = "sk-cool-busy-ra30-0001", "sk-cool-ok-0002"
BACKOFF_BUSY, BACKOFF_OK = "sk-backoff-busy-0003", "sk-backoff-ok-0004"
RECOVER_BUSY, RECOVER_OK = "sk-recover-busy-0005", "sk-recover-ok-0006"
REVOKED_401, FORBIDDEN_403, REJECT_OK = "sk-revoked-401-0007", "sk-forbidden-403-0008", "sk-reject-ok-0009"
BUSY_A, BUSY_B = "sk-all-busy-a-0010", "sk-all-busy-b-0011"
DEAD_A, DEAD_B = "sk-all-dead-a-0012", "sk-all-dead-b-0013"
PLAIN_A, PLAIN_B = "sk-plain-a-0014", "sk-plain-b-0015"

# Point 3: openai-api-proxy's PROXY_KEY.
PROXY_KEYS = ("pk-gate-one-1111", "pk-gate-two-2222")
GATED_POOL, GATED_FORWARD = "sk-gated-pool-3333", "fk-gated-team-4444"

# Point 5: routes from a TOML file.
ROUTE_POOL, ROUTE_FORWARD = "sk-route-openai-5555", "fk-route-openai-6666"
LIMITED = "fk-limited-alice-7777"
ALLOWED_MODELS = ["gpt-4o-mini", "text-embedding-3-small", "whisper-1", "gpt-image-1"]
AZURE_POOL, AZURE_FORWARD = "0123456789abcdefazurepool8888", "fk-azure-team-9999"
LOCAL_POOL, LOCAL_FORWARD = "sk-local-server-aaaa", "fk-local-team-bbbb"

# Point 6: every kind of secret at once.
LEAK_BUSY, LEAK_REVOKED, LEAK_GOOD = "sk-leak-busy-kq1w", "sk-leak-revoked-lr2e", "sk-leak-good-ms3r"
LEAK_SHORT = "sk-tiny-q9z8"  # its last four characters would give away 7 of its 12
LEAK_FORWARD, LEAK_NAMED = "fk-leak-plain-nt4t", "fk-leak-named-ou5y"
LEAK_AZURE_POOL, LEAK_AZURE_FORWARD = "leakazurepoolpv6u", "fk-leak-azure-qw7i"
LEAK_DEAD_A, LEAK_DEAD_B, LEAK_DEAD_FORWARD = "sk-leak-dead-rx8o", "sk-leak-dead-sy9p", "fk-leak-dead-tz0a"
LEAK_PROXY = ("pk-leak-one-ua1s", "pk-leak-two-vb2d")
LEAK_OWN, LEAK_OWN_REFUSED = "sk-leak-own-wc3f", "sk-leak-own-refused-xd4g"
LEAK_UNKNOWN_FORWARD = "fk-leak-unknown-ye5h"

MODULE_SECRETS = (
    *POOL, *FORWARD, OWN_KEY, *OPEN_POOL,
    COOL_BUSY, COOL_OK, BACKOFF_BUSY, BACKOFF_OK, RECOVER_BUSY, RECOVER_OK, REVOKED_401, FORBIDDEN_403, REJECT_OK,
    BUSY_A, BUSY_B, DEAD_A, DEAD_B, PLAIN_A, PLAIN_B,
    *PROXY_KEYS, GATED_POOL, GATED_FORWARD,
    ROUTE_POOL, ROUTE_FORWARD, LIMITED, AZURE_POOL, AZURE_FORWARD, LOCAL_POOL, LOCAL_FORWARD,
)

KEY_STATUS = {
    COOL_BUSY: (429, 30),
    BACKOFF_BUSY: (429, None),
    RECOVER_BUSY: (429, 1),
    REVOKED_401: (401, None),
    FORBIDDEN_403: (403, None),
    BUSY_A: (429, 2),
    BUSY_B: (429, 2),
    DEAD_A: (401, None),
    DEAD_B: (403, None),
    LEAK_BUSY: (429, 60),
    LEAK_SHORT: (429, 60),
    LEAK_REVOKED: (401, None),
    LEAK_DEAD_A: (401, None),
    LEAK_DEAD_B: (429, 60),
    LEAK_OWN_REFUSED: (401, None),
}


# Helpers --------------------------------------------------------------------------------------------------------


def sdk(proxy: DaemonProcess, key: str, prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + prefix + "/v1", api_key=key, max_retries=0, timeout=10)


def chat(client: openai.OpenAI, **extra) -> str:
    return client.chat.completions.create(model="gpt-4o-mini", messages=HI, **extra).choices[0].message.content


def header(record: dict, name: str) -> str | None:
    values = [v for n, v in record["headers"] if n.lower() == name]
    return values[-1] if values else None


class Watch:
    """What the upstream receives from now on."""

    def __init__(self, upstream: FakeUpstreamProcess):
        self.upstream = upstream
        self.mark = len(upstream.received())

    def records(self) -> list[dict]:
        return self.upstream.received()[self.mark :]

    def keys(self) -> list[str | None]:
        return [r["key"] for r in self.records()]


def error_of(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


def toml_string(value: str) -> str:
    return json.dumps(value)


def toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def route_table(prefix: str, base_url: str, api_keys, forward_keys: str = "[]", kind: str | None = None) -> str:
    """One [[route]] table; without `kind` the route is an openai one by default."""
    kind_line = "" if kind is None else f"kind = {toml_string(kind)}\n"
    return (
        f"[[route]]\nprefix = {toml_string(prefix)}\n{kind_line}base_url = {toml_string(base_url)}\n"
        f"api_keys = {toml_list(api_keys)}\nforward_keys = {forward_keys}\n\n"
    )


def access_lines(proxy: DaemonProcess) -> list[str]:
    return [line for line in proxy.output.splitlines() if "[fwd.access#info]" in line]


def next_access_line(proxy: DaemonProcess, seen: int) -> str:
    """The one access-log line written after the first `seen` ones (it follows the response: poll briefly)."""
    deadline = time.monotonic() + 5
    while len(access_lines(proxy)) == seen and time.monotonic() < deadline:
        time.sleep(0.02)
    [line] = access_lines(proxy)[seen:]
    return line


def logged_rests(output: str, key: str) -> list[str]:
    """The rest periods the daemon logged for one key, in order."""
    prefix = f"key {mask(key)} rate limited, resting "
    return [line.split(prefix, 1)[1].split()[0] for line in output.splitlines() if prefix in line]


# Fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flaky():
    """An upstream that refuses some keys with 429 (and Retry-After), 401 or 403."""
    with FakeUpstreamProcess(key_status=KEY_STATUS) as fake:
        yield fake


@pytest.fixture(scope="module")
def pooled(upstream):
    env = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": ",".join(POOL), "FORWARD_KEY": " ".join(FORWARD)}
    with daemon_process(env=env) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def forward_keys_only(upstream):
    env = {
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_API_KEY": " ".join(POOL),
        "FORWARD_KEY": FORWARD[0],
        "ALLOW_CLIENT_KEYS": "false",
    }
    with daemon_process(env=env) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def no_auth(upstream):
    with daemon_process(env={"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": "  ".join(OPEN_POOL)}) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def failover(flaky, tmp_path_factory):
    path = tmp_path_factory.mktemp("failover") / "fwd.toml"
    path.write_text(
        route_table("/cooldown", flaky.url, [COOL_BUSY, COOL_OK])
        + route_table("/backoff", flaky.url, [BACKOFF_BUSY, BACKOFF_OK])
        + route_table("/recover", flaky.url, [RECOVER_BUSY, RECOVER_OK])
        + route_table("/rejected", flaky.url, [REVOKED_401, FORBIDDEN_403, REJECT_OK])
        + route_table("/all-busy", flaky.url, [BUSY_A, BUSY_B])
        + route_table("/all-dead", flaky.url, [DEAD_A, DEAD_B])
        + route_table("/plain", flaky.url, [PLAIN_A, PLAIN_B])
    )
    with daemon_process(["--config", str(path)]) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def gated(upstream):
    env = {
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_API_KEY": GATED_POOL,
        "FORWARD_KEY": GATED_FORWARD,
        "PROXY_KEY": ",".join(PROXY_KEYS),
    }
    with daemon_process(env=env) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def behind_proxy(upstream):
    env = {
        "OPENAI_BASE_URL": upstream.url,
        "TRUSTED_PROXIES": "127.0.0.1",
        "IP_WHITELIST": "10.0.0.0/8",
        "IP_BLACKLIST": "10.6.6.0/24",
    }
    with daemon_process(env=env) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def routed(upstream, tmp_path_factory):
    path = tmp_path_factory.mktemp("routes") / "fwd.toml"
    limited = f'{{ key = "{LIMITED}", name = "alice", models = {toml_list(ALLOWED_MODELS)} }}'
    azure = f'[{{ key = "{AZURE_FORWARD}", name = "azure-team", models = ["gpt-4o-mini"] }}]'
    path.write_text(
        route_table("/openai", upstream.url, [ROUTE_POOL], f'["{ROUTE_FORWARD}", {limited}]')
        + route_table("/azure", upstream.url, [AZURE_POOL], azure, kind="azure")
        + route_table("/local", upstream.url + "/llm", [LOCAL_POOL], f'["{LOCAL_FORWARD}"]', kind="general")
    )
    with daemon_process(["--config", str(path)]) as proxy:
        yield proxy


# 1. The pool behind forward keys ---------------------------------------------------------------------------------


def test_forward_key_requests_rotate_evenly_over_a_comma_separated_pool(pooled, upstream):
    watch = Watch(upstream)
    client = sdk(pooled, FORWARD[0])
    replies = [chat(client) for _ in range(6)]
    assert replies == ["echo: hi"] * 6
    used = watch.keys()
    assert collections.Counter(used) == {key: 2 for key in POOL}
    assert all(a != b for a, b in zip(used, used[1:])), "the pool is used in turn, never the same key twice in a row"


def test_every_forward_key_is_served_from_the_pool_and_never_reaches_the_upstream(pooled, upstream):
    watch = Watch(upstream)
    for forward_key in FORWARD:
        assert chat(sdk(pooled, forward_key)) == "echo: hi"
    records = watch.records()
    assert [r["key"] in POOL for r in records] == [True, True]
    for record in records:
        assert header(record, "authorization") == "Bearer " + record["key"]
        assert not any(f in json.dumps(record) for f in FORWARD)


@pytest.mark.parametrize(
    "credential",
    ["fk-never-issued-0000", FORWARD[0][:-1], FORWARD[0] + "0"],
    ids=["unknown", "prefix-of-a-real-key", "real-key-plus-a-character"],
)
def test_an_unknown_forward_key_is_a_401_json_and_the_upstream_is_never_contacted(pooled, upstream, credential):
    watch = Watch(upstream)
    with pytest.raises(openai.AuthenticationError) as raised:
        chat(sdk(pooled, credential))
    assert raised.value.status_code == 401
    assert error_of(raised.value.response)["code"] == "invalid_api_key"
    assert watch.records() == []


def test_a_request_without_credentials_is_a_401_json_and_the_upstream_is_never_contacted(pooled, upstream):
    watch = Watch(upstream)
    response = httpx.post(pooled.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI})
    assert response.status_code == 401
    assert error_of(response)["code"] == "missing_api_key"
    assert watch.records() == []


def test_a_clients_own_upstream_key_passes_through_unchanged(pooled, upstream):
    watch = Watch(upstream)
    assert chat(sdk(pooled, OWN_KEY)) == "echo: hi"
    [record] = watch.records()
    assert header(record, "authorization") == "Bearer " + OWN_KEY


def test_with_allow_client_keys_false_a_clients_own_key_is_a_401_and_forward_keys_still_work(
    forward_keys_only, upstream
):
    watch = Watch(upstream)
    with pytest.raises(openai.AuthenticationError) as raised:
        chat(sdk(forward_keys_only, OWN_KEY))
    assert error_of(raised.value.response)["code"] == "invalid_api_key"
    assert watch.records() == []
    assert chat(sdk(forward_keys_only, FORWARD[0])) == "echo: hi"
    assert watch.keys()[0] in POOL


@pytest.mark.parametrize("credential", ["sk-anything-at-all", "fk-made-up", None], ids=["own-key", "fk-key", "none"])
def test_without_forward_keys_anyone_is_served_from_the_pool_whatever_key_they_send(no_auth, upstream, credential):
    watch = Watch(upstream)
    headers = {} if credential is None else {"Authorization": f"Bearer {credential}"}
    for _ in range(4):
        response = httpx.post(
            no_auth.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=headers
        )
        assert response.status_code == 200
    assert collections.Counter(watch.keys()) == {key: 2 for key in OPEN_POOL}, "a space-separated pool rotates too"
    for record in watch.records():
        assert credential is None or credential not in json.dumps(record)


def test_no_auth_mode_is_announced_by_a_loud_startup_warning_and_forward_keys_silence_it(no_auth, pooled):
    warnings = [line for line in no_auth.output.splitlines() if "#warn]" in line and "no-auth mode" in line]
    assert len(warnings) == 1
    assert "WARNING" in warnings[0] and "anyone" in warnings[0] and "FORWARD_KEY" in warnings[0]
    assert "no-auth" not in pooled.output


# 2. Failover ---------------------------------------------------------------------------------------------------


def test_a_429_rests_the_key_for_its_retry_after_and_the_stream_is_replayed_cleanly_on_the_next_key(
    failover, flaky
):
    watch = Watch(flaky)
    client = sdk(failover, "anything", "/cooldown")
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: one two three"
    busy, served = watch.records()
    assert (busy["key"], served["key"]) == (COOL_BUSY, COOL_OK)
    same = ("method", "uri", "body_sha256")
    assert [busy[f] for f in same] == [served[f] for f in same], "the very same request, replayed"

    later = Watch(flaky)
    assert [chat(client) for _ in range(3)] == ["echo: hi"] * 3
    assert later.keys() == [COOL_OK] * 3, "the rate-limited key rests and is not even tried"
    assert logged_rests(failover.output, COOL_BUSY) == ["30"], "the upstream's Retry-After: 30 is honoured"


def test_a_429_without_retry_after_rests_the_key_with_a_growing_backoff(failover, flaky):
    watch = Watch(flaky)
    client = sdk(failover, "anything", "/backoff")
    started = time.monotonic()
    assert chat(client) == "echo: hi"
    while len(logged_rests(failover.output, BACKOFF_BUSY)) < 2:
        assert time.monotonic() - started < 6, "the resting key was never tried again"
        assert chat(client) == "echo: hi"
        time.sleep(0.1)
    assert time.monotonic() - started > 0.9
    assert logged_rests(failover.output, BACKOFF_BUSY) == ["1", "2"]
    assert watch.keys().count(BACKOFF_BUSY) == 2, "tried once, rested 1 s untouched, tried once more"


def test_a_rate_limited_key_rejoins_the_rotation_once_its_retry_after_has_passed(failover, flaky):
    client = sdk(failover, "anything", "/recover")
    watch = Watch(flaky)
    started = time.monotonic()
    assert chat(client) == "echo: hi"
    assert watch.keys() == [RECOVER_BUSY, RECOVER_OK]
    flaky.set_keys({RECOVER_BUSY: None})
    while RECOVER_BUSY not in watch.keys()[2:]:
        assert time.monotonic() - started < 5, "the key never came back"
        assert chat(client) == "echo: hi"
        time.sleep(0.05)
    back_after = time.monotonic() - started
    assert 0.9 < back_after < 5
    assert watch.keys()[-1] == RECOVER_BUSY and watch.keys().count(RECOVER_BUSY) == 2


def test_a_key_refused_with_401_or_403_is_disabled_and_the_upload_is_replayed_byte_for_byte(failover, flaky):
    watch = Watch(flaky)
    client = sdk(failover, "anything", "/rejected")
    data = bytes(range(256)) * 64
    uploaded = client.files.create(file=("batch.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data)
    records = watch.records()
    assert [r["key"] for r in records] == [REVOKED_401, FORBIDDEN_403, REJECT_OK]
    assert len({(r["uri"], r["body_sha256"], header(r, "content-type")) for r in records}) == 1

    later = Watch(flaky)
    assert [chat(client) for _ in range(3)] == ["echo: hi"] * 3
    assert later.keys() == [REJECT_OK] * 3, "disabled keys are not tried again soon"
    output = failover.output
    assert f"key {mask(REVOKED_401)} rejected by the upstream (401), disabled" in output
    assert f"key {mask(FORBIDDEN_403)} rejected by the upstream (403), disabled" in output


def test_when_every_key_is_rate_limited_the_client_gets_a_429_json_with_retry_after(failover, flaky):
    watch = Watch(flaky)
    client = sdk(failover, "anything", "/all-busy")
    with pytest.raises(openai.RateLimitError) as raised:
        chat(client)
    response = raised.value.response
    assert response.status_code == 429
    assert response.headers["retry-after"] in ("1", "2"), "the soonest key's Retry-After (2 s), rounded up"
    assert error_of(response)["code"] == "rate_limit_exceeded"
    assert sorted(watch.keys()) == [BUSY_A, BUSY_B], "each key was tried exactly once"

    again = Watch(flaky)
    with pytest.raises(openai.RateLimitError) as raised:
        chat(client)
    assert "retry-after" in raised.value.response.headers
    assert again.records() == [], "while every key rests, the upstream is not bothered"


def test_when_every_key_is_refused_the_client_gets_a_503_json_with_retry_after(failover, flaky):
    watch = Watch(flaky)
    with pytest.raises(openai.InternalServerError) as raised:
        chat(sdk(failover, "anything", "/all-dead"))
    response = raised.value.response
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert error_of(response)["code"] == "no_upstream_key"
    assert sorted(watch.keys()) == [DEAD_A, DEAD_B]


@pytest.mark.parametrize("status", [400, 404, 500, 502, 503])
def test_other_upstream_statuses_are_never_replayed_and_reach_the_client_untouched(failover, flaky, status):
    watch = Watch(flaky)
    response = httpx.post(
        failover.url + "/plain/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": HI},
        headers={"x-fake-status": str(status)},
    )
    assert response.status_code == status
    [record] = watch.records()
    assert response.headers["x-request-id"] == record["request_id"], "the upstream's own answer"


def test_a_connection_dropped_before_the_answer_is_a_502_and_the_chat_is_never_replayed(failover, flaky):
    client = sdk(failover, "anything", "/plain")
    assert chat(client) == "echo: hi", "a warm, reused upstream connection"
    watch = Watch(flaky)
    with pytest.raises(openai.APIStatusError) as raised:
        chat(client, extra_headers={"x-fake-fail": "close-before-headers"})
    assert raised.value.status_code == 502
    assert error_of(raised.value.response)["code"] == "upstream_unreachable"
    assert len(watch.records()) == 1


def test_a_stream_broken_after_its_first_bytes_is_never_replayed(failover, flaky):
    watch = Watch(flaky)
    client = sdk(failover, "anything", "/plain")
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "a b c d e f"}],
            stream=True,
            extra_headers={"x-fake-fail": "reset-mid-stream"},
        )
        for _ in stream:
            pass
    assert len(watch.records()) == 1


# 3. PROXY_KEY --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proxy_key", PROXY_KEYS)
def test_a_forward_key_with_any_configured_proxy_key_suffix_is_served_from_the_pool(gated, upstream, proxy_key):
    watch = Watch(upstream)
    assert chat(sdk(gated, f"{GATED_FORWARD}:{proxy_key}")) == "echo: hi"
    [record] = watch.records()
    assert header(record, "authorization") == "Bearer " + GATED_POOL


def test_a_clients_own_key_reaches_the_upstream_with_the_proxy_key_stripped(gated, upstream):
    watch = Watch(upstream)
    assert chat(sdk(gated, f"{OWN_KEY}:{PROXY_KEYS[1]}")) == "echo: hi"
    [record] = watch.records()
    assert header(record, "authorization") == "Bearer " + OWN_KEY
    assert not any(p in json.dumps(record) for p in PROXY_KEYS)


@pytest.mark.parametrize(
    "credential",
    [
        GATED_FORWARD,
        OWN_KEY,
        f"{GATED_FORWARD}:pk-gate-wrong-0000",
        f"{GATED_FORWARD}:{PROXY_KEYS[0][:-1]}",
        f"{GATED_FORWARD}:{PROXY_KEYS[0]}x",
        f"{GATED_FORWARD}:",
        f"{PROXY_KEYS[0]}:{GATED_FORWARD}",
        None,
    ],
    ids=["fk-no-suffix", "own-no-suffix", "wrong", "truncated", "extended", "empty", "swapped", "no-credentials"],
)
def test_a_wrong_or_missing_proxy_key_is_a_401_json_and_the_upstream_is_never_contacted(gated, upstream, credential):
    watch = Watch(upstream)
    headers = {} if credential is None else {"Authorization": f"Bearer {credential}"}
    body = {"model": "gpt-4o-mini", "messages": HI}
    response = httpx.post(gated.url + "/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_proxy_key"
    assert watch.records() == []


def test_after_the_proxy_key_is_stripped_an_unknown_forward_key_is_still_a_401(gated, upstream):
    watch = Watch(upstream)
    with pytest.raises(openai.AuthenticationError) as raised:
        chat(sdk(gated, f"fk-not-issued-0000:{PROXY_KEYS[0]}"))
    assert error_of(raised.value.response)["code"] == "invalid_api_key"
    assert watch.records() == []


# 4. IP control -------------------------------------------------------------------------------------------------


def test_a_blacklisted_address_gets_a_403_json_even_when_it_forges_x_forwarded_for(upstream):
    watch = Watch(upstream)
    with daemon_process(env={"OPENAI_BASE_URL": upstream.url, "IP_BLACKLIST": "127.0.0.1"}) as proxy:
        with pytest.raises(openai.PermissionDeniedError) as raised:
            chat(sdk(proxy, "sk-x"))
        forged = httpx.get(proxy.url + "/v1/models", headers={"X-Forwarded-For": "10.1.2.3"})
    assert error_of(raised.value.response)["code"] == "ip_denied"
    assert forged.status_code == 403 and "127.0.0.1" in error_of(forged)["message"]
    assert watch.records() == []


def test_an_address_outside_the_whitelist_gets_a_403_json_even_when_it_forges_x_forwarded_for(upstream):
    watch = Watch(upstream)
    with daemon_process(env={"OPENAI_BASE_URL": upstream.url, "IP_WHITELIST": "10.0.0.0/8, 192.0.2.7"}) as proxy:
        plain = httpx.get(proxy.url + "/v1/models")
        forged = httpx.get(proxy.url + "/v1/models", headers={"X-Forwarded-For": "10.1.2.3"})
    for response in (plain, forged):
        assert response.status_code == 403
        assert error_of(response)["code"] == "ip_denied" and "127.0.0.1" in error_of(response)["message"]
    assert watch.records() == []


@pytest.mark.parametrize(
    ("forwarded_for", "judged", "status"),
    [
        (None, "127.0.0.1", 403),
        ("10.1.2.3", "10.1.2.3", 200),
        ("10.6.6.6", "10.6.6.6", 403),
        ("10.1.2.3, 10.6.6.6", "10.6.6.6", 403),
        ("203.0.113.9, 10.1.2.3", "10.1.2.3", 200),
        ("10.6.6.6, 127.0.0.1", "10.6.6.6", 403),
        ("10.6.6.6, 10.1.2.3, 127.0.0.1", "10.1.2.3", 200),
    ],
    ids=[
        "no-header-the-proxy-itself",
        "whitelisted-client",
        "blacklisted-client",
        "blacklisted-client-forging-a-whitelisted-hop",
        "junk-before-a-whitelisted-client",
        "trusted-hops-are-skipped",
        "right-most-untrusted-behind-two-proxies",
    ],
)
def test_behind_a_trusted_proxy_the_right_most_untrusted_hop_decides(behind_proxy, forwarded_for, judged, status):
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    seen = len(access_lines(behind_proxy))
    response = httpx.get(behind_proxy.url + "/v1/models", headers=headers)
    assert response.status_code == status
    if status == 403:
        assert error_of(response)["code"] == "ip_denied"
        assert f"address {judged} " in error_of(response)["message"]
    else:
        assert f"] {judged} GET /v1/models 200 " in next_access_line(behind_proxy, seen), "the log names the client"


# 5. Routes from --config ---------------------------------------------------------------------------------------


def test_each_route_serves_its_own_pool_to_its_own_forward_keys(routed, upstream):
    watch = Watch(upstream)
    assert chat(sdk(routed, ROUTE_FORWARD, "/openai")) == "echo: hi"
    response = sdk(routed, LOCAL_FORWARD, "/local").chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI
    )
    assert response.status_code == 200
    openai_route, general_route = watch.records()
    assert openai_route["uri"] == "/v1/chat/completions"
    assert header(openai_route, "authorization") == "Bearer " + ROUTE_POOL
    assert (general_route["uri"], header(general_route, "authorization")) == (
        "/llm/v1/chat/completions",
        "Bearer " + LOCAL_POOL,
    ), "a general route keeps its base_url's path and uses a Bearer key"

    crossed = Watch(upstream)
    for key, prefix in ((LOCAL_FORWARD, "/openai"), (ROUTE_FORWARD, "/local"), (ROUTE_FORWARD, "/azure")):
        with pytest.raises(openai.AuthenticationError):
            chat(sdk(routed, key, prefix))
    assert crossed.records() == [], "a forward key opens its own route only"


def test_an_azure_route_takes_the_forward_key_from_api_key_and_sends_the_pool_key_in_api_key(routed, upstream):
    watch = Watch(upstream)
    client = openai.AzureOpenAI(
        azure_endpoint=routed.url + "/azure", api_key=AZURE_FORWARD, api_version="2024-06-01", max_retries=0, timeout=10
    )
    response = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    assert response.status_code == 200
    [record] = watch.records()
    assert record["uri"] == "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
    assert header(record, "api-key") == AZURE_POOL
    assert header(record, "authorization") is None
    assert AZURE_FORWARD not in json.dumps(record)


def test_an_azure_route_also_takes_the_forward_key_as_a_bearer_token(routed, upstream):
    watch = Watch(upstream)
    response = httpx.post(
        routed.url + "/azure/openai/deployments/gpt-4o-mini/embeddings?api-version=2024-06-01",
        json={"input": "x"},
        headers={"Authorization": f"Bearer {AZURE_FORWARD}"},
    )
    assert response.status_code == 200
    [record] = watch.records()
    assert record["uri"] == "/openai/deployments/gpt-4o-mini/embeddings?api-version=2024-06-01"
    assert (header(record, "api-key"), header(record, "authorization")) == (AZURE_POOL, None)


def test_an_azure_deployment_outside_the_forward_keys_models_is_a_403(routed, upstream):
    watch = Watch(upstream)
    client = openai.AzureOpenAI(
        azure_endpoint=routed.url + "/azure", api_key=AZURE_FORWARD, api_version="2024-06-01", max_retries=0, timeout=10
    )
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert error_of(raised.value.response)["code"] == "model_not_allowed"
    assert watch.records() == []


@pytest.mark.parametrize(
    "body",
    [{"model": "gpt-4o-mini", "messages": HI}, {"messages": HI}],
    ids=["allowed-model-in-body", "no-model-in-body"],
)
def test_on_an_azure_route_the_deployment_in_the_path_is_the_model_that_is_checked(routed, upstream, body):
    watch = Watch(upstream)
    response = httpx.post(
        routed.url + "/azure/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01",
        json=body,
        headers={"api-key": AZURE_FORWARD},
    )
    assert response.status_code == 403
    assert error_of(response)["code"] == "model_not_allowed"
    assert watch.records() == []


AUDIO = b"RIFF" + bytes(range(256)) * 16
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8

DENIED = {
    "chat": lambda c: c.chat.completions.create(model="gpt-4o", messages=HI),
    "chat-stream": lambda c: c.chat.completions.create(model="gpt-4o", messages=HI, stream=True),
    "completions": lambda c: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="x"),
    "embeddings": lambda c: c.embeddings.create(model="text-embedding-3-large", input="x"),
    "responses": lambda c: c.responses.create(model="gpt-4o", input="x"),
    "images": lambda c: c.images.generate(model="dall-e-3", prompt="x"),
    "images-edit-multipart": lambda c: c.images.edit(model="dall-e-2", image=("a.png", PNG), prompt="x"),
    "transcription-multipart": lambda c: c.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=("a.wav", AUDIO)
    ),
    "speech": lambda c: c.audio.speech.create(model="tts-1", voice="alloy", input="x"),
}

ALLOWED = {
    "chat": lambda c: c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI),
    "responses": lambda c: c.responses.with_raw_response.create(model="gpt-4o-mini", input="x"),
    "embeddings": lambda c: c.embeddings.with_raw_response.create(model="text-embedding-3-small", input="x"),
    "images-edit-multipart": lambda c: c.images.with_raw_response.edit(
        model="gpt-image-1", image=("a.png", PNG), prompt="x"
    ),
    "transcription-multipart": lambda c: c.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("a.wav", AUDIO)
    ),
}


@pytest.mark.parametrize("endpoint", DENIED)
def test_a_forward_key_limited_to_some_models_gets_a_403_json_for_any_other_model_on_any_endpoint(
    routed, upstream, endpoint
):
    watch = Watch(upstream)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        DENIED[endpoint](sdk(routed, LIMITED, "/openai"))
    error = error_of(raised.value.response)
    assert (error["code"], error["param"]) == ("model_not_allowed", "model")
    assert watch.records() == []


@pytest.mark.parametrize("endpoint", ALLOWED)
def test_the_same_limited_forward_key_is_served_for_its_own_models(routed, upstream, endpoint):
    watch = Watch(upstream)
    seen = len(access_lines(routed))
    response = ALLOWED[endpoint](sdk(routed, LIMITED, "/openai"))
    assert response.status_code == 200
    [record] = watch.records()
    assert header(record, "authorization") == "Bearer " + ROUTE_POOL
    assert record["uri"].startswith("/v1/")
    line = next_access_line(routed, seen)
    assert f"POST /openai{record['uri']} 200 " in line
    assert line.endswith(" alice"), "the access log names the caller, never the key"


# 6. No secret in any log or error message ----------------------------------------------------------------------


def hidden_parts(secret: str) -> list[str]:
    """The secret, and the part of it a masked key (`sk-…abcd`) must never show."""
    return [secret, secret[3:-4]]


def test_no_key_of_any_kind_appears_in_the_log_or_in_any_error_after_varied_traffic(flaky, tmp_path):
    config = tmp_path / "fwd.toml"
    named = f'{{ key = "{LEAK_NAMED}", name = "carol", models = ["gpt-4o-mini"] }}'
    config.write_text(
        route_table("", flaky.url, [LEAK_SHORT, LEAK_BUSY, LEAK_REVOKED, LEAK_GOOD], f'["{LEAK_FORWARD}", {named}]')
        + route_table("/azure", flaky.url, [LEAK_AZURE_POOL], f'["{LEAK_AZURE_FORWARD}"]', kind="azure")
        + route_table("/dead", flaky.url, [LEAK_DEAD_A, LEAK_DEAD_B], f'["{LEAK_DEAD_FORWARD}"]')
    )
    pk1, pk2 = LEAK_PROXY
    body = {"model": "gpt-4o-mini", "messages": HI}
    traffic = [
        ("/v1/chat/completions", {"Authorization": f"Bearer {LEAK_FORWARD}:{pk1}"}, body, 200),
        ("/v1/chat/completions", {"Authorization": f"Bearer {LEAK_NAMED}:{pk2}"}, {**body, "stream": True}, 200),
        ("/v1/chat/completions", {"Authorization": f"Bearer {LEAK_NAMED}:{pk1}"}, {**body, "model": "gpt-4o"}, 403),
        ("/v1/chat/completions", {"Authorization": f"Bearer {LEAK_FORWARD}"}, body, 401),
        ("/v1/chat/completions", {"Authorization": f"Bearer {LEAK_FORWARD}:{pk1[:-1]}"}, body, 401),
        ("/v1/chat/completions", {"Authorization": f"Bearer {LEAK_UNKNOWN_FORWARD}:{pk1}"}, body, 401),
        ("/v1/chat/completions", {"Authorization": f"Bearer {LEAK_OWN}:{pk1}"}, body, 200),
        ("/v1/chat/completions", {"Authorization": f"Bearer {LEAK_OWN_REFUSED}:{pk2}"}, body, 401),
        ("/v1/chat/completions", {"Authorization": f"Bearer {pk1}"}, body, 401),
        ("/v1/chat/completions", {}, body, 401),
        ("/azure/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01",
         {"api-key": f"{LEAK_AZURE_FORWARD}:{pk2}"}, body, 200),
        ("/azure/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01",
         {"api-key": LEAK_AZURE_FORWARD}, body, 401),
        ("/dead/v1/chat/completions", {"Authorization": f"Bearer {LEAK_DEAD_FORWARD}:{pk1}"}, body, 429),
        ("/dead/v1/chat/completions", {"Authorization": f"Bearer {LEAK_DEAD_FORWARD}:{pk1}"}, body, 429),
    ]
    watch = Watch(flaky)
    errors = []
    env = {"PROXY_KEY": f"{pk1} {pk2}"}
    with daemon_process(["--config", str(config)], env=env) as proxy:
        for path, headers, payload, status in traffic:
            response = httpx.post(proxy.url + path, json=payload, headers=headers)
            assert response.status_code == status, (path, response.text)
            if status >= 400:
                errors.append(response.text)
    log = proxy.output  # complete: the daemon has exited

    assert f"key {mask(LEAK_BUSY)} rate limited" in log and f"key {mask(LEAK_REVOKED)} rejected" in log
    assert f"key {mask(LEAK_DEAD_A)} rejected" in log and "carol" in log, "the traffic was logged"
    assert "key *** rate limited" in log and LEAK_SHORT[-4:] not in log, "a short key is masked entirely"
    pool = [LEAK_SHORT, LEAK_BUSY, LEAK_REVOKED, LEAK_GOOD, LEAK_AZURE_POOL, LEAK_DEAD_A, LEAK_DEAD_B]
    gate = [LEAK_FORWARD, LEAK_NAMED, LEAK_AZURE_FORWARD, LEAK_DEAD_FORWARD, LEAK_UNKNOWN_FORWARD, *LEAK_PROXY]
    for secret in [*pool, *gate, LEAK_OWN, LEAK_OWN_REFUSED]:
        for part in hidden_parts(secret):
            assert part not in log, f"{mask(secret)} leaked into the daemon's log"
            assert not any(part in error for error in errors), f"{mask(secret)} leaked into an error body"
    upstream_saw = json.dumps(watch.records())
    for secret in gate:
        assert secret not in upstream_saw, f"{mask(secret)} was sent to the upstream"


@pytest.mark.parametrize(
    ("env", "named", "secret"),
    [
        ({"FORWARD_KEY": "fk-fine-key-0001 sk-wrong-kind-of-key-0002"}, "FORWARD_KEY", "sk-wrong-kind-of-key-0002"),
        ({"OPENAI_API_KEY": "sk-has:a-colon-0003"}, "OPENAI_API_KEY", "sk-has:a-colon-0003"),
        ({"PROXY_KEY": "pk-has:a-colon-0004"}, "PROXY_KEY", "pk-has:a-colon-0004"),
    ],
)
def test_a_bad_key_setting_stops_startup_with_one_line_that_does_not_repeat_the_key(tmp_path, env, named, secret):
    result = subprocess.run(
        [*twistd_command(), "-n", "--pidfile=", "openai-forward", "--port", "tcp:0:interface=127.0.0.1"],
        cwd=tmp_path, env=DaemonProcess.base_env({"OPENAI_API_KEY": "sk-pool-key-0005", **env}),
        capture_output=True, text=True, timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert len(output.splitlines()) == 1 and named in output, output
    for part in hidden_parts(secret) + [secret.split(":")[0], secret.split(":")[-1]]:
        assert part not in output


def test_after_all_this_modules_traffic_no_shared_daemon_has_logged_a_key(
    pooled, forward_keys_only, no_auth, failover, gated, behind_proxy, routed
):
    logs = [proxy.output for proxy in (pooled, forward_keys_only, no_auth, failover, gated, behind_proxy, routed)]
    assert all("starting on" in log for log in logs)
    for secret in MODULE_SECRETS:
        for part in hidden_parts(secret):
            assert not any(part in log for log in logs), f"{mask(secret)} leaked into a daemon's log"

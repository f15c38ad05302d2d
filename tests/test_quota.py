"""Limits, usage and budgets through the whole gateway, in memory on a Clock: what a limited caller gets."""

import json

from twisted.logger import globalLogPublisher

from fwd import config
from fwd.quota import Reservation, demand_for, plan_for, reservation
from tests.support.memory import MemoryProxy, split_response

POOL = "sk-quota-pool-key-0000000001"
ALICE = "fk-quota-alice-0000000000001"
BOB = "fk-quota-bob-00000000000000001"


def proxy_with(tmp_path, alice: str, route: str = "", **settings) -> MemoryProxy:
    path = tmp_path / "limits.toml"
    path.write_text(
        f'[[route]]\nbase_url = "http://upstream.test"\napi_keys = ["{POOL}"]\n{route}\n'
        f'forward_keys = [{{ key = "{ALICE}", name = "alice"{", " + alice if alice else ""} }}, '
        f'{{ key = "{BOB}", name = "bob" }}]\n'
    )
    cli = {key: value for key, value in settings.items()}
    return MemoryProxy(config=config.load(cli, environ={}, dotenv_path=None, config_file=str(path)))


def chat(stream=False, **extra) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}], "stream": stream}
    body.update(extra)
    return json.dumps(body).encode()


def request(key: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nContent-Type: application/json\r\n" + extra + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class Events:
    """Access events seen while in use."""

    def __enter__(self):
        self.seen = []
        globalLogPublisher.addObserver(self.observe)
        return self

    def observe(self, event):
        if event.get("log_namespace") == "fwd.access":
            self.seen.append(event)

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.observe)


def test_a_key_limited_to_10_a_second_gets_10_of_50_at_once_the_rest_429_with_openais_headers(tmp_path):
    proxy = proxy_with(tmp_path, 'rpm = "10/second"')
    raw = [proxy.raw(request(ALICE, chat())).value() for _ in range(50)]
    assert raw[0].lower().count(b"\r\nx-ratelimit-limit-requests:") == 1, "the upstream's own is not passed on"
    answers = [split_response(answer) for answer in raw]
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 10 and statuses.count(429) == 40
    status, headers, body = answers[-1]
    error = json.loads(body)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert headers[b"retry-after"] == b"1"
    assert headers[b"x-ratelimit-limit-requests"] == b"10" and headers[b"x-ratelimit-remaining-requests"] == b"0"
    ok = answers[0][1]
    assert ok[b"x-ratelimit-limit-requests"] == b"10", "the caller sees its own limit, not the upstream's"
    proxy.advance(0.1)
    assert split_response(proxy.raw(request(ALICE, chat())).value())[0] == 200, "refilled at 10 a second"
    assert split_response(proxy.raw(request(BOB, chat())).value())[0] == 200, "another key is not limited"
    assert len(proxy.upstream.received) == 12


def test_a_route_limit_holds_for_everyone_the_route_serves(tmp_path):
    proxy = proxy_with(tmp_path, "", route='rpm = "3/minute"')
    statuses = [split_response(proxy.raw(request(key, chat())).value())[0] for key in (ALICE, BOB, ALICE, BOB)]
    assert statuses == [200, 200, 200, 429]


def test_a_request_reserving_more_than_its_tpm_is_refused_without_a_retry(tmp_path):
    proxy = proxy_with(tmp_path, 'tpm = "100/minute"')
    status, headers, body = split_response(proxy.raw(request(ALICE, chat(max_tokens=500))).value())
    assert status == 429 and b"retry-after" not in headers and headers[b"x-should-retry"] == b"false"
    assert "max_tokens" in json.loads(body)["error"]["message"]
    assert split_response(proxy.raw(request(ALICE, chat(max_tokens=20))).value())[0] == 200


def test_tokens_are_charged_from_the_upstreams_usage_not_the_reservation(tmp_path):
    proxy = proxy_with(tmp_path, 'tpm = "1000/minute"')
    with Events() as events:
        proxy.raw(request(ALICE, chat(max_tokens=400)))
    event = events.seen[-1]
    assert (event["input_tokens"], event["output_tokens"], event["estimated"]) == (3, 4, False)
    # The reservation (body / 4 + 400) was given back: 1000 - 7 tokens remain, so 2 more reservations fit.
    statuses = [split_response(proxy.raw(request(ALICE, chat(max_tokens=400))).value())[0] for _ in range(3)]
    assert statuses[:2] == [200, 200]


def test_a_stream_is_charged_its_usage_and_the_client_never_sees_the_usage_the_proxy_asked_for(tmp_path):
    proxy = proxy_with(tmp_path, 'tpm = "100000/minute"')
    with Events() as events:
        limited = split_response(proxy.raw(request(ALICE, chat(stream=True), b"x-fake-chunks: 3\r\n")).value())
    asked = json.loads(proxy.upstream.received[-1].body)
    assert asked["stream_options"] == {"include_usage": True}, "the upstream was asked for the usage"
    plain = MemoryProxy()
    unlimited = split_response(plain.raw(request("sk-own-key-000000000001", chat(stream=True),
                                                 b"x-fake-chunks: 3\r\n")).value())

    def events_of(body):
        return [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]

    got, expected = events_of(limited[2]), events_of(unlimited[2])
    for event in got + expected:
        event.pop("id"), event.pop("created")
    assert got == expected, "the client gets exactly the stream it would have had"
    assert b'"usage"' not in limited[2]
    event = events.seen[-1]
    assert (event["input_tokens"], event["output_tokens"], event["estimated"]) == (3, 4, False)


def test_a_client_that_asked_for_usage_itself_gets_its_usage_chunk(tmp_path):
    proxy = proxy_with(tmp_path, 'tpm = "100000/minute"')
    body = chat(stream=True, stream_options={"include_usage": True})
    _, _, answer = split_response(proxy.raw(request(ALICE, body)).value())
    assert b'"usage": {"prompt_tokens": 3' in answer or b'"usage":{"prompt_tokens":3' in answer
    assert json.loads(proxy.upstream.received[-1].body) == json.loads(body), "its request went as it was"


def test_an_aborted_stream_is_charged_its_estimate(tmp_path):
    proxy = proxy_with(tmp_path, 'tpm = "100000/minute"')
    with Events() as events:
        protocol_transport = proxy.raw(request(ALICE, chat(stream=True), b"x-fake-chunks: 10\r\nx-fake-interval: 1\r\n"))
        proxy.advance(2)
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        proxy.raw_protocol.connectionLost(Failure(ConnectionLost()))
        proxy.flush()
    assert b"data: " in protocol_transport.value()
    event = events.seen[-1]
    assert event["status"] == 499 and event["estimated"] is True and event["input_tokens"] > 0


def test_max_parallel_refuses_the_request_over_the_cap_until_one_ends(tmp_path):
    proxy = proxy_with(tmp_path, "max_parallel = 2")
    slow = b"x-fake-chunks: 3\r\nx-fake-interval: 5\r\n"
    first = proxy.raw(request(ALICE, chat(stream=True), slow))
    second = proxy.raw(request(ALICE, chat(stream=True), slow))
    status, _, body = split_response(proxy.raw(request(ALICE, chat())).value())
    assert status == 429 and "at once" in json.loads(body)["error"]["message"]
    for _ in range(8):
        proxy.advance(5)
    assert first.value().endswith(b"0\r\n\r\n") and second.value().endswith(b"0\r\n\r\n")
    assert split_response(proxy.raw(request(ALICE, chat())).value())[0] == 200


def test_a_token_budget_runs_out_with_insufficient_quota_and_renews_the_next_utc_day(tmp_path):
    proxy = proxy_with(tmp_path, 'budget = { tokens = 100, period = "day" }')
    proxy.clock.advance(86_400 * 20_000 + 3600)  # 2024-10-04 01:00 UTC
    statuses = []
    for _ in range(12):
        statuses.append(split_response(proxy.raw(request(ALICE, chat(max_tokens=5))).value())[0])
    # Each uses 7 tokens and reserves about 35: admitted while used + 35 fits in 100.
    assert statuses == [200] * 10 + [429] * 2
    status, headers, body = split_response(proxy.raw(request(ALICE, chat(max_tokens=5))).value())
    error = json.loads(body)["error"]
    assert status == 429 and error["code"] == "insufficient_quota" and "2024-10-05T00:00:00Z" in error["message"]
    assert headers[b"x-should-retry"] == b"false"
    proxy.advance(86_400 - 3600)
    assert split_response(proxy.raw(request(ALICE, chat(max_tokens=5))).value())[0] == 200, "renewed at midnight"


def test_the_reservation_counts_the_prompt_and_what_may_be_generated():
    assert reservation("chat", 400, {"max_tokens": 50, "n": 2}, 4096, {}, None) == Reservation(100, 100)
    assert reservation("chat", 40, {}, 256, {}, None) == Reservation(10, 256)
    assert reservation("embeddings", 80, {"max_tokens": 9}, 256, {}, None) == Reservation(20, 0)
    route = config.Route(prefix="", base_url="http://u", limits=config.Limits(rpm=config.Rate(5, 60.0)))
    demand = demand_for(plan_for(route, None, config.NO_LIMITS), Reservation(10, 5))
    assert [(c.limit_id, c.cost) for c in demand.rates] == [("route:/:rpm", 1)]


def test_with_usage_off_a_request_rate_limit_alone_leaves_the_stream_as_the_client_asked_for_it(tmp_path):
    proxy = proxy_with(tmp_path, 'rpm = "100/minute"', usage="false")
    body = chat(stream=True)
    status, headers, answer = split_response(proxy.raw(request(ALICE, body, b"x-fake-chunks: 3\r\n")).value())
    assert status == 200 and headers[b"x-ratelimit-limit-requests"] == b"100"
    assert json.loads(proxy.upstream.received[-1].body) == json.loads(body), "no stream_options asked for"
    limited = proxy_with(tmp_path, 'tpm = "100000/minute"', usage="false")
    limited.raw(request(ALICE, body, b"x-fake-chunks: 3\r\n"))
    asked = json.loads(limited.upstream.received[-1].body)
    assert asked["stream_options"] == {"include_usage": True}, "a token limit settles on the real usage"

"""The upstream key pool: rotation, rest after 429, disabling after 401/403, and what it logs."""

from collections import Counter
from datetime import datetime, timezone
from email.utils import format_datetime

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from fwd.keys import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    MAX_RETRY_AFTER,
    REPROBE_AFTER,
    KeyPool,
    retry_after_seconds,
)

A = "sk-proj-AAAAAAAAAAAAAAAAAAAA1111"
B = "sk-proj-BBBBBBBBBBBBBBBBBBBB2222"
C = "sk-proj-CCCCCCCCCCCCCCCCCCCC3333"


def make_pool(*keys, events=None):
    clock = Clock()
    clock.advance(1000)
    kw = {} if events is None else {"log": Logger(namespace="fwd.keys", observer=events.append)}
    return KeyPool(keys or (A, B, C), clock, **kw), clock


def test_keys_are_used_in_turn():
    pool, _ = make_pool()
    assert [pool.pick() for _ in range(6)] == [A, B, C, A, B, C]


def test_rotation_spreads_requests_evenly_over_three_keys():
    pool, _ = make_pool()
    assert Counter(pool.pick() for _ in range(300)) == {A: 100, B: 100, C: 100}


def test_pick_skips_keys_this_request_already_tried():
    pool, _ = make_pool()
    assert {pool.pick(exclude={A}) for _ in range(10)} == {B, C}
    assert pool.pick(exclude={A, B, C}) is None


def test_a_429_with_retry_after_rests_the_key_exactly_that_long():
    pool, clock = make_pool(A, B)
    pool.rate_limited(A, 30)
    clock.advance(29.9)
    assert {pool.pick() for _ in range(4)} == {B}
    clock.advance(0.1)
    assert {pool.pick() for _ in range(4)} == {A, B}


def test_a_very_long_retry_after_is_capped():
    pool, clock = make_pool(A)
    pool.rate_limited(A, 10 * MAX_RETRY_AFTER)
    assert pool.retry_after() == MAX_RETRY_AFTER
    clock.advance(MAX_RETRY_AFTER)
    assert pool.pick() == A


def test_a_429_without_retry_after_backs_off_doubling_up_to_a_cap():
    pool, clock = make_pool(A)
    pauses = []
    for _ in range(9):
        pool.rate_limited(A, None)
        pauses.append(pool.retry_after())
        clock.advance(pauses[-1])
        assert pool.pick() == A
    assert pauses[:6] == [FIRST_BACKOFF * 2**n for n in range(6)]
    assert pauses[-1] == MAX_BACKOFF and max(pauses) == MAX_BACKOFF


def test_a_key_429d_for_days_keeps_backing_off_without_breaking():
    pool, clock = make_pool(A)
    for _ in range(2000):
        pool.rate_limited(A, None)
        clock.advance(pool.retry_after())
    pool.rate_limited(A, None)
    assert pool.retry_after() == MAX_BACKOFF


def test_a_401_disables_the_key_until_it_is_reprobed():
    pool, clock = make_pool(A, B)
    pool.rejected(A, 401)
    assert pool.health() == {"available": 1, "cooling": 0, "disabled": 1}
    assert {pool.pick() for _ in range(4)} == {B}
    clock.advance(REPROBE_AFTER - 1)
    assert {pool.pick() for _ in range(4)} == {B}
    clock.advance(1)
    assert {pool.pick() for _ in range(4)} == {A, B}


def test_all_disabled_tells_rejected_keys_from_rate_limited_ones():
    pool, _ = make_pool(A, B)
    pool.rejected(A, 403)
    pool.rate_limited(B, 5)
    assert not pool.all_disabled()
    pool.rejected(B, 401)
    assert pool.all_disabled()


def test_success_re_enables_a_rejected_key():
    pool, clock = make_pool(A)
    pool.rejected(A, 401)
    clock.advance(REPROBE_AFTER)
    assert pool.pick() == A
    pool.succeeded(A)
    assert pool.health() == {"available": 1, "cooling": 0, "disabled": 0}
    assert not pool.all_disabled()


def test_success_resets_the_backoff():
    pool, clock = make_pool(A)
    for _ in range(4):
        pool.rate_limited(A, None)
    clock.advance(pool.retry_after())
    pool.succeeded(A)
    pool.rate_limited(A, None)
    assert pool.retry_after() == FIRST_BACKOFF


def test_retry_after_is_the_wait_for_the_soonest_key():
    pool, clock = make_pool(A, B)
    assert pool.retry_after() == 0
    pool.rate_limited(A, 30)
    assert pool.retry_after() == 0  # B is free
    pool.rate_limited(B, 10)
    assert pool.retry_after() == 10
    clock.advance(4)
    assert pool.retry_after() == 6


def test_health_counts_keys_by_state():
    pool, clock = make_pool()
    pool.rate_limited(A, 10)
    pool.rejected(B, 401)
    assert pool.health() == {"available": 1, "cooling": 1, "disabled": 1}
    clock.advance(10)
    assert pool.health() == {"available": 2, "cooling": 0, "disabled": 1}


def test_unknown_keys_are_ignored():
    pool, _ = make_pool(A)
    pool.rate_limited("sk-someone-elses-key-0000", 30)
    pool.rejected("sk-someone-elses-key-0000", 401)
    pool.succeeded("sk-someone-elses-key-0000")
    assert pool.health() == {"available": 1, "cooling": 0, "disabled": 0}


def test_log_events_and_metrics_name_keys_only_masked():
    events = []
    pool, clock = make_pool(A, B, events=events)
    pool.rate_limited(A, 12)
    pool.rate_limited(B, None)
    pool.rejected(A, 401)
    clock.advance(REPROBE_AFTER)
    pool.succeeded(A)
    assert len(events) == 4
    texts = [formatEvent(event) for event in events]
    assert texts[0] == "key sk-…1111 rate limited, resting 12 s"
    assert "sk-…1111" in texts[2] and "401" in texts[2]
    assert texts[3] == "key sk-…1111 accepted again, enabled"
    for event, text in zip(events, texts):
        dump = text + repr(sorted(event.items(), key=lambda item: item[0]))
        assert A not in dump and B not in dump
    metrics = repr(pool.states()) + repr(pool)
    assert A not in metrics and B not in metrics and "sk-…2222" in metrics


# Retry-After as the upstream sends it ------------------------------------------------------------------------


def test_retry_after_in_seconds_is_read():
    assert retry_after_seconds([b"20"], now=0) == 20.0
    assert retry_after_seconds([b" 1.5 "], now=0) == 1.5


def test_retry_after_as_an_http_date_is_the_time_until_then():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    later = format_datetime(datetime(2025, 1, 1, 12, 0, 45, tzinfo=timezone.utc), usegmt=True).encode()
    assert retry_after_seconds([later], now=now.timestamp()) == pytest.approx(45)


@pytest.mark.parametrize("values", [None, [], [b"soon"], [b""]])
def test_a_missing_or_unreadable_retry_after_means_back_off(values):
    assert retry_after_seconds(values, now=0) is None


def test_a_retry_after_in_the_past_means_now():
    assert retry_after_seconds([b"Wed, 21 Oct 2015 07:28:00 GMT"], now=2e9) == 0.0
    assert retry_after_seconds([b"-5"], now=0) == 0.0


def test_a_429_for_an_exhausted_quota_rejects_the_key_while_a_rate_limit_only_rests_it():
    from fwd.keys import verdict

    quota = b'{"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}}'
    rate = b'{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}'
    assert verdict(429, quota) == "reject"
    assert verdict(429, rate) == "rest"
    assert verdict(429, b"not json") == "rest"


def test_a_403_about_the_region_is_passed_on_and_other_refusals_reject_the_key():
    from fwd.keys import verdict

    region = b'{"error": {"code": "unsupported_country_region_territory", "message": "Country not supported"}}'
    assert verdict(403, region) == "relay"
    assert verdict(403, b'{"error": {"code": "invalid_api_key"}}') == "reject"
    assert verdict(401, region) == "reject"
    assert verdict(401, b"") == "reject"

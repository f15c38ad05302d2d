"""Choosing among a route's upstreams and resting the ones that fail (fwd.balance)."""

from __future__ import annotations

import random
from collections import Counter

from fwd import balance
from fwd.balance import UpstreamHealth, choose


def served(healths, weights=None, draws=2000, now=0.0, seed=7):
    rng = random.Random(seed)
    weights = weights or [1.0] * len(healths)
    return Counter(choose(list(zip(weights, healths)), now, rng) for _ in range(draws))


def measured(latency: float, now: float = 0.0) -> UpstreamHealth:
    health = UpstreamHealth()
    health.started(now)
    health.answered(now, latency)
    return health


def test_equal_upstreams_share_by_weight():
    counts = served([UpstreamHealth(), UpstreamHealth()], weights=[3.0, 1.0])
    assert 0.65 < counts[0] / 2000 < 0.85


def test_a_few_milliseconds_apart_is_a_tie_but_a_slow_upstream_gets_little():
    counts = served([measured(0.001), measured(0.004)])
    assert 0.4 < counts[0] / 2000 < 0.6
    counts = served([measured(0.001), measured(0.2)])
    assert counts[0] / 2000 > 0.95 and counts[1] > 0, "explored now and then, so a recovery is seen"


def test_a_busy_upstream_gets_less():
    busy = UpstreamHealth()
    for _ in range(5):
        busy.started(0.0)
    counts = served([busy, UpstreamHealth()])
    assert counts[1] / 2000 > 0.9


def test_a_slow_answer_fades_while_nothing_measures_again():
    slow = measured(0.5)
    assert slow.recent(0.0) == 0.5
    assert abs(slow.recent(balance.HALF_LIFE) - (balance.LATENCY_FLOOR + (0.5 - balance.LATENCY_FLOOR) / 2)) < 1e-9
    assert slow.recent(100 * balance.HALF_LIFE) < balance.LATENCY_FLOOR * 1.01


def test_a_failing_upstream_rests_longer_each_time_then_gets_one_trial():
    health = UpstreamHealth()
    rests = []
    now = 0.0
    for _ in range(9):
        health.started(now)
        rests.append(health.failed(now, "connection refused"))
        assert health.state(now) == balance.RESTING and not health.available(now)
        now = health.resting_until
    assert rests == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert health.state(now) == balance.TRIAL and health.available(now)
    health.started(now)
    assert not health.available(now), "one trial at a time"
    health.answered(now, 0.01)
    assert health.state(now) == balance.SERVING and health.failures == 0 and health.errors == 9


def test_a_due_trial_goes_first_and_none_available_is_none():
    resting, fine = UpstreamHealth(), UpstreamHealth()
    resting.started(0.0)
    resting.failed(0.0, "500")
    assert served([resting, fine], now=0.5)[1] == 2000
    assert choose([(1.0, resting), (1.0, fine)], 1.0, random.Random(1)) == 0
    resting.started(1.0)
    assert choose([(1.0, resting)], 1.0, random.Random(1)) is None


def test_a_client_that_leaves_frees_the_trial():
    health = UpstreamHealth()
    health.started(0.0)
    health.failed(0.0, "timeout")
    health.started(1.0)
    health.left()
    assert health.available(1.0) and health.in_flight == 0


def test_attempts_already_on_their_way_fail_with_the_blip_and_do_not_lengthen_the_rest():
    health = UpstreamHealth()
    for _ in range(8):
        health.started(0.0)
    rests = [health.failed(0.5 + n * 0.01, "connection refused", sent_at=0.0) for n in range(8)]
    assert health.failures == 1 and health.errors == 8 and max(rests) <= 1.0
    health.started(0.0)
    health.answered(0.6, 0.6)  # sent before the failure: proves nothing about now
    assert health.state(0.6) == balance.RESTING
    assert health.in_flight == 0


def test_rests_stop_growing_however_long_an_upstream_fails():
    health = UpstreamHealth()
    now = 0.0
    for _ in range(2000):
        health.started(now)
        assert health.failed(now, "503", sent_at=now) <= balance.MAX_COOLDOWN
        now += 0.001

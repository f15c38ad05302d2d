"""The Redis scripts against a real redis-server: the same decisions, headers and budgets as the in-memory
Limiter of fwd.limits, step for step, on the same clock."""

from __future__ import annotations

import random

import pytest
from twisted.internet.task import Clock

from fwd import config
from fwd.limits import Limiter, Rate, Refusal, Spend, parse_budget
from fwd.quota import Reservation, plan_for
from fwd.redis_scripts import (
    ADMIT,
    EPOCH,
    LEASE_SECONDS,
    SETTLE,
    RedisTicket,
    admit_call,
    admit_result,
    settle_many,
    settle_record,
)

NOW = 1_796_000_000.0  # 2026-11-30


class Scripts:
    """ADMIT and SETTLE through redis-py, as fwd.shared runs them through txredisapi."""

    def __init__(self, client):
        self.client = client
        self.admit_sha = client.script_load(ADMIT)
        self.settle_sha = client.script_load(SETTLE)

    def admit(self, plan, tokens: int, cost: float, unix: float, lease: float = LEASE_SECONDS):
        call = admit_call(plan, tokens, cost, unix, lease)
        return admit_result(call, self.client.evalsha(self.admit_sha, len(call.keys), *call.keys, *call.args))

    def settle(self, ticket: RedisTicket, tokens, cost, unix: float) -> None:
        keys, args = settle_many([settle_record(ticket, tokens, cost)], unix)
        self.client.evalsha(self.settle_sha, len(keys), *keys, *args)

    def settle_together(self, endings: list, unix: float) -> int:
        """Several tickets ended in one SETTLE call, as an instance sends the settlements of one reactor turn."""
        keys, args = settle_many([settle_record(ticket, tokens, cost) for ticket, tokens, cost in endings], unix)
        return self.client.evalsha(self.settle_sha, len(keys), *keys, *args)


@pytest.fixture
def scripts(redis_server):
    client = redis_server.client()
    client.flushall()
    return Scripts(client)


def plan_of(route_limits=None, **key_limits):
    key = config.ForwardKey("fk-scripts-alice-000000000001", "alice", limits=config.Limits(**key_limits))
    route = config.Route(prefix="/team", base_url="http://u.test", forward_keys=(key,),
                         limits=route_limits or config.NO_LIMITS)
    return plan_for(route, "alice", key.limits)


def limiter_at_now() -> tuple[Limiter, Clock]:
    """An in-memory Limiter counting time from the scripts' EPOCH: the same doubles, the same roundings."""
    clock = Clock()
    clock.advance(EPOCH)
    limiter = Limiter(clock)
    clock.advance(NOW - EPOCH)
    return limiter, clock


def decide_both(limiter, scripts, plan, tokens, cost, unix, clock):
    """The same request decided in memory and in Redis (whose leases, which the in-memory Limiter has no need
    of, outlast the walk)."""
    clock.advance(unix - clock.seconds())
    local = plan.admit(limiter, Reservation(tokens, 0, cost))
    shared = scripts.admit(plan, tokens, cost, unix, lease=1e9)
    return local, shared


def same(local, shared) -> None:
    assert isinstance(shared, Refusal) == isinstance(local, Refusal), (local, shared)
    assert shared.headers() == local.headers()
    if isinstance(local, Refusal):
        assert (shared.reason, shared.limit_id, shared.message) == (local.reason, local.limit_id, local.message)
        if local.retry_after is not None:
            assert shared.retry_after == pytest.approx(local.retry_after, abs=1e-6)


def test_ten_a_second_admits_ten_at_once_then_one_each_tenth_the_same_as_in_memory(scripts):
    plan = plan_of(rpm=Rate(10, 1.0))
    limiter, clock = limiter_at_now()
    outcomes = [decide_both(limiter, scripts, plan, 0, 0.0, NOW, clock) for _ in range(12)]
    for local, shared in outcomes:
        same(local, shared)
    assert [isinstance(shared, Refusal) for _, shared in outcomes] == [False] * 10 + [True] * 2
    assert dict(outcomes[-1][1].headers())[b"retry-after"] == b"1"
    local, shared = decide_both(limiter, scripts, plan, 0, 0.0, NOW + 0.1, clock)
    same(local, shared)
    assert not isinstance(shared, Refusal)


@pytest.mark.parametrize("together", [1, 3])
def test_a_random_day_of_a_team_decides_alike_in_redis_and_in_memory(scripts, together):
    """Rates of the key and the route, tokens settled with real usage (one ticket per SETTLE call, or up to three
    in one), a parallel cap and a token budget."""
    plan = plan_of(
        route_limits=config.Limits(rpm=Rate(30, 60.0)),
        rpm=Rate(12, 10.0), tpm=Rate(5000, 60.0), max_parallel=3,
        budget=parse_budget({"tokens": 16_000, "period": "day"}),
    )
    rng = random.Random(7)
    limiter, clock = limiter_at_now()
    unix = NOW
    open_tickets = []
    refusals = set()
    for step in range(400):
        unix += rng.choice([0.0, 0.0, 0.05, 0.3, 1.0, 4.0])
        if open_tickets and rng.random() < 0.3:
            clock.advance(unix - clock.seconds())
            endings = []
            for _ in range(min(len(open_tickets), rng.randint(1, together))):
                local_ticket, shared_ticket = open_tickets.pop(rng.randrange(len(open_tickets)))
                if rng.random() < 0.8:
                    used = rng.randrange(0, 1500)
                    limiter.settle(local_ticket, used, None)
                    endings.append((shared_ticket, used, None))
                else:
                    limiter.release(local_ticket)
                    endings.append((shared_ticket, None, None))
            if together == 1:
                scripts.settle(*endings[0], unix)
            else:
                assert scripts.settle_together(endings, unix) == len(endings)
            continue
        tokens = rng.choice([10, 200, 900, 2000, 6000])
        local, shared = decide_both(limiter, scripts, plan, tokens, 0.0, unix, clock)
        same(local, shared)
        if isinstance(local, Refusal):
            refusals.add(local.reason)
        else:
            open_tickets.append((local, shared))
    assert {"rate", "too_large", "parallel", "budget"} <= refusals, "the walk met every kind of refusal"
    budget = limiter.budget("budget:/team:alice")
    assert budget is not None
    day = scripts.client.hgetall(f"fwd:bud:budget:/team:alice:{budget[0]}")
    assert float(day.get(b"ut", 0)) == budget[1].tokens


def test_a_reservation_whose_instance_died_runs_out_with_its_lease(scripts):
    plan = plan_of(max_parallel=1, budget=parse_budget({"tokens": 1000, "period": "month"}))
    held = scripts.admit(plan, 900, 0.0, NOW)
    assert isinstance(held, RedisTicket)
    assert scripts.admit(plan, 50, 0.0, NOW + 1).reason in ("parallel", "budget")
    later = scripts.admit(plan, 900, 0.0, NOW + 901)
    assert isinstance(later, RedisTicket), "the lease of the lost request ran out after 15 minutes"
    scripts.settle(held, 900, None, NOW + 902)  # too late: its reservation is gone, so is its charge
    scripts.settle(later, 100, None, NOW + 903)
    month = scripts.client.hgetall(next(iter(scripts.client.scan_iter("fwd:bud:*-11"))))
    assert float(month[b"ut"]) == 100
    assert float(month[b"ht"]) == 0, "the lapsed reservation left the sum of those held once, not twice"


def test_keys_in_redis_name_limits_never_keys(scripts):
    plan = plan_of(rpm=Rate(5, 60.0), tpm=Rate(100, 60.0), max_parallel=2,
                   budget=parse_budget({"tokens": 100, "cost": 1.0, "period": "day"}))
    ticket = scripts.admit(plan, 10, 0.01, NOW)
    scripts.settle(ticket, 5, 0.005, NOW + 1)
    names = [name.decode() for name in scripts.client.keys("*")]
    assert names and all(name.startswith("fwd:") for name in names)
    assert not any("fk-" in name or "sk-" in name for name in names)


def test_spend_and_cost_budgets_are_refused_with_the_in_memory_message(scripts):
    plan = plan_of(budget=parse_budget({"cost": 0.02, "period": "day"}))
    limiter, clock = limiter_at_now()
    for _ in range(3):
        local, shared = decide_both(limiter, scripts, plan, 100, 0.009, NOW, clock)
        same(local, shared)
    assert isinstance(shared, Refusal) and "0.002 of 0.02" in shared.message
    assert limiter.budget("budget:/team:alice")[2] == Spend(200, 0.018)


def test_an_absurd_usage_does_not_fail_the_other_settlements_of_its_call(scripts):
    plan = plan_of(tpm=Rate(5000, 60.0), max_parallel=3)
    tickets = [scripts.admit(plan, 10, 0.0, NOW) for _ in range(3)]
    assert all(isinstance(t, RedisTicket) for t in tickets)
    ended = scripts.settle_together([(tickets[0], 2**64 - 1, None), (tickets[1], 5, None), (tickets[2], None, None)],
                                    NOW + 1)
    assert ended == 3
    assert scripts.client.zcard(tickets[0].parallel_keys[0]) == 0, "every slot came back"


def test_a_budget_periods_keys_end_a_day_after_the_period_even_when_its_held_set_empties_and_fills_again(scripts):
    plan = plan_of(budget=parse_budget({"tokens": 10_000, "period": "day"}))
    first = scripts.admit(plan, 10, 0.0, NOW)
    spent = first.budget_keys[0]
    scripts.settle(first, 5, None, NOW + 1)  # the held set is empty now: Redis deletes it
    second = scripts.admit(plan, 10, 0.0, NOW + 2)
    end_of_day = (NOW // 86_400 + 1) * 86_400
    for key in (spent, spent + ":held"):
        ttl = scripts.client.ttl(key)
        assert end_of_day - NOW + 86_400 - 5 <= ttl <= end_of_day - NOW + 86_400 + 5, (key, ttl)
    scripts.settle(second, 5, None, NOW + 3)
    assert float(scripts.client.hget(spent, "ut")) == 10

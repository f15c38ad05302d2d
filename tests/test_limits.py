"""Rate limits, parallel caps and budgets: what a team sharing a pool of keys sees, on a clock we drive."""

from datetime import datetime, timezone
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from fwd.limits import (
    MAX_COST,
    BudgetCharge,
    BudgetRule,
    Check,
    Demand,
    Limiter,
    Parallel,
    Price,
    Rate,
    RateCharge,
    Refusal,
    Spend,
    Ticket,
    admit_all,
    admit_one,
    format_reset,
    parse_budget,
    parse_rate,
    period_key,
    price_for,
    rate_limit_headers,
    renews_at,
    reserve_tokens,
    retry_after_header,
    settle,
    slack,
)

UNIX_NOW = 1_795_000_000.123  # 2026-11-18, a realistic reactor time


def unix(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def limiter_at(when: float = 0.0) -> tuple[Limiter, Clock]:
    clock = Clock()
    clock.advance(when)
    return Limiter(clock), clock


def rpm(limit: int, name: str = "key:alice:rpm", period: float = 60.0) -> RateCharge:
    return RateCharge(name, Rate(limit, period), 1, "requests")


def tpm(limit: int, cost: int, name: str = "key:alice:tpm") -> RateCharge:
    return RateCharge(name, Rate(limit, 60.0), cost, "tokens")


def burst(rate: Rate, now: float, tat: float | None = None) -> tuple[int, float]:
    """How many unit requests one instant admits, and the state after."""
    tat = now if tat is None else tat
    count = 0
    while count <= rate.limit + 1:
        outcome = admit_one(rate, tat, 1, now)
        if not outcome.allowed:
            break
        tat, count = outcome.tat, count + 1
    return count, tat


# ---- the config values -------------------------------------------------------------------------------------


def test_a_bare_integer_means_requests_per_minute():
    assert parse_rate(60) == Rate(60, 60.0)
    assert parse_rate(60.0) == Rate(60, 60.0)
    assert parse_rate(" 60 ") == Rate(60, 60.0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10/second", Rate(10, 1.0)),
        ("60/minute", Rate(60, 60.0)),
        ("1000/hour", Rate(1000, 3600.0)),
        ("5/day", Rate(5, 86400.0)),
        (" 60 / Minute ", Rate(60, 60.0)),
        ("60/minutes", Rate(60, 60.0)),
        ("60 per minute", Rate(60, 60.0)),
        ("2 PER HOURS", Rate(2, 3600.0)),
        ("1000000000/day", Rate(10**9, 86400.0)),
    ],
)
def test_openai_forward_style_rates_are_understood_in_any_case_and_spacing(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    "value",
    [0, -1, True, False, 1.5, float("nan"), float("inf"), 10**9 + 1, None, [60], "", "0/minute", "-5/minute",
     "60/week", "60/2 minutes", "60 minute", "60/min", "1e3", "6O/minute", "\u0666\u0660", "60/minute/hour",
     "9" * 13 + "/minute", "60perminute"],
)
def test_a_bad_rate_is_refused_with_one_line_naming_the_accepted_forms(value):
    with pytest.raises(ValueError) as caught:
        parse_rate(value)
    message = str(caught.value)
    assert '"N/minute"' in message and "whole number per minute" in message and "\n" not in message


def test_a_rate_cannot_be_built_outside_its_range():
    for limit, period in [(0, 60), (10**9 + 1, 60), (True, 60), (5, 0), (5, -1), (5, float("inf"))]:
        with pytest.raises(ValueError):
            Rate(limit, period)


def test_budgets_parse_from_their_config_table():
    assert parse_budget({"tokens": 1000, "period": "day"}) == BudgetRule(tokens=1000, period="day")
    assert parse_budget({"cost": 5}) == BudgetRule(cost=5.0, period="month")
    assert parse_budget({"tokens": 1e6, "cost": 2.5}) == BudgetRule(tokens=10**6, cost=2.5)
    for table in [{}, {"tokens": 0}, {"tokens": True}, {"tokens": 10, "period": "week"}, {"tokens": 1, "x": 2},
                  {"cost": float("nan")}, {"cost": -1.0}, "1000", {"tokens": 1.5}]:
        with pytest.raises(ValueError):
            parse_budget(table)


# ---- one limit -----------------------------------------------------------------------------------------------


def test_exactly_limit_requests_pass_at_once_then_one_per_emission_interval():
    limiter, clock = limiter_at(1000)
    demand = Demand([rpm(60)])
    assert all(isinstance(limiter.admit(demand), Ticket) for _ in range(60))
    refused = limiter.admit(demand)
    assert isinstance(refused, Refusal) and refused.reason == "rate" and refused.retry_after == pytest.approx(1.0)
    for _ in range(5):
        clock.advance(0.999)
        assert isinstance(limiter.admit(demand), Refusal)
        clock.advance(0.001)
        assert isinstance(limiter.admit(demand), Ticket)
        assert isinstance(limiter.admit(demand), Refusal)


@pytest.mark.parametrize("limit", [1, 7, 60, 1000])
@pytest.mark.parametrize("period", [1.0, 60.0, 3600.0, 86400.0])
def test_a_burst_at_one_instant_counts_exactly_even_at_unix_time(limit, period):
    assert burst(Rate(limit, period), UNIX_NOW)[0] == limit


def test_the_limiter_counts_a_burst_of_ten_thousand_exactly_after_a_month_of_uptime():
    limit, period = 10_000, 1.0
    limiter, clock = limiter_at(UNIX_NOW)
    clock.advance(31 * 86400 + 0.123)
    demand = Demand([rpm(limit, period=period)])
    admitted = 0
    while isinstance(limiter.admit(demand), Ticket):
        admitted += 1
    assert admitted == limit


def test_retry_after_is_exactly_when_the_request_fits():
    rate = Rate(1000, 60.0)  # tokens per minute: 0.06 s a token
    outcome = admit_one(rate, 0.0, 900, 0.0)
    refused = admit_one(rate, outcome.tat, 300, 0.0)
    assert not refused.allowed and refused.retry_after == pytest.approx(12.0)
    assert not admit_one(rate, outcome.tat, 300, 11.999).allowed
    assert admit_one(rate, outcome.tat, 300, 12.0).allowed


def test_a_refused_token_request_still_reports_the_tokens_left():
    rate = Rate(1000, 60.0)
    refused = admit_one(rate, admit_one(rate, 0.0, 900, 0.0).tat, 300, 0.0)
    assert (refused.allowed, refused.remaining, refused.reset) == (False, 100, pytest.approx(54.0))


def test_a_negative_cost_gives_no_units_back():
    rate = Rate(10, 10.0)
    assert admit_one(rate, 8.0, -5, 0.0).tat == 8.0
    assert settle(8.0, rate, -5, 0, 0.0) == 8.0


def test_a_refused_request_changes_no_state():
    rate = Rate(2, 60.0)
    tat = burst(rate, 5.0)[1]
    refused = admit_one(rate, tat, 1, 5.0)
    assert not refused.allowed and refused.tat == tat
    limiter, clock = limiter_at(5.0)
    limiter.admit(Demand([rpm(2)]))
    limiter.admit(Demand([rpm(2)]))
    before = limiter.tat("key:alice:rpm")
    for _ in range(10):
        assert isinstance(limiter.admit(Demand([rpm(2)])), Refusal)
    assert limiter.tat("key:alice:rpm") == before


def test_a_request_bigger_than_the_limit_is_refused_for_good_without_retry_after():
    assert admit_one(Rate(1000, 60.0), 0.0, 1001, 0.0).retry_after is None
    assert admit_one(Rate(1000, 60.0), 0.0, 10**400, 0.0).retry_after is None
    limiter, _ = limiter_at(10)
    refused = limiter.admit(Demand([rpm(60), tpm(1000, 4000)]))
    assert refused.reason == "too_large" and refused.limit_id == "key:alice:tpm" and refused.retry_after is None
    headers = dict(refused.headers())
    assert b"retry-after" not in headers and headers[b"x-should-retry"] == b"false"
    assert limiter.tat("key:alice:rpm") is None


def test_remaining_and_reset_count_down_through_a_burst_and_back_up_with_time():
    rate, tat = Rate(5, 10.0), 0.0
    seen = []
    for _ in range(5):
        outcome = admit_one(rate, tat, 1, 0.0)
        tat = outcome.tat
        seen.append((outcome.remaining, outcome.reset))
    assert seen == [(4, 2.0), (3, 4.0), (2, 6.0), (1, 8.0), (0, 10.0)]
    looking = admit_one(rate, tat, 0, 3.0)
    assert (looking.remaining, looking.reset) == (1, 7.0)
    assert admit_one(rate, tat, 0, 10.0).remaining == 5


def test_the_tolerance_for_float_rounding_stays_below_half_a_unit():
    for rate in [Rate(10**9, 1.0), Rate(1, 1.0), Rate(60, 60.0)]:
        for now in [0.0, UNIX_NOW, 4e9]:
            assert 0 < slack(rate, now) <= rate.emission / 2
    assert slack(Rate(60, 60.0), UNIX_NOW) < 0.002


# ---- several limits together ---------------------------------------------------------------------------------


def test_a_request_passes_only_if_every_limit_has_room_and_then_all_advance():
    key, route = Rate(10, 60.0), Rate(2, 60.0)
    verdict = admit_all([Check("key:a:rpm", key, 1, 0.0), Check("route:/:rpm", route, 1, 65.0)], 5.0)
    assert not verdict.allowed and verdict.failed == "route:/:rpm"
    assert [o.tat for o in verdict.outcomes] == [0.0, 65.0]
    assert verdict.retry_after == pytest.approx(30.0)
    verdict = admit_all([Check("key:a:rpm", key, 1, 0.0), Check("route:/:rpm", route, 1, 35.0)], 5.0)
    assert verdict.allowed and [o.tat for o in verdict.outcomes] == [11.0, 65.0]


def test_the_wait_is_the_longest_of_the_failing_limits_and_a_limit_never_met_is_named_first():
    a, b = Rate(1, 10.0), Rate(1, 100.0)
    verdict = admit_all([Check("a", a, 1, 10.0), Check("b", b, 1, 100.0)], 0.0)
    assert verdict.failed == "a" and verdict.retry_after == pytest.approx(100.0)
    verdict = admit_all([Check("a", a, 1, 10.0), Check("b", b, 2, 0.0)], 0.0)
    assert verdict.failed == "b" and verdict.retry_after is None


def test_one_request_cannot_name_the_same_limit_twice():
    with pytest.raises(ValueError):
        admit_all([Check("a", Rate(1, 1.0), 1, 0.0), Check("a", Rate(1, 1.0), 1, 0.0)], 0.0)
    with pytest.raises(ValueError):
        Demand([rpm(5), rpm(6)])


def test_a_refusal_by_any_limit_leaves_every_other_limit_untouched():
    limiter, _ = limiter_at(100)
    limiter.admit(Demand([rpm(1, "route:/:rpm")]))
    demand = Demand([rpm(10), tpm(1000, 100), rpm(1, "route:/:rpm")], [Parallel("key:alice:parallel", 4)])
    refused = limiter.admit(demand)
    assert refused.reason == "rate" and refused.limit_id == "route:/:rpm"
    assert limiter.tat("key:alice:rpm") is None and limiter.tat("key:alice:tpm") is None
    assert limiter.in_flight("key:alice:parallel") == 0


def test_a_refusal_by_budget_or_parallel_cap_leaves_rate_limits_untouched():
    limiter, _ = limiter_at(unix("2026-11-30T09:00:00"))
    rule = BudgetRule(tokens=100, period="day")
    held = limiter.admit(Demand(parallel=[Parallel("key:alice:parallel", 1)]))
    over_budget = Demand([rpm(10)], budgets=[BudgetCharge("key:alice", rule, Spend(101))])
    over_cap = Demand([rpm(10)], [Parallel("key:alice:parallel", 1)], [BudgetCharge("key:alice", rule, Spend(5))])
    assert limiter.admit(over_budget).reason == "budget" and limiter.admit(over_cap).reason == "parallel"
    assert limiter.tat("key:alice:rpm") is None and limiter.budget("key:alice")[2] == Spend()
    assert dict(limiter.admit(over_cap).headers())[b"x-ratelimit-remaining-requests"] == b"10"
    limiter.release(held)
    assert isinstance(limiter.admit(over_cap), Ticket)


# ---- settling reservations -----------------------------------------------------------------------------------


def test_settling_refunds_unused_tokens_but_never_below_now():
    rate = Rate(1000, 60.0)
    assert settle(30.0, rate, 500, 100, 0.0) == pytest.approx(6.0)
    assert settle(30.0, rate, 500, 0, 10.0) == 10.0
    assert settle(5.0, rate, 500, 100, 10.0) == 10.0


def test_settling_charges_tokens_beyond_the_reservation_even_past_the_limit():
    rate = Rate(1000, 60.0)
    assert settle(30.0, rate, 500, 2500, 0.0) == pytest.approx(150.0)
    assert settle(0.0, rate, 100, 200, 50.0) == pytest.approx(56.0)
    refused = admit_one(rate, 150.0, 1, 0.0)
    assert refused.retry_after == pytest.approx(90.06)


def test_a_settled_stream_frees_its_unused_tokens_for_the_next_request():
    limiter, _ = limiter_at(10)
    first = limiter.admit(Demand([tpm(1000, 800)]))
    assert isinstance(limiter.admit(Demand([tpm(1000, 300)])), Refusal)
    limiter.settle(first, 100)
    assert isinstance(limiter.admit(Demand([tpm(1000, 300)])), Ticket)


def test_usage_beyond_the_reservation_makes_later_requests_wait():
    limiter, clock = limiter_at(10)
    first = limiter.admit(Demand([tpm(1000, 100)]))
    limiter.settle(first, 1500)
    refused = limiter.admit(Demand([tpm(1000, 100)]))
    assert refused.reason == "rate" and refused.retry_after == pytest.approx(36.0)
    clock.advance(36.0)
    assert isinstance(limiter.admit(Demand([tpm(1000, 100)])), Ticket)


def test_request_counts_are_not_refunded_when_the_exchange_ends():
    limiter, _ = limiter_at(10)
    ticket = limiter.admit(Demand([rpm(1)]))
    limiter.settle(ticket, 0)
    assert isinstance(limiter.admit(Demand([rpm(1)])), Refusal)


def test_ending_a_ticket_twice_changes_nothing():
    limiter, _ = limiter_at(10)
    rule = BudgetRule(tokens=1000, period="day")
    demand = Demand([tpm(1000, 200)], [Parallel("p", 1)], [BudgetCharge("key:alice", rule, Spend(200))])
    ticket = limiter.admit(demand)
    limiter.settle(ticket, 50)
    state = (limiter.tat("key:alice:tpm"), limiter.budget("key:alice"))
    limiter.settle(ticket, 50)
    limiter.release(ticket)
    assert (limiter.tat("key:alice:tpm"), limiter.budget("key:alice")) == state
    assert limiter.in_flight("p") == 0
    assert limiter.budget("key:alice")[1:] == (Spend(50), Spend(0))


# ---- parallel caps -------------------------------------------------------------------------------------------


def test_max_parallel_refuses_the_request_over_the_cap_until_one_ends():
    limiter, _ = limiter_at(10)
    demand = Demand(parallel=[Parallel("key:alice:parallel", 2)])
    first, _ = limiter.admit(demand), limiter.admit(demand)
    refused = limiter.admit(demand)
    assert refused.reason == "parallel" and refused.code == "rate_limit_exceeded"
    assert dict(refused.headers())[b"retry-after"] == b"1"
    limiter.release(first)
    assert isinstance(limiter.admit(demand), Ticket)
    assert limiter.in_flight("key:alice:parallel") == 2
    assert Parallel("x", 3).fits(2) and not Parallel("x", 3).fits(3)


# ---- budgets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "moment, period, key, renewal",
    [
        ("2026-11-30T23:59:59.999", "day", "2026-11-30", "2026-12-01T00:00:00"),
        ("2026-11-30T23:59:59.999", "month", "2026-11", "2026-12-01T00:00:00"),
        ("2026-12-01T00:00:00", "month", "2026-12", "2027-01-01T00:00:00"),
        ("2026-12-31T23:59:59", "day", "2026-12-31", "2027-01-01T00:00:00"),
        ("2026-12-31T23:59:59", "month", "2026-12", "2027-01-01T00:00:00"),
        ("2026-01-31T12:00:00", "month", "2026-01", "2026-02-01T00:00:00"),
        ("2027-02-28T23:00:00", "day", "2027-02-28", "2027-03-01T00:00:00"),
        ("2027-02-15T00:00:00", "month", "2027-02", "2027-03-01T00:00:00"),
        ("2028-02-28T23:00:00", "day", "2028-02-28", "2028-02-29T00:00:00"),
        ("2028-02-29T23:59:59", "month", "2028-02", "2028-03-01T00:00:00"),
        ("2026-04-30T10:00:00", "month", "2026-04", "2026-05-01T00:00:00"),
    ],
)
def test_budget_periods_are_utc_days_and_months_that_renew_at_the_next_start(moment, period, key, renewal):
    assert period_key(unix(moment), period) == key
    assert renews_at(unix(moment), period) == unix(renewal)


def spend_all(limiter: Limiter, rule: BudgetRule, tokens: int) -> None:
    ticket = limiter.admit(Demand(budgets=[BudgetCharge("key:alice", rule, Spend(tokens))]))
    assert isinstance(ticket, Ticket)
    limiter.settle(ticket, tokens)


def test_a_spent_daily_budget_renews_exactly_at_utc_midnight():
    limiter, clock = limiter_at(unix("2026-11-30T09:00:00"))
    rule = BudgetRule(tokens=1000, period="day")
    spend_all(limiter, rule, 1000)
    ask = Demand(budgets=[BudgetCharge("key:alice", rule, Spend(1))])
    refused = limiter.admit(ask)
    assert refused.reason == "budget" and refused.code == "insufficient_quota"
    assert refused.renews_at == unix("2026-12-01T00:00:00") and refused.retry_after == 15 * 3600
    assert "renews at 2026-12-01T00:00:00Z" in refused.message and "spent" in refused.message
    headers = dict(refused.headers())
    assert headers[b"retry-after"] == b"54000" and headers[b"x-should-retry"] == b"false"
    clock.advance(unix("2026-12-01T00:00:00") - clock.seconds() - 0.001)
    assert isinstance(limiter.admit(ask), Refusal)
    clock.advance(0.001)
    assert isinstance(limiter.admit(ask), Ticket)


@pytest.mark.parametrize(
    "spent_at, still_spent, renewed",
    [
        ("2026-12-31T10:00:00", "2026-12-31T23:59:59.999", "2027-01-01T00:00:00"),
        ("2028-02-01T00:00:00", "2028-02-29T23:59:59", "2028-03-01T00:00:00"),
        ("2027-02-03T00:00:00", "2027-02-28T23:59:59", "2027-03-01T00:00:00"),
        ("2026-04-30T23:00:00", "2026-04-30T23:59:59.5", "2026-05-01T00:00:00"),
    ],
)
def test_a_spent_monthly_budget_renews_on_the_first_of_the_next_month(spent_at, still_spent, renewed):
    limiter, clock = limiter_at(unix(spent_at))
    rule = BudgetRule(tokens=50, period="month")
    spend_all(limiter, rule, 50)
    ask = Demand(budgets=[BudgetCharge("key:alice", rule, Spend(1))])
    clock.advance(unix(still_spent) - clock.seconds())
    refused = limiter.admit(ask)
    assert refused.renews_at == unix(renewed)
    clock.advance(unix(renewed) - clock.seconds())
    assert isinstance(limiter.admit(ask), Ticket)


def test_reservations_stop_concurrent_requests_from_overspending_a_budget():
    limiter, _ = limiter_at(unix("2026-11-30T09:00:00"))
    rule = BudgetRule(tokens=1000, period="day")
    ask = Demand(budgets=[BudgetCharge("key:alice", rule, Spend(400))])
    first, second = limiter.admit(ask), limiter.admit(ask)
    refused = limiter.admit(ask)
    assert refused.reason == "budget"
    assert "200 of 1000 tokens" in refused.message and "lower max_tokens" in refused.message
    limiter.settle(first, 100)
    third = limiter.admit(ask)
    assert isinstance(third, Ticket)
    assert limiter.budget("key:alice") == ("2026-11-30", Spend(100), Spend(800))
    limiter.release(second)
    assert limiter.budget("key:alice") == ("2026-11-30", Spend(500), Spend(400))


def test_a_request_counts_in_the_period_it_was_admitted_in():
    limiter, clock = limiter_at(unix("2026-11-30T23:59:00"))
    rule = BudgetRule(tokens=1000, period="day")
    late = limiter.admit(Demand(budgets=[BudgetCharge("key:alice", rule, Spend(900))]))
    clock.advance(120)
    fresh = limiter.admit(Demand(budgets=[BudgetCharge("key:alice", rule, Spend(1000))]))
    assert isinstance(fresh, Ticket)
    limiter.settle(late, 900)
    assert limiter.budget("key:alice") == ("2026-12-01", Spend(0), Spend(1000))


def test_a_cost_budget_uses_the_price_table_and_real_costs_replace_estimates():
    prices = {"gpt-4o": Price(2.5, 10.0), "gpt-4o-mini": Price(0.15, 0.6)}
    assert price_for(prices, "gpt-4o-2024-08-06") == Price(2.5, 10.0)
    assert price_for(prices, "gpt-4o-mini-2024-07-18") == Price(0.15, 0.6)
    assert price_for(prices, "o3") is None and price_for(prices, None) is None
    assert Price(2.5, 10.0).cost(1_000_000, 100_000) == pytest.approx(3.5)
    limiter, _ = limiter_at(unix("2026-11-30T09:00:00"))
    rule = BudgetRule(cost=5.0, period="month")
    ask = Demand(budgets=[BudgetCharge("key:alice", rule, Spend(1000, 3.0))])
    ticket = limiter.admit(ask)
    assert isinstance(limiter.admit(ask), Refusal)
    limiter.settle(ticket, 800, cost=0.5)
    assert isinstance(limiter.admit(ask), Ticket)
    assert limiter.budget("key:alice")[1] == Spend(800, 0.5)


def test_a_spent_cost_budget_refuses_even_models_missing_from_the_price_table():
    limiter, _ = limiter_at(unix("2026-11-30T09:00:00"))
    rule = BudgetRule(cost=1.0, period="day")
    ticket = limiter.admit(Demand(budgets=[BudgetCharge("key:alice", rule, Spend(10, 0.5))]))
    limiter.settle(ticket, 10, cost=1.0)
    refused = limiter.admit(Demand(budgets=[BudgetCharge("key:alice", rule, Spend(10, 0.0))]))
    assert refused.reason == "budget" and "daily budget is spent" in refused.message


# ---- estimates and headers -----------------------------------------------------------------------------------


def test_the_reservation_is_prompt_bytes_over_four_plus_max_tokens_per_choice():
    assert reserve_tokens(10, 100, 2, 4096) == 3 + 200
    assert reserve_tokens(0, None, None, 4096) == 4096
    assert reserve_tokens(8, 50, None, 4096) == 52
    assert reserve_tokens(4, 10, 0, 4096) == 11
    assert reserve_tokens(4, True, 2.5, 7) == 8
    assert reserve_tokens(4, 10**400, 10**400, 7) == MAX_COST
    assert reserve_tokens(-5, -5, -5, 7) == 0


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (-3, "0s"), (0.0004, "1ms"), (0.02, "20ms"), (0.0201, "21ms"), (0.999, "999ms"), (1, "1s"),
     (1.5, "1.5s"), (8.64, "8.64s"), (59.9999, "1m0s"), (360, "6m0s"), (61.25, "1m1.25s"), (3723, "1h2m3s"),
     (86400, "24h0m0s"), (float("nan"), "0s")],
)
def test_reset_durations_are_written_the_way_openai_writes_them(seconds, text):
    assert format_reset(seconds) == text


def test_rate_limit_headers_carry_openais_names_and_integer_values():
    requests = admit_one(Rate(60, 60.0), 0.0, 1, 0.0)
    tokens = admit_one(Rate(150000, 60.0), 0.0, 16, 0.0)
    assert rate_limit_headers(requests, tokens) == [
        (b"x-ratelimit-limit-requests", b"60"),
        (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1s"),
        (b"x-ratelimit-limit-tokens", b"150000"),
        (b"x-ratelimit-remaining-tokens", b"149984"),
        (b"x-ratelimit-reset-tokens", b"7ms"),
    ]
    assert rate_limit_headers() == []


def test_headers_describe_the_tightest_limit_of_each_kind():
    limiter, _ = limiter_at(10)
    limiter.admit(Demand([rpm(3, "route:/:rpm")]))
    ticket = limiter.admit(Demand([rpm(60), rpm(3, "route:/:rpm"), tpm(1000, 10)]))
    headers = dict(ticket.headers())
    assert headers[b"x-ratelimit-limit-requests"] == b"3" and headers[b"x-ratelimit-remaining-requests"] == b"1"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"990"
    limiter.admit(Demand([rpm(3, "route:/:rpm")]))
    refused = limiter.admit(Demand([rpm(60), rpm(3, "route:/:rpm")]))
    headers = dict(refused.headers())
    assert headers[b"x-ratelimit-remaining-requests"] == b"0" and headers[b"x-ratelimit-reset-requests"] == b"1m0s"
    assert headers[b"retry-after"] == b"20" and b"x-should-retry" not in headers


@pytest.mark.parametrize(
    "seconds, value", [(0, b"1"), (0.2, b"1"), (1.0, b"1"), (1.001, b"2"), (59.5, b"60"), (1e300, b"1000000000000")]
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(seconds, value):
    assert retry_after_header(seconds) == value


# ---- memory --------------------------------------------------------------------------------------------------


def test_the_limiter_forgets_limits_that_have_drained_so_memory_follows_active_keys():
    limiter, clock = limiter_at(unix("2026-11-30T09:00:00"))
    rule = BudgetRule(tokens=10**6, period="day")
    for n in range(5_000):
        demand = Demand([rpm(60, f"key:user{n}:rpm")], budgets=[BudgetCharge(f"key:user{n % 50}", rule, Spend(1))])
        limiter.release(limiter.admit(demand))
        clock.advance(0.01)
    assert limiter.size() < 2 * 1024 + 50
    clock.advance(86400)
    limiter.prune()
    assert limiter.size() == 0


# ---- properties ----------------------------------------------------------------------------------------------

rates = st.builds(Rate, st.integers(1, 20), st.floats(0.5, 100.0))
steps = st.lists(st.one_of(st.just(0.0), st.floats(0.0, 50.0)), min_size=1, max_size=60)


@settings(max_examples=100, deadline=None)
@given(rate=rates, start=st.floats(0.0, 1e6), gaps=steps)
def test_no_interval_admits_more_than_the_limit_plus_what_refills_in_it(rate, start, gaps):
    tat, now, admitted = 0.0, start, []
    for gap in gaps:
        now += gap
        outcome = admit_one(rate, tat, 1, now)
        if outcome.allowed:
            tat = outcome.tat
            admitted.append(now)
    tolerance = slack(rate, now)
    for i, first in enumerate(admitted):
        for j in range(i, len(admitted)):
            span = admitted[j] - first
            assert j - i + 1 <= rate.limit + (span + tolerance) / rate.emission + 1e-9
        assert admitted.count(first) <= rate.limit


def exact_gcra(limit: int, period: int, events: list[tuple[int, int]]) -> list[bool]:
    """The same algorithm in exact rational arithmetic, times in milliseconds."""
    emission, tat, answers = Fraction(period, limit), Fraction(0), []
    for now_ms, cost in events:
        now = Fraction(now_ms, 1000)
        need = max(tat, now) + cost * emission
        answers.append(need - now <= period)
        if answers[-1]:
            tat = need
    return answers


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(1, 50),
    period=st.integers(1, 120),
    events=st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 60)), min_size=1, max_size=60),
)
def test_decisions_match_the_algorithm_in_exact_arithmetic(limit, period, events):
    times, now_ms = [], 0
    for gap, cost in events:
        now_ms += gap
        times.append((now_ms, cost))
    expected = exact_gcra(limit, period, times)
    rate, tat = Rate(limit, period), 0.0
    for (now_ms, cost), allowed in zip(times, expected):
        outcome = admit_one(rate, tat, cost, now_ms / 1000)
        assert outcome.allowed == allowed
        if allowed:
            tat = outcome.tat

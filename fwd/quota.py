"""Limits and budgets as a request meets them: what it demands of them, the store that admits it, and the 429
it gets when it does not fit.  Tests: tests/test_quota.py

A request served from a route's pool is charged against the route's limits (everything the route serves) and
its forward key's limits and budget: one request against each `rpm`, its reserved tokens against each `tpm`
and the budget, one slot of each `max_parallel`.  The reservation is the prompt (its JSON body's bytes / 4)
plus what it may generate (`max_tokens`, `max_completion_tokens` or `max_output_tokens`, else the route's
`default_max_tokens`, times `n`); the real usage replaces it when the exchange ends.

The store is the Limiter of fwd.limits in this process (`LocalQuota`, which answers at once), or the supervisor's
Limiter for a worker of --workers (fwd.quota_line, which answers in a Deferred).
"""

from __future__ import annotations

from typing import Protocol

import attrs

from fwd import errors
from fwd.config import Limits, Route
from fwd.limits import (
    BudgetCharge,
    Demand,
    Limiter,
    Parallel,
    RateCharge,
    Refusal,
    Spend,
    Ticket,
    price_for,
    reserve_tokens,
)

# The endpoints whose answers generate tokens a request may reserve; others reserve only their prompt.
GENERATING = frozenset({"chat", "completions", "responses"})


class QuotaStore(Protocol):
    """Where admission decisions are made: one process, the supervisor of --workers, or Redis.

    `admit` gives a Ticket (something with `headers()` and `head_lines()`, ended by exactly one `settle` or
    `release`) or a Refusal, at once or in a Deferred; it never fails for a reason of the request's own."""

    def admit(self, plan: Plan, reserved: Reservation): ...

    def settle(self, ticket, tokens: int, cost: float | None) -> None: ...

    def release(self, ticket) -> None: ...


@attrs.define
class LocalQuota:
    """The Limiter of this process."""

    limiter: Limiter

    def admit(self, plan: Plan, reserved: Reservation) -> Ticket | Refusal:
        return plan.admit(self.limiter, reserved)

    def settle(self, ticket: Ticket, tokens: int, cost: float | None) -> None:
        self.limiter.settle(ticket, tokens, cost)

    def release(self, ticket: Ticket) -> None:
        self.limiter.release(ticket)


@attrs.frozen
class Plan:
    """The limits one caller of one route meets, named once (ids never hold a key)."""

    requests: tuple[RateCharge, ...]
    tokens: tuple[tuple[str, object], ...]
    parallel: tuple[Parallel, ...]
    budget: tuple[str, object] | None
    # Its limits as one Demand, built once: each request brings its reservation to it (fwd.limits.Limiter.admit).
    demand: Demand = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        rates = self.requests + tuple(RateCharge(name, rate, 0, "tokens") for name, rate in self.tokens)
        budgets = () if self.budget is None else (BudgetCharge(self.budget[0], self.budget[1], Spend()),)
        object.__setattr__(self, "demand", Demand(rates, self.parallel, budgets))

    def __bool__(self) -> bool:
        return bool(self.requests or self.tokens or self.parallel or self.budget)

    def charges(self) -> Plan:
        """The token limits and budget alone: what the tokens of each response of a running Realtime session are
        charged on (the session counted as one request and holds its parallel slot on its own ticket)."""
        return attrs.evolve(self, requests=(), parallel=())

    def admit(self, limiter: Limiter, reserved: Reservation) -> Ticket | Refusal:
        """Admit one request of this caller on `limiter`, reserving `reserved`."""
        tokens = reserved.prompt + reserved.output
        spend = None if self.budget is None else Spend(tokens, reserved.cost or 0.0)
        return limiter.admit(self.demand, tokens, spend)


def plan_for(route: Route, caller: str | None, key_limits: Limits) -> Plan:
    """The limits of requests a route serves for one caller (a forward key's name, or None for any other)."""
    requests, tokens, parallel = [], [], []
    scopes = [(f"route:{route.name}", route.limits)]
    if caller is not None:
        scopes.append((f"key:{route.name}:{caller}", key_limits))
    for scope, limits in scopes:
        if limits.rpm is not None:
            requests.append(RateCharge(f"{scope}:rpm", limits.rpm, 1, "requests"))
        if limits.tpm is not None:
            tokens.append((f"{scope}:tpm", limits.tpm))
        if limits.max_parallel is not None:
            parallel.append(Parallel(f"{scope}:parallel", limits.max_parallel))
    budget = None
    if caller is not None and key_limits.budget is not None:
        budget = (budget_id(route.name, caller), key_limits.budget)
    return Plan(tuple(requests), tuple(tokens), tuple(parallel), budget)


def budget_id(route: str, caller: str) -> str:
    """The name a forward key's budget is kept under: per route, per forward-key name."""
    return f"budget:{route}:{caller}"


def budgets_of(config) -> list[tuple[str, str, str, object]]:
    """(id, route, caller, BudgetRule) of every budget the configuration sets."""
    return [
        (budget_id(route.name, key.name), route.name, key.name, key.limits.budget)
        for route in config.routes
        for key in route.forward_keys
        if key.limits.budget is not None
    ]


@attrs.frozen
class Terms:
    """What one request meets: its limits, and, when its usage is counted, the usage shape of its answer
    (`kind`), whether a stream's usage may be asked for, and the route's default for what it may generate."""

    plan: Plan
    kind: str | None = None
    ask_usage: bool = False
    default_max: int = 0

    @property
    def metered(self) -> bool:
        return self.kind is not None


@attrs.frozen
class Reservation:
    """What one request reserves: its prompt and generated tokens, and their cost when a price is known."""

    prompt: int
    output: int
    cost: float | None = None

    @property
    def tokens(self) -> int:
        return self.prompt + self.output


NOTHING_RESERVED = Reservation(0, 0)  # a Realtime session's admission: its tokens are charged as they are used


def reservation(kind: str | None, json_bytes: int, members: dict, default_max: int, prices, model) -> Reservation:
    """A request's reservation from its JSON body size and parameters (fwd.limits.reserve_tokens)."""
    prompt = reserve_tokens(json_bytes, 0, None, 0) if json_bytes else 0
    output = 0
    if kind in GENERATING:
        cap = next(
            (members[name] for name in ("max_completion_tokens", "max_tokens", "max_output_tokens") if name in members),
            None,
        )
        output = reserve_tokens(0, cap, members.get("n"), default_max)
    price = price_for(prices, model) if prices else None
    return Reservation(prompt, output, price.cost(prompt, output) if price is not None else None)


def demand_for(plan: Plan, reserved: Reservation) -> Demand:
    """The Demand of one request: the plan's limits charged with its reservation."""
    tokens = reserved.prompt + reserved.output
    rates = plan.requests
    if plan.tokens:
        rates = rates + tuple(RateCharge(name, rate, tokens, "tokens") for name, rate in plan.tokens)
    budgets = ()
    if plan.budget is not None:
        name, rule = plan.budget
        budgets = (BudgetCharge(name, rule, Spend(tokens, reserved.cost or 0.0)),)
    return Demand.of_plan(rates, plan.parallel, budgets)


def refused(refusal: Refusal) -> errors.ProxyError:
    """The 429 of a request the limits refused, with OpenAI's own headers so the SDKs' retries work as usual."""
    headers = tuple(refusal.headers())
    if refusal.reason == "budget":
        return errors.ProxyError(429, refusal.message, code="insufficient_quota", type="insufficient_quota",
                                 headers=headers)
    if refusal.reason == "too_large":
        message = "This request reserves more tokens than its limit allows at all: lower max_tokens or the prompt."
    elif refusal.reason == "parallel":
        message = "Too many requests of this key are running at once; retry when one has finished."
    else:
        seconds = max(1, -(-refusal.retry_after // 1)) if refusal.retry_after else 1
        message = f"Rate limit reached for this key; retry in {seconds:.0f} s."
    return errors.ProxyError(429, message, type="requests", code="rate_limit_exceeded", headers=headers)

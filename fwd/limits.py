"""Rate limits, parallel caps and budgets that share a pool of upstream keys fairly.  Tests: tests/test_limits.py

Pure arithmetic plus one in-memory `Limiter` for a single process; time comes from an injected clock (anything
with `seconds()`, unix seconds in production).  The same decisions are meant to run in a Redis script and in the
supervisor of `--workers`, so the state is tiny and every formula is written out here.

Rate limits: GCRA, one float per limit.  A limit of `limit` units per `period` seconds has the emission interval
`e = period / limit`; its state is the theoretical arrival time `tat` (seconds on the caller's clock).  With
`lag = max(tat - now, 0)`, a request of `cost` units fits iff `lag + cost * e <= period` (give or take `slack`,
below); when it fits, `tat = now + lag + cost * e`.  So a full burst of `limit` units passes at once, then one
unit per `e`, and at most `limit + d / e` units pass in any interval of `d` seconds.  Seconds until the limit is
full again ("reset") are `lag`; a refused request fits again after `lag + cost * e - period` seconds, never when
`cost > limit`.

Floats: each update of `tat` rounds to the float grid at the clock's magnitude (0.24 us at unix time), so a
request fits when it fits to within `slack = min(e / 2, 1e-12 * (|now| + period))` seconds: thousands of
roundings, never half a unit.  The Limiter counts rate time from its own start, where the grid is fine
(0.5 ns after a month): a burst at one instant then counts exactly up to about 10^4 requests.  Counted from
the unix epoch, exactness holds up to about 10^3; a shared store should count from a recent fixed epoch.

Budgets: tokens and/or money per UTC day or month.  A request reserves its estimate on admission and is
admitted iff `used + reserved_in_flight + estimate <= budget`; when the exchange ends the actual usage replaces
the reservation.  A request counts in the period in which it was admitted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import NamedTuple

import attrs

PERIOD_SECONDS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
MAX_LIMIT = 10**9
# Costs (tokens) beyond this are clamped: they exceed every limit anyway and would overflow float arithmetic.
MAX_COST = 10**15
BUDGET_PERIODS = ("day", "month")
UNITS = ("requests", "tokens")
RELATIVE_SLACK = 1e-12

_RATE = re.compile(r"\s*([0-9]{1,12})\s*(?:/|per\s)\s*(second|minute|hour|day)s?\s*", re.IGNORECASE | re.ASCII)
_RATE_FORMS = 'a whole number per minute, or "N/second", "N/minute", "N/hour", "N/day" (N from 1 to 1000000000)'


# ---- rates -------------------------------------------------------------------------------------------------


def _check_limit(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if type(value) is not int or not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"{attribute.name} must be a whole number from 1 to {MAX_LIMIT}, got {value!r}")


def _check_period(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"period must be a positive number of seconds, got {value!r}")


@attrs.frozen
class Rate:
    """A limit of `limit` units (requests or tokens) per `period` seconds."""

    limit: int = attrs.field(validator=_check_limit)
    period: float = attrs.field(converter=float, validator=_check_period)

    @property
    def emission(self) -> float:
        """Seconds one unit takes to come back: period / limit."""
        return self.period / self.limit


def parse_rate(value: object) -> Rate:
    """A Rate from a config value: an integer (per minute) or "N/second|minute|hour|day" ("N per minute")."""
    if isinstance(value, Rate):
        return value
    count, period = None, "minute"
    if type(value) is int:
        count = value
    elif type(value) is float and math.isfinite(value) and value.is_integer():
        count = int(value)
    elif isinstance(value, str):
        text = value.strip()
        match = _RATE.fullmatch(text)
        if match:
            count, period = int(match.group(1)), match.group(2).lower()
        elif text.isascii() and text.isdigit() and len(text) <= 12:
            count = int(text)
    if count is not None and 1 <= count <= MAX_LIMIT:
        return Rate(count, PERIOD_SECONDS[period])
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise ValueError(f"expected {_RATE_FORMS}, got {shown}")


# ---- one limit: GCRA ---------------------------------------------------------------------------------------


class Outcome(NamedTuple):
    """One limit's answer to one request: whether it fits, the limit's new state, and what to tell the client.

    `tat` is the state to store (unchanged when refused); `remaining` the units that would still fit now;
    `reset` the seconds until the limit is full again; `retry_after` the seconds until this cost would fit
    (None when allowed, or when the cost exceeds the limit itself and never fits).  A tuple: one is made for
    every limit of every request.
    """

    allowed: bool
    tat: float
    limit: int
    remaining: int
    reset: float
    retry_after: float | None = None


def _units(value: int) -> int:
    return 0 if value < 0 else value if value < MAX_COST else MAX_COST


def slack(rate: Rate, now: float) -> float:
    """How far past `period` a request may reach and still fit: float rounding, never half a unit."""
    return min(rate.emission / 2, RELATIVE_SLACK * (abs(now) + rate.period))


def admit_one(rate: Rate, tat: float, cost: int, now: float) -> Outcome:
    """GCRA: does `cost` units fit under `rate` whose state is `tat`?  Cost 0 only looks."""
    limit, period = rate.limit, rate.period
    emission = period / limit
    lag = tat - now if tat > now else 0.0
    tolerance = RELATIVE_SLACK * ((now if now > 0 else -now) + period)
    room = period + (emission / 2 if emission / 2 < tolerance else tolerance)  # inlined slack(rate, now)
    if cost <= limit:  # compared as integers: a hostile size never reaches float arithmetic
        need = lag + (cost if cost > 0 else 0) * emission
        if need <= room:
            left = int((room - need) / emission)
            return Outcome(True, now + need, limit, left if left < limit else limit, need)
        wait = need - period
    else:
        wait = None
    left = int((room - lag) / emission) if room > lag else 0
    return Outcome(False, tat, limit, left if left < limit else limit, lag, wait)


def settle(tat: float, rate: Rate, reserved: int, actual: int, now: float) -> float:
    """The state after replacing a reservation by the real usage: refunds never leave `tat` below `now`,
    charges may push it past `now + period` (later requests then wait)."""
    base = tat if tat > now else now
    new = base + (_units(actual) - _units(reserved)) * rate.emission
    return new if new > now else now


# ---- several limits, all or nothing ------------------------------------------------------------------------


@attrs.define
class Check:
    """One limit a request must fit: its id, rate, the request's cost and the limit's current state."""

    limit_id: str
    rate: Rate
    cost: int
    tat: float


@attrs.define
class Verdict:
    """The answer of several limits together.

    `outcomes` follow the checks' order; when refused, every `tat` in them is the unchanged input.  `failed` names
    a limit the cost can never fit if there is one, else the first failing limit; `retry_after` is the longest
    wait over the failing limits, None when one of them never fits.
    """

    allowed: bool
    outcomes: tuple[Outcome, ...]
    failed: str | None = None
    retry_after: float | None = None


def admit_all(checks: Sequence[Check], now: float) -> Verdict:
    """Admit a request only if it fits every limit: then every outcome carries its limit's new state to store,
    otherwise every outcome carries its input state unchanged."""
    ids = [check.limit_id for check in checks]
    if len(set(ids)) != len(ids):
        raise ValueError("a request names the same limit twice")
    outcomes = tuple(admit_one(check.rate, check.tat, check.cost, now) for check in checks)
    failing = [(check, outcome) for check, outcome in zip(checks, outcomes) if not outcome.allowed]
    if not failing:
        return Verdict(True, outcomes)
    unchanged = tuple(
        outcome if not outcome.allowed else admit_one(check.rate, check.tat, 0, now)._replace(tat=check.tat)
        for check, outcome in zip(checks, outcomes)
    )
    never = [check.limit_id for check, outcome in failing if outcome.retry_after is None]
    if never:
        return Verdict(False, unchanged, never[0], None)
    wait = max(outcome.retry_after for _, outcome in failing)
    return Verdict(False, unchanged, failing[0][0].limit_id, wait)


# ---- parallel caps -----------------------------------------------------------------------------------------


def _check_cap(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if type(value) is not int or not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"max_parallel must be a whole number from 1 to {MAX_LIMIT}, got {value!r}")


@attrs.frozen
class Parallel:
    """At most `cap` requests in flight at once under `limit_id`."""

    limit_id: str
    cap: int = attrs.field(validator=_check_cap)

    def fits(self, in_flight: int) -> bool:
        """Whether one more request may start while `in_flight` are running."""
        return in_flight < self.cap


# ---- budgets -----------------------------------------------------------------------------------------------


def _check_budget_tokens(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value is not None and (type(value) is not int or not 1 <= value <= MAX_COST):
        raise ValueError(f"budget tokens must be a whole number from 1 to {MAX_COST}, got {value!r}")


def _check_budget_cost(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value is not None and not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    ):
        raise ValueError(f"budget cost must be a positive number, got {value!r}")


def _check_budget_period(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value not in BUDGET_PERIODS:
        raise ValueError(f'budget period must be "day" or "month", got {value!r}')


@attrs.frozen
class BudgetRule:
    """What a forward key may spend per UTC day or month: tokens, money (in the price table's currency), or both."""

    tokens: int | None = attrs.field(default=None, validator=_check_budget_tokens)
    cost: float | None = attrs.field(default=None, validator=_check_budget_cost)
    period: str = attrs.field(default="month", validator=_check_budget_period)

    def __attrs_post_init__(self) -> None:
        if self.tokens is None and self.cost is None:
            raise ValueError("a budget needs tokens, cost or both")


def parse_budget(table: object) -> BudgetRule:
    """A BudgetRule from a config table `{ tokens = N, cost = X, period = "day" | "month" }`."""
    if not isinstance(table, Mapping):
        raise ValueError('expected a table like { tokens = 1000000, period = "month" }')
    unknown = sorted(str(name) for name in table if name not in ("tokens", "cost", "period"))
    if unknown:
        raise ValueError(f"unknown budget field {unknown[0]!r}: expected tokens, cost, period")
    tokens, cost = table.get("tokens"), table.get("cost")
    return BudgetRule(
        tokens=int(tokens) if type(tokens) is float and tokens.is_integer() and tokens <= MAX_COST else tokens,
        cost=float(cost) if type(cost) is int else cost,
        period=table.get("period", "month"),
    )


@attrs.define
class Spend:
    """Tokens and money, used or reserved."""

    tokens: int = 0
    cost: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.tokens + other.tokens, self.cost + other.cost)

    def __sub__(self, other: Spend) -> Spend:
        return Spend(self.tokens - other.tokens, self.cost - other.cost)


def budget_fits(rule: BudgetRule, used: Spend, reserved: Spend, want: Spend) -> bool:
    """Whether a request reserving `want` fits: used + reserved in flight + want <= budget, for each kind; a spent
    budget refuses even a request that reserves nothing (a model missing from the price table)."""
    if rule.tokens is not None:
        if used.tokens >= rule.tokens or used.tokens + reserved.tokens + want.tokens > rule.tokens:
            return False
    if rule.cost is not None:
        # Money adds up in floats: forgive a rounding error of a billionth of the budget.
        if used.cost >= rule.cost or used.cost + reserved.cost + want.cost > rule.cost * (1 + 1e-9):
            return False
    return True


def _utc(now_unix: float) -> datetime:
    return datetime.fromtimestamp(now_unix, timezone.utc)


def period_key(now_unix: float, period: str) -> str:
    """The budget period holding this instant: "2026-11-30" for a day, "2026-11" for a month (UTC)."""
    moment = _utc(now_unix)
    return f"{moment:%Y-%m-%d}" if period == "day" else f"{moment:%Y-%m}"


def period_start(now_unix: float, period: str) -> float:
    """Unix time of the start of the UTC day or month holding this instant."""
    if period == "day":
        return math.floor(now_unix / 86400) * 86400.0
    moment = _utc(now_unix)
    return datetime(moment.year, moment.month, 1, tzinfo=timezone.utc).timestamp()


def renews_at(now_unix: float, period: str) -> float:
    """Unix time of the start of the next UTC day or month: when a budget spent now renews."""
    if period == "day":
        return math.floor(now_unix / 86400) * 86400.0 + 86400.0
    moment = _utc(now_unix)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=timezone.utc).timestamp()


def budget_message(rule: BudgetRule, used: Spend, reserved: Spend, renews: float) -> str:
    """The message of a 429 insufficient_quota: whether the budget is spent or only short, and when it renews."""
    when = f"{_utc(renews):%Y-%m-%dT%H:%M:%SZ}"
    adjective = "daily" if rule.period == "day" else "monthly"
    spent = (rule.tokens is not None and used.tokens >= rule.tokens) or (
        rule.cost is not None and used.cost >= rule.cost
    )
    if spent:
        return f"This forward key's {adjective} budget is spent; it renews at {when}."
    left = []
    if rule.tokens is not None:
        left.append(f"{max(0, rule.tokens - used.tokens - reserved.tokens)} of {rule.tokens} tokens")
    if rule.cost is not None:
        left.append(f"{max(0.0, rule.cost - used.cost - reserved.cost):.6g} of {rule.cost:g}")
    return (
        f"This request may use more than is left of this forward key's {adjective} budget ({' and '.join(left)}, "
        f"counting requests in flight); lower max_tokens or retry later; it renews at {when}."
    )


# ---- prices and token estimates ----------------------------------------------------------------------------


@attrs.frozen
class Price:
    """A model's price per million prompt (input) and completion (output) tokens."""

    input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (_units(prompt_tokens) * self.input + _units(completion_tokens) * self.output) / 1_000_000


def price_for(prices: Mapping[str, Price], model: str | None) -> Price | None:
    """The price of a model: its exact entry, else the longest entry it starts with ("gpt-4o" for
    "gpt-4o-2024-08-06"), else None."""
    if not model:
        return None
    exact = prices.get(model)
    if exact is not None:
        return exact
    best = max((name for name in prices if model.startswith(name)), key=len, default=None)
    return None if best is None else prices[best]


def reserve_tokens(prompt_bytes: int, max_tokens: int | None, n: int | None, default_max: int) -> int:
    """Tokens to reserve before forwarding: ceil(prompt_bytes / 4) for the prompt, plus max_tokens (or
    `default_max` when absent or not a whole number) for each of the `n` choices; clamped to MAX_COST.

    Four bytes a token is OpenAI's rule of thumb for English; JSON quoting overcounts, CJK text undercounts a
    little.  The real usage replaces the estimate when the exchange ends.
    """
    prompt = -(-_units(prompt_bytes) // 4)
    completion = _units(max_tokens if type(max_tokens) is int else default_max)
    choices = min(max(1, n), MAX_COST) if type(n) is int else 1
    return _units(prompt + completion * choices)


# ---- headers -----------------------------------------------------------------------------------------------


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes x-ratelimit-reset-*: "20ms", "1s", "8.64s", "6m0s", "1h2m3s".

    Go's duration format at millisecond precision, rounded up so a client that waits that long finds room:
    under a second in whole ms; otherwise hours and minutes when non-zero, then seconds with up to three
    decimals, trailing zeros dropped.  Zero is "0s".
    """
    if not seconds > 0:
        return "0s"
    # Rounded to the microsecond first: a shared store's doubles carry nanoseconds of error.
    ms = math.ceil(round((seconds if seconds < 1e12 else 1e12) * 1000, 3))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else f"{whole}"
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


_HEADER_NAMES = {
    unit: tuple(f"x-ratelimit-{part}-{unit}".encode() for part in ("limit", "remaining", "reset")) for unit in UNITS
}
_HEAD_LINES = {unit: b"%s: %%d\r\n%s: %%d\r\n%s: %%s\r\n" % names for unit, names in _HEADER_NAMES.items()}


def rate_limit_headers(requests: Outcome | None = None, tokens: Outcome | None = None) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} headers for the limits given."""
    headers = []
    for unit, outcome in (("requests", requests), ("tokens", tokens)):
        if outcome is not None:
            limit, remaining, reset = _HEADER_NAMES[unit]
            headers += [
                (limit, b"%d" % outcome.limit),
                (remaining, b"%d" % outcome.remaining),
                (reset, format_reset(outcome.reset).encode()),
            ]
    return headers


def retry_after_header(seconds: float) -> bytes:
    """A Retry-After value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(round(min(seconds, 1e12), 6)))).encode()


# ---- the in-memory limiter ---------------------------------------------------------------------------------


def limit_id(scope: str, name: str, kind: str) -> str:
    """The id of one limit, e.g. "key:alice:rpm" or "route:/openai:tpm"; `name` is never a secret."""
    return f"{scope}:{name}:{kind}"


def _check_unit(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value not in UNITS:
        raise ValueError(f'unit must be "requests" or "tokens", got {value!r}')


@attrs.frozen
class RateCharge:
    """A request's cost against one rate limit; token costs are settled with the real usage at the end."""

    limit_id: str
    rate: Rate
    cost: int
    unit: str = attrs.field(default="requests", validator=_check_unit)


@attrs.define
class BudgetCharge:
    """A request's estimated spend against one budget."""

    budget_id: str
    rule: BudgetRule
    spend: Spend


def _distinct(instance: object, attribute: attrs.Attribute, value: tuple) -> None:
    if len(value) < 2:
        return
    ids = [item.budget_id if isinstance(item, BudgetCharge) else item.limit_id for item in value]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{attribute.name} names the same limit twice")


@attrs.define
class Demand:
    """Everything one request asks of the limits: rate charges, parallel slots and budget reservations."""

    rates: tuple[RateCharge, ...] = attrs.field(default=(), converter=tuple, validator=_distinct)
    parallel: tuple[Parallel, ...] = attrs.field(default=(), converter=tuple, validator=_distinct)
    budgets: tuple[BudgetCharge, ...] = attrs.field(default=(), converter=tuple, validator=_distinct)

    @classmethod
    def of_plan(cls, rates: tuple, parallel: tuple, budgets: tuple) -> Demand:
        """A Demand from tuples already known to name each limit once (fwd.quota builds them so, once per
        caller), without checking them again for every request."""
        demand = cls.__new__(cls)
        # Past attrs' converters and validators, which run on every assignment too.
        object.__setattr__(demand, "rates", rates)
        object.__setattr__(demand, "parallel", parallel)
        object.__setattr__(demand, "budgets", budgets)
        return demand


def tightest(pairs: Iterable[tuple[RateCharge, Outcome]], unit: str) -> Outcome | None:
    """The outcome to show for a unit: a refusing limit first, then the fewest remaining, then the latest reset."""
    chosen = [outcome for charge, outcome in pairs if charge.unit == unit]
    if len(chosen) < 2:
        return chosen[0] if chosen else None
    return min(chosen, key=lambda o: (o.allowed, o.remaining, -o.reset))


@attrs.define
class Ticket:
    """An admitted request: what it holds until `Limiter.settle` or `Limiter.release` ends it.

    `outcomes` are for the headers; their `tat` counts from the limiter's start, not on the clock.
    """

    number: int
    rates: tuple[RateCharge, ...]
    parallel: tuple[str, ...]
    budgets: tuple[tuple[BudgetCharge, str], ...]
    outcomes: tuple[tuple[RateCharge, Outcome], ...]
    tokens: int | None = None
    spend: Spend | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The x-ratelimit-* headers of the tightest requests and tokens limits."""
        return rate_limit_headers(tightest(self.outcomes, "requests"), tightest(self.outcomes, "tokens"))

    def head_lines(self) -> bytes:
        """The same headers as lines of an HTTP/1.1 response head."""
        lines = b""
        for unit in UNITS:
            outcome = tightest(self.outcomes, unit)
            if outcome is not None:
                lines += _HEAD_LINES[unit] % (outcome.limit, outcome.remaining, format_reset(outcome.reset).encode())
        return lines


@attrs.frozen
class Refusal:
    """A refused request: why, which limit, and when to retry.

    `reason` is "rate" (retry after `retry_after`), "too_large" (the cost exceeds a limit itself: retrying never
    helps; `retry_after` is None), "parallel" (too many requests in flight; `retry_after` is None, unknowable) or
    "budget" (insufficient_quota until `renews_at`; `message` says so).  Each is a 429.
    """

    reason: str
    limit_id: str
    retry_after: float | None
    outcomes: tuple[tuple[RateCharge, Outcome], ...] = ()
    renews_at: float | None = None
    message: str = ""

    @property
    def code(self) -> str:
        """The OpenAI error code of the 429."""
        return "insufficient_quota" if self.reason == "budget" else "rate_limit_exceeded"

    def headers(self) -> list[tuple[bytes, bytes]]:
        """x-ratelimit-* of the tightest limits, Retry-After, and x-should-retry: false when waiting won't do."""
        headers = rate_limit_headers(tightest(self.outcomes, "requests"), tightest(self.outcomes, "tokens"))
        if self.reason in ("too_large", "budget"):
            headers.append((b"x-should-retry", b"false"))
        if self.reason != "too_large":
            headers.append((b"retry-after", retry_after_header(self.retry_after or 0.0)))
        return headers


@attrs.define
class _Usage:
    """One budget's current period: spent and reserved in flight."""

    period: str
    key: str
    used: Spend = Spend()
    reserved: Spend = Spend()


@attrs.define
class Limiter:
    """The whole admission decision in memory, for one process: rate states, in-flight counts, budget usage.

    State stays O(active limits): rate states that have drained (`tat <= now`) and counts back at zero are
    forgotten, and so are budgets of a past period.  Every Ticket must end in `settle` or `release`.
    """

    clock: object
    _origin: float = attrs.field(init=False)
    _tats: dict[str, float] = attrs.field(init=False, factory=dict)
    _in_flight: dict[str, int] = attrs.field(init=False, factory=dict)
    _budgets: dict[str, _Usage] = attrs.field(init=False, factory=dict)
    _open: set[int] = attrs.field(init=False, factory=set)
    _periods: dict[str, tuple[float, float, str]] = attrs.field(init=False, factory=dict)
    _numbers: int = attrs.field(init=False, default=0)
    _prune_at: int = attrs.field(init=False, default=1024)

    def __attrs_post_init__(self) -> None:
        # Rate states count from here: small times keep float rounding far below one unit (see the module doc).
        self._origin = self.clock.seconds()

    def admit(self, demand: Demand, tokens: int | None = None, spend: Spend | None = None) -> Ticket | Refusal:
        """Admit a request on every limit at once (rates, budgets, parallel caps) or refuse it changing nothing.

        `tokens` and `spend`, when given, are the request's reservation: every "tokens" charge costs `tokens` and
        every budget reserves `spend`, whatever the charges say, so a caller's Demand is built once and serves
        all its requests (fwd.quota)."""
        unix = self.clock.seconds()
        now = unix - self._origin
        if len(self._tats) >= self._prune_at:
            self.prune()
        # The common case, that everything fits, in one pass; any refusal is worked out by `_refusal`.
        tats = self._tats
        outcomes = []
        for charge in demand.rates:
            cost = tokens if tokens is not None and charge.unit == "tokens" else charge.cost
            outcome = admit_one(charge.rate, tats.get(charge.limit_id, now), cost, now)
            if not outcome[0]:
                return self._refusal(demand, unix, now, tokens, spend)
            outcomes.append((charge, outcome))
        budgets = ()
        if demand.budgets:
            budgets = []
            for charge in demand.budgets:
                usage = self._usage(charge.budget_id, charge.rule.period, unix)
                if not budget_fits(charge.rule, usage.used, usage.reserved, charge.spend if spend is None else spend):
                    return self._refusal(demand, unix, now, tokens, spend)
                budgets.append((charge, usage))
        parallel = demand.parallel
        if parallel:
            in_flight = self._in_flight
            for cap in parallel:
                if in_flight.get(cap.limit_id, 0) >= cap.cap:
                    return self._refusal(demand, unix, now, tokens, spend)
            for cap in parallel:
                in_flight[cap.limit_id] = in_flight.get(cap.limit_id, 0) + 1
            parallel = tuple([cap.limit_id for cap in parallel])
        for charge, outcome in outcomes:
            tats[charge.limit_id] = outcome[1]
        for charge, usage in budgets:
            usage.reserved += charge.spend if spend is None else spend
        self._numbers += 1
        self._open.add(self._numbers)
        return Ticket(self._numbers, demand.rates, parallel, tuple([(c, u.key) for c, u in budgets]), tuple(outcomes),
                      tokens, spend)

    def _refusal(self, demand: Demand, unix: float, now: float, tokens: int | None, spend: Spend | None) -> Refusal:
        """Why a request that does not fit is refused: a spent budget first, then a rate (the longest wait over
        the failing limits, or none when one never fits), then a parallel cap."""
        if tokens is not None or spend is not None:
            demand = Demand(
                [attrs.evolve(c, cost=tokens) if tokens is not None and c.unit == "tokens" else c for c in demand.rates],
                demand.parallel,
                [attrs.evolve(c, spend=spend) if spend is not None else c for c in demand.budgets],
            )
        checks = [Check(c.limit_id, c.rate, c.cost, self._tats.get(c.limit_id, now)) for c in demand.rates]
        verdict = admit_all(checks, now)
        for charge in demand.budgets:
            usage = self._usage(charge.budget_id, charge.rule.period, unix)
            if not budget_fits(charge.rule, usage.used, usage.reserved, charge.spend):
                renews = self._period(charge.rule.period, unix)[1]
                message = budget_message(charge.rule, usage.used, usage.reserved, renews)
                return Refusal("budget", charge.budget_id, renews - unix, _looking(demand, checks, now), renews, message)
        if not verdict.allowed:
            reason = "too_large" if verdict.retry_after is None else "rate"
            return Refusal(reason, verdict.failed, verdict.retry_after, tuple(zip(demand.rates, verdict.outcomes)))
        for cap in demand.parallel:
            if not cap.fits(self._in_flight.get(cap.limit_id, 0)):
                return Refusal("parallel", cap.limit_id, None, _looking(demand, checks, now))
        raise AssertionError("_refusal of a request that fits")

    def settle(self, ticket: Ticket, tokens: int, cost: float | None = None) -> None:
        """End an exchange with its real usage: token limits and budgets take `tokens` (and `cost`, when known)
        in place of the reservation; its parallel slots are freed.  Ending a ticket twice does nothing."""
        if not self._end(ticket):
            return
        now = self.clock.seconds() - self._origin
        for charge in ticket.rates:
            if charge.unit == "tokens":
                reserved = charge.cost if ticket.tokens is None else ticket.tokens
                tat = settle(self._tats.get(charge.limit_id, now), charge.rate, reserved, tokens, now)
                if tat > now:
                    self._tats[charge.limit_id] = tat
                else:
                    self._tats.pop(charge.limit_id, None)
        for charge, key in ticket.budgets:
            reserved = charge.spend if ticket.spend is None else ticket.spend
            actual = Spend(_units(tokens), reserved.cost if cost is None else max(0.0, cost))
            self._spend(charge, key, reserved, actual)

    def release(self, ticket: Ticket) -> None:
        """End an exchange whose usage is unknown: the reservations stand as the charge; parallel slots are freed."""
        if not self._end(ticket):
            return
        for charge, key in ticket.budgets:
            reserved = charge.spend if ticket.spend is None else ticket.spend
            self._spend(charge, key, reserved, reserved)

    def seed(self, budget_id: str, period: str, used: Spend) -> bool:
        """Start a budget's current period with what was spent in it before this process started (the usage
        ledger's count); a budget this limiter already follows in that period is left alone.  Whether it was seeded."""
        unix = self.clock.seconds()
        current = self._budgets.get(budget_id)
        if current is not None and current.key == self._period(period, unix)[2]:
            return False
        usage = self._budgets[budget_id] = _Usage(period, self._period(period, unix)[2])
        usage.used = used
        return True

    def prune(self) -> None:
        """Forget drained rate states and budgets of past periods."""
        unix = self.clock.seconds()
        now = unix - self._origin
        self._tats = {name: tat for name, tat in self._tats.items() if tat > now}
        # A past period's usage is what the next admission would reset anyway; its late settlements are ignored.
        for name, usage in list(self._budgets.items()):
            if usage.key != self._period(usage.period, unix)[2]:
                del self._budgets[name]
        self._prune_at = max(1024, 2 * len(self._tats))

    def tat(self, limit_id: str) -> float | None:
        """The stored state of a rate limit, in clock seconds (None when drained or never used)."""
        tat = self._tats.get(limit_id)
        return None if tat is None else tat + self._origin

    def in_flight(self, limit_id: str) -> int:
        return self._in_flight.get(limit_id, 0)

    def budget(self, budget_id: str) -> tuple[str, Spend, Spend] | None:
        """(period key, used, reserved in flight) of a budget's current period, if it has one."""
        usage = self._budgets.get(budget_id)
        return None if usage is None else (usage.key, usage.used, usage.reserved)

    def size(self) -> int:
        """How many entries the limiter holds: bounded by the limits in use, not by requests served."""
        return len(self._tats) + len(self._in_flight) + len(self._budgets) + len(self._open)

    def _end(self, ticket: Ticket) -> bool:
        if ticket.number not in self._open:
            return False
        self._open.discard(ticket.number)
        for name in ticket.parallel:
            count = self._in_flight.get(name, 0) - 1
            if count > 0:
                self._in_flight[name] = count
            else:
                self._in_flight.pop(name, None)
        return True

    def _spend(self, charge: BudgetCharge, key: str, reserved: Spend, actual: Spend) -> None:
        usage = self._budgets.get(charge.budget_id)
        # A request counts in the period it was admitted in; once that period has gone, so has its reservation.
        if usage is None or usage.key != key:
            return
        usage.reserved -= reserved
        usage.used += actual

    def _usage(self, budget_id: str, period: str, now: float) -> _Usage:
        key = self._period(period, now)[2]
        usage = self._budgets.get(budget_id)
        if usage is None or usage.key != key:
            usage = self._budgets[budget_id] = _Usage(period, key)
        return usage

    def _period(self, period: str, now: float) -> tuple[float, float, str]:
        """(start, renewal, key) of the budget period holding `now`, computed once per period."""
        cached = self._periods.get(period)
        if cached is None or not cached[0] <= now < cached[1]:
            cached = (period_start(now, period), renews_at(now, period), period_key(now, period))
            self._periods[period] = cached
        return cached


def _looking(demand: Demand, checks: Sequence[Check], now: float) -> tuple[tuple[RateCharge, Outcome], ...]:
    """The rate limits as they stand, without this request: for the headers of a refusal on other grounds."""
    return tuple((charge, admit_one(check.rate, check.tat, 0, now)) for charge, check in zip(demand.rates, checks))

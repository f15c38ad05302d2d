"""The limits of fwd.limits as Redis Lua scripts, and what goes in and comes out of them.  Pure: no connection
here (fwd.shared runs them).  Tests: tests/test_redis_scripts.py (against a real redis-server, decision for
decision the same as the in-memory Limiter)

ADMIT decides a request on every limit of its caller in one atomic call, exactly as fwd.limits.Limiter.admit
does (GCRA per rate, parallel caps, a budget), and commits it only when everything fits; SETTLE replaces a
reservation by the real usage, or keeps it (release).  Time is the instance's clock, counted from EPOCH so that
rate states keep sub-microsecond precision in Lua's doubles (see fwd.limits); instances' clocks are expected to
agree (NTP), an error of a few milliseconds moving a limit by that much.

SETTLE ends any number of tickets in one call (an instance sends the settlements of one reactor turn together).
ADMIT and SETTLE take their arguments as one JSON array (ARGV[1], read by Redis's cjson in C), and ADMIT answers
with an array of words and whole numbers (durations in nanoseconds), which Redis formats in C: Redis's Lua
spends about a microsecond on each string it splits or formats, so a script that parsed and formatted its
numbers itself cost 60-90 µs of Redis's one core a call, more than the commands it ran.  A budget's
reservations in flight are summed as they come and go (`ht`, `hc`), not re-read from their set at each
admission.

Keys (PREFIX "fwd:"; names are limit ids of route prefixes and forward-key names, never a key):
    fwd:rate:<limit id>                    the limit's TAT, seconds since EPOCH; expires once drained
    fwd:par:<limit id>                     ZSET ticket -> lease deadline: requests in flight
    fwd:bud:<budget id>:<period>           HASH ut, uc: tokens and cost used in the period; ht, hc: held
    fwd:bud:<budget id>:<period>:held      ZSET "ticket:tokens:cost" -> lease deadline: reservations in flight
    fwd:ticket                             the last ticket number
A request in flight holds its parallel slot and budget reservation for at most LEASE_SECONDS: the lease of an
instance that died mid-request runs out on its own.
"""

from __future__ import annotations

import attrs

from fwd.limits import (
    BudgetRule,
    Outcome,
    Refusal,
    Spend,
    budget_message,
    period_key,
    renews_at,
    retry_after_header,
    tightest,
)

PREFIX = "fwd:"
# Rate states are seconds from 2026-01-01T00:00:00Z: small numbers, fine float grid.
EPOCH = 1_767_225_600.0
# The most tokens (and cost) one settlement charges: far beyond any request, far below what breaks a float.
MAX_TOKENS = 10**12
# How long a request in flight may hold a parallel slot or a budget reservation without ending.
LEASE_SECONDS = 900.0

ADMIT = r"""
local A = cjson.decode(ARGV[1])
local now, n_rates, n_par, has_budget, lease = A[1], A[2], A[3], A[4], A[5]
local lease_until = now + lease
local a = 6
local rates_ok, never, wait, failed = true, nil, -1, nil
local new_tats, remainings, resets, alloweds, standings, lags = {}, {}, {}, {}, {}, {}
for i = 1, n_rates do
  local limit, period, cost = A[a], A[a + 1], A[a + 2]
  a = a + 3
  local emission = period / limit
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  local lag = 0
  if tat > now then lag = tat - now end
  local mag = now
  if mag < 0 then mag = -mag end
  local tolerance = 1e-12 * (mag + period)
  local half = emission / 2
  if half < tolerance then tolerance = half end
  local room = period + tolerance
  local allowed, remaining, reset, retry = 0, 0, lag, -1
  if cost <= limit then
    local c = cost
    if c < 0 then c = 0 end
    local need = lag + c * emission
    if need <= room then
      allowed, reset = 1, need
      remaining = math.floor((room - need) / emission)
      new_tats[i] = now + need
    else
      retry = need - period
    end
  end
  local standing = 0
  if room > lag then standing = math.floor((room - lag) / emission) end
  if standing > limit then standing = limit end
  if allowed == 0 then
    remaining = standing
    rates_ok = false
    if retry < 0 then
      if never == nil then never = i end
    else
      if failed == nil then failed = i end
      if retry > wait then wait = retry end
    end
  end
  if remaining > limit then remaining = limit end
  remainings[i], resets[i], alloweds[i], standings[i], lags[i] = remaining, reset, allowed, standing, lag
end
local k = n_rates
local par_ok, par_failed = true, nil
for i = 1, n_par do
  local key = KEYS[k + i]
  local cap = A[a]
  a = a + 1
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= cap then
    par_ok = false
    if par_failed == nil then par_failed = i end
  end
end
k = k + n_par
local budget_ok, used_t, used_c, held_t, held_c = true, 0, 0, 0, 0
local want_t, want_c = 0, 0
if has_budget == 1 then
  local tokens_limit, cost_limit = A[a], A[a + 1]
  want_t, want_c = A[a + 2], A[a + 3]
  a = a + 4
  local spent, held = KEYS[k + 1], KEYS[k + 2]
  -- Reservations whose lease ran out (their instance died mid-request) stop counting.
  local gone = redis.call('ZRANGEBYSCORE', held, '-inf', now)
  if #gone > 0 then
    local lost_t, lost_c = 0, 0
    for _, member in ipairs(gone) do
      local _, t, c = string.match(member, '^([^:]*):([^:]*):(.*)$')
      lost_t = lost_t + tonumber(t)
      lost_c = lost_c + tonumber(c)
    end
    redis.call('ZREMRANGEBYSCORE', held, '-inf', now)
    local sums = redis.call('HMGET', spent, 'ht', 'hc')
    redis.call('HSET', spent, 'ht', (tonumber(sums[1]) or 0) - lost_t, 'hc', (tonumber(sums[2]) or 0) - lost_c)
  end
  local sums = redis.call('HMGET', spent, 'ut', 'uc', 'ht', 'hc')
  used_t, used_c = tonumber(sums[1]) or 0, tonumber(sums[2]) or 0
  held_t, held_c = tonumber(sums[3]) or 0, tonumber(sums[4]) or 0
  if held_t < 0 then held_t = 0 end
  if held_c < 0 then held_c = 0 end
  if tokens_limit >= 0 and (used_t >= tokens_limit or used_t + held_t + want_t > tokens_limit) then
    budget_ok = false
  end
  if cost_limit >= 0 and (used_c >= cost_limit or used_c + held_c + want_c > cost_limit * (1 + 1e-9)) then
    budget_ok = false
  end
end
local ns = function(seconds) return math.floor(seconds * 1e9 + 0.5) end
local reply
if budget_ok and rates_ok and par_ok then
  local ticket = redis.call('INCR', KEYS[#KEYS])
  for i = 1, n_rates do
    redis.call('SET', KEYS[i], new_tats[i], 'PX', math.ceil((new_tats[i] - now) * 1000) + 1000)
  end
  for i = 1, n_par do
    redis.call('ZADD', KEYS[n_rates + i], lease_until, ticket)
    redis.call('PEXPIRE', KEYS[n_rates + i], math.ceil(lease * 1000))
  end
  if has_budget == 1 then
    local ttl = A[a]
    local spent, held = KEYS[k + 1], KEYS[k + 2]
    redis.call('ZADD', held, lease_until, ticket .. ':' .. A[a + 1])
    -- A write costs Redis several microseconds in a script: the period's keys get their end once, when made.
    if redis.call('HSET', spent, 'ht', held_t + want_t, 'hc', held_c + want_c) > 0 then
      redis.call('EXPIRE', spent, ttl)
    end
    if redis.call('ZCARD', held) == 1 then redis.call('EXPIRE', held, ttl) end
  end
  reply = {'ok', ticket}
  for i = 1, n_rates do
    reply[#reply + 1] = remainings[i]
    reply[#reply + 1] = ns(resets[i])
  end
  return reply
end
if not budget_ok then
  reply = {'budget', string.format('%.17g', used_t), string.format('%.17g', used_c),
           string.format('%.17g', held_t), string.format('%.17g', held_c)}
elseif not rates_ok then
  if never ~= nil then
    reply = {'too_large', never}
  else
    reply = {'rate', failed, ns(wait)}
  end
else
  reply = {'parallel', par_failed}
end
for i = 1, n_rates do
  reply[#reply + 1] = alloweds[i]
  reply[#reply + 1] = standings[i]
  reply[#reply + 1] = ns(lags[i])
end
return reply
"""

SETTLE = r"""
local A = cjson.decode(ARGV[1])
local now = A[1]
local a, k, settled = 2, 0, 0
while a <= #A do
  local n_tok, n_par, has_budget, ticket = A[a], A[a + 1], A[a + 2], A[a + 3]
  a = a + 4
  for i = 1, n_tok do
    local emission, reserved, actual = A[a], A[a + 1], A[a + 2]
    a = a + 3
    local key = KEYS[k + i]
    local tat = tonumber(redis.call('GET', key)) or now
    local base = tat
    if base < now then base = now end
    local new = base + (actual - reserved) * emission
    if new > now then
      -- kept at most 400 days: a debt beyond that is as good as forever, and the number stays an integer
      redis.call('SET', key, new, 'PX', math.min(math.ceil((new - now) * 1000) + 1000, 34560000000))
    else
      redis.call('DEL', key)
    end
  end
  for i = 1, n_par do
    redis.call('ZREM', KEYS[k + n_tok + i], ticket)
  end
  k = k + n_tok + n_par
  if has_budget == 1 then
    local member, reserved_t, reserved_c, actual_t, actual_c = A[a], A[a + 1], A[a + 2], A[a + 3], A[a + 4]
    a = a + 5
    -- A reservation whose lease ran out, or whose period has gone, is no longer counted: nor is its usage.
    if redis.call('ZREM', KEYS[k + 2], member) == 1 then
      local sums = redis.call('HMGET', KEYS[k + 1], 'ut', 'uc', 'ht', 'hc')
      redis.call('HSET', KEYS[k + 1], 'ut', (tonumber(sums[1]) or 0) + actual_t,
                 'uc', (tonumber(sums[2]) or 0) + actual_c,
                 'ht', (tonumber(sums[3]) or 0) - reserved_t, 'hc', (tonumber(sums[4]) or 0) - reserved_c)
    end
    k = k + 2
  end
  settled = settled + 1
end
return settled
"""

USAGE = r"""
local ttl = tonumber(ARGV[1])
local a = 2
for i = 1, #KEYS do
  local fields = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, fields do
    local value = tonumber(ARGV[a + 1])
    if value ~= 0 then redis.call('HINCRBYFLOAT', KEYS[i], ARGV[a], ARGV[a + 1]) end
    a = a + 2
  end
  redis.call('EXPIRE', KEYS[i], ttl)
end
return #KEYS
"""
# The usage counts of a day are kept this long in Redis (the ledger of each instance keeps them for good).
USAGE_DAYS = 400
USAGE_COUNTS = ("requests", "input_tokens", "output_tokens", "estimated_tokens", "cost", "cached")
FIELD_SEPARATOR = "\x1f"


def usage_call(rows: list[tuple]) -> tuple[list, list]:
    """The USAGE call adding ledger rows (day, caller, route, model, requests, input, output, estimated, cost, cached)
    to the hashes `fwd:usage:<day>`, fields "caller<US>route<US>model<US>count"."""
    by_day: dict[str, list[str]] = {}
    for day, caller, route, model, *counts in rows:
        fields = by_day.setdefault(day, [])
        for name, value in zip(USAGE_COUNTS, counts):
            fields += [FIELD_SEPARATOR.join((caller, route, model, name)), repr(value)]
    keys, args = [], [str(USAGE_DAYS * 86_400)]
    for day, fields in by_day.items():
        keys.append(f"{PREFIX}usage:{day}")
        args += [str(len(fields) // 2), *fields]
    return keys, args


def usage_rows(day: str, fields: dict) -> list[tuple]:
    """The ledger rows of one day's usage hash, as `usage_call` wrote them."""
    rows: dict[tuple, list] = {}
    for field, value in fields.items():
        field = field.decode() if isinstance(field, bytes) else field
        parts = field.split(FIELD_SEPARATOR)
        if len(parts) != 4 or parts[3] not in USAGE_COUNTS:
            continue
        row = rows.setdefault((day, *parts[:3]), [0, 0, 0, 0, 0.0, 0])
        number = float(value.decode() if isinstance(value, bytes) else value)
        index = USAGE_COUNTS.index(parts[3])
        row[index] = number if index == 4 else int(number)
    return [(*key, *counts) for key, counts in sorted(rows.items())]


def _number(value: float) -> str:
    """A float as Lua reads it back exactly."""
    return repr(float(value))


@attrs.frozen
class RedisTicket:
    """An admission decided in Redis: what SETTLE needs to end it, and the headers of its limits."""

    number: int
    tokens_keys: tuple[str, ...]
    emissions: tuple[float, ...]
    parallel_keys: tuple[str, ...]
    budget_keys: tuple[str, str] | None
    reserved: Spend
    outcomes: tuple = ()

    @property
    def budget_member(self) -> str:
        return f"{self.number}:{reservation_text(self.reserved)}"

    def headers(self) -> list[tuple[bytes, bytes]]:
        from fwd.limits import rate_limit_headers

        return rate_limit_headers(tightest(self.outcomes, "requests"), tightest(self.outcomes, "tokens"))

    def head_lines(self) -> bytes:
        return b"".join([b"%s: %s\r\n" % pair for pair in self.headers()])


@attrs.frozen
class AdmitCall:
    """One ADMIT call: its keys and arguments, and what reading its reply needs."""

    keys: list[str]
    args: list[str]
    plan: object
    spend: Spend
    unix: float


@attrs.frozen
class Shape:
    """What every ADMIT call of one Plan has in common, worked out once (`shape_of`)."""

    rate_keys: list[str]
    parallel_keys: tuple[str, ...]
    head: str  # the JSON words after the clock: counts, and each rate's limit and period
    parallel_words: str
    tokens_keys: tuple[str, ...]  # the rates charged in tokens: their keys and emissions, for SETTLE
    emissions: tuple[float, ...]
    rates: tuple  # per rate: its limit and period as words, whether it counts tokens, its cost per request


def shape_of(plan, lease: float = LEASE_SECONDS) -> Shape:
    """The Shape of a Plan's ADMIT calls."""
    rates = plan.demand.rates
    has_budget = plan.budget is not None
    words = [str(len(rates)), str(len(plan.parallel)), "1" if has_budget else "0", _number(lease)]
    tokens = [i for i, charge in enumerate(rates) if charge.unit == "tokens"]
    return Shape(
        [PREFIX + "rate:" + charge.limit_id for charge in rates],
        tuple(PREFIX + "par:" + cap.limit_id for cap in plan.parallel),
        ",".join(words),
        ",".join(str(cap.cap) for cap in plan.parallel),
        tuple(PREFIX + "rate:" + rates[i].limit_id for i in tokens),
        tuple(rates[i].rate.emission for i in tokens),
        tuple((str(charge.rate.limit), _number(charge.rate.period), charge.unit == "tokens", str(charge.cost))
              for charge in rates),
    )


def admit_call(plan, tokens: int, cost: float, unix: float, lease: float = LEASE_SECONDS,
               shape: Shape | None = None, period: tuple | None = None) -> AdmitCall:
    """The ADMIT call of one request of a caller with this Plan (fwd.quota), reserving `tokens` (and `cost`).

    `shape` is the Plan's `shape_of` and `period` its budget's `budget_period` at `unix`, when the caller keeps
    them (both are worked out here otherwise)."""
    if shape is None:
        shape = shape_of(plan, lease)
    spend = Spend(tokens, cost)
    words = [_number(unix - EPOCH), shape.head]
    charged = str(tokens)
    for limit, period_words, in_tokens, per_request in shape.rates:
        words += [limit, period_words, charged if in_tokens else per_request]
    if shape.parallel_words:
        words.append(shape.parallel_words)
    keys = shape.rate_keys + list(shape.parallel_keys)
    if plan.budget is not None:
        budget_id, rule = plan.budget
        key, renews = period or budget_period(budget_id, rule, unix)
        keys += [key, key + ":held"]
        words += [
            str(rule.tokens) if rule.tokens is not None else "-1",
            _number(rule.cost) if rule.cost is not None else "-1",
            charged,
            _number(cost),
            str(int(renews - unix) + 86_400),  # kept a day past the period's end
            '"%s"' % reservation_text(spend),
        ]
    keys.append(PREFIX + "ticket")
    return AdmitCall(keys, ["[" + ",".join(words) + "]"], plan, spend, unix)


def budget_period(budget_id: str, rule, unix: float) -> tuple[str, float]:
    """The key of a budget's period holding `unix`, and when that period ends."""
    return f"{PREFIX}bud:{budget_id}:{period_key(unix, rule.period)}", renews_at(unix, rule.period)


def admit_result(call: AdmitCall, reply, shape: Shape | None = None):
    """The RedisTicket or the Refusal an ADMIT reply means (fwd.limits's own classes, for the same headers)."""
    verdict = _text(reply[0])
    plan = call.plan
    rates = plan.demand.rates
    if verdict == "ok":
        if shape is None:
            shape = shape_of(plan)
        outcomes = tuple(
            (charge, Outcome(True, 0.0, charge.rate.limit, int(reply[2 + 2 * i]), int(reply[3 + 2 * i]) / 1e9))
            for i, charge in enumerate(rates)
        )
        return RedisTicket(
            int(reply[1]),
            shape.tokens_keys,
            shape.emissions,
            shape.parallel_keys,
            tuple(call.keys[-3:-1]) if plan.budget is not None else None,
            call.spend,
            outcomes,
        )
    # Refused: the limits as they stand, nothing taken.
    per_rate = reply[len(reply) - 3 * len(rates):]
    outcomes = tuple(
        (charge, Outcome(bool(int(per_rate[3 * i])), 0.0, charge.rate.limit, int(per_rate[3 * i + 1]),
                         int(per_rate[3 * i + 2]) / 1e9))
        for i, charge in enumerate(rates)
    )
    if verdict == "budget":
        budget_id, rule = plan.budget
        used = Spend(int(float(_text(reply[1]))), float(_text(reply[2])))
        held = Spend(int(float(_text(reply[3]))), float(_text(reply[4])))
        renews = renews_at(call.unix, rule.period)
        return Refusal("budget", budget_id, renews - call.unix, _looking(outcomes), renews,
                       budget_message(rule, used, held, renews))
    if verdict == "too_large":
        return Refusal("too_large", rates[int(reply[1]) - 1].limit_id, None, outcomes)
    if verdict == "rate":
        return Refusal("rate", rates[int(reply[1]) - 1].limit_id, int(reply[2]) / 1e9, outcomes)
    if verdict == "parallel":
        return Refusal("parallel", plan.parallel[int(reply[1]) - 1].limit_id, None, _looking(outcomes))
    raise ValueError(f"unexpected ADMIT reply {reply!r}")


def _looking(outcomes: tuple) -> tuple:
    """The rate outcomes of a request refused for another reason: as they stand, nothing taken."""
    return tuple((charge, outcome._replace(allowed=True)) for charge, outcome in outcomes)


def settle_record(ticket: RedisTicket, tokens: int | None, cost: float | None) -> tuple[list, list]:
    """One ticket's part of a SETTLE call: its keys and its words (several tickets go in one call, `settle_many`)."""
    reserved = ticket.reserved
    # Bounded: an upstream's absurd usage must not make a number Redis refuses (and fail the whole batch).
    actual_tokens = reserved.tokens if tokens is None else min(max(0, int(tokens)), MAX_TOKENS)
    actual_cost = reserved.cost if cost is None else min(max(0.0, cost), MAX_TOKENS)
    keys = list(ticket.tokens_keys) + list(ticket.parallel_keys)
    reserved_tokens, used_tokens = str(reserved.tokens), str(actual_tokens)
    words = [str(len(ticket.tokens_keys)), str(len(ticket.parallel_keys)), "1" if ticket.budget_keys else "0",
             str(ticket.number)]
    for emission in ticket.emissions:
        words += [_number(emission), reserved_tokens, used_tokens]
    if ticket.budget_keys:
        keys += list(ticket.budget_keys)
        words += ['"%s"' % ticket.budget_member, reserved_tokens, _number(reserved.cost), used_tokens,
                  _number(actual_cost)]
    return keys, words


def settle_many(records: list[tuple[list, list]], unix: float) -> tuple[list, list]:
    """One SETTLE call ending several tickets (their `settle_record`s), in order."""
    keys: list = []
    words = [_number(unix - EPOCH)]
    for record_keys, record_words in records:
        keys += record_keys
        words += record_words
    return keys, ["[" + ",".join(words) + "]"]


def reservation_text(spend: Spend) -> str:
    """A reservation in a budget's held set, after its ticket number: "tokens:cost"."""
    return f"{int(spend.tokens)}:{_number(spend.cost)}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["ADMIT", "SETTLE", "RedisTicket", "admit_call", "admit_result", "settle_many",
           "settle_record", "retry_after_header", "BudgetRule"]

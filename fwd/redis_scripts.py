"""The limits of fwd.limits as Redis Lua scripts, and what goes in and comes out of them.  Pure: no connection
here (fwd.shared runs them).  Tests: tests/test_redis_scripts.py (against a real redis-server, decision for
decision the same as the in-memory Limiter)

ADMIT decides a request on every limit of its caller in one atomic call, exactly as fwd.limits.Limiter.admit
does (GCRA per rate, parallel caps, a budget), and commits it only when everything fits; SETTLE replaces a
reservation by the real usage, or keeps it (release).  Time is the instance's clock, counted from EPOCH so that
rate states keep sub-microsecond precision in Lua's doubles (see fwd.limits); instances' clocks are expected to
agree (NTP), an error of a few milliseconds moving a limit by that much.

SETTLE ends any number of tickets in one call (an instance sends the settlements of one reactor turn together).
ADMIT and SETTLE take their arguments as one string of space-separated words (ARGV[1]) and ADMIT answers with
one such string: a client encodes and parses one value instead of forty (txredisapi spends about 2 µs on each).

Keys (PREFIX "fwd:"; names are limit ids of route prefixes and forward-key names, never a key):
    fwd:rate:<limit id>                    the limit's TAT, seconds since EPOCH; expires once drained
    fwd:par:<limit id>                     ZSET ticket -> lease deadline: requests in flight
    fwd:bud:<budget id>:<period>           HASH ut, uc: tokens and cost used in the period
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
local A = {}
for word in string.gmatch(ARGV[1], '%S+') do A[#A + 1] = word end
local now = tonumber(A[1])
local n_rates, n_par, has_budget = tonumber(A[2]), tonumber(A[3]), tonumber(A[4])
local lease_until = now + tonumber(A[5])
local a = 6
local out = {}
local rates_ok, never, wait, failed = true, nil, -1, nil
local new_tats = {}
for i = 1, n_rates do
  local limit, period, cost = tonumber(A[a]), tonumber(A[a + 1]), tonumber(A[a + 2])
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
  out[#out + 1] = allowed
  out[#out + 1] = string.format('%d', remaining)
  out[#out + 1] = string.format('%.17g', reset)
  out[#out + 1] = string.format('%d', standing)
  out[#out + 1] = string.format('%.17g', lag)
end
local k = n_rates
local par_ok, par_failed = true, nil
for i = 1, n_par do
  local key = KEYS[k + i]
  local cap = tonumber(A[a])
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
  local tokens_limit, cost_limit = tonumber(A[a]), tonumber(A[a + 1])
  want_t, want_c = tonumber(A[a + 2]), tonumber(A[a + 3])
  a = a + 4
  local used = redis.call('HMGET', KEYS[k + 1], 'ut', 'uc')
  used_t, used_c = tonumber(used[1]) or 0, tonumber(used[2]) or 0
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 2], '-inf', now)
  for _, member in ipairs(redis.call('ZRANGE', KEYS[k + 2], 0, -1)) do
    local _, t, c = string.match(member, '^([^:]*):([^:]*):(.*)$')
    held_t = held_t + tonumber(t)
    held_c = held_c + tonumber(c)
  end
  if tokens_limit >= 0 and (used_t >= tokens_limit or used_t + held_t + want_t > tokens_limit) then
    budget_ok = false
  end
  if cost_limit >= 0 and (used_c >= cost_limit or used_c + held_c + want_c > cost_limit * (1 + 1e-9)) then
    budget_ok = false
  end
end
local head
if not budget_ok then
  head = {'budget', 0, string.format('%.17g', used_t), string.format('%.17g', used_c),
          string.format('%.17g', held_t), string.format('%.17g', held_c)}
elseif not rates_ok then
  if never ~= nil then
    head = {'too_large', never, -1}
  else
    head = {'rate', failed, string.format('%.17g', wait)}
  end
elseif not par_ok then
  head = {'parallel', par_failed}
else
  local ticket = redis.call('INCR', KEYS[#KEYS])
  for i = 1, n_rates do
    local ttl = math.ceil((new_tats[i] - now) * 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.17g', new_tats[i]), 'PX', ttl)
  end
  for i = 1, n_par do
    redis.call('ZADD', KEYS[n_rates + i], lease_until, ticket)
    redis.call('PEXPIRE', KEYS[n_rates + i], math.ceil(tonumber(A[5]) * 1000))
  end
  if has_budget == 1 then
    local ttl = tonumber(A[a])
    redis.call('ZADD', KEYS[k + 2], lease_until, ticket .. ':' .. A[a + 1])
    redis.call('EXPIRE', KEYS[k + 1], ttl)
    redis.call('EXPIRE', KEYS[k + 2], ttl)
  end
  head = {'ok', ticket}
end
for _, v in ipairs(out) do head[#head + 1] = v end
return table.concat(head, ' ')
"""

SETTLE = r"""
local A = {}
for word in string.gmatch(ARGV[1], '%S+') do A[#A + 1] = word end
local now = tonumber(A[1])
local a, k, settled = 2, 0, 0
while a <= #A do
  local n_tok, n_par, has_budget = tonumber(A[a]), tonumber(A[a + 1]), tonumber(A[a + 2])
  local ticket = A[a + 3]
  a = a + 4
  for i = 1, n_tok do
    local emission, reserved, actual = tonumber(A[a]), tonumber(A[a + 1]), tonumber(A[a + 2])
    a = a + 3
    local key = KEYS[k + i]
    local tat = tonumber(redis.call('GET', key)) or now
    local base = tat
    if base < now then base = now end
    local new = base + (actual - reserved) * emission
    if new > now then
      -- kept at most 400 days: a debt beyond that is as good as forever, and the number stays an integer
      redis.call('SET', key, string.format('%.17g', new), 'PX', math.min(math.ceil((new - now) * 1000) + 1000, 34560000000))
    else
      redis.call('DEL', key)
    end
  end
  for i = 1, n_par do
    redis.call('ZREM', KEYS[k + n_tok + i], ticket)
  end
  k = k + n_tok + n_par
  if has_budget == 1 then
    local member, actual_t, actual_c = A[a], tonumber(A[a + 1]), tonumber(A[a + 2])
    a = a + 3
    -- A reservation whose lease ran out, or whose period has gone, is no longer counted: nor is its usage.
    if redis.call('ZREM', KEYS[k + 2], member) == 1 then
      if actual_t ~= 0 then redis.call('HINCRBYFLOAT', KEYS[k + 1], 'ut', actual_t) end
      if actual_c ~= 0 then redis.call('HINCRBYFLOAT', KEYS[k + 1], 'uc', actual_c) end
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


def admit_call(plan, tokens: int, cost: float, unix: float, lease: float = LEASE_SECONDS) -> AdmitCall:
    """The ADMIT call of one request of a caller with this Plan (fwd.quota), reserving `tokens` (and `cost`)."""
    keys, args = [], []
    rates = plan.demand.rates
    for charge in rates:
        keys.append(PREFIX + "rate:" + charge.limit_id)
        args += [str(charge.rate.limit), _number(charge.rate.period), str(tokens if charge.unit == "tokens" else charge.cost)]
    for cap in plan.parallel:
        keys.append(PREFIX + "par:" + cap.limit_id)
        args.append(str(cap.cap))
    has_budget = plan.budget is not None
    spend = Spend(tokens, cost)
    if has_budget:
        budget_id, rule = plan.budget
        budget = f"{PREFIX}bud:{budget_id}:{period_key(unix, rule.period)}"
        keys += [budget, budget + ":held"]
        args += [
            str(rule.tokens) if rule.tokens is not None else "-1",
            _number(rule.cost) if rule.cost is not None else "-1",
            str(tokens),
            _number(cost),
            str(int(renews_at(unix, rule.period) - unix) + 86_400),  # kept a day past the period's end
            reservation_text(spend),
        ]
    keys.append(PREFIX + "ticket")
    head = [_number(unix - EPOCH), str(len(rates)), str(len(plan.parallel)), "1" if has_budget else "0", _number(lease)]
    return AdmitCall(keys, [" ".join(head + args)], plan, spend, unix)


def admit_result(call: AdmitCall, reply):
    """The RedisTicket or the Refusal an ADMIT reply means (fwd.limits's own classes, for the same headers)."""
    reply = reply.split()
    verdict = _text(reply[0])
    plan = call.plan
    rates = plan.demand.rates
    per_rate = reply[-5 * len(rates) :] if rates else []
    outcomes = []
    for number, charge in enumerate(rates):
        allowed, remaining, reset, standing, lag = per_rate[5 * number : 5 * number + 5]
        if verdict != "ok":
            # As fwd.limits refuses: the limits as they stand, nothing taken.
            remaining, reset = standing, lag
        outcomes.append(
            (charge, Outcome(bool(int(allowed)), 0.0, charge.rate.limit, int(remaining), float(_text(reset))))
        )
    outcomes = tuple(outcomes)
    if verdict == "ok":
        tokens_charges = [charge for charge in rates if charge.unit == "tokens"]
        budget_keys = tuple(call.keys[-3:-1]) if plan.budget is not None else None
        return RedisTicket(
            int(reply[1]),
            tuple(PREFIX + "rate:" + c.limit_id for c in tokens_charges),
            tuple(c.rate.emission for c in tokens_charges),
            tuple(PREFIX + "par:" + cap.limit_id for cap in plan.parallel),
            budget_keys,
            call.spend,
            outcomes,
        )
    if verdict == "budget":
        budget_id, rule = plan.budget
        used = Spend(int(float(_text(reply[2]))), float(_text(reply[3])))
        held = Spend(int(float(_text(reply[4]))), float(_text(reply[5])))
        renews = renews_at(call.unix, rule.period)
        return Refusal("budget", budget_id, renews - call.unix, _looking(outcomes), renews,
                       budget_message(rule, used, held, renews))
    if verdict == "too_large":
        return Refusal("too_large", rates[int(reply[1]) - 1].limit_id, None, outcomes)
    if verdict == "rate":
        return Refusal("rate", rates[int(reply[1]) - 1].limit_id, float(_text(reply[2])), outcomes)
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
    words = [str(len(ticket.tokens_keys)), str(len(ticket.parallel_keys)), "1" if ticket.budget_keys else "0",
             str(ticket.number)]
    for emission in ticket.emissions:
        words += [_number(emission), str(reserved.tokens), str(actual_tokens)]
    if ticket.budget_keys:
        keys += list(ticket.budget_keys)
        words += [ticket.budget_member, str(actual_tokens), _number(actual_cost)]
    return keys, words


def settle_many(records: list[tuple[list, list]], unix: float) -> tuple[list, list]:
    """One SETTLE call ending several tickets (their `settle_record`s), in order."""
    keys: list = []
    words = [_number(unix - EPOCH)]
    for record_keys, record_words in records:
        keys += record_keys
        words += record_words
    return keys, [" ".join(words)]


def reservation_text(spend: Spend) -> str:
    """A reservation in a budget's held set, after its ticket number: "tokens:cost"."""
    return f"{int(spend.tokens)}:{_number(spend.cost)}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["ADMIT", "SETTLE", "RedisTicket", "admit_call", "admit_result", "settle_many",
           "settle_record", "retry_after_header", "BudgetRule"]

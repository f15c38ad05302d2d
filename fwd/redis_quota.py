"""Limits and budgets shared by every instance: the QuotaStore (fwd.quota) that decides in Redis, and falls
back on this instance's own Limiter while Redis cannot be asked.  Tests: tests/test_shared.py,
tests/test_redis_e2e.py

One admission is one call of the ADMIT script (fwd.redis_scripts); its end is part of one SETTLE call that ends
every ticket of the same reactor turn (at most SETTLE_BATCH), sent without waiting for it.  With REDIS_FAILURE=open (the default) a request that cannot be decided in Redis is decided by the local
Limiter, so no client sees Redis trouble (the limits then hold per instance); with closed it gets 503 and
nothing is forwarded.  Either way no request waits on Redis longer than REDIS_TIMEOUT.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from fwd import errors
from fwd.limits import Ticket, period_start
from fwd.quota import LocalQuota, Plan, Reservation
from fwd.redis_scripts import (
    RedisTicket,
    admit_call,
    admit_result,
    budget_period,
    settle_many,
    settle_record,
    shape_of,
)
from fwd.shared import RedisUnavailable, SharedState

log = Logger(namespace="fwd.quota")
# The most tickets one SETTLE call ends.
SETTLE_BATCH = 64
# The most Plans whose Shape is kept (the gateway's own bound on its Plans is far below it).
MAX_SHAPES = 4096


class RedisQuota:
    """The QuotaStore of an instance sharing its limits through Redis."""

    def __init__(self, shared: SharedState, local: LocalQuota, clock):
        self.shared = shared
        self.local = local
        self.clock = clock
        self.settling: list[tuple[list, list]] = []
        self.flush_call = None
        # Per Plan (the gateway keeps one per caller and route): its Shape, and its budget's period while it lasts.
        self.shapes: dict[int, tuple] = {}
        shared.before_stop.append(self.flush)  # the last settlements go before the connection closes

    @property
    def limiter(self):
        """The local Limiter (what the usage ledger seeds, and what decides while Redis is down)."""
        return self.local.limiter

    def admit(self, plan: Plan, reserved: Reservation):
        if not self.shared.up:
            return self._without_redis(plan, reserved)
        unix = self.clock.seconds()
        shape, period = self._shape(plan, unix)
        call = admit_call(plan, reserved.prompt + reserved.output, reserved.cost or 0.0, unix, shape=shape,
                          period=period)
        deciding = self.shared.run("admit", call.keys, call.args)

        def unavailable(reason):
            reason.trap(RedisUnavailable)
            return self._without_redis(plan, reserved)

        deciding.addCallbacks(lambda reply: admit_result(call, reply, shape), unavailable)
        # A client that leaves while its request is decided cancels `decided`, not the call: Redis's reply still
        # comes (a cancelled call would count as Redis being late), and what it admitted is given back at once.
        decided = defer.Deferred(lambda _: None)
        deciding.addBoth(self._decided, decided)
        return decided

    def _decided(self, result, decided: defer.Deferred) -> None:
        if not decided.called:
            decided.callback(result)
        elif isinstance(result, (RedisTicket, Ticket)):
            self.settle(result, 0, 0.0)  # nothing was forwarded: no tokens spent, the slot free again

    def _shape(self, plan: Plan, unix: float) -> tuple:
        """The Plan's Shape and its budget's (period key, end) at `unix`, worked out once a period."""
        known = self.shapes.get(id(plan))
        if known is None or known[0] is not plan or not known[3] <= unix < known[4]:
            if len(self.shapes) >= MAX_SHAPES:
                self.shapes.clear()
            period, start, end = None, float("-inf"), float("inf")
            if plan.budget is not None:
                period = budget_period(*plan.budget, unix)
                start, end = period_start(unix, plan.budget[1].period), period[1]
            known = self.shapes[id(plan)] = (plan, shape_of(plan), period, start, end)
        return known[1], known[2]

    def _without_redis(self, plan: Plan, reserved: Reservation):
        if self.shared.failure == "closed":
            return errors.limits_unavailable()
        return self.local.admit(plan, reserved)

    def settle(self, ticket, tokens: int, cost: float | None) -> None:
        if isinstance(ticket, RedisTicket):
            self._end(ticket, tokens, cost)
        else:
            self.local.settle(ticket, tokens, cost)

    def release(self, ticket) -> None:
        if isinstance(ticket, RedisTicket):
            self._end(ticket, None, None)
        else:
            self.local.release(ticket)

    def _end(self, ticket: RedisTicket, tokens: int | None, cost: float | None) -> None:
        self.settling.append(settle_record(ticket, tokens, cost))
        if len(self.settling) >= SETTLE_BATCH:
            self.flush()
        elif self.flush_call is None:
            self.flush_call = self.clock.callLater(0, self.flush)

    def flush(self):
        """Send the settlements waiting, in one SETTLE call (a Deferred of its end, which nothing else waits for:
        a settlement lost to Redis trouble leaves the reservation standing until its lease ends)."""
        if self.flush_call is not None and self.flush_call.active():
            self.flush_call.cancel()
        self.flush_call = None
        records, self.settling = self.settling, []
        if not records:
            return None
        keys, args = settle_many(records, self.clock.seconds())
        return self.shared.run("settle", keys, args).addErrback(lambda reason: reason.trap(RedisUnavailable))

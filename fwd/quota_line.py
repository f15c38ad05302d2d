"""Limits and budgets exact across `--workers`: the supervisor decides every admission, over each worker's
control line.  Tests: tests/test_quota_line.py

One Limiter, in the supervisor, holds every rate state, in-flight count and budget; a worker asks it before
forwarding a limited request and tells it how the exchange ended.  So a key limited to 60 requests a minute gets
60 whatever the number of workers, and a budget is spent once.  Each worker already has a socket pair to its
supervisor (fwd.workers, fd 4) that carries its configuration; the same line carries, one JSON line each:

    worker -> supervisor   {"admit": id, "plan": {...}, "reserved": [prompt, output, cost]}
                           {"settle": ticket, "tokens": n, "cost": x}      {"release": ticket}
    supervisor -> worker   {"ticket": id, "number": ticket, "headers": [[name, value], ...]}
                           {"refused": id, "reason": ..., "retry_after": s, "message": ..., "headers": [...]}

The plan (fwd.quota.Plan: the limits and their ids) travels with each request, so the supervisor needs no
configuration of its own to decide and a reload takes effect with the next request, as in one process.  A
worker that dies has its tickets released; a client that leaves while its worker waits for the answer has its
ticket released when the answer comes.  An admission costs one round trip on a local socket (tens of
microseconds); a request with no limits never asks.
"""

from __future__ import annotations

import itertools

import attrs
import orjson
from twisted.internet import defer
from twisted.logger import Logger

from fwd import errors
from fwd.limits import BudgetRule, Limiter, Parallel, Rate, RateCharge, Refusal, Ticket
from fwd.quota import Plan, Reservation

log = Logger(namespace="fwd.quota")

# How many decoded plans the supervisor keeps (one per route and caller, in practice).
PLAN_CACHE = 4096


def plan_json(plan: Plan) -> bytes:
    """A Plan on the line."""
    return orjson.dumps({
        "r": [[c.limit_id, c.rate.limit, c.rate.period, c.cost] for c in plan.requests],
        "t": [[name, rate.limit, rate.period] for name, rate in plan.tokens],
        "p": [[cap.limit_id, cap.cap] for cap in plan.parallel],
        "b": None if plan.budget is None else [plan.budget[0], plan.budget[1].tokens, plan.budget[1].cost,
                                              plan.budget[1].period],
    })


def plan_from(data: dict) -> Plan:
    """The Plan a worker sent."""
    budget = data["b"]
    return Plan(
        requests=tuple(RateCharge(name, Rate(limit, period), cost, "requests") for name, limit, period, cost in data["r"]),
        tokens=tuple((name, Rate(limit, period)) for name, limit, period in data["t"]),
        parallel=tuple(Parallel(name, cap) for name, cap in data["p"]),
        budget=None if budget is None else (budget[0], BudgetRule(budget[1], budget[2], budget[3])),
    )


def _headers_out(headers) -> list[list[str]]:
    return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]


def _headers_in(headers) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


@attrs.frozen
class LineTicket:
    """A worker's ticket: the supervisor's ticket number and the headers of its limits."""

    number: int
    sent_headers: tuple[tuple[bytes, bytes], ...]

    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.sent_headers)

    def head_lines(self) -> bytes:
        return b"".join([b"%s: %s\r\n" % pair for pair in self.sent_headers])


@attrs.frozen
class LineRefusal(Refusal):
    """A refusal decided by the supervisor, with the headers it computed."""

    sent_headers: tuple[tuple[bytes, bytes], ...] = ()

    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.sent_headers)


class SupervisorQuota:
    """A worker's QuotaStore (fwd.quota): admissions asked of the supervisor over the control line.

    `send` writes one line to the supervisor; the control line's protocol hands each answer to `answer`."""

    def __init__(self, send):
        self.send = send
        self.waiting: dict[int, defer.Deferred] = {}
        self.abandoned: set[int] = set()
        self.numbers = itertools.count(1)
        self.encoded: dict[Plan, bytes] = {}
        self.lost = False

    def admit(self, plan: Plan, reserved: Reservation) -> defer.Deferred:
        if self.lost:
            return defer.succeed(errors.limits_unavailable())
        encoded = self.encoded.get(plan)
        if encoded is None:
            if len(self.encoded) >= PLAN_CACHE:
                self.encoded.clear()
            encoded = self.encoded[plan] = plan_json(plan)
        number = next(self.numbers)
        cost = "null" if reserved.cost is None else repr(float(reserved.cost))
        self.send(b'{"admit":%d,"plan":%s,"reserved":[%d,%d,%s]}\n' % (
            number, encoded, reserved.prompt, reserved.output, cost.encode()))

        def cancel(_):
            # The client left: its ticket, when it comes, is given back at once.
            self.waiting.pop(number, None)
            self.abandoned.add(number)

        waiting = self.waiting[number] = defer.Deferred(cancel)
        return waiting

    def settle(self, ticket: LineTicket, tokens: int, cost: float | None) -> None:
        if not self.lost:
            self.send(orjson.dumps({"settle": ticket.number, "tokens": tokens, "cost": cost}) + b"\n")

    def release(self, ticket: LineTicket) -> None:
        if not self.lost:
            self.send(b'{"release":%d}\n' % ticket.number)

    def answer(self, message: dict) -> None:
        """One answer of the supervisor (a decoded line with "ticket" or "refused")."""
        if "ticket" in message:
            number = message["ticket"]
            outcome = LineTicket(message["number"], tuple(_headers_in(message["headers"])))
        else:
            number = message["refused"]
            outcome = LineRefusal(
                message["reason"], message.get("limit_id", ""), message.get("retry_after"),
                renews_at=message.get("renews_at"), message=message.get("message", ""),
                sent_headers=tuple(_headers_in(message["headers"])),
            )
        waiting = self.waiting.pop(number, None)
        if waiting is not None:
            waiting.callback(outcome)
        elif number in self.abandoned:
            self.abandoned.discard(number)
            if isinstance(outcome, LineTicket):
                self.release(outcome)

    def line_lost(self) -> None:
        """The supervisor is gone: the requests waiting get a 503 (the worker stops soon after)."""
        self.lost = True
        waiting, self.waiting = self.waiting, {}
        for deferred in waiting.values():
            deferred.callback(errors.limits_unavailable())


class QuotaServer:
    """The supervisor's side: one Limiter for every worker; tickets are remembered per worker until they end."""

    def __init__(self, limiter: Limiter):
        self.limiter = limiter
        self.plans: dict[bytes, Plan] = {}
        self.tickets: dict[int, dict[int, Ticket]] = {}

    def handle(self, worker: int, message: dict) -> bytes | None:
        """Act on one worker's message; the answer line to send back, if any."""
        if "admit" in message:
            return self._admit(worker, message)
        held = self.tickets.get(worker, {})
        if "settle" in message:
            ticket = held.pop(message["settle"], None)
            if ticket is not None:
                self.limiter.settle(ticket, int(message["tokens"]), message.get("cost"))
        elif "release" in message:
            ticket = held.pop(message["release"], None)
            if ticket is not None:
                self.limiter.release(ticket)
        return None

    def _admit(self, worker: int, message: dict) -> bytes:
        key = orjson.dumps(message["plan"])
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= PLAN_CACHE:
                self.plans.clear()
            plan = self.plans[key] = plan_from(message["plan"])
        prompt, output, cost = message["reserved"]
        outcome = plan.admit(self.limiter, Reservation(int(prompt), int(output), cost))
        if isinstance(outcome, Refusal):
            return orjson.dumps({
                "refused": message["admit"], "reason": outcome.reason, "limit_id": outcome.limit_id,
                "retry_after": outcome.retry_after, "renews_at": outcome.renews_at, "message": outcome.message,
                "headers": _headers_out(outcome.headers()),
            }) + b"\n"
        self.tickets.setdefault(worker, {})[outcome.number] = outcome
        return orjson.dumps({
            "ticket": message["admit"], "number": outcome.number, "headers": _headers_out(outcome.headers())
        }) + b"\n"

    def worker_gone(self, worker: int) -> int:
        """A worker exited: what its exchanges held is released (their usage is unknown).  How many."""
        held = self.tickets.pop(worker, {})
        for ticket in held.values():
            self.limiter.release(ticket)
        return len(held)

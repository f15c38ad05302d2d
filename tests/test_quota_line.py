"""Limits across --workers: workers ask the supervisor's one Limiter over their control lines, in memory."""

import orjson
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from fwd import config, workers
from fwd.limits import Limiter, Rate, Refusal
from fwd.quota import Reservation, plan_for
from fwd.quota_line import LineTicket, QuotaServer, plan_from, plan_json
from fwd.worker import ControlLine as WorkerLine


def route_with(**limits) -> config.Route:
    key = config.ForwardKey("fk-line-alice-00000000000001", "alice", limits=config.Limits(**limits))
    return config.Route(prefix="", base_url="http://u.test", forward_keys=(key,))


class Pair:
    """A worker's control line and the supervisor's end of it, joined in memory."""

    def __init__(self, server: QuotaServer):
        self.supervisor = workers.ControlLine(server)
        self.supervisor.makeConnection(StringTransport())
        self.worker = WorkerLine(reloader=None)
        self.worker.makeConnection(StringTransport())
        self.quota = self.worker.quota

    def pump(self) -> None:
        """Carry the lines each way until both are quiet."""
        while True:
            up, down = self.worker.transport.value(), self.supervisor.transport.value()
            if not up and not down:
                return
            self.worker.transport.clear()
            self.supervisor.transport.clear()
            if up:
                self.supervisor.dataReceived(up)
            if down:
                self.worker.dataReceived(down)


def outcome(deferred: defer.Deferred):
    results = []
    deferred.addBoth(results.append)
    return results[0] if results else None


def test_a_plan_crosses_the_line_unchanged():
    route = route_with(rpm=Rate(60, 60.0), tpm=Rate(1000, 60.0), max_parallel=2,
                       budget=config.parse_budget({"tokens": 500, "period": "day"}))
    route = config.Route(prefix="/team", base_url="http://u.test", forward_keys=route.forward_keys,
                         limits=config.Limits(rpm=Rate(5, 1.0)))
    plan = plan_for(route, "alice", route.forward_keys[0].limits)
    assert plan_from(orjson.loads(plan_json(plan))) == plan


def test_two_workers_share_one_limit_a_key_limited_to_10_a_second_gets_10():
    clock = Clock()
    server = QuotaServer(Limiter(clock))
    first, second = Pair(server), Pair(server)
    route = route_with(rpm=Rate(10, 1.0))
    plan = plan_for(route, "alice", route.forward_keys[0].limits)
    asked = [pair.quota.admit(plan, Reservation(5, 0)) for _ in range(25) for pair in (first, second)]
    first.pump(), second.pump()
    results = [outcome(d) for d in asked]
    tickets = [r for r in results if isinstance(r, LineTicket)]
    refusals = [r for r in results if isinstance(r, Refusal)]
    assert len(tickets) == 10 and len(refusals) == 40
    assert dict(refusals[0].headers())[b"x-ratelimit-limit-requests"] == b"10"
    assert dict(refusals[0].headers())[b"retry-after"] == b"1"
    assert dict(tickets[-1].headers())[b"x-ratelimit-remaining-requests"] == b"0"
    clock.advance(1.0)
    again = first.quota.admit(plan, Reservation(5, 0))
    first.pump()
    assert isinstance(outcome(again), LineTicket), "a second later the limit allows again"


def test_settled_usage_reaches_the_one_limiter_and_a_dead_worker_gives_its_slots_back():
    clock = Clock()
    limiter = Limiter(clock)
    server = QuotaServer(limiter)
    pair = Pair(server)
    route = route_with(tpm=Rate(1000, 60.0), max_parallel=1)
    plan = plan_for(route, "alice", route.forward_keys[0].limits)
    first = pair.quota.admit(plan, Reservation(100, 800))
    pair.pump()
    ticket = outcome(first)
    blocked = pair.quota.admit(plan, Reservation(1, 1))
    pair.pump()
    assert outcome(blocked).reason == "parallel"
    pair.quota.settle(ticket, 20, None)
    pair.pump()
    assert limiter.in_flight("key:/:alice:parallel") == 0
    # 1000 - 20 tokens left: a reservation of 900 fits now (it did not while 900 were reserved).
    held = pair.quota.admit(plan, Reservation(100, 800))
    pair.pump()
    assert isinstance(outcome(held), LineTicket)
    assert limiter.in_flight("key:/:alice:parallel") == 1
    pair.supervisor.connectionLost()  # the worker died mid-exchange
    assert limiter.in_flight("key:/:alice:parallel") == 0


def test_a_client_that_left_while_its_worker_waited_has_its_ticket_given_back():
    limiter = Limiter(Clock())
    pair = Pair(QuotaServer(limiter))
    route = route_with(max_parallel=1)
    plan = plan_for(route, "alice", route.forward_keys[0].limits)
    waiting = pair.quota.admit(plan, Reservation(1, 1))
    waiting.cancel()
    waiting.addErrback(lambda reason: reason.trap(defer.CancelledError))
    pair.pump()
    assert limiter.in_flight("key:/:alice:parallel") == 0
    again = pair.quota.admit(plan, Reservation(1, 1))
    pair.pump()
    assert isinstance(outcome(again), LineTicket), "the one slot is free for the next request"


def test_a_worker_whose_supervisor_is_gone_answers_503_and_forwards_nothing():
    pair = Pair(QuotaServer(Limiter(Clock())))
    route = route_with(rpm=Rate(10, 1.0))
    plan = plan_for(route, "alice", route.forward_keys[0].limits)
    waiting = pair.quota.admit(plan, Reservation(1, 1))
    pair.worker.connectionLost()
    for answer in (outcome(waiting), outcome(pair.quota.admit(plan, Reservation(1, 1)))):
        assert answer.status == 503 and answer.code == "limits_unavailable"


def test_the_supervisor_ignores_lines_that_are_not_limits_messages():
    limiter = Limiter(Clock())
    pair = Pair(QuotaServer(limiter))
    pair.supervisor.dataReceived(b'not json\n{"admit": 1}\n{"settle": "x"}\n')
    assert pair.supervisor.transport.value() == b""
    assert limiter.size() == 0

"""Sharing state through Redis, in memory on a Clock: deadlines, falling back and coming back, key states,
limits through the gateway.  (The scripts themselves run against a real redis-server in test_redis_scripts.)"""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from fwd import config
from fwd.keys import KeyPool
from fwd.limits import Limiter, Rate, Ticket
from fwd.quota import LocalQuota, Reservation, plan_for
from fwd.redis_quota import RedisQuota
from fwd.redis_scripts import RedisTicket
from fwd.settings import RedisTarget
from fwd.shared import RedisUnavailable, SharedState, key_name, key_secret
from fwd.shared_keys import SharedKeys

TARGET = RedisTarget("127.0.0.1", 6390, password="redis-password-1")
POOL = ("sk-shared-pool-key-000000000001", "sk-shared-pool-key-000000000002")


class FakeRedis:
    """A Redis connection whose answers the test chooses: "answer", "hang" (never) or "fail"."""

    def __init__(self):
        self.mode = "answer"
        self.calls = []
        self.hashes: dict[str, dict] = {}
        self.published = []
        self.scripts_lost = False
        self.evalsha_reply = [b"ok", 1]
        self.hanging: list[defer.Deferred] = []

    def _reply(self, value):
        if self.mode == "hang":
            self.hanging.append(defer.Deferred())
            return self.hanging[-1]
        if self.mode == "fail":
            return defer.fail(ConnectionError("connection refused"))
        return defer.succeed(value)

    def ping(self):
        self.calls.append(("ping",))
        return self._reply("PONG")

    def script_load(self, script):
        self.calls.append(("script_load",))
        self.scripts_lost = False
        return self._reply("sha-" + str(len(script)))

    def evalsha(self, sha, keys, args):
        self.calls.append(("evalsha", sha, tuple(keys), tuple(args)))
        if self.scripts_lost and self.mode == "answer":
            return defer.fail(Exception("NOSCRIPT No matching script. Please use EVAL."))
        return self._reply(self.evalsha_reply)

    def hset(self, name, field, value):
        self.calls.append(("hset", name, field, value))
        self.hashes.setdefault(name, {})[field] = value
        return self._reply(1)

    def expire(self, name, seconds):
        self.calls.append(("expire", name, seconds))
        return self._reply(1)

    def publish(self, channel, message):
        self.calls.append(("publish", channel, message))
        self.published.append((channel, message))
        return self._reply(1)

    def hgetall(self, name):
        self.calls.append(("hgetall", name))
        return self._reply(dict(self.hashes.get(name, {})))

    def disconnect(self):
        return defer.succeed(None)


class Logged:
    def __enter__(self):
        self.lines = []
        globalLogPublisher.addObserver(self.observe)
        return self

    def observe(self, event):
        if event.get("log_namespace") == "fwd.shared":
            from twisted.logger import formatEvent

            self.lines.append(formatEvent(event))

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.observe)


def shared_on(clock, fake, failure="open", channels=False) -> SharedState:
    shared = SharedState(TARGET, clock, 0.1, failure, connection_factory=lambda target, deadline: fake,
                         subscriber_factory=lambda *args: None)
    return shared


def outcome(result):
    """What a QuotaStore or SharedState call gave, now; None while it has not."""
    if not isinstance(result, defer.Deferred):
        return result
    seen = watch(result)
    return seen[0] if seen else None


def watch(result: defer.Deferred) -> list:
    """The result of a Deferred, in a list that stays empty until it fires (the failure is consumed)."""
    seen = []
    result.addBoth(seen.append)
    return seen


def test_it_shares_once_redis_answers_and_says_so_without_the_password():
    clock, fake = Clock(), FakeRedis()
    with Logged() as logged:
        shared = shared_on(clock, fake)
        shared.startService()
    assert shared.up and shared.status()["state"] == "shared"
    assert set(shared.shas) == {"admit", "settle", "usage"}
    assert logged.lines == ["sharing state with the other instances through Redis redis://:***@127.0.0.1:6390/0"]
    assert "redis-password-1" not in json.dumps(shared.status())


def test_a_call_past_the_deadline_fails_at_100ms_and_later_calls_fail_at_once_until_redis_answers():
    clock, fake = Clock(), FakeRedis()
    shared = shared_on(clock, fake)
    shared.startService()
    fake.mode = "hang"
    with Logged() as logged:
        waiting = watch(shared.run("admit", ["k"], ["1"]))
        clock.advance(0.099)
        assert waiting == [], "still within its deadline"
        clock.advance(0.002)
        assert waiting[0].check(RedisUnavailable)
        assert shared.up, "one late reply is that call's, not Redis's"
        for _ in range(2):
            late = watch(shared.run("admit", ["k"], ["1"]))
            clock.advance(0.1)
            assert late[0].check(RedisUnavailable)
        assert not shared.up and shared.failures == 1, "three in a row: Redis is down"
        calls = len(fake.calls)
        for _ in range(20):
            assert outcome(shared.run("admit", ["k"], ["1"])).check(RedisUnavailable)
        assert len(fake.calls) == calls, "no call is sent while Redis is down"
        assert len(logged.lines) == 1 and "timed out" in logged.lines[0], "logged once"
        clock.advance(0.5)  # the first probe: still hanging
        clock.advance(0.1)
        assert not shared.up
        fake.mode = "answer"
        clock.advance(1.0)  # the second probe, a second later
        assert shared.up and shared.failures == 1
        assert "answers again" in logged.lines[-1]


def test_probes_back_off_to_ten_seconds():
    clock, fake = Clock(), FakeRedis()
    fake.mode = "fail"
    shared = shared_on(clock, fake)
    shared.startService()
    assert not shared.up
    pings = []
    for _ in range(60):
        clock.advance(1.0)
        pings.append(sum(1 for call in fake.calls if call == ("ping",)))
    # at the start, then after 0.5, 1, 2, 4, 8 s and every 10 s: at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 25.5 ... 55.5 s
    assert pings[:8] == [2, 3, 3, 4, 4, 4, 4, 5] and pings[-1] == 10


def test_scripts_redis_lost_are_loaded_again_and_the_call_goes_through():
    clock, fake = Clock(), FakeRedis()
    shared = shared_on(clock, fake)
    shared.startService()
    fake.scripts_lost = True
    assert outcome(shared.run("settle", ["k"], ["1"])) == [b"ok", 1]
    assert shared.up



def test_scripts_lost_are_loaded_again_whichever_way_txredisapi_reports_it():
    import txredisapi

    clock, fake = Clock(), FakeRedis()
    shared = shared_on(clock, fake)
    shared.startService()
    fake.scripts_lost = True

    def evalsha(sha, keys, args):
        if fake.scripts_lost:  # as txredisapi's handler reports Redis's NOSCRIPT
            return defer.fail(txredisapi.ScriptDoesNotExist("No script matching hash: sha-1 found"))
        return defer.succeed("ok 1")

    fake.evalsha = evalsha
    assert outcome(shared.run("settle", ["k"], ["1"])) == "ok 1"
    assert shared.up, "not counted down: the scripts were loaded again"


def test_the_txredisapi_names_the_pool_writes_its_scripts_with_are_there():
    """fwd.shared.RedisPool writes EVALSHA straight on a connection of txredisapi's pool: a txredisapi without one of
    these names must fail here, not fall back silently."""
    import txredisapi

    factory = txredisapi.RedisFactory("127.0.0.1:1", 0, 2, isLazy=True, convertNumbers=False)
    assert factory.pool == [] and callable(factory.startConnecting) and callable(factory.disconnect)
    assert isinstance(factory.handler, txredisapi.ConnectionHandler)
    assert callable(txredisapi.RedisProtocol.execute_command)


def limited_plan():
    key = config.ForwardKey("fk-shared-alice-0000000001", "alice", limits=config.Limits(rpm=Rate(2, 60.0)))
    route = config.Route(prefix="", base_url="http://u.test", forward_keys=(key,))
    return plan_for(route, "alice", key.limits)


def test_open_decides_on_the_local_limiter_while_redis_is_down_and_closed_refuses_with_503():
    plan = limited_plan()
    for failure in ("open", "closed"):
        clock, fake = Clock(), FakeRedis()
        shared = shared_on(clock, fake, failure)
        shared.startService()
        quota = RedisQuota(shared, LocalQuota(Limiter(clock)), clock)
        fake.mode = "fail"
        deciding = watch(quota.admit(plan, Reservation(1, 0)))
        decided = deciding[0]
        if failure == "open":
            assert isinstance(decided, Ticket), "the local limiter decided: nobody noticed Redis"
            assert isinstance(quota.admit(plan, Reservation(1, 0)), Ticket)
            assert quota.admit(plan, Reservation(1, 0)).reason == "rate", "and its limit holds, locally"
        else:
            assert decided.status == 503 and decided.code == "limits_unavailable"
            assert quota.admit(plan, Reservation(1, 0)).status == 503, "at once, without waiting again"


def test_a_shared_ticket_is_settled_in_redis_and_a_local_one_locally():
    clock, fake = Clock(), FakeRedis()
    shared = shared_on(clock, fake)
    shared.startService()
    limiter = Limiter(clock)
    quota = RedisQuota(shared, LocalQuota(limiter), clock)
    plan = limited_plan()
    fake.evalsha_reply = [b"ok", 7, 1, 30_000_000_000]  # ticket 7; the rpm: 1 remaining, full again in 30 s
    ticket = outcome(quota.admit(plan, Reservation(1, 0)))
    assert isinstance(ticket, RedisTicket) and ticket.number == 7
    assert dict(ticket.headers())[b"x-ratelimit-remaining-requests"] == b"1"
    quota.settle(ticket, 10, None)
    clock.advance(0)  # the settlements of a reactor turn go together
    assert fake.calls[-1][0] == "evalsha" and json.loads(fake.calls[-1][3][0])[4] == 7
    fake.mode = "hang"
    deciding = watch(quota.admit(plan, Reservation(1, 0)))
    clock.advance(0.1)
    local = deciding[0]
    assert isinstance(local, Ticket), "decided locally while Redis hangs"
    calls = len(fake.calls)
    quota.settle(local, 10, None)
    assert len(fake.calls) == calls and limiter.in_flight("key:/:alice:parallel") == 0
    assert limiter.tat("key:/:alice:rpm") is not None, "the local limiter holds what it admitted"


def test_key_states_go_out_under_a_keyed_hash_and_come_back_from_other_instances():
    clock, fake = Clock(), FakeRedis()
    clock.advance(1_796_000_000)
    shared = shared_on(clock, fake)

    class Active:
        def __init__(self, pool):
            self.pool = pool

        def pools(self):
            return [self.pool]

    pool = KeyPool(POOL, clock)
    routes = {"/": Active(pool)}
    secret = key_secret("", POOL)
    keys = SharedKeys(shared, lambda: routes, secret)
    keys.attach()
    shared.startService()
    pool.rate_limited(POOL[0], 30)
    written = json.dumps(fake.calls)
    assert all(key not in written for key in POOL), "no pool key in clear in Redis"
    assert fake.published and json.loads(fake.published[-1][1])["k"] == key_name(secret, POOL[0])

    # Another instance, same configuration: it hears the rest and skips the key.
    other_pool = KeyPool(POOL, clock)
    other_routes = {"/": Active(other_pool)}
    other = SharedKeys(shared_on(clock, FakeRedis()), lambda: other_routes, key_secret("", POOL))
    other.heard(fake.published[-1][1].encode())
    assert [other_pool.pick() for _ in range(3)] == [POOL[1]] * 3
    clock.advance(31)
    assert other_pool.pick() == POOL[0], "the rest is over for everybody at the same time"

    # A third instance that was not listening reads the states when it (re)connects.
    pool.rejected(POOL[1], 401)
    late_pool = KeyPool(POOL, clock)
    late_routes = {"/": Active(late_pool)}
    late_shared = shared_on(clock, fake)
    SharedKeys(late_shared, lambda: late_routes, key_secret("", POOL))
    late_shared.startService()
    assert late_pool.health() == {"available": 1, "cooling": 0, "disabled": 1}


def test_a_message_that_is_not_a_key_state_is_ignored():
    clock, fake = Clock(), FakeRedis()
    pool = KeyPool(POOL, clock)

    class Active:
        def pools(self):
            return [pool]

    active = Active()
    keys = SharedKeys(shared_on(clock, fake), lambda: {"/": active}, b"secret")
    for message in (b"", b"not json", b"[]", b'{"r": "/"}', b'{"r": "/x", "k": "1", "a": 1, "d": true, "f": 1}'):
        keys.heard(message)
    assert pool.health()["available"] == 2


@pytest.mark.parametrize("configured", ["", "a shared secret"])
def test_the_keyed_hash_needs_the_secret(configured):
    secret = key_secret(configured, POOL)
    assert key_name(secret, POOL[0]) != key_name(key_secret("other", POOL), POOL[0])
    assert len(key_name(secret, POOL[0])) == 32 and POOL[0] not in key_name(secret, POOL[0])


def test_a_lost_subscriber_connection_is_redis_going_away():
    clock, fake = Clock(), FakeRedis()
    subscribers = []
    shared = SharedState(TARGET, clock, 0.1, "open", connection_factory=lambda target, deadline: fake,
                         subscriber_factory=lambda *args: subscribers.append(args) or object())
    shared.listen("fwd:keys", lambda message: None)
    shared.startService()
    assert shared.up and subscribers
    on_lost = subscribers[0][5]
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    fake.mode = "hang"
    on_lost(Failure(ConnectionLost()))
    assert not shared.up and shared.status()["state"] == "local", "at once, before any call is late"


def test_the_settlements_of_one_reactor_turn_go_in_one_call():
    clock, fake = Clock(), FakeRedis()
    shared = shared_on(clock, fake)
    shared.startService()
    quota = RedisQuota(shared, LocalQuota(Limiter(clock)), clock)
    plan = limited_plan()
    fake.evalsha_reply = [b"ok", 7, 1, 30_000_000_000]  # ticket 7; the rpm: 1 remaining, full again in 30 s
    first = outcome(quota.admit(plan, Reservation(1, 0)))
    fake.evalsha_reply = [b"ok", 8, 1, 30_000_000_000]
    second = outcome(quota.admit(plan, Reservation(1, 0)))
    calls = len(fake.calls)
    quota.settle(first, 10, None)
    quota.release(second)
    assert len(fake.calls) == calls, "nothing sent before the turn ends"
    clock.advance(0)
    assert len(fake.calls) == calls + 1
    words = json.loads(fake.calls[-1][3][0])
    assert words[4] == 7 and 8 in words[5:]


def test_clients_leaving_while_redis_decides_neither_count_against_redis_nor_keep_what_it_admitted():
    """A request cancelled by its client's going away (fwd.resource) while its admission is in Redis: the call
    goes on, Redis is not counted late however many leave, and the slot Redis gave is given back (before, three
    such clients marked Redis down, and each admission they left held its parallel slot for the 15-minute
    lease)."""
    clock, fake = Clock(), FakeRedis()
    shared = shared_on(clock, fake)
    shared.startService()
    quota = RedisQuota(shared, LocalQuota(Limiter(clock)), clock)
    plan = limited_plan()
    fake.mode = "hang"
    left = []
    for _ in range(5):
        deciding = defer.maybeDeferred(quota.admit, plan, Reservation(1, 0))
        left.append(watch(deciding))
        deciding.cancel()
    assert all(seen[0].check(defer.CancelledError) for seen in left)
    for number, call in enumerate(fake.hanging, start=1):
        call.callback([b"ok", number, 1, 30_000_000_000])
    clock.advance(0.05)
    assert shared.up, "clients leaving are not Redis being late"
    settled = [json.loads(call[3][0]) for call in fake.calls if call[0] == "evalsha" and call[1] == shared.shas["settle"]]
    assert settled and sorted(w for w in settled[0][1:] if w in range(1, 6)) == [1, 2, 3, 4, 5], \
        "every ticket Redis gave the clients that left is ended"


def test_commands_are_written_byte_for_byte_as_txredisapi_writes_them_and_through_the_one_pass_encoder(monkeypatch):
    """fwd.redis_wire writes commands in one pass by overriding txredisapi's `_build_command`: the bytes must be
    txredisapi's own, and a txredisapi that stops building its commands there must fail here (the override would
    be silently skipped)."""
    import txredisapi
    from twisted.internet.testing import StringTransport

    from fwd import redis_wire

    plain, ours = txredisapi.RedisProtocol(), redis_wire.ScriptProtocol()
    for args in [("EVALSHA", "c0ffee", 2, "fwd:rate:key:/:a:rpm", "fwd:ticket", '[1.5,2,"4114:0.0"]'),
                 ("HSET", b"fwd:keys:/", "naïve", 0, -7), ("PING",), ("SET", "k", 1.5, True)]:
        assert ours._build_command(*args) == plain._build_command(*args)
    used = []
    monkeypatch.setattr(redis_wire, "encode_command", lambda args: used.append(args) or b"*1\r\n$4\r\nPING\r\n")
    ours.transport = StringTransport()
    ours.connected = 1
    ours.execute_command("PING")
    assert used == [("PING",)] and ours.transport.value() == b"*1\r\n$4\r\nPING\r\n"

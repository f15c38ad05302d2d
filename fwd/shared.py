"""The connection to the Redis that several instances share (REDIS_URL), and what happens when it fails.
Tests: tests/test_shared.py (in memory, on a Clock), tests/test_redis_e2e.py (a real redis-server)

Every call has a deadline (REDIS_TIMEOUT, 100 ms by default): no request ever waits longer on Redis.  A call
that runs out of time goes on without Redis; a call that fails, or LATE_IN_A_ROW late ones, mark Redis down: the
change is logged once and counted, calls fail at once from then on (the callers fall back to their local state, or answer 503 with REDIS_FAILURE=closed), and a probe
asks Redis again, after 0.5 s, then twice as long each time up to 10 s.  When it answers, the scripts are loaded
again and sharing resumes, without a restart.  txredisapi reconnects the connections underneath by itself, and
parses replies with hiredis (a dependency).  Scripts are written straight on a connected connection (RedisPool).

Names in Redis never hold a key: pool keys are named by `key_name`, a keyed hash (HMAC-SHA256, REDIS_SECRET).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from fwd.redis_scripts import ADMIT, SETTLE, USAGE
from fwd.settings import RedisTarget

log = Logger(namespace="fwd.shared")

SCRIPTS = {"admit": ADMIT, "settle": SETTLE, "usage": USAGE}
FIRST_PROBE = 0.5
MAX_PROBE = 10.0
# Calls in a row past their deadline that make Redis count as down (a connection that fails does at once).
LATE_IN_A_ROW = 3


class RedisUnavailable(Exception):
    """Redis cannot be asked now; the caller uses its local state (or refuses, when failure is closed)."""


def key_secret(configured: str, pool_keys) -> bytes:
    """The key of the hash that names pool keys in Redis: REDIS_SECRET, else one derived from every pool key of
    the configuration (instances with the same configuration derive the same one; nobody without it can)."""
    if configured:
        return configured.encode()
    return hashlib.sha256(b"fwd-key-names\0" + b"\0".join(sorted(k.encode() for k in pool_keys))).digest()


def key_name(secret: bytes, key: str) -> str:
    """How a pool key is named in Redis: a keyed hash, 128 bits."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:32]


def connect(target: RedisTarget, timeout: float) -> RedisPool:
    """A pool of two txredisapi connections to the target (lazy: they connect, and reconnect, in the
    background), built as txredisapi's lazyConnectionPool builds it."""
    import txredisapi
    from twisted.internet import endpoints, reactor, ssl

    from fwd.redis_wire import ScriptProtocol

    factory = txredisapi.RedisFactory(
        f"{target.host}:{target.port}", target.db, 2, isLazy=True, password=target.password,
        replyTimeout=max(2.0, timeout * 20), convertNumbers=False, username=target.username,
    )
    factory.reconnect = True
    factory.protocol = ScriptProtocol
    endpoint = endpoints.HostnameEndpoint(reactor, target.host, target.port, timeout=max(1.0, timeout * 10))
    if target.tls:
        endpoint = endpoints.wrapClientTLS(ssl.optionsForClientTLS(target.host), endpoint)
    factory.startConnecting(endpoint)
    return RedisPool(factory)


class RedisPool:
    """txredisapi's pool of connections, whose scripts are written straight on a connected connection.

    Its own handler finds a connection for every call through a generator and a queue (`getConnection`, an
    inlineCallbacks, a Deferred to peek and another around the call).  Here an EVALSHA goes to the next
    connection of the pool (`RedisFactory.pool`, the connections up and ready) with `execute_command`, the one
    call every command of txredisapi ends in; while none is up, the handler's own path waits for one.  Everything
    else goes to the handler.  Measured alone, 6,400 EVALSHA 32 at a time to a redis-server on loopback: 51-57 µs
    of the client's CPU each through the handler, 29-40 µs this way.  tests/test_shared.py fails if txredisapi
    loses one of these names.
    """

    def __init__(self, factory):
        self.factory = factory
        self.handler = factory.handler
        self.turn = 0

    def evalsha(self, sha: str, keys: list, args: list) -> defer.Deferred:
        pool = self.factory.pool
        if pool:
            self.turn += 1
            connection = pool[self.turn % len(pool)]
            if connection.connected:
                return connection.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        return self.handler.evalsha(sha, keys, args)

    def __getattr__(self, name: str):
        return getattr(self.handler, name)


class SharedState(service.Service):
    """One Redis for every instance: the scripts, plain commands, publish/subscribe, each with a deadline."""

    def __init__(self, target: RedisTarget, reactor, deadline: float = 0.1, failure: str = "open",
                 connection_factory: Callable | None = None, subscriber_factory: Callable | None = None):
        """`connection_factory(target, deadline)` and `subscriber_factory(target, deadline, on_message,
        on_subscribed)` make the connections (txredisapi's by default; a test passes fakes)."""
        self.target = target
        self.clock = reactor
        self.deadline = deadline
        self.failure = failure
        self.connection_factory = connection_factory or connect
        self.subscriber_factory = subscriber_factory or subscribe
        self.connection = None
        self.subscriber = None
        self.up = False
        self.failures = 0
        self.since = 0.0
        self.shas: dict[str, str] = {}
        self.channels: dict[str, Callable[[bytes], None]] = {}
        self.on_up: list[Callable[[], None]] = []
        # Called as the service stops, before the connection closes: what they return (Deferreds) is waited for.
        self.before_stop: list[Callable[[], object]] = []
        self._probe = None
        self._probe_delay = FIRST_PROBE
        self._warned = False
        self._late = 0

    # -- life --------------------------------------------------------------------------------------------------

    def startService(self):
        super().startService()
        self.connection = self.connection_factory(self.target, self.deadline)
        if self.channels:
            self.subscriber = self.subscriber_factory(self.target, self.deadline, self._message, self._subscribed,
                                                      tuple(self.channels), self._subscriber_lost)
        self.since = self.clock.seconds()
        self.probe()

    def stopService(self):
        super().stopService()
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None
        last = [called() for called in self.before_stop]
        last = defer.DeferredList([d for d in last if isinstance(d, defer.Deferred)], consumeErrors=True)
        return last.addBoth(lambda _: self._disconnect())

    def _disconnect(self) -> defer.Deferred:
        closing = [c.disconnect() for c in (self.connection, self.subscriber) if c is not None]
        self.connection = self.subscriber = None
        self.up = False
        return defer.DeferredList([d for d in closing if isinstance(d, defer.Deferred)], consumeErrors=True)

    def listen(self, channel: str, receive: Callable[[bytes], None]) -> None:
        """Hand every message published on `channel` to `receive` (set up before the service starts)."""
        self.channels[channel] = receive

    # -- calls -------------------------------------------------------------------------------------------------

    def run(self, script: str, keys: list, args: list) -> defer.Deferred:
        """Run one of SCRIPTS atomically: its reply, or RedisUnavailable."""
        if not self.up or self.connection is None:
            return defer.fail(RedisUnavailable())
        called = self._timed(self.connection.evalsha(self.shas[script], keys, args))
        called.addErrback(self._script_failed, script, keys, args)
        return called

    def command(self, name: str, *args) -> defer.Deferred:
        """One plain Redis command (publish, hset, hgetall, …): its reply, or RedisUnavailable."""
        if not self.up or self.connection is None:
            return defer.fail(RedisUnavailable())
        return self._timed(getattr(self.connection, name)(*args)).addErrback(self._failed)

    def _timed(self, called: defer.Deferred) -> defer.Deferred:
        return called.addTimeout(self.deadline, self.clock).addCallback(self._in_time)

    def _in_time(self, reply):
        self._late = 0
        return reply

    def _script_failed(self, reason, script, keys, args):
        # Redis's NOSCRIPT error, as a connection reports it; txredisapi's handler turns it into its own error.
        if ("NOSCRIPT" in str(reason.value) or type(reason.value).__name__ == "ScriptDoesNotExist") and self.up:
            # Redis lost its scripts (a restart, SCRIPT FLUSH): load them again and ask once more.
            loading = self._timed(self.connection.script_load(SCRIPTS[script]))

            def again(sha):
                self.shas[script] = sha
                return self._timed(self.connection.evalsha(sha, keys, args))

            return loading.addCallback(again).addErrback(self._failed)
        return self._failed(reason)

    def _failed(self, reason):
        if reason.check(RedisUnavailable):
            return reason
        if reason.check(defer.TimeoutError, defer.CancelledError):
            # One late reply is this call's problem (it goes on without Redis); LATE_IN_A_ROW of them, Redis's.
            self._late += 1
            if self._late < LATE_IN_A_ROW:
                raise RedisUnavailable("timed out")
        self.down(reason)
        raise RedisUnavailable(type(reason.value).__name__)

    # -- up and down -------------------------------------------------------------------------------------------

    def down(self, reason=None) -> None:
        """Redis did not answer in time: stop asking it until the probe finds it again."""
        if not self.up:
            return
        self.up = False
        self.failures += 1
        self.since = self.clock.seconds()
        why = _why(reason) if reason is not None else "unreachable"
        log.warn(
            "Redis {target} {why}: {mode} until it answers again",
            target=str(self.target), why=why,
            mode="each instance holds the limits alone" if self.failure == "open" else "limited requests get 503",
        )
        self._probe_delay = FIRST_PROBE
        self._schedule_probe()

    def probe(self) -> None:
        """Ask Redis whether it answers (PING), load the scripts, and share again."""
        self._probe = None
        if not self.running:
            return
        asking = self._timed(self.connection.ping())
        asking.addCallback(lambda _: self._load_scripts())
        asking.addCallbacks(self._answered, self._unanswered)

    def _load_scripts(self) -> defer.Deferred:
        names = list(SCRIPTS)
        loading = [self._timed(self.connection.script_load(SCRIPTS[name])) for name in names]

        def loaded(shas):
            for name, sha in zip(names, shas):
                self.shas[name] = sha.decode() if isinstance(sha, bytes) else sha

        return defer.gatherResults(loading, consumeErrors=True).addCallback(loaded)

    def _answered(self, _) -> None:
        if not self.running:
            return
        self.up = True
        self.since = self.clock.seconds()
        self._probe_delay = FIRST_PROBE
        if self.failures or self._warned:
            log.info("Redis {target} answers again: sharing state with the other instances", target=str(self.target))
        else:
            log.info("sharing state with the other instances through Redis {target}", target=str(self.target))
        for callback in list(self.on_up):
            callback()

    def _unanswered(self, reason) -> None:
        if not self.running:
            return
        if not self._warned and not self.failures:
            self._warned = True
            log.warn("Redis {target} does not answer ({why}); each instance holds the limits alone until it does"
                     if self.failure == "open" else
                     "Redis {target} does not answer ({why}); limited requests get 503 until it does",
                     target=str(self.target), why=_why(reason))
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        if self._probe is None and self.running:
            self._probe = self.clock.callLater(self._probe_delay, self.probe)
            self._probe_delay = min(MAX_PROBE, self._probe_delay * 2)

    # -- publish/subscribe -------------------------------------------------------------------------------------

    def _message(self, channel, message) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        receive = self.channels.get(name)
        if receive is not None:
            receive(message.encode() if isinstance(message, str) else message)

    def _subscriber_lost(self, reason) -> None:
        """The subscriber's connection closed: Redis is gone (or restarting), whatever the other calls say yet."""
        if self.running:
            self.down(reason)

    def _subscribed(self) -> None:
        """The subscriber is (again) listening: what it missed meanwhile is read by the on_up callbacks."""
        if self.up:
            for callback in list(self.on_up):
                callback()

    def status(self) -> dict:
        """For /healthz and /metrics: whether state is shared now, since when, and how often Redis failed."""
        if self.up:
            state = "shared"
        else:
            state = "local" if self.failure == "open" else "refusing limited requests"
        return {"url": str(self.target), "state": state, "up": self.up, "since": self.since, "failures": self.failures}


def _why(reason) -> str:
    """A short, secret-free reason a Redis call failed."""
    if isinstance(reason.value, defer.FirstError):
        reason = reason.value.subFailure
    if reason.check(defer.TimeoutError, defer.CancelledError):
        return "timed out"
    return type(reason.value).__name__


def subscribe(target: RedisTarget, deadline: float, on_message, on_subscribed, channels: tuple[str, ...],
              on_lost=lambda reason: None):
    """A txredisapi subscriber connection listening on `channels`, subscribing again after each reconnection;
    `on_lost` hears of each lost connection."""
    import txredisapi
    from twisted.internet import endpoints, reactor, ssl


    class Subscriber(txredisapi.SubscriberProtocol):
        def connectionMade(self):
            made = super().connectionMade()
            self.whenConnected().addCallback(lambda _: self.subscribe(list(channels))).addCallback(
                lambda _: on_subscribed()).addErrback(lambda reason: log.warn(
                    "cannot subscribe to Redis {target}: {why}", target=str(target), why=reason.getErrorMessage()))
            return made

        def messageReceived(self, pattern, channel, message):
            on_message(channel, message)

        def connectionLost(self, reason):
            super().connectionLost(reason)
            if self._ready_once:
                on_lost(reason)

        def replyReceived(self, reply):
            self._ready_once = True
            return super().replyReceived(reply)

        _ready_once = False

    factory = txredisapi.SubscriberFactory()
    factory.protocol = Subscriber
    factory.password = target.password
    factory.username = target.username
    endpoint = endpoints.HostnameEndpoint(reactor, target.host, target.port, timeout=max(1.0, deadline * 10))
    if target.tls:
        endpoint = endpoints.wrapClientTLS(ssl.optionsForClientTLS(target.host), endpoint)
    factory.startConnecting(endpoint)
    return factory

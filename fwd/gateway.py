"""What every request shares: the configuration, the routes with their key pools, the upstream agent, and the
counts a graceful shutdown waits on.  Tests: tests/test_forward.py, tests/test_operations.py"""

from __future__ import annotations

import hashlib
import os
import random
import time
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer

from fwd import access, errors
from fwd.answers import AccessLog
from fwd.balance import SERVING, UpstreamHealth
from fwd.cache import route_identity
from fwd.caching import ResponseCache
from fwd.config import NO_LIMITS, Config, Route, Upstream
from fwd.intake import cooperator_for
from fwd.keys import KeyPool
from fwd.limits import Limiter
from fwd.metering import kind_of
from fwd.quota import (
    LocalQuota,
    Plan,
    QuotaStore,
    Terms,
    plan_for,
    reservation,
)


def host_header(base_url: str) -> bytes:
    """The Host an upstream expects: its host name, and its port unless that is the scheme's default."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    name = host.encode() if host.isascii() else host.encode("idna")
    if b":" in name:
        name = b"[" + name + b"]"
    port = parts.port
    if port is None or (parts.scheme, port) in (("http", 80), ("https", 443)):
        return name
    return b"%s:%d" % (name, port)


@attrs.define
class ActiveUpstream:
    """One upstream of a route at run time: its key pool, its health (fwd.balance) and its request target."""

    upstream: Upstream
    pool: KeyPool
    base: bytes
    host: bytes
    health: UpstreamHealth = attrs.field(factory=UpstreamHealth)

    @classmethod
    def build(cls, upstream: Upstream, clock) -> ActiveUpstream:
        return cls(upstream, KeyPool(upstream.api_keys, clock), upstream.base_url.encode(), host_header(upstream.base_url))

    @property
    def name(self) -> str:
        return self.upstream.base_url

    def url(self, rest: bytes, query: bytes | None) -> bytes:
        """The upstream URL of a request whose path below the route's mount point is `rest`."""
        url = self.base + b"/" + rest
        return url if query is None else url + b"?" + query


@attrs.define
class ActiveRoute:
    """A configured route with what it needs at run time: its upstreams (each with its key pool and health), its
    forward-key table, and the random draws of its upstream choice."""

    route: Route
    upstreams: list[ActiveUpstream]
    table: access.ForwardKeyTable
    reads_model: bool = False  # the model a request names decides where it goes (Route.reads_model)
    cache_identity: str = ""  # the route as cache keys name it (fwd.cache.route_identity)
    rng: random.Random = attrs.field(factory=random.Random, repr=False)

    @classmethod
    def build(cls, route: Route, clock) -> ActiveRoute:
        upstreams = route.upstreams
        return cls(route, [ActiveUpstream.build(u, clock) for u in upstreams],
                   access.ForwardKeyTable(route.forward_keys), route.reads_model,
                   route_identity(route.name, upstreams))

    @property
    def pool(self) -> KeyPool:
        """The key pool of a route with one upstream."""
        return self.upstreams[0].pool

    @property
    def host(self) -> bytes:
        return self.upstreams[0].host

    def pools(self):
        return [u.pool for u in self.upstreams]

    def upstream_url(self, rest: bytes, query: bytes | None) -> bytes:
        """The URL of a request on a route with one upstream."""
        return self.upstreams[0].url(rest, query)


def route_health(active: ActiveRoute, now: float) -> dict:
    """A route in /healthz: its upstream (or upstreams, each with its state) and key counts; never a key."""
    if len(active.upstreams) == 1:
        return {"prefix": active.route.name, "base_url": active.route.base_url, "kind": active.route.kind,
                "keys": active.pool.health()}
    return {"prefix": active.route.name, "kind": active.route.kind, "upstreams": [upstream_health(u, now)
                                                                                  for u in active.upstreams]}


def upstream_health(active: ActiveUpstream, now: float) -> dict:
    health = active.health
    state = health.state(now)
    found = {"base_url": active.name, "kind": active.upstream.kind, "weight": active.upstream.weight,
             "state": state, "in_flight": health.in_flight, "served": health.served, "errors": health.errors,
             "latency_ms": None if health.latency is None else round(health.latency * 1000, 1),
             "keys": active.pool.health()}
    if state != SERVING:
        found["resting_until"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(health.resting_until))
        found["why"] = health.why
    return found


def scope_secret(config: Config) -> bytes:
    """The key of the hash that scopes a client's own upstream key in the cache: from REDIS_SECRET or the pool keys
    (instances with the same configuration share entries), else this process's own."""
    keys = sorted(key.encode() for route in config.routes for key in route.api_keys)
    if not config.redis_secret and not keys:
        return os.urandom(32)
    return hashlib.sha256(b"fwd-cache-scope\0" + config.redis_secret.encode() + b"\0" + b"\0".join(keys)).digest()


class Gateway:
    """The daemon's shared state; each request reaches it through the Resource tree (see fwd.resource)."""

    @classmethod
    def connected(cls, config: Config, reactor) -> Gateway:
        """A gateway with its own upstream connections, for a twisted.web Site of your own (README,
        "Embedding"); `close()` closes them."""
        from fwd.upstream import UpstreamConnections, upstream_agent

        connections = UpstreamConnections(reactor)
        gateway = cls(config, upstream_agent(reactor, config.timeout, connections), reactor)
        gateway.connections = connections
        return gateway

    connections = None

    def close(self) -> defer.Deferred:
        """Close the upstream connections a `connected` gateway opened."""
        if self.connections is None:
            return defer.succeed(None)
        return self.connections.pool.closeCachedConnections()

    def __init__(self, config: Config, agent, clock, log_chat: bool | None = None):
        """`agent` sends the upstream requests (see fwd.upstream); `clock` is the reactor, or a Clock in tests;
        `log_chat` overrides the configuration's LOG_CHAT (a worker whose supervisor writes transcripts)."""
        self.agent = agent
        self.clock = clock
        self.log_chat_override = log_chat
        self.in_flight = 0
        self.streams = 0
        self.sessions = 0  # Realtime sessions open (fwd.realtime_session), also counted in in_flight
        self.draining = False
        self._idle_waiters: list[defer.Deferred] = []
        self.routes: dict[str, ActiveRoute] = {}
        self.access = AccessLog(clock, lambda: self.config.trusted_proxies)
        self.cooperator = cooperator_for(clock)
        self.quota: QuotaStore = LocalQuota(Limiter(clock))
        self.shared = None  # the SharedState of REDIS_URL (fwd.shared), when instances share state
        self.plans: dict[tuple[str, str | None], Plan] = {}
        self.cache = ResponseCache(config.cache_max_size, config.cache_ttl, clock, scope_secret(config))
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Serve new requests with this configuration; running exchanges keep theirs, pools keep key states and
        upstreams that stay keep their health."""
        old = {key: state for active in self.routes.values() for pool in active.pools()
               for key, state in pool.states_by_key().items()}
        healths = {(name, u.name): u.health for name, active in self.routes.items() for u in active.upstreams}
        self.config = config
        routes = {route.name: ActiveRoute.build(route, self.clock) for route in config.routes}
        for name, active in routes.items():
            for upstream in active.upstreams:
                upstream.pool.adopt(old)
                upstream.health = healths.get((name, upstream.name), upstream.health)
        self.routes = routes
        self.plans = {}
        self.hop_prefix = config.hop_header_prefix.encode()
        self.log_chat = config.log_chat if self.log_chat_override is None else self.log_chat_override
        self.cache.default_ttl = config.cache_ttl
        self.cache.memory.max_bytes = config.cache_max_size

    def terms(self, active: ActiveRoute, admission: access.Admission, method: bytes, path: bytes) -> Terms:
        """The limits a request meets, and whether (and how) its usage is counted."""
        route = active.route
        forward_key = admission.decision.forward_key
        caller = forward_key.name if forward_key is not None else None
        plan = self.plans.get((route.name, caller))
        if plan is None:
            plan = self.plans[(route.name, caller)] = plan_for(
                route, caller, forward_key.limits if forward_key is not None else NO_LIMITS
            )
        kind = kind_of(method, path)
        # Usage is read from answers when it is counted, or when a token limit or a budget needs the real figure
        # to settle; a request-rate or parallel limit alone needs none of it (USAGE=false then leaves bodies and
        # streams as they are).
        if kind is None or not (self.config.usage or plan.tokens or plan.budget is not None):
            return Terms(plan)
        ask = self.config.stream_usage if route.stream_usage is None else route.stream_usage
        return Terms(plan, kind, ask, route.default_max_tokens)

    def admit(self, terms: Terms, facts):
        """Admit a request on its limits: its Ticket or the Refusal it gets (fwd.quota.refused is its 429), at once
        or in a Deferred, as the quota store answers."""
        values = facts.values
        reserved = reservation(
            terms.kind, facts.json_size, values, terms.default_max, self.config.prices, values.get("model")
        )
        return self.quota.admit(terms.plan, reserved)

    def route(self, name: str) -> ActiveRoute | None:
        """The live route named `name` (its prefix, or "/"), or None when a reload removed it."""
        return self.routes.get(name)

    def judge(self, request, active: ActiveRoute) -> access.Admission | errors.ProxyError:
        """Judge a request's head for a route: path, client address, IP lists and credentials."""
        config = self.config
        peer = getattr(request.getClientAddress(), "host", "unix")
        return access.judge(
            active.route,
            active.table,
            path=request.path,
            peer=peer,
            headers=request.requestHeaders,
            proxy_keys=config.proxy_keys,
            trusted_proxies=config.trusted_proxies,
            ip_whitelist=config.ip_whitelist,
            ip_blacklist=config.ip_blacklist,
        )

    def refuses_client(self, request) -> errors.ProxyError | None:
        """The IP lists' refusal of this client, or None."""
        config = self.config
        if not (config.ip_whitelist or config.ip_blacklist):
            return None
        client = self.access.client(request)
        if access.ip_allowed(client, config.ip_whitelist, config.ip_blacklist):
            return None
        return errors.ip_denied(client)

    def status(self) -> dict:
        """What the daemon is doing now, for /healthz and metrics; never a key."""
        now = self.clock.seconds()
        status = {
            "in_flight": self.in_flight,
            "streams": self.streams,
            "sessions": self.sessions,
            "keys": [(a.route.name, masked, state) for a in self.routes.values() for pool in a.pools()
                     for masked, state in pool.states()],
            "upstreams": [(a.route.name, u.name, u.health.state(now), u.health.in_flight, u.health.errors,
                           u.health.latency) for a in self.routes.values() for u in a.upstreams],
        }
        if self.shared is not None:
            status["redis"] = self.shared.status()
        status["cache"] = self.cache.status()
        return status

    def health(self) -> dict:
        """/healthz: whether the daemon serves, and each route's upstream and key counts (never a key)."""
        health = {
            "status": "draining" if self.draining else "ok",
            "pid": os.getpid(),
            "in_flight": self.in_flight,
            "streams": self.streams,
            "sessions": self.sessions,
            "routes": [route_health(a, self.clock.seconds()) for a in self.routes.values()],
        }
        if self.shared is not None:
            redis = self.shared.status()
            health["redis"] = {"url": redis["url"], "state": redis["state"], "failures": redis["failures"]}
        return health

    def exchange_started(self) -> None:
        self.in_flight += 1

    def exchange_ended(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def drain(self) -> defer.Deferred:
        """Fires once no request is in flight; /healthz says "draining" from now on."""
        self.draining = True
        if not self.in_flight:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

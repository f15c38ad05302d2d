"""The daemon assembled from a Config: the Resource tree behind the daemon's Site on each --port, the upstream
connections, transcripts, the usage ledger, metrics, reload and drain.  Tests: tests/test_daemon.py, tests/test_operations.py"""

from __future__ import annotations

from collections.abc import Callable

from treq.client import HTTPClient
from twisted.application import service

from fwd import config as configuration
from fwd import private
from fwd.cache_store import CacheFile
from fwd.gateway import Gateway
from fwd.keycheck import KeyCheckService
from fwd.ledger import Ledger
from fwd.lifecycle import Drain, Reload, Reloader, StartupReport
from fwd.listeners import AdoptedPort, Listener
from fwd.metrics import MetricsService
from fwd.process import tune_gc
from fwd.quota import budgets_of
from fwd.redis_quota import RedisQuota
from fwd.resource import GatewayRoot
from fwd.shared import SharedState, key_secret
from fwd.shared_keys import SharedKeys
from fwd.site import ForwardSite
from fwd.transcripts.service import transcript_service
from fwd.upstream import UpstreamConnections, upstream_agent


def build_site(gateway: Gateway, root: GatewayRoot) -> ForwardSite:
    config = gateway.config
    return ForwardSite(
        root,
        clock=gateway.clock,
        max_body_size=config.max_body_size,
        body_timeout=config.body_timeout,
        access=gateway.access,
    )


def share_state(gateway: Gateway, config: configuration.Config, reactor) -> tuple[SharedState, SharedKeys]:
    """Make the gateway share its limits and key states with other instances through REDIS_URL."""
    shared = SharedState(config.redis, reactor, config.redis_timeout, config.redis_failure)
    gateway.shared = shared
    gateway.quota = RedisQuota(shared, gateway.quota, reactor)
    pool_keys = [key for route in config.routes for key in route.api_keys]
    keys = SharedKeys(shared, lambda: gateway.routes, key_secret(config.redis_secret, pool_keys))
    keys.attach()
    return shared, keys


def serving_reloader(
    gateway: Gateway, root: GatewayRoot, site: ForwardSite, load, checked=None, ledger: Ledger | None = None,
    shared_keys: SharedKeys | None = None,
) -> Reloader:
    """What a reload changes in a serving process: the gateway's routes, keys and limits, the tree, the site's
    bounds; `checked`, a KeyCheckService, checks the keys again; `ledger` seeds the budgets a reload adds;
    `shared_keys` follows the new pools."""

    def apply(new: configuration.Config) -> None:
        gateway.reconfigure(new)
        if shared_keys is not None:
            shared_keys.attach()
        root.mount()
        site.max_body_size = new.max_body_size
        site.body_timeout = new.body_timeout
        if ledger is not None:
            ledger.reseed()
        if checked is not None:
            checked.recheck()

    return Reloader(load=load, apply=apply, running=lambda: gateway.config)


def build_service(
    config: configuration.Config,
    reactor=None,
    load: Callable[[], configuration.Config] | None = None,
    inherited: list[int] | None = None,
) -> service.MultiService:
    """The whole daemon as a MultiService ready for twistd or a .tac file; `load` re-reads it on SIGHUP.

    A worker of `--workers N` passes `inherited`, the supervisor's listening sockets (one per --port); its
    transcripts and metrics are then the supervisor's business, as its log events go there.
    """
    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    reload_service = Reload(None, reactor) if load is not None and inherited is None else None
    if reload_service is not None:
        reload_service.setServiceParent(top)  # first: its SIGHUP handler is in place before any port listens
    connections = UpstreamConnections(reactor)
    agent = upstream_agent(reactor, config.timeout, connections)
    transcripts = transcript_service(config.log_chat, config.log_dir, reactor) if inherited is None else None
    gateway = Gateway(config, agent, reactor)
    root = GatewayRoot(gateway)
    site = build_site(gateway, root)
    top.gateway = gateway
    drain = Drain(gateway, site, reactor)
    drain.setServiceParent(top)
    connections.setServiceParent(drain)
    if transcripts is not None:
        transcripts.setServiceParent(drain)
    shared = shared_keys = None
    if config.redis is not None:
        shared, shared_keys = share_state(gateway, config, reactor)
        shared.setServiceParent(drain)
        gateway.cache.share(shared)
    elif any(route.cache for route in config.routes):
        # Entries outlive a restart: DATA_DIR/cache.sqlite, loaded at start, written behind.
        cache_file = CacheFile(config.data_dir, gateway.cache.memory, reactor)
        cache_file.check()
        gateway.cache.file = cache_file
        cache_file.setServiceParent(drain)
    ledger = None
    if config.usage and inherited is None:
        ledger = Ledger(config.data_dir, reactor, gateway.quota.limiter, lambda: budgets_of(gateway.config), shared)
        ledger.check()
        ledger.setServiceParent(drain)  # stops after the drain: the last exchanges' usage is written
    for number, description in enumerate(config.ports):
        if inherited is not None:
            AdoptedPort(description, inherited[number], site, reactor, config.tls_ciphers).setServiceParent(top)
        else:
            Listener(description, site, reactor, config.tls_ciphers).setServiceParent(top)
    if config.metrics_port and inherited is None:
        MetricsService(
            config.metrics_port, gateway.status, transcripts, reactor, config.tls_ciphers
        ).setServiceParent(top)

    key_check = KeyCheckService(gateway, HTTPClient(agent), reactor)
    key_check.setServiceParent(top)
    top.reloader = serving_reloader(
        gateway, root, site, load or (lambda: gateway.config), key_check, ledger, shared_keys
    )
    if reload_service is not None:
        reload_service.reloader = top.reloader
    if hasattr(reactor, "callWhenRunning"):
        reactor.callWhenRunning(tune_gc)
    private.lighten_reactor(reactor)
    StartupReport(config, describe=inherited is None).setServiceParent(top)
    return top

"""The daemon's life: what it logs when it starts, SIGHUP's reload, SIGTERM's drain.
Tests: tests/test_operations.py"""

from __future__ import annotations

import signal
from collections.abc import Callable

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from fwd import config as configuration
from fwd.process import connections_for, raise_open_file_limit

log = Logger(namespace="fwd.startup")

# Settings that only a restart can change; a reload keeps the running values and says so.
RESTART_ONLY = (
    "ports", "workers", "metrics_port", "log_chat", "log_dir", "tls_ciphers", "usage", "data_dir", "redis",
    "redis_timeout", "redis_failure", "redis_secret",
)


class StartupReport(service.Service):
    """Logs what the daemon serves once it starts, warnings included, and how many connections it can hold."""

    def __init__(self, config: configuration.Config, describe: bool = True):
        """`describe`: log the configuration (a worker of --workers leaves that to its supervisor)."""
        self.config = config
        self.describe = describe

    def startService(self):
        super().startService()
        if self.describe:
            for line in configuration.describe(self.config):
                if line.startswith("WARNING"):
                    log.warn("{line}", line=line)
                else:
                    log.info("{line}", line=line)
        before, after = raise_open_file_limit()
        log.info(
            "open file limit {after} (was {before}): room for about {connections} forwarded connections",
            before=before,
            after=after,
            connections=connections_for(after),
        )


class Drain(service.MultiService):
    """On shutdown: running requests and streams finish, then client connections close once their last bytes
    are flushed, all within GRACE_PERIOD seconds; only then do its children (the upstream connections, the
    transcript service) stop, so the last exchanges still reach them."""

    POLL = 0.05
    # Connections closed when the grace period is over still get this long to flush and say goodbye (a Realtime
    # session's close handshake).
    CLOSING = 1.0

    def __init__(self, gateway, site, clock):
        super().__init__()
        self.gateway = gateway
        self.site = site
        self.clock = clock

    def stopService(self):
        grace = self.gateway.config.grace_period
        deadline = self.clock.seconds() + grace
        idle = self.gateway.drain()
        if not idle.called:
            log.info("draining {count} running requests, for up to {grace:g} s", count=self.gateway.in_flight, grace=grace)

        def cut(reason):
            reason.trap(defer.TimeoutError)
            log.warn("grace period over: cutting {count} running requests", count=self.gateway.in_flight)

        idle.addTimeout(grace, self.clock).addErrback(cut)
        idle.addCallback(lambda _: self._close_connections(deadline))
        idle.addCallback(lambda _: super(Drain, self).stopService())
        return idle

    def _close_connections(self, deadline: float) -> defer.Deferred:
        deadline = max(deadline, self.clock.seconds() + self.CLOSING)
        for connection in self.site.open_connections():
            connection.close()
        closed = defer.Deferred()

        def check():
            if not self.site.open_connections() or self.clock.seconds() >= deadline:
                closed.callback(None)
            else:
                self.clock.callLater(self.POLL, check)

        check()
        return closed


@attrs.define
class Reloader:
    """Applies a freshly read configuration to what serves requests, or keeps the running one if the new one
    is bad (logged in one line)."""

    load: Callable[[], configuration.Config]
    apply: Callable[[configuration.Config], None]
    running: Callable[[], configuration.Config]

    def reload(self) -> bool:
        """Whether the new configuration now serves (False: refused, the running one stays)."""
        running = self.running()
        try:
            config = self.load()
        except configuration.ConfigError as problem:
            log.error("reload refused, the running configuration stays: {problem}", problem=str(problem))
            return False
        except Exception as e:
            log.error("reload refused, the running configuration stays: {problem}", problem=type(e).__name__)
            return False
        changed = [name for name in RESTART_ONLY if getattr(config, name) != getattr(running, name)]
        if changed:
            log.warn("reload: {names} change only on restart", names=", ".join(changed))
            config = attrs.evolve(config, **{name: getattr(running, name) for name in RESTART_ONLY})
        self.apply(config)
        log.info("reloaded the configuration")
        for line in configuration.describe(config):
            log.info("{line}", line=line)
        return True


class Reload(service.Service):
    """SIGHUP re-reads `.env` and the config file; new requests use the new keys and routes."""

    def __init__(self, reloader: Reloader, reactor):
        self.reloader = reloader
        self.reactor = reactor
        self.previous = None

    def privilegedStartService(self):
        # Before the listeners bind: a SIGHUP sent as soon as the daemon listens is a reload, never a kill.
        super().privilegedStartService()
        self.previous = signal.signal(signal.SIGHUP, self._signalled)

    def stopService(self):
        super().stopService()
        if self.previous is not None:
            signal.signal(signal.SIGHUP, self.previous)

    def _signalled(self, signum, frame):
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        return self.reloader.reload()

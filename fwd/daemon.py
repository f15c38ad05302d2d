"""Assembling the daemon's services from a Config: listeners, upstream pool, transcript log, metrics, reload
and drain.  Tests: tests/test_daemon.py, tests/test_operations.py"""

from __future__ import annotations

import gc
import signal
import sys
from collections.abc import Callable

import attrs
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, serverFromString, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, globalLogPublisher
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _ensureValidURI,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from fwd import config as configuration
from fwd.forward import Forwarder
from fwd.web import ForwardSite

log = Logger(namespace="fwd.startup")

MAX_PERSISTENT_PER_HOST = 256
IDLE_CONNECTION_SECONDS = 60


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """Upstream endpoints built once per scheme, host and port, not once per request (it IDNA-encodes)."""

    def __init__(self, reactor, connect_timeout: float, tls_policy=None):
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        self.endpoints: dict = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self.endpoints.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.connect_timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self.tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
            self.endpoints[key] = endpoint
        return endpoint


class UpstreamAgent(Agent):
    """Agent.request without re-parsing each URL: the scheme, host and port of an upstream are parsed once,
    and only the path and query change per request."""

    def _init(self, reactor, endpointFactory, pool):
        super()._init(reactor, endpointFactory, pool)
        self.origins: dict[tuple[bytes, bytes], URI] = {}

    def request(self, method, uri, headers=None, bodyProducer=None):
        uri = _ensureValidURI(uri.strip())
        scheme, _, rest = uri.partition(b"://")
        netloc, slash, path = rest.partition(b"/")
        if b"#" in path or b"@" in netloc:
            return super().request(method, uri, headers, bodyProducer)
        origin = self.origins.get((scheme, netloc))
        if origin is None:
            origin = self.origins[(scheme, netloc)] = URI.fromBytes(scheme + b"://" + netloc)
        target = slash + path
        parsed = URI(scheme, netloc, origin.host, origin.port, target, b"", b"", b"")
        key = (scheme, origin.host, origin.port)
        return self._requestWithEndpoint(
            key, self._getEndpoint(parsed), method, parsed, headers, bodyProducer, target
        )


class QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory, without a log line per new upstream connection."""

    noisy = False


class UpstreamPool(service.Service):
    """The persistent upstream connections, closed when the daemon stops."""

    def __init__(self, reactor):
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
        self.pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
        self.pool._factory = QuietClientFactory

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()


class StartupReport(service.Service):
    """Logs what the daemon serves once it starts, warnings included."""

    def __init__(self, config: configuration.Config):
        self.config = config

    def startService(self):
        super().startService()
        for line in configuration.describe(self.config):
            if line.startswith("WARNING"):
                log.warn("{line}", line=line)
            else:
                log.info("{line}", line=line)


class StartupError(Exception):
    """A problem found while starting the services (after twistd may have daemonized), said in one line."""


def report_in_one_line(error: StartupError) -> StartupError:
    """Make an uncaught StartupError print its message alone: twistd -n would print a traceback, and a
    daemonizing twistd passes the message to the waiting parent (it only does that for an Exception)."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if value is error:
            sys.stderr.write(f"openai-forward: {value}\n")
        else:
            previous(kind, value, tb)

    sys.excepthook = hook
    return error


LISTEN_BACKLOG = 1024
# Young-generation GC threshold: Python's 700 makes a proxy collect every couple of requests, and its
# full collections walk the ~60,000 objects of Twisted and friends.  Measured on the benchmark: GC time per
# request more than halved, CPU per request down 3-6%.
GC_THRESHOLDS = (10_000, 20, 20)


def tune_gc() -> None:
    """Freeze what startup allocated (it lives as long as the process) and collect the young less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def with_backlog(description: str) -> str:
    """Twisted listens with a backlog of 50, too short for bursts of thousands of streams; ask for more
    unless the endpoint says otherwise (the kernel caps it at net.core.somaxconn)."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl", "ssl6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


class Listener(StreamServerEndpointService):
    """One --port; failing to bind stops startup with one line instead of a traceback."""

    def __init__(self, description: str, factory, reactor, option: str = "--port"):
        try:
            endpoint = serverFromString(reactor, with_backlog(description))
        except Exception as e:
            raise configuration.ConfigError(f"{option} {description}: {describe_exception(e)}") from None
        super().__init__(endpoint, factory)
        self.description = description
        self._raiseSynchronously = True

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            raise report_in_one_line(
                StartupError(f"cannot listen on {self.description}: {reason}")
            ) from None


class Drain(service.MultiService):
    """On shutdown: running requests and streams finish, then client connections close once their last bytes
    are flushed, all within GRACE_PERIOD seconds; only then do its children (the upstream pool, the
    transcript file) stop, so the last exchanges still reach them."""

    POLL = 0.05

    def __init__(self, forwarder: Forwarder, site: ForwardSite, clock):
        super().__init__()
        self.forwarder = forwarder
        self.site = site
        self.clock = clock

    def stopService(self):
        grace = self.forwarder.config.grace_period
        deadline = self.clock.seconds() + grace
        idle = self.forwarder.drain()
        if not idle.called:
            log.info("draining {count} running requests, for up to {grace:g} s", count=self.forwarder.in_flight, grace=grace)

        def cut(reason):
            reason.trap(defer.TimeoutError)
            log.warn("grace period over: cutting {count} running requests", count=self.forwarder.in_flight)

        idle.addTimeout(grace, self.clock).addErrback(cut)
        idle.addCallback(lambda _: self._close_connections(deadline))
        idle.addCallback(lambda _: super(Drain, self).stopService())
        return idle

    def _close_connections(self, deadline: float) -> defer.Deferred:
        for transport in self.site.open_connections():
            transport.loseConnection()
        closed = defer.Deferred()

        def check():
            if not self.site.open_connections() or self.clock.seconds() >= deadline:
                closed.callback(None)
            else:
                self.clock.callLater(self.POLL, check)

        check()
        return closed


# Settings that only a restart can change; a reload keeps the running values and says so.
RESTART_ONLY = ("ports", "workers", "metrics_port", "log_chat", "log_dir")


class Reload(service.Service):
    """SIGHUP re-reads `.env` and the config file; new requests use the new keys and routes."""

    def __init__(self, forwarder: Forwarder, site: ForwardSite, load: Callable[[], configuration.Config], reactor):
        self.forwarder = forwarder
        self.site = site
        self.load = load
        self.reactor = reactor
        self.previous = None

    def startService(self):
        super().startService()
        self.previous = signal.signal(signal.SIGHUP, self._signalled)

    def stopService(self):
        super().stopService()
        if self.previous is not None:
            signal.signal(signal.SIGHUP, self.previous)

    def _signalled(self, signum, frame):
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Apply a freshly read configuration, or keep the running one if the new one is bad."""
        running = self.forwarder.config
        try:
            config = self.load()
        except configuration.ConfigError as problem:
            log.error("reload refused, the running configuration stays: {problem}", problem=str(problem))
            return False
        except Exception:
            log.failure("reload refused, the running configuration stays")
            return False
        changed = [name for name in RESTART_ONLY if getattr(config, name) != getattr(running, name)]
        if changed:
            log.warn("reload: {names} change only on restart", names=", ".join(changed))
            config = attrs.evolve(config, **{name: getattr(running, name) for name in RESTART_ONLY})
        self.forwarder.reconfigure(config)
        self.site.max_body_size = config.max_body_size
        log.info("reloaded the configuration")
        for line in configuration.describe(config):
            log.info("{line}", line=line)
        return True


class MetricsService(service.MultiService):
    """Counts access events into Prometheus metrics and serves /metrics on its own listener."""

    def __init__(self, description: str, status: Callable[[], dict], transcripts, reactor):
        """`status` describes the requests in flight and the keys; `transcripts` is the TranscriptService
        whose write errors are counted, or None."""
        from twisted.web.server import Site

        from fwd.metrics import Metrics, MetricsResource

        super().__init__()

        def everything() -> dict:
            return {**status(), "transcript_write_errors": transcripts.write_errors if transcripts is not None else 0}

        self.metrics = Metrics(everything)
        site = Site(MetricsResource(self.metrics))
        site.noisy = False
        Listener(description, site, reactor, option="--metrics-port").setServiceParent(self)

    def startService(self):
        globalLogPublisher.addObserver(self.metrics)
        super().startService()

    def stopService(self):
        globalLogPublisher.removeObserver(self.metrics)
        return super().stopService()


def check_transcripts(config: configuration.Config, reactor):
    """The transcript file's service when LOG_CHAT is on; an unusable LOG_DIR stops startup."""
    if not config.log_chat:
        return None
    from fwd import chatlog

    problem = chatlog.check_log_dir(config.log_dir)
    if problem:
        raise configuration.ConfigError(problem)
    return chatlog.TranscriptService(config.log_dir, reactor=reactor)


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
    upstream = UpstreamPool(reactor)
    agent = UpstreamAgent.usingEndpointFactory(reactor, UpstreamEndpoints(reactor, config.timeout), pool=upstream.pool)
    transcripts = check_transcripts(config, reactor) if inherited is None else None
    forwarder = Forwarder(config, agent, reactor)
    top.forwarder = forwarder
    site = ForwardSite(forwarder)
    drain = Drain(forwarder, site, reactor)
    drain.setServiceParent(top)
    upstream.setServiceParent(drain)
    if transcripts is not None:
        transcripts.setServiceParent(drain)
    for number, description in enumerate(config.ports):
        if inherited is not None:
            from fwd.workers import AdoptedPort

            AdoptedPort(description, inherited[number], site, reactor).setServiceParent(top)
            continue
        Listener(description, site, reactor).setServiceParent(top)
    if config.metrics_port and inherited is None:
        MetricsService(config.metrics_port, forwarder.status, transcripts, reactor).setServiceParent(top)
    if load is not None:
        Reload(forwarder, site, load, reactor).setServiceParent(top)
    if hasattr(reactor, "callWhenRunning"):
        reactor.callWhenRunning(tune_gc)
    if inherited is None:
        StartupReport(config).setServiceParent(top)
    return top


def describe_exception(e: Exception) -> str:
    text = str(e) or e.__class__.__name__
    if isinstance(e, OSError) and e.filename:
        text = f"{e.strerror}: {e.filename}"
    return text.splitlines()[0]

"""Assembling the daemon's services from a Config: listeners, upstream pool, transcript log.  Tests: tests/test_tap.py"""

from __future__ import annotations

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from fwd import config as configuration
from fwd.forward import Forwarder
from fwd.web import ForwardSite

log = Logger(namespace="fwd.startup")

MAX_PERSISTENT_PER_HOST = 256
IDLE_CONNECTION_SECONDS = 60


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
                log.warn(line)
            else:
                log.info(line)


def build_service(config: configuration.Config, reactor=None) -> service.MultiService:
    """The whole daemon as a MultiService ready for twistd or a .tac file."""
    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    upstream = UpstreamPool(reactor)
    upstream.setServiceParent(top)
    agent = Agent(reactor, pool=upstream.pool, connectTimeout=config.timeout)
    if config.log_chat:
        from fwd import chatlog

        problem = chatlog.check_log_dir(config.log_dir)
        if problem:
            raise configuration.ConfigError(problem)
        chatlog.TranscriptService(config.log_dir).setServiceParent(top)
    forwarder = Forwarder(config, agent, reactor)
    site = ForwardSite(forwarder)
    for description in config.ports:
        try:
            listener = strports.service(description, site, reactor=reactor)
        except Exception as e:
            raise configuration.ConfigError(f"--port {description}: {describe_exception(e)}") from None
        listener.setServiceParent(top)
    StartupReport(config).setServiceParent(top)
    return top


def describe_exception(e: Exception) -> str:
    text = str(e) or e.__class__.__name__
    if isinstance(e, OSError) and e.filename:
        text = f"{e.strerror}: {e.filename}"
    return text.splitlines()[0]

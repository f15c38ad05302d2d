"""The upstream side: one persistent connection pool and the Agent that sends every relayed request on it.
Tests: tests/test_daemon.py

The relay uses a plain twisted.web Agent, not treq's HTTPClient: treq keeps one cookie jar for every client
(an upstream Set-Cookie would ride on other tenants' requests), decodes gzip and rewrites Accept-Encoding, and
follows redirects, and a forwarding proxy must do none of these (tests/test_upstream.py shows each).
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from fwd import private

MAX_PERSISTENT_PER_HOST = 256
# An idle upstream connection is closed after this long: shorter than the idle timeout of common upstream
# front ends (about a minute), so a request is never sent on a connection the upstream is closing, and a
# burst's descriptors come back soon after it.
IDLE_CONNECTION_SECONDS = 20


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


class UpstreamConnections(service.Service):
    """The persistent upstream connections, closed when the daemon stops."""

    def __init__(self, reactor):
        self.pool = private.quiet_pool(HTTPConnectionPool(reactor, persistent=True))
        self.pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
        self.pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()


def upstream_agent(reactor, connect_timeout: float, connections: UpstreamConnections) -> Agent:
    """The Agent of every relayed request: no redirects, no cookies, no content decoding, and each upstream's
    origin parsed once (fwd.private.UpstreamAgent)."""
    return private.UpstreamAgent.usingEndpointFactory(
        reactor, UpstreamEndpoints(reactor, connect_timeout), pool=connections.pool
    )

"""An in-memory proxy for tests: the daemon's Site and Resource tree over the fake upstream, all on one Clock."""

from __future__ import annotations

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from fwd import config as configuration
from fwd.daemon import build_site
from fwd.gateway import Gateway
from fwd.resource import GatewayRoot
from tests.support.upstream import FakeUpstream


def make_config(**settings) -> configuration.Config:
    """A Config from option names as keyword arguments, e.g. api_key="sk-a sk-b"."""
    cli = {"base_url": "http://upstream.test", **settings}
    return configuration.load(cli, environ={}, dotenv_path=None)


class MemoryProxy:
    """The proxy wired to a FakeUpstream in memory; a treq client talks to it."""

    def __init__(self, config: configuration.Config | None = None, upstream: Resource | None = None, **settings):
        self.clock = Clock()
        self.upstream = upstream if upstream is not None else FakeUpstream(reactor=self.clock)
        self.upstream_agent = RequestTraversalAgent(self.upstream)
        self.config = config if config is not None else make_config(**settings)
        self.gateway = Gateway(self.config, self.upstream_agent, self.clock)
        self.root = GatewayRoot(self.gateway)
        self.site = build_site(self.gateway, self.root)
        self.client_agent = RequestTraversalAgent(Resource())
        self.client_agent._serverFactory = self.site
        self.client = HTTPClient(self.client_agent, data_to_body_producer=_SynchronousProducer)

    def flush(self, rounds: int = 8) -> None:
        """Move bytes both ways until both hops are quiet."""
        for _ in range(rounds):
            self.upstream_agent.flush()
            self.client_agent.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def raw(self, data: bytes, peer: str = "127.0.0.1") -> StringTransport:
        """Send raw bytes on a fresh client connection; the transport holds what the proxy answered."""
        address = IPv4Address("TCP", peer, 40000)
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        self.flush()
        self.raw_protocol = protocol
        return transport


def split_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, lower-cased headers and de-chunked body of one raw HTTP/1.1 response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding") == b"chunked":
        out = b""
        while body:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out += rest[:size]
            body = rest[size + 2 :]
        body = out
    return status, headers, body

"""Every private Twisted name the daemon touches, in one place, each with the reason no public way works.

An upgrade of Twisted that drops or renames one of them must fail loudly, not silently turn a check off:
`missing()` lists the names the installed Twisted no longer has, and tests/test_private.py fails on any.
Tests: tests/test_private.py

- `HTTPChannel._respondToBadRequestAndDisconnect`: twisted.web calls it for every request it cannot frame
  (bad request line, bad header, bad chunking).  Overriding it is the only way to answer those with the
  proxy's JSON 400, access-log them and count them, instead of twisted.web's bare text 400.
- `twisted.web.http._GenericHTTPChannelProtocol`: the protocol a Site builds, which switches a TLS connection
  to HTTP/2 when ALPN says h2; it constructs `H2Connection()` itself, so the hardened HTTP/2 connection of
  fwd.http2 can only be put in place by a subclass of it.
- `twisted.web._http2.H2Connection` / `H2Stream`: the HTTP/2 implementation has no public module; fwd.http2
  subclasses it to bound header blocks, streams and deadlines (see there for the attributes it reads).
- `SSL4ServerEndpoint._sslContextFactory`: the TLS context an `ssl:` endpoint description built.  Needed to set
  the cipher list and minimum TLS version (the description has no option for them) and, in a worker of
  --workers, to wrap an inherited listening socket in the same TLS context.
- `HTTPConnectionPool._factory` / `twisted.web.client._HTTP11ClientFactory`: the factory of upstream
  connections.  The only way to stop a log line per new upstream connection ("Starting factory …") is a
  subclass with `noisy = False` set as the pool's factory.
"""

from __future__ import annotations

from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.web import _http2, client, http

GenericHTTPChannelProtocol = http._GenericHTTPChannelProtocol
H2Connection = _http2.H2Connection
H2Stream = _http2.H2Stream


class QuietClientFactory(client._HTTP11ClientFactory):
    """The upstream connection pool's factory, without a log line per new upstream connection."""

    noisy = False


def quiet_pool(pool: client.HTTPConnectionPool) -> client.HTTPConnectionPool:
    """Make an upstream connection pool open its connections without logging each one."""
    pool._factory = QuietClientFactory
    return pool


def tls_context_factory(endpoint):
    """The TLS context factory of an `ssl:` server endpoint, or None for any other endpoint."""
    if isinstance(endpoint, SSL4ServerEndpoint):
        return endpoint._sslContextFactory
    return None


# (owner, attribute): what must exist for the daemon to work as documented.
REQUIRED = (
    (http.HTTPChannel, "_respondToBadRequestAndDisconnect"),
    (http, "_GenericHTTPChannelProtocol"),
    (http._GenericHTTPChannelProtocol, "dataReceived"),
    (_http2, "H2Connection"),
    (_http2, "H2Stream"),
    (client, "_HTTP11ClientFactory"),
    (client.HTTPConnectionPool, "_factory"),
)


def missing() -> list[str]:
    """The private names of REQUIRED (and of an ssl: endpoint) that the installed Twisted lacks."""
    gone = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in REQUIRED if not hasattr(owner, name)]
    if "_sslContextFactory" not in SSL4ServerEndpoint.__init__.__code__.co_names:
        gone.append("SSL4ServerEndpoint._sslContextFactory")
    return gone

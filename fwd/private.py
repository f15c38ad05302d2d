"""Every private Twisted name the daemon touches, in one place, each with the reason no public way works.

An upgrade of Twisted that drops or renames one of them must fail loudly, not silently turn a check off:
`missing()` lists the names the installed Twisted no longer has, and tests/test_private.py fails on any.
Tests: tests/test_private.py

- `HTTPChannel._respondToBadRequestAndDisconnect`: twisted.web calls it for every request it cannot frame
  (bad request line, bad header, bad chunking).  Overriding it is the only way to answer those with the
  proxy's JSON 400, access-log them and count them, instead of twisted.web's bare text 400.
- `twisted.web._http2.H2Connection`: twisted.web's only HTTP/2 server protocol, in a module with no public
  name.  fwd.http2 subclasses it to bound header blocks, streams and deadlines and to stop its send loop from
  polling shut windows; its docstring lists each member of it that it uses.  (twisted.web's own
  `_GenericHTTPChannelProtocol`, which builds a plain H2Connection, is not used: fwd.http2.ForwardHTTPProtocol
  makes the same switch with public names.)
- `SSL4ServerEndpoint._sslContextFactory`: the TLS context an `ssl:` endpoint description built.  Needed to set
  the cipher list and minimum TLS version (the description has no option for them) and, in a worker of
  --workers, to wrap an inherited listening socket in the same TLS context.
- `HTTPConnectionPool._factory` / `twisted.web.client._HTTP11ClientFactory`: the factory of upstream
  connections.  The only way to stop a log line per new upstream connection ("Starting factory …") is a
  subclass with `noisy = False` set as the pool's factory, and it is where the connections' protocol is chosen:
- `Agent._init`, `Agent._requestWithEndpoint`, `Agent._getEndpoint`, `twisted.web.client._ensureValidURI`:
  Agent.request parses the whole URL of every request (hyperlink-free, but still a URI object, an endpoint
  lookup and a validation each time).  UpstreamAgent parses an upstream's origin once and only splices the
  path in; measured under wrk on the plain benchmark, it takes about 115 µs (profiled) of CPU off each
  request, 6-8% of the daemon's time per request.
- `twisted.web._newclient.HTTP11ClientProtocol._parser` and `HTTPClientParser.connHeaders`: twisted.web keeps
  an upstream response's `Connection` header to itself (it is not in `response.headers`), yet the headers it
  names are hop-by-hop and must not reach the client (RFC 9110 7.6.1).  The upstream connections' protocol
  hands each response that header as `response.connection`.
- `EPollReactor._poller`, `._selectables`, `._writes`, `._doReadOrWrite`: two costs of the epoll reactor on every
  request, which `lighten_reactor` takes off the running reactor (its poll, addWriter, removeWriter, removeAll
  and getWriters are replaced on the instance; the handler of each event is the reactor's own):
  - it hands every I/O event to its connection through `log.callWithLogger`, which asks the connection for its
    log prefix and pushes and pops a legacy log context (two dict copies) around it.  The poll calls the same
    handler directly, with the same catch-and-log of what it lets out.  Measured with benchmarks/cpu_ab.py,
    both daemons loaded at once, 5 rounds: CPU per plain request -8.7%, per streamed completion -2.6%.  What is
    lost is the connection's prefix (`[HTTPChannel,3,127.0.0.1]`) on legacy `log.msg` lines written during an
    I/O event; the daemon's own lines never had one (they carry their namespace).
  - a connection that writes registers for a write event (an epoll_ctl), waits for the next poll to say the
    socket is writable, sends, and unregisters (another epoll_ctl): twice a plain request, once per relayed
    chunk of a stream.  What connections wrote during a turn is sent at its end instead, by the same write
    handler; only a connection whose socket did not take everything is registered, and sends the rest when it
    drains.  Measured the same way: CPU per plain request -6.4%, per streamed completion -9.1%.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from select import EPOLLOUT

from twisted.internet import epollreactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.logger import Logger
from twisted.web import _http2, _newclient, client, http
from twisted.web.client import URI, _ensureValidURI

H2Connection = _http2.H2Connection

log = Logger(namespace="fwd.reactor")


class BadRequestHook:
    """Mixed into the daemon's HTTP/1.1 channel: twisted.web's own refusals of what it cannot frame go to the
    channel's public `bad_request()` instead of twisted.web's bare text 400."""

    def _respondToBadRequestAndDisconnect(self):
        self.bad_request()


class UpstreamAgent(client.Agent):
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
        return self._requestWithEndpoint(key, self._getEndpoint(parsed), method, parsed, headers, bodyProducer, target)


class ConnectionHeaderProtocol(_newclient.HTTP11ClientProtocol):
    """An upstream connection whose responses carry the upstream's `Connection` header values as
    `response.connection` (a list of bytes, maybe empty)."""

    def request(self, request):
        return super().request(request).addCallback(self._hand_over, self._parser)

    @staticmethod
    def _hand_over(response, parser):
        response.connection = parser.connHeaders.getRawHeaders(b"connection") if parser is not None else None
        return response


class QuietClientFactory(client._HTTP11ClientFactory):
    """The upstream connection pool's factory: no log line per new upstream connection, and connections that
    hand each response its `Connection` header."""

    noisy = False

    def buildProtocol(self, addr):
        return ConnectionHeaderProtocol(self._quiescentCallback)


def quiet_pool(pool: client.HTTPConnectionPool) -> client.HTTPConnectionPool:
    """Make an upstream connection pool open its connections without logging each one."""
    pool._factory = QuietClientFactory
    return pool


def tls_context_factory(endpoint):
    """The TLS context factory of an `ssl:` server endpoint, or None for any other endpoint."""
    if isinstance(endpoint, SSL4ServerEndpoint):
        return endpoint._sslContextFactory
    return None


def lighten_reactor(reactor) -> bool:
    """Make an epoll reactor hand its I/O events to their connections without a legacy log context around
    each, and send what connections wrote at the end of the reactor turn instead of registering each for a
    write event first (see the module's docstring).  Any other reactor is left as it is; returns whether it
    was changed."""
    if not isinstance(reactor, epollreactor.EPollReactor):
        return False
    if reactor in _LIGHTENED:
        return True  # twice would stack a second pending list whose writers nothing flushes
    _LIGHTENED.add(reactor)
    poller, selectables, writes, handle = reactor._poller, reactor._selectables, reactor._writes, reactor._doReadOrWrite
    register, unregister, remove_all = reactor.addWriter, reactor.removeWriter, reactor.removeAll
    # Connections that wrote this turn, in order, not registered for write events (an OrderedDict: taking the
    # first of a plain dict again and again scans the deleted slots, quadratic in the writers of a turn).
    pending: OrderedDict = OrderedDict()
    current = [None, False]  # the connection being flushed, and whether it stopped writing meanwhile

    def addWriter(writer):
        if writer.fileno() not in writes:
            pending[writer] = None

    def removeWriter(writer):
        if writer is current[0]:
            current[1] = True
        if pending.pop(writer, False) is None:
            return
        unregister(writer)

    def flush():
        # The connections pending when the flush began: one that writes again as it is flushed (a producer
        # resumed by its drained buffer) waits for the next turn, as with a write event, so that it cannot keep
        # the reactor to itself.
        for _ in range(len(pending)):
            if not pending:
                break
            writer, _ = pending.popitem(last=False)
            current[0], current[1] = writer, False
            try:
                handle(writer, writer.fileno(), EPOLLOUT)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.failure("a write of {selectable} failed", selectable=type(writer).__name__)
            else:
                if not current[1] and writer.fileno() != -1:
                    register(writer)  # the kernel took part of it: the rest goes when the socket drains
        current[0] = None

    def doPoll(timeout):
        # EPollReactor.doPoll, less log.callWithLogger, between two flushes of what was written.
        if pending:
            flush()
            timeout = 0  # what the flush set off (a timer, say) is for the next turn to see, without waiting
        try:
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # What callWithLogger does with an error its call lets out (_doReadOrWrite catches those of
                # doRead and doWrite itself): log it, and go on with the other events.
                log.failure("an I/O event of {selectable} failed", selectable=type(selectable).__name__)
        if pending:
            flush()

    def removeAll():
        # Shutdown disconnects what this returns: a connection that wrote this turn while not reading (an
        # HTTP/1.1 channel answering) is in neither of the reactor's sets, only here.
        found = remove_all()
        known = set(found)
        found += [writer for writer in pending if writer not in known]
        pending.clear()
        return found

    def getWriters():
        return list(pending) + [writer for writer in reactor.__class__.getWriters(reactor) if writer not in pending]

    reactor.addWriter, reactor.removeWriter, reactor.removeAll, reactor.getWriters = (
        addWriter, removeWriter, removeAll, getWriters)
    reactor.doPoll = reactor.doIteration = doPoll
    return True


_LIGHTENED: weakref.WeakSet = weakref.WeakSet()


# (owner, attribute): what must exist for the daemon to work as documented.
REQUIRED = (
    (client.Agent, "_init"),
    (client.Agent, "_requestWithEndpoint"),
    (client.Agent, "_getEndpoint"),
    (client, "_ensureValidURI"),
    (http.HTTPChannel, "_respondToBadRequestAndDisconnect"),
    (_http2, "H2Connection"),
    (_http2.H2Connection, "writeHeaders"),
    (_http2.H2Connection, "writeDataToStream"),
    (_http2.H2Connection, "remainingOutboundWindow"),
    (_http2.H2Connection, "abortRequest"),
    (_http2.H2Connection, "timeoutConnection"),
    (_http2.H2Stream, "connectionLost"),
    (client, "_HTTP11ClientFactory"),
    (client.HTTPConnectionPool, "_factory"),
    (_newclient, "HTTP11ClientProtocol"),
    (_newclient.HTTPClientParser, "connectionMade"),
    (epollreactor.EPollReactor, "_doReadOrWrite"),
)


# (class, method, attribute): instance attributes the method sets, which the daemon reads or replaces.
REQUIRED_INSTANCE = (
    (SSL4ServerEndpoint, "__init__", "_sslContextFactory"),
    (client._HTTP11ClientFactory, "__init__", "_quiescentCallback"),
    (_newclient.HTTP11ClientProtocol, "request", "_parser"),
    (_newclient.HTTPClientParser, "connectionMade", "connHeaders"),
    (_http2.H2Connection, "__init__", "conn"),
    (_http2.H2Connection, "__init__", "streams"),
    (_http2.H2Connection, "__init__", "priority"),
    (epollreactor.EPollReactor, "__init__", "_poller"),
    (epollreactor.EPollReactor, "__init__", "_selectables"),
    (epollreactor.EPollReactor, "__init__", "_writes"),
)


def missing() -> list[str]:
    """The names of REQUIRED and REQUIRED_INSTANCE that the installed Twisted lacks."""
    gone = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in REQUIRED if not hasattr(owner, name)]
    gone += [
        f"{owner.__name__}.{name}"
        for owner, method, name in REQUIRED_INSTANCE
        if not hasattr(owner, method) or name not in getattr(owner, method).__code__.co_names
    ]
    return gone

"""The private Twisted names the daemon relies on (fwd/private.py) are all there: an upgrade of Twisted that
drops one fails here, loudly, instead of silently turning off what it was for."""

from twisted.web import http

import twisted
from fwd import private


def test_every_private_twisted_name_the_daemon_needs_is_still_there():
    gone = private.missing()
    assert gone == [], (
        f"Twisted {twisted.__version__} no longer has {', '.join(gone)}: fwd/private.py says what each is for; "
        "find the new way before upgrading"
    )


def test_a_name_that_disappears_is_reported(monkeypatch):
    monkeypatch.delattr(http.HTTPChannel, "_respondToBadRequestAndDisconnect")
    assert "HTTPChannel._respondToBadRequestAndDisconnect" in private.missing()


def test_no_other_module_of_the_package_touches_a_private_twisted_name():
    import ast
    import pathlib

    import twisted.web.client
    import twisted.web.http

    privates = {name for module in (twisted.web.http, twisted.web.client) for name in vars(module) if name[:1] == "_"}
    privates |= {name for owner, name in private.REQUIRED if name[:1] == "_"}
    privates |= {name for owner, method, name in private.REQUIRED_INSTANCE if name[:1] == "_"}
    privates |= {"_http2", "_HTTPChannel__first_line", "_handlingRequest", "_disconnected", "_GenericHTTPChannelProtocol"}
    privates = {name for name in privates if not name.startswith("__")}
    package = pathlib.Path(private.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Attribute):
                names.append(node.attr)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                names += [alias.name for alias in node.names]
            offenders += [f"{path.relative_to(package)}: {name}" for name in names if name in privates]
    assert offenders == []


def _served_on_a_fresh_epoll_reactor(patched: bool, failing_close: bool = False):
    """Run an echo server and a client that sends b"ping" on a fresh epoll reactor (not the global one); return
    what the client got back and how many times the legacy log context was pushed."""
    from twisted.internet import epollreactor, protocol
    from twisted.python import log as legacy

    reactor = epollreactor.EPollReactor()
    got = []

    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(data)
            self.transport.loseConnection()

        def connectionLost(self, reason):
            if failing_close:
                raise RuntimeError("a connection that fails as it closes")

    class Client(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(b"ping")

        def dataReceived(self, data):
            got.append(data)

        def connectionLost(self, reason):
            if len(got) < 2:
                got.append(b"|")
                connect()  # a second connection, served after the first one's failure
            else:
                reactor.stop()

    def connect():
        protocol.ClientCreator(reactor, Client).connectTCP("127.0.0.1", port.getHost().port)

    calls = []
    original = legacy.callWithLogger

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    legacy.callWithLogger = counting
    try:
        if patched:
            assert private.dispatch_without_log_context(reactor)
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        reactor.callWhenRunning(connect)
        reactor.callLater(10, reactor.stop)
        reactor.run(installSignalHandlers=False)
    finally:
        legacy.callWithLogger = original
        port.stopListening()
        reactor._poller.close()
    return b"".join(got), len(calls)


def test_the_reactor_serves_connections_without_a_log_context_per_event():
    echoed, contexts = _served_on_a_fresh_epoll_reactor(patched=False)
    assert echoed == b"ping|ping"
    assert contexts >= 6  # at least: accept, and a read and a close on each side, for each connection
    echoed, contexts = _served_on_a_fresh_epoll_reactor(patched=True)
    assert echoed == b"ping|ping"
    assert contexts == 0


def test_a_connection_that_fails_as_it_closes_is_logged_and_the_others_are_served():
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        echoed, _ = _served_on_a_fresh_epoll_reactor(patched=True, failing_close=True)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert echoed == b"ping|ping"
    failures = [e for e in events if "log_failure" in e]
    # Logged by the dispatch itself, naming what failed: not the main loop's "Unexpected error".
    assert [(e["log_namespace"], e["selectable"]) for e in failures] == [("fwd.reactor", "Server")] * 2
    assert all(e["log_failure"].check(RuntimeError) for e in failures)


def test_another_reactor_is_left_as_it_is():
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    assert private.dispatch_without_log_context(reactor) is False

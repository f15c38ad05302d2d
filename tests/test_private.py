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
            assert private.lighten_reactor(reactor)
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
    assert private.lighten_reactor(reactor) is False


def _fresh_reactor_serving(server_protocol, patched=True):
    """A fresh epoll reactor (not the global one) listening on loopback with `server_protocol`; returns the
    reactor, its port and the list of addWriter calls that reached epoll."""
    from twisted.internet import epollreactor, protocol

    reactor = epollreactor.EPollReactor()
    registered = []
    real = reactor.addWriter

    def counting(writer):
        registered.append(writer)
        return real(writer)

    reactor.addWriter = counting
    if patched:
        assert private.lighten_reactor(reactor)
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(server_protocol), interface="127.0.0.1")
    return reactor, port, registered


def _fetch(reactor, port, send=b"go", pause_reading_for=0.0):
    """Connect, send `send`, read until the server closes; return what arrived."""
    from twisted.internet import protocol

    got = []

    class Client(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(send)
            if pause_reading_for:
                self.transport.pauseProducing()
                reactor.callLater(pause_reading_for, self.transport.resumeProducing)

        def dataReceived(self, data):
            got.append(data)

        def connectionLost(self, reason):
            reactor.stop()

    reactor.callWhenRunning(protocol.ClientCreator(reactor, Client).connectTCP, "127.0.0.1", port.getHost().port)
    reactor.callLater(20, reactor.stop)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        port.stopListening()
        reactor._poller.close()
    return b"".join(got)


def test_small_answers_are_sent_at_the_end_of_the_turn_without_waiting_for_a_write_event():
    from twisted.internet import protocol

    class Answer(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(b"answer to " + data)
            self.transport.loseConnection()

    reactor, port, registered = _fresh_reactor_serving(Answer, patched=False)
    assert _fetch(reactor, port) == b"answer to go"
    assert len(registered) >= 2, "the stock reactor registers each write (the client's and the server's)"
    reactor, port, registered = _fresh_reactor_serving(Answer)
    assert _fetch(reactor, port) == b"answer to go"
    assert registered == []


def test_an_answer_larger_than_the_socket_takes_waits_for_the_reader_and_arrives_whole():
    from twisted.internet import protocol

    body = bytes(range(256)) * (32 * 1024)  # 8 MiB: far more than a loopback socket buffers

    class Big(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(body)
            self.transport.loseConnection()

    reactor, port, registered = _fresh_reactor_serving(Big)
    assert _fetch(reactor, port, pause_reading_for=0.3) == body
    assert registered, "what the kernel did not take at once waits for a write event"


def test_a_write_made_by_a_timer_goes_out_in_the_same_turn():
    import time

    from twisted.internet import protocol

    class Later(protocol.Protocol):
        def dataReceived(self, data):
            self.factory_reactor.callLater(0.05, self.answer)

        def answer(self):
            self.transport.write(b"later")
            self.transport.loseConnection()

    reactor, port, registered = _fresh_reactor_serving(Later)
    Later.factory_reactor = reactor
    started = time.monotonic()
    assert _fetch(reactor, port) == b"later"
    assert time.monotonic() - started < 2


def test_lightening_a_reactor_twice_changes_nothing_more():
    from twisted.internet import protocol

    body = bytes(range(256)) * (32 * 1024)

    class Big(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(body)
            self.transport.loseConnection()

    reactor, port, _ = _fresh_reactor_serving(Big)
    assert private.lighten_reactor(reactor)
    assert _fetch(reactor, port, pause_reading_for=0.3) == body


def test_a_connection_with_a_write_under_way_is_closed_at_shutdown():
    from twisted.internet import epollreactor, protocol

    reactor = epollreactor.EPollReactor()
    assert private.lighten_reactor(reactor)
    lost = []

    class Answering(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.pauseProducing()  # as an HTTP/1.1 channel does while it answers
            # The process is told to stop, and something writes on the connection as it does.
            reactor.addSystemEventTrigger("before", "shutdown", self.transport.write, b"a last word")
            reactor.stop()

        def connectionLost(self, reason):
            lost.append("server")

    class Client(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(b"go")

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Answering), interface="127.0.0.1")
    reactor.callWhenRunning(protocol.ClientCreator(reactor, Client).connectTCP, "127.0.0.1", port.getHost().port)
    reactor.callLater(10, reactor.stop)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        reactor._poller.close()
    assert lost == ["server"]
    assert reactor.getWriters() == []

"""Listening: one service per --port, TLS worth its name on ssl: ports, and the sockets a worker of --workers
inherits.  Tests: tests/test_daemon.py, tests/test_tls.py"""

from __future__ import annotations

import os
import socket
import sys

from OpenSSL import SSL
from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.python import failure

from fwd import private
from fwd.settings import ConfigError

LISTEN_BACKLOG = 1024


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


def describe_exception(e: Exception) -> str:
    text = str(e) or e.__class__.__name__
    if isinstance(e, OSError) and e.filename:
        text = f"{e.strerror}: {e.filename}"
    return text.splitlines()[0]


def with_backlog(description: str) -> str:
    """Twisted listens with a backlog of 50, too short for bursts of thousands of streams; ask for more
    unless the endpoint says otherwise (the kernel caps it at net.core.somaxconn)."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl", "ssl6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def harden_tls(endpoint, ciphers: str) -> None:
    """On an ssl: endpoint, offer TLS 1.2 and later only, with `ciphers` (OpenSSL syntax) for TLS 1.2;
    TLS 1.3's suites are all forward-secret AEAD."""
    context_factory = private.tls_context_factory(endpoint)
    if context_factory is None:
        return
    context = context_factory.getContext()
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    try:
        context.set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise ConfigError(f"--tls-ciphers {ciphers!r}: OpenSSL knows none of these ciphers") from None


def parse_endpoint(reactor, description: str, ciphers: str, option: str = "--port"):
    """A server endpoint for a --port description, with hardened TLS; a bad one is a one-line ConfigError."""
    try:
        endpoint = serverFromString(reactor, with_backlog(description))
    except Exception as e:
        raise ConfigError(f"{option} {description}: {describe_exception(e)}") from None
    harden_tls(endpoint, ciphers)
    return endpoint


# The endpoints a worker of --workers can have a socket of its own for: TCP, with or without TLS.
OWN_SOCKET_KINDS = {"tcp": socket.AF_INET, "ssl": socket.AF_INET, "tcp6": socket.AF_INET6}


def description_fields(description: str) -> tuple[list[str], dict[str, str]]:
    """The positional and key=value fields of an endpoint description, with Twisted's escapes (`\\:`) undone."""
    fields, field, escaped = [], "", False
    for char in description:
        if escaped:
            field, escaped = field + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(field)
            field = ""
        else:
            field += char
    fields.append(field)
    positional = [f for f in fields if "=" not in f]
    named = dict(f.split("=", 1) for f in fields if "=" in f)
    return positional, named


def sockets_per_worker(description: str, count: int) -> list[socket.socket] | None:
    """`count` listening sockets on one TCP address, bound with SO_REUSEPORT, one for each worker; None where
    the endpoint is not plain TCP or TLS over TCP (UNIX sockets, inherited descriptors), or the system has no
    SO_REUSEPORT: those workers share one socket.

    Workers sharing one socket take connections in bursts: the first one awake accepts every connection
    waiting, so a client opening 32 keep-alive connections at once was seen served 31 to 1 by two workers.
    With a socket each, the kernel spreads new connections over the sockets by a hash of their addresses.
    The supervisor keeps every socket open, so a worker that restarts takes its own socket back, and the
    connections that arrived for it meanwhile wait in its queue instead of being refused.
    """
    positional, named = description_fields(with_backlog(description))
    family = OWN_SOCKET_KINDS.get(positional[0].lower())
    if family is None or count < 2 or not hasattr(socket, "SO_REUSEPORT"):
        return None
    port = int(named.get("port") or positional[1])
    interface = named.get("interface", "")
    if family == socket.AF_INET and ":" in interface:
        family = socket.AF_INET6
    host = interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    backlog = int(named.get("backlog", LISTEN_BACKLOG))
    sockets: list[socket.socket] = []
    try:
        # First without SO_REUSEPORT, as Twisted binds: a port another program holds is an error, even one of
        # the same user that bound it with SO_REUSEPORT too (another instance), instead of a silent share.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
        for _ in range(count):
            listening = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(listening)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listening.bind((host, port))
            listening.listen(backlog)
            listening.setblocking(False)
    except OSError as e:
        for listening in sockets:
            listening.close()
        raise report_in_one_line(StartupError(f"cannot listen on {description}: {e.strerror or e}")) from None
    return sockets


def listen_now(endpoint, factory, description: str):
    """Listen, and raise a one-line StartupError at once when the port cannot be bound (TCP, TLS and UNIX
    endpoints bind synchronously)."""
    outcome = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome or isinstance(outcome[0], failure.Failure):
        problem = outcome[0].value if outcome else None
        socket_error = getattr(problem, "socketError", None)
        why = getattr(socket_error, "strerror", None) or (str(socket_error) if socket_error else None)
        if why is None:
            why = outcome[0].getErrorMessage() if outcome else "did not bind"
        raise report_in_one_line(StartupError(f"cannot listen on {description}: {why}"))
    return outcome[0]


class Listener(service.Service):
    """One --port; failing to bind stops startup with one line instead of a traceback."""

    def __init__(self, description: str, factory, reactor, ciphers: str, option: str = "--port"):
        self.description = description
        self.factory = factory
        self.endpoint = parse_endpoint(reactor, description, ciphers, option)
        self.port = None

    def privilegedStartService(self):
        super().privilegedStartService()
        self.port = listen_now(self.endpoint, self.factory, self.description)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class AdoptedPort(service.Service):
    """A listening socket inherited from the supervisor of --workers, accepted on by this worker."""

    def __init__(self, description: str, fd: int, factory, reactor, ciphers: str):
        self.description = description
        self.fd = fd
        self.factory = factory
        self.reactor = reactor
        self.ciphers = ciphers
        self.port = None

    def startService(self):
        super().startService()
        probe = socket.socket(fileno=os.dup(self.fd))
        family = probe.family
        probe.close()
        factory = self.factory
        endpoint = parse_endpoint(self.reactor, self.description, self.ciphers)
        context_factory = private.tls_context_factory(endpoint)
        if context_factory is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(context_factory, False, factory)
        self.port = self.reactor.adoptStreamPort(self.fd, family, factory)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()

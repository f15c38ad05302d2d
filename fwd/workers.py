"""`--workers N`: N processes serving the same listening sockets.  Tests: tests/test_workers.py

The twistd process becomes a supervisor.  It binds every `--port` once (Twisted's own endpoint parsing, so
tcp, ssl and unix all work), stops accepting on them itself, and starts N workers (`python -m fwd.workers`)
that adopt the sockets and accept in turn.  Each worker logs twisted.logger events as JSON lines on its stdout,
which the supervisor republishes, and sends transcript frames over a socket pair (fd 3), which the supervisor
passes to its transcript writer: its one log, its one chat.jsonl and its /metrics cover every worker.
A worker that dies is started again, with a growing delay if it keeps dying.  SIGHUP and SIGTERM are passed on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python import failure

from fwd import chatlog
from fwd import config as configuration
from fwd.daemon import StartupError, describe_exception, report_in_one_line, with_backlog
from fwd.transcript import FrameError, FrameReader

log = Logger(namespace="fwd.workers")

STATUS_NAMESPACE = "fwd.status"
STATUS_INTERVAL = 5.0
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 60.0
ENV_CLI = "FWD_WORKER_CLI"
ENV_CONFIG = "FWD_WORKER_CONFIG"
ENV_FDS = "FWD_WORKER_FDS"
ENV_TRANSCRIPTS = "FWD_WORKER_TRANSCRIPTS"
TRANSCRIPTS_FD = 3


class WorkerProtocol(protocol.ProcessProtocol):
    """One worker as the supervisor sees it: its log lines in, its exit out."""

    def __init__(self, supervisor: Supervisor, number: int):
        self.supervisor = supervisor
        self.number = number
        self.buffer = b""
        self.started = supervisor.clock.seconds()
        self.ended = defer.Deferred()
        self.line_closed: defer.Deferred | None = None

    def outReceived(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        for line in lines:
            if line.strip():
                self.supervisor.worker_event(self.number, line)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.warn("worker {number}: {line}", number=self.number, line=line)

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason)


class TranscriptLine(protocol.Protocol):
    """One end of the socket that carries transcript frames from a worker to its supervisor.

    In the supervisor it cuts what arrives into frames for the transcript writer; in a worker, a FrameSender
    writes to it.
    """

    def __init__(self, receive=None, sender: chatlog.FrameSender | None = None):
        self.receive = receive
        self.sender = sender
        self.reader = FrameReader()
        self.closed = defer.Deferred()

    def connectionMade(self) -> None:
        if self.sender is not None:
            self.sender.attach(self.transport)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except FrameError as e:
            log.error("dropping a worker's transcript line: {why}", why=str(e))
            self.transport.abortConnection()
            frames = e.frames
        for frame in frames:
            self.receive(frame)

    def connectionLost(self, reason) -> None:
        if self.sender is not None:
            self.sender.detach()
        self.closed.callback(None)

    def close(self) -> defer.Deferred:
        """Send what is queued, then close (the worker's last step before it exits)."""
        if self.sender is not None:
            self.sender.flush()
        self.transport.loseConnection()
        return self.closed


def adopt_line(reactor, fd: int, line: TranscriptLine) -> None:
    """Make one end of a transcript socket pair a connection of this reactor (it keeps its own copy of fd)."""
    factory = protocol.Factory.forProtocol(lambda: line)
    factory.noisy = False
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, factory)


class Supervisor(service.Service):
    """Binds the listening sockets and keeps N workers serving them."""

    def __init__(self, config: configuration.Config, cli: dict, config_file: str | None, reactor, transcripts=None):
        self.config = config
        self.transcripts = transcripts
        self.cli = cli
        self.config_file = config_file
        self.reactor = reactor
        self.clock = reactor
        self.ports: list = []
        self.workers: dict[int, WorkerProtocol] = {}
        self.delays: dict[int, float] = {}
        self.statuses: dict[int, dict] = {}
        self.stopping = False
        self.previous_hup = None
        self.endpoints = []
        for description in config.ports:
            try:
                self.endpoints.append((description, serverFromString(reactor, with_backlog(description))))
            except Exception as e:
                raise configuration.ConfigError(f"--port {description}: {describe_exception(e)}") from None

    def privilegedStartService(self):
        super().privilegedStartService()
        for description, endpoint in self.endpoints:
            outcome = []
            placeholder = protocol.Factory.forProtocol(protocol.Protocol)
            placeholder.noisy = False
            endpoint.listen(placeholder).addBoth(outcome.append)
            if not outcome or isinstance(outcome[0], failure.Failure):
                socket_error = getattr(outcome[0].value, "socketError", None) if outcome else None
                why = getattr(socket_error, "strerror", None) or (outcome[0].getErrorMessage() if outcome else "did not bind")
                raise report_in_one_line(StartupError(f"cannot listen on {description}: {why}"))
            port = outcome[0]
            port.stopReading()  # the workers accept on it, not this process
            self.ports.append(port)

    def startService(self):
        super().startService()
        self.previous_hup = signal.signal(signal.SIGHUP, self._hangup)
        for number in range(1, self.config.workers + 1):
            self.spawn(number)

    def spawn(self, number: int) -> None:
        if self.stopping:
            return
        fds = [port.fileno() for port in self.ports]
        env = dict(os.environ)
        env[ENV_CLI] = json.dumps(self.cli)
        env[ENV_CONFIG] = self.config_file or ""
        env[ENV_FDS] = ",".join(map(str, fds))
        child_fds = {0: "w", 1: "r", 2: "r"}
        child_fds.update({fd: fd for fd in fds})
        worker = WorkerProtocol(self, number)
        self.workers[number] = worker
        ours = theirs = None
        if self.transcripts is not None:
            ours, theirs = socket.socketpair()
            child_fds[TRANSCRIPTS_FD] = theirs.fileno()
            env[ENV_TRANSCRIPTS] = str(TRANSCRIPTS_FD)
        try:
            self.reactor.spawnProcess(
                worker, sys.executable, [sys.executable, "-m", "fwd.workers"], env=env, path=os.getcwd(), childFDs=child_fds
            )
            if ours is not None:
                line = TranscriptLine(receive=self.transcripts.send)
                adopt_line(self.reactor, ours.fileno(), line)
                worker.line_closed = line.closed
        finally:
            for end in (ours, theirs):
                if end is not None:
                    end.close()
        log.info("worker {number} started (pid {pid})", number=number, pid=worker.transport.pid)

    def worker_event(self, number: int, line: bytes) -> None:
        try:
            event = eventFromJSON(line.decode("utf-8", "replace"))
        except (ValueError, UnicodeDecodeError):
            log.info("worker {number}: {line}", number=number, line=line.decode("utf-8", "replace"))
            return
        event["worker"] = number
        namespace = event.get("log_namespace")
        if namespace == STATUS_NAMESPACE:
            self.statuses[number] = event.get("status") or {}
        else:
            globalLogPublisher(event)

    def worker_ended(self, worker: WorkerProtocol, reason) -> None:
        number = worker.number
        self.statuses.pop(number, None)
        if self.workers.get(number) is worker:
            del self.workers[number]
        if self.stopping:
            return
        lived = self.clock.seconds() - worker.started
        delay = FIRST_RESTART_DELAY if lived > STABLE_AFTER else min(MAX_RESTART_DELAY, self.delays.get(number, 0) * 2 or FIRST_RESTART_DELAY)
        self.delays[number] = delay
        log.warn(
            "worker {number} exited ({why}); starting it again in {delay:g} s",
            number=number, why=reason.value, delay=delay,
        )
        self.reactor.callLater(delay, self.spawn, number)

    def _hangup(self, signum, frame):
        self.reactor.callFromThread(self.signal_workers, signal.SIGHUP)

    def signal_workers(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(signum)
            except Exception:
                pass

    def status(self) -> dict:
        """The workers' latest reports, added up for /metrics."""
        total = {"in_flight": 0, "streams": 0, "keys": []}
        for status in self.statuses.values():
            total["in_flight"] += status.get("in_flight", 0)
            total["streams"] += status.get("streams", 0)
            total["keys"] += [tuple(k) for k in status.get("keys", [])]
        return total

    def stopService(self):
        super().stopService()
        self.stopping = True
        if self.previous_hup is not None:
            signal.signal(signal.SIGHUP, self.previous_hup)
        # A worker is done when it has exited and its last transcripts have arrived.
        ended = [w.ended for w in self.workers.values()] + [
            w.line_closed for w in self.workers.values() if w.line_closed is not None
        ]
        self.signal_workers(signal.SIGTERM)
        for port in self.ports:
            port.stopListening()
        grace = self.config.grace_period + 5
        done = defer.DeferredList(ended)
        return done.addTimeout(grace, self.clock).addErrback(lambda _: self.signal_workers(signal.SIGKILL))


def build_supervisor(config: configuration.Config, cli: dict, config_file: str | None, reactor=None):
    """The supervisor's services: the workers, plus the transcript file and /metrics they share."""
    from fwd.daemon import MetricsService, StartupReport, check_transcripts

    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    transcripts = check_transcripts(config, reactor)
    if transcripts is not None:
        transcripts.setServiceParent(top)
    supervisor = Supervisor(config, cli, config_file, reactor, transcripts)
    supervisor.setServiceParent(top)
    if config.metrics_port:
        MetricsService(config.metrics_port, supervisor.status, transcripts, reactor).setServiceParent(top)
    StartupReport(config).setServiceParent(top)
    return top


class AdoptedPort(service.Service):
    """A listening socket inherited from the supervisor, accepted on by this worker."""

    def __init__(self, description: str, fd: int, factory, reactor):
        self.description = description
        self.fd = fd
        self.factory = factory
        self.reactor = reactor
        self.port = None

    def startService(self):
        super().startService()
        probe = socket.socket(fileno=os.dup(self.fd))
        family = probe.family
        probe.close()
        factory = self.factory
        if self.description.split(":", 1)[0] in ("ssl", "ssl6"):
            from twisted.protocols.tls import TLSMemoryBIOFactory

            context = serverFromString(self.reactor, self.description)._sslContextFactory
            factory = TLSMemoryBIOFactory(context, False, factory)
        self.port = self.reactor.adoptStreamPort(self.fd, family, factory)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


def run_worker() -> None:
    """Entry point of one worker process (`python -m fwd.workers`), started by the Supervisor."""
    from twisted.internet import reactor, task
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    from fwd.daemon import build_service

    to_supervisor = jsonFileLogObserver(sys.stdout, recordSeparator="")
    globalLogBeginner.beginLoggingTo([to_supervisor], redirectStandardIO=False)
    line = None
    if os.environ.get(ENV_TRANSCRIPTS):
        fd = int(os.environ[ENV_TRANSCRIPTS])
        sender = chatlog.FrameSender(reactor)
        chatlog.transcriptPublisher.addObserver(sender)
        line = TranscriptLine(sender=sender)
        adopt_line(reactor, fd, line)
        os.close(fd)
    cli = json.loads(os.environ[ENV_CLI])
    config_file = os.environ.get(ENV_CONFIG) or None
    fds = [int(fd) for fd in os.environ[ENV_FDS].split(",") if fd]

    def load() -> configuration.Config:
        return configuration.load(cli, config_file=config_file)

    top = build_service(load(), reactor, load=load, inherited=fds)
    status_log = Logger(namespace=STATUS_NAMESPACE)
    forwarder = top.forwarder
    task.LoopingCall(lambda: status_log.info("", status=forwarder.status())).start(STATUS_INTERVAL)
    parent = os.getppid()
    task.LoopingCall(lambda: os.getppid() != parent and reactor.stop()).start(1.0, now=False)
    top.startService()

    def stop():
        # Drain first: exchanges ending meanwhile still send their transcripts, then the line closes.
        stopped = defer.maybeDeferred(top.stopService)
        return stopped.addBoth(lambda _: line.close()) if line is not None else stopped

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()


if __name__ == "__main__":
    run_worker()

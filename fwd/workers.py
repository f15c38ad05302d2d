"""`--workers N`: the supervisor that binds the listening sockets once and keeps N worker processes serving
them.  Tests: tests/test_workers.py

The twistd process becomes the supervisor.  It binds every `--port` (Twisted's own endpoint parsing, so
tcp, ssl and unix all work), stops accepting on them itself, and starts N workers (`python -m fwd.worker`)
that adopt the sockets and accept on them.  A TCP port (with or without TLS) is bound once per worker with
SO_REUSEPORT, so the kernel spreads connections evenly (fwd.listeners.sockets_per_worker); the others are
bound once and shared.  The supervisor reads the configuration (at start and on SIGHUP)
and sends each worker the sources it was read from over a control line (fd 4): a refused reload sends nothing,
so a worker started after it serves the last good configuration.  Each worker logs twisted.logger events as
JSON lines on its stdout, which the supervisor republishes, and sends transcript frames over a second line
(fd 3), which the supervisor passes to its transcript writer: its one log, its one chat.jsonl, its one usage
ledger and its /metrics cover every worker.  The control line also carries every worker's limit questions to
the supervisor's one Limiter, so limits and budgets hold across workers (fwd.quota_line).  A worker that dies is started again, with a growing delay if it keeps dying.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

import attrs
import orjson
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols.basic import LineOnlyReceiver

from fwd import config as configuration
from fwd import settings
from fwd.ledger import Ledger
from fwd.lifecycle import RESTART_ONLY, StartupReport
from fwd.limits import Limiter
from fwd.listeners import listen_now, parse_endpoint, sockets_per_worker
from fwd.metrics import MetricsService
from fwd.quota import budgets_of
from fwd.quota_line import QuotaServer
from fwd.restarts import RestartBackoff
from fwd.shared import SharedState
from fwd.transcripts.line import TranscriptLine, adopt
from fwd.transcripts.service import transcript_service

log = Logger(namespace="fwd.workers")

STATUS_NAMESPACE = "fwd.status"
ENV_FDS = "FWD_WORKER_FDS"
ENV_TRANSCRIPTS = "FWD_WORKER_TRANSCRIPTS"
TRANSCRIPTS_FD = 3
CONTROL_FD = 4


def control_message(sources: settings.Sources) -> bytes:
    """One line on a worker's control line: the configuration sources to serve."""
    return json.dumps({"sources": sources.to_json()}).encode() + b"\n"


class WorkerProtocol(protocol.ProcessProtocol):
    """One worker as the supervisor sees it: its log lines in, its exit out."""

    def __init__(self, supervisor: Supervisor, number: int):
        self.supervisor = supervisor
        self.number = number
        self.buffer = b""
        self.started = supervisor.clock.seconds()
        self.ended = defer.Deferred()
        self.line_closed: defer.Deferred | None = None
        self.control = None

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


class ControlLine(LineOnlyReceiver):
    """The supervisor's end of one worker's control line: configurations out, limit questions in and answered
    (fwd.quota_line)."""

    delimiter = b"\n"
    MAX_LENGTH = 1024 * 1024

    def __init__(self, quota: QuotaServer):
        self.quota = quota

    def lineReceived(self, line: bytes) -> None:
        try:
            message = orjson.loads(line)
            answer = self.quota.handle(self, message)
        except (ValueError, KeyError, TypeError):
            log.error("ignoring a control line from a worker that is not a limits message")
            return
        if answer is not None:
            self.transport.write(answer)

    def lineLengthExceeded(self, line):
        log.error("a worker sent an over-long control line; ignoring it")

    def connectionLost(self, reason=None):
        self.quota.worker_gone(self)


class Supervisor(service.MultiService):
    """Binds the listening sockets and keeps N workers serving them with the last good configuration.

    Its children (the transcript writer, the usage ledger) serve the workers: they start before the first
    worker and stop after the last has ended, so nothing a worker sends at its end is lost."""

    def __init__(self, sources: settings.Sources, config: configuration.Config, reactor, transcripts=None):
        super().__init__()
        self.sources = sources
        self.config = config
        self.transcripts = transcripts
        self.reactor = reactor
        self.clock = reactor
        # Per --port, in order: one Twisted port the workers share, or a list of sockets, one per worker.
        self.ports: list = []
        self.workers: dict[int, WorkerProtocol] = {}
        self.backoffs: dict[int, RestartBackoff] = {}
        self.statuses: dict[int, dict] = {}
        self.stopping = False
        self.previous_hup = None
        self.endpoints = [
            (description, parse_endpoint(reactor, description, config.tls_ciphers)) for description in config.ports
        ]
        self.limiter = Limiter(reactor)
        self.quota = QuotaServer(self.limiter)
        self.ledger: Ledger | None = None
        if transcripts is not None:
            transcripts.setServiceParent(self)
        self.shared = None
        if config.redis is not None:
            # The workers share limits and key states through Redis themselves; this one adds up their usage.
            self.shared = SharedState(config.redis, reactor, config.redis_timeout, config.redis_failure)
            self.shared.setServiceParent(self)
        if config.usage:
            self.ledger = Ledger(config.data_dir, reactor, self.limiter, lambda: budgets_of(self.config), self.shared)
            self.ledger.check()
            self.ledger.setServiceParent(self)

    def privilegedStartService(self):
        super().privilegedStartService()
        self.previous_hup = signal.signal(signal.SIGHUP, self._hangup)
        placeholder = protocol.Factory.forProtocol(protocol.Protocol)
        placeholder.noisy = False
        for description, endpoint in self.endpoints:
            own = sockets_per_worker(description, self.config.workers)
            if own is not None:
                self.ports.append(own)
                log.info("{count} sockets of {description}, one per worker, starting on {port}", count=len(own),
                         description=description, port=own[0].getsockname()[1])
                continue
            port = listen_now(endpoint, placeholder, description)
            port.stopReading()  # the workers accept on it, not this process
            self.ports.append(port)

    def startService(self):
        super().startService()
        for number in range(1, self.config.workers + 1):
            self.spawn(number)

    def spawn(self, number: int) -> None:
        if self.stopping:
            return
        fds = [port[number - 1].fileno() if isinstance(port, list) else port.fileno() for port in self.ports]
        env = dict(os.environ)
        env[ENV_FDS] = ",".join(map(str, fds))
        child_fds = {0: "w", 1: "r", 2: "r"}
        child_fds.update({fd: fd for fd in fds})
        worker = WorkerProtocol(self, number)
        self.workers[number] = worker
        control_ours, control_theirs = socket.socketpair()
        child_fds[CONTROL_FD] = control_theirs.fileno()
        ours = theirs = None
        if self.transcripts is not None:
            ours, theirs = socket.socketpair()
            child_fds[TRANSCRIPTS_FD] = theirs.fileno()
            env[ENV_TRANSCRIPTS] = str(TRANSCRIPTS_FD)
        try:
            self.reactor.spawnProcess(
                worker, sys.executable, [sys.executable, "-m", "fwd.worker"], env=env, path=os.getcwd(), childFDs=child_fds
            )
            worker.control = ControlLine(self.quota)
            adopt(self.reactor, control_ours.fileno(), worker.control)
            worker.control.transport.write(control_message(self.sources))
            if ours is not None:
                line = TranscriptLine(receive=self.transcripts.send)
                adopt(self.reactor, ours.fileno(), line)
                worker.line_closed = line.closed
        finally:
            for end in (control_ours, control_theirs, ours, theirs):
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
        if event.get("log_namespace") == STATUS_NAMESPACE:
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
        backoff = self.backoffs.setdefault(number, RestartBackoff())
        delay = backoff.next_delay(self.clock.seconds() - worker.started)
        log.warn(
            "worker {number} exited ({why}); starting it again in {delay:g} s",
            number=number, why=reason.value, delay=delay,
        )
        self.reactor.callLater(delay, self.spawn, number)

    def _hangup(self, signum, frame):
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Re-read the configuration; on success every worker gets it, on failure nobody does."""
        old = self.sources
        try:
            sources = settings.read_sources(old.cli, config_file=old.config_file, dotenv_path=old.dotenv_path)
            config = configuration.from_sources(sources)
        except configuration.ConfigError as problem:
            log.error("reload refused, the running configuration stays: {problem}", problem=str(problem))
            return False
        changed = [name for name in RESTART_ONLY if getattr(config, name) != getattr(self.config, name)]
        if changed:
            log.warn("reload: {names} change only on restart", names=", ".join(changed))
        self.sources = sources
        self.config = attrs.evolve(config, **{name: getattr(self.config, name) for name in RESTART_ONLY})
        if self.ledger is not None:
            self.ledger.reseed()
        message = control_message(sources)
        for worker in list(self.workers.values()):
            if worker.control is not None and worker.control.transport is not None:
                worker.control.transport.write(message)
        log.info("reloaded the configuration; sent to {count} workers", count=len(self.workers))
        for line in configuration.describe(config):
            log.info("{line}", line=line)
        return True

    def signal_workers(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(signum)
            except Exception:
                pass

    def status(self) -> dict:
        """The workers' latest reports, added up for /metrics."""
        total = {"in_flight": 0, "streams": 0, "sessions": 0, "keys": []}
        redis = []
        for status in self.statuses.values():
            total["in_flight"] += status.get("in_flight", 0)
            total["streams"] += status.get("streams", 0)
            total["sessions"] += status.get("sessions", 0)
            total["keys"] += [tuple(k) for k in status.get("keys", [])]
            total.setdefault("upstreams", []).extend(tuple(u) for u in status.get("upstreams", []))
            if status.get("redis"):
                redis.append(status["redis"])
            if status.get("cache"):
                held = total.setdefault("cache", {"entries": 0, "bytes": 0})
                held["entries"] += status["cache"]["entries"]
                held["bytes"] += status["cache"]["bytes"]
        if self.shared is not None:
            redis.append(self.shared.status())
            total["redis"] = {"up": all(r["up"] for r in redis), "failures": sum(r["failures"] for r in redis)}
        return total

    def stopService(self):
        service.Service.stopService(self)
        self.stopping = True
        if self.previous_hup is not None:
            signal.signal(signal.SIGHUP, self.previous_hup)
        # A worker is done when it has exited and its last transcripts have arrived.
        ended = [w.ended for w in self.workers.values()] + [
            w.line_closed for w in self.workers.values() if w.line_closed is not None
        ]
        self.signal_workers(signal.SIGTERM)
        for port in self.ports:
            if isinstance(port, list):
                for listening in port:
                    listening.close()
            else:
                port.stopListening()
        grace = self.config.grace_period + 5
        done = defer.DeferredList(ended)
        done.addTimeout(grace, self.clock).addErrback(lambda _: self.signal_workers(signal.SIGKILL))
        # Then the transcript writer and the ledger, with everything the workers sent.
        return done.addCallback(lambda _: service.MultiService.stopService(self))


def build_supervisor(sources: settings.Sources, config: configuration.Config, reactor=None):
    """The supervisor's services: the workers, plus the transcript writer and /metrics they share."""
    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    transcripts = transcript_service(config.log_chat, config.log_dir, reactor)
    supervisor = Supervisor(sources, config, reactor, transcripts)
    supervisor.setServiceParent(top)
    if config.metrics_port:
        MetricsService(config.metrics_port, supervisor.status, transcripts, reactor, config.tls_ciphers).setServiceParent(top)
    StartupReport(config).setServiceParent(top)
    return top

"""One worker process of --workers (`python -m fwd.worker`), started by the supervisor in fwd.workers.
Tests: tests/test_workers.py

It serves the listening sockets it inherits with the configuration its supervisor sends on the control line
(fd 4): the first line before it starts, each later line on a reload.  It never reads a configuration file.
The same line carries its limit questions and their answers (fwd.quota_line).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import orjson
from twisted.internet import defer, task
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from fwd import config as configuration
from fwd import settings
from fwd.quota_line import SupervisorQuota
from fwd.transcripts.events import transcript_publisher
from fwd.transcripts.line import TranscriptLine, adopt
from fwd.transcripts.sender import FrameSender
from fwd.workers import CONTROL_FD, ENV_FDS, ENV_TRANSCRIPTS, STATUS_NAMESPACE

log = Logger(namespace="fwd.worker")

STATUS_INTERVAL = 5.0
CONTROL_LINE_LIMIT = 64 * 1024 * 1024


def read_first_line(fd: int) -> bytes:
    """Block until the supervisor's first control line has arrived (before the reactor runs)."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("openai-forward worker: the supervisor closed the control line before configuring it")
        data += chunk
    line, _, rest = data.partition(b"\n")
    if rest:
        raise SystemExit("openai-forward worker: unexpected data after the first control line")
    return line


def sources_of(line: bytes) -> settings.Sources:
    return settings.Sources.from_json(json.loads(line)["sources"])


class ControlLine(LineOnlyReceiver):
    """The worker's end of its control line: configurations to serve from now on (a reload), and the
    supervisor's answers on the limits (fwd.quota_line), which the worker's limit questions go out on."""

    delimiter = b"\n"
    MAX_LENGTH = CONTROL_LINE_LIMIT

    def __init__(self, reloader):
        self.reloader = reloader
        self.quota = SupervisorQuota(self.send)

    def send(self, line: bytes) -> None:
        self.transport.write(line)

    def lineReceived(self, line: bytes) -> None:
        try:
            message = orjson.loads(line)
            if "sources" not in message:
                self.quota.answer(message)
                return
            sources = settings.Sources.from_json(message["sources"])
        except (ValueError, KeyError, TypeError):
            log.error("ignoring a control line that is neither a configuration nor a limits answer")
            return
        self.reloader.load = lambda: configuration.from_sources(sources)
        self.reloader.reload()

    def connectionLost(self, reason=None):
        self.quota.line_lost()


def run_worker() -> None:
    """Entry point of one worker process, started by the Supervisor."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    from fwd.daemon import build_service

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from the supervisor, configured
    to_supervisor = jsonFileLogObserver(sys.stdout, recordSeparator="")
    globalLogBeginner.beginLoggingTo([to_supervisor], redirectStandardIO=False)
    sources = sources_of(read_first_line(CONTROL_FD))
    line = None
    if os.environ.get(ENV_TRANSCRIPTS):
        fd = int(os.environ[ENV_TRANSCRIPTS])
        sender = FrameSender(reactor)
        transcript_publisher.addObserver(sender)
        line = TranscriptLine(sender=sender)
        adopt(reactor, fd, line)
        os.close(fd)
    fds = [int(fd) for fd in os.environ[ENV_FDS].split(",") if fd]
    try:
        config = configuration.from_sources(sources)
    except configuration.ConfigError as problem:
        raise SystemExit(f"openai-forward worker: {problem}") from None
    top = build_service(config, reactor, inherited=fds)
    control = ControlLine(top.reloader)
    if config.redis is None:
        top.gateway.quota = control.quota  # the supervisor decides on the limits, for every worker at once
    adopt(reactor, CONTROL_FD, control)
    os.close(CONTROL_FD)
    status_log = Logger(namespace=STATUS_NAMESPACE)
    gateway = top.gateway
    task.LoopingCall(lambda: status_log.info("", status=gateway.status())).start(STATUS_INTERVAL)
    stopping = []

    def stop_once() -> None:
        # A worker is told to stop twice when both the supervisor and whoever signals its whole process group
        # do (systemd by default and `timeout` send SIGTERM, a terminal's Ctrl-C SIGINT): stopping a reactor
        # that stops already is an error.
        if not stopping:
            stopping.append(True)
            try:
                reactor.stop()
            except ReactorNotRunning:  # a signal that came before ours were in place stopped it already
                pass

    def on_signal(signum, frame) -> None:
        reactor.callFromThread(stop_once)

    def take_signals() -> None:  # after the reactor has put its own handlers in place
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, on_signal)

    reactor.callWhenRunning(take_signals)
    parent = os.getppid()
    task.LoopingCall(lambda: os.getppid() != parent and stop_once()).start(1.0, now=False)
    top.startService()

    def stop():
        # Drain first: exchanges ending meanwhile still send their transcripts, then the line closes.
        stopped = defer.maybeDeferred(top.stopService)
        return stopped.addBoth(lambda _: line.close()) if line is not None else stopped

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()


if __name__ == "__main__":
    run_worker()

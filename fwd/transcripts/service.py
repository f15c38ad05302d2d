"""The transcript service: keeps the transcript writer process running while the daemon runs, and sends it
every transcript event (and every frame a worker of --workers passes on).  Tests: tests/test_chatlog.py

Building a record (parsing the request, assembling a stream, encoding JSON) costs more than forwarding a
small request, so the serving process only frames what it relayed (see fwd.transcripts.frames) and the writer
(`python -m fwd.transcripts.writer`) builds and appends the records.
"""

from __future__ import annotations

import os
import sys
import tempfile

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger, LogPublisher, eventFromJSON, globalLogPublisher

from fwd.restarts import RestartBackoff
from fwd.transcripts.events import transcript_publisher
from fwd.transcripts.sender import FrameSender
from fwd.transcripts.writer import (
    MAX_ROTATED,
    ROTATE_LENGTH,
    TRANSCRIPT_FILENAME,
    write_frames,
)

STOP_TIMEOUT = 30.0

_log = Logger(namespace="fwd.transcripts")


def check_log_dir(path: str) -> str | None:
    """Create LOG_DIR if missing and prove it writable; return a one-line problem, or None when fine."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"LOG_DIR {path} is not a directory"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"LOG_DIR {path} cannot be created: {e.strerror or e}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"LOG_DIR {path} is not writable: {e.strerror or e}"
    return None


class TranscriptService(service.Service):
    """Writes transcripts to DIRECTORY/chat.jsonl through a transcript writer process while the daemon runs."""

    def __init__(
        self,
        directory: str,
        reactor,
        rotate_length: int = ROTATE_LENGTH,
        max_rotated: int = MAX_ROTATED,
        publisher: LogPublisher | None = None,
        clock=None,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.rotate_length = rotate_length
        self.max_rotated = max_rotated
        self.publisher = transcript_publisher if publisher is None else publisher
        self.sender = FrameSender(self.clock)
        self.writer: WriterProcess | None = None
        self.writer_errors = 0
        self.backoff = RestartBackoff()
        self.restart = None
        self.stopping = False

    @property
    def write_errors(self) -> int:
        """Records lost so far: dropped on the way, or failed in the writer."""
        return self.sender.dropped + self.writer_errors

    def send(self, frame: bytes) -> None:
        """Pass on a frame from a worker."""
        self.sender.send(frame)

    def startService(self) -> None:
        """Start the writer process and observe transcript events."""
        self.stopping = False
        self._spawn()
        self.publisher.addObserver(self.sender)
        super().startService()

    def _spawn(self) -> None:
        self.restart = None
        if self.stopping:
            return
        writer = WriterProcess(self)
        args = [
            sys.executable, "-m", "fwd.transcripts.writer", self.directory, str(self.rotate_length), str(self.max_rotated),
        ]
        try:
            self.reactor.spawnProcess(writer, sys.executable, args, env=dict(os.environ), path=os.getcwd())
        except Exception as e:
            _log.error("cannot start the transcript writer: {why}", why=str(e))
            self._schedule_restart(0.0)

    def writer_started(self, writer: WriterProcess) -> None:
        self.writer = writer
        self.sender.attach(writer.transport)
        _log.info(
            "transcript writer started (pid {pid}), writing {path}",
            pid=writer.transport.pid,
            path=os.path.join(self.directory, TRANSCRIPT_FILENAME),
        )

    def writer_ended(self, writer: WriterProcess, reason) -> None:
        if self.writer is writer:
            self.writer = None
            self.sender.detach()
        if self.stopping:
            return
        _log.warn("the transcript writer exited ({why}); starting it again", why=reason.value)
        self._schedule_restart(self.clock.seconds() - writer.started)

    def _schedule_restart(self, lived: float) -> None:
        self.restart = self.clock.callLater(self.backoff.next_delay(lived), self._spawn)

    def stopService(self):
        """Stop observing; let the writer finish what it was sent (or write what waits here) and close."""
        super().stopService()
        self.stopping = True
        self.publisher.removeObserver(self.sender)
        if self.restart is not None and self.restart.active():
            self.restart.cancel()
        self.restart = None
        self.sender.flush()
        writer = self.writer
        if writer is None:
            write_frames(self.directory, self.rotate_length, self.max_rotated, self.sender.take_waiting())
            return None
        writer.transport.closeStdin()
        timeout = self.clock.callLater(STOP_TIMEOUT, writer.transport.signalProcess, "KILL")
        return writer.ended.addBoth(lambda _: timeout.active() and timeout.cancel())


class WriterProcess(protocol.ProcessProtocol):
    """The transcript writer as the daemon sees it: frames out, its log events in, its exit."""

    def __init__(self, service: TranscriptService):
        self.service = service
        self.buffer = b""
        self.started = 0.0
        self.ended = defer.Deferred()

    def connectionMade(self) -> None:
        self.started = self.service.clock.seconds()
        self.service.writer_started(self)

    def outReceived(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        for line in lines:
            try:
                event = eventFromJSON(line.decode("utf-8", "replace"))
            except ValueError:
                continue
            if "transcript_write_errors" in event:
                self.service.writer_errors = event["transcript_write_errors"]
            if event.get("log_format"):
                globalLogPublisher(event)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            _log.warn("transcript writer: {line}", line=line)

    def processEnded(self, reason) -> None:
        self.service.writer_ended(self, reason)
        self.ended.callback(None)


def transcript_service(log_chat: bool, log_dir: str, reactor) -> TranscriptService | None:
    """The transcript service when LOG_CHAT is on; an unusable LOG_DIR stops startup with one line."""
    if not log_chat:
        return None
    from fwd.settings import ConfigError

    problem = check_log_dir(log_dir)
    if problem:
        raise ConfigError(problem)
    return TranscriptService(log_dir, reactor)

"""Transcripts on twisted.logger: one event per exchange, written to LOG_DIR/chat.jsonl by their own observer.

Transcripts travel on their own namespace and their own publisher, ``transcriptPublisher``, not the global
one: the main log (twistd's, text or JSON) never sees them and spends nothing on them.  Should transcript
events ever reach a general observer, ``notTranscripts`` filters them out.

An event carries the exchange's `Ended` transcript, not a finished record: parsing the request, assembling a
stream and encoding JSON cost more than forwarding a small request, so the daemon does them in a transcript
writer process (``python -m fwd.chatlog``).  ``TranscriptService`` starts it, observes the publisher and sends
it each exchange as a frame (see fwd.transcript): the request and response bytes as relayed.  The writer
builds the records and appends them to chat.jsonl, flushing after every batch it reads.  A worker of
``--workers`` sends its frames to the supervisor, which passes them to its one writer.  Without a reactor
(tests) the service writes in-process through ``TranscriptFile``.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    PredicateResult,
    eventFromJSON,
    globalLogPublisher,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from fwd.transcript import Ended, FrameError, FrameReader, encode_record, frame_line, record_frame

TRANSCRIPT_NAMESPACE = "fwd.transcript"
TRANSCRIPT_FILENAME = "chat.jsonl"
ROTATE_LENGTH = 50 * 1024 * 1024
MAX_ROTATED = 10
# Frames a stalled or restarting writer may owe before new ones are dropped (and counted).
MAX_BACKLOG = 64 * 1024 * 1024
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 60.0
STOP_TIMEOUT = 30.0

transcriptPublisher = LogPublisher()
transcriptLog = Logger(namespace=TRANSCRIPT_NAMESPACE, observer=transcriptPublisher)
_log = Logger(namespace="fwd.chatlog")


def emit(ended: Ended) -> None:
    """Publish one ended exchange as a single log event.

    Its format is empty, so even a text observer given it would write no line.  The event is built here and
    handed to the publisher as Logger.info would, minus its per-call work: this runs once per exchange.
    """
    transcriptPublisher(
        {
            "log_namespace": TRANSCRIPT_NAMESPACE,
            "log_level": LogLevel.info,
            "log_format": "",
            "log_time": time.time(),
            "log_source": None,
            "log_logger": transcriptLog,
            "transcript": ended,
            "transcript_uid": ended.transcript.uid,
        }
    )


def record_of(event: LogEvent) -> dict[str, Any] | None:
    """The record of a transcript event (an `Ended` exchange, or a record dict), or None for other events."""
    if event.get("log_namespace") != TRANSCRIPT_NAMESPACE:
        return None
    transcript = event.get("transcript")
    if isinstance(transcript, Ended):
        return transcript.record()
    return transcript if isinstance(transcript, dict) else None


def frame_of(event: LogEvent) -> bytes | None:
    """The frame a transcript writer gets for a transcript event, or None for other events."""
    if event.get("log_namespace") != TRANSCRIPT_NAMESPACE:
        return None
    transcript = event.get("transcript")
    if isinstance(transcript, Ended):
        return transcript.frame()
    return record_frame(encode_record(transcript)) if isinstance(transcript, dict) else None


def notTranscripts(event: LogEvent) -> PredicateResult:
    """Filter predicate for the main log observer: drop transcript events, let everything else through."""
    if event.get("log_namespace") == TRANSCRIPT_NAMESPACE:
        return PredicateResult.no
    return PredicateResult.maybe


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


@implementer(ILogObserver)
class TranscriptFile:
    """Appends transcript records to chat.jsonl as JSON lines, rotated by size.

    As a log observer it writes each transcript event's record.  Lines wait in memory until `flush`: with a
    clock, at the end of the reactor turn (one write for every exchange that ended in it); without one, at
    once.  The transcript writer process calls `add` and `flush` itself.
    """

    def __init__(
        self,
        directory: str,
        rotate_length: int = ROTATE_LENGTH,
        max_rotated: int = MAX_ROTATED,
        name: str = TRANSCRIPT_FILENAME,
        clock=None,
    ) -> None:
        # Opening happens here, at startup: a bad directory fails loudly now, never per record later.
        self._file = LogFile(name, directory, rotateLength=rotate_length, maxRotatedFiles=max_rotated)
        self.path = self._file.path
        self.written = 0
        self.write_errors = 0
        self._lines: list[bytes] = []
        self._clock = clock
        self._flush_pending = None

    def __call__(self, event: LogEvent) -> None:
        """Write the event's record if it is a transcript; ignore every other event."""
        try:
            record = record_of(event)
            if record is None:
                return
            self.add(encode_record(record))
        except Exception as e:
            self._failed(e)
            return
        if self._clock is None:
            self.flush()
        elif self._flush_pending is None:
            self._flush_pending = self._clock.callLater(0, self.flush)

    def add(self, line: bytes) -> None:
        """Queue one encoded record for the next flush."""
        self._lines.append(line)

    def add_frames(self, frames: list[bytes]) -> None:
        """Queue the records of frames from a serving process; one that cannot be built is logged and counted."""
        for frame in frames:
            try:
                self._lines.append(frame_line(frame))
            except Exception:
                _log.failure("a transcript could not be built")
                self.write_errors += 1

    def _failed(self, problem: Exception, count: int = 1) -> None:
        """Count failed records; say so in the main log the first time only."""
        self.write_errors += count
        if self.write_errors == count:
            _log.error(
                "cannot write transcripts to {path}: {problem}; further failures are only counted",
                path=self.path,
                problem=str(problem),
            )

    def flush(self) -> None:
        """Write the queued records (bytes, so LogFile's size count and rotation are in bytes)."""
        self._flush_pending = None
        lines, self._lines = self._lines, []
        if not lines:
            return
        try:
            self._file.write(b"\n".join(lines) + b"\n")
            self.written += len(lines)
        except Exception as e:
            self._failed(e, len(lines))

    def close(self) -> None:
        """Write what is queued and close the file (on service stop)."""
        self.flush()
        if not self._file.closed:
            self._file.close()


@implementer(IPushProducer)
class FrameSender:
    """Sends transcript events as frames to a transport: the writer's stdin, or a worker's line to its supervisor.

    As a log observer it frames each transcript event; the frames of one reactor turn go out in one write.
    Without a transport (the writer restarting) they wait here.  The transport pauses the sender when its
    buffer fills; past MAX_BACKLOG bytes owed, waiting or unsent, new frames are dropped and counted.
    """

    def __init__(self, clock) -> None:
        self.clock = clock
        self.transport = None
        self.outgoing: list[bytes] = []
        self.flush_call = None
        self.paused = False
        self.sent_while_paused = 0
        self.waiting: list[bytes] = []
        self.waiting_size = 0
        self.dropped = 0

    def __call__(self, event: LogEvent) -> None:
        try:
            frame = frame_of(event)
        except Exception:
            _log.failure("a transcript could not be framed")
            self.dropped += 1
            return
        if frame is not None:
            self.send(frame)

    def send(self, frame: bytes) -> None:
        """Queue one frame; it goes out at the end of this reactor turn."""
        self.outgoing.append(frame)
        if self.flush_call is None:
            self.flush_call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Hand the queued frames to the transport, or keep them for the next one."""
        if self.flush_call is not None and self.flush_call.active():
            self.flush_call.cancel()
        self.flush_call = None
        frames, self.outgoing = self.outgoing, []
        if not frames:
            return
        data = b"".join(frames)
        transport = self.transport
        if transport is not None and not self.paused:
            transport.write(data)
            return
        owed = self.sent_while_paused if transport is not None else self.waiting_size
        if owed + len(data) > MAX_BACKLOG:
            before, self.dropped = self.dropped, self.dropped + len(frames)
            if before == 0 or before // 1000 != self.dropped // 1000:  # the first drop, then every thousandth
                _log.error(
                    "the transcript writer is {how}; {count} transcript(s) dropped so far",
                    how="not keeping up" if transport is not None else "not running",
                    count=self.dropped,
                )
        elif transport is not None:
            self.sent_while_paused += len(data)
            transport.write(data)
        else:
            self.waiting.append(data)
            self.waiting_size += len(data)

    def attach(self, transport) -> None:
        """Send to this transport from now on, starting with what waited."""
        self.transport = transport
        self.paused = False
        self.sent_while_paused = 0
        transport.registerProducer(self, True)
        waiting, self.waiting, self.waiting_size = self.waiting, [], 0
        for data in waiting:
            transport.write(data)

    def detach(self) -> None:
        """The transport is gone: keep frames until the next one."""
        self.transport = None

    def take_waiting(self) -> list[bytes]:
        """Frames that never reached a transport (to be written some other way), in order."""
        self.flush()
        waiting, self.waiting, self.waiting_size = self.waiting, [], 0
        return waiting

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.sent_while_paused = 0

    def stopProducing(self) -> None:
        pass


class TranscriptService(service.Service):
    """Writes transcripts to DIRECTORY/chat.jsonl while the daemon runs.

    With a reactor it keeps a transcript writer process running and sends it every transcript event, and every
    frame handed to `send` (from the workers of --workers); without one it writes in-process.
    """

    def __init__(
        self,
        directory: str,
        rotate_length: int = ROTATE_LENGTH,
        max_rotated: int = MAX_ROTATED,
        publisher: LogPublisher | None = None,
        clock=None,
        reactor=None,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.clock = clock if clock is not None else reactor
        self.reactor = reactor
        self.rotate_length = rotate_length
        self.max_rotated = max_rotated
        self.publisher = transcriptPublisher if publisher is None else publisher
        self.observer = None
        self.sender = FrameSender(self.clock) if reactor is not None else None
        self.writer: WriterProcess | None = None
        self.writer_errors = 0
        self.restart_delay = 0.0
        self.restart = None
        self.stopping = False

    @property
    def write_errors(self) -> int:
        """Records lost so far: dropped on the way, or failed in the writer."""
        if isinstance(self.observer, TranscriptFile):
            return self.observer.write_errors
        return (self.sender.dropped if self.sender is not None else 0) + self.writer_errors

    def send(self, frame: bytes) -> None:
        """Pass on a frame from a worker."""
        self.sender.send(frame)

    def startService(self) -> None:
        """Open the file, or start the writer process, and start observing."""
        self.stopping = False
        if self.reactor is None:
            self.observer = TranscriptFile(self.directory, self.rotate_length, self.max_rotated, clock=self.clock)
        else:
            self.observer = self.sender
            self._spawn()
        self.publisher.addObserver(self.observer)
        super().startService()

    def _spawn(self) -> None:
        self.restart = None
        if self.stopping:
            return
        writer = WriterProcess(self)
        args = [sys.executable, "-m", "fwd.chatlog", self.directory, str(self.rotate_length), str(self.max_rotated)]
        try:
            self.reactor.spawnProcess(writer, sys.executable, args, env=dict(os.environ), path=os.getcwd())
        except Exception as e:
            _log.error("cannot start the transcript writer: {why}", why=str(e))
            self._schedule_restart()

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
        if self.clock.seconds() - writer.started > STABLE_AFTER:
            self.restart_delay = 0.0
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        self.restart_delay = min(MAX_RESTART_DELAY, self.restart_delay * 2 or FIRST_RESTART_DELAY)
        self.restart = self.clock.callLater(self.restart_delay, self._spawn)

    def stopService(self):
        """Stop observing; let the writer finish what it was sent (or write what waits here) and close."""
        super().stopService()
        self.stopping = True
        if self.observer is not None:
            self.publisher.removeObserver(self.observer)
        if isinstance(self.observer, TranscriptFile):
            self.observer.close()
            self.observer = None
            return None
        self.observer = None
        if self.restart is not None and self.restart.active():
            self.restart.cancel()
        self.restart = None
        self.sender.flush()
        writer = self.writer
        if writer is None:
            self._write_here(self.sender.take_waiting())
            return None
        writer.transport.closeStdin()
        timeout = self.clock.callLater(STOP_TIMEOUT, writer.transport.signalProcess, "KILL")
        return writer.ended.addBoth(lambda _: timeout.active() and timeout.cancel())

    def _write_here(self, waiting: list[bytes]) -> None:
        """With no writer at shutdown, write what waits for one in this process."""
        if not waiting:
            return
        out = TranscriptFile(self.directory, self.rotate_length, self.max_rotated)
        reader = FrameReader()
        for data in waiting:
            out.add_frames(reader.feed(data))
        out.close()


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


def run_writer(directory: str, rotate_length: int, max_rotated: int) -> None:
    """The transcript writer process: frames on stdin, records appended to chat.jsonl, until stdin closes.

    It ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C on `twistd -n` or a closed terminal reaches the whole
    process group): it ends when the daemon closes its stdin, or dies, after writing everything it was sent.
    """
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout, recordSeparator="")], redirectStandardIO=False)
    status = Logger(namespace="fwd.chatlog.status")
    out = TranscriptFile(directory, rotate_length, max_rotated)
    reader = FrameReader()
    reported = 0
    broken = None
    while True:
        data = os.read(0, 1 << 20)
        if not data:
            break
        try:
            frames = reader.feed(data)
        except FrameError as e:
            frames = e.frames
            broken = str(e)
        out.add_frames(frames)
        out.flush()
        if out.write_errors != reported:
            reported = out.write_errors
            status.info("", transcript_write_errors=reported)
        if broken:
            _log.critical("transcript writer stopped: {why}", why=broken)
            out.close()
            sys.exit(1)
    out.close()
    if reader.pending:
        _log.error("the daemon closed the transcript pipe in the middle of a record")


if __name__ == "__main__":
    run_writer(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

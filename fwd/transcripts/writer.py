"""The transcript writer process (`python -m fwd.transcripts.writer DIR ROTATE MAX_ROTATED`): frames on stdin,
records appended to DIR/chat.jsonl, rotated by size.  Tests: tests/test_chatlog.py"""

from __future__ import annotations

import os
import signal
import sys

from twisted.logger import Logger
from twisted.python.logfile import LogFile

from fwd.transcripts.frames import FrameError, FrameReader, frame_line

TRANSCRIPT_FILENAME = "chat.jsonl"
ROTATE_LENGTH = 50 * 1024 * 1024
MAX_ROTATED = 10
# What one read of stdin takes: with the record limit, this bounds what the writer holds at a time.
READ_SIZE = 1 << 20

_log = Logger(namespace="fwd.transcripts")


class TranscriptFile:
    """Appends transcript records to chat.jsonl as JSON lines, rotated by size; lines queued by `add` and
    `add_frames` are written together by `flush`."""

    def __init__(
        self,
        directory: str,
        rotate_length: int = ROTATE_LENGTH,
        max_rotated: int = MAX_ROTATED,
        name: str = TRANSCRIPT_FILENAME,
    ) -> None:
        # Opening happens here, at startup: a bad directory fails loudly now, never per record later.
        self._file = LogFile(name, directory, rotateLength=rotate_length, maxRotatedFiles=max_rotated)
        self.path = self._file.path
        self.written = 0
        self.write_errors = 0
        self._lines: list[bytes] = []

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

    def _failed(self, problem: Exception, count: int) -> None:
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


def write_frames(directory: str, rotate_length: int, max_rotated: int, batches: list[bytes]) -> None:
    """Write what a serving process framed, here and now (a daemon stopping with no writer running)."""
    if not batches:
        return
    out = TranscriptFile(directory, rotate_length, max_rotated)
    reader = FrameReader()
    for data in batches:
        out.add_frames(reader.feed(data))
        out.flush()
    out.close()


def run_writer(directory: str, rotate_length: int, max_rotated: int) -> None:
    """The transcript writer process: frames on stdin, records appended to chat.jsonl, until stdin closes.

    It ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C on `twistd -n` or a closed terminal reaches the whole
    process group): it ends when the daemon closes its stdin, or dies, after writing everything it was sent.
    Each frame is bounded (the serving process sends at most the record limit of a request and 64 KiB of a
    stream), so the writer holds at most a read and a frame at a time.
    """
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout, recordSeparator="")], redirectStandardIO=False)
    status = Logger(namespace="fwd.transcripts.status")
    out = TranscriptFile(directory, rotate_length, max_rotated)
    reader = FrameReader()
    reported = 0
    broken = None
    while True:
        data = os.read(0, READ_SIZE)
        if not data:
            break
        try:
            frames = reader.feed(data)
        except FrameError as e:
            frames = e.frames
            broken = str(e)
        out.add_frames(frames)
        del frames
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

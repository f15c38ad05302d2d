"""Transcripts on twisted.logger: one event per exchange, written to LOG_DIR/chat.jsonl by their own observer.

Transcripts travel on their own namespace and their own publisher, ``transcriptPublisher``, not the global
one: the main log (twistd's, text or JSON) never sees them and spends nothing on them. ``TranscriptService``
adds a ``TranscriptFile`` observer to that publisher while it runs; a worker of ``--workers`` adds its pipe to
the supervisor instead. Should transcript events ever reach a general observer, ``notTranscripts`` filters
them out.
"""

from __future__ import annotations

import json
import time
import os
import tempfile
from typing import Any

import orjson
from twisted.application import service
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, LogPublisher, PredicateResult
from twisted.python.logfile import LogFile
from zope.interface import implementer

TRANSCRIPT_NAMESPACE = "fwd.transcript"
TRANSCRIPT_FILENAME = "chat.jsonl"

transcriptPublisher = LogPublisher()
transcriptLog = Logger(namespace=TRANSCRIPT_NAMESPACE, observer=transcriptPublisher)
_log = Logger(namespace="fwd.chatlog")


def emit(record: dict[str, Any]) -> None:
    """Publish one finished transcript record as a single log event.

    Its format is empty too, so even a text observer given it would write no line.  The event is built here
    and handed to the publisher as Logger.info would, minus its per-call work: this runs once per exchange.
    """
    transcriptPublisher(
        {
            "log_namespace": TRANSCRIPT_NAMESPACE,
            "log_level": LogLevel.info,
            "log_format": "",
            "log_time": time.time(),
            "log_source": None,
            "log_logger": transcriptLog,
            "transcript": record,
            "transcript_uid": record.get("uid"),
        }
    )


def encode_record(record: dict[str, Any]) -> bytes:
    """One record as a line of UTF-8 JSON: orjson, or the standard encoder for what orjson refuses (integers
    beyond 64 bits, non-string keys)."""
    try:
        return orjson.dumps(record, default=str)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8", "replace")


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
    """Log observer appending each transcript event as one JSON line, flushed per record, rotated by size."""

    def __init__(
        self,
        directory: str,
        rotate_length: int = 50 * 1024 * 1024,
        max_rotated: int = 10,
        name: str = TRANSCRIPT_FILENAME,
        clock=None,
    ) -> None:
        # Opening happens here, at startup: a bad directory fails loudly now, never per record later.
        self._file = LogFile(name, directory, rotateLength=rotate_length, maxRotatedFiles=max_rotated)
        self.path = self._file.path
        self.written = 0
        self.write_errors = 0
        # With a clock, records written in one reactor turn are flushed together at its end (one system
        # call for many exchanges under load); without one, each record is flushed as it is written.
        self._clock = clock
        self._flush_pending = None

    def __call__(self, event: LogEvent) -> None:
        """Write the event's record if it is a transcript; ignore every other event."""
        if event.get("log_namespace") != TRANSCRIPT_NAMESPACE:
            return
        record = event.get("transcript")
        if not isinstance(record, dict):
            return
        try:
            # Bytes, so LogFile's size count (and so rotation) is in bytes, not characters.
            self._file.write(encode_record(record) + b"\n")
            self.written += 1
            if self._clock is None:
                self._file.flush()
            elif self._flush_pending is None:
                self._flush_pending = self._clock.callLater(0, self.flush)
        except Exception as e:
            self._failed(e)

    def _failed(self, problem: Exception) -> None:
        """Count a failed write; say so in the main log the first time only."""
        self.write_errors += 1
        if self.write_errors == 1:
            _log.error(
                "cannot write transcripts to {path}: {problem}; further failures are only counted",
                path=self.path,
                problem=str(problem),
            )

    def flush(self) -> None:
        """Hand the records written so far to the operating system."""
        self._flush_pending = None
        try:
            self._file.flush()
        except Exception as e:
            self._failed(e)

    def close(self) -> None:
        """Close the file (on service stop)."""
        if not self._file.closed:
            self._file.close()


class TranscriptService(service.Service):
    """Writes transcripts to DIRECTORY/chat.jsonl while the daemon runs."""

    def __init__(
        self,
        directory: str,
        rotate_length: int = 50 * 1024 * 1024,
        max_rotated: int = 10,
        publisher: LogPublisher | None = None,
        clock=None,
    ) -> None:
        self.directory = directory
        self.clock = clock
        self.rotate_length = rotate_length
        self.max_rotated = max_rotated
        self.publisher = transcriptPublisher if publisher is None else publisher
        self.observer: TranscriptFile | None = None

    def startService(self) -> None:
        """Open the file and start observing."""
        self.observer = TranscriptFile(self.directory, self.rotate_length, self.max_rotated, clock=self.clock)
        self.publisher.addObserver(self.observer)
        super().startService()

    def stopService(self) -> None:
        """Stop observing and close the file."""
        super().stopService()
        if self.observer is not None:
            self.publisher.removeObserver(self.observer)
            self.observer.flush()
            self.observer.close()
            self.observer = None

"""Transcript events: one twisted.logger event per ended exchange, on their own namespace and publisher.

The request path emits here and nothing else: whoever writes transcripts (the TranscriptService, or a
worker's line to its supervisor) observes ``transcript_publisher``.  Transcripts never go through the global
publisher, so the main log (twistd's, text or JSON) never sees them and spends nothing on them.
Tests: tests/test_chatlog.py
"""

from __future__ import annotations

import time

from twisted.logger import Logger, LogLevel, LogPublisher

from fwd.transcripts.assembly import Ended

TRANSCRIPT_NAMESPACE = "fwd.transcript"

transcript_publisher = LogPublisher()
transcript_log = Logger(namespace=TRANSCRIPT_NAMESPACE, observer=transcript_publisher)


def emit(ended: Ended) -> None:
    """Publish one ended exchange as a single log event.

    Its format is empty, so even a text observer given it would write no line.  The event is built here and
    handed to the publisher as Logger.info would, minus its per-call work: this runs once per exchange.
    """
    transcript_publisher(
        {
            "log_namespace": TRANSCRIPT_NAMESPACE,
            "log_level": LogLevel.info,
            "log_format": "",
            "log_time": time.time(),
            "log_source": None,
            "log_logger": transcript_log,
            "transcript": ended,
            "transcript_uid": ended.transcript.uid,
        }
    )

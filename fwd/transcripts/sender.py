"""Sends transcript events as frames to whoever writes them: the transcript writer's stdin, or a worker's
line to its supervisor.  Tests: tests/test_chatlog.py"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.logger import LogEvent, Logger
from zope.interface import implementer

from fwd.transcripts.assembly import Ended
from fwd.transcripts.events import TRANSCRIPT_NAMESPACE
from fwd.transcripts.frames import ended_frame

# Frames a stalled or restarting writer may owe before new ones are dropped (and counted).
MAX_BACKLOG = 64 * 1024 * 1024

_log = Logger(namespace="fwd.transcripts")


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
        ended = event.get("transcript")
        if event.get("log_namespace") != TRANSCRIPT_NAMESPACE or not isinstance(ended, Ended):
            return
        try:
            frame = ended_frame(ended)
        except Exception:
            _log.failure("a transcript could not be framed")
            self.dropped += 1
            return
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

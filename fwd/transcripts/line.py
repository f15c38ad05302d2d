"""The socket that carries transcript frames from a worker of --workers to its supervisor, which passes them to
its one transcript writer.  Tests: tests/test_workers.py"""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol
from twisted.logger import Logger

from fwd.transcripts.frames import FrameError, FrameReader
from fwd.transcripts.sender import FrameSender

_log = Logger(namespace="fwd.transcripts")


class TranscriptLine(protocol.Protocol):
    """One end of the line.  In the supervisor it cuts what arrives into whole frames (so two workers' frames
    never interleave) for `receive`; in a worker, a FrameSender writes to it."""

    def __init__(self, receive=None, sender: FrameSender | None = None):
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
            _log.error("dropping a worker's transcript line: {why}", why=str(e))
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


def adopt(reactor, fd: int, proto: protocol.Protocol) -> None:
    """Make one end of a socket pair a connection of this reactor (it keeps its own copy of fd)."""
    factory = protocol.Factory.forProtocol(lambda: proto)
    factory.noisy = False
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, factory)

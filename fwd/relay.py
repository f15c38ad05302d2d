"""Relaying an upstream response body to the client as it arrives, with the client's backpressure.
Tests: tests/test_forward.py"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IWriteDescriptor
from twisted.internet.protocol import Protocol
from twisted.web.http import HTTPChannel
from zope.interface import implementer


def abort(request) -> None:
    """Break the client's connection so a truncated answer never looks complete."""
    channel = request.channel
    if channel is None:
        return
    abort_stream = getattr(channel, "abortConnection", None)
    if abort_stream is not None:
        abort_stream()
    elif channel.transport is not None:
        transport = channel.transport
        if IWriteDescriptor.providedBy(transport):
            # Hand the kernel what was already relayed: a reset discards anything still in our buffer,
            # and the client should see the partial answer, then the break.
            transport.doWrite()
        transport.abortConnection()


class Discard(Protocol):
    """Reads and drops a response body so its connection can go back to the pool."""

    def connectionLost(self, reason):
        pass


class Collect(Protocol):
    """Reads a short response body (an error) into memory, keeping at most `limit` bytes of it."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done = defer.Deferred()

    def dataReceived(self, data):
        if self.size < self.limit:
            self.parts.append(data[: self.limit - self.size])
        self.size += len(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.parts))


@implementer(IPushProducer)
class Relay(Protocol):
    """Streams an upstream response body to the client as it arrives.  It is the client request's producer and
    passes pauses on to the upstream transport, so a client that reads slowly pauses the upstream instead of
    filling memory.  IDLE_TIMEOUT bounds both silences: an upstream that sends nothing, and a client that reads
    nothing (it is disconnected; its upstream stays paused meanwhile, costing nothing)."""

    def __init__(self, exchange):
        self.exchange = exchange
        self.request = exchange.request
        self.transcript = exchange.transcript
        self.timed_out = False
        self.idle = None
        self.seconds = exchange.clock.seconds
        self.progress = 0.0  # when the body last moved toward a reading client
        self.paused = False
        self.send = self._first_write
        masker = exchange.masker
        self.masker = masker if masker is not None and masker.keys else None
        self.metering = exchange.metering
        self.capture = exchange.capture
        self.meter = None  # each chunk goes through it, when the answer is metered (set once it has started)

    def connectionMade(self):
        exchange = self.exchange
        if exchange.client_gone:
            self.transport.stopProducing()
            return
        self.request.registerProducer(self, True)
        self.idle_timeout = exchange.config.idle_timeout
        self.progress = self.seconds()
        self.idle = exchange.clock.callLater(self.idle_timeout, self._silent)
        if self.metering is not None:
            self.meter = self.metering.chunk_filter()

    def dataReceived(self, data):
        exchange = self.exchange
        if exchange.client_gone:
            return
        if not self.paused:  # bytes a paused upstream still delivers are no progress for a client not reading
            # The idle timer is not moved for every chunk: it looks at this time when it fires (see _silent).
            self.progress = self.seconds()
        if self.meter is not None:
            data = self.meter(data)
        if self.masker is not None:
            data = self.masker.feed(data)
        if not data:
            return
        self.send(data)
        exchange.sent += len(data)
        if self.transcript is not None:
            self.transcript.feed(data)
        if self.capture is not None:
            self.capture.feed(data)

    def _first_write(self, data: bytes) -> None:
        """The first write sends the headers; later ones can skip twisted.web's per-write bookkeeping."""
        request = self.request
        request.write(data)
        channel = request.channel
        if not isinstance(channel, HTTPChannel) or request.method == b"HEAD" or channel.transport is None:
            self.send = request.write
        elif request.chunked:
            write = channel.transport.write
            self.send = lambda data: write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.send = channel.transport.write

    def flush(self) -> None:
        """Send what the metering and the masker still hold (the body ended)."""
        if self.exchange.client_gone:
            return
        rest = self.metering.close() if self.metering is not None else b""
        if self.masker is not None:
            rest = self.masker.feed(rest) + self.masker.close()
        if rest:
            self.send(rest)
            self.exchange.sent += len(rest)
            if self.transcript is not None:
                self.transcript.feed(rest)
            if self.capture is not None:
                self.capture.feed(rest)

    def connectionLost(self, reason):
        if self.idle is not None and self.idle.active():
            self.idle.cancel()
        self.idle = None  # the timer points back here, through its call
        self.exchange.body_done(reason)

    def _silent(self):
        """Nothing was relayed for IDLE_TIMEOUT: the client read nothing (we are paused), or the upstream
        sent nothing.  The timer is set once, not moved by every chunk (moving it was a fifth of the relay's own
        work per chunk: 0.6 µs against 0.48, measured alone): when it fires after progress, it is set again for
        what is left."""
        left = self.progress + self.idle_timeout - self.seconds()
        if left > 0:
            self.idle = self.exchange.clock.callLater(left, self._silent)
            return
        if self.paused:
            self.exchange.client_stalled()
            return
        self.timed_out = True
        self.stop()

    # IPushProducer: the client's side pauses and resumes us; the upstream socket follows.

    def pauseProducing(self):
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self):
        self.paused = False
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self):
        self.stop()

    def stop(self):
        """Stop reading the upstream body and close its connection."""
        if self.idle is not None and self.idle.active():
            self.idle.cancel()
        if self.transport is not None:
            self.transport.stopProducing()

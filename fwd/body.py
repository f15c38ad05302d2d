"""A request body as the proxy keeps it: in memory while small, in one temporary file past that, and sent
upstream again for each attempt.  Tests: tests/test_body.py

twisted.web makes a temporary file for every body of unknown or large length as soon as its head arrives, so a
thousand unfinished uploads cost a thousand open files.  Here a body costs a file only once it holds more than
SPOOL_AT bytes, or once the bodies held in memory by the whole process pass MEMORY_BUDGET.
"""

from __future__ import annotations

import mmap
import os
import tempfile

from twisted.internet import defer, task
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

SPOOL_AT = 1024 * 1024
MEMORY_BUDGET = 64 * 1024 * 1024
READ_SIZE = 64 * 1024


class MemoryBudget:
    """Bytes of request bodies held in memory by this process, across requests."""

    def __init__(self, limit: int = MEMORY_BUDGET) -> None:
        self.limit = limit
        self.used = 0


SHARED_BUDGET = MemoryBudget()


class RequestBody:
    """A file-like body (write, seek, read, tell) that spools to disk past a threshold.

    twisted.web and code written for it read `request.content` as a file; this is one, so the forwarding
    resource works the same under the daemon's Site and under a plain twisted.web Site.
    """

    def __init__(self, spool_at: int = SPOOL_AT, budget: MemoryBudget = SHARED_BUDGET) -> None:
        self.spool_at = spool_at
        self.budget = budget
        self.size = 0
        self._parts: list[bytes] = []
        self._file = None
        self._position = 0
        self._held = 0
        self.closed = False

    @property
    def spooled(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        self._position = self.size
        if self._file is None:
            budget = self.budget
            if self.size <= self.spool_at and budget.used + len(data) <= budget.limit:
                self._parts.append(data)
                self._held += len(data)
                budget.used += len(data)
                return
            self._spool()
        self._file.seek(0, os.SEEK_END)
        self._file.write(data)

    def _spool(self) -> None:
        """Move what is held in memory to a new temporary file (unlinked at once: one descriptor, no name)."""
        self._file = tempfile.TemporaryFile(prefix="fwd-body-")
        for part in self._parts:
            self._file.write(part)
        self._release()

    def _release(self) -> None:
        if self._held:
            self.budget.used -= self._held
            self._held = 0
        self._parts = []

    def getvalue(self) -> bytes:
        """The whole body in memory (a spooled body is read back: callers check `size` first)."""
        if self._file is None:
            if len(self._parts) > 1:
                self._parts = [b"".join(self._parts)]
            return self._parts[0] if self._parts else b""
        self._file.seek(0)
        return self._file.read()

    def view(self):
        """The body as a bytes-like object supporting find and slicing, without reading a spooled file
        into memory (a read-only memory map of it)."""
        if self._file is None or self.size == 0:
            return self.getvalue()
        self._file.flush()
        return mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def head(self, size: int) -> bytes:
        """The first `size` bytes."""
        if self._file is None:
            return self.getvalue()[:size]
        self._file.seek(0)
        return self._file.read(size)

    # -- the file interface twisted.web's Request.content offers ----------------------------------------

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._position = offset
        elif whence == os.SEEK_CUR:
            self._position += offset
        else:
            self._position = self.size + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        if self._file is not None:
            self._file.seek(self._position)
            data = self._file.read(size)
        else:
            value = self.getvalue()
            end = len(value) if size is None or size < 0 else self._position + size
            data = value[self._position : end]
        self._position += len(data)
        return data

    def close(self) -> None:
        """Give back the memory or the file."""
        if self.closed:
            return
        self.closed = True
        self._release()
        if self._file is not None:
            self._file.close()
            self._file = None


def body_producer(content, cooperator: task.Cooperator) -> IBodyProducer:
    """An IBodyProducer sending a request body upstream: in one write when it is in memory, else read from
    its file in pieces, one per slice of `cooperator`, with the upstream's backpressure.  `content` is a
    RequestBody or any file-like body (twisted.web's BytesIO or temporary file)."""
    if isinstance(content, RequestBody):
        if not content.spooled:
            return BytesProducer(content.getvalue())
        return FileProducer(content, content.size, cooperator)
    content.seek(0, os.SEEK_END)
    length = content.tell()
    if length <= SPOOL_AT:
        content.seek(0)
        return BytesProducer(content.read())
    return FileProducer(content, length, cooperator)


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, body: bytes):
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        body, self.body = self.body, b""  # the transport has it now; each attempt gets a producer of its own
        consumer.write(body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IBodyProducer)
class FileProducer:
    """A request body in a file, written in READ_SIZE pieces, one per reactor turn, from its start each time
    it is produced (a replay on the next key sends it again)."""

    def __init__(self, content, length: int, cooperator: task.Cooperator):
        self.content = content
        self.length = length
        self.cooperator = cooperator
        self._task = None
        self._paused = False

    def startProducing(self, consumer):
        content = self.content
        content.seek(0)

        def pieces():
            sent = 0
            while sent < self.length:
                content.seek(sent)
                data = content.read(min(READ_SIZE, self.length - sent))
                if not data:
                    break
                sent += len(data)
                consumer.write(data)
                yield None

        self._task = self.cooperator.cooperate(pieces())
        if self._paused:
            self._task.pause()
        return self._task.whenDone().addCallback(lambda _: None)

    # A transport may ask to pause before producing starts, or to resume what it never paused (one whose last
    # producer it unregistered while paused, as a pooled connection after an answer that came before the whole
    # body was sent): the producer keeps its own state and asks the task only for a real change.
    def pauseProducing(self):
        if self._paused:
            return
        self._paused = True
        if self._task is not None:
            try:
                self._task.pause()
            except task.TaskDone:
                pass

    def resumeProducing(self):
        if not self._paused:
            return
        self._paused = False
        if self._task is not None:
            try:
                self._task.resume()
            except (task.TaskDone, task.NotPaused):
                pass

    def stopProducing(self):
        if self._task is not None:
            try:
                self._task.stop()
            except task.TaskDone:
                pass

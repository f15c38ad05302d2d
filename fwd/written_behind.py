"""A SQLite file written behind the request path: what the daemon keeps in memory is written every FLUSH_SECONDS
by one thread of its own, and once more when the service stops.  The usage ledger (fwd.ledger) and the response
cache's file (fwd.cache_store.CacheFile) are both one.  Tests: tests/test_ledger.py, tests/test_cache.py
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.python.threadpool import ThreadPool

FLUSH_SECONDS = 1.0


class WrittenBehind(service.Service):
    """Subclasses say what `flush` writes (handing the work to `in_thread`); this keeps the thread, the timer and
    the connection, and stops them after the last flush."""

    def __init__(self, reactor, thread_name: str):
        self.clock = reactor
        self.pool = ThreadPool(1, 1, name=thread_name)
        self.flusher = task.LoopingCall(self.flush)
        self.flusher.clock = reactor
        self.connection: sqlite3.Connection | None = None
        self.write_errors = 0

    def flush(self) -> defer.Deferred | None:
        """Write what is waiting (None when nothing is)."""
        raise NotImplementedError

    def start_writing(self, connection: sqlite3.Connection) -> None:
        """Write to `connection` from now on, a flush every FLUSH_SECONDS."""
        self.connection = connection
        self.pool.start()
        self.flusher.start(FLUSH_SECONDS, now=False)

    def in_thread(self, write: Callable, *args) -> defer.Deferred:
        """Run `write(*args)` in the writing thread."""
        return threads.deferToThreadPool(self.clock, self.pool, write, *args)

    def stopService(self):
        super().stopService()
        if self.flusher.running:
            self.flusher.stop()
        done = self.flush()

        def close(_=None):
            if self.pool.started:
                self.pool.stop()
            if self.connection is not None:
                self.connection.close()
                self.connection = None

        if done is None:
            close()
            return None
        return done.addBoth(close)


def transaction(connection: sqlite3.Connection, work: Callable[[sqlite3.Connection], None]) -> None:
    """Run `work` on a connection opened with isolation_level=None as one transaction."""
    connection.execute("BEGIN")
    try:
        work(connection)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")

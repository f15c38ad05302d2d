"""Where cached answers live: in memory (bounded in bytes, least recently used out), written behind to SQLite
in DATA_DIR so they survive a restart, or in Redis when instances share state.  Tests: tests/test_cache_store.py

Nothing on the request path waits on a disk: the memory store answers, and the file is read once at start and
written by its own thread every second.  A Redis lookup has the shared state's deadline; while Redis is away
the memory store stands in.
"""

from __future__ import annotations

import os
import sqlite3
from collections import OrderedDict

from twisted.logger import Logger

from fwd.cache import Entry
from fwd.written_behind import WrittenBehind, transaction

log = Logger(namespace="fwd.cache")

CACHE_FILENAME = "cache.sqlite"
REDIS_PREFIX = "fwd:cache:"
# No one answer may take more than this share of the store: one huge answer would push out everything else.
LARGEST_SHARE = 4


class MemoryStore:
    """Entries by key, each until it expires, at most `max_bytes` in all (the least recently used go first)."""

    def __init__(self, max_bytes: int, clock):
        self.max_bytes = max_bytes
        self.clock = clock
        self.entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        self.bytes = 0
        self.evicted: list[str] = []  # keys dropped since the file last took them (fwd.cache_store.CacheFile)

    def get(self, key: str) -> Entry | None:
        found = self.entries.get(key)
        if found is None:
            return None
        entry, expires = found
        if self.clock.seconds() >= expires:
            self.drop(key)
            return None
        self.entries.move_to_end(key)
        return entry

    def fits(self, entry: Entry) -> bool:
        return entry.size <= self.max_bytes // LARGEST_SHARE

    def put(self, key: str, entry: Entry, ttl: float) -> bool:
        """Keep an entry for `ttl` seconds; False when it is too large to keep."""
        return self.keep(key, entry, self.clock.seconds() + ttl)

    def keep(self, key: str, entry: Entry, expires: float) -> bool:
        """Keep an entry until `expires` (a clock time); False when it is too large to keep."""
        if not self.fits(entry):
            return False
        self.drop(key, evicted=False)
        self.entries[key] = (entry, expires)
        self.bytes += entry.size
        while self.bytes > self.max_bytes:
            old, (dropped, _) = self.entries.popitem(last=False)
            self.bytes -= dropped.size
            self.evicted.append(old)
        return True

    def drop(self, key: str, evicted: bool = True) -> None:
        found = self.entries.pop(key, None)
        if found is not None:
            self.bytes -= found[0].size
            if evicted:
                self.evicted.append(key)

    def __len__(self) -> int:
        return len(self.entries)


class CacheFile(WrittenBehind):
    """DATA_DIR/cache.sqlite: loaded into the memory store at start, then written behind it by one thread."""

    def __init__(self, directory: str, memory: MemoryStore, reactor):
        super().__init__(reactor, "fwd-cache")
        self.path = os.path.join(directory, CACHE_FILENAME)
        self.directory = directory
        self.memory = memory
        self.pending: dict[str, tuple[bytes, float]] = {}

    def _connect(self) -> sqlite3.Connection:
        # Every tenant's answers are in it: readable by the daemon's user alone (SQLite's -wal and -shm files
        # take the database file's mode).
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, expires REAL NOT NULL, "
                           "value BLOB NOT NULL)")
        return connection

    def check(self) -> None:
        """Make sure DATA_DIR can hold the cache: if not, startup stops with one line."""
        from fwd.settings import ConfigError

        try:
            os.makedirs(self.directory, exist_ok=True)
            self._connect().close()
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"DATA_DIR {self.directory} cannot hold the response cache: {e}") from None

    def load(self) -> int:
        """Fill the memory store with the file's live entries, the most recently stored last; how many."""
        now = self.clock.seconds()
        loaded = 0
        connection = self._connect()
        try:
            rows = connection.execute("SELECT key, expires, value FROM entries WHERE expires > ? ORDER BY rowid",
                                      (now,))
            for key, expires, value in rows:
                entry = Entry.decode(bytes(value))
                if entry is not None and self.memory.keep(key, entry, expires):
                    loaded += 1
        finally:
            connection.close()
        self.memory.evicted.clear()
        return loaded

    def stored(self, key: str, entry: Entry, expires: float) -> None:
        self.pending[key] = (entry.encode(), expires)

    def startService(self):
        super().startService()
        try:
            loaded = self.load()
        except sqlite3.Error as e:
            log.error("cannot read the response cache {path}: {why}; starting empty", path=self.path, why=str(e))
            loaded = 0
        if loaded:
            log.info("response cache: {count} entries loaded from {path}", count=loaded, path=self.path)
        self.start_writing(self._connect())

    def flush(self):
        """Write what was stored and forget what was dropped since the last flush, in the file's thread."""
        if self.connection is None or not (self.pending or self.memory.evicted):
            return None
        puts, drops = self.take()
        now = self.clock.seconds()

        def failed(reason):
            self.write_errors += 1
            if self.write_errors == 1:
                log.error("cannot write the response cache {path}: {why}", path=self.path, why=reason.getErrorMessage())

        return self.in_thread(self._write, puts, drops, now).addErrback(failed)

    def take(self) -> tuple[list, list]:
        """The rows to write and the keys to delete since the last take: what the memory store holds now decides
        (an entry stored and then dropped within one flush is deleted; dropped and stored again, written)."""
        held = self.memory.entries
        puts = [(key, expires, value) for key, (value, expires) in self.pending.items() if key in held]
        drops = [(key,) for key in dict.fromkeys(self.memory.evicted) if key not in held]
        self.pending = {}
        self.memory.evicted = []
        return puts, drops

    def _write(self, puts, drops, now) -> None:
        def work(connection):
            connection.executemany("INSERT OR REPLACE INTO entries (key, expires, value) VALUES (?, ?, ?)", puts)
            connection.executemany("DELETE FROM entries WHERE key = ?", drops)
            connection.execute("DELETE FROM entries WHERE expires <= ?", (now,))

        transaction(self.connection, work)


class RedisStore:
    """Entries in Redis under fwd:cache:<key>, with their TTL; the memory store stands in while Redis is away."""

    def __init__(self, shared, memory: MemoryStore):
        self.shared = shared
        self.memory = memory

    def get(self, key: str):
        """The entry (or None), or a Deferred of it."""
        if not self.shared.up:
            return self.memory.get(key)
        return self.shared.command("get", REDIS_PREFIX + key).addCallbacks(_entry, lambda _: None)

    def put(self, key: str, entry: Entry, ttl: float) -> bool:
        if not self.memory.fits(entry):
            return False
        if not self.shared.up:
            return self.memory.put(key, entry, ttl)
        self.shared.command("set", REDIS_PREFIX + key, entry.encode(), None, max(1, int(ttl * 1000))).addErrback(
            lambda _: None
        )
        return True


def _entry(value) -> Entry | None:
    if value is None:
        return None
    if isinstance(value, str):  # the client decodes what is valid UTF-8
        value = value.encode("utf-8", "surrogateescape")
    return Entry.decode(value)


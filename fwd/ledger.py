"""The usage ledger: tokens and requests by day, caller, route and model, kept in SQLite under DATA_DIR.
Tests: tests/test_ledger.py

The ledger observes the access events of forwarded requests (fwd.exchange adds the usage to them where it was
counted: fwd.metering), adds them up in memory and writes them every second from one thread of its own (fwd.written_behind): no request ever
waits on the disk, and a `kill -9` loses at most about a second of counts.  Budgets are kept in it too: a
budget's spend in its current period is the sum of its caller's rows since the period began, read at startup
(and for a budget a reload adds) to seed the limiter (fwd.limits.Limiter.seed).  It lives where the limiter
does: in the daemon, or in the supervisor of --workers, which republishes its workers' access events.

`openai-forward usage` reads the same file (fwd.usage_report).
"""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timezone

from twisted.logger import ILogObserver, Logger, globalLogPublisher
from zope.interface import implementer

from fwd.answers import ACCESS_NAMESPACE
from fwd.limits import Spend, period_start
from fwd.written_behind import WrittenBehind, transaction

LEDGER_FILENAME = "usage.sqlite"
MAX_MODEL_LENGTH = 128

log = Logger(namespace="fwd.ledger")

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    caller TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    estimated_tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    cached INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, caller, route, model)
)
"""
ADD = """
INSERT INTO usage (day, caller, route, model, requests, input_tokens, output_tokens, estimated_tokens, cost, cached)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, caller, route, model) DO UPDATE SET
    requests = requests + excluded.requests,
    input_tokens = input_tokens + excluded.input_tokens,
    output_tokens = output_tokens + excluded.output_tokens,
    estimated_tokens = estimated_tokens + excluded.estimated_tokens,
    cost = cost + excluded.cost,
    cached = cached + excluded.cached
"""
# A ledger written before the response cache counted its hits gets the column.
MIGRATIONS = ("ALTER TABLE usage ADD COLUMN cached INTEGER NOT NULL DEFAULT 0",)


def utc_day(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%d")


def connect(path: str) -> sqlite3.Connection:
    """The ledger file, made if missing; WAL, so `openai-forward usage` reads while the daemon writes."""
    connection = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(SCHEMA)
    columns = {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
    if "cached" not in columns:
        for statement in MIGRATIONS:
            connection.execute(statement)
    return connection


def spent_since(connection: sqlite3.Connection, route: str, caller: str, since: float) -> Spend:
    """What a caller of a route spent from `since` (the start of a budget period) on: tokens and cost."""
    row = connection.execute(
        "SELECT COALESCE(SUM(input_tokens + output_tokens), 0), COALESCE(SUM(cost), 0) FROM usage "
        "WHERE route = ? AND caller = ? AND day >= ?",
        (route, caller, utc_day(since)),
    ).fetchone()
    return Spend(int(row[0]), float(row[1]))


def merge(counts: dict, rows: list[tuple]) -> None:
    """Add ledger rows to counts kept by (day, caller, route, model)."""
    for day, caller, route, model, *values in rows:
        row = counts.setdefault((day, caller, route, model), [0, 0, 0, 0, 0.0, 0])
        for index, value in enumerate(values):
            row[index] += value


@implementer(ILogObserver)
class Ledger(WrittenBehind):
    """Adds up counted usage and writes it to DATA_DIR/usage.sqlite, off the request path."""

    def __init__(self, directory: str, reactor, limiter=None, budgets=lambda: (), shared=None,
                 publisher=globalLogPublisher):
        """`reactor` runs the flushes (and the writing thread); `limiter` (a fwd.limits.Limiter) is seeded at
        start and by `reseed` with the spend of `budgets()` (fwd.quota.budgets_of of the running config);
        `shared` (fwd.shared.SharedState), when instances share state, gets the counts too, for
        `openai-forward usage --redis-url`."""
        super().__init__(reactor, "fwd-ledger")
        self.directory = directory
        self.path = os.path.join(directory, LEDGER_FILENAME)
        self.limiter = limiter
        self.budgets = budgets
        self.publisher = publisher
        self.shared = shared
        self.pending: dict[tuple[str, str, str, str], list] = {}
        self.unshared: dict[tuple[str, str, str, str], list] = {}
        self._day = ""
        self._day_ends = 0.0

    def check(self) -> None:
        """Make sure DATA_DIR can hold the ledger (made if missing): if not, startup stops with one line."""
        from fwd.settings import ConfigError

        try:
            os.makedirs(self.directory, exist_ok=True)
            connect(self.path).close()
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"DATA_DIR {self.directory} cannot hold the usage ledger: {e}") from None

    def reseed(self) -> int:
        """Seed the limiter for the budgets it does not follow yet (after a reload added some)."""
        if self.limiter is None:
            return 0
        return self.seed(self.limiter, self.budgets())

    def seed(self, limiter, budgets) -> int:
        """Give the limiter what each budget has spent in its current period, for the budgets it does not follow
        in that period yet (`budgets`: (id, route, caller, rule), fwd.quota.budgets_of): what is written plus
        what is counted but not written yet.  How many it seeded."""
        now = self.clock.seconds()
        seeded = 0
        reading = connect(self.path)
        try:
            for budget_id, route, caller, rule in budgets:
                since = period_start(now, rule.period)
                spent = spent_since(reading, route, caller, since) + self.unwritten(route, caller, since)
                seeded += limiter.seed(budget_id, rule.period, spent)
        finally:
            reading.close()
        return seeded

    def unwritten(self, route: str, caller: str, since: float) -> Spend:
        """What a caller of a route spent from `since` on that the next flush has still to write."""
        first = utc_day(since)
        tokens, cost = 0, 0.0
        for (day, who, where, _model), row in self.pending.items():
            if who == caller and where == route and day >= first:
                tokens += row[1] + row[2]
                cost += row[4]
        return Spend(tokens, cost)

    def startService(self):
        super().startService()
        self.check()
        self.start_writing(connect(self.path))
        self.reseed()
        self.publisher.addObserver(self)

    def __call__(self, event) -> None:
        """Count one forwarded request's access event, with its usage when it was counted."""
        if event.get("log_namespace") != ACCESS_NAMESPACE or not event.get("upstream"):
            return
        model = event.get("model", "-")
        if type(model) is not str or not model:
            model = "-"
        elif len(model) > MAX_MODEL_LENGTH:
            model = "other"  # a client names the model: a name longer than any real one is not kept
        now = self.clock.seconds()
        if now >= self._day_ends:
            self._day = utc_day(now)
            self._day_ends = (now // 86400 + 1) * 86400
        key = (self._day, event["caller"], event["route"], model)
        row = self.pending.get(key)
        if row is None:
            row = self.pending[key] = [0, 0, 0, 0, 0.0, 0]
        row[0] += 1
        if event.get("cached"):
            row[5] += 1  # answered by the response cache: no tokens
            return
        tokens_in = event.get("input_tokens")
        if tokens_in is None:
            return
        tokens_out = event["output_tokens"]
        row[1] += tokens_in
        row[2] += tokens_out
        if event["estimated"]:
            row[3] += tokens_in + tokens_out
        cost = event["cost"]
        if cost:
            row[4] += cost

    def flush(self):
        """Write what was counted since the last flush, in the ledger's own thread (and to Redis)."""
        if not self.pending or self.connection is None:
            return None
        rows = self.take()
        if self.shared is not None:
            self.share(rows)

        def failed(reason):
            # Nothing is lost: the rows are counted again with what comes next, and written when the disk allows.
            merge(self.pending, rows)
            self.write_errors += 1
            if self.write_errors == 1:
                log.error("cannot write the usage ledger {path}: {why}; keeping the counts to write later",
                          path=self.path, why=reason.getErrorMessage())

        return self.in_thread(self.write, rows).addErrback(failed)

    def share(self, rows: list[tuple]) -> None:
        """Add rows to the usage counts in Redis; what Redis cannot take now is kept for the next flush."""
        from fwd.redis_scripts import usage_call
        from fwd.shared import RedisUnavailable

        if self.unshared:
            merge(self.unshared, rows)
            rows = [(*key, *values) for key, values in self.unshared.items()]
            self.unshared = {}
        keys, args = usage_call(rows)

        def kept(reason):
            reason.trap(RedisUnavailable)
            merge(self.unshared, rows)

        self.shared.run("usage", keys, args).addErrback(kept)

    def take(self) -> list[tuple]:
        """The rows counted since the last take, as `write` adds them."""
        rows = [(*key, *values) for key, values in self.pending.items()]
        self.pending = {}
        return rows

    def write(self, rows: list[tuple]) -> None:
        """Add rows to the file in one transaction (the ledger's thread calls this)."""
        transaction(self.connection, lambda connection: connection.executemany(ADD, rows))

    def stopService(self):
        self.publisher.removeObserver(self)
        return super().stopService()

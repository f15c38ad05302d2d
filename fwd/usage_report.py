"""`openai-forward usage`: tokens, requests and cost from the usage ledger (DATA_DIR/usage.sqlite), or from the
Redis that several instances share (`--redis-url`: every instance's counts), as a table or JSON.
Tests: tests/test_ledger.py, tests/test_redis_e2e.py

Rows are grouped by any of day, caller (the forward key's name), route and model; callers are names, never keys.
It reads while the daemon writes (the ledger is in WAL mode), and never changes the file or Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from datetime import date, timedelta

from fwd.ledger import LEDGER_FILENAME, utc_day

GROUPS = ("day", "caller", "route", "model")
DEFAULT_GROUPS = ("day", "caller", "model")
COUNTS = ("requests", "cached", "input_tokens", "output_tokens", "estimated_tokens", "cost")


def parse_groups(text: str) -> tuple[str, ...]:
    groups = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise argparse.ArgumentTypeError(f"--by takes a comma-separated list of {', '.join(GROUPS)}")
    return tuple(dict.fromkeys(groups))


def query(
    connection: sqlite3.Connection, groups: tuple[str, ...], first_day: str, last_day: str, caller: str | None = None
) -> list[dict]:
    """The ledger's rows from `first_day` to `last_day` (inclusive, YYYY-MM-DD, UTC) added up by `groups`."""
    columns = ", ".join(groups)
    where = "day >= ? AND day <= ?"
    params: list = [first_day, last_day]
    if caller is not None:
        where += " AND caller = ?"
        params.append(caller)
    sums = ", ".join(f"SUM({name})" for name in COUNTS)
    rows = connection.execute(
        f"SELECT {columns}, {sums} FROM usage WHERE {where} GROUP BY {columns} ORDER BY {columns}", params
    ).fetchall()
    out = []
    for row in rows:
        record = dict(zip(groups, row[: len(groups)]))
        for name, value in zip(COUNTS, row[len(groups) :]):
            record[name] = round(value, 6) if name == "cost" else int(value)
        out.append(record)
    return out


def totals(rows: list[dict]) -> dict:
    return {name: sum(row[name] for row in rows) for name in COUNTS}


def table(rows: list[dict], groups: tuple[str, ...], priced: bool) -> str:
    """The rows as an aligned text table with a total line."""
    counts = [name for name in COUNTS if name != "cost" or priced]
    heads = [*groups, "requests", "cached", "input", "output", "estimated", *(["cost $"] if priced else [])]
    lines = []
    for row in [*rows, {**dict.fromkeys(groups, ""), **totals(rows), groups[0]: "total"}]:
        cells = [str(row[g]) for g in groups]
        cells += [f"{row[name]:.4f}" if name == "cost" else str(row[name]) for name in counts]
        lines.append(cells)
    widths = [max(len(head), *(len(line[i]) for line in lines)) for i, head in enumerate(heads)]
    aligned = []
    for cells in [heads, *lines[:-1], ["-" * w for w in widths], lines[-1]]:
        left = [cell.ljust(w) for cell, w in zip(cells[: len(groups)], widths)]
        right = [cell.rjust(w) for cell, w in zip(cells[len(groups) :], widths[len(groups) :])]
        aligned.append("  ".join(left + right).rstrip())
    return "\n".join(aligned) + "\n"


def days_between(first_day: str, last_day: str) -> list[str]:
    """Every day from the first to the last, as YYYY-MM-DD (at most the days Redis keeps)."""
    from fwd.redis_scripts import USAGE_DAYS

    first, last = date.fromisoformat(first_day), date.fromisoformat(last_day)
    return [(first + timedelta(days=n)).isoformat() for n in range(min((last - first).days + 1, USAGE_DAYS))]


def from_redis(url: str, first_day: str, last_day: str, timeout: float = 10.0) -> sqlite3.Connection:
    """The usage counts of every instance, day by day from Redis, in an in-memory ledger to query."""
    import txredisapi
    from twisted.internet import defer, reactor, ssl

    from fwd.ledger import ADD, SCHEMA
    from fwd.redis_scripts import PREFIX, usage_rows
    from fwd.settings import Raw, parse_redis_url

    target = parse_redis_url(Raw(url, "--redis-url"))
    found: list = []
    problems: list = []

    async def read():
        connection = await txredisapi.Connection(
            host=target.host, port=target.port, dbid=target.db, password=target.password, username=target.username,
            reconnect=False, connectTimeout=timeout, replyTimeout=timeout, convertNumbers=False,
            ssl_context_factory=ssl.optionsForClientTLS(target.host) if target.tls else False,
        )
        try:
            for day in days_between(first_day, last_day):
                found.extend(usage_rows(day, await connection.hgetall(f"{PREFIX}usage:{day}")))
        finally:
            await connection.disconnect()

    done = defer.ensureDeferred(read())
    done.addErrback(problems.append)
    done.addBoth(lambda _: reactor.stop())
    reactor.run()
    if problems:
        raise RuntimeError(problems[0].getErrorMessage())
    ledger = sqlite3.connect(":memory:")
    ledger.execute(SCHEMA)
    ledger.executemany(ADD, found)
    return ledger


def data_dir_of(args) -> str:
    """--data-dir, else DATA_DIR as the daemon reads it (environment, .env, --config)."""
    if args.data_dir:
        return args.data_dir
    from fwd import config as configuration

    return configuration.load({}, config_file=args.config).data_dir


def main_usage(argv: list[str], now: float | None = None) -> int:
    """Command line for usage (argv after the word `usage`); returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="openai-forward usage",
        description="Tokens and requests by caller, model and day, from the usage ledger in DATA_DIR.",
    )
    parser.add_argument("--data-dir", help="the daemon's DATA_DIR (default: as the daemon reads it, else ./Data)")
    parser.add_argument("--config", help="the daemon's TOML config, to read DATA_DIR from")
    parser.add_argument("--days", type=int, default=30, help="the last N days, today included (default 30)")
    parser.add_argument("--since", help="from this UTC day on (YYYY-MM-DD), in place of --days")
    parser.add_argument("--until", help="up to this UTC day (YYYY-MM-DD; default today)")
    parser.add_argument("--by", type=parse_groups, default=DEFAULT_GROUPS,
                        help=f"group by these, comma-separated: {','.join(GROUPS)} (default {','.join(DEFAULT_GROUPS)})")
    parser.add_argument("--caller", help="only this forward key's name")
    parser.add_argument("--redis-url", help="read the counts of every instance from this Redis (REDIS_URL)")
    parser.add_argument("--json", action="store_true", help="print JSON: the rows and their totals")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    now = time.time() if now is None else now
    if args.days < 1:
        print("openai-forward usage: --days must be at least 1", file=sys.stderr)
        return 2
    last_day = args.until or utc_day(now)
    first_day = args.since or utc_day(now - (args.days - 1) * 86400)
    for day in (first_day, last_day):
        try:
            time.strptime(day, "%Y-%m-%d")
        except ValueError:
            print(f"openai-forward usage: {day!r} is not a day written YYYY-MM-DD", file=sys.stderr)
            return 2
    if args.redis_url:
        try:
            rows = query(from_redis(args.redis_url, first_day, last_day), args.by, first_day, last_day, args.caller)
        except Exception as e:  # a bad URL, or Redis that does not answer
            print(f"openai-forward usage: cannot read the usage counts in Redis: {e}", file=sys.stderr)
            return 1
    else:
        try:
            directory = data_dir_of(args)
        except Exception as e:  # a ConfigError: the config that names DATA_DIR does not load
            print(f"openai-forward usage: {e}", file=sys.stderr)
            return 2
        path = os.path.join(directory, LEDGER_FILENAME)
        if not os.path.isfile(path):
            print(f"openai-forward usage: no usage ledger at {path} (is usage counted? see USAGE and DATA_DIR)",
                  file=sys.stderr)
            return 1
        try:
            connection = sqlite3.connect(path, timeout=5)
            try:
                rows = query(connection, args.by, first_day, last_day, args.caller)
            finally:
                connection.close()
        except sqlite3.Error as e:
            print(f"openai-forward usage: cannot read {path}: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"from": first_day, "to": last_day, "by": list(args.by), "rows": rows, "total": totals(rows)},
                         indent=2))
        return 0
    priced = any(row["cost"] for row in rows)
    print(f"usage from {first_day} to {last_day} (UTC)")
    print(table(rows, args.by, priced), end="")
    return 0

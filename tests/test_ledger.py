"""The usage ledger (what it counts, writes and seeds budgets with) and `openai-forward usage`."""

import json
import sqlite3

import pytest
from twisted.internet.task import Clock

from fwd import config
from fwd.ledger import LEDGER_FILENAME, Ledger, connect, spent_since
from fwd.limits import BudgetCharge, BudgetRule, Demand, Limiter, Refusal, Spend, Ticket
from fwd.metrics import Metrics
from fwd.quota import budget_id, budgets_of
from fwd.usage_report import main_usage
from tests.support.memory import MemoryProxy, split_response
from tests.test_quota import ALICE, Events, chat, proxy_with, request

DAY = 86_400
# 2026-11-30 10:00 UTC
NOW = 20_787 * DAY + 10 * 3600


def event(caller="alice", model="gpt-4o-mini", route="/", tokens=(3, 4), estimated=False, cost=None, **extra):
    out = {"log_namespace": "fwd.access", "upstream": True, "caller": caller, "route": route, "model": model,
           "status": 200, **extra}
    if tokens is not None:
        out.update(input_tokens=tokens[0], output_tokens=tokens[1], estimated=estimated, cost=cost)
    return out


def ledger_at(tmp_path, when=NOW, **kwargs) -> tuple[Ledger, Clock]:
    clock = Clock()
    clock.advance(when)
    ledger = Ledger(str(tmp_path / "data"), clock, **kwargs)
    ledger.check()
    ledger.connection = connect(ledger.path)
    return ledger, clock


def rows(ledger) -> list[tuple]:
    return ledger.connection.execute("SELECT * FROM usage ORDER BY day, caller, model").fetchall()


def test_forwarded_requests_add_up_by_day_caller_route_and_model(tmp_path):
    ledger, clock = ledger_at(tmp_path)
    ledger(event())
    ledger(event(tokens=(10, 0), estimated=True))
    ledger(event(model="gpt-4o", tokens=(1, 1), cost=0.25))
    ledger(event(caller="bob", tokens=None, model=None))  # forwarded, no usage counted (a GET, say)
    ledger({"log_namespace": "fwd.access", "upstream": False, "caller": "alice", "status": 429, "limit": "rate"})
    ledger({"log_namespace": "fwd.other", "upstream": True, "input_tokens": 99})
    ledger.write(ledger.take())
    clock.advance(DAY)
    ledger(event())
    ledger.write(ledger.take())
    assert rows(ledger) == [
        ("2026-11-30", "alice", "/", "gpt-4o", 1, 1, 1, 0, 0.25, 0),
        ("2026-11-30", "alice", "/", "gpt-4o-mini", 2, 13, 4, 10, 0.0, 0),
        ("2026-11-30", "bob", "/", "-", 1, 0, 0, 0, 0.0, 0),
        ("2026-12-01", "alice", "/", "gpt-4o-mini", 1, 3, 4, 0, 0.0, 0),
    ]
    assert ledger.take() == [], "what was taken is not written twice"


def test_writes_add_to_what_is_there_and_budgets_read_their_period(tmp_path):
    ledger, clock = ledger_at(tmp_path)
    for _ in range(3):
        ledger(event(tokens=(100, 50), cost=0.5))
        ledger.write(ledger.take())
    month = spent_since(ledger.connection, "/", "alice", NOW - 29 * DAY)
    assert month == Spend(450, 1.5)
    assert spent_since(ledger.connection, "/", "alice", NOW + DAY) == Spend(0, 0.0)
    assert spent_since(ledger.connection, "/", "bob", NOW - DAY) == Spend(0, 0.0)


def test_a_restarted_limiter_is_seeded_with_what_the_budget_spent_this_period(tmp_path):
    rule = BudgetRule(tokens=1000, period="day")
    budgets = [(budget_id("/", "alice"), "/", "alice", rule)]
    ledger, clock = ledger_at(tmp_path)
    ledger(event(tokens=(600, 300)))
    ledger.write(ledger.take())
    ledger(event(tokens=(50, 0)))  # counted, not written yet
    limiter = Limiter(clock)
    assert ledger.seed(limiter, budgets) == 1
    assert limiter.budget(budget_id("/", "alice"))[1] == Spend(950, 0.0)
    charge = BudgetCharge(budget_id("/", "alice"), rule, Spend(100))
    refusal = limiter.admit(Demand(budgets=[charge]))
    assert isinstance(refusal, Refusal) and refusal.reason == "budget" and "2026-12-01" in refusal.message
    assert ledger.seed(limiter, budgets) == 0, "a budget the limiter follows is left alone"
    clock.advance(DAY)
    assert ledger.seed(limiter, budgets) == 1, "a new period is seeded from its own (empty) spend"
    assert isinstance(limiter.admit(Demand(budgets=[charge])), Ticket)


def test_the_ledger_service_writes_every_second_and_everything_left_when_it_stops(tmp_path):
    clock = Clock()
    clock.advance(NOW)
    written = []
    ledger = Ledger(str(tmp_path / "data"), clock)
    ledger.pool = None
    ledger.flush = lambda: written.append(ledger.take()) if ledger.pending else None  # no thread on a Clock
    ledger.flusher.f = ledger.flush
    ledger.check()
    ledger.connection = connect(ledger.path)
    ledger.flusher.start(1.0, now=False)
    ledger(event())
    clock.advance(0.5)
    assert written == []
    clock.advance(0.6)
    assert len(written) == 1 and written[0][0][4:6] == (1, 3)
    clock.advance(1.0)
    assert len(written) == 1, "nothing new, nothing written"
    ledger.flusher.stop()


class ThreadedClock(Clock):
    """A Clock that takes results back from threads as a reactor would, run when the test says."""

    def __init__(self):
        super().__init__()
        self.from_threads = []

    def callFromThread(self, f, *args, **kwargs):
        self.from_threads.append((f, args, kwargs))

    def run_from_threads(self):
        while self.from_threads:
            f, args, kwargs = self.from_threads.pop(0)
            f(*args, **kwargs)


def test_the_ledger_writes_from_its_own_thread_and_stops_with_nothing_lost(tmp_path):
    from twisted.logger import LogPublisher

    clock = ThreadedClock()
    clock.advance(NOW)
    publisher = LogPublisher()
    ledger = Ledger(str(tmp_path / "data"), clock, publisher=publisher)
    ledger.startService()
    publisher(event(tokens=(5, 6)))
    clock.advance(1.0)  # the flush hands the rows to the ledger's thread
    publisher(event(tokens=(1, 1)))
    done = ledger.stopService()  # the rest, then the thread and the file close
    stopped = []
    done.addCallback(stopped.append)
    ledger.pool.stop()  # waits for the thread's work (the reactor thread would go on serving meanwhile)
    clock.run_from_threads()
    assert stopped and ledger.connection is None
    reading = sqlite3.connect(str(tmp_path / "data" / LEDGER_FILENAME))
    assert reading.execute("SELECT requests, input_tokens, output_tokens FROM usage").fetchall() == [(2, 6, 7)]
    publisher(event())
    assert ledger.pending == {}, "a stopped ledger counts nothing"


def test_an_unusable_data_dir_stops_startup_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(config.ConfigError, match="DATA_DIR .* cannot hold the usage ledger"):
        Ledger(str(blocker / "data"), Clock()).check()


def test_a_budget_needs_the_usage_store_and_same_named_keys_share_their_limits(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[[route]]\nbase_url = "http://u.test"\napi_keys = ["sk-x-00000000000000000001"]\n'
        'forward_keys = [{ key = "fk-a-000000000000000001", name = "a", budget = { tokens = 5, period = "day" } }]\n'
    )
    with pytest.raises(config.ConfigError, match="USAGE cannot be false with a budget"):
        config.load({"usage": "false"}, environ={}, dotenv_path=None, config_file=str(path))
    loaded = config.load({}, environ={}, dotenv_path=None, config_file=str(path))
    assert loaded.usage is True and [b[:3] for b in budgets_of(loaded)] == [("budget:/:a", "/", "a")]
    path.write_text(
        '[[route]]\nbase_url = "http://u.test"\napi_keys = ["sk-x-00000000000000000001"]\n'
        'forward_keys = [{ key = "fk-a-000000000000000001", name = "a", rpm = 5 },'
        ' { key = "fk-a-000000000000000002", name = "a", rpm = 6 }]\n'
    )
    with pytest.raises(config.ConfigError, match="share their limits"):
        config.load({}, environ={}, dotenv_path=None, config_file=str(path))


def test_usage_prints_a_table_by_day_caller_and_model_and_json_on_request(tmp_path, capsys):
    ledger, clock = ledger_at(tmp_path)
    ledger(event(tokens=(100, 20), cost=0.01))
    ledger(event(caller="bob", tokens=(7, 3), estimated=True))
    ledger.write(ledger.take())
    data = str(tmp_path / "data")
    assert main_usage(["--data-dir", data], now=NOW) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "usage from 2026-11-01 to 2026-11-30 (UTC)"
    assert lines[1].split() == ["day", "caller", "model", "requests", "cached", "input", "output", "estimated", "cost", "$"]
    assert lines[2].split() == ["2026-11-30", "alice", "gpt-4o-mini", "1", "0", "100", "20", "0", "0.0100"]
    assert lines[3].split() == ["2026-11-30", "bob", "gpt-4o-mini", "1", "0", "7", "3", "10", "0.0000"]
    assert lines[-1].split() == ["total", "2", "0", "107", "23", "10", "0.0100"]
    assert main_usage(["--data-dir", data, "--by", "caller", "--json"], now=NOW) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == [
        {"caller": "alice", "requests": 1, "input_tokens": 100, "output_tokens": 20, "estimated_tokens": 0, "cost": 0.01, "cached": 0},
        {"caller": "bob", "requests": 1, "input_tokens": 7, "output_tokens": 3, "estimated_tokens": 10, "cost": 0.0, "cached": 0},
    ]
    assert report["total"]["input_tokens"] == 107
    assert main_usage(["--data-dir", data, "--since", "2026-12-01", "--json"], now=NOW) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == []


def test_usage_says_what_is_wrong(tmp_path, capsys):
    assert main_usage(["--data-dir", str(tmp_path)], now=NOW) == 1
    assert "no usage ledger at" in capsys.readouterr().err
    assert main_usage(["--data-dir", str(tmp_path), "--by", "key"], now=NOW) == 2
    assert "--by takes" in capsys.readouterr().err
    assert main_usage(["--data-dir", str(tmp_path), "--since", "yesterday"], now=NOW) == 2
    assert "is not a day" in capsys.readouterr().err


def test_metrics_count_tokens_by_caller_model_and_kind_and_refusals_by_caller(tmp_path):
    proxy = proxy_with(tmp_path, 'rpm = "2/minute"')
    metrics = Metrics()
    with Events() as events:
        for _ in range(3):
            proxy.raw(request(ALICE, chat()))
    for seen in events.seen:
        metrics(seen)
    text = metrics.exposition().decode()
    assert 'fwd_tokens_total{caller="alice",kind="input",model="gpt-4o-mini"} 6.0' in text
    assert 'fwd_tokens_total{caller="alice",kind="output",model="gpt-4o-mini"} 8.0' in text
    assert 'fwd_limit_refusals_total{caller="alice",reason="rate"} 1.0' in text
    assert events.seen[-1]["route"] == "/" and events.seen[-1]["limit"] == "rate"
    assert ALICE not in text


def test_a_client_cannot_grow_the_metrics_with_model_names():
    metrics = Metrics()
    for number in range(1000):
        metrics(event(model=f"made-up-{number}"))
    text = metrics.exposition().decode()
    assert text.count("fwd_tokens_total{") == 2 * 257  # 256 names of their own, then "other"
    assert 'model="other"' in text


def test_a_transcript_carries_the_usage_counted_and_whether_it_was_estimated(tmp_path):
    from fwd.transcripts.events import transcript_publisher

    proxy = proxy_with(tmp_path, 'tpm = "100000/minute"', log_chat="true")
    ended = []
    transcript_publisher.addObserver(ended.append)
    try:
        split_response(proxy.raw(request(ALICE, chat(stream=True), b"x-fake-chunks: 3\r\n")).value())
    finally:
        transcript_publisher.removeObserver(ended.append)
    from fwd.transcripts.frames import ended_frame, frame_line

    finished = ended[-1]["transcript"]
    for record in (finished.record(), json.loads(frame_line(ended_frame(finished)))):  # here, and in the writer
        assert record["usage_estimated"] is False
        assert record["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, "it was stripped"
    assert plain_record()["usage_estimated"] is None, "usage is not counted without limits or USAGE"


def plain_record() -> dict:
    from fwd.transcripts.events import transcript_publisher

    proxy = MemoryProxy(log_chat="true", api_key="sk-pool-00000000000000000001")
    ended = []
    transcript_publisher.addObserver(ended.append)
    try:
        proxy.raw(request("sk-own-key-000000000001", chat()))
    finally:
        transcript_publisher.removeObserver(ended.append)
    return ended[-1]["transcript"].record()


def test_counts_a_write_could_not_take_are_kept_and_written_later(tmp_path):
    clock = ThreadedClock()
    clock.advance(NOW)
    ledger = Ledger(str(tmp_path / "data"), clock)
    ledger.check()
    ledger.connection = connect(ledger.path)
    write, ledger.write = ledger.write, lambda rows: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error"))
    ledger.pool.start()
    ledger(event(tokens=(5, 6)))
    ledger.flush()
    ledger(event(tokens=(1, 1)))
    ledger.pool.stop()
    clock.run_from_threads()
    assert ledger.write_errors == 1
    ledger.write = write
    write(ledger.take())
    assert rows(ledger) == [("2026-11-30", "alice", "/", "gpt-4o-mini", 2, 6, 7, 0, 0.0, 0)]


def test_cache_hits_are_requests_without_tokens_and_an_old_ledger_gains_the_column(tmp_path):
    import sqlite3

    (tmp_path / "data").mkdir()
    old = sqlite3.connect(tmp_path / "data" / "usage.sqlite")
    old.execute("CREATE TABLE usage (day TEXT NOT NULL, caller TEXT NOT NULL, route TEXT NOT NULL, model TEXT NOT NULL, "
                "requests INTEGER NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER "
                "NOT NULL DEFAULT 0, estimated_tokens INTEGER NOT NULL DEFAULT 0, cost REAL NOT NULL DEFAULT 0, "
                "PRIMARY KEY (day, caller, route, model))")
    old.execute("INSERT INTO usage VALUES ('2026-11-29', 'alice', '/', 'gpt-4o-mini', 1, 3, 4, 0, 0.0)")
    old.commit()
    old.close()
    ledger, _ = ledger_at(tmp_path)
    ledger(event())
    ledger({**event(tokens=(0, 0)), "cached": True})
    ledger.write(ledger.take())
    assert rows(ledger) == [
        ("2026-11-29", "alice", "/", "gpt-4o-mini", 1, 3, 4, 0, 0.0, 0),
        ("2026-11-30", "alice", "/", "gpt-4o-mini", 2, 3, 4, 0, 0.0, 1),
    ]

"""Tests for the transcript log observer and LOG_DIR checks."""

import json
import os

import pytest

from twisted.logger import FilteringLogObserver, LogPublisher, Logger, PredicateResult

from fwd import chatlog
from fwd.chatlog import TRANSCRIPT_NAMESPACE, TranscriptFile, check_log_dir, notTranscripts


def record(n, text="héllo"):
    return {"uid": f"u{n}", "response": {"content": text + "\nline two"}, "status": 200}


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_one_line_per_record_and_other_events_ignored(tmp_path):
    observer = TranscriptFile(str(tmp_path))
    publisher = LogPublisher(observer)
    log = Logger(namespace=TRANSCRIPT_NAMESPACE, observer=publisher)
    other = Logger(namespace="fwd.proxy", observer=publisher)
    log.info("transcript", transcript=record(1))
    other.info("request {path}", path="/v1/chat/completions", transcript=record(99))
    log.info("transcript", transcript=record(2))
    lines = read_lines(tmp_path / "chat.jsonl")
    assert [json.loads(line)["uid"] for line in lines] == ["u1", "u2"]
    assert "héllo" in lines[0]  # UTF-8, not \u escapes
    assert " " not in lines[0].replace("line two", "")  # compact separators
    observer.close()


def test_emit_reaches_the_file_but_not_the_filtered_main_log(tmp_path, monkeypatch):
    publisher = LogPublisher()
    monkeypatch.setattr(chatlog, "transcriptPublisher", publisher)
    main_events = []
    publisher.addObserver(FilteringLogObserver(main_events.append, [notTranscripts]))
    observer = TranscriptFile(str(tmp_path))
    publisher.addObserver(observer)
    chatlog.emit(record(1))
    Logger(namespace="fwd.proxy", observer=publisher).info("started")
    assert [json.loads(line)["uid"] for line in read_lines(tmp_path / "chat.jsonl")] == ["u1"]
    assert [e["log_namespace"] for e in main_events] == ["fwd.proxy"]
    observer.close()


def test_with_a_clock_records_of_one_reactor_turn_are_flushed_together_at_its_end(tmp_path):
    from twisted.internet.task import Clock

    clock = Clock()
    observer = TranscriptFile(str(tmp_path), clock=clock)
    for n in range(3):
        observer({"log_namespace": TRANSCRIPT_NAMESPACE, "transcript": record(n)})
    assert len(clock.getDelayedCalls()) == 1, "one flush for the whole turn"
    clock.advance(0)
    assert [json.loads(line)["uid"] for line in read_lines(tmp_path / "chat.jsonl")] == ["u0", "u1", "u2"]
    assert clock.getDelayedCalls() == []
    observer.close()


def test_not_transcripts_predicate():
    assert notTranscripts({"log_namespace": TRANSCRIPT_NAMESPACE}) == PredicateResult.no
    assert notTranscripts({"log_namespace": "fwd.chatlog"}) == PredicateResult.maybe


def test_rotation_by_size(tmp_path):
    observer = TranscriptFile(str(tmp_path), rotate_length=300, max_rotated=2)
    for n in range(30):
        observer({"log_namespace": TRANSCRIPT_NAMESPACE, "transcript": record(n, "x" * 40)})
    observer.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["chat.jsonl", "chat.jsonl.1", "chat.jsonl.2"]
    for name in names:
        assert os.path.getsize(tmp_path / name) < 300 + 100
        for line in read_lines(tmp_path / name):
            json.loads(line)  # rotation never splits a record
    assert json.loads(read_lines(tmp_path / "chat.jsonl")[-1])["uid"] == "u29"
    assert observer.written == 30


def test_write_error_is_counted_not_raised(tmp_path):
    observer = TranscriptFile(str(tmp_path))
    observer._file._file.close()  # the disk goes away under us
    errors = []
    publisher = LogPublisher(errors.append)
    original = chatlog._log
    chatlog._log = Logger(namespace="fwd.chatlog", observer=publisher)
    try:
        for n in range(3):
            observer({"log_namespace": TRANSCRIPT_NAMESPACE, "transcript": record(n)})
    finally:
        chatlog._log = original
    assert observer.write_errors == 3
    assert len(errors) == 1  # reported once, not per record


def test_check_log_dir_creates_missing_dir(tmp_path):
    target = tmp_path / "a" / "Log"
    assert check_log_dir(str(target)) is None
    assert target.is_dir()
    assert os.listdir(target) == []  # the probe file is removed


def test_check_log_dir_reports_unusable_dir_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    problem = check_log_dir(str(blocker / "Log"))
    assert problem.startswith(f"LOG_DIR {blocker / 'Log'} cannot be created: ")
    assert "\n" not in problem
    assert check_log_dir(str(blocker)) == f"LOG_DIR {blocker} is not a directory"


def test_check_log_dir_reports_unwritable_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: directory permissions are not enforced")
        problem = check_log_dir(str(locked))
        assert problem == f"LOG_DIR {locked} is not writable: Permission denied"
    finally:
        locked.chmod(0o700)


def test_transcript_service_writes_only_while_running(tmp_path):
    publisher = LogPublisher()
    log = Logger(namespace=TRANSCRIPT_NAMESPACE, observer=publisher)
    svc = chatlog.TranscriptService(str(tmp_path), publisher=publisher)
    svc.startService()
    log.info("transcript", transcript=record(1))
    svc.stopService()
    log.info("transcript", transcript=record(2))
    assert [json.loads(line)["uid"] for line in read_lines(tmp_path / "chat.jsonl")] == ["u1"]

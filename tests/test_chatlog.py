"""Transcripts after the request path: events, frames to the writer process, the writer and chat.jsonl."""

import json
import os

import pytest
from twisted.logger import Logger, LogPublisher

from fwd.transcripts import events
from fwd.transcripts import sender as sender_module
from fwd.transcripts import writer as writer_module
from fwd.transcripts.assembly import Ended, Transcript
from fwd.transcripts.events import TRANSCRIPT_NAMESPACE
from fwd.transcripts.frames import encode_record
from fwd.transcripts.service import TranscriptService, check_log_dir
from fwd.transcripts.writer import TranscriptFile


def record(n, text="héllo"):
    return {"uid": f"u{n}", "response": {"content": text + "\nline two"}, "status": 200}


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_records_are_written_one_compact_utf8_line_each(tmp_path):
    out = TranscriptFile(str(tmp_path))
    for n in (1, 2):
        out.add(encode_record(record(n)))
    out.flush()
    lines = read_lines(tmp_path / "chat.jsonl")
    assert [json.loads(line)["uid"] for line in lines] == ["u1", "u2"]
    assert "héllo" in lines[0]  # UTF-8, not \u escapes
    assert " " not in lines[0].replace("line two", "")  # compact separators
    out.close()


def ended(n, text="héllo"):
    """An ended plain chat exchange, as the forwarding path emits it."""
    transcript = Transcript(
        kind="chat", uid=f"u{n}", time=1_700_000_000.0, client="10.0.0.1", caller="team-a", route="/",
        path="/v1/chat/completions", request_body=b'{"model":"gpt-4o","messages":[]}',
        request_content_type="application/json",
    )
    transcript.response_started(200, "application/json", 1.5)
    transcript.feed(json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode())
    return Ended(transcript, partial=False, error=None, latency_ms=2.0)


def test_emit_reaches_the_transcript_publisher_and_never_the_main_log(monkeypatch):
    from twisted.logger import globalLogPublisher

    publisher = LogPublisher()
    monkeypatch.setattr(events, "transcript_publisher", publisher)
    seen, main = [], []
    publisher.addObserver(seen.append)
    globalLogPublisher.addObserver(main.append)
    try:
        events.emit(ended(1))
    finally:
        globalLogPublisher.removeObserver(main.append)
    assert [e["transcript"].transcript.uid for e in seen] == ["u1"]
    assert not [e for e in main if e.get("log_namespace") == TRANSCRIPT_NAMESPACE]


def test_rotation_by_size_never_splits_a_record(tmp_path):
    out = TranscriptFile(str(tmp_path), rotate_length=300, max_rotated=2)
    for n in range(30):
        out.add(encode_record(record(n, "x" * 40)))
        out.flush()
    out.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["chat.jsonl", "chat.jsonl.1", "chat.jsonl.2"]
    for name in names:
        assert os.path.getsize(tmp_path / name) < 300 + 100
        for line in read_lines(tmp_path / name):
            json.loads(line)
    assert json.loads(read_lines(tmp_path / "chat.jsonl")[-1])["uid"] == "u29"
    assert out.written == 30


def test_write_errors_are_counted_and_logged_once_not_raised(tmp_path, monkeypatch):
    out = TranscriptFile(str(tmp_path))
    out._file._file.close()  # the disk goes away under us
    errors = []
    monkeypatch.setattr(writer_module, "_log", Logger(namespace="fwd.transcripts", observer=LogPublisher(errors.append)))
    for n in range(3):
        out.add(encode_record(record(n)))
        out.flush()
    assert out.write_errors == 3
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


# -- the transcript writer process and what feeds it ---------------------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402

from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from fwd.transcripts.frames import FrameReader, ended_frame, frame_line  # noqa: E402
from fwd.transcripts.sender import FrameSender  # noqa: E402


def lines_of(data):
    return [json.loads(frame_line(frame)) for frame in FrameReader().feed(data)]


class FakeProcess(StringTransport):
    def __init__(self):
        super().__init__()
        self.pid = 4242
        self.stdin_closed = False
        self.signals = []

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, name):
        self.signals.append(name)


class ProcessClock(Clock):
    """A clock that can start (fake) processes, as the reactor starts the transcript writer."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.refuse = False

    def spawnProcess(self, proto, executable, args, env=None, path=None):
        if self.refuse:
            raise OSError("no such file")
        self.spawned.append((proto, args))
        proto.makeConnection(FakeProcess())
        return proto.transport


def publish(publisher, n):
    publisher({"log_namespace": TRANSCRIPT_NAMESPACE, "transcript": ended(n)})


def test_the_frames_of_one_reactor_turn_go_out_in_one_write():
    clock = Clock()
    sender = FrameSender(clock)
    transport = StringTransport()
    sender.attach(transport)
    for n in range(3):
        sender({"log_namespace": TRANSCRIPT_NAMESPACE, "transcript": ended(n)})
    sender({"log_namespace": "fwd.access", "transcript": ended(99)})
    assert transport.value() == b""
    clock.advance(0)
    assert [r["uid"] for r in lines_of(transport.value())] == ["u0", "u1", "u2"]
    assert transport.producer is sender, "the transport can pause the sender"


def test_frames_wait_for_a_transport_and_past_the_backlog_limit_are_dropped_and_counted(monkeypatch):
    monkeypatch.setattr(sender_module, "MAX_BACKLOG", 2000)
    logged = []
    monkeypatch.setattr(sender_module, "_log", Logger(namespace="fwd.transcripts", observer=LogPublisher(logged.append)))
    clock = Clock()
    sender = FrameSender(clock)
    for n in range(10):
        sender.send(ended_frame(ended(n)))
        clock.advance(0)
    assert 0 < sender.dropped < 10, "what fits in the backlog waits, the rest is counted"
    transport = StringTransport()
    sender.attach(transport)
    kept = [r["uid"] for r in lines_of(transport.value())]
    assert kept == [f"u{n}" for n in range(10 - sender.dropped)], "the waiting frames go first, in order"

    sender.pauseProducing()
    before = sender.dropped
    for n in range(10, 20):
        sender.send(ended_frame(ended(n)))
        clock.advance(0)
    assert sender.dropped > before, "a writer that does not keep up does not make the daemon grow"
    assert len(logged) == 1, "the first drop is logged, not every one"
    sender.resumeProducing()
    sender.send(ended_frame(ended(20)))
    clock.advance(0)
    assert lines_of(transport.value())[-1]["uid"] == "u20"


def running_service(tmp_path, refuse=False):
    """A TranscriptService started on a ProcessClock; its clock and publisher."""
    clock = ProcessClock()
    clock.refuse = refuse
    publisher = LogPublisher()
    svc = TranscriptService(str(tmp_path), clock, publisher=publisher)
    svc.startService()
    return svc, clock, publisher


def test_the_service_restarts_a_dead_writer_and_nothing_sent_meanwhile_is_lost(tmp_path):
    svc, clock, publisher = running_service(tmp_path)
    first, args = clock.spawned[0]
    assert args[1:3] == ["-m", "fwd.transcripts.writer"] and args[3] == str(tmp_path)
    publish(publisher, 1)
    clock.advance(0)
    assert [r["uid"] for r in lines_of(first.transport.value())] == ["u1"]

    first.processEnded(Failure(Exception("killed")))
    publish(publisher, 2)
    clock.advance(0.4)
    assert len(clock.spawned) == 1
    clock.advance(0.1)
    second, _ = clock.spawned[1]
    assert [r["uid"] for r in lines_of(second.transport.value())] == ["u2"]

    second.processEnded(Failure(Exception("killed again")))
    clock.advance(0.5)
    assert len(clock.spawned) == 2, "a writer that keeps dying is restarted ever more slowly"
    clock.advance(0.5)
    assert len(clock.spawned) == 3


def test_stopping_closes_the_writers_stdin_and_waits_for_it(tmp_path):
    svc, clock, publisher = running_service(tmp_path)
    writer, _ = clock.spawned[0]
    publish(publisher, 1)
    done = svc.stopService()
    assert [r["uid"] for r in lines_of(writer.transport.value())] == ["u1"], "sent before stdin closes"
    assert writer.transport.stdin_closed
    assert not done.called
    writer.processEnded(Failure(Exception("exited")))
    assert done.called
    assert len(clock.spawned) == 1, "no restart when stopping"


def test_with_no_writer_at_stop_the_daemon_writes_what_waits_itself(tmp_path):
    svc, clock, publisher = running_service(tmp_path, refuse=True)
    publish(publisher, 1)
    publish(publisher, 2)
    svc.stopService()
    assert [json.loads(line)["uid"] for line in read_lines(tmp_path / "chat.jsonl")] == ["u1", "u2"]


def run_writer_process(tmp_path, data):
    return subprocess.run(
        [sys.executable, "-m", "fwd.transcripts.writer", str(tmp_path), str(50 * 1024 * 1024), "10"],
        input=data, capture_output=True, timeout=60,
    )


@pytest.mark.slow
def test_the_writer_process_appends_every_record_and_exits_when_its_input_ends(tmp_path):
    frames = [ended_frame(ended(n)) for n in range(50)]
    done = run_writer_process(tmp_path, b"".join(frames))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in read_lines(tmp_path / "chat.jsonl")]
    assert [r["uid"] for r in records] == [f"u{n}" for n in range(50)]
    assert records[0]["response"]["content"] == "héllo"


@pytest.mark.slow
def test_the_writer_process_stops_with_one_log_line_on_input_that_is_not_frames(tmp_path):
    done = run_writer_process(tmp_path, ended_frame(ended(1)) + b"garbage that is no frame at all")
    assert done.returncode == 1
    events = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert any("not a transcript frame" in e.get("why", "") for e in events)
    assert [json.loads(line)["uid"] for line in read_lines(tmp_path / "chat.jsonl")] == ["u1"]

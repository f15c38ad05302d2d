"""Tests for `openai-forward convert`: old chat.log files into JSON lines."""

import json

from fwd.convert import convert, main_convert

NEW_FORMAT = """\
{'messages': [{'user': 'hi'}], 'model': 'gpt-3.5-turbo', 'host': '', 'uid': '467a17ec'}
{'assistant': 'Hello! How can I assist you today?', 'uid': '467a17ec'}

{'messages': [{'system': 'Be terse'}, {'user': 'Hello!'}], 'model': 'gpt-4', 'host': '1.2.3.4', 'uid': 'f844d156'}
{'messages': [{'role': 'user', 'content': 'über'}], 'model': 'gpt-4', 'host': '', 'uid': 'aaaa'}
{'assistant': 'Hi there!\\nBye', 'uid': 'f844d156'}
{'assistant': 'ja', 'uid': 'aaaa'}
"""

OLD_FORMAT = """\
{'host': '5.6.7.8', 'model': 'gpt-3.5-turbo', 'message': [{'user': 'one'}, {'assistant': 'earlier'}, {'user': 'two'}]}
{'assistant': 'answer two'}
{'host': '5.6.7.8', 'model': 'gpt-3.5-turbo', 'message': [{'user': 'three'}]}
{'assistant': 'answer three'}
"""


def run(tmp_path, text):
    src = tmp_path / "chat.log"
    dst = tmp_path / "out.jsonl"
    src.write_text(text, encoding="utf-8")
    counts = convert(str(src), str(dst))
    return counts, [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]


def test_uid_format_joined_by_uid(tmp_path):
    counts, rows = run(tmp_path, NEW_FORMAT)
    assert counts == (3, 0)
    assert rows == [
        {"uid": "467a17ec", "model": "gpt-3.5-turbo", "host": "",
         "messages": [{"role": "user", "content": "hi"}], "assistant": "Hello! How can I assist you today?"},
        {"uid": "f844d156", "model": "gpt-4", "host": "1.2.3.4",
         "messages": [{"role": "system", "content": "Be terse"}, {"role": "user", "content": "Hello!"}],
         "assistant": "Hi there!\nBye"},
        {"uid": "aaaa", "model": "gpt-4", "host": "",
         "messages": [{"role": "user", "content": "über"}], "assistant": "ja"},
    ]


def test_old_format_paired_by_adjacency(tmp_path):
    counts, rows = run(tmp_path, OLD_FORMAT)
    assert counts == (2, 0)
    assert rows[0] == {"uid": None, "model": "gpt-3.5-turbo", "host": "5.6.7.8", "messages": [
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "earlier"},
        {"role": "user", "content": "two"}], "assistant": "answer two"}
    assert rows[1]["messages"] == [{"role": "user", "content": "three"}]
    assert rows[1]["assistant"] == "answer three"


def test_garbage_and_missing_halves_are_skipped(tmp_path):
    text = (
        "2023-05-01 12:00:00 | INFO | some other log line\n"
        "{'messages': [{'user': 'lost'}], 'model': 'm', 'host': '', 'uid': 'no-answer'}\n"
        "__import__('os').system('echo pwned')\n"
        "{'assistant': 'orphan', 'uid': 'nobody'}\n"
        "{'messages': [{'user': 'cut\n"
        "[1, 2, 3]\n"
        "{'unrelated': 1}\n"
        + NEW_FORMAT.splitlines()[0] + "\n" + NEW_FORMAT.splitlines()[1] + "\n"
        "{'assistant': 'no request before me'}\n"
    )
    counts, rows = run(tmp_path, text)
    assert [r["uid"] for r in rows] == ["467a17ec"]
    # 4 unparsable or non-dict lines, 1 unrelated dict, 2 orphan answers, 1 request never answered
    assert counts == (1, 8)


def test_main_convert_prints_counts(tmp_path, capsys):
    src = tmp_path / "chat.log"
    src.write_text(NEW_FORMAT + "garbage\n", encoding="utf-8")
    assert main_convert([str(src), str(tmp_path / "out.jsonl")]) == 0
    assert capsys.readouterr().out == "converted 3 exchanges, skipped 1\n"
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3


def test_main_convert_missing_source(tmp_path, capsys):
    assert main_convert([str(tmp_path / "nope.log"), str(tmp_path / "out.jsonl")]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1 and "nope.log" in out.err and "Traceback" not in out.err
    assert not (tmp_path / "out.jsonl").exists()


def test_main_convert_usage_error_returns_code(capsys):
    assert main_convert(["a", "b", "c"]) == 2
    assert "usage: openai-forward convert" in capsys.readouterr().err


def test_main_convert_defaults_and_never_clobbers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Log").mkdir()
    (tmp_path / "Log" / "chat.log").write_text(OLD_FORMAT, encoding="utf-8")
    assert main_convert([]) == 0
    assert capsys.readouterr().out == "converted 2 exchanges, skipped 0\n"
    first = (tmp_path / "Log" / "chat.jsonl").read_text()
    assert main_convert([]) == 2  # a second run would overwrite ./Log/chat.jsonl
    assert "not overwriting" in capsys.readouterr().err
    assert (tmp_path / "Log" / "chat.jsonl").read_text() == first

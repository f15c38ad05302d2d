"""`openai-forward convert [SRC [DST]]`: turn an old openai-forward chat.log into JSON lines.

The old log holds two Python-dict-repr lines per exchange: the request
(``{'messages': [{'user': 'hi'}], 'model': ..., 'host': ..., 'uid': ...}``) and the answer
(``{'assistant': ..., 'uid': ...}``). Releases before uids wrote ``'message'`` and no uid; those
halves are paired by adjacency.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Any, TextIO

DEFAULT_SRC = "./Log/chat.log"
DEFAULT_DST = "./Log/chat.jsonl"


def _messages(raw: Any) -> list[Any]:
    """Old `{'user': 'hi'}` style messages as `{"role", "content"}`; already-shaped ones unchanged."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, (list, tuple)):
        return []
    out = []
    for item in raw:
        if isinstance(item, dict) and "role" not in item and len(item) == 1:
            (role, content), = item.items()
            out.append({"role": str(role), "content": content})
        else:
            out.append(item)
    return out


def _parse(line: str) -> dict[str, Any] | None:
    """One log line as a dict, or None when it is not a Python dict literal."""
    try:
        value = ast.literal_eval(line)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _write(out: TextIO, request: dict[str, Any], answer: dict[str, Any]) -> None:
    """Write one converted exchange as a JSON line."""
    raw = request["messages"] if "messages" in request else request.get("message")
    record = {
        "uid": request.get("uid"),
        "model": request.get("model"),
        "host": request.get("host"),
        "messages": _messages(raw),
        "assistant": answer.get("assistant"),
    }
    out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def convert(src: str, dst: str) -> tuple[int, int]:
    """Convert SRC into JSON lines at DST; return (exchanges converted, lines or halves skipped)."""
    converted = skipped = 0
    by_uid: dict[Any, dict[str, Any]] = {}
    loose: dict[str, Any] | None = None  # a request without uid awaiting the next answer without uid
    with open(src, encoding="utf-8", errors="replace") as lines, open(dst, "w", encoding="utf-8") as out:
        for line in lines:
            line = line.strip()
            if not line:
                continue
            entry = _parse(line)
            if entry is None:
                skipped += 1
                continue
            uid = entry.get("uid")
            if uid is not None and not isinstance(uid, (str, int)):
                uid = repr(uid)
            if "messages" in entry or "message" in entry:
                if uid is None:
                    if loose is not None:
                        skipped += 1
                    loose = entry
                else:
                    if uid in by_uid:
                        skipped += 1
                    by_uid[uid] = entry
            elif "assistant" in entry:
                request = by_uid.pop(uid, None) if uid is not None else loose
                if uid is None:
                    loose = None
                if request is None:
                    skipped += 1
                    continue
                _write(out, request, entry)
                converted += 1
            else:
                skipped += 1
    skipped += len(by_uid) + (loose is not None)
    return converted, skipped


def main_convert(argv: list[str]) -> int:
    """Command line for convert (argv after the word `convert`); returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="openai-forward convert",
        description="Convert an openai-forward chat.log into JSON lines, one exchange per line.",
    )
    parser.add_argument("src", metavar="SRC", nargs="?", default=DEFAULT_SRC, help=f"the old log ({DEFAULT_SRC})")
    parser.add_argument("dst", metavar="DST", nargs="?", default=DEFAULT_DST, help=f"output ({DEFAULT_DST})")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    if not os.path.isfile(args.src):
        print(f"openai-forward convert: {args.src}: no such file", file=sys.stderr)
        return 2
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        print("openai-forward convert: SRC and DST must be different files", file=sys.stderr)
        return 2
    if os.path.exists(args.dst) and os.path.getsize(args.dst) > 0:
        # The daemon's own transcripts live at ./Log/chat.jsonl by default: never clobber them.
        print(f"openai-forward convert: {args.dst} already exists; not overwriting it", file=sys.stderr)
        return 2
    try:
        converted, skipped = convert(args.src, args.dst)
    except OSError as e:
        print(f"openai-forward convert: {e.filename or args.dst}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"converted {converted} exchanges, skipped {skipped}")
    return 0

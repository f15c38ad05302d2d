"""The wire between a serving process and the transcript writer.  Pure.  Tests: tests/test_chatlog.py

A frame is a 13-byte head (type, then three big-endian lengths) and up to three parts.  A capture frame holds an
ended exchange's metadata as JSON, the request body (at most the record limit of it) and the response bytes as
relayed: the writer rebuilds the transcript and builds the record there, so the serving process never does.  A
record frame holds a record already encoded (the serving process had to finish it: a stream past the fold).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import orjson

from fwd.transcripts.assembly import Ended, Transcript

_FRAME = struct.Struct(">BIII")
_CAPTURE = 1
_RECORD = 2
MAX_FRAME = 1 << 31


def encode_record(record: dict[str, Any]) -> bytes:
    """One record as UTF-8 JSON: orjson, or the standard encoder for what orjson refuses (integers beyond
    64 bits, non-string keys)."""
    try:
        return orjson.dumps(record, default=str)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8", "replace")


def record_frame(line: bytes) -> bytes:
    """A frame carrying one encoded record."""
    return _FRAME.pack(_RECORD, len(line), 0, 0) + line


def capture(transcript: Transcript) -> tuple[dict[str, Any], bytes] | None:
    """What rebuilds a transcript in another process: its metadata and every response byte fed so far.

    None once it holds less than that (a stream already folded, a body cut at the limit) or its assembly
    failed: then only the serving process sees the whole exchange and must finish it.
    """
    if not isinstance(transcript, Transcript):
        return None  # a Realtime session's transcript is assembled where its frames were relayed
    mode = transcript.mode
    if mode == "sse":
        if transcript.folded:
            return None
        response = b"".join(transcript.pending)
    elif mode == "failed" or transcript.body_cut:
        return None
    else:
        response = bytes(transcript.body)
    meta = {
        "kind": transcript.kind,
        "uid": transcript.uid,
        "time": transcript.time,
        "client": transcript.client,
        "caller": transcript.caller,
        "route": transcript.route,
        "path": transcript.path,
        "request_content_type": transcript.request_content_type,
        "request_size": transcript.request_size,
        "request_members": transcript.request_members,
        "limit": transcript.limit,
        "status": transcript.status,
        "content_type": transcript.content_type,
        "ttfb_ms": transcript.ttfb_ms,
    }
    return meta, response


def rebuild(meta: dict[str, Any], request_body: bytes, response: bytes) -> Transcript:
    """The transcript `capture` described, fed the same bytes: its `finish` gives the same record."""
    transcript = Transcript(
        kind=meta["kind"],
        uid=meta["uid"],
        time=meta["time"],
        client=meta["client"],
        caller=meta["caller"],
        route=meta["route"],
        path=meta["path"],
        request_body=request_body,
        request_size=meta.get("request_size"),
        request_members=meta.get("request_members"),
        request_content_type=meta["request_content_type"],
        limit=meta["limit"],
    )
    if meta["status"] is not None:
        transcript.response_started(meta["status"], meta["content_type"], meta["ttfb_ms"])
    if response:
        transcript.feed(response)
    return transcript


def ended_frame(ended: Ended) -> bytes:
    """An ended exchange on the wire: its capture when it has one, else its record."""
    transcript = ended.transcript
    captured = capture(transcript)
    if captured is None:
        return record_frame(encode_record(ended.record()))
    meta, response = captured
    meta["partial"] = ended.partial
    meta["error"] = ended.error
    meta["latency_ms"] = ended.latency_ms
    meta["used"] = ended.used
    if ended.extra:
        meta["extra"] = ended.extra
    head = orjson.dumps(meta)
    request = transcript.request_body
    return b"".join((_FRAME.pack(_CAPTURE, len(head), len(request), len(response)), head, request, response))


def frame_line(frame: bytes) -> bytes:
    """The chat.jsonl line (without its newline) of one frame."""
    kind, head, request, response = _FRAME.unpack_from(frame)
    at = _FRAME.size
    if kind == _RECORD:
        return frame[at : at + head]
    meta = orjson.loads(frame[at : at + head])
    at += head
    transcript = rebuild(meta, frame[at : at + request], frame[at + request : at + request + response])
    ended = Ended(
        transcript, partial=meta["partial"], error=meta["error"], latency_ms=meta["latency_ms"], used=meta.get("used"),
        extra=meta.get("extra"),
    )
    return encode_record(ended.record())


class FrameError(ValueError):
    """The byte stream is not frames (from here on): `frames` holds the whole frames read before."""

    def __init__(self, message: str, frames: list[bytes]) -> None:
        super().__init__(message)
        self.frames = frames


class FrameReader:
    """Cuts a byte stream into whole frames, whatever sizes it is read in."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Take bytes; return the frames they complete.  Raises FrameError on a stream that is not frames."""
        buffer = self._buffer
        buffer += data
        frames = []
        at = 0
        size = _FRAME.size
        while len(buffer) - at >= size:
            kind, head, request, response = _FRAME.unpack_from(buffer, at)
            length = size + head + request + response
            if kind not in (_CAPTURE, _RECORD) or length > MAX_FRAME:
                del buffer[:]
                raise FrameError(f"not a transcript frame (type {kind}, {length} bytes)", frames)
            if len(buffer) - at < length:
                break
            frames.append(bytes(buffer[at : at + length]))
            at += length
        del buffer[:at]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer)

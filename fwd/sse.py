"""Incremental Server-Sent-Events parser (WHATWG event-stream rules), fed with relayed chunks."""

from __future__ import annotations

from typing import NamedTuple

_BOM = b"\xef\xbb\xbf"


class Event(NamedTuple):
    """One dispatched event: its `event:` name (None when unnamed) and its joined `data:` lines.

    A NamedTuple rather than an attrs class: one is made per relayed event, and this is 4x cheaper."""

    event: str | None
    data: str


class SSEParser:
    """Turns an event stream, chunked anyhow, into Events; lines longer than max_line are dropped, not buffered."""

    def __init__(self, max_line: int = 1_048_576) -> None:
        self.max_line = max_line
        self.dropped = 0
        self.last_event_id: str | None = None
        self.retry: int | None = None
        self._buf = bytearray()
        # The previous chunk ended in CR: an LF opening the next chunk belongs to that line end.
        self._skip_lf = False
        # Inside an over-long line: throw bytes away until its line end.
        self._discarding = False
        self._started = False
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, data: bytes) -> list[Event]:
        """Consume one chunk and return the events it completes."""
        fast = self._feed_simple(data)
        if fast is not None:
            return fast
        if self._skip_lf and data:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
        if not data:
            return []
        end = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if end < 0:
            if not self._discarding:
                self._buf += data
                if len(self._buf) > self.max_line:
                    self._overflow()
            return []
        if end == len(data) - 1 and data[end] == 0x0D:
            self._skip_lf = True
        block = data[: end + 1]
        if self._buf:
            block = bytes(self._buf) + block
            self._buf = bytearray()
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = block.split(b"\n")
        lines.pop()  # the empty piece after the final line end
        if self._discarding:
            self._discarding = False
            del lines[0]
        rest = data[end + 1 :]
        if rest:
            self._buf += rest
            if len(self._buf) > self.max_line:
                self._overflow()
        events: list[Event] = []
        max_line = self.max_line
        for raw in lines:
            if len(raw) > max_line:
                self.dropped += 1
                continue
            if not self._started:
                self._started = True
                if raw.startswith(_BOM):
                    raw = raw[3:]
            if not raw:
                if self._data:
                    events.append(Event(self._event, "\n".join(self._data)))
                    self._data = []
                self._event = None
                continue
            line = raw.decode("utf-8", "replace")
            if line[0] == ":":
                continue
            field, colon, value = line.partition(":")
            if colon and value[:1] == " ":
                value = value[1:]
            if field == "data":
                self._data.append(value)
            elif field == "event":
                self._event = value or None
            elif field == "id":
                if "\0" not in value:
                    self.last_event_id = value
            elif field == "retry":
                if value.isascii() and value.isdigit():
                    self.retry = int(value)
        return events

    def _feed_simple(self, data: bytes) -> list[Event] | None:
        """The common shape, parsed in bulk: whole `data: …` one-line events separated by blank lines, LF only,
        with nothing pending from earlier chunks. None means: use the general parser."""
        if self._buf or self._data or self._event is not None or self._skip_lf or self._discarding:
            return None
        if b"\r" in data or (not self._started and data.startswith(_BOM)):
            return None
        pieces = data.split(b"\n\n")
        tail = pieces.pop()
        if not pieces or tail[:1] == b"\n":
            return None
        max_line = self.max_line
        for piece in pieces:
            if piece[:6] != b"data: " or b"\n" in piece or len(piece) > max_line:
                return None
        self._started = True
        events = [Event(None, piece[6:].decode("utf-8", "replace")) for piece in pieces]
        if tail:
            events += self.feed(tail)
        return events

    def _overflow(self) -> None:
        """Drop the over-long line buffered so far and skip the rest of it."""
        self._buf = bytearray()
        self._discarding = True
        self.dropped += 1

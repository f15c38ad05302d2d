"""HTTP/2 (negotiated by ALPN on ssl: ports) and what the daemon's Site needs to treat both protocols alike.
Tests: tests/test_http2.py"""

from __future__ import annotations

from fwd import private

_CONTROL = bytes(c for c in range(32) if c != 9) + b"\x7f"


def has_control_characters(value: bytes) -> bool:
    """Whether a header value holds control characters other than HTAB (RFC 9110 5.5)."""
    return len(value.translate(None, _CONTROL)) != len(value)


def request_line(channel) -> tuple[bytes, bytes, bytes] | None:
    """(method, target, version) of the request whose head just arrived on a channel: the daemon's HTTP/1.1
    channel remembers its request line, an HTTP/2 stream holds its pseudo-headers."""
    line = getattr(channel, "head_line", None)
    if line is not None:
        return line
    command = getattr(channel, "command", None)
    path = getattr(channel, "path", None)
    if command is None or path is None:
        return None
    return command, path, b"HTTP/2"


class GenericChannel(private.GenericHTTPChannelProtocol):
    """The protocol of each client connection: HTTP/1.1, or HTTP/2 when TLS negotiated it."""

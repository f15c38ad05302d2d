"""Answers the proxy makes itself, and the access-log event every request ends with.  Tests: tests/test_site.py

Every request gets exactly one access event on the `fwd.access` namespace: the twistd log line and what the
metrics count.  It never holds a query string, a header value or a key.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.logger import Logger, LogLevel

from fwd import access, errors

ACCESS_NAMESPACE = "fwd.access"
ACCESS_SYSTEM = ACCESS_NAMESPACE + "#info"  # as twistd's log line shows an event without one
access_log = Logger(namespace=ACCESS_NAMESPACE)

JSON = [b"application/json"]


def send_error(request, error: errors.ProxyError) -> None:
    """Answer with a proxy-made OpenAI-shaped error, if the client is still there."""
    if request.finished or getattr(request, "gone", False):
        return
    body = error.body()
    request.setResponseCode(error.status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", JSON)
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    for name, value in error.headers:
        headers.setRawHeaders(name, [value])
    request.write(body)
    request.finish()


def raw_error(error: errors.ProxyError) -> bytes:
    """A whole HTTP/1.1 answer for `error` that closes the connection, for answers given before (or instead
    of) twisted.web's own response machinery."""
    body = error.body()
    extra = b"".join(b"%s: %s\r\n" % (name, value) for name, value in error.headers)
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n%s" % (
        error.status, errors.REASONS.get(error.status, b"Error"), len(body), extra, body
    )


def write_raw_error(transport, error: errors.ProxyError) -> None:
    transport.write(raw_error(error))


class AccessLog:
    """Emits the access event of each request: forwarded, answered by the proxy, or never framed."""

    def __init__(self, clock, trusted_proxies: Callable[[], tuple]):
        self.clock = clock
        self.trusted_proxies = trusted_proxies

    def client(self, request) -> str:
        """The client's address, through trusted proxies' X-Forwarded-For."""
        peer = getattr(request.getClientAddress(), "host", "unix")
        trusted = self.trusted_proxies()
        if not trusted:
            return peer
        return access.client_ip(peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for"), trusted)

    def answered(self, request) -> None:
        """A request the proxy answered itself (an error, /healthz, a 429 of the limits: `limit` says which)."""
        now = self.clock.seconds()
        admitted = getattr(request, "admission", None)
        limited = getattr(request, "limited", None)
        self.emit(
            method=_text(getattr(request, "method", None)),
            path=_text(getattr(request, "path", None)),
            client=self.client(request),
            status=request.code,
            sent=request.sentLength,
            started=getattr(request, "started", now),
            now=now,
            caller=admitted[1].caller if admitted is not None else "-",
            route=admitted[0].route.name if admitted is not None else "-",
            **({"limit": limited} if limited is not None else {}),
        )

    def unframed(self, transport, status: int) -> None:
        """A request that could not be framed, or whose head never ended."""
        now = self.clock.seconds()
        peer = getattr(transport.getPeer(), "host", "unix") if transport is not None else "-"
        self.emit(method="-", path="-", client=peer, status=status, sent=0, started=now, now=now, caller="-", route="-")

    def emit(self, *, method: str, path: str, client: str, status: int, sent: int, started: float, now: float,
             caller: str, route: str, ttfb: float | None = None, upstream: bool = False, **extra) -> None:
        """One access event.  The line is formatted here with %-formatting: the logger's own brace formatting
        costs a tenth of a forwarded request.  The event goes to the logger's observer as `Logger.info` would
        make it, plus the `log_system` twistd's log line would show anyway ("fwd.access#info"): given, it is not
        formatted again for every line, and `Logger.emit`'s checks of a level it is not given are skipped
        (together about 5 µs of a request's access line, measured on its own)."""
        duration_ms = (now - started) * 1000
        line = "%s %s %s %d %d %.0fms %s" % (client, method, path, status, sent, duration_ms, caller)
        if "served_by" in extra:
            line += " via " + extra["served_by"]
        extra.update(
            log_logger=access_log,
            log_level=LogLevel.info,
            log_namespace=ACCESS_NAMESPACE,
            log_source=None,
            log_format=line.replace("{", "{{").replace("}", "}}"),
            log_time=time.time(),
            log_system=ACCESS_SYSTEM,
            client=client,
            method=method,
            path=path,
            status=status,
            bytes=sent,
            duration_ms=duration_ms,
            ttfb_ms=None if ttfb is None else (ttfb - started) * 1000,
            caller=caller,
            route=route,
            upstream=upstream,
        )
        access_log.observer(extra)


def _text(value) -> str:
    """A method or path for the log: latin-1 text with control characters escaped, '-' when unknown."""
    if not isinstance(value, bytes) or not value:
        return "-"
    return value.decode("latin-1").encode("unicode_escape").decode("ascii")

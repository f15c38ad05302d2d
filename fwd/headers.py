"""Which headers cross the proxy in each direction.  Tests: tests/test_headers.py

End-to-end headers pass; hop-by-hop headers, those named in `Connection`, and the client's credentials (when
the proxy substitutes a pool key) do not.  Names are lower-case bytes throughout.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)
# Set by the upstream agent itself, or meaningless past this hop.
# x-fwd-cache asks this gateway's cache: it is not the upstream's business.
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-fwd-cache"}
RESPONSE_DROP = HOP_BY_HOP
CREDENTIALS = frozenset({b"authorization", b"api-key"})


def connection_tokens(values: list[bytes] | None) -> frozenset[bytes]:
    """Header names listed in `Connection`, which are hop-by-hop for this message."""
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


def request_headers(
    headers: Iterable[tuple[bytes, list[bytes]]],
    hop_prefix: bytes = b"",
    drop_credentials: bool = False,
) -> list[tuple[bytes, list[bytes]]]:
    """The client's headers to send upstream."""
    headers = [(name.lower(), values) for name, values in headers]
    drop = REQUEST_DROP
    for name, values in headers:
        if name == b"connection":
            drop = drop | connection_tokens(values)
    if drop_credentials:
        drop = drop | CREDENTIALS
    return [
        (name, values)
        for name, values in headers
        if name not in drop and not (hop_prefix and name.startswith(hop_prefix))
    ]


_BREAKING = b"\r\n\x00"
_CONTROL = bytes(range(32)) + b"\x7f"


def response_headers(
    headers: Iterable[tuple[bytes, list[bytes]]], connection: list[bytes] | None = None
) -> list[tuple[bytes, list[bytes]]]:
    """The upstream's headers to send to the client: no hop-by-hop header, none that the upstream's
    `Connection` header (`connection`, when the agent keeps it apart) names, and no CR, LF or NUL in a value."""
    headers = [(name.lower(), values) for name, values in headers]
    drop = RESPONSE_DROP | connection_tokens(connection) if connection else RESPONSE_DROP
    for name, values in headers:
        if name == b"connection":
            drop = drop | connection_tokens(values)
    kept = [(name, values) for name, values in headers if name not in drop]
    every = b"".join(value for _, values in kept for value in values)
    if len(every.translate(None, _BREAKING)) == len(every):
        return kept
    return [(name, [value.translate(None, _BREAKING) for value in values]) for name, values in kept]


def clean_phrase(phrase: bytes) -> bytes:
    """An upstream's reason phrase fit to send on: control characters (CR, LF and NUL among them) removed."""
    return phrase.translate(None, _CONTROL)


def is_event_stream(content_type: list[bytes] | None) -> bool:
    return bool(content_type) and content_type[0].split(b";", 1)[0].strip().lower() == b"text/event-stream"


def upstream_headers(
    headers: Iterable[tuple[bytes, list[bytes]]],
    *,
    hop_prefix: bytes,
    host: bytes | None,
    decision,
    from_api_key: bool,
    proxy_keys: bool,
) -> list[tuple[bytes, list[bytes]]]:
    """The headers of a request to the upstream, before any pool key is added.

    The client's credentials are dropped when the pool serves the request or when a proxy key was
    stripped from them; in the latter case the client's own key goes on in the header it came in.
    """
    substitute = decision.use_pool or proxy_keys
    out = request_headers(headers, hop_prefix, drop_credentials=substitute)
    if host is not None:
        out.append((b"host", [host]))
    if substitute and decision.client_key is not None:
        key = decision.client_key.encode("latin-1")
        if from_api_key:
            out.append((b"api-key", [key]))
        else:
            out.append((b"authorization", [b"Bearer " + key]))
    return out

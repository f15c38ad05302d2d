"""Who may use the proxy, and with which key: client address, IP lists, credentials.  Tests: tests/test_access.py

Pure decisions over plain values; the forwarding glue turns a Decision into headers or an error response.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import unquote_to_bytes

import attrs

from fwd import errors
from fwd.config import ForwardKey, Route


def client_ip(peer: str, forwarded_for: list[bytes] | None, trusted: tuple) -> str:
    """The client's address: the peer, or the right-most untrusted X-Forwarded-For hop behind trusted proxies."""
    if not forwarded_for or not trusted or not in_networks(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.decode("latin-1").split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        if not in_networks(hop, trusted):
            return hop if _is_ip(hop) else peer
    return hops[0] if hops and _is_ip(hops[0]) else peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def in_networks(ip: str, networks: tuple) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks if network.version == address.version)


def ip_allowed(ip: str, whitelist: tuple, blacklist: tuple) -> bool:
    """Blacklist wins; with a whitelist, only listed addresses pass."""
    if blacklist and in_networks(ip, blacklist):
        return False
    return not whitelist or in_networks(ip, whitelist)


def split_proxy_key(credential: str, proxy_keys: tuple[str, ...]) -> str | None:
    """Check and strip openai-api-proxy's `<key>:<proxy key>` suffix; None when it is missing or wrong."""
    key, sep, suffix = credential.rpartition(":")
    if not sep:
        key, suffix = "", credential
    matched = False
    for candidate in proxy_keys:
        matched |= hmac.compare_digest(suffix.encode(), candidate.encode())
    return key if matched else None


@attrs.frozen
class Decision:
    """How to authenticate one request upstream: a pool key (with the forward key used), or the client's key."""

    use_pool: bool
    forward_key: ForwardKey | None = None
    client_key: str | None = None
    error: errors.ProxyError | None = None

    @property
    def caller(self) -> str:
        """A name for the caller that is never a key."""
        if self.forward_key is not None:
            return self.forward_key.name
        return "anonymous" if self.client_key is None else "own-key"


ANONYMOUS_POOL = Decision(use_pool=True)
NO_KEY = Decision(use_pool=False)


@attrs.frozen
class ForwardKeyTable:
    """Forward keys of a route, found by constant-time comparison."""

    keys: tuple[ForwardKey, ...]

    def find(self, presented: str) -> ForwardKey | None:
        found = None
        encoded = presented.encode()
        for candidate in self.keys:
            if hmac.compare_digest(encoded, candidate.key.encode()):
                found = candidate
        return found


def decide(
    route: Route, table: ForwardKeyTable, credential: str | None, proxy_keys: tuple[str, ...]
) -> Decision:
    """Decide how a request with this credential is served on this route."""
    if proxy_keys:
        if credential is None:
            return Decision(False, error=errors.bad_proxy_key())
        credential = split_proxy_key(credential, proxy_keys)
        if credential is None:
            return Decision(False, error=errors.bad_proxy_key())
        credential = credential or None
    if route.no_auth:
        # The seeds' no-auth mode: whatever the client sends (SDKs insist on some key), the pool serves it.
        return ANONYMOUS_POOL
    if credential is None:
        return Decision(False, error=errors.missing_key()) if route.forward_keys else NO_KEY
    if credential.startswith("fk-"):
        forward_key = table.find(credential)
        if forward_key is None:
            return Decision(False, error=errors.unknown_forward_key())
        return Decision(True, forward_key=forward_key)
    if not route.allow_client_keys:
        return Decision(False, error=errors.client_keys_forbidden())
    return Decision(False, client_key=credential)


@attrs.frozen
class Admission:
    """A request head judged fit for a route: how it is served and who the client is."""

    decision: Decision
    client: str
    from_api_key: bool = False

    @property
    def caller(self) -> str:
        return self.decision.caller


def escapes(path: bytes) -> bool:
    """Whether a path has dot-segments, plain or percent-encoded, that could climb out of a prefix."""
    if b"." not in path and b"%" not in path and b"\\" not in path:
        return False
    decoded = unquote_to_bytes(path).replace(b"\\", b"/")
    return any(segment in (b".", b"..") for segment in decoded.split(b"/"))


def judge(
    route: Route,
    table: ForwardKeyTable,
    *,
    path: bytes,
    peer: str,
    headers,
    proxy_keys: tuple[str, ...],
    trusted_proxies: tuple,
    ip_whitelist: tuple,
    ip_blacklist: tuple,
) -> Admission | errors.ProxyError:
    """Judge a request head for a route: its path, the client's address and its credentials.

    `headers` is anything with `getRawHeaders(name)` (twisted.web's Headers).  The credential is the
    `Authorization: Bearer` token, or on an Azure route the `api-key` header when it is set.
    """
    if escapes(path):
        return errors.bad_path()
    client = peer
    if trusted_proxies:
        client = client_ip(peer, headers.getRawHeaders(b"x-forwarded-for"), trusted_proxies)
    if (ip_whitelist or ip_blacklist) and not ip_allowed(client, ip_whitelist, ip_blacklist):
        return errors.ip_denied(client)
    credential = None
    from_api_key = False
    if route.kind == "azure":
        api_key = headers.getRawHeaders(b"api-key")
        if api_key:
            credential = api_key[0].decode("latin-1").strip() or None
            from_api_key = credential is not None
    if credential is None:
        authorization = headers.getRawHeaders(b"authorization")
        credential = bearer(authorization[0]) if authorization else None
    decision = decide(route, table, credential, proxy_keys)
    if decision.error is not None:
        return decision.error
    return Admission(decision, client, from_api_key)


def bearer(value: bytes | None) -> str | None:
    """The token of an `Authorization: Bearer …` header value."""
    if not value:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None

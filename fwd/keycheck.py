"""The key check: at startup and after each reload, ask each pool key's upstream for its model list, and start
the keys it refuses disabled.  Tests: tests/test_keycheck.py

These are the proxy's own requests, so they go through treq (no redirects followed: a key is never sent
anywhere but its upstream).  Only a 401 or 403 condemns a key, judged like any refusal (fwd.keys.verdict);
an upstream that cannot be reached, is slow, rate-limits or fails says nothing about the key.  At most
CONCURRENCY checks run at a time, each within TIMEOUT seconds; log lines show masked keys only.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from fwd import keys
from fwd.settings import mask

log = Logger(namespace="fwd.keycheck")

CONCURRENCY = 4
TIMEOUT = 10.0
AZURE_API_VERSION = "2024-10-21"
REFUSAL_LIMIT = 64 * 1024


def models_url(base_url: str, kind: str) -> str:
    """Where a route's upstream lists its models."""
    if kind == "azure":
        return f"{base_url}/openai/models?api-version={AZURE_API_VERSION}"
    if base_url.endswith("/v1"):
        return f"{base_url}/models"
    return f"{base_url}/v1/models"


def key_headers(key: str, kind: str) -> dict[bytes, list[bytes]]:
    if kind == "azure":
        return {b"api-key": [key.encode("latin-1")]}
    return {b"authorization": [b"Bearer " + key.encode("latin-1")]}


class KeyCheck:
    """Checks every pool key of a gateway's routes once."""

    def __init__(self, http, clock, concurrency: int = CONCURRENCY, timeout: float = TIMEOUT):
        """`http` is a treq HTTPClient (or anything with its `get`)."""
        self.http = http
        self.clock = clock
        self.timeout = timeout
        self.semaphore = defer.DeferredSemaphore(concurrency)

    def check(self, gateway) -> defer.Deferred:
        """Check each pool key of each route whose upstream has a model list; fires with {masked key: verdict}."""
        checks = []
        for active in gateway.routes.values():
            for upstream in active.upstreams:
                config = upstream.upstream
                if config.kind == "general" or not config.api_keys:
                    continue
                for key in config.api_keys:
                    checks.append(self.semaphore.run(self._check_one, upstream.pool, key, config.base_url, config.kind))
        results = defer.gatherResults(checks, consumeErrors=True)
        return results.addCallback(lambda outcomes: dict(outcomes))

    @defer.inlineCallbacks
    def _check_one(self, pool, key: str, base_url: str, kind: str):
        url = models_url(base_url, kind)
        try:
            response = yield self.http.get(
                url, headers=key_headers(key, kind), allow_redirects=False, timeout=self.timeout, reactor=self.clock
            )
            body = yield self._read(response)
        except Exception as e:
            log.warn("key check of {key}: upstream not reached ({why}); the key stays as it is",
                     key=mask(key), why=type(e).__name__)
            return mask(key), "unreachable"
        status = response.code
        if status in (401, 403) and keys.verdict(status, body) == "reject":
            pool.rejected(key, status)
            return mask(key), "disabled"
        if status < 400:
            pool.succeeded(key)
            log.info("key check of {key}: accepted", key=mask(key))
            return mask(key), "accepted"
        log.warn("key check of {key}: the upstream answered {status}; the key stays as it is", key=mask(key), status=status)
        return mask(key), f"answered {status}"

    @defer.inlineCallbacks
    def _read(self, response):
        """At most REFUSAL_LIMIT bytes of an answer (a model list can be long; only refusals are read)."""
        if response.code not in (401, 403):
            yield response.collect(lambda data: None)
            return b""
        parts: list[bytes] = []
        size = [0]

        def keep(data: bytes) -> None:
            if size[0] < REFUSAL_LIMIT:
                parts.append(data[: REFUSAL_LIMIT - size[0]])
            size[0] += len(data)

        yield response.collect(keep)
        return b"".join(parts)


class KeyCheckService(service.Service):
    """Runs the key check when the daemon starts, and `recheck` runs it again after a reload."""

    def __init__(self, gateway, http, clock):
        self.gateway = gateway
        self.checker = KeyCheck(http, clock)
        self.running_check: defer.Deferred | None = None

    def startService(self):
        super().startService()
        self.recheck()

    def recheck(self) -> defer.Deferred | None:
        """Check the gateway's keys now, if its configuration asks for it."""
        if not self.gateway.config.check_keys:
            return None
        self.running_check = self.checker.check(self.gateway)
        return self.running_check

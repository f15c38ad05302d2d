"""The upstreams one request tries in turn: the choice (fwd.balance), each upstream's pool keys (fwd.keys), the
URL on each (fwd.azure for OpenAI-shaped requests to Azure), and what each attempt says of the upstream's health.
Tests: tests/test_balance.py, tests/test_upstreams_e2e.py

A request goes to another upstream only before a byte of its answer reached the client: when the upstream
refused the connection, failed TLS, sent no response headers in time, answered 5xx (a POST only where its
route allows), or when every key of the upstream rests.
"""

from __future__ import annotations

from fwd import balance, errors
from fwd.azure import Unmapped, azure_target
from fwd.keys import KeyAttempts


class UpstreamAttempts:
    """One request's attempts across its route's upstreams."""

    __slots__ = ("active", "target", "model", "use_pool", "clock", "several", "translate", "tried", "upstream", "keys",
                 "url", "sent_at", "open")

    def __init__(self, active, target, model, use_pool: bool, clock):
        """`active` is the route (fwd.gateway.ActiveRoute), `target` where the request goes below it, `model` the
        model it names (or None)."""
        self.active = active
        self.target = target
        self.model = model
        self.use_pool = use_pool
        self.clock = clock
        self.several = len(active.upstreams) > 1
        self.translate = active.route.kind != "azure"
        self.tried: set[str] = set()
        self.upstream = None
        self.keys: KeyAttempts | None = None
        self.url = b""
        self.sent_at = 0.0
        self.open = False  # an attempt is out on `upstream` with no verdict yet

    @property
    def key(self) -> str | None:
        return self.keys.key if self.keys is not None else None

    @property
    def name(self) -> str:
        """The upstream of the current attempt (its base URL)."""
        return self.upstream.name if self.upstream is not None else self.active.route.base_url

    def _url(self, upstream) -> bytes:
        rest, query = self.target.rest, self.target.query
        config = upstream.upstream
        if config.kind == "azure" and self.translate:
            rest, query = azure_target(rest, query, self.model, config.deployments, config.api_version)
        return upstream.url(rest, query)

    def candidates(self) -> list:
        """The upstreams not tried yet that may serve this request, with their URLs."""
        found = []
        for upstream in self.active.upstreams:
            if upstream.name in self.tried or not upstream.upstream.serves(self.model):
                continue
            try:
                found.append((upstream, self._url(upstream)))
            except Unmapped:
                continue
        return found

    def choose(self) -> bool:
        """Take the next upstream; False when none is left."""
        candidates = self.candidates()
        if not candidates:
            return False
        if len(candidates) == 1:
            index = 0  # nothing to choose; resting or not, it is what is left
        else:
            index = balance.choose([(u.upstream.weight, u.health) for u, _ in candidates], self.clock.seconds(),
                                   self.active.rng)
            if index is None:
                # Every one rests: try the one whose rest ends first rather than refuse.
                index = min(range(len(candidates)), key=lambda i: candidates[i][0].health.resting_until)
        upstream, self.url = candidates[index]
        self.tried.add(upstream.name)
        self.upstream = upstream
        self.keys = KeyAttempts(upstream.pool, upstream.upstream.kind, self.use_pool)
        return True

    def next(self, headers: list) -> list | errors.ProxyError:
        """The headers of the next attempt (its Host and pool key), or the error to answer when no upstream can
        take it: every key of every upstream rests, or no upstream serves the request."""
        refused: list[errors.ProxyError] = []
        while True:
            if self.upstream is None and not self.choose():
                if refused:
                    return soonest_refusal(refused)
                return errors.no_upstream(self.model if isinstance(self.model, str) else None)
            outcome = self.keys.next([*headers, (b"host", [self.upstream.host])])
            if not isinstance(outcome, errors.ProxyError):
                self.sent_at = self.clock.seconds()
                self.upstream.health.started(self.sent_at)
                self.open = True
                return outcome
            refused.append(outcome)  # every key of this upstream rests: the next upstream may have one
            self.upstream = None

    def answered(self) -> None:
        """Response headers came, and they do not count against the upstream."""
        if self.open:
            self.open = False
            now = self.clock.seconds()
            self.upstream.health.answered(now, now - self.sent_at)

    def failed(self, why: str) -> None:
        """The attempt failed because of the upstream: rest it."""
        if self.open:
            self.open = False
            self.upstream.health.failed(self.clock.seconds(), why, self.sent_at)

    def left(self) -> None:
        """The client left before a verdict."""
        if self.open:
            self.open = False
            self.upstream.health.left()

    def can_fail_over(self) -> bool:
        """Whether another upstream may take the request."""
        return self.several and bool(self.candidates())

    def fail_over(self) -> None:
        """The next attempt goes to another upstream."""
        self.upstream = None

    def succeeded(self) -> None:
        self.keys.succeeded()

    def refused(self, status: int, body: bytes, retry_after: float | None) -> str:
        return self.keys.refused(status, body, retry_after)


def soonest_refusal(refused: list[errors.ProxyError]) -> errors.ProxyError:
    """What to answer when every upstream's keys rest: the 429 whose keys come back first, else (every key
    disabled) the 503."""
    limited = [e for e in refused if e.status == 429]
    if not limited:
        return refused[-1]
    return min(limited, key=lambda e: int(dict(e.headers).get(b"Retry-After", b"0") or 0))

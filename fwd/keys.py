"""The pool of upstream keys: even rotation, cooldown on 429, disabling on 401/403.  Tests: tests/test_keys.py

Pure logic: time comes from an injected clock (anything with `seconds()`, e.g. the reactor or a task.Clock),
state changes are reported through a twisted.logger Logger with masked keys only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from email.utils import parsedate_to_datetime

import attrs
from twisted.logger import Logger

from fwd import errors
from fwd.settings import mask

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0
REPROBE_AFTER = 300.0
MAX_RETRY_AFTER = 3600.0


# Upstream answers to a pool key that say something about the key: judged, and maybe replayed on the next.
RETRY_STATUSES = frozenset({401, 403, 429})

# Codes of refusals that say the key has no money left: resting it for seconds would retry it all day.
OUT_OF_QUOTA = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"})
# Codes of 403s that are about the caller's region or request, not the key: every key would get the same.
NOT_ABOUT_THE_KEY = frozenset({"unsupported_country_region_territory", "unsupported_country"})


def refusal_code(body: bytes) -> str | None:
    """The `error.code` (or `error.type`) of an OpenAI-shaped error body, if it has one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code") or error.get("type")
    return code if isinstance(code, str) else None


def verdict(status: int, body: bytes) -> str:
    """What an upstream refusal (401/403/429) of a pool key means: "rest" it (rate limited), "reject" it
    (invalid, revoked, out of quota), or "relay" the answer to the client (not about the key)."""
    code = refusal_code(body)
    if status == 429:
        return "reject" if code in OUT_OF_QUOTA else "rest"
    if status == 403 and code in NOT_ABOUT_THE_KEY:
        return "relay"
    return "reject"


@attrs.define
class KeyState:
    """What the pool knows about one upstream key."""

    key: str = attrs.field(repr=False)
    available_at: float = 0.0
    failures: int = 0
    disabled: bool = False

    @property
    def masked(self) -> str:
        return mask(self.key)


@attrs.define
class KeyPool:
    """Hands out upstream keys round-robin, skipping keys that cool down or were rejected."""

    keys: tuple[str, ...] = attrs.field(repr=False)
    clock: object
    log: Logger = attrs.field(factory=lambda: Logger(namespace="fwd.keys"))
    # Told of every change this pool makes to a key's state (fwd.shared_keys tells the other instances).
    listener: Callable[[KeyState], None] | None = attrs.field(default=None, repr=False)
    _states: list[KeyState] = attrs.field(init=False)
    _next: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._states = [KeyState(key) for key in self.keys]

    def __len__(self) -> int:
        return len(self._states)

    def pick(self, exclude: frozenset[str] | set[str] = frozenset()) -> str | None:
        """The next usable key after the last one handed out, or None when every key rests."""
        now = self.clock.seconds()
        count = len(self._states)
        for step in range(count):
            state = self._states[(self._next + step) % count]
            if state.available_at <= now and state.key not in exclude:
                self._next = (self._next + step + 1) % count
                return state.key
        return None

    def retry_after(self) -> float:
        """Seconds until some key is usable again."""
        now = self.clock.seconds()
        return max(0.0, min((s.available_at for s in self._states), default=0.0) - now)

    def all_disabled(self) -> bool:
        return all(s.disabled for s in self._states)

    def rate_limited(self, key: str, retry_after: float | None) -> None:
        """The upstream said 429 for this key: rest it for Retry-After, else a doubling backoff."""
        state = self._state(key)
        if state is None:
            return
        state.failures += 1
        if retry_after is None:
            pause = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** min(state.failures - 1, 32))
        else:
            pause = min(MAX_RETRY_AFTER, max(0.0, retry_after))
        state.available_at = self.clock.seconds() + pause
        self.log.warn("key {key} rate limited, resting {pause:.0f} s", key=state.masked, pause=pause)
        self._changed(state)

    def rejected(self, key: str, status: int) -> None:
        """The upstream refused this key (401/403): disable it, to be tried again much later."""
        state = self._state(key)
        if state is None:
            return
        state.failures += 1
        state.disabled = True
        state.available_at = self.clock.seconds() + REPROBE_AFTER
        self.log.error(
            "key {key} rejected by the upstream ({status}), disabled; retried in {pause:.0f} s",
            key=state.masked,
            status=status,
            pause=REPROBE_AFTER,
        )
        self._changed(state)

    def succeeded(self, key: str) -> None:
        """The upstream accepted this key: forget its failures."""
        state = self._state(key)
        if state is None or not (state.failures or state.disabled):
            return
        if state.disabled:
            self.log.info("key {key} accepted again, enabled", key=state.masked)
        state.failures = 0
        state.disabled = False
        state.available_at = 0.0
        self._changed(state)

    def apply(self, key: str, available_at: float, disabled: bool, failures: int) -> bool:
        """Take what another instance learned about a key (fwd.shared_keys): its state as that instance has it.
        Nothing is told back.  Whether anything changed."""
        state = self._state(key)
        if state is None:
            return False
        if (state.available_at, state.disabled, state.failures) == (available_at, disabled, failures):
            return False
        now = self.clock.seconds()
        if disabled and not state.disabled:
            self.log.warn("key {key} rejected through another instance, disabled", key=state.masked)
        elif state.disabled and not disabled:
            self.log.info("key {key} accepted again through another instance, enabled", key=state.masked)
        elif available_at > now >= state.available_at:
            self.log.info("key {key} rate limited through another instance, resting {pause:.0f} s",
                          key=state.masked, pause=available_at - now)
        state.available_at, state.disabled, state.failures = available_at, disabled, failures
        return True

    def _changed(self, state: KeyState) -> None:
        if self.listener is not None:
            self.listener(state)

    def health(self) -> dict:
        """Counts of keys by state, safe to publish."""
        now = self.clock.seconds()
        counts = {"available": 0, "cooling": 0, "disabled": 0}
        for state in self._states:
            counts[self._status(state, now)] += 1
        return counts

    def states(self) -> list[tuple[str, str]]:
        """(masked key, state) pairs for metrics; keys that mask alike get their place in the pool added."""
        now = self.clock.seconds()
        masks = [s.masked for s in self._states]
        return [
            (masked if masks.count(masked) == 1 else f"{masked} #{n}", self._status(state, now))
            for n, (masked, state) in enumerate(zip(masks, self._states), 1)
        ]

    @staticmethod
    def _status(state: KeyState, now: float) -> str:
        if state.disabled:
            return "disabled"
        return "cooling" if state.available_at > now else "available"

    def states_by_key(self) -> dict[str, KeyState]:
        return {state.key: state for state in self._states}

    def adopt(self, previous: dict[str, KeyState]) -> None:
        """Keep what an earlier pool learned about keys still configured, e.g. across a reload."""
        self._states = [previous.get(state.key, state) for state in self._states]

    def _state(self, key: str) -> KeyState | None:
        for state in self._states:
            if state.key == key:
                return state
        return None


def retry_after_seconds(values: list[bytes] | None, now: float) -> float | None:
    """Parse a Retry-After header: seconds or an HTTP date."""
    if not values:
        return None
    text = values[0].decode("latin-1").strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class KeyAttempts:
    """The pool keys one request tries in turn: each attempt takes the next key it has not tried, and an
    upstream refusal of a key rests or disables it before the request is replayed on the next."""

    __slots__ = ("pool", "azure", "use_pool", "key", "tried")

    def __init__(self, pool: KeyPool, kind: str, use_pool: bool):
        self.pool = pool
        self.azure = kind == "azure"
        self.use_pool = use_pool
        self.key: str | None = None
        self.tried: set[str] = set()

    def next(self, headers: list[tuple[bytes, list[bytes]]]) -> list[tuple[bytes, list[bytes]]] | errors.ProxyError:
        """The headers of the next attempt (with its pool key), or the error to answer when every key rests."""
        if not self.use_pool:
            return headers
        pool = self.pool
        key = pool.pick(self.tried)
        if key is None:
            return errors.keys_exhausted(pool.retry_after(), rate_limited=not pool.all_disabled())
        self.key = key
        self.tried.add(key)
        encoded = key.encode("latin-1")
        if self.azure:
            return [*headers, (b"api-key", [encoded])]
        return [*headers, (b"authorization", [b"Bearer " + encoded])]

    def succeeded(self) -> None:
        self.pool.succeeded(self.key)

    def refused(self, status: int, body: bytes, retry_after: float | None) -> str:
        """The upstream refused this attempt's key: "replay" on the next key, or "relay" the answer."""
        judged = verdict(status, body)
        if judged == "relay":
            return "relay"
        if judged == "rest":
            self.pool.rate_limited(self.key, retry_after)
        else:
            self.pool.rejected(self.key, status)
        return "replay"

"""Pool-key states shared by every instance: a key one instance finds rate limited or revoked is rested or
disabled by all of them within a second.  Tests: tests/test_shared.py, tests/test_redis_e2e.py

When a pool changes a key's state (fwd.keys.KeyPool.listener), the change is written to the hash
`fwd:keys:<route>` and published on the channel `fwd:keys`; every instance subscribes and applies what it
hears to its own pool.  An instance that (re)connects reads the hashes, so nothing said while it was away is
missed.  Keys are named by their keyed hash (fwd.shared.key_name), never in clear.  Which key is next in the
round-robin stays each instance's own.
"""

from __future__ import annotations

import json

from twisted.logger import Logger

from fwd.keys import KeyState
from fwd.shared import RedisUnavailable, SharedState, key_name

log = Logger(namespace="fwd.keys")

CHANNEL = "fwd:keys"
# States in the hash outlive their use by this much; a key's entry is rewritten at every change anyway.
KEEP_SECONDS = 86_400


class SharedKeys:
    """Tells the other instances of this one's key-state changes, and applies theirs."""

    def __init__(self, shared: SharedState, routes, secret: bytes):
        """`routes` gives the gateway's live routes (name -> ActiveRoute): a reload changes them."""
        self.shared = shared
        self.routes = routes
        self.secret = secret
        self._names: dict[str, str] = {}
        shared.listen(CHANNEL, self.heard)
        shared.on_up.append(self.catch_up)

    def attach(self) -> None:
        """Follow the state changes of every pool of the live routes (again after a reload)."""
        for name, active in self.routes().items():
            for pool in active.pools():
                pool.listener = lambda state, route=name: self.changed(route, state)

    def name(self, key: str) -> str:
        found = self._names.get(key)
        if found is None:
            found = self._names[key] = key_name(self.secret, key)
        return found

    def changed(self, route: str, state: KeyState) -> None:
        """This instance changed a key's state: write it and tell the others (not waited for)."""
        if not self.shared.up:
            return
        name = self.name(state.key)
        record = json.dumps({"r": route, "k": name, "a": state.available_at, "d": state.disabled,
                             "f": state.failures})
        hash_name = f"fwd:keys:{route}"
        written = self.shared.command("hset", hash_name, name, record)
        written.addCallback(lambda _: self.shared.command("expire", hash_name, KEEP_SECONDS))
        written.addCallback(lambda _: self.shared.command("publish", CHANNEL, record))
        written.addErrback(lambda reason: reason.trap(RedisUnavailable))

    def heard(self, message: bytes) -> None:
        """A state change published by an instance (this one included)."""
        try:
            record = json.loads(message)
            self.apply(record["r"], record["k"], float(record["a"]), bool(record["d"]), int(record["f"]))
        except (ValueError, KeyError, TypeError):
            log.warn("ignoring a key-state message from Redis that is not one")

    def apply(self, route: str, name: str, available_at: float, disabled: bool, failures: int) -> None:
        active = self.routes().get(route)
        if active is None:
            return
        for pool in active.pools():
            for key in pool.keys:
                if self.name(key) == name:
                    pool.apply(key, available_at, disabled, failures)
                    return

    def catch_up(self) -> None:
        """Read every route's states from Redis: what was said while this instance was not listening."""
        for route in list(self.routes()):
            reading = self.shared.command("hgetall", f"fwd:keys:{route}")
            reading.addCallback(self._read, route)
            reading.addErrback(lambda reason: reason.trap(RedisUnavailable))

    def _read(self, states, route: str) -> None:
        now = self.shared.clock.seconds()
        for value in (states or {}).values():
            try:
                record = json.loads(value)
            except (ValueError, TypeError):
                continue
            # A rest that is over says nothing any more; a disabled key stays disabled until one is accepted.
            if record.get("d") or float(record.get("a", 0)) > now:
                self.heard(value if isinstance(value, bytes) else value.encode())

"""Choosing among a route's upstreams, and resting the ones that fail.  Pure logic; time comes from the caller.
Tests: tests/test_balance.py

Choice: power of two choices.  Two upstreams are drawn at random in proportion to their weights, and the one
with the lower cost wins: (1 + requests in flight / weight) x recent latency, the latency being an
exponentially weighted moving average of the time to response headers (at least LATENCY_FLOOR: a few
milliseconds apart is a tie, and ties go by weight).  A slow or busy upstream gets less
traffic without being starved of the requests that show it recovered: one choice in EXPLORE is a plain
weighted draw.

Resting (a circuit breaker): an upstream that fails (refused connection, TLS failure, no headers in time, a 5xx,
every key resting) rests for FIRST_COOLDOWN, twice as long each time it fails again in a row, up to
MAX_COOLDOWN.  When its rest ends it gets one trial request; a success puts it back to serving, a failure
sends it to rest again, longer.
"""

from __future__ import annotations

import random as random_module

import attrs

FIRST_COOLDOWN = 1.0
MAX_COOLDOWN = 60.0
ALPHA = 0.2  # weight of the newest latency in the average
UNKNOWN_LATENCY = 0.0  # an upstream not measured yet looks fast: it is tried early and so measured
# Latencies under this count as this: upstreams a few milliseconds apart share by weight, not winner takes all.
LATENCY_FLOOR = 0.01
# What an upstream's latency says fades while nothing measures it again (half of its excess over the floor every
# this many seconds): one slow answer must not keep an upstream out for good.
HALF_LIFE = 10.0
EXPLORE = 50

SERVING = "serving"
RESTING = "resting"
TRIAL = "trial"


@attrs.define
class UpstreamHealth:
    """What the gateway knows of one upstream of a route: kept across reloads while the upstream stays."""

    in_flight: int = 0
    latency: float | None = None
    measured_at: float = 0.0
    failures: int = 0  # in a row
    errors: int = 0  # in all
    served: int = 0
    resting_until: float = 0.0
    failed_at: float = -1.0  # when the failure that started the current rest was counted
    trial_out: bool = False
    why: str = ""

    def state(self, now: float) -> str:
        if self.failures == 0:
            return SERVING
        return RESTING if now < self.resting_until or self.trial_out else TRIAL

    def available(self, now: float) -> bool:
        """Whether a request may go to it now: serving, or at the end of its rest with no trial out yet."""
        return self.failures == 0 or (now >= self.resting_until and not self.trial_out)

    def started(self, now: float) -> None:
        self.in_flight += 1
        if self.failures:
            self.trial_out = True  # the one trial of this rest

    def answered(self, now: float, latency: float) -> None:
        """Response headers came (a status it is not blamed for) after `latency` seconds.  An attempt sent before
        the failure that started its rest proves nothing about now: only a later one ends the rest."""
        self.in_flight -= 1
        self.served += 1
        if self.failures and now - latency < self.failed_at:
            return
        recovered = self.failures > 0
        self.failures = 0
        self.trial_out = False
        if recovered:
            # Neither what it was like before it failed nor its first answer after (a new connection, a cold
            # start) says how it serves now: it starts afresh, measured from its next answers.
            self.latency = None
        elif self.latency is None:
            self.latency = latency
        else:
            recent = self.recent(now)
            self.latency = recent + ALPHA * (latency - recent)
        self.measured_at = now

    def recent(self, now: float) -> float:
        """Its latency now: the average, its excess over the floor fading while unmeasured."""
        if self.latency is None:
            return UNKNOWN_LATENCY
        if self.latency <= LATENCY_FLOOR:
            return self.latency
        fade = 0.5 ** (max(0.0, now - self.measured_at) / HALF_LIFE)
        return LATENCY_FLOOR + (self.latency - LATENCY_FLOOR) * fade

    def failed(self, now: float, why: str, sent_at: float | None = None) -> float:
        """An attempt sent at `sent_at` failed: rest the upstream; how long.  Attempts already on their way when a
        failure started the rest fail with it and do not make it longer: one blip is one failure."""
        self.in_flight -= 1
        self.errors += 1
        if self.failures and sent_at is not None and sent_at < self.failed_at:
            return self.resting_until - now
        self.failures += 1
        self.failed_at = now
        self.trial_out = False
        self.why = why
        cooldown = min(FIRST_COOLDOWN * 2 ** min(self.failures - 1, 16), MAX_COOLDOWN)
        self.resting_until = now + cooldown
        return cooldown

    def left(self) -> None:
        """The request ended without a verdict on the upstream (the client left first)."""
        self.in_flight -= 1
        self.trial_out = False

    def cost(self, weight: float, now: float) -> float:
        return (1 + self.in_flight / weight) * max(self.recent(now), LATENCY_FLOOR)


def choose(candidates: list[tuple[float, UpstreamHealth]], now: float, rng: random_module.Random) -> int | None:
    """The index of the upstream to send a request to among (weight, health) pairs, or None when none is
    available now."""
    open_ = [i for i, (weight, health) in enumerate(candidates) if weight > 0 and health.available(now)]
    if not open_:
        return None
    if len(open_) == 1:
        return open_[0]
    for i in open_:
        if candidates[i][1].failures:
            return i  # a trial is due: it goes first, or a recovered upstream would wait for luck
    weights = [candidates[i][0] for i in open_]
    first = rng.choices(open_, weights)[0]
    if rng.randrange(EXPLORE) == 0:
        return first
    rest = [i for i in open_ if i != first]
    second = rng.choices(rest, [candidates[i][0] for i in rest])[0]
    cost_first = candidates[first][1].cost(candidates[first][0], now)
    cost_second = candidates[second][1].cost(candidates[second][0], now)
    return first if cost_first <= cost_second else second


def soonest(healths: list[UpstreamHealth]) -> float:
    """When the first resting upstream may be tried again (for Retry-After)."""
    return min((h.resting_until for h in healths), default=0.0)

"""How long to wait before starting again a child process that died: a doubling delay while it keeps dying,
back to the first once it has lived long enough.  Pure.  Tests: tests/test_workers.py"""

from __future__ import annotations

import attrs

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
STABLE_AFTER = 60.0


@attrs.define
class RestartBackoff:
    """The delay before the next start of one child, from how long its last life lasted."""

    first: float = FIRST_DELAY
    most: float = MAX_DELAY
    stable_after: float = STABLE_AFTER
    delay: float = 0.0

    def next_delay(self, lived: float) -> float:
        """The child died after `lived` seconds: how long to wait before starting it again."""
        if lived > self.stable_after:
            self.delay = 0.0
        self.delay = min(self.most, self.delay * 2 or self.first)
        return self.delay

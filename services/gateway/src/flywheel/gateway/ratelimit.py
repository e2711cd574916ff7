"""Per-key rate limits: a token bucket per API key, in this process's memory.

Each gateway replica limits on its own, so N replicas allow up to N times the rate; that
keeps the hot path free of a shared store, and the limit exists to stop a runaway client,
not to bill it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    """``burst`` requests at once, refilled at ``rate`` per second, per key."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        # key -> (tokens, when they were counted); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float | None:
        """Spend a token of ``key``: None if allowed, else seconds until one is available."""
        if self.rate <= 0:
            return None
        now = self.clock()
        tokens, then = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = None
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        # An evicted key starts again with a full bucket, so keep the map big enough that
        # only idle keys fall out.
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def retry_after(wait_s: float) -> str:
    """The Retry-After header value (whole seconds, at least 1) for a wait."""
    return str(max(1, math.ceil(wait_s)))

"""Client-side quota: stay under Classroom's per-minute limits instead of collecting 429s.

Google counts queries per minute per project (3,000 by default) and per user (1,200). Every
call this connector makes is made as the one delegated admin, so both limits apply to every
call and the smaller one binds; both buckets are kept anyway, so raising one limit in the
config does exactly what it says.

Each bucket starts with a burst of ``capacity`` = one twelfth of the per-minute rate (five
seconds' worth) and refills at ``(rate - capacity) / 60`` per second. That pair guarantees no
60-second window ever holds more than ``rate`` calls (at most ``capacity`` saved up plus
``rate - capacity`` refilled), whichever way Google slices its minutes, while still running at
11/12 of the rate in the long run. Retries of 429s remain the backstop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class TokenBucket:
    """``rate`` calls per minute, never more in any 60-second window."""

    name: str
    per_minute: int
    now: float
    capacity: float = field(init=False)
    refill_per_second: float = field(init=False)
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        if self.per_minute < 1:
            raise ValueError(f"{self.name}: a quota must allow at least one call per minute")
        self.capacity = float(max(1, math.ceil(self.per_minute / 12)))
        spare = self.per_minute - self.capacity
        # A tiny quota (<= 1/min) cannot keep the window guarantee and still move at all.
        self.refill_per_second = (spare if spare > 0 else self.per_minute) / 60.0
        self.tokens = self.capacity
        self.updated = self.now

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.refill_per_second)
        self.updated = now

    def wait_for_one(self) -> float:
        """Seconds until one token is available (0 if one is there now)."""
        # The epsilon absorbs float rounding after sleeping exactly the computed wait.
        return 0.0 if self.tokens >= 1 - 1e-6 else (1 - self.tokens) / self.refill_per_second


class QuotaLimiter:
    """Both of Classroom's per-minute quotas, and the count of calls made under them."""

    def __init__(
        self,
        per_minute: int,
        per_user_per_minute: int,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self.buckets = (
            TokenBucket("per_minute", per_minute, now),
            TokenBucket("per_user_per_minute", per_user_per_minute, now),
        )
        # One waiter at a time keeps the order first come, first served.
        self._lock = asyncio.Lock()
        #: API calls admitted so far (the benchmark prints this).
        self.calls = 0
        #: Calls that had to wait for a token, and the total time spent waiting.
        self.throttled = 0
        self.waited_seconds = 0.0

    async def acquire(self) -> None:
        """Wait until every bucket has a token, then take one from each."""
        async with self._lock:
            waited = False
            slept_until = 0.0
            while True:
                # Having slept `wait`, at least that much time has passed, even if the clock
                # is too coarse to show it (a float at 1.7e9 cannot add 1e-8).
                now = max(self._clock(), slept_until)
                for bucket in self.buckets:
                    bucket.refill(now)
                wait = max(bucket.wait_for_one() for bucket in self.buckets)
                if wait <= 0:
                    break
                waited = True
                self.waited_seconds += wait
                await self._sleep(wait)
                slept_until = now + wait
            for bucket in self.buckets:
                bucket.tokens -= 1
            self.calls += 1
            self.throttled += waited

"""One retry policy for every connector: tenacity, driven by the source's `retry` settings.

Only :class:`~rostersync.errors.RetriableSourceError` is retried. A server's ``Retry-After``
(carried on the error) wins over the exponential backoff, capped at ``max_wait``. Every retry
is logged with the attempt number and the reason (never a secret: messages name paths only).
The error a call ends in says how many tries were made (:func:`tries_made`): the one the
tries ran out on ``after 6 attempts``, any other error after a retry ``(on attempt 3)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from pydantic import Field
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from rostersync.config.types import StrictModel
from rostersync.errors import RetriableSourceError, SourceError

T = TypeVar("T")


def tries_made(attempts: int, retriable: bool) -> str:
    """What a call's final error adds to its message: a retriable error is the one the tries
    ran out on; another error (a 404 after two 503s) came on a later try, or on the first,
    which a single try's error need not say."""
    if retriable:
        return f" after {attempts} attempt{'s' if attempts != 1 else ''}"
    return f" (on attempt {attempts})" if attempts > 1 else ""


class RetrySettings(StrictModel):
    max_attempts: int = Field(
        default=6, ge=1, le=50, description="tries per request, first included"
    )
    max_wait: float = Field(default=60.0, gt=0, description="longest pause between tries, seconds")
    initial_wait: float = Field(default=0.5, gt=0, description="first backoff, seconds")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    settings: RetrySettings
    log: Any = None

    def _wait(self) -> Callable[[RetryCallState], float]:
        # Exponential backoff plus random jitter, composed from waits that every tenacity
        # release since 8 has (wait_exponential_jitter changed its arguments in 9.2).
        backoff = wait_exponential(
            multiplier=self.settings.initial_wait, max=self.settings.max_wait
        ) + wait_random(0, self.settings.initial_wait)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, RetriableSourceError) and exc.retry_after is not None:
                return float(min(max(exc.retry_after, 0.0), self.settings.max_wait))
            return float(backoff(state))

        return wait

    def _before_sleep(self, state: RetryCallState) -> None:
        log = self.log or structlog.get_logger()
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "retrying",
            attempt=state.attempt_number,
            max_attempts=self.settings.max_attempts,
            wait_s=round(state.upcoming_sleep, 3),
            reason=str(exc),
        )

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=self._wait(),
            retry=retry_if_exception_type(RetriableSourceError),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    return await fn()
        except SourceError as exc:
            exc.amend(tries_made(attempts, isinstance(exc, RetriableSourceError)))
            raise
        raise AssertionError("unreachable: tenacity reraises the last error")

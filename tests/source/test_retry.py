"""The shared retry policy (rostersync.source.retry): the error a call ends in says how many
tries were made, whichever connector made them."""

from __future__ import annotations

import pytest

from rostersync.errors import FatalSourceError, RetriableSourceError, SourceError
from rostersync.source.retry import RetryPolicy, RetrySettings


def policy(max_attempts: int) -> RetryPolicy:
    return RetryPolicy(RetrySettings(max_attempts=max_attempts, initial_wait=0.001, max_wait=0.01))


class Server:
    """Raises the given errors in turn, then answers "ok"; counts the calls."""

    def __init__(self, *errors: SourceError) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def test_the_error_the_tries_ran_out_on_says_how_many_were_made() -> None:
    """Three 503s with three tries allowed: the last one's message ends "after 3 attempts",
    its type, source and Retry-After as they were."""
    server = Server(*(RetriableSourceError("s", "HTTP 503 from GET /x", 0.0) for _ in range(3)))
    with pytest.raises(RetriableSourceError) as err:
        await policy(3).call(server)
    assert server.calls == 3
    assert str(err.value) == "source 's': HTTP 503 from GET /x after 3 attempts"
    assert err.value.detail == "HTTP 503 from GET /x after 3 attempts"
    assert (err.value.source, err.value.retry_after) == ("s", 0.0)


async def test_a_single_allowed_try_says_so() -> None:
    """With max_attempts 1 the one failed try is counted too, in the singular."""
    with pytest.raises(RetriableSourceError, match=r"timed out on GET /x after 1 attempt$"):
        await policy(1).call(Server(RetriableSourceError("s", "timed out on GET /x")))


async def test_a_fatal_error_says_on_which_try_it_came_unless_the_first() -> None:
    """A fatal error ends the call at once: on a later try it says which; on the first its
    message is left as it was."""
    later = Server(RetriableSourceError("s", "HTTP 503"), FatalSourceError("s", "HTTP 404"))
    with pytest.raises(FatalSourceError) as err:
        await policy(5).call(later)
    assert (later.calls, err.value.detail) == (2, "HTTP 404 (on attempt 2)")
    with pytest.raises(FatalSourceError) as err:
        await policy(5).call(Server(FatalSourceError("s", "HTTP 404")))
    assert str(err.value) == "source 's': HTTP 404"

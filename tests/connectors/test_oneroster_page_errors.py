"""What a page the sync process could not get ends in: every failure's message names the source,
the collection's path and the page's offset, and a retried one how many tries were made, with
no host, no other query parameter and no credential (respx fakes the HTTP)."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from rostersync.errors import FatalSourceError, RetriableSourceError, SourceError
from rostersync.source.records import TeacherRef
from tests.connectors.test_oneroster_unit import (
    BASE,
    FAST,
    SECRET,
    TOKEN_URL,
    fetch_all,
    mock_empty,
    oauth2_overrides,
    open_connector,
    pager,
    token_answers,
    user,
)

RECORDS = [user(i) for i in range(12)]  # three pages of 5, the last one short
OFFSET = 5  # the page that fails: the second, so the offset cannot be taken for a default
WHERE = f"GET /ims/oneroster/v1p1/users at offset={OFFSET}"
TRIES = int(FAST["max_attempts"])

Failure = Callable[[httpx.Request, httpx.Response], httpx.Response]


def answer(status: int, **headers: str) -> Failure:
    return lambda _request, _good: httpx.Response(status, headers=headers)


def raising(exc: type[httpx.TransportError], text: str) -> Failure:
    def fail(request: httpx.Request, _good: httpx.Response) -> httpx.Response:
        raise exc(text, request=request)

    return fail


def cut(_request: httpx.Request, good: httpx.Response) -> httpx.Response:
    return httpx.Response(200, content=good.content[:40], headers=dict(good.headers))


def failing_at(
    offset: int, failure: Failure, times: int | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    """Serves RECORDS, but the page at ``offset`` fails as ``failure`` says (``times`` times;
    None: always)."""
    serve = pager(RECORDS, "users")
    left = [times]

    def handler(request: httpx.Request) -> httpx.Response:
        good = serve(request)
        if int(request.url.params["offset"]) != offset or left[0] == 0:
            return good
        if left[0] is not None:
            left[0] -= 1
        return failure(request, good)

    return handler


def assert_clean(message: str, *secrets: str) -> None:
    """One line, the source named, nothing of the host, the rest of the query or a credential."""
    assert "\n" not in message
    assert message.startswith("source 'district': ")
    for leak in (SECRET, "oauth_", "limit=", "or.example.org", "Authorization", *secrets):
        assert leak not in message, leak


RETRIED = [
    (answer(503), f"HTTP 503 Service Unavailable from {WHERE} after {TRIES} attempts"),
    (answer(500), f"HTTP 500 Internal Server Error from {WHERE} after {TRIES} attempts"),
    (
        answer(429, **{"Retry-After": "0"}),
        f"HTTP 429 Too Many Requests from {WHERE} after {TRIES} attempts",
    ),
    (
        raising(httpx.ReadTimeout, "slow"),
        f"timed out (ReadTimeout) on {WHERE} after {TRIES} attempts",
    ),
    (
        raising(httpx.ConnectError, "[Errno 111] Connection refused"),
        f"connection failed (ConnectError) on {WHERE} after {TRIES} attempts",
    ),
    (
        raising(httpx.RemoteProtocolError, "Server disconnected without sending a response."),
        f"connection failed (RemoteProtocolError) on {WHERE} after {TRIES} attempts",
    ),
    (cut, f"invalid JSON from {WHERE} after {TRIES} attempts"),
]


@pytest.mark.parametrize(
    ("failure", "expected"),
    RETRIED,
    ids=["503", "500", "429", "timeout", "refused", "dropped", "cut-json"],
)
async def test_a_page_that_keeps_failing_names_its_path_offset_and_attempts(
    failure: Failure, expected: str
) -> None:
    """Each retriable failure, once the tries run out, names the page and the tries made."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=failing_at(OFFSET, failure))
        async with open_connector(page_size=5, decode_workers=0) as c:
            with pytest.raises(RetriableSourceError) as err:
                await fetch_all(c)
    tries = [r for r in route.calls if r.request.url.params["offset"] == str(OFFSET)]
    assert len(tries) == TRIES
    assert err.value.detail == expected
    assert str(err.value) == f"source 'district': {expected}"
    assert_clean(str(err.value))


FATAL = [
    (answer(404), f"HTTP 404 Not Found from {WHERE}"),
    (answer(410), f"HTTP 410 Gone from {WHERE}"),
    (
        answer(403),
        f"HTTP 403 Forbidden from {WHERE}: the server refused our credentials or their "
        "permissions; check the source's auth settings",
    ),
]


@pytest.mark.parametrize(("failure", "expected"), FATAL, ids=["404", "410", "403"])
async def test_a_fatal_page_failure_names_its_path_and_offset_after_one_try(
    failure: Failure, expected: str
) -> None:
    """A 4xx stops the run at once, naming the page; a single try says nothing of attempts."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=failing_at(OFFSET, failure))
        async with open_connector(page_size=5, decode_workers=0) as c:
            with pytest.raises(FatalSourceError) as err:
                await fetch_all(c)
    assert [r.request.url.params["offset"] for r in route.calls].count(str(OFFSET)) == 1
    assert err.value.detail == expected
    assert_clean(str(err.value))


async def test_a_fatal_answer_after_retries_says_on_which_attempt_it_came() -> None:
    """Two 503s and then a 404: the 404 ends the run, and says it came on the third try."""
    sequence = iter([answer(503), answer(503), answer(404)])

    def then(request: httpx.Request, good: httpx.Response) -> httpx.Response:
        return next(sequence)(request, good)

    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        router.get(f"{BASE}/users").mock(side_effect=failing_at(OFFSET, then, times=3))
        async with open_connector(page_size=5, decode_workers=0) as c:
            with pytest.raises(FatalSourceError) as err:
                await fetch_all(c)
    assert err.value.detail == f"HTTP 404 Not Found from {WHERE} (on attempt 3)"


async def test_each_retry_logs_the_page_and_no_secret() -> None:
    """The "retrying" lines name the page's path and offset in their reason, with the attempt
    number; neither they nor the final error carry the client secret or a signature."""
    with capture_logs() as logs, respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=failing_at(OFFSET, answer(502)))
        async with open_connector(page_size=5, decode_workers=0) as c:
            with pytest.raises(RetriableSourceError) as err:
                await fetch_all(c)
        signatures = {r.request.headers["Authorization"] for r in route.calls}
    retries = [e for e in logs if e["event"] == "retrying"]
    assert [e["attempt"] for e in retries] == list(range(1, TRIES))
    assert {e["reason"] for e in retries} == {
        f"source 'district': HTTP 502 Bad Gateway from {WHERE}"
    }
    assert str(err.value).endswith(f"from {WHERE} after {TRIES} attempts")
    assert all(s.startswith("OAuth ") and "oauth_signature=" in s for s in signatures)
    shown = repr(logs) + str(err.value)
    assert SECRET not in shown
    assert not any(s in shown for s in signatures)


async def test_an_oauth2_token_never_appears_in_a_page_error() -> None:
    """With an OAuth2 token on every request, the page's final error names the page and the
    tries, never the token or the client secret."""
    with respx.mock(assert_all_called=False) as router:
        router.post(TOKEN_URL).mock(side_effect=token_answers())
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=failing_at(OFFSET, answer(503)))
        async with open_connector(page_size=5, decode_workers=0, **oauth2_overrides()) as c:
            with pytest.raises(RetriableSourceError) as err:
                await fetch_all(c)
        assert route.calls[-1].request.headers["Authorization"] == "Bearer tok-1"
    assert err.value.detail.endswith(f"from {WHERE} after {TRIES} attempts")
    assert_clean(str(err.value), "tok-1", "Bearer")


async def test_a_request_without_an_offset_is_named_by_its_path_alone() -> None:
    """A single record's request (the live teacher fetch) has no offset to name."""
    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/users/t-1").mock(return_value=httpx.Response(502))
        async with open_connector() as c:
            with pytest.raises(SourceError) as err:
                await c.fetch_teacher(TeacherRef("t-1", "t1@example.org"))
    path = "/ims/oneroster/v1p1/users/t-1"
    assert err.value.detail == f"HTTP 502 Bad Gateway from GET {path} after {TRIES} attempts"


def _token_refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.mark.parametrize(
    ("token_answer", "what"),
    [
        pytest.param(lambda _r: httpx.Response(503), "HTTP 503 Service Unavailable from", id="503"),
        pytest.param(_token_refused, "connection failed (ConnectError) on", id="refused"),
    ],
)
async def test_a_token_request_that_keeps_failing_names_the_token_endpoint_and_the_page(
    token_answer: Callable[[httpx.Request], httpx.Response], what: str
) -> None:
    """An OAuth2 token request that fails, by its answer or its connection, is named as the
    token request, with the page it was made for, not as the page's own request."""
    with respx.mock(assert_all_called=False) as router:
        token = router.post(TOKEN_URL).mock(side_effect=token_answer)
        mock_empty(router, "orgs", "classes", "enrollments", "users")
        async with open_connector(page_size=5, decode_workers=0, **oauth2_overrides()) as c:
            with pytest.raises(RetriableSourceError) as err:
                await fetch_all(c)
    assert token.call_count >= TRIES  # the collections ask at once, each its own tries
    page = r"GET /ims/oneroster/v1p1/(orgs|users|classes|enrollments) at offset=0"
    expected = (
        f"{re.escape(what)} POST /oauth/token \\(the token for {page}\\) after {TRIES} attempts"
    )
    assert re.fullmatch(expected, err.value.detail), err.value.detail
    assert_clean(str(err.value))

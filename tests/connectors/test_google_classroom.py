"""The Google Classroom connector, against the loopback fake Classroom and, for the error
sorting, respx."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import respx
from pydantic import ValidationError
from structlog.testing import capture_logs

from connectors.google_classroom import (
    NO_EMAIL_REASON,
    PLUGIN,
    SCOPES,
    GoogleClassroomConnector,
    GoogleClassroomSourceConfig,
    QuotaLimiter,
)
from connectors.google_classroom.api import (
    ForbiddenError,
    NotFoundError,
    PageTokens,
    raise_for_response,
)
from rostersync.errors import DeltaUnsupportedError, FatalSourceError, RetriableSourceError
from rostersync.source.connector import Connector, ConnectorContext, FetchMode
from rostersync.source.records import (
    MemoryRoster,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterPerson,
    RosterRecord,
    TeacherRef,
)
from rostersync.source.testdata import small_roster
from rostersync.source.testing import ConnectorContract, collect, people
from tests.fakes.classroom_server import FakeClassroom, generate_keypair, generate_private_pem

CLIENT_EMAIL = "rostersync@district-sync.iam.gserviceaccount.com"
ADMIN = "admin@example.org"
FAST_RETRY = {"initial_wait": 0.01, "max_wait": 0.05}


# -- keys, config, fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    """(private PEM, public PEM), generated once per module: RSA key generation is slow."""
    return generate_keypair()


@pytest.fixture(scope="module")
def stranger_pem() -> str:
    """A private key the fake server does not know (a deleted or foreign key)."""
    return generate_private_pem()


GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


def service_account(private_pem: str, token_uri: str = GOOGLE_TOKEN_URI) -> dict[str, str]:
    return {
        "type": "service_account",
        "project_id": "district-sync",
        "private_key_id": "0123456789abcdef",
        "private_key": private_pem,
        "client_email": CLIENT_EMAIL,
        "client_id": "104200000000000000001",
        "token_uri": token_uri,
    }


def classroom_config(
    private_pem: str, *, api_base_url: str, token_uri: str, **overrides: Any
) -> GoogleClassroomSourceConfig:
    data: dict[str, Any] = {
        "type": "google_classroom",
        "service_account_json": json.dumps(service_account(private_pem, token_uri)),
        "delegated_admin": ADMIN,
        "api_base_url": api_base_url,
        "retry": FAST_RETRY,
        **overrides,
    }
    return GoogleClassroomSourceConfig.model_validate(data)


class FakeTime:
    """A hand-driven clock; its sleep advances time instead of waiting."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[], None] | None = None

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if self.on_sleep is not None:
            self.on_sleep()
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def start_fake(roster: MemoryRoster, public_pem: str, **options: Any) -> FakeClassroom:
    return FakeClassroom(
        roster, public_key_pem=public_pem, client_email=CLIENT_EMAIL, allowed_sub=ADMIN, **options
    )


@pytest.fixture
def fake(keypair: tuple[str, str]) -> Iterator[FakeClassroom]:
    with start_fake(small_roster(), keypair[1]) as server:
        yield server


Connect = Callable[..., GoogleClassroomConnector]


@pytest.fixture
async def connect(fake: FakeClassroom, keypair: tuple[str, str]) -> AsyncIterator[Connect]:
    """Build connectors against `fake` (or `server=`); closes their HTTP clients afterwards."""
    clients: list[httpx.AsyncClient] = []

    def make(
        *,
        server: FakeClassroom | None = None,
        private_pem: str | None = None,
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] | None = None,
        sleep: Callable[[float], Any] | None = None,
        **overrides: Any,
    ) -> GoogleClassroomConnector:
        target = server or fake
        config = classroom_config(
            private_pem or keypair[0],
            api_base_url=target.api_base_url,
            token_uri=target.token_url,
            **overrides,
        )
        http = httpx.AsyncClient(**config.http_client_options())
        clients.append(http)
        kwargs: dict[str, Any] = {}
        if clock is not None:
            kwargs["clock"] = clock
        if monotonic is not None:
            kwargs["monotonic"] = monotonic
        if sleep is not None:
            kwargs["sleep"] = sleep
        return GoogleClassroomConnector(ConnectorContext("workspace", config, http), **kwargs)

    yield make
    for client in clients:
        await client.aclose()


T = TypeVar("T")


def of_type(records: list[RosterRecord], kind: type[T]) -> list[T]:
    return [r for r in records if isinstance(r, kind)]


# -- the shared contract -----------------------------------------------------------------


class TestClassroomConnector(ConnectorContract):
    @pytest.fixture
    async def connector(self, connect: Connect) -> Connector:
        # page_size 2: every roster with more than two members must be followed to page two.
        return connect(page_size=2)


# -- fetching and mapping ----------------------------------------------------------------


async def test_every_student_arrives_with_one_per_page(
    connect: Connect, fake: FakeClassroom
) -> None:
    """With page_size=1 every page of courses, teachers and students is followed."""
    got = await collect(connect(page_size=1))
    assert {p.sourced_id for p in of_type(got, RosterPerson) if p.role == "student"} == {
        f"s-{i}" for i in range(1, 6)
    }
    assert len(of_type(got, RosterEnrollment)) == 10
    # 3 courses; teachers 1+2+1; students 3+3 and one empty page for the empty class.
    assert (fake.calls["courses"], fake.calls["teachers"], fake.calls["students"]) == (3, 4, 7)
    assert all(len(r.query["pageSize"]) == 1 for r in fake.requests if r.endpoint != "token")


async def test_course_states_are_always_sent(connect: Connect, fake: FakeClassroom) -> None:
    """Every courses.list call names courseStates explicitly, even with the default."""
    await collect(connect(page_size=1))
    requests = fake.requests_to("courses")
    assert requests
    assert all(r.query["courseStates"] == ["ACTIVE"] for r in requests)


async def test_default_states_leave_archived_courses_out(
    connect: Connect, keypair: tuple[str, str]
) -> None:
    """An archived course is not read with the default course_states."""
    with start_fake(small_roster(), keypair[1], course_states={"c-3": "ARCHIVED"}) as server:
        got = await collect(connect(server=server))
    assert {c.sourced_id for c in of_type(got, RosterClass)} == {"c-1", "c-2"}


async def test_non_active_courses_are_tobedeleted_without_roster_calls(
    connect: Connect, keypair: tuple[str, str]
) -> None:
    """A non-active state asked for comes as a tobedeleted class, its roster left unread."""
    with start_fake(small_roster(), keypair[1], course_states={"c-3": "ARCHIVED"}) as server:
        got = await collect(connect(server=server, course_states=["ACTIVE", "ARCHIVED"]))
        course_calls = server.requests_to("courses")
        roster_paths = {r.path for r in server.requests if r.endpoint in ("teachers", "students")}
    status = {c.sourced_id: c.status for c in of_type(got, RosterClass)}
    assert status == {"c-1": "active", "c-2": "active", "c-3": "tobedeleted"}
    assert course_calls[0].query["courseStates"] == ["ACTIVE", "ARCHIVED"]
    assert not any("/c-3/" in path for path in roster_paths)


async def test_course_owner_is_the_primary_teacher(connect: Connect) -> None:
    """The course owner's teacher enrollment is primary; co-teachers are not."""
    got = await collect(connect())
    primary = {(e.class_id, e.user_id) for e in of_type(got, RosterEnrollment) if e.primary}
    assert primary == {("c-1", "t-1"), ("c-2", "t-2"), ("c-3", "t-3")}
    assert {e.sourced_id for e in of_type(got, RosterEnrollment)} >= {"c-2:t-1:teacher"}


async def test_teacher_who_is_also_a_student_is_yielded_once_as_teacher(
    connect: Connect, keypair: tuple[str, str]
) -> None:
    """A person on two rosters in two roles is one teacher, with both enrollments."""
    roster = small_roster()
    roster.enrollments.append(RosterEnrollment("x", "c-3", "s-1", "teacher"))
    with start_fake(roster, keypair[1]) as server:
        got = await collect(connect(server=server, page_size=1))
    s1 = [p for p in of_type(got, RosterPerson) if p.sourced_id == "s-1"]
    assert [p.role for p in s1] == ["teacher"]
    assert {(e.class_id, e.role) for e in of_type(got, RosterEnrollment) if e.user_id == "s-1"} == {
        ("c-1", "student"),
        ("c-3", "teacher"),
    }


async def test_missing_emails_are_rejected_with_the_scope_hint(
    connect: Connect, keypair: tuple[str, str]
) -> None:
    """Without emails each person is still yielded, plus a rejection naming the scope."""
    with start_fake(small_roster(), keypair[1], omit_emails=True) as server:
        got = await collect(connect(server=server))
    persons = of_type(got, RosterPerson)
    assert len(persons) == 8
    assert all(p.email is None for p in persons)
    assert {(r.entity, r.sourced_id, r.reason) for r in of_type(got, Rejected)} == {
        ("user", p.sourced_id, NO_EMAIL_REASON) for p in persons
    }
    assert NO_EMAIL_REASON == "no email address (is the classroom.profile.emails scope granted?)"


async def test_concurrency_is_bounded_by_max_concurrency(
    connect: Connect, keypair: tuple[str, str]
) -> None:
    """No more than max_concurrency API calls are ever in flight, and that many are used."""
    with start_fake(small_roster(), keypair[1], latency=0.05) as server:
        await collect(connect(server=server, max_concurrency=2))
    assert server.max_in_flight == 2


async def test_delta_is_refused(connect: Connect) -> None:
    """Classroom has no change filter: a delta fetch raises DeltaUnsupportedError."""
    connector = connect()
    assert connector.supports_delta is False
    with pytest.raises(DeltaUnsupportedError):
        await collect(connector, FetchMode.DELTA)


async def test_plugin_creates_a_connector(fake: FakeClassroom, keypair: tuple[str, str]) -> None:
    """The entry-point plugin names the type, the config model and a working factory."""
    config = classroom_config(keypair[0], api_base_url=fake.api_base_url, token_uri=fake.token_url)
    async with httpx.AsyncClient() as http:
        connector = PLUGIN.create(ConnectorContext("workspace", config, http))
        assert isinstance(connector, Connector)
        assert people(await collect(connector)) == people(list(small_roster().persons))
    assert (PLUGIN.type, PLUGIN.config_model) == ("google_classroom", GoogleClassroomSourceConfig)


# -- live teacher fetch ------------------------------------------------------------------


async def test_fetch_teacher_by_email(connect: Connect, fake: FakeClassroom) -> None:
    """A live fetch lists courses by the teacher's email and returns every student."""
    got = await connect(page_size=1).fetch_teacher(TeacherRef("t-1", "ada@example.org"))
    assert {c.sourced_id for c in got.classes} == {"c-1", "c-2"}
    assert got.teacher is not None and got.teacher.sourced_id == "t-1"
    assert {p.sourced_id for p in got.persons if p.role == "student"} == {
        f"s-{i}" for i in range(1, 6)
    }
    queries = [r.query for r in fake.requests_to("courses")]
    assert queries and all(
        q["teacherId"] == ["ada@example.org"] and q["courseStates"] == ["ACTIVE"] for q in queries
    )


async def test_fetch_teacher_by_id_without_email(connect: Connect, fake: FakeClassroom) -> None:
    """Without an email the teacher's id is used as teacherId."""
    got = await connect().fetch_teacher(TeacherRef("t-3", None))
    assert [c.sourced_id for c in got.classes] == ["c-3"]
    assert got.persons == []
    assert fake.requests_to("courses")[0].query["teacherId"] == ["t-3"]


async def test_fetch_teacher_unknown_user_has_no_classes(connect: Connect) -> None:
    """A teacherId Classroom does not know (404) is an empty roster, not an error."""
    got = await connect().fetch_teacher(TeacherRef("t-404", "gone@example.org"))
    assert (got.teacher, got.classes, got.enrollments) == (None, [], [])


# -- quota -----------------------------------------------------------------------------


async def test_quota_bucket_admits_its_capacity_then_waits() -> None:
    """A fresh bucket admits capacity (rate/12) calls at once, then makes the next one wait."""
    clock = FakeTime()
    limiter = QuotaLimiter(3000, 120, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        await limiter.acquire()
    assert clock.sleeps == []
    await limiter.acquire()
    assert len(clock.sleeps) == 1 and clock.sleeps[0] > 0
    assert (limiter.calls, limiter.throttled) == (11, 1)


async def test_quota_never_exceeds_the_rate_in_any_minute() -> None:
    """No 60-second window ever holds more calls than the per-minute quota."""
    clock = FakeTime()
    limiter = QuotaLimiter(60, 1200, clock=clock, sleep=clock.sleep)
    stamps = []
    for _ in range(300):
        await limiter.acquire()
        stamps.append(clock.now)
    busiest = max(sum(1 for t in stamps if start <= t < start + 60) for start in stamps)
    assert busiest <= 60
    # ...while still moving at 11/12 of the rate over the long run.
    assert 300 / (stamps[-1] - stamps[0]) * 60 >= 60 * 11 / 12 - 0.5


async def test_quota_smaller_limit_binds_whichever_it_is() -> None:
    """Both buckets count every call, so the smaller per-minute limit decides."""
    for project, user in ((600, 60), (60, 600)):
        clock = FakeTime()
        limiter = QuotaLimiter(project, user, clock=clock, sleep=clock.sleep)
        for _ in range(5):
            await limiter.acquire()
        assert clock.sleeps == []
        await limiter.acquire()
        assert clock.sleeps, (project, user)


async def test_connector_waits_for_quota_and_counts_calls(
    connect: Connect, fake: FakeClassroom
) -> None:
    """A small quota makes the fetch wait after the bucket's capacity; every call is counted."""
    clock = FakeTime()
    admitted_at_first_wait: list[int] = []
    connector = connect(
        quota={"per_minute": 3000, "per_user_per_minute": 24},  # capacity 2, 22/min after
        monotonic=clock,
        sleep=clock.sleep,
    )
    clock.on_sleep = lambda: admitted_at_first_wait.append(connector.quota.calls)
    got = await collect(connector)
    assert admitted_at_first_wait[0] <= 2
    assert people(got) == people(list(small_roster().persons))
    assert connector.api_calls == fake.api_calls() == 7
    # Five calls beyond the burst at 22 a minute take at least 5/22 of a minute.
    assert sum(clock.sleeps) >= 5 * 60 / 22 - 1e-6


# -- retries and failures --------------------------------------------------------------


async def test_resource_exhausted_is_retried_then_succeeds(
    connect: Connect, fake: FakeClassroom
) -> None:
    """429 RESOURCE_EXHAUSTED is retried with backoff and the fetch completes."""
    fake.fail_quota(2)
    with capture_logs() as logs:
        got = await collect(connect())
    assert people(got) == people(list(small_roster().persons))
    assert fake.api_calls() == 7 + 2
    retries = [e for e in logs if e["event"] == "retrying"]
    assert len(retries) == 2 and all("RESOURCE_EXHAUSTED" in e["reason"] for e in retries)


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_retried(
    connect: Connect, fake: FakeClassroom, status: int
) -> None:
    """A 5xx is retried and the fetch completes."""
    fake.fail_server(2, status)
    got = await collect(connect())
    assert classes_of(got) == {"c-1", "c-2", "c-3"}
    assert fake.api_calls() == 7 + 2


async def test_retries_give_up_after_max_attempts(connect: Connect, fake: FakeClassroom) -> None:
    """Past max_attempts the RetriableSourceError reaches the engine, saying how many tries
    were made (the shared retry policy's count)."""
    fake.fail_server(50)
    with pytest.raises(RetriableSourceError, match=r"503.* after 2 attempts$"):
        await collect(connect(retry={**FAST_RETRY, "max_attempts": 2}))


async def test_token_endpoint_outage_is_retried(connect: Connect, fake: FakeClassroom) -> None:
    """A 503 from the token endpoint is retried like any other outage."""
    fake.fail_token(1)
    got = await collect(connect())
    assert classes_of(got) == {"c-1", "c-2", "c-3"}
    assert fake.calls["token"] == 2


async def test_forbidden_course_is_rejected_and_the_rest_fetched(
    connect: Connect, fake: FakeClassroom
) -> None:
    """A 403 on one course's roster rejects that course; the others arrive whole."""
    fake.forbidden_courses.add("c-2")
    got = await collect(connect(page_size=1))
    [rejected] = of_type(got, Rejected)
    assert (rejected.entity, rejected.sourced_id) == ("class", "c-2")
    assert rejected.reason.startswith("forbidden: ") and "PERMISSION_DENIED" in rejected.reason
    assert classes_of(got) == {"c-1", "c-3"}
    assert {e.class_id for e in of_type(got, RosterEnrollment)} == {"c-1", "c-3"}
    # t-2 and s-4/s-5 are only on the refused course's roster.
    assert {p.sourced_id for p in of_type(got, RosterPerson)} == {
        "t-1", "t-3", "s-1", "s-2", "s-3",
    }  # fmt: skip


def _assert_no_secret(text: str, private_pem: str, fake: FakeClassroom | None = None) -> None:
    assert "PRIVATE KEY" not in text
    assert all(line not in text for line in private_pem.splitlines()[1:-1])
    assert "eyJ" not in text  # no JWT (assertion) fragment
    assert "ya29" not in text
    for token in fake.issued_tokens if fake else []:
        assert token not in text


async def test_bad_key_stops_the_run_with_a_delegation_hint(
    connect: Connect, fake: FakeClassroom, stranger_pem: str
) -> None:
    """A key the token endpoint rejects is fatal; the message says what to check, no secret."""
    with capture_logs() as logs, pytest.raises(FatalSourceError) as caught:
        await collect(connect(private_pem=stranger_pem))
    message = str(caught.value)
    assert "invalid_grant" in message and "Invalid JWT Signature" in message
    assert "Domain-wide delegation" in message and "104200000000000000001" in message
    assert all(scope in message for scope in SCOPES)
    assert ADMIN in message
    _assert_no_secret(message, stranger_pem)
    _assert_no_secret(repr(logs), stranger_pem)
    assert fake.calls["token"] == 1  # fatal: not retried
    assert fake.api_calls() == 0


async def test_wrong_delegated_admin_is_an_invalid_grant(
    connect: Connect, keypair: tuple[str, str]
) -> None:
    """Impersonating someone delegation does not allow names that address in the message."""
    with pytest.raises(FatalSourceError) as caught:
        await collect(connect(delegated_admin="teacher@example.org"))
    message = str(caught.value)
    assert "invalid_grant" in message and "Invalid email or User ID" in message
    assert "delegated_admin teacher@example.org" in message
    _assert_no_secret(message, keypair[0])


async def test_token_is_cached_across_calls_and_fetches(
    connect: Connect, fake: FakeClassroom
) -> None:
    """One token serves every call of two full fetches."""
    connector = connect(page_size=1)
    await collect(connector)
    await collect(connector)
    assert fake.calls["token"] == 1
    assert fake.api_calls() == 2 * 14  # every call of both fetches went through on it
    claims = fake.token_claims[0]
    assert claims["sub"] == ADMIN and claims["iss"] == CLIENT_EMAIL
    assert claims["aud"] == fake.token_url and claims["exp"] - claims["iat"] <= 3600
    assert set(claims["scope"].split()) == set(SCOPES)


async def test_token_is_renewed_five_minutes_before_expiry(
    connect: Connect, fake: FakeClassroom
) -> None:
    """The cached token is used until five minutes before it expires, then renewed."""
    clock = FakeTime()
    connector = connect(clock=clock)
    await connector.fetch_teacher(TeacherRef("t-3", None))
    clock.now += 3600 - 301
    await connector.fetch_teacher(TeacherRef("t-3", None))
    assert fake.calls["token"] == 1
    clock.now += 2
    await connector.fetch_teacher(TeacherRef("t-3", None))
    assert fake.calls["token"] == 2


async def test_revoked_token_is_renewed_once(connect: Connect, fake: FakeClassroom) -> None:
    """A 401 on a cached token gets one fresh token and the call goes through."""
    connector = connect()
    await collect(connector)
    fake.revoke_tokens()
    got = await collect(connector)
    assert classes_of(got) == {"c-1", "c-2", "c-3"}
    assert fake.calls["token"] == 2


def classes_of(records: list[RosterRecord]) -> set[str]:
    return {c.sourced_id for c in of_type(records, RosterClass)}


# -- error sorting (hand-built responses and respx) -------------------------------------


def _google(code: int, status: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"code": code, "message": "details", "status": status}}
    return httpx.Response(code, json=body, headers=headers)


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (_google(429, "RESOURCE_EXHAUSTED"), RetriableSourceError),
        (_google(403, "RESOURCE_EXHAUSTED"), RetriableSourceError),
        (_google(500, "INTERNAL"), RetriableSourceError),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), RetriableSourceError),
        (_google(401, "UNAUTHENTICATED"), FatalSourceError),
        (_google(403, "PERMISSION_DENIED"), ForbiddenError),
        (_google(404, "NOT_FOUND"), NotFoundError),
        (_google(400, "INVALID_ARGUMENT"), FatalSourceError),
    ],
)
def test_responses_are_sorted_into_retriable_and_fatal(
    response: httpx.Response, error: type[Exception]
) -> None:
    """429/RESOURCE_EXHAUSTED/5xx are retriable; 401/403/404/other 4xx are fatal."""
    with pytest.raises(error) as caught:
        raise_for_response("ws", response, "/v1/courses", auth_hint="Check delegation.")
    assert type(caught.value) is error
    assert "/v1/courses" in str(caught.value)


def test_unauthorised_response_carries_the_hint() -> None:
    """A 401 from the API tells the admin what to check."""
    with pytest.raises(FatalSourceError, match="Check delegation"):
        raise_for_response(
            "ws", _google(401, "UNAUTHENTICATED"), "/v1/courses", auth_hint="Check delegation."
        )


def test_retry_after_is_carried_on_the_error() -> None:
    """A Retry-After header reaches the retry policy through the error."""
    with pytest.raises(RetriableSourceError) as caught:
        raise_for_response("ws", _google(429, "RESOURCE_EXHAUSTED", {"Retry-After": "7"}), "/x")
    assert caught.value.retry_after == 7.0


def test_page_tokens_refuse_a_repeated_token() -> None:
    """A server handing back an earlier nextPageToken stops the fetch instead of looping."""
    pages = PageTokens("ws", "/v1/courses")
    assert pages.advance({"nextPageToken": "a"}) and pages.token == "a"
    assert pages.advance({"nextPageToken": "b"})
    with pytest.raises(FatalSourceError, match="repeated"):
        pages.advance({"nextPageToken": "a"})
    assert PageTokens("ws", "/x").advance({}) is False


RESPX_BASE = "https://classroom.test"
RESPX_TOKEN = "https://oauth2.test/token"


@pytest.fixture
async def mocked(
    keypair: tuple[str, str],
) -> AsyncIterator[tuple[respx.MockRouter, GoogleClassroomConnector]]:
    """A connector whose HTTP is answered by respx; the token endpoint answers by default."""
    config = classroom_config(keypair[0], api_base_url=RESPX_BASE, token_uri=RESPX_TOKEN)
    with respx.mock(assert_all_called=False) as router:
        router.post(RESPX_TOKEN).respond(json={"access_token": "ya29.respx", "expires_in": 3600})
        async with httpx.AsyncClient() as http:
            yield router, GoogleClassroomConnector(ConnectorContext("ws", config, http))


async def test_respx_quota_error_honours_retry_after_then_succeeds(
    mocked: tuple[respx.MockRouter, GoogleClassroomConnector],
) -> None:
    """A 429 on the course list is retried; the next answer is used."""
    router, connector = mocked
    route = router.get(f"{RESPX_BASE}/v1/courses").mock(
        side_effect=[
            _google(429, "RESOURCE_EXHAUSTED", {"Retry-After": "0.01"}),
            httpx.Response(200, json={}),
        ]
    )
    assert await collect(connector) == []
    assert route.call_count == 2
    assert route.calls[-1].request.headers["Authorization"] == "Bearer ya29.respx"


async def test_respx_timeout_is_retried(
    mocked: tuple[respx.MockRouter, GoogleClassroomConnector],
) -> None:
    """A timeout is retriable."""
    router, connector = mocked
    route = router.get(f"{RESPX_BASE}/v1/courses").mock(
        side_effect=[httpx.ConnectTimeout("slow"), httpx.Response(200, json={})]
    )
    await collect(connector)
    assert route.call_count == 2


async def test_respx_course_list_forbidden_is_fatal(
    mocked: tuple[respx.MockRouter, GoogleClassroomConnector],
) -> None:
    """A 403 on the course list itself stops the run and asks about the admin's rights."""
    router, connector = mocked
    router.get(f"{RESPX_BASE}/v1/courses").mock(return_value=_google(403, "PERMISSION_DENIED"))
    with pytest.raises(FatalSourceError, match="Workspace admin") as caught:
        await collect(connector)
    assert not isinstance(caught.value, ForbiddenError)


async def test_respx_api_unauthorised_with_fresh_token_is_fatal(
    mocked: tuple[respx.MockRouter, GoogleClassroomConnector],
) -> None:
    """A 401 on a token just issued is fatal at once, with the delegation hint."""
    router, connector = mocked
    router.get(f"{RESPX_BASE}/v1/courses").mock(return_value=_google(401, "UNAUTHENTICATED"))
    with pytest.raises(FatalSourceError, match="Domain-wide delegation") as caught:
        await collect(connector)
    assert "ya29.respx" not in str(caught.value)
    assert router.routes[0].call_count == 1


async def test_respx_repeated_page_token_is_fatal(
    mocked: tuple[respx.MockRouter, GoogleClassroomConnector],
) -> None:
    """A course list that keeps returning the same nextPageToken is stopped."""
    router, connector = mocked
    route = router.get(f"{RESPX_BASE}/v1/courses").respond(json={"nextPageToken": "again"})
    with pytest.raises(FatalSourceError, match="repeated"):
        await collect(connector)
    assert route.call_count == 2


#: Bodies that are JSON to a reader, but that the stdlib parser cannot turn into values: a
#: nesting deeper than its recursion limit, an integer of more digits than Python converts.
UNPARSABLE_JSON = {
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "huge integer": b'{"courses": [], "n": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("body", UNPARSABLE_JSON.values(), ids=UNPARSABLE_JSON.keys())
async def test_respx_an_answer_the_parser_cannot_take_is_fatal_not_a_crash(
    mocked: tuple[respx.MockRouter, GoogleClassroomConnector], body: bytes
) -> None:
    """A course list the parser gives up on stops the run naming the request."""
    router, connector = mocked
    router.get(f"{RESPX_BASE}/v1/courses").respond(200, content=body)
    with pytest.raises(FatalSourceError, match=r"GET /v1/courses did not return JSON"):
        await collect(connector)


@pytest.mark.parametrize("body", UNPARSABLE_JSON.values(), ids=UNPARSABLE_JSON.keys())
async def test_respx_an_error_or_token_answer_the_parser_cannot_take_is_named(
    keypair: tuple[str, str], body: bytes
) -> None:
    """An error body or a token answer the parser gives up on is sorted by its status."""
    response = httpx.Response(403, content=body)
    with pytest.raises(ForbiddenError, match=r"GET /v1/courses -> 403"):
        raise_for_response("ws", response, "/v1/courses")
    config = classroom_config(keypair[0], api_base_url=RESPX_BASE, token_uri=RESPX_TOKEN)
    with respx.mock(assert_all_called=False) as router:
        router.post(RESPX_TOKEN).respond(400, content=body)
        async with httpx.AsyncClient() as http:
            refused = GoogleClassroomConnector(ConnectorContext("ws", config, http))
            with pytest.raises(FatalSourceError, match="refused the service account"):
                await collect(refused)
        router.post(RESPX_TOKEN).respond(200, content=body)
        async with httpx.AsyncClient() as http:
            garbled = GoogleClassroomConnector(ConnectorContext("ws", config, http))
            with pytest.raises(FatalSourceError, match="token endpoint did not return JSON"):
                await collect(garbled)


# -- config ----------------------------------------------------------------------------


def _base(**extra: Any) -> dict[str, Any]:
    return {"type": "google_classroom", "delegated_admin": ADMIN, **extra}


def test_config_defaults(keypair: tuple[str, str]) -> None:
    """Defaults: ACTIVE courses, 100 a page, 4 in flight, Google's quotas and endpoints."""
    config = GoogleClassroomSourceConfig.model_validate(
        _base(service_account_json=json.dumps(service_account(keypair[0])))
    )
    assert config.course_states == ["ACTIVE"]
    assert (config.page_size, config.max_concurrency) == (100, 4)
    assert (config.quota.per_minute, config.quota.per_user_per_minute) == (3000, 1200)
    assert config.api_base_url == "https://classroom.googleapis.com"
    assert config.effective_token_url == "https://oauth2.googleapis.com/token"
    assert config.http_client_options() == {"timeout": 30.0}


@pytest.mark.parametrize("both", [True, False])
def test_config_needs_exactly_one_key_source(
    keypair: tuple[str, str], tmp_path: Path, both: bool
) -> None:
    """Neither or both of service_account_file/_json is an error."""
    extra: dict[str, Any] = {}
    if both:
        key_file = tmp_path / "sa.json"
        key_file.write_text(json.dumps(service_account(keypair[0])))
        extra = {
            "service_account_file": str(key_file),
            "service_account_json": key_file.read_text(),
        }
    with pytest.raises(ValidationError, match="exactly one of service_account_file") as caught:
        GoogleClassroomSourceConfig.model_validate(_base(**extra))
    _assert_no_secret(str(caught.value), keypair[0])


def test_config_relative_key_file_is_resolved_against_the_config_folder(
    keypair: tuple[str, str], tmp_path: Path
) -> None:
    """service_account_file is relative to the config file's folder (base_dir)."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "sa.json").write_text(
        json.dumps(service_account(keypair[0], "https://tokens.example/token"))
    )
    config = GoogleClassroomSourceConfig.model_validate(
        _base(service_account_file="keys/sa.json"), context={"base_dir": tmp_path}
    )
    assert config.service_account_file == tmp_path / "keys" / "sa.json"
    assert config.service_account.client_email == CLIENT_EMAIL
    assert config.effective_token_url == "https://tokens.example/token"


def test_config_key_file_from_systemd_credentials(
    keypair: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare file name is looked up in $CREDENTIALS_DIRECTORY (systemd LoadCredential)."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "google-sa.json").write_text(json.dumps(service_account(keypair[0])))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = GoogleClassroomSourceConfig.model_validate(
        _base(service_account_file="google-sa.json"), context={"base_dir": tmp_path / "etc"}
    )
    assert config.service_account_file == creds / "google-sa.json"


def test_config_bad_json_is_named(tmp_path: Path) -> None:
    """A key file that is not JSON is an error on service_account_file."""
    (tmp_path / "sa.json").write_text("{not json")
    with pytest.raises(ValidationError) as caught:
        GoogleClassroomSourceConfig.model_validate(
            _base(service_account_file="sa.json"), context={"base_dir": tmp_path}
        )
    [error] = caught.value.errors()
    assert error["loc"] == ("service_account_file",)
    assert "service_account_file is not valid JSON" in error["msg"]


def test_config_missing_key_fields_are_named_without_the_key(keypair: tuple[str, str]) -> None:
    """Missing client_email/token_uri are named; the private key never appears."""
    data = service_account(keypair[0])
    del data["client_email"], data["token_uri"]
    with pytest.raises(ValidationError) as caught:
        GoogleClassroomSourceConfig.model_validate(_base(service_account_json=json.dumps(data)))
    assert "service_account_json is missing client_email, token_uri" in str(caught.value)
    _assert_no_secret(str(caught.value), keypair[0])


def test_config_unreadable_private_key_is_named(keypair: tuple[str, str]) -> None:
    """A private_key that is not a PEM key is named, not quoted."""
    data = service_account(
        "-----BEGIN PRIVATE KEY-----\nAAAAsecretish\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(ValidationError) as caught:
        GoogleClassroomSourceConfig.model_validate(_base(service_account_json=json.dumps(data)))
    assert "private_key is not a PEM-encoded private key" in str(caught.value)
    assert "secretish" not in str(caught.value)


def test_config_missing_file_is_named(tmp_path: Path) -> None:
    """A key file that does not exist names the path and the key."""
    with pytest.raises(ValidationError, match=r"cannot read service_account_file .*missing\.json"):
        GoogleClassroomSourceConfig.model_validate(
            _base(service_account_file="missing.json"), context={"base_dir": tmp_path}
        )


def test_config_never_shows_the_key(keypair: tuple[str, str]) -> None:
    """repr and JSON dumps of a valid config mask the service-account JSON."""
    config = GoogleClassroomSourceConfig.model_validate(
        _base(service_account_json=json.dumps(service_account(keypair[0])))
    )
    for text in (repr(config), config.model_dump_json(), repr(config.service_account)):
        _assert_no_secret(text, keypair[0])


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        ({"page_size": 0}, "page_size"),
        ({"page_size": 1001}, "page_size"),
        ({"course_states": ["OPEN"]}, "course_states"),
        ({"course_states": []}, "course_states"),
        ({"delegated_admin": "admin"}, "delegated_admin"),
        ({"api_base_url": "classroom.googleapis.com"}, "api_base_url"),
        ({"quota": {"per_minute": 0}}, "quota"),
        ({"pagesize": 10}, "pagesize"),
    ],
)
def test_config_rejects_bad_values(
    keypair: tuple[str, str], extra: dict[str, Any], complaint: str
) -> None:
    """Out-of-range, unknown or malformed keys are errors naming the key."""
    data = _base(service_account_json=json.dumps(service_account(keypair[0])))
    data.update(extra)
    with pytest.raises(ValidationError) as caught:
        GoogleClassroomSourceConfig.model_validate(data)
    assert any(complaint in ".".join(map(str, e["loc"])) for e in caught.value.errors())

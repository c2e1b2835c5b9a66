"""The OneRoster REST connector against the loopback fake server: the shared contract for
1.1/OAuth1 and 1.2/OAuth2, and behaviour that needs a real HTTP exchange."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from connectors.oneroster.config import OneRosterSourceConfig
from connectors.oneroster.connector import OneRosterConnector
from rostersync.errors import DeltaUnsupportedError, FatalSourceError, RetriableSourceError
from rostersync.source.connector import Connector, ConnectorContext, FetchMode
from rostersync.source.records import (
    Rejected,
    RosterEnrollment,
    RosterPerson,
    RosterRecord,
    TeacherRef,
)
from rostersync.source.testdata import small_roster
from rostersync.source.testing import ConnectorContract, collect, enrollments, people
from tests.fakes.oneroster_server import DEFAULT_MODIFIED, FakeOneRoster, Faults, Quirks

FAST = {"initial_wait": 0.01, "max_wait": 0.05, "max_attempts": 4}


@asynccontextmanager
async def connect(srv: FakeOneRoster, **overrides: Any) -> AsyncIterator[OneRosterConnector]:
    settings = {"page_size": 3, "retry": FAST} | overrides
    config = OneRosterSourceConfig.model_validate(srv.source_config(**settings))
    async with httpx.AsyncClient(**config.http_client_options()) as http:
        connector = OneRosterConnector(ConnectorContext("district", config, http))
        try:
            yield connector
        finally:
            await connector.aclose()


@pytest.fixture(params=["1.1", "1.2"], ids=["v1p1-oauth1", "v1p2-oauth2"])
def server(request: pytest.FixtureRequest) -> Iterator[FakeOneRoster]:
    with FakeOneRoster(small_roster(), version=request.param) as srv:
        yield srv


class TestOneRosterRest(ConnectorContract):
    @pytest.fixture
    async def connector(self, server: FakeOneRoster) -> AsyncIterator[Connector]:
        async with connect(server) as c:
            yield c


async def test_server_auth_is_what_the_version_uses(server: FakeOneRoster) -> None:
    """1.1 requests are OAuth1-signed; 1.2 requests carry a bearer token from /token."""
    async with connect(server) as c:
        await collect(c)
    header = server.data_requests()[0].headers["authorization"]
    if server.version == "1.1":
        assert header.startswith("OAuth ") and server.tokens_issued == 0
    else:
        assert header.startswith("Bearer ") and server.tokens_issued == 1


async def test_a_wrong_secret_is_fatal_and_names_the_path(server: FakeOneRoster) -> None:
    """A bad client secret (bad signature or refused token) stops the run without the secret."""
    auth = server.auth_config() | {"client_secret": "wrong-secret-xyz"}
    async with connect(server, auth=auth) as c:
        with pytest.raises(FatalSourceError, match="HTTP 401") as err:
            await collect(c)
    assert "wrong-secret-xyz" not in str(err.value)
    # The four collections are read side by side: whichever answered first names the path.
    assert ("POST /token" if server.version == "1.2" else "GET /ims/oneroster/v1p1/") in str(
        err.value
    )


async def test_delta_after_changes_returns_only_what_changed(server: FakeOneRoster) -> None:
    """After an update and a deletion, a delta run yields exactly those, removals flagged."""
    server.update("user", "s-1", family_name="Renamed")
    server.delete("enrollment", "e-s1c1")
    async with connect(server, delta_overlap=0) as c:
        got = await collect_delta(c, DEFAULT_MODIFIED)
    assert {(r.sourced_id, r.status) for r in got if not isinstance(r, Rejected)} == {
        ("s-1", "active"),
        ("e-s1c1", "tobedeleted"),
    }
    renamed = next(r for r in got if isinstance(r, RosterPerson))
    assert renamed.family_name == "Renamed"
    assert renamed.date_last_modified is not None and renamed.date_last_modified > DEFAULT_MODIFIED


async def collect_delta(c: Connector, since: datetime) -> list[RosterRecord]:
    out: list[RosterRecord] = []
    async for batch in c.fetch(FetchMode.DELTA, since):
        assert isinstance(batch, Sequence)  # as rostersync.source.testing.collect
        out.extend(batch)
    return out


async def test_delta_overlap_rereads_recent_changes() -> None:
    """A change stamped just before the high-water mark is still read thanks to the overlap."""
    with FakeOneRoster(small_roster()) as srv:
        srv.update("user", "t-1", given_name="Augusta")
        stamp = next(p for p in srv.roster.persons if p.sourced_id == "t-1").date_last_modified
        assert stamp is not None
        mark = stamp + timedelta(seconds=2)  # a high-water mark just past the change
        async with connect(srv, delta_overlap="5m") as c:
            got = await collect_delta(c, mark)
        async with connect(srv, delta_overlap=0) as c:
            none = await collect_delta(c, mark)
    assert [r.sourced_id for r in got] == ["t-1"]
    assert none == []


async def test_a_server_refusing_filters_raises_delta_unsupported() -> None:
    """A server answering 400 to the dateLastModified filter makes the engine run full."""
    with FakeOneRoster(small_roster(), quirks=Quirks(filters="reject")) as srv:
        async with connect(srv) as c:
            with pytest.raises(DeltaUnsupportedError):
                await collect_delta(c, datetime(2026, 1, 1, tzinfo=UTC))
            full = await collect(c)
    assert people(full) == people(list(small_roster().persons))


async def test_injected_faults_do_not_change_the_result() -> None:
    """429s, 500s and dropped connections are retried to the same records as a clean run."""
    with FakeOneRoster(small_roster()) as srv:
        async with connect(srv) as c:
            clean = await collect(c)
        srv.faults = Faults(rate_limit=2, retry_after="0", server_error=2, drop=2)
        async with connect(srv, retry={**FAST, "max_attempts": 8}) as c:
            faulty = await collect(c)
        statuses = [r.status for r in srv.data_requests()]
    assert sorted(map(repr, faulty)) == sorted(map(repr, clean))
    assert statuses.count(429) == 2 and statuses.count(500) == 2 and statuses.count(0) == 2


async def test_slow_responses_time_out_and_are_retried() -> None:
    """A response slower than the timeout is a retriable error once the tries run out."""
    with FakeOneRoster(small_roster(), faults=Faults(delay=0.3)) as srv:
        async with connect(srv, timeout=0.05, retry={**FAST, "max_attempts": 2}) as c:
            with pytest.raises(RetriableSourceError, match="timed out"):
                await collect(c)
        # The collections are read side by side: each one's first page was tried twice.
        tried = Counter(r.path.rsplit("/", 1)[1] for r in srv.data_requests())
        assert tried == dict.fromkeys(("orgs", "users", "classes", "enrollments"), 2)


async def test_a_server_going_down_half_way_fails_the_fetch() -> None:
    """After K requests every connection drops: the fetch ends in a RetriableSourceError."""
    with FakeOneRoster(small_roster(), faults=Faults(down_after=5)) as srv:
        async with connect(srv) as c:
            with pytest.raises(RetriableSourceError, match="connection failed"):
                await collect(c)


async def test_same_page_quirk_is_detected() -> None:
    """A server that ignores offset fails the run instead of paging forever."""
    with FakeOneRoster(small_roster(), quirks=Quirks(same_page=True, total_count=False)) as srv:
        async with connect(srv) as c:
            with pytest.raises(FatalSourceError, match="same page"):
                await collect(c)


async def test_links_to_another_host_are_never_followed() -> None:
    """Link headers naming another host only lend their offset; requests stay on base_url."""
    quirks = Quirks(total_count=False, link_host="http://127.0.0.2:9")
    with FakeOneRoster(small_roster(), quirks=quirks) as srv:
        async with connect(srv) as c:
            got = await collect(c)
        assert len(srv.data_requests()) > 4
    assert people(got) == people(list(small_roster().persons))


async def test_a_server_capping_limit_is_paged_fully() -> None:
    """A server serving 2 per page when asked for 1000 still yields every record."""
    quirks = Quirks(max_limit=2, link_header=False)
    with FakeOneRoster(small_roster(), quirks=quirks) as srv:
        async with connect(srv, page_size=1000) as c:
            got = await collect(c)
    assert enrollments(got) == enrollments(list(small_roster().enrollments))


async def test_a_schema_violation_is_rejected_alone() -> None:
    """A user without a role is reported with its sourcedId; everyone else still arrives."""
    with FakeOneRoster(small_roster()) as srv:
        srv.add_raw("users", {"sourcedId": "bad-1", "status": "active", "givenName": "X"})
        async with connect(srv) as c:
            got = await collect(c)
    assert [r for r in got if isinstance(r, Rejected)] == [Rejected("user", "bad-1", "no role")]
    assert people(got) == people(list(small_roster().persons))


async def test_live_fetch_drops_teachers_listed_as_students() -> None:
    """With ClassLink's quirk, /classes/{id}/students lists teachers; only students are kept."""
    quirks = Quirks(teachers_in_class_students=True)
    with FakeOneRoster(small_roster(), version="1.2", quirks=quirks) as srv:
        async with connect(srv) as c:
            got = await c.fetch_teacher(TeacherRef("t-1", "ada@example.org"))
        paths = [r.endpoint for r in srv.data_requests()]
    assert {p.sourced_id for p in got.persons} == {"s-1", "s-2", "s-3", "s-4", "s-5"}
    assert all(p.role == "student" for p in got.persons)
    students = {(e.class_id, e.user_id) for e in got.enrollments if isinstance(e, RosterEnrollment)}
    assert ("c-2", "t-2") not in students
    assert "/users/t-1" in paths and "/teachers/t-1/classes" in paths


async def test_bearer_auth_works_against_the_fake() -> None:
    """A static bearer token (ClassLink's proxy) is accepted by a bearer server."""
    with FakeOneRoster(small_roster(), auth="bearer") as srv:
        async with connect(srv) as c:
            got = await collect(c)
    assert people(got) == people(list(small_roster().persons))


async def test_revoked_oauth2_token_is_replaced_once() -> None:
    """When the server forgets its tokens mid-run, one new token is fetched and the run goes on."""
    with FakeOneRoster(small_roster(), version="1.2") as srv:
        async with connect(srv) as c:
            first = await collect(c)
            srv.revoke_tokens()
            second = await collect(c)
        assert srv.tokens_issued == 2
    assert sorted(map(repr, first)) == sorted(map(repr, second))

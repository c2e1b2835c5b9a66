"""Unit tests of the OneRoster REST connector: respx fakes the HTTP, or no HTTP at all."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.forkserver
import os
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from urllib.request import parse_http_list, parse_keqv_list

import certifi
import httpx
import orjson
import pytest
import respx
from pydantic import ValidationError
from structlog.testing import capture_logs

from connectors.oneroster import PLUGIN, decode, forkserver
from connectors.oneroster import config as config_module
from connectors.oneroster import connector as connector_module
from connectors.oneroster.config import OneRosterSourceConfig
from connectors.oneroster.connector import PAGES_PER_REQUEST_SLOT, OneRosterConnector
from connectors.oneroster.errors import parse_retry_after
from connectors.oneroster.normalize import normalize, rows_page
from connectors.oneroster.paging import OffsetPaginator, Page, delta_filter, paginate, parse_link
from rostersync.errors import (
    DeltaUnsupportedError,
    FatalSourceError,
    RetriableSourceError,
)
from rostersync.source.connector import ConnectorContext, FetchMode
from rostersync.source.records import (
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    RosterRecord,
    TeacherRef,
)
from rostersync.source.rows import KnownSpec, StagedBatch, sort_batch
from tests.fakes.oneroster_server import oauth1_base_string, oauth1_hmac_sha256

HOST = "https://or.example.org"
BASE = f"{HOST}/ims/oneroster/v1p1"
TOKEN_URL = "https://auth.example.org/oauth/token"
SECRET = "s3cret-value-never-logged"
FAST = {"initial_wait": 0.01, "max_wait": 0.05, "max_attempts": 4}
COLLECTIONS = ("orgs", "users", "classes", "enrollments")


def make_config(**overrides: Any) -> OneRosterSourceConfig:
    data: dict[str, Any] = {
        "type": "oneroster",
        "base_url": BASE,
        "auth": {"type": "oauth1", "client_id": "cid", "client_secret": SECRET},
        "retry": FAST,
    }
    return OneRosterSourceConfig.model_validate(data | overrides)


@asynccontextmanager
async def open_connector(**overrides: Any) -> AsyncIterator[OneRosterConnector]:
    config = make_config(**overrides)
    async with httpx.AsyncClient(**config.http_client_options()) as http:
        connector = OneRosterConnector(ConnectorContext("district", config, http))
        try:
            yield connector
        finally:
            await connector.aclose()


async def fetch_all(
    connector: OneRosterConnector, mode: FetchMode = FetchMode.FULL, since: datetime | None = None
) -> list[RosterRecord]:
    out: list[RosterRecord] = []
    async for batch in connector.fetch(mode, since):
        assert not isinstance(batch, StagedBatch)  # these connectors decode inline
        out.extend(batch)
    return out


def user(n: int, role: str | None = "student", **extra: Any) -> dict[str, Any]:
    return {
        "sourcedId": f"u-{n:03d}",
        "status": "active",
        "dateLastModified": "2026-01-01T00:00:00.000Z",
        "role": role,
        "givenName": f"Given{n}",
        "familyName": "Family",
        "email": f"u{n}@example.org",
        "enabledUser": "true",
    } | extra


def pager(
    records: list[dict[str, Any]],
    key: str,
    *,
    total: bool = True,
    link: bool = False,
    cap: int | None = None,
    link_origin: str = "http://other-host.example",
) -> Callable[[httpx.Request], httpx.Response]:
    """A respx side effect serving `records` by limit/offset, with the chosen headers."""

    def handler(request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params["limit"])
        offset = int(request.url.params["offset"])
        limit = min(limit, cap) if cap else limit
        headers: dict[str, str] = {}
        if total:
            headers["X-Total-Count"] = str(len(records))
        if link:
            first = f'<{link_origin}/elsewhere?offset=0&limit={limit}>; rel="first"'
            if offset + limit < len(records):
                nxt = f"{link_origin}/elsewhere?offset={offset + limit}&limit={limit}"
                headers["Link"] = f'<{nxt}>; rel="next", {first}'
            else:
                headers["Link"] = first
        return httpx.Response(200, json={key: records[offset : offset + limit]}, headers=headers)

    return handler


def mock_empty(router: respx.MockRouter, *names: str) -> None:
    for name in names:
        router.get(f"{BASE}/{name}").mock(side_effect=pager([], name))


# -- paging ----------------------------------------------------------------------------------


class Peak:
    """Counts who is inside a ``with`` block now, and the most that ever were at once."""

    def __init__(self) -> None:
        self.now = self.most = 0

    def __enter__(self) -> Peak:
        self.now += 1
        self.most = max(self.most, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        self.now -= 1


async def test_total_count_pages_are_fetched_concurrently_within_the_bound() -> None:
    """With X-Total-Count the remaining pages run concurrently, never above max_concurrency."""
    records = [user(i) for i in range(48)]  # ten pages, the last one short
    in_flight = Peak()
    serve = pager(records, "users")

    async def slow(request: httpx.Request) -> httpx.Response:
        with in_flight:
            await asyncio.sleep(0.02)
        return serve(request)

    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=slow)
        async with open_connector(page_size=5, max_concurrency=3) as c:
            got = await fetch_all(c)
    assert in_flight.most == 3
    assert route.call_count == 10
    assert sorted(p.sourced_id for p in got if isinstance(p, RosterPerson)) == [
        f"u-{i:03d}" for i in range(48)
    ]


async def test_answers_waiting_for_the_decoder_do_not_hold_request_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While decoding lags, more pages are fetched: requests stay within max_concurrency, but
    answers waiting to be decoded no longer count against it."""
    records = [user(i) for i in range(58)]  # twelve pages, the last one short
    requests, decoding = Peak(), Peak()
    serve = pager(records, "users")

    async def counted(request: httpx.Request) -> httpx.Response:
        with requests:
            await asyncio.sleep(0.005)
        return serve(request)

    real_decode = OneRosterConnector._decode

    async def slow_decode(self: OneRosterConnector, key: str, *args: Any) -> decode.DecodedPage:
        if key == "users":  # the other collections' pages are read side by side
            with decoding:
                await asyncio.sleep(0.05)  # a busy decode pool
        return await real_decode(self, key, *args)

    monkeypatch.setattr(OneRosterConnector, "_decode", slow_decode)
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=counted)
        async with open_connector(page_size=5, max_concurrency=2) as c:
            got = await fetch_all(c)
    assert requests.most == 2
    assert decoding.most == 2 * connector_module.PAGES_PER_REQUEST_SLOT
    assert route.call_count == 12
    assert len([r for r in got if isinstance(r, RosterPerson)]) == 58


async def test_the_four_collections_are_read_side_by_side() -> None:
    """Every collection's first request is out before any answer comes back (a delta run no
    longer waits out four round trips in a row), and every record arrives."""
    arrived: list[str] = []
    all_out = asyncio.Event()

    def held(name: str, records: list[dict[str, Any]]) -> Callable[..., Any]:
        serve = pager(records, name)

        async def handler(request: httpx.Request) -> httpx.Response:
            if request.url.params["offset"] == "0":
                arrived.append(name)
                if len(arrived) == len(COLLECTIONS):
                    all_out.set()
                await asyncio.wait_for(all_out.wait(), timeout=5)
            return serve(request)

        return handler

    people = [user(i) for i in range(7)]
    with respx.mock(assert_all_called=False) as router:
        for name in ("orgs", "classes", "enrollments"):
            router.get(f"{BASE}/{name}").mock(side_effect=held(name, []))
        router.get(f"{BASE}/users").mock(side_effect=held("users", people))
        async with open_connector(page_size=3) as c:
            got = await fetch_all(c)
    assert sorted(arrived) == sorted(COLLECTIONS)
    assert sorted(p.sourced_id for p in got if isinstance(p, RosterPerson)) == [
        f"u-{i:03d}" for i in range(7)
    ]


async def test_a_failing_collection_stops_the_others() -> None:
    """The first collection to fail fails the fetch; the others' requests are cancelled and
    nothing keeps running after the fetch has raised."""
    pending = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal pending
        pending += 1
        try:
            await asyncio.sleep(30)
        finally:
            pending -= 1
        return httpx.Response(200, json={"users": []})

    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/users").mock(side_effect=slow)
        mock_empty(router, "classes", "enrollments")
        router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(401))
        async with open_connector() as c:
            with pytest.raises(FatalSourceError, match="401"):
                await asyncio.wait_for(fetch_all(c), timeout=10)
    assert pending == 0


async def test_link_next_is_followed_but_urls_are_built_from_base_url() -> None:
    """Without a total, rel="next" drives paging, yet every request goes to base_url's host."""
    records = [user(i) for i in range(7)]
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(
            side_effect=pager(records, "users", total=False, link=True)
        )
        async with open_connector(page_size=3) as c:
            got = await fetch_all(c)
        hosts = {call.request.url.host for call in router.calls}
    offsets = [call.request.url.params["offset"] for call in route.calls]
    assert offsets == ["0", "3", "6"]
    assert hosts == {"or.example.org"}
    assert len([r for r in got if isinstance(r, RosterPerson)]) == 7


async def test_without_headers_paging_stops_on_a_short_page_then_an_empty_one() -> None:
    """No X-Total-Count and no Link: pages are read until one comes back short, and a
    short page after the first is confirmed by an empty one."""
    records = [user(i) for i in range(7)]
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=pager(records, "users", total=False))
        async with open_connector(page_size=3) as c:
            got = await fetch_all(c)
            notes = c.warnings
    assert [call.request.url.params["offset"] for call in route.calls] == ["0", "3", "6", "9"]
    assert len(got) == 7
    assert notes == []


async def test_without_headers_a_page_the_server_filtered_does_not_end_the_collection() -> None:
    """A server that drops a record from a page after applying the limit (2 of 3 at
    offset 3) is read on to its first empty page, and the report says so: the records after
    the short page are not taken for gone."""
    records = [user(i) for i in range(10)]
    serve = pager(records, "users", total=False)

    def filtering(request: httpx.Request) -> httpx.Response:
        answer = serve(request)
        if request.url.params["offset"] == "3":
            page = orjson.loads(answer.content)["users"]
            return httpx.Response(200, json={"users": page[:1] + page[2:]})
        return answer

    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=filtering)
        async with open_connector(page_size=3) as c:
            got = await fetch_all(c)
            notes = c.warnings
    assert [call.request.url.params["offset"] for call in route.calls] == [
        "0", "3", "6", "9", "12"
    ]  # fmt: skip
    assert {r.sourced_id for r in got} == {r["sourcedId"] for r in records} - {"u-004"}
    assert notes == [
        "/users: the server served 2 records at offset=3 (pages of 3) and more after them: "
        "paging went on to the first empty page"
    ]


async def test_without_headers_a_server_clamping_offsets_past_the_end_ends_there() -> None:
    """Asked past its end, a server answering with its last page again is at its end: the
    confirming request is no repeated page that fails the run."""
    records = [user(i) for i in range(7)]
    serve = pager(records, "users", total=False)

    def clamping(request: httpx.Request) -> httpx.Response:
        offset = min(int(request.url.params["offset"]), 6)
        return serve(httpx.Request("GET", request.url.copy_set_param("offset", str(offset))))

    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        router.get(f"{BASE}/users").mock(side_effect=clamping)
        async with open_connector(page_size=3) as c:
            got = await fetch_all(c)
    assert len(got) == 7


async def test_without_headers_an_exact_multiple_ends_on_an_empty_page() -> None:
    """A collection that fills its last page is finished by one empty page."""
    records = [user(i) for i in range(6)]
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=pager(records, "users", total=False))
        async with open_connector(page_size=3) as c:
            got = await fetch_all(c)
    assert [call.request.url.params["offset"] for call in route.calls] == ["0", "3", "6"]
    assert len(got) == 6


async def test_without_headers_a_short_first_page_is_the_whole_collection() -> None:
    """No X-Total-Count and no Link: a first page shorter than page_size ends the collection
    with that one request (no request for an empty page after it)."""
    records = [user(i) for i in range(7)]
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=pager(records, "users", total=False))
        async with open_connector(page_size=100) as c:
            got = await fetch_all(c)
    assert [call.request.url.params["offset"] for call in route.calls] == ["0"]
    assert len([r for r in got if isinstance(r, RosterPerson)]) == 7


async def test_without_headers_a_round_short_first_page_may_be_a_cap() -> None:
    """A server that silently serves 100 per page (the spec's default) and sends neither
    header is still read to the end: a first page of a round length is taken for its limit."""
    records = [user(i) for i in range(250)]
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(
            side_effect=pager(records, "users", total=False, cap=100)
        )
        async with open_connector(page_size=1000) as c:
            got = await fetch_all(c)
    assert [call.request.url.params["offset"] for call in route.calls] == ["0", "100", "200", "300"]
    assert len({r.sourced_id for r in got if isinstance(r, RosterPerson)}) == 250


async def test_a_short_first_page_with_a_next_link_is_followed() -> None:
    """A capped server that sends a rel="next" link (and no total) is followed to the end,
    whatever the length of its pages."""
    records = [user(i) for i in range(23)]
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(
            side_effect=pager(records, "users", total=False, link=True, cap=7)
        )
        async with open_connector(page_size=100) as c:
            got = await fetch_all(c)
    assert [call.request.url.params["offset"] for call in route.calls] == ["0", "7", "14", "21"]
    assert len({r.sourced_id for r in got if isinstance(r, RosterPerson)}) == 23


async def test_a_server_capping_limit_sets_the_step() -> None:
    """A server serving fewer records per page than asked is paged by what it serves."""
    records = [user(i) for i in range(25)]
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=pager(records, "users", cap=10))
        async with open_connector(page_size=100) as c:
            got = await fetch_all(c)
    assert sorted(call.request.url.params["offset"] for call in route.calls) == ["0", "10", "20"]
    assert len({r.sourced_id for r in got if isinstance(r, RosterPerson)}) == 25


async def test_the_same_page_for_every_offset_fails_clearly() -> None:
    """A server ignoring offset is detected instead of looped over forever."""

    def same(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"users": [user(i) for i in range(3)]})

    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=same)
        async with open_connector(page_size=3) as c:
            with pytest.raises(FatalSourceError, match=r"same page.*ignores `offset`") as err:
                await fetch_all(c)
    assert route.call_count == 2
    assert "offset=0 and offset=3" in str(err.value)
    assert "'district'" in str(err.value)


async def test_repeated_pages_with_a_total_are_detected_too() -> None:
    """With X-Total-Count, concurrent pages that repeat their neighbour also fail the run."""

    def same(request: httpx.Request) -> httpx.Response:
        page = [user(i) for i in range(3)]
        return httpx.Response(200, json={"users": page}, headers={"X-Total-Count": "30"})

    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        router.get(f"{BASE}/users").mock(side_effect=same)
        async with open_connector(page_size=3) as c:
            with pytest.raises(FatalSourceError, match="same page"):
                await fetch_all(c)


async def test_a_total_far_beyond_what_the_server_serves_stops_at_the_first_empty_page() -> None:
    """A server that counts 99,999,999 users and serves 12 is not asked for millions of
    pages: the first empty counted page ends the collection, every record served is read,
    and the run's warnings say so."""
    records = [user(i) for i in range(12)]
    serve = pager(records, "users")

    def lying(request: httpx.Request) -> httpx.Response:
        answer = serve(request)
        answer.headers["X-Total-Count"] = "99999999"
        return answer

    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=lying)
        async with open_connector(page_size=5, max_concurrency=2) as c:
            got = await fetch_all(c)
            warnings = list(c.warnings)
    assert sorted(p.sourced_id for p in got if isinstance(p, RosterPerson)) == [
        f"u-{i:03d}" for i in range(12)
    ]
    # Pages 0, 5, 10 hold the records, 15 is the first empty one; past it, only pages already
    # in flight beside it (at most `width` at a time) were asked for.
    width = 2 * PAGES_PER_REQUEST_SLOT
    assert 4 <= route.call_count <= 1 + 2 * width
    assert any(
        "/users: the server counted 99999999 records (X-Total-Count) but served none from "
        "offset 15" in w
        for w in warnings
    ), warnings


def test_paginator_plans_offsets_from_the_total() -> None:
    """start() lists every remaining offset once the first page tells the total."""
    p = OffsetPaginator("s", "/users", limit=10)
    first = Page(0, [{"sourcedId": str(i)} for i in range(10)], total=35)
    assert list(p.start(first) or ()) == [10, 20, 30]


async def test_a_total_of_a_billion_billion_records_is_paged_to_the_first_empty_page() -> None:
    """An X-Total-Count of 10**18 over 250 records plans no list of 10**16 offsets (that
    ended in a MemoryError): the records are read, and the report says where paging
    stopped."""
    records = [user(n) for n in range(250)]
    serve = pager(records, "users")

    def counted_wrong(request: httpx.Request) -> httpx.Response:
        answer = serve(request)
        answer.headers["X-Total-Count"] = str(10**18)
        return answer

    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=counted_wrong)
        async with open_connector(page_size=100, max_concurrency=2) as c:
            got = await fetch_all(c)
            notes = c.warnings
    assert len({r.sourced_id for r in got if isinstance(r, RosterPerson)}) == 250
    assert route.call_count < 20  # the pages, and a few asked for at once past the end
    assert any("counted 1000000000000000000 records" in note for note in notes)


def test_paginator_follows_the_next_links_offset() -> None:
    """next_offset() takes rel="next"'s offset, and stops when there is no next link."""
    p = OffsetPaginator("s", "/users", limit=10)
    page = Page(0, [{"sourcedId": "a"}] * 10, has_link=True, has_next=True, next_offset=10)
    assert p.start(page) is None
    assert p.next_offset(page) == 10
    last = Page(10, [{"sourcedId": "b"}] * 10, has_link=True, has_next=False)
    assert p.next_offset(last) is None


def test_parse_link_reads_only_the_next_offset() -> None:
    """A Link header yields whether rel="next" exists and its offset parameter."""
    header = (
        '<https://x.example/users?limit=5&offset=0>; rel="first", '
        '<https://x.example/users?limit=5&offset=10>; rel="next"'
    )
    assert parse_link(header) == (True, True, 10)
    assert parse_link('<https://x.example/users?offset=0>; rel="first"') == (True, False, None)
    assert parse_link(None) == (False, False, None)


async def test_paginate_counted_then_checks_one_more_when_last_page_is_full() -> None:
    """A total that ends on a full page without a Link is verified by one more request."""
    asked: list[int] = []
    data = [{"sourcedId": f"r{i}"} for i in range(6)]

    async def fetch(offset: int) -> Page:
        asked.append(offset)
        return Page(offset, data[offset : offset + 3], total=6)

    pages = [p async for p in paginate(fetch, OffsetPaginator("s", "/x", 3), 2)]
    assert sorted(asked) == [0, 3, 6]
    assert sum(len(p.records) for p in pages) == 6


# -- retries and errors ------------------------------------------------------------------------


def ok_users() -> httpx.Response:
    return httpx.Response(200, json={"users": [user(1)]}, headers={"X-Total-Count": "1"})


async def test_429_waits_retry_after_seconds_then_succeeds() -> None:
    """A 429's Retry-After (seconds) sets the wait before the retry."""
    with capture_logs() as logs, respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(
            side_effect=[httpx.Response(429, headers={"Retry-After": "0.02"}), ok_users()]
        )
        async with open_connector() as c:
            got = await fetch_all(c)
    assert route.call_count == 2
    assert len(got) == 1
    retries = [e for e in logs if e["event"] == "retrying"]
    assert [e["wait_s"] for e in retries] == [0.02]
    assert "HTTP 429" in retries[0]["reason"]


def test_retry_after_accepts_an_http_date() -> None:
    """Retry-After given as an HTTP date becomes the seconds until then (never negative)."""
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now) == 0.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("soon", now) is None


async def test_429_with_an_http_date_is_retried() -> None:
    """A 429 whose Retry-After is a (past) HTTP date is retried at once."""
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=10), usegmt=True)
    with capture_logs() as logs, respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(
            side_effect=[httpx.Response(429, headers={"Retry-After": past}), ok_users()]
        )
        async with open_connector() as c:
            await fetch_all(c)
    assert route.call_count == 2
    assert [e["wait_s"] for e in logs if e["event"] == "retrying"] == [0.0]


async def test_5xx_is_retried_then_succeeds() -> None:
    """Two 500s and a 503 are retried; the fourth try's answer is used."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(
            side_effect=[httpx.Response(500), httpx.Response(500), httpx.Response(503), ok_users()]
        )
        async with open_connector() as c:
            got = await fetch_all(c)
    assert route.call_count == 4
    assert [r.sourced_id for r in got] == ["u-001"]


async def test_5xx_past_max_attempts_is_a_retriable_error() -> None:
    """When every try fails the last RetriableSourceError reaches the engine."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "users", "classes", "enrollments")
        route = router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(502))
        async with open_connector() as c:
            with pytest.raises(RetriableSourceError, match="HTTP 502"):
                await fetch_all(c)
    assert route.call_count == FAST["max_attempts"]


async def test_timeouts_and_dropped_connections_are_retried() -> None:
    """A read timeout and a connection closed without an answer are both retried."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(
            side_effect=[
                httpx.ReadTimeout("slow"),
                httpx.RemoteProtocolError("Server disconnected without sending a response."),
                ok_users(),
            ]
        )
        async with open_connector() as c:
            got = await fetch_all(c)
    assert route.call_count == 3
    assert len(got) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_are_fatal_naming_source_and_path_without_secrets(status: int) -> None:
    """Refused credentials stop the run; the message names source and path, no query or secret."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "users", "classes", "enrollments")
        route = router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(status))
        async with open_connector() as c:
            with pytest.raises(FatalSourceError) as err:
                await fetch_all(c)
    message = str(err.value)
    assert route.call_count == 1
    assert "'district'" in message
    assert f"HTTP {status}" in message
    assert "GET /ims/oneroster/v1p1/orgs" in message
    assert SECRET not in message
    assert "limit=" not in message
    assert "or.example.org" not in message


async def test_bearer_token_never_appears_in_a_401_message() -> None:
    """With a static bearer token, a 401 message carries no token."""
    token = "static-token-abc123"
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "users", "classes", "enrollments")
        router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(401))
        async with open_connector(auth={"type": "bearer", "token": token}) as c:
            with pytest.raises(FatalSourceError) as err:
                await fetch_all(c)
        assert router.calls[0].request.headers["Authorization"] == f"Bearer {token}"
    assert token not in str(err.value)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_fatal_at_once_naming_where_it_points_and_never_followed(
    status: int,
) -> None:
    """A page answered with a redirect (a tenant moved, http -> https) stops the run at the
    first answer, naming the target without its query; nothing goes to the other host."""
    target = "https://other-tenant.example/ims/oneroster/v1p1/users?token=t0p"
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").respond(status, headers={"Location": target})
        router.post(TOKEN_URL).mock(side_effect=token_answers())
        async with open_connector(**oauth2_overrides()) as c:
            with pytest.raises(FatalSourceError) as err:
                await fetch_all(c)
        hosts = {call.request.url.host for call in router.calls}
    message = str(err.value)
    assert f"HTTP {status}" in message
    assert "from GET /ims/oneroster/v1p1/users at offset=0" in message
    assert "redirects to https://other-tenant.example/ims/oneroster/v1p1/users;" in message
    assert "t0p" not in message
    assert route.call_count == 1
    assert hosts == {"or.example.org", "auth.example.org"}


async def test_a_token_endpoint_redirect_is_fatal_naming_where_it_points() -> None:
    """A token endpoint that redirects is named as such, not as an answer without a token."""
    with respx.mock(assert_all_called=False) as router:
        router.post(TOKEN_URL).respond(302, headers={"Location": "/v2/token"})
        async with open_connector(**oauth2_overrides()) as c:
            with pytest.raises(FatalSourceError) as err:
                await fetch_all(c)
    message = str(err.value)
    assert "HTTP 302" in message
    assert "redirects to https://auth.example.org/v2/token;" in message
    assert SECRET not in message


async def test_an_html_page_served_as_200_is_retried_then_named_by_its_type() -> None:
    """A maintenance or proxy page served with 200 is retried as a cut page is, and the
    error says what came instead of JSON."""
    page = httpx.Response(
        200, text="<html>Down for maintenance</html>", headers={"Content-Type": "text/html"}
    )
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(return_value=page)
        async with open_connector() as c:
            with pytest.raises(RetriableSourceError) as err:
                await fetch_all(c)
    assert str(err.value).endswith(
        "invalid JSON (a text/html answer) from GET /ims/oneroster/v1p1/users at offset=0 "
        f"after {FAST['max_attempts']} attempts"
    )
    assert route.call_count == FAST["max_attempts"]


async def test_other_4xx_is_fatal_and_bad_json_fails_once_retries_run_out() -> None:
    """A 404 on a collection stops the run; an unparsable body is retried, then fails it."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "users", "classes", "enrollments")
        router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(404))
        async with open_connector() as c:
            with pytest.raises(FatalSourceError, match="HTTP 404"):
                await fetch_all(c)
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "users", "classes", "enrollments")
        route = router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(200, content=b"<html>"))
        async with open_connector() as c:
            with pytest.raises(RetriableSourceError, match="invalid JSON from GET /ims"):
                await fetch_all(c)
    assert route.call_count == FAST["max_attempts"]


async def test_an_answer_without_the_collection_key_is_fatal() -> None:
    """A body without the expected envelope key cannot be taken for an empty collection."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "users", "classes", "enrollments")
        router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(200, json={"data": []}))
        async with open_connector() as c:
            with pytest.raises(FatalSourceError, match="no 'orgs' list"):
                await fetch_all(c)


# -- auth ------------------------------------------------------------------------------------


def oauth2_overrides() -> dict[str, Any]:
    return {
        "auth": {
            "type": "oauth2",
            "token_url": TOKEN_URL,
            "client_id": "cid",
            "client_secret": SECRET,
        }
    }


def token_answers() -> Callable[[httpx.Request], httpx.Response]:
    issued = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal issued
        issued += 1
        return httpx.Response(200, json={"access_token": f"tok-{issued}", "expires_in": 3600})

    return answer


async def test_oauth2_token_is_fetched_once_and_cached() -> None:
    """Every request of a run shares one client-credentials token."""
    with respx.mock(assert_all_called=False) as router:
        token = router.post(TOKEN_URL).mock(side_effect=token_answers())
        mock_empty(router, *COLLECTIONS)
        async with open_connector(**oauth2_overrides()) as c:
            await fetch_all(c)
            await fetch_all(c)
        data_calls = [call for call in router.calls if call.request.method == "GET"]
    assert token.call_count == 1
    sent = token.calls[0].request
    assert sent.headers["Authorization"].startswith("Basic ")
    assert b"grant_type=client_credentials" in sent.content
    assert b"roster.readonly" in sent.content  # the version's default scope
    assert len(data_calls) == 2 * len(COLLECTIONS)
    assert {call.request.headers["Authorization"] for call in data_calls} == {"Bearer tok-1"}


async def test_oauth2_token_is_refreshed_once_on_401() -> None:
    """A 401 with a cached token fetches a new one and repeats the request once."""

    def users(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer tok-1":
            return httpx.Response(401)
        return ok_users()

    with respx.mock(assert_all_called=False) as router:
        token = router.post(TOKEN_URL).mock(side_effect=token_answers())
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=users)
        async with open_connector(**oauth2_overrides()) as c:
            got = await fetch_all(c)
    assert token.call_count == 2
    assert route.call_count == 2
    assert [r.sourced_id for r in got] == ["u-001"]


async def test_oauth2_second_401_is_fatal_after_one_refresh() -> None:
    """If the fresh token is refused too, the run stops: no refresh loop."""
    with respx.mock(assert_all_called=False) as router:
        token = router.post(TOKEN_URL).mock(side_effect=token_answers())
        mock_empty(router, "users", "classes", "enrollments")
        route = router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(401))
        async with open_connector(**oauth2_overrides()) as c:
            with pytest.raises(FatalSourceError, match="HTTP 401") as err:
                await fetch_all(c)
    assert token.call_count == 2
    assert route.call_count == 2
    assert "tok-" not in str(err.value)


async def test_oauth2_refused_credentials_are_fatal_without_the_secret() -> None:
    """The token endpoint's 401 stops the run naming the token path, not the secret."""
    with respx.mock(assert_all_called=False) as router:
        router.post(TOKEN_URL).mock(return_value=httpx.Response(401, json={"error": "x"}))
        async with open_connector(**oauth2_overrides()) as c:
            with pytest.raises(FatalSourceError, match="POST /oauth/token") as err:
                await fetch_all(c)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"access_token": "t", "expires_in": ' + b"9" * 5000 + b"}"],
)
async def test_oauth2_a_token_answer_the_parser_cannot_take_is_fatal(body: bytes) -> None:
    """A token answer nested too deep or with a number too long to convert stops the run
    naming the token request, not with a crash."""
    with respx.mock(assert_all_called=False) as router:
        router.post(TOKEN_URL).respond(200, content=body)
        async with open_connector(**oauth2_overrides()) as c:
            with pytest.raises(FatalSourceError, match="answered without an access_token"):
                await fetch_all(c)


async def test_oauth1_header_is_a_valid_hmac_sha256_signature_over_the_query() -> None:
    """The OAuth1 header names HMAC-SHA256 and verifies against the query parameters too."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, *COLLECTIONS)
        async with open_connector() as c:
            await fetch_all(c, FetchMode.DELTA, datetime(2026, 1, 1, tzinfo=UTC))
        request = router.calls[0].request
        headers = [call.request.headers["Authorization"] for call in router.calls]
    # Every request has its own unguessable nonce (drawn from `secrets`, not Authlib's).
    nonces = [dict(parse_keqv_list(parse_http_list(h[6:])))["oauth_nonce"] for h in headers]
    assert len(nonces) > 1 and len(set(nonces)) == len(nonces)
    assert all(len(n) >= 24 for n in nonces)
    header = request.headers["Authorization"]
    assert header.startswith("OAuth ")
    oauth = {k: unquote(v) for k, v in parse_keqv_list(parse_http_list(header[6:])).items()}
    assert oauth["oauth_signature_method"] == "HMAC-SHA256"
    assert oauth["oauth_consumer_key"] == "cid"
    query = list(request.url.params.multi_items())
    assert {k for k, _ in query} == {"limit", "offset", "filter"}
    url = f"{request.url.scheme}://{request.url.netloc.decode()}{request.url.path}"
    oauth_params = [(k, v) for k, v in oauth.items() if k != "oauth_signature"]
    base = oauth1_base_string("GET", url, [*query, *oauth_params])
    assert oauth1_hmac_sha256(base, SECRET) == oauth["oauth_signature"]
    without_query = oauth1_base_string("GET", url, oauth_params)
    assert oauth1_hmac_sha256(without_query, SECRET) != oauth["oauth_signature"]


# -- normalization ---------------------------------------------------------------------------


def test_v11_user_role_and_string_booleans() -> None:
    """A 1.1 user: `role`, "false" enabledUser, orgs refs, dates as aware datetimes."""
    person = normalize(
        "users",
        user(1, role="Teacher", enabledUser="false", orgs=[{"sourcedId": "sch-1", "href": "x"}]),
    )
    assert isinstance(person, RosterPerson)
    assert person.role == "teacher"
    assert person.enabled is False
    assert person.org_ids == ("sch-1",)
    assert person.date_last_modified == datetime(2026, 1, 1, tzinfo=UTC)


def test_v12_user_takes_the_primary_role() -> None:
    """A 1.2 user's role is its primary role (for primaryOrg), not the first listed."""
    raw = user(2, role=None) | {
        "primaryOrg": {"sourcedId": "sch-2"},
        "roles": [
            {"roleType": "secondary", "role": "aide", "org": {"sourcedId": "sch-1"}},
            {"roleType": "primary", "role": "student", "org": {"sourcedId": "sch-1"}},
            {"roleType": "primary", "role": "teacher", "org": {"sourcedId": "sch-2"}},
        ],
    }
    person = normalize("users", raw)
    assert isinstance(person, RosterPerson)
    assert person.role == "teacher"
    assert person.org_ids == ("sch-2", "sch-1")


def test_v12_user_keeps_every_role_primary_or_not() -> None:
    """Any of roles[] may make a teacher (provisioning.teacher_roles), so all are kept: the
    primary one as `role`, the others beside it, and all in the staged `roles` column."""
    raw = user(3, role=None) | {
        "roles": [
            {"roleType": "primary", "role": "administrator", "org": {"sourcedId": "sch-1"}},
            {"roleType": "secondary", "role": "Teacher", "org": {"sourcedId": "sch-1"}},
            {"roleType": "secondary", "role": "teacher", "org": {"sourcedId": "sch-2"}},
        ],
    }
    person = normalize("users", raw)
    assert isinstance(person, RosterPerson)
    assert (person.role, person.other_roles) == ("administrator", ("teacher",))
    assert person.roles_text == "administrator,teacher"
    batch = rows_page("users", [raw])
    assert batch.rows["person"][0][2] == "administrator,teacher"
    assert batch.rows["person"][0][-2] == person.content_hash()


def test_missing_optional_fields_get_defaults() -> None:
    """A minimal valid user (no names, email, enabledUser, orgs or date) is accepted."""
    person = normalize("users", {"sourcedId": "u-9", "status": "active", "role": "student"})
    assert person == RosterPerson("u-9", "student", "", "", None, None, True, (), "active", None)


@pytest.mark.parametrize("status", ["tobedeleted", "inactive", "TOBEDELETED"])
def test_tobedeleted_and_inactive_mean_removal(status: str) -> None:
    """`tobedeleted` and 1.0's `inactive` both normalize to tobedeleted, even when sparse."""
    record = normalize("enrollments", {"sourcedId": "e-1", "status": status})
    assert isinstance(record, RosterEnrollment)
    assert record.status == "tobedeleted"


@pytest.mark.parametrize(
    ("collection", "raw", "reason"),
    [
        ("users", {"status": "active", "role": "student"}, "no sourcedId"),
        ("users", {"sourcedId": "u-1", "status": "archived", "role": "student"}, "unknown status"),
        ("users", {"sourcedId": "u-1", "status": "active"}, "no role"),
        ("users", {"sourcedId": "u-1", "role": "student", "enabledUser": "maybe"}, "enabledUser"),
        ("classes", {"sourcedId": "c-1", "status": "active"}, "no title"),
        ("orgs", {"sourcedId": "o-1", "status": "active"}, "no name"),
        (
            "enrollments",
            {"sourcedId": "e-1", "class": {"sourcedId": "c"}, "role": "student"},
            "no user",
        ),
        ("enrollments", {"sourcedId": "e-1", "user": {"sourcedId": "u"}, "role": "x"}, "no class"),
        ("users", {"sourcedId": "u-1", "role": "x", "dateLastModified": "yesterday"}, "date-time"),
        ("users", ["not", "an", "object"], "not a JSON object"),
    ],
)
def test_schema_violations_become_rejections(collection: str, raw: Any, reason: str) -> None:
    """A record breaking the schema becomes a Rejected with its sourcedId and reason."""
    record = normalize(collection, raw)
    assert isinstance(record, Rejected)
    assert reason in record.reason
    if isinstance(raw, dict) and "sourcedId" in raw:
        assert record.sourced_id == raw["sourcedId"]


def test_other_collections_normalize() -> None:
    """Orgs, classes and enrollments keep their references (sourcedIds) and flags."""
    org = normalize(
        "orgs", {"sourcedId": "s", "name": "N", "type": "school", "parent": {"sourcedId": "d"}}
    )
    klass = normalize("classes", {"sourcedId": "c", "title": "T", "school": {"sourcedId": "s"}})
    enr = normalize(
        "enrollments",
        {
            "sourcedId": "e",
            "user": {"sourcedId": "u", "href": "https://elsewhere/users/u"},
            "class": {"sourcedId": "c"},
            "role": "teacher",
            "primary": "true",
        },
    )
    assert org == RosterOrg("s", "N", "school", None, "d")
    assert klass == RosterClass("c", "T", None, "s")
    assert enr == RosterEnrollment("e", "c", "u", "teacher", "active", True)


async def test_a_rejected_record_does_not_sink_its_page() -> None:
    """One bad record in a page is reported alone; its neighbours are still yielded."""
    records = [user(1), {"status": "active", "role": "student"}, user(3)]
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        router.get(f"{BASE}/users").mock(side_effect=pager(records, "users"))
        async with open_connector() as c:
            got = await fetch_all(c)
    assert [r.sourced_id for r in got if isinstance(r, RosterPerson)] == ["u-001", "u-003"]
    assert [r.reason for r in got if isinstance(r, Rejected)] == ["no sourcedId"]


# -- delta -----------------------------------------------------------------------------------


def test_delta_filter_subtracts_the_overlap_in_utc() -> None:
    """The filter is dateLastModified>'since - overlap' in UTC with a Z, whole seconds."""
    since = datetime(2026, 3, 1, 13, 0, 0, 500000, tzinfo=timezone(timedelta(hours=1)))
    assert delta_filter(since, timedelta(minutes=5)) == "dateLastModified>'2026-03-01T11:55:00Z'"
    naive = datetime(2026, 3, 1, 12, 0, 0)
    assert delta_filter(naive, timedelta(0)) == "dateLastModified>'2026-03-01T12:00:00Z'"


async def test_delta_fetch_sends_the_filter_on_every_collection() -> None:
    """A delta fetch filters each collection by dateLastModified minus the overlap."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, *COLLECTIONS)
        async with open_connector(delta_overlap="10m") as c:
            await fetch_all(c, FetchMode.DELTA, datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
        filters = {
            call.request.url.path.rsplit("/", 1)[1]: call.request.url.params["filter"]
            for call in router.calls
        }
    assert filters == dict.fromkeys(COLLECTIONS, "dateLastModified>'2026-03-01T11:50:00Z'")


async def test_delta_400_raises_delta_unsupported() -> None:
    """A server refusing the filter with 400 raises DeltaUnsupportedError (engine runs full)."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "users", "classes", "enrollments")
        route = router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(400))
        async with open_connector() as c:
            assert c.supports_delta
            with pytest.raises(DeltaUnsupportedError, match="rejected the delta filter"):
                await fetch_all(c, FetchMode.DELTA, datetime(2026, 3, 1, tzinfo=UTC))
    assert route.call_count == 1


async def test_full_fetch_400_is_plainly_fatal() -> None:
    """Without a filter, a 400 is an ordinary fatal error, not a delta fallback."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "users", "classes", "enrollments")
        router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(400))
        async with open_connector() as c:
            with pytest.raises(FatalSourceError) as err:
                await fetch_all(c)
    assert not isinstance(err.value, DeltaUnsupportedError)


# -- live teacher fetch ----------------------------------------------------------------------


async def test_class_students_are_filtered_to_students() -> None:
    """Teachers listed in /classes/{id}/students are dropped; live enrollment ids are synthetic."""
    klass = {"sourcedId": "c-1", "status": "active", "title": "Algebra"}
    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/users/t-1").mock(
            return_value=httpx.Response(
                200, json={"user": user(100, role="teacher", sourcedId="t-1")}
            )
        )
        router.get(f"{BASE}/teachers/t-1/classes").mock(side_effect=pager([klass], "classes"))
        router.get(f"{BASE}/classes/c-1/students").mock(
            side_effect=pager(
                [
                    user(1),
                    user(100, role="teacher", sourcedId="t-1"),
                    user(2, status="tobedeleted"),
                ],
                "users",
            )
        )
        async with open_connector() as c:
            got = await c.fetch_teacher(TeacherRef("t-1", "t@example.org"))
        hosts = {call.request.url.host for call in router.calls}
    assert got.teacher is not None and got.teacher.sourced_id == "t-1"
    assert [p.sourced_id for p in got.persons] == ["u-001"]
    assert {e.sourced_id for e in got.enrollments} == {
        "live:c-1:u-001:student",
        "live:c-1:t-1:teacher",
    }
    assert hosts == {"or.example.org"}


async def test_unknown_teacher_gives_an_empty_roster() -> None:
    """404s for the user and their classes mean no teacher and no classes, not an error."""
    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/users/t-x").mock(return_value=httpx.Response(404))
        router.get(f"{BASE}/teachers/t-x/classes").mock(return_value=httpx.Response(404))
        async with open_connector() as c:
            got = await c.fetch_teacher(TeacherRef("t-x", None))
    assert got.teacher is None
    assert got.classes == [] and got.enrollments == []


# -- config ----------------------------------------------------------------------------------


def test_version_defaults_from_the_base_path() -> None:
    """`v1p2` in base_url means 1.2; otherwise 1.1; an explicit version wins."""
    assert make_config().version == "1.1"
    v12 = make_config(base_url=f"{HOST}/ims/oneroster/rostering/v1p2/")
    assert v12.version == "1.2"
    assert v12.base_url.endswith("/v1p2")
    assert (
        make_config(base_url=f"{HOST}/ims/oneroster/rostering/v1p2", version=1.1).version == "1.1"
    )


def test_config_limits_and_secret_files(tmp_path: Path) -> None:
    """page_size is capped at 10000, auth is discriminated by type, secrets read from files."""
    with pytest.raises(ValidationError):
        make_config(page_size=10001)
    with pytest.raises(ValidationError):
        make_config(auth={"type": "kerberos"})
    (tmp_path / "secret").write_text("from-file\n")
    cfg = OneRosterSourceConfig.model_validate(
        {
            "type": "oneroster",
            "base_url": BASE,
            "auth": {
                "type": "oauth2",
                "token_url": TOKEN_URL,
                "client_id": "c",
                "client_secret_file": "secret",
            },
            "timeout": "45s",
        },
        context={"base_dir": tmp_path},
    )
    assert cfg.auth.client_secret.get_secret_value() == "from-file"  # type: ignore[union-attr]
    assert "from-file" not in repr(cfg)
    assert cfg.http_client_options()["timeout"] == httpx.Timeout(45)
    assert cfg.page_size == 1000 and cfg.max_concurrency == 4 and cfg.verify_tls is True
    assert PLUGIN.type == "oneroster" and PLUGIN.config_model is OneRosterSourceConfig


# -- the TLS context, built ahead -----------------------------------------------------------------


@pytest.fixture
def tls_ahead(monkeypatch: pytest.MonkeyPatch) -> dict[str | None, Any]:
    """An empty registry of contexts being built ahead, for this test alone."""
    ahead: dict[str | None, Any] = {}
    monkeypatch.setattr(config_module, "_TLS_AHEAD", ahead)
    return ahead


def test_a_tls_context_built_ahead_serves_the_next_client_once(
    tls_ahead: dict[str | None, Any],
) -> None:
    """prepare_http builds the default context in a thread; the next client options take it
    (verifying as httpx's own would: hostname and certificate, its CA store), and a later
    client builds its own as before."""
    cfg = make_config()
    cfg.prepare_http()
    cfg.prepare_http()  # one build per CA store
    assert list(tls_ahead) == [None]
    verify = cfg.http_client_options()["verify"]
    assert isinstance(verify, ssl.SSLContext)
    assert verify.check_hostname and verify.verify_mode == ssl.CERT_REQUIRED
    default = httpx.create_ssl_context()
    assert verify.cert_store_stats() == default.cert_store_stats()
    assert tls_ahead == {}
    assert cfg.http_client_options()["verify"] is True


def test_a_ca_bundle_context_built_ahead_trusts_that_bundle(
    tmp_path: Path, tls_ahead: dict[str | None, Any]
) -> None:
    bundle = tmp_path / "district-ca.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes())
    cfg = make_config(ca_bundle=str(bundle))
    cfg.prepare_http()
    verify = cfg.http_client_options()["verify"]
    assert isinstance(verify, ssl.SSLContext)
    want = ssl.create_default_context(cafile=str(bundle)).cert_store_stats()
    assert verify.cert_store_stats() == want and want["x509_ca"] > 0
    # Without a context built ahead the bundle is loaded in place, as it always was.
    again = cfg.http_client_options()["verify"]
    assert isinstance(again, ssl.SSLContext) and again is not verify


def test_a_bundle_that_fails_while_built_ahead_fails_the_client_as_before(
    tmp_path: Path, tls_ahead: dict[str | None, Any]
) -> None:
    """A bundle that became unreadable after the config was checked raises from the client
    options, built ahead or not, with the same error."""
    bundle = tmp_path / "district-ca.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes())
    cfg = make_config(ca_bundle=str(bundle))
    bundle.write_text("not a certificate\n", encoding="utf-8")
    with pytest.raises(ssl.SSLError) as in_place:
        cfg.http_client_options()
    cfg.prepare_http()
    with pytest.raises(ssl.SSLError) as ahead:
        cfg.http_client_options()
    assert type(ahead.value) is type(in_place.value)
    assert ahead.value.args == in_place.value.args


def test_no_tls_context_is_built_when_verification_is_off(tls_ahead: dict[str | None, Any]) -> None:
    cfg = make_config(verify_tls=False)
    cfg.prepare_http()
    assert tls_ahead == {}
    assert cfg.http_client_options()["verify"] is False


@pytest.fixture
def fork_server_starts(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The fork server's starts (the modules it was to preload at each), none for real."""
    from multiprocessing import forkserver as mp_forkserver

    starts: list[list[str]] = []
    server: Any = mp_forkserver._forkserver  # typeshed's ForkServer has no _preload_modules
    monkeypatch.setattr(server, "_preload_modules", list(server._preload_modules))
    monkeypatch.setattr(
        mp_forkserver, "ensure_running", lambda: starts.append(list(server._preload_modules))
    )
    return starts


def test_prepare_workers_starts_the_pools_fork_server_ahead(
    fork_server_starts: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fork server starts with the modules a pool whose workers send the requests has it
    preload, so that such a pool finds it running and set up; not when the workers are off,
    nor on one core (its imports would take the sync process's turn)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    make_config().prepare_workers()
    assert fork_server_starts == [["connectors.oneroster.decode", "connectors.oneroster.preload"]]
    pool = decode.start_pool(1, preload=(forkserver.REQUESTS,))  # starts no worker unused
    pool.shutdown()
    server: Any = multiprocessing.forkserver._forkserver  # (its _preload_modules: untyped)
    assert server._preload_modules == fork_server_starts[0]
    # (the pool's start asks for the server too, a no-op for one running: the fake counts it)
    assert fork_server_starts[1:] == [server._preload_modules]
    make_config(decode_workers=0).prepare_workers()
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    make_config().prepare_workers()
    assert len(fork_server_starts) == 2


def test_the_fork_server_preloads_the_driver_of_a_postgresql_store(
    fork_server_starts: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers of a PostgreSQL store read the mirror's fingerprints through psycopg: the fork
    server imports it once for all of them, whether it starts ahead of the sync or with the
    pool of a run that reads them (the daemon's); a SQLite store's workers need no driver."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    make_config().prepare_workers("postgresql")
    make_config().prepare_workers("sqlite")
    make_config().prepare_workers()
    decode_and_requests = ["connectors.oneroster.decode", "connectors.oneroster.preload"]
    assert fork_server_starts == [[*decode_and_requests, "psycopg"], *[decode_and_requests] * 2]
    asked: list[tuple[str, ...]] = []

    def recording(workers: int, preload: Sequence[str] = ()) -> ProcessPoolExecutor:
        asked.append(tuple(preload))
        return ProcessPoolExecutor(1)

    monkeypatch.setattr(connector_module, "start_pool", recording)
    config = make_config(decode_workers=1)
    for dialect in ("postgresql", "sqlite", None):
        connector = OneRosterConnector(ConnectorContext("district", config, httpx.AsyncClient()))
        if dialect is not None:
            connector.skip_known = KnownSpec(dialect, "where", "district", 1)
        connector._start_pool().shutdown()
    assert ["psycopg" in p for p in asked] == [True, False, False]


@pytest.mark.parametrize("ahead", [True, False], ids=["started-ahead", "started-by-the-pool"])
def test_the_decode_workers_never_take_ctrl_c(ahead: bool) -> None:
    """Ctrl-C reaches the whole process group: the workers have it blocked from their first
    instruction (a worker it reached before its initializer printed a traceback), whether the
    fork server started ahead of the sync or with the pool; the sync process still takes it.
    In a process of its own, so that the fork server is one this code starts."""
    import subprocess

    program = (
        "import signal; from connectors.oneroster import decode, forkserver; "
        f"{'forkserver.start_ahead((decode.__name__,)); ' if ahead else ''}"
        "pool = decode.start_pool(1); "
        "mask = pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, ()).result(timeout=60); "
        "pool.shutdown(); "
        "print(signal.SIGINT in mask, signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ()), "
        "signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "True"]


def test_a_fork_server_that_cannot_start_ahead_is_left_to_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Starting ahead is a head start, not a requirement: where the server cannot start the
    call says so and raises nothing (the pool's own start then fails over as it always did)."""
    from multiprocessing import forkserver as mp_forkserver

    def refused() -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(mp_forkserver, "ensure_running", refused)
    server: Any = mp_forkserver._forkserver  # typeshed's ForkServer has no _preload_modules
    monkeypatch.setattr(server, "_preload_modules", list(server._preload_modules))
    assert forkserver.start_ahead() is False
    monkeypatch.setattr(mp_forkserver, "ensure_running", lambda: None)
    assert forkserver.start_ahead() is True


# -- decoding in worker processes ---------------------------------------------------------------


def _mixed_users() -> list[Any]:
    """Users of both versions' shapes, with a schema violation and a non-object among them."""
    return [
        user(1, role="Teacher"),
        user(2, enabledUser="false", dateLastModified="2026-03-04T05:06:07Z"),
        user(
            3,
            role=None,
            roles=[{"roleType": "primary", "role": "teacher", "org": {"sourcedId": "o1"}}],
        ),
        user(4, role=None),  # no role: rejected alone
        "not an object",
        user(5, status="tobedeleted"),
    ]


async def test_pooled_decoding_yields_the_rows_inline_decoding_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A page decoded in the process pool arrives as staging rows equal to what the engine
    makes of the same page decoded inline: same rows, rejections and newest date."""
    raw = _mixed_users()

    async def batches(**overrides: Any) -> list[Any]:
        with respx.mock(assert_all_called=False) as router:
            router.get(f"{BASE}/users").mock(side_effect=pager(raw, "users"))
            mock_empty(router, "orgs", "classes", "enrollments")
            async with open_connector(**overrides) as c:
                out = [batch async for batch in c.fetch(FetchMode.FULL, None)]
                pool = c._pool
            assert c._pool is None  # aclose shut the pool down
            if pool is not None:
                with pytest.raises(RuntimeError):  # a shut-down executor takes no more work
                    pool.submit(int, 1)
            return out

    inline = await batches(decode_workers=0)
    assert len(inline) == 1 and not isinstance(inline[0], StagedBatch)
    monkeypatch.setattr(decode, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(decode, "POOL_MIN_RECORDS", 0)
    pooled = await batches(decode_workers=1)
    assert len(pooled) == 1 and isinstance(pooled[0], StagedBatch)
    expected = sort_batch(inline[0])
    # Pooled rows carry each record's fingerprint (the last column); rows made from
    # records have none.
    got = {kind: [row[:-1] for row in rows] for kind, rows in pooled[0].rows.items()}
    assert got == {kind: [row[:-1] for row in rows] for kind, rows in expected.rows.items()}
    assert all(row[-1] is None for row in expected.rows["person"])
    fps = [row[-1] for row in pooled[0].rows["person"]]
    assert all(isinstance(fp, int) and fp >= 0 for fp in fps) and len(set(fps)) == len(fps)
    assert pooled[0].rejected == expected.rejected
    assert [r.reason for r in expected.rejected] == ["no role", "not a JSON object"]
    assert pooled[0].newest == expected.newest == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


async def test_a_bad_page_decoded_in_the_pool_fails_naming_the_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Errors found in a worker process read as the inline ones do."""
    monkeypatch.setattr(decode, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(decode, "POOL_MIN_RECORDS", 0)
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "users", "classes", "enrollments")
        router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(200, content=b"<html>"))
        async with open_connector(decode_workers=1) as c:
            with pytest.raises(RetriableSourceError, match="invalid JSON from GET /ims"):
                await fetch_all(c)
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "users", "classes", "enrollments")
        router.get(f"{BASE}/orgs").mock(return_value=httpx.Response(200, json={"data": []}))
        async with open_connector(decode_workers=1) as c:
            with pytest.raises(
                FatalSourceError, match=r"unexpected answer from GET .*no 'orgs' list"
            ):
                await fetch_all(c)


def test_the_decode_pool_pipes_hold_a_whole_page() -> None:
    """The pool's pipes are widened to 1 MiB (Linux), so a page goes out and its rows come
    back in one hand-over, and the pool decodes as before; a pool whose pipes cannot be
    found is left as it is."""
    import fcntl
    from types import SimpleNamespace

    pool = decode.start_pool(1)
    try:
        # the executor's private queues: typeshed has neither _call_queue nor a queue's _reader
        queues: list[Any] = [pool._call_queue, pool._result_queue]  # type: ignore[attr-defined]
        for queue in queues:
            size = fcntl.fcntl(queue._reader.fileno(), fcntl.F_GETPIPE_SZ)
            assert size == decode.PIPE_BYTES
        body = orjson.dumps({"users": [user(i) for i in range(1500)]})
        assert len(body) > 2 * 64 * 1024  # more than a default pipe holds
        page = pool.submit(decode.decode_page, "users", body, True).result(timeout=60)
    finally:
        pool.shutdown()
    assert page.length == 1500 and page.first_id == "u-000"
    assert isinstance(page.batch, StagedBatch)
    assert len(page.batch.rows["person"]) == 1500
    assert decode.widen_pipes(SimpleNamespace()) is False  # type: ignore[arg-type]


def test_decode_workers_collect_cycles_rarely_and_never_among_their_modules() -> None:
    """A worker raises its first-generation threshold and freezes what it imported (a page's
    JSON is freed by reference counting); this process (a test's) keeps the default."""
    import gc

    from rostersync.daemon.procs import GC_THRESHOLD

    pool = decode.start_pool(1)
    try:
        threshold = pool.submit(gc.get_threshold).result(timeout=60)
        frozen = pool.submit(gc.get_freeze_count).result(timeout=60)
    finally:
        pool.shutdown()
    assert threshold[0] == GC_THRESHOLD > gc.get_threshold()[0]
    assert frozen > 0


def test_small_pages_skip_the_pool_and_workers_default_to_one_per_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool is for pages worth the trip; by default one worker a core, at most four."""
    assert decode.POOL_MIN_BYTES >= 16 * 1024
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert decode.default_workers() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert decode.default_workers() == 4
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert decode.default_workers() == 1
    with pytest.raises(ValidationError, match="decode_workers"):
        make_config(decode_workers=-1)


async def test_workers_that_send_the_requests_fill_the_concurrency_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker has one request in flight: when the workers request the pages from a server
    whose pages are slow to come, there are by default at least ``max_concurrency`` of them
    (at most 8); from a server that answers at once, one a core; a set ``decode_workers``
    and workers that only decode keep their number."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)

    def workers(own: bool, fastest: float | None = 0.05, **overrides: Any) -> int:
        config = make_config(**overrides)
        ctx = ConnectorContext("d", config, None, own_requests=own)  # type: ignore[arg-type]
        c = OneRosterConnector(ctx)
        c._fastest_page = fastest
        return c._workers()

    assert workers(True) == 4  # max_concurrency's default
    assert workers(True, fastest=0.002) == 2  # a server on the same machine
    assert workers(True, fastest=None) == 2  # no page asked for yet
    assert workers(True, max_concurrency=1) == 2  # one a core all the same
    assert workers(True, max_concurrency=64) == 8
    assert workers(True, max_concurrency=6, decode_workers=3) == 3
    assert workers(False, max_concurrency=6) == 2


async def test_the_fastest_page_the_sync_process_asked_for_is_kept() -> None:
    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/users").mock(side_effect=pager([user(1)], "users"))
        mock_empty(router, "orgs", "classes", "enrollments")
        async with open_connector(decode_workers=0) as c:
            assert c._fastest_page is None
            await fetch_all(c)
            assert c._fastest_page is not None and c._fastest_page > 0.0


@pytest.mark.parametrize(
    ("records", "total", "pooled"),
    [
        (5, True, False),  # the server says the collection is small: no workers for it
        (6, True, True),  # large enough
        (5, False, True),  # no X-Total-Count: its size is unknown, so the workers start
    ],
)
async def test_the_pool_starts_only_for_a_collection_worth_it(
    pool_starts: Callable[[int], list[int]], records: int, total: bool, pooled: bool
) -> None:
    """A delta run's few changed records are decoded inline (starting the workers would cost
    more); a large or unsized collection goes to the pool. Either way the records are the
    same."""
    starts = pool_starts(6)
    raw = [user(n) for n in range(1, records + 1)]
    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/users").mock(side_effect=pager(raw, "users", total=total))
        mock_empty(router, "orgs", "classes", "enrollments")
        async with open_connector(decode_workers=1, page_size=2) as c:
            got = [batch async for batch in c.fetch(FetchMode.FULL, None)]
    assert starts == ([1] if pooled else [])
    assert all(isinstance(batch, StagedBatch) == pooled for batch in got)
    rows = [
        row
        for batch in got
        for row in (batch.rows["person"] if isinstance(batch, StagedBatch) else [])
    ]
    inline = [r for b in got if not isinstance(b, StagedBatch) for r in b]
    persons = [r for r in inline if isinstance(r, RosterPerson)]
    assert len(persons) == len(inline)  # no rejection among them
    ids: list[str] = [r[0] for r in rows] if pooled else [p.sourced_id for p in persons]
    assert sorted(ids) == [f"u-{n:03d}" for n in range(1, records + 1)]  # pages race


async def test_a_broken_decode_pool_falls_back_to_decoding_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers that cannot start (or die) do not sink the run: the connector warns once and
    decodes in its own process from then on, with the same records."""
    monkeypatch.setattr(decode, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(decode, "POOL_MIN_RECORDS", 0)
    starts: list[int] = []

    def broken_pool(workers: int, preload: Sequence[str] = ()) -> ProcessPoolExecutor:
        starts.append(workers)
        context = multiprocessing.get_context("forkserver")
        # Every worker exits in its initializer: the pool is broken on first use.
        return ProcessPoolExecutor(1, mp_context=context, initializer=sys.exit, initargs=(3,))

    monkeypatch.setattr(connector_module, "start_pool", broken_pool)
    raw = _mixed_users()
    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/users").mock(side_effect=pager(raw, "users", total=False))
        mock_empty(router, "orgs", "classes", "enrollments")
        async with open_connector(decode_workers=1, page_size=2) as c:
            with capture_logs() as logs:
                got = [batch async for batch in c.fetch(FetchMode.FULL, None)]
    assert starts == [1]
    assert [e["event"] for e in logs].count("decode pool failed; decoding in the sync process") == 1
    records = [r for batch in got if not isinstance(batch, StagedBatch) for r in batch]
    assert not any(isinstance(batch, StagedBatch) for batch in got)
    assert [getattr(r, "sourced_id", None) for r in records] == [
        "u-001",
        "u-002",
        "u-003",
        "u-004",
        None,
        "u-005",
    ]


def test_a_value_too_long_for_the_store_rejects_its_record_in_the_decode_path() -> None:
    """The decode workers' rows are checked as the record path's are: an overlong value
    rejects that record alone, naming the column, and its date is not the page's newest."""
    raws = [
        user(1),
        user(2, email="a" * 300 + "@example.org", dateLastModified="2030-01-01T00:00:00Z"),
    ]
    batch = rows_page("users", raws)
    assert [row[0] for row in batch.rows["person"]] == [raws[0]["sourcedId"]]
    [rejected] = batch.rejected
    assert (rejected.entity, rejected.sourced_id) == ("user", raws[1]["sourcedId"])
    assert rejected.reason == "email is longer than 256 characters"
    assert batch.newest is not None and batch.newest.year < 2030

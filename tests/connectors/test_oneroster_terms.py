"""The OneRoster REST connector's academic sessions and class terms (respx fakes the HTTP)."""

from __future__ import annotations

from datetime import date
from typing import Any

import httpx
import respx

from connectors.oneroster.normalize import normalize, parse_session, rows_page
from rostersync.source.connector import FetchMode
from rostersync.source.records import AcademicSession, RosterClass
from rostersync.source.rows import StagedBatch, sort_batch
from tests.connectors.test_oneroster_unit import BASE, mock_empty, open_connector, pager

CURRENT = {"terms": {"mode": "current", "grace_days": 7}}


def session(sid: str, start: str, end: str, **extra: Any) -> dict[str, Any]:
    return {
        "sourcedId": sid,
        "status": "active",
        "dateLastModified": "2026-01-01T00:00:00.000Z",
        "title": sid.title(),
        "type": "term",
        "startDate": start,
        "endDate": end,
        "schoolYear": "2027",
    } | extra


def klass(sid: str, *terms: str) -> dict[str, Any]:
    return {
        "sourcedId": sid,
        "status": "active",
        "dateLastModified": "2026-01-01T00:00:00.000Z",
        "title": sid,
        "school": {"sourcedId": "sch-1", "type": "org"},
        "terms": [{"sourcedId": t, "type": "academicSession"} for t in terms],
    }


async def fetch_batches(**overrides: Any) -> tuple[list[Any], Any]:
    async with open_connector(**overrides) as c:
        batches = [b async for b in c.fetch(FetchMode.FULL, None)]
        return batches, c


async def test_current_terms_read_every_academic_session_and_the_classes_terms() -> None:
    """With terms: current, /academicSessions is read (every page, no delta filter) and each
    class's terms come with its staged rows."""
    sessions = [
        session("fall", "2026-08-20", "2026-12-20"),
        session("spring", "2027-01-05", "2027-06-01"),
    ]
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "users", "enrollments")
        route = router.get(f"{BASE}/academicSessions").mock(
            side_effect=pager(sessions, "academicSessions")
        )
        router.get(f"{BASE}/classes").mock(
            side_effect=pager([klass("c-1", "fall"), klass("c-2")], "classes")
        )
        batches, c = await fetch_batches(page_size=1, **CURRENT)
    assert route.call_count >= 2
    assert all("filter" not in call.request.url.params for call in route.calls)
    assert c.academic_sessions["fall"] == AcademicSession(
        "fall", "Fall", "term", date(2026, 8, 20), date(2026, 12, 20), school_year="2027"
    )
    assert set(c.academic_sessions) == {"fall", "spring"}
    terms: dict[str, tuple[str, ...]] = {}
    for b in batches:  # small pages come as records, large ones as rows: the engine sorts them
        terms.update((b if isinstance(b, StagedBatch) else sort_batch(b)).terms)
    assert terms == {"c-1": ("fall",)}
    assert c.warnings == []


async def test_terms_falls_back_to_the_terms_endpoint_and_reports_bad_sessions() -> None:
    """A server without /academicSessions is asked for /terms; a session without dates is
    a warning, not a failed run."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "users", "classes", "enrollments")
        router.get(f"{BASE}/academicSessions").mock(return_value=httpx.Response(404))
        router.get(f"{BASE}/terms").mock(
            side_effect=pager(
                [session("fall", "2026-08-20", "2026-12-20"), session("odd", "soon", "")],
                "terms",
            )
        )
        _, c = await fetch_batches(**CURRENT)
    assert set(c.academic_sessions) == {"fall"}
    assert len(c.warnings) == 1 and "odd: startDate 'soon' is not a date" in c.warnings[0]


async def test_a_server_without_sessions_is_a_warning() -> None:
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "users", "classes", "enrollments")
        router.get(f"{BASE}/academicSessions").mock(return_value=httpx.Response(404))
        router.get(f"{BASE}/terms").mock(return_value=httpx.Response(404))
        _, c = await fetch_batches(**CURRENT)
    assert c.academic_sessions == {}
    assert "every class counts as current" in c.warnings[0]


async def test_the_default_terms_mode_asks_for_no_session() -> None:
    """terms: all (the default) makes no extra request."""
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "users", "classes", "enrollments")
        route = router.get(f"{BASE}/academicSessions").mock(return_value=httpx.Response(500))
        _, c = await fetch_batches()
    assert route.call_count == 0 and c.academic_sessions == {}


def test_a_class_records_terms_agree_with_its_rows_terms() -> None:
    """The record path (live reads) and the row path (a run's fetch) read the same terms;
    a bad reference is left out."""
    raw = klass("c-1", "fall", "spring") | {"terms": [{"sourcedId": "fall"}, {}, "spring"]}
    record = normalize("classes", raw)
    assert isinstance(record, RosterClass) and record.term_ids == ("fall", "spring")
    assert rows_page("classes", [raw]).terms == {"c-1": ("fall", "spring")}


def test_a_session_is_read_from_a_date_time_too() -> None:
    parsed = parse_session(session("s", "2026-08-20T00:00:00Z", "2026-12-20"))
    assert isinstance(parsed, AcademicSession) and parsed.start_date == date(2026, 8, 20)
    assert parse_session([]) == "not a JSON object"

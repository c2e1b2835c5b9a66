"""A page whose HTTP answer is whole but whose JSON is cut: retried like a transient fault,
and, when every try fails, an error naming the source, the collection's path and the offset."""

from __future__ import annotations

import httpx
import pytest
import respx

from connectors.oneroster import decode
from rostersync.errors import RetriableSourceError
from rostersync.source.connector import FetchMode
from rostersync.source.records import RosterPerson, TeacherRef
from rostersync.source.rows import StagedBatch
from tests.connectors.test_oneroster_page_errors import cut, failing_at
from tests.connectors.test_oneroster_unit import (
    BASE,
    FAST,
    SECRET,
    fetch_all,
    mock_empty,
    open_connector,
    pager,
)


@pytest.mark.parametrize("pooled", [False, True], ids=["inline", "decode-pool"])
async def test_a_cut_page_is_asked_for_again_and_the_run_gets_every_record(
    pooled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if pooled:
        monkeypatch.setattr(decode, "POOL_MIN_BYTES", 0)
        monkeypatch.setattr(decode, "POOL_MIN_RECORDS", 0)
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=failing_at(5, cut, times=1))
        async with open_connector(page_size=5, decode_workers=1 if pooled else 0) as c:
            got = [batch async for batch in c.fetch(FetchMode.FULL, None)]
    # Pooled pages come as staging rows (a person's sourcedId first), inline ones as records.
    ids: list[str] = []
    for batch in got:
        if isinstance(batch, StagedBatch):
            ids += [row[0] for row in batch.rows["person"]]
        else:
            ids += [r.sourced_id for r in batch if isinstance(r, RosterPerson)]
    assert sorted(ids) == [f"u-{i:03d}" for i in range(12)]
    assert route.call_count == 4  # three pages, one of them twice


async def test_a_page_that_stays_cut_fails_naming_source_path_and_offset() -> None:
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=failing_at(10, cut))
        async with open_connector(page_size=5, decode_workers=0) as c:
            with pytest.raises(RetriableSourceError) as err:
                await fetch_all(c)
    tries = [r for r in route.calls if r.request.url.params["offset"] == "10"]
    assert len(tries) == FAST["max_attempts"]
    message = str(err.value)
    assert "\n" not in message
    assert "'district'" in message
    assert "invalid JSON from GET /ims/oneroster/v1p1/users at offset=10" in message
    assert SECRET not in message and "oauth_" not in message and "limit=" not in message


async def test_a_relation_endpoint_answer_that_does_not_parse_is_retried_too() -> None:
    """The live teacher fetch's answers are parsed in the retried attempt as well."""
    with respx.mock(assert_all_called=False) as router:
        route = router.get(f"{BASE}/teachers/t-1/classes").mock(
            # respx calls a callable in the list as well; its SideEffectListTypes omit them
            side_effect=[httpx.Response(200, content=b'{"classes": ['), pager([], "classes")]  # type: ignore[list-item]
        )
        router.get(f"{BASE}/users/t-1").mock(return_value=httpx.Response(404))
        async with open_connector() as c:
            roster = await c.fetch_teacher(TeacherRef("t-1", "t1@example.org"))
    assert route.call_count == 2
    assert roster.classes == []

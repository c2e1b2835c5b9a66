"""A page the decoder itself fails on (a bug a record's shape sets off), in the sync process or
in a decode worker: the fetch ends in an error naming the collection's path and the page's
offset, as a page that does not decode does, and the run fails with it (no traceback). A
worker's own request that fails that way is asked for again by the sync process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from connectors.oneroster import connector as connector_module
from connectors.oneroster import decode, direct, normalize
from connectors.oneroster.connector import OneRosterConnector
from connectors.oneroster.decode import DecodeError, decode_page
from connectors.oneroster.direct import ClientSpec, DirectRequest
from rostersync.errors import FatalSourceError
from rostersync.source.connector import ConnectorContext, FetchMode
from rostersync.source.rows import StagedBatch
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from tests.connectors import buggy_decode
from tests.connectors.test_oneroster_page_errors import RECORDS, assert_clean
from tests.connectors.test_oneroster_unit import (
    BASE,
    fetch_all,
    make_config,
    mock_empty,
    open_connector,
    pager,
)

#: The page holding buggy_decode.TRIGGER (page_size 5).
WHERE = "GET /ims/oneroster/v1p1/users at offset=5"
BUG = "the decoder failed on it (TypeError: a bug): an internal error, please report it"


def _bug_on_trigger(real: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def convert(raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("sourcedId") == buggy_decode.TRIGGER:
            raise TypeError("a bug")
        return real(raw)

    return convert


@pytest.fixture
def every_page_pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(decode, "POOL_MIN_RECORDS", 0)


def test_a_bug_in_decoding_is_a_decode_error_saying_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any exception the decoder raises comes out as a DecodeError (what workers hand back
    with the page named), with the exception's type and its text on one line."""
    entity, convert = normalize.NORMALIZERS["users"]
    monkeypatch.setitem(normalize.NORMALIZERS, "users", (entity, _bug_on_trigger(convert)))
    content = b'{"users": [{"sourcedId": "%s"}]}' % buggy_decode.TRIGGER.encode()
    with pytest.raises(DecodeError) as err:
        decode_page("users", content)
    assert str(err.value) == BUG

    def multiline(raw: Any) -> Any:
        raise KeyError("first line\nsecond")

    monkeypatch.setitem(normalize.NORMALIZERS, "users", (entity, multiline))
    with pytest.raises(DecodeError, match=r"^the decoder failed on it \(KeyError: 'first line"):
        decode_page("users", content)


async def test_a_page_the_decoder_fails_on_in_the_sync_process_names_path_and_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decoded inline: a fatal error naming the page, after one try (a bug does not go away)."""
    entity, convert = normalize.NORMALIZERS["users"]
    monkeypatch.setitem(normalize.NORMALIZERS, "users", (entity, _bug_on_trigger(convert)))
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        route = router.get(f"{BASE}/users").mock(side_effect=pager(RECORDS, "users"))
        async with open_connector(page_size=5, decode_workers=0) as c:
            with pytest.raises(FatalSourceError) as err:
                await fetch_all(c)
    assert err.value.detail == f"unexpected answer from {WHERE}: {BUG}"
    assert_clean(str(err.value))
    assert [r.request.url.params["offset"] for r in route.calls].count("5") == 1


@pytest.mark.slow
@pytest.mark.usefixtures("every_page_pooled")
@pytest.mark.parametrize(
    "bug",
    [buggy_decode.raising_in_the_worker, buggy_decode.normalizer_bug_in_the_worker],
    ids=["escapes-the-worker", "in-the-normalizer"],
)
async def test_a_page_the_decoder_fails_on_in_a_worker_names_path_and_offset(
    monkeypatch: pytest.MonkeyPatch, bug: Callable[..., Any]
) -> None:
    """The same error when the page is decoded in a decode worker: raised there by the
    decoder (a DecodeError crosses back) or escaping the worker's function (the connector
    names it all the same), never the bare exception."""
    monkeypatch.setattr(connector_module, "decode_known", bug)
    with respx.mock(assert_all_called=False) as router:
        mock_empty(router, "orgs", "classes", "enrollments")
        router.get(f"{BASE}/users").mock(side_effect=pager(RECORDS, "users"))
        async with open_connector(page_size=5, decode_workers=1) as c:
            with pytest.raises(FatalSourceError) as err:
                [_ async for _ in c.fetch(FetchMode.FULL, None)]  # staging rows, not records
            assert c._pool is not None and not c._pool_broken  # decoded in the worker
    assert err.value.detail == f"unexpected answer from {WHERE}: {BUG}"
    assert_clean(str(err.value))


def test_a_workers_own_request_that_raises_is_an_answer_with_the_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fetch_page never raises: a bug in it is a problem the sync process asks again for."""

    def broken(_request: DirectRequest) -> direct.DirectAnswer:
        raise AttributeError("a bug")

    monkeypatch.setattr(direct, "_fetch_stdlib", broken)
    spec = ClientSpec(timeout=1.0, verify_tls=True, ca_bundle=None)
    answer = direct.fetch_page(DirectRequest(spec, f"{BASE}/users", (), (), "users"))
    assert (answer.status, answer.page, answer.problem) == (0, None, "failed (AttributeError)")


@pytest.mark.slow
@pytest.mark.usefixtures("every_page_pooled", "info_logged")
async def test_a_worker_request_that_raises_is_asked_again_by_the_sync_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception out of a worker's own request does not end the fetch: the sync process
    asks for the page itself, and for every later page, and says why in its log."""
    monkeypatch.setattr(connector_module, "fetch_page", buggy_decode.fetch_with_a_bug)
    config = make_config(page_size=5, decode_workers=1)
    with respx.mock(assert_all_called=False) as router, capture_logs() as logs:
        mock_empty(router, "orgs", "classes", "enrollments")
        router.get(f"{BASE}/users").mock(side_effect=pager(RECORDS, "users"))
        async with httpx.AsyncClient(**config.http_client_options()) as http:
            c = OneRosterConnector(ConnectorContext("district", config, http, own_requests=True))
            try:
                batches = [b async for b in c.fetch(FetchMode.FULL, None)]
            finally:
                await c.aclose()
    ids = sorted(row[0] for b in batches if isinstance(b, StagedBatch) for row in b.rows["person"])
    assert ids == sorted(r["sourcedId"] for r in RECORDS)
    (fallback,) = [
        e for e in logs if e["event"] == "pages requested by the sync process from now on"
    ]
    assert fallback["reason"] == "failed (KeyError)"
    assert fallback["offset"] == 5


@pytest.mark.slow
async def test_a_run_whose_page_the_decoder_fails_on_fails_naming_it_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, store: Store, tmp_path: Path
) -> None:
    """The run fails with the page's error as its own (what `runs show` and `sync` print),
    and its sync_failed log line carries no traceback."""
    from tests.e2e.test_oneroster_e2e import SOURCE, aged_district, rest_source, settings_for
    from tests.fakes.oneroster_server import FakeOneRoster

    def row_with_a_bug(raw: Any) -> Any:
        raise TypeError("a bug")

    entity, kind, _ = normalize.ROW_BUILDERS["enrollments"]
    monkeypatch.setitem(normalize.ROW_BUILDERS, "enrollments", (entity, kind, row_with_a_bug))
    with FakeOneRoster(aged_district()) as srv:
        source = rest_source(srv, decode_workers=0)
        with capture_logs() as logs:
            report = await SyncEngine(settings_for(tmp_path, source), store).sync(SOURCE)
    expected = (
        f"source {SOURCE!r}: unexpected answer from GET /ims/oneroster/v1p1/enrollments "
        f"at offset=0: {BUG}"
    )
    assert (report.status, report.error) == ("failed", expected)
    (failed,) = [e for e in logs if e["event"] == "sync_failed"]
    assert failed["error"] == expected
    assert failed.get("exc_info") is None

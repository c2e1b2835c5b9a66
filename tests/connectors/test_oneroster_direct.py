"""Pages the decode workers request themselves (connectors.oneroster.direct), against the
loopback fake server: the same rows as the sync process's own requests, every page asked
once, and any failure asked again the careful way (retries, token refresh, errors naming the
request), after which the sync process requests the rest itself."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from connectors.oneroster import decode
from connectors.oneroster.config import OneRosterSourceConfig
from connectors.oneroster.connector import OneRosterConnector
from connectors.oneroster.direct import ClientSpec, DirectRequest, fetch_page
from rostersync.errors import FatalSourceError, RetriableSourceError
from rostersync.sampledata import DistrictSpec
from rostersync.source.connector import ConnectorContext, FetchMode
from rostersync.source.rows import StagedBatch, sort_batch
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from tests.e2e.test_oneroster_e2e import SOURCE, aged_district, rest_source, settings_for
from tests.fakes.oneroster_server import FakeOneRoster, Faults, Quirks

# info_logged (conftest): the info lines the tests capture pass whatever level was set before.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("info_logged")]

FAST = {"initial_wait": 0.01, "max_wait": 0.05, "max_attempts": 4}
PAGE = 7
SPEC = DistrictSpec(seed=3, schools=2, teachers=6, students=60, classes=10, students_per_class=5)
COLLECTIONS = ("orgs", "users", "classes", "enrollments")
FALLBACK = "pages requested by the sync process from now on"


@pytest.fixture(autouse=True)
def every_collection_pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every page goes to the decode pool, so every page after a collection's first is
    requested by a worker (when the connector may make requests of its own)."""
    monkeypatch.setattr(decode, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(decode, "POOL_MIN_RECORDS", 0)


@asynccontextmanager
async def connect(
    srv: FakeOneRoster, *, own: bool = True, hooks: Any = None, **overrides: Any
) -> AsyncIterator[OneRosterConnector]:
    settings = {"page_size": PAGE, "retry": FAST, "decode_workers": 2} | overrides
    config = OneRosterSourceConfig.model_validate(srv.source_config(**settings))
    options = config.http_client_options() | ({"event_hooks": hooks} if hooks else {})
    async with httpx.AsyncClient(**options) as http:
        connector = OneRosterConnector(ConnectorContext("district", config, http, own_requests=own))
        try:
            yield connector
        finally:
            await connector.aclose()


async def staged(c: OneRosterConnector) -> dict[str, list[Any]]:
    """Every row the fetch yielded, per kind, sorted (pages race), rejections included."""
    out = StagedBatch()
    async for batch in c.fetch(FetchMode.FULL, None):
        out.extend(batch if isinstance(batch, StagedBatch) else sort_batch(batch))
    rows: dict[str, list[Any]] = {kind: sorted(rows) for kind, rows in out.rows.items()}
    rows["rejected"] = sorted(map(repr, out.rejected))
    return rows


def pages_asked(srv: FakeOneRoster) -> Counter[tuple[str, str]]:
    return Counter((r.endpoint, r.params.get("offset", "")) for r in srv.data_requests())


@pytest.fixture(params=["1.1", "1.2", "bearer"])
def server(request: pytest.FixtureRequest) -> Iterator[FakeOneRoster]:
    version = "1.2" if request.param == "bearer" else request.param
    auth = "bearer" if request.param == "bearer" else None
    with FakeOneRoster(aged_district(SPEC), version=version, auth=auth) as srv:
        yield srv


async def test_workers_request_the_pages_with_the_sources_auth(server: FakeOneRoster) -> None:
    """OAuth 1.0a signed in the worker, an OAuth2 token or a static one carried to it: the
    same rows as the sync process's own requests, each page asked once, and only a
    collection's first page asked by the sync process."""
    async with connect(server, own=False) as c:
        inline = await staged(c)
        assert c.pages_by_workers == 0  # the default: never a request outside the client
    server.requests.clear()
    with capture_logs() as logs:  # before the connector binds its logger
        async with connect(server) as c:
            direct = await staged(c)
            by_workers = c.pages_by_workers
    assert direct == inline and len(direct["enrollment"]) > 3 * PAGE
    asked = pages_asked(server)
    assert set(asked.values()) == {1}
    assert by_workers == len(asked) - len(COLLECTIONS) > 0
    fetched = [e for e in logs if e["event"] == "collection fetched"]
    assert sum(e["pages_by_workers"] for e in fetched) == by_workers
    assert not any(e["event"] == FALLBACK for e in logs)
    schemes = {r.headers["authorization"].split()[0] for r in server.data_requests()}
    assert schemes == ({"OAuth"} if server.version == "1.1" else {"Bearer"})


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Faults(server_error=1), "HTTP 500"),
        (Faults(rate_limit=1, retry_after="0"), "HTTP 429"),
        (Faults(drop=1), "no answer (RemoteProtocolError)"),
    ],
    ids=["500", "429", "dropped"],
)
async def test_a_failed_worker_request_is_asked_again_by_the_sync_process(
    fault: Faults, reason: str
) -> None:
    """One attempt in the worker; the page is then asked for again with the retry policy,
    and the sync process requests every later page itself: a failing or limiting server
    gets no more requests than before."""
    with FakeOneRoster(aged_district(SPEC)) as srv:
        async with connect(srv, own=False) as c:
            clean = await staged(c)
        pages = len(srv.data_requests())
        srv.requests.clear()
        srv.faults = fault
        fault.only, fault.from_offset = "/enrollments", 2 * PAGE
        with capture_logs() as logs:
            async with connect(srv) as c:
                got = await staged(c)
                off = c._direct_off
        asked = pages_asked(srv)
    assert got == clean
    assert off == reason
    fallbacks = [e for e in logs if e["event"] == FALLBACK]
    assert len(fallbacks) == 1 and fallbacks[0]["reason"] == reason
    assert fallbacks[0]["request"].endswith("/enrollments")
    assert sorted(asked.values())[-1] == 2 and list(asked.values()).count(2) == 1
    assert sum(asked.values()) == pages + 1


async def test_a_revoked_token_is_renewed_by_the_sync_process() -> None:
    """A worker's request refused with 401 (the OAuth2 token revoked mid-run) is asked
    again by the sync process, which fetches one new token; the rows are complete."""
    with FakeOneRoster(aged_district(SPEC), version="1.2") as srv:
        async with connect(srv, own=False) as c:
            clean = await staged(c)
        async with connect(srv) as c:
            got = StagedBatch()
            async for batch in c.fetch(FetchMode.FULL, None):
                if srv.tokens_issued == 2:  # the first connector's token, then this one's
                    srv.revoke_tokens()
                got.extend(batch if isinstance(batch, StagedBatch) else sort_batch(batch))
        statuses = Counter(r.status for r in srv.data_requests())
    rows: dict[str, list[Any]] = {kind: sorted(rows) for kind, rows in got.rows.items()}
    rows["rejected"] = sorted(map(repr, got.rejected))
    assert rows == clean
    assert srv.tokens_issued == 3 and statuses[401] >= 1


async def test_paging_quirks_hold_for_pages_the_workers_request() -> None:
    """A server that ignores `offset` still fails the run; one that caps `limit` is still
    read in full."""
    quirks = Quirks(same_page=True)
    with FakeOneRoster(aged_district(SPEC), quirks=quirks) as srv:
        async with connect(srv) as c:
            with pytest.raises(FatalSourceError, match="same page"):
                await staged(c)
    with FakeOneRoster(aged_district(SPEC)) as srv:
        async with connect(srv, own=False) as c:
            clean = await staged(c)
        srv.quirks = Quirks(max_limit=3, link_header=False)
        async with connect(srv) as c:
            got = await staged(c)
            assert c.pages_by_workers > 0
    assert got == clean


async def test_the_clients_hooks_see_the_workers_requests() -> None:
    """The daemon's request metrics hang on the client's event hooks: a page a worker
    requested reaches them too, with its status."""
    seen: list[tuple[str, int]] = []

    async def on_response(response: httpx.Response) -> None:
        seen.append((response.request.url.params.get("offset", ""), response.status_code))

    started: list[str] = []

    async def on_request(request: httpx.Request) -> None:
        started.append(request.url.path)

    hooks = {"request": [on_request], "response": [on_response]}
    with FakeOneRoster(aged_district(SPEC)) as srv:
        async with connect(srv, hooks=hooks) as c:
            await staged(c)
            assert c.pages_by_workers > 0
        total = len(srv.data_requests())
    assert len(seen) == len(started) == total
    assert {status for _, status in seen} == {200}


def test_what_a_worker_is_handed_never_shows_a_secret() -> None:
    """The secret and the token cross to the worker, but no repr, log line or answer
    shows them."""
    spec = ClientSpec(30.0, True, None, ("client-id", "client-secret-xyz"))
    request = DirectRequest(
        spec,
        "http://127.0.0.1:9/x/users",
        (("offset", "7"),),
        (("Authorization", "Bearer tok-xyz"),),
        "users",
    )
    assert "client-secret-xyz" not in repr(spec) and "tok-xyz" not in repr(request)
    answer = fetch_page(request)  # nothing listens on port 9
    assert answer.page is None and answer.status == 0
    assert answer.problem == "no answer (ConnectError)"
    assert "xyz" not in repr(answer)


async def test_the_engine_lets_connectors_request_unless_a_test_swaps_the_network(
    store: Store, tmp_path: Path
) -> None:
    """A daemon's or the CLI's engine lets the workers request pages; an engine whose
    network a test swapped (``transport``) does not, so no request leaves the swap."""
    with FakeOneRoster(aged_district(SPEC)) as srv:
        settings = settings_for(tmp_path, rest_source(srv))
        async with SyncEngine(settings, store).connector(SOURCE) as conn:
            assert isinstance(conn, OneRosterConnector) and conn._own_requests
        swapped = SyncEngine(settings, store, transport=httpx.AsyncHTTPTransport())
        async with swapped.connector(SOURCE) as conn:
            assert isinstance(conn, OneRosterConnector) and not conn._own_requests


async def test_a_server_going_down_while_the_workers_fetch_fails_the_fetch_naming_a_request() -> (
    None
):
    """Every connection drops once some worker pages are in: the workers' failure hands the
    page back, the sync process's retries fail too, and the fetch ends in a retriable error
    that names the request (the run then fails and changes nothing)."""
    with FakeOneRoster(aged_district(SPEC), faults=Faults(down_after=15)) as srv:
        async with connect(srv) as c:
            with pytest.raises(RetriableSourceError, match=r"connection failed .* on GET /ims/"):
                await staged(c)
            assert c.pages_by_workers > 0
            assert c._direct_off is not None and c._direct_off.startswith("no answer")


def test_workers_share_the_default_tls_context_their_fork_server_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker's client verifies with the context the fork server built once
    (direct.share_default_tls, the preload's), as httpx's own default would; a CA bundle or
    verification off is the worker's own as before; a context that cannot be built is left
    to each client."""
    from connectors.oneroster import direct

    monkeypatch.setattr(direct, "_clients", {})
    monkeypatch.setattr(direct, "_default_tls", None)
    direct.share_default_tls()
    shared = direct._default_tls
    assert shared is not None
    assert shared.cert_store_stats() == httpx.create_ssl_context().cert_store_stats()
    client = direct._client(ClientSpec(30.0, True, None))
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert pool._ssl_context is shared
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(Path(__import__("certifi").where()).read_bytes())
    own = direct._client(ClientSpec(30.0, True, str(bundle)))._transport._pool  # type: ignore[attr-defined]
    assert own._ssl_context is not shared
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    direct.share_default_tls()
    assert direct._default_tls is None


def test_a_worker_starts_with_its_request_modules_and_tls_context_loaded() -> None:
    """In a process of its own (the fork server is one per process, and a test's may have
    started with other modules): the workers of a pool that sends requests find the request
    sender, httpx's transport and the shared TLS context there before their first task."""
    import subprocess
    import sys

    program = (
        "from connectors.oneroster import decode, forkserver\n"
        "probe = \"(lambda m: ('httpcore' in m, 'encodings.idna' in m, "
        "m['connectors.oneroster.direct']._default_tls is not None))"
        "(__import__('sys').modules)\"\n"
        "if __name__ == '__main__':\n"
        "    pool = decode.start_pool(1, preload=(forkserver.REQUESTS,))\n"
        "    print(pool.submit(eval, probe).result(timeout=60))\n"
        "    pool.shutdown()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(True, True, True)"

"""Pages the decode workers request themselves (connectors.oneroster.direct), against the
loopback fake server: the same rows as the sync process's own requests, every page asked
once, and any failure asked again the careful way (retries, token refresh, errors naming the
request), after which the sync process requests the rest itself."""

from __future__ import annotations

import gzip
import ssl
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from connectors.oneroster import decode, direct
from connectors.oneroster.auth import OAuth1Signer
from connectors.oneroster.config import OneRosterSourceConfig
from connectors.oneroster.connector import OneRosterConnector
from connectors.oneroster.direct import ClientSpec, DirectRequest, fetch_page
from rostersync.errors import FatalSourceError, RetriableSourceError
from rostersync.sampledata import DistrictSpec
from rostersync.source.connector import ConnectorContext, FetchMode
from rostersync.source.rows import StagedBatch, sort_batch
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from tests.connectors.proxied_fetch import reply
from tests.e2e.test_oneroster_e2e import SOURCE, aged_district, rest_source, settings_for
from tests.fakes.oneroster_server import AuthMode, FakeOneRoster, Faults, Quirks, Version

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


@pytest.fixture(autouse=True)
def no_proxy_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers send through the standard library's client unless a proxy is set (one
    test sets one, in a process of its own)."""
    for name in direct.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.mark.parametrize(
    ("variable", "value", "configured"),
    [
        (None, None, False),
        ("https_proxy", "http://proxy:3128", True),
        ("HTTP_PROXY", "http://proxy:3128", True),
        ("ALL_PROXY", "http://proxy:3128", True),
        ("http_proxy", "", False),
        ("NO_PROXY", "*", False),
    ],
)
def test_a_proxy_in_the_environment_sends_the_workers_requests_through_httpx(
    monkeypatch: pytest.MonkeyPatch, variable: str | None, value: str | None, configured: bool
) -> None:
    if variable is not None and value is not None:
        monkeypatch.setenv(variable, value)
    assert direct.proxy_configured() is configured
    config = OneRosterSourceConfig.model_validate(
        {
            "type": "oneroster",
            "base_url": "http://127.0.0.1:9/x",
            "auth": {"type": "bearer", "token": "t"},
        }
    )
    connector = OneRosterConnector(
        ConnectorContext("district", config, httpx.AsyncClient(trust_env=False))
    )
    assert connector._spec().via_httpx is configured


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
    version: Version = "1.2" if request.param == "bearer" else request.param
    auth: AuthMode | None = "bearer" if request.param == "bearer" else None
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
        (Faults(drop=1), "no answer (RemoteDisconnected)"),
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


@pytest.mark.parametrize(
    ("via_httpx", "refused"), [(False, "ConnectionRefusedError"), (True, "ConnectError")]
)
def test_what_a_worker_is_handed_never_shows_a_secret(via_httpx: bool, refused: str) -> None:
    """The secret and the token cross to the worker, but no repr, log line or answer
    shows them (whichever client sends the request)."""
    spec = ClientSpec(30.0, True, None, ("client-id", "client-secret-xyz"), via_httpx=via_httpx)
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
    assert answer.problem == f"no answer ({refused})"
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


def last_page(srv: FakeOneRoster, collection: str) -> int:
    """The offset of the collection's last page: one a worker requests, none after it."""
    total = int(httpx.get(f"{srv.origin}/_admin/stats").json()["records"][collection])
    assert total > 2 * PAGE
    return (total - 1) // PAGE * PAGE


def assert_no_secret(message: str, srv: FakeOneRoster) -> None:
    """Nothing of the credentials, the signature, the rest of the query or the host."""
    with srv._lock:
        tokens = list(srv._tokens)
    for leak in (srv.client_secret, srv.bearer_token, *tokens, "oauth_", "limit=", "127.0.0.1"):
        assert leak not in message, leak
    assert "\n" not in message


WORKER_FAILURES: list[tuple[Version, Faults, str]] = [
    (
        "1.1",
        Faults(server_error=99),
        "HTTP 500 Internal Server Error from {where} after 4 attempts "
        "(a decode worker had tried first: HTTP 500)",
    ),
    (
        "1.2",
        Faults(server_error=99),
        "HTTP 500 Internal Server Error from {where} after 4 attempts "
        "(a decode worker had tried first: HTTP 500)",
    ),
    (
        "1.1",
        Faults(rate_limit=99, retry_after="0"),
        "HTTP 429 Too Many Requests from {where} after 4 attempts "
        "(a decode worker had tried first: HTTP 429)",
    ),
    (
        "1.1",
        Faults(drop=99),
        "connection failed (RemoteProtocolError) on {where} after 4 attempts "
        "(a decode worker had tried first: no answer (RemoteDisconnected))",
    ),
    (
        "1.1",
        Faults(delay=0.8),
        "timed out (ReadTimeout) on {where} after 2 attempts "
        "(a decode worker had tried first: no answer (TimeoutError))",
    ),
    (
        "1.1",
        Faults(not_found=99),
        "HTTP 404 Not Found from {where} (a decode worker had tried first: HTTP 404)",
    ),
]


@pytest.mark.parametrize(
    ("version", "fault", "expected"),
    WORKER_FAILURES,
    ids=["500", "500-oauth2", "429", "dropped", "timeout", "404"],
)
async def test_a_page_a_worker_asked_for_first_fails_naming_path_offset_and_attempts(
    version: Version, fault: Faults, expected: str
) -> None:
    """A page that keeps failing in the worker and then in the sync process's retries ends in
    an error naming the collection's path, the page's offset, the sync process's tries and
    the worker's own, with what each got; no credential of the source's auth."""
    slow = fault.delay > 0
    with FakeOneRoster(aged_district(SPEC), version=version) as srv:
        fault.only, fault.from_offset = "/enrollments", last_page(srv, "enrollments")
        srv.faults = fault
        settings: dict[str, Any] = {"timeout": 0.5, "retry": FAST | {"max_attempts": 2}}
        async with connect(srv, **(settings if slow else {})) as c:
            error = RetriableSourceError if fault.not_found == 0 else FatalSourceError
            with pytest.raises(error) as err:
                await staged(c)
            assert c.pages_by_workers > 0
        asked = pages_asked(srv)[("/enrollments", str(fault.from_offset))]
    where = f"GET {srv.base_url.removeprefix(srv.origin)}/enrollments at offset={fault.from_offset}"
    assert err.value.detail == expected.format(where=where)
    assert asked == (2 if fault.not_found else 3 if slow else 5)  # the worker's try, then ours
    assert_no_secret(str(err.value), srv)


async def test_a_failed_run_reports_the_page_in_its_error_json_and_log_line(
    store: Store, tmp_path: Path
) -> None:
    """The run's error (what `runs show` prints), its JSON and the sync_failed log line all
    name the collection's path, the page's offset and the tries, never the secret."""
    with FakeOneRoster(aged_district(SPEC)) as srv:
        offset = last_page(srv, "enrollments")
        srv.faults = Faults(server_error=99, only="/enrollments", from_offset=offset)
        source = rest_source(srv, page_size=PAGE, decode_workers=2)
        with capture_logs() as logs:
            report = await SyncEngine(settings_for(tmp_path, source), store).sync(SOURCE)
    expected = (
        f"source {SOURCE!r}: HTTP 500 Internal Server Error from GET /ims/oneroster/v1p1/"
        f"enrollments at offset={offset} after 4 attempts "
        "(a decode worker had tried first: HTTP 500)"
    )
    assert report.status == "failed"
    assert report.error == expected
    assert report.as_json()["error"] == expected
    (failed,) = [e for e in logs if e["event"] == "sync_failed"]
    assert failed["error"] == expected
    assert srv.client_secret not in repr(logs) and "oauth_signature" not in repr(logs)


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


# -- the standard library's client (no proxy configured) -------------------------------------


class _CannedServer(ThreadingHTTPServer):
    """Answers every GET with one canned answer and records each request's headers;
    ``fault`` spoils the answer: ``short`` (the connection closes before the body's declared
    length), ``slow`` (half a second before anything), ``garbage`` (no HTTP at all);
    ``framing`` sends a whole answer another way HTTP allows: ``chunked`` (in three
    chunks), ``close`` (its length, then the connection closed), ``until-close`` (no length:
    the body ends where the connection does)."""

    daemon_threads = True
    answer: tuple[int, dict[str, str], bytes]
    seen: list[dict[str, str]]
    fault: str | None = None
    framing: str | None = None


class _Canned(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _CannedServer

    def do_GET(self) -> None:
        self.server.seen.append({k.lower(): v for k, v in self.headers.items()})
        status, headers, body = self.server.answer
        fault = self.server.fault
        if fault == "slow":
            time.sleep(0.5)
        if fault == "garbage":
            self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            self.close_connection = True
        elif fault == "short":
            self.send_response(status)
            self.send_header("Content-Length", str(len(body) + 100))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif self.server.framing is not None:
            self._framed(self.server.framing, status, headers, body)
        else:
            reply(self, status, headers.items(), body)

    def _framed(self, framing: str, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            third = len(body) // 3 + 1
            for start in range(0, len(body), third):
                part = body[start : start + third]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        if framing == "close":
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def canned(
    answer: tuple[int, dict[str, str], bytes], tls: ssl.SSLContext | None = None
) -> Iterator[_CannedServer]:
    srv = _CannedServer(("127.0.0.1", 0), _Canned)
    srv.answer, srv.seen = answer, []
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def fresh_connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[Any, Any]]:
    """The connections and clients of the test's process (the worker, here) start empty,
    and are closed after it."""
    from connectors.oneroster import direct

    monkeypatch.setattr(direct, "_clients", {})
    monkeypatch.setattr(direct, "_connections", {})
    yield direct._connections
    for conn in direct._connections.values():
        conn.close()


def users_page(srv: FakeOneRoster, offset: int) -> bytes:
    """A page of users as the fake server sends it (through httpx, signed)."""
    auth = srv.auth_config()
    signer = OAuth1Signer(auth["client_id"], auth["client_secret"])
    params = {"limit": str(PAGE), "offset": str(offset)}
    answer = httpx.get(srv.base_url + "/users", params=params, auth=signer)
    assert answer.status_code == 200
    return answer.content


def users_request(url: str, offset: int, spec: ClientSpec) -> DirectRequest:
    params = (("limit", str(PAGE)), ("offset", str(offset)))
    return DirectRequest(spec, url, params, (("Accept", "application/json"),), "users")


def test_a_worker_keeps_its_connection_alive_and_opens_another_once_the_server_closed_it(
    fresh_connections: dict[Any, Any],
) -> None:
    """One keep-alive connection per origin carries a worker's requests; when the server has
    closed it while it sat idle, the next request goes on a new one instead of failing
    (which would send the rest of the run's pages the slow way). Each request is signed,
    names the sync process's client and asks for gzip."""
    with FakeOneRoster(aged_district(SPEC)) as srv:
        auth = srv.auth_config()
        spec = ClientSpec(30.0, True, None, (auth["client_id"], auth["client_secret"]))
        expected = [decode.decode_known("users", users_page(srv, o), None) for o in (0, 7, 14)]
        srv.requests.clear()
        url = srv.base_url + "/users"
        first = fetch_page(users_request(url, 0, spec))
        (conn,) = fresh_connections.values()
        sock = conn.sock
        second = fetch_page(users_request(url, 7, spec))
        assert conn.sock is sock  # kept alive
        assert srv._server is not None
        srv._server.close_connections()
        deadline = time.monotonic() + 5
        while not direct_closed(sock) and time.monotonic() < deadline:
            time.sleep(0.01)
        third = fetch_page(users_request(url, 14, spec))
        assert conn.sock is not None and conn.sock is not sock
        seen = srv.data_requests()
    assert [first.page, second.page, third.page] == expected
    assert {a.status for a in (first, second, third)} == {200}
    assert len(seen) == 3  # none refused, none asked twice
    for request in seen:
        assert request.headers["authorization"].startswith("OAuth ")
        assert request.headers["user-agent"] == f"python-httpx/{httpx.__version__}"
        assert request.headers["accept-encoding"] == "gzip"


def direct_closed(sock: Any) -> bool:
    from connectors.oneroster import direct

    return bool(direct._closed_while_idle(sock))


def test_a_gzip_page_is_undone_and_an_encoding_not_asked_for_is_handed_back(
    fresh_connections: dict[Any, Any],
) -> None:
    """A server that compresses (most do, when asked) sends the same rows; a body in an
    encoding the worker did not ask for, or a gzip body that does not decompress, is a
    problem the sync process asks again for, never a traceback."""
    with FakeOneRoster(aged_district(SPEC)) as srv:
        raw = users_page(srv, 0)
    expected = decode.decode_known("users", raw, None)
    headers = {"Content-Encoding": "gzip", "X-Total-Count": "74", "Link": '<x>; rel="next"'}
    spec = ClientSpec(30.0, True, None)
    with canned((200, headers, gzip.compress(raw))) as srv:
        answer = fetch_page(users_request(f"http://127.0.0.1:{srv.server_port}/u", 0, spec))
        half = len(raw) // 2
        srv.answer = (
            200,
            {"Content-Encoding": "gzip"},
            gzip.compress(raw[:half]) + gzip.compress(raw[half:]),
        )
        members = fetch_page(users_request(f"http://127.0.0.1:{srv.server_port}/u", 0, spec))
        srv.answer = (200, {"Content-Encoding": "br"}, raw)
        brotli = fetch_page(users_request(f"http://127.0.0.1:{srv.server_port}/u", 7, spec))
        srv.answer = (200, {"Content-Encoding": "gzip"}, raw[:100])
        broken = fetch_page(users_request(f"http://127.0.0.1:{srv.server_port}/u", 14, spec))
        srv.answer = (200, {"Content-Encoding": "x" * 500}, raw)
        long_name = fetch_page(users_request(f"http://127.0.0.1:{srv.server_port}/u", 21, spec))
    assert answer.page == expected and answer.problem is None
    assert members.page == expected  # a body of two gzip members
    assert (answer.total, answer.link) == ("74", '<x>; rel="next"')
    assert brotli.page is None and brotli.status == 200
    assert brotli.problem == "unexpected answer: a body in 'br', which was not asked for"
    assert broken.page is None and broken.problem is not None
    assert broken.problem.startswith("unexpected answer: a gzip body that does not decompress")
    # What the server named is cut short in the problem (and the log line that carries it).
    assert (
        long_name.problem == f"unexpected answer: a body in {'x' * 40!r}, which was not asked for"
    )


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that signs itself, and its key (PEM files)."""
    import ipaddress
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rostersync test")])
    now = datetime.now(UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_a_worker_verifies_tls_as_the_sources_settings_say(
    fresh_connections: dict[Any, Any], tmp_path: Path
) -> None:
    """Over HTTPS: a server whose certificate the source's ca_bundle holds is trusted, the
    same server without it is refused (handed back, never read), and `verify_tls: false`
    reads it, as the sync process's client would."""
    cert, key = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    with FakeOneRoster(aged_district(SPEC)) as fake:
        raw = users_page(fake, 0)
    expected = decode.decode_known("users", raw, None)
    with canned((200, {"X-Total-Count": "74"}, raw), tls) as srv:
        url = f"https://127.0.0.1:{srv.server_port}/u"
        bundled = fetch_page(users_request(url, 0, ClientSpec(30.0, True, str(cert))))
        default = fetch_page(users_request(url, 0, ClientSpec(30.0, True, None)))
        unverified = fetch_page(users_request(url, 0, ClientSpec(30.0, False, None)))
        asked = len(srv.seen)
    assert bundled.page == expected and unverified.page == expected
    assert default.page is None and default.status == 0
    assert default.problem == "no answer (SSLCertVerificationError)"
    assert asked == 2


def test_with_a_proxy_in_the_environment_the_workers_requests_take_it_too() -> None:
    """httpx's clients honour HTTP_PROXY and the like, the standard library's would not: with
    one set, the workers send their requests through an httpx client of their own, so that
    every request of the run, theirs included, goes through the proxy. In a process of its
    own (the workers inherit their fork server's environment)."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "tests.connectors.proxied_fetch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["via_httpx"] == 1
    assert out["pages_by_workers"] > 20
    assert out["carried"] == out["served"] == out["pages_by_workers"] + len(COLLECTIONS)


@pytest.mark.parametrize("framing", ["chunked", "close", "until-close"])
@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_a_page_framed_any_way_http_allows_is_read_whole(
    fresh_connections: dict[Any, Any], framing: str, gzipped: bool
) -> None:
    """Servers and the proxies before them send a body in chunks, or close the connection
    after it, with or without its length: each is the page, whole, and the worker's next
    request gets its answer (on a new connection where the server closed the last)."""
    with FakeOneRoster(aged_district(SPEC)) as fake:
        raw = users_page(fake, 0)
    expected = decode.decode_known("users", raw, None)
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    body = gzip.compress(raw) if gzipped else raw
    spec = ClientSpec(5.0, True, None)
    with canned((200, headers, body)) as srv:
        srv.framing = framing
        url = f"http://127.0.0.1:{srv.server_port}/u"
        answers = [fetch_page(users_request(url, offset, spec)) for offset in (0, 7, 14)]
    assert [a.problem for a in answers] == [None, None, None]
    assert [a.page for a in answers] == [expected] * 3
    assert len(srv.seen) == 3


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("short", "no answer (IncompleteRead)"),
        ("slow", "no answer (TimeoutError)"),
        ("garbage", "no answer (BadStatusLine)"),
    ],
)
def test_a_broken_answer_is_handed_back_and_the_next_request_goes_on_a_new_connection(
    fresh_connections: dict[Any, Any], fault: str, problem: str
) -> None:
    """A body cut short, a server slower than the source's timeout, an answer that is not
    HTTP: each is a problem the sync process asks again for (never a traceback, never a
    page made of part of a body), and the worker's next request is not sent on the
    connection left in that state."""
    with FakeOneRoster(aged_district(SPEC)) as fake:
        raw = users_page(fake, 0)
    expected = decode.decode_known("users", raw, None)
    spec = ClientSpec(0.25, True, None)
    with canned((200, {}, raw)) as srv:
        url = f"http://127.0.0.1:{srv.server_port}/u"
        assert fetch_page(users_request(url, 0, spec)).page == expected
        srv.fault = fault
        broken = fetch_page(users_request(url, 7, spec))
        srv.fault = None
        after = fetch_page(users_request(url, 14, spec))
    assert broken.page is None and broken.status == 0
    assert broken.problem == problem
    assert after.page == expected

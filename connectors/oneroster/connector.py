"""The OneRoster REST connector (ClassLink Roster Server and other 1.1/1.2 providers).

A full run reads ``/orgs``, ``/users`` (every role: the engine decides who matters),
``/classes`` and ``/enrollments``, side by side, one page per batch. A delta run adds
``filter=dateLastModified>'T'`` with ``T = since - delta_overlap``: the engine passes the
high-water mark taken from the data, and the overlap covers records a server stamps late or a
clock that differs from the data's; re-reading a few records is harmless. A 400 on the filter
raises :class:`~rostersync.errors.DeltaUnsupportedError` and the engine runs full instead.

A live teacher fetch reads ``/teachers/{id}/classes`` then ``/classes/{id}/students`` per class.
ClassLink includes the class's teachers in that answer, so it is filtered to students; the
enrollments it returns are synthesised with ids ``live:{class}:{user}:{role}`` because the
relation endpoints carry no enrollment ids (the engine matches them on class, user and role).

Every request goes through the shared :class:`~rostersync.source.retry.RetryPolicy` and a
connector-wide semaphore of ``max_concurrency``; URLs are always ``base_url`` plus our own path
and parameters, never an ``href`` from the data or a ``Link`` header. Once a collection is
known to be large (its first page's ``X-Total-Count``), the decode workers request its other
pages themselves, one attempt each, within the same semaphore
(:mod:`connectors.oneroster.direct`); a page they could not get is asked for again here, and
after anything but a renewable token's 401 every later page is too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from dataclasses import replace
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from connectors.oneroster import decode, errors, forkserver, paging
from connectors.oneroster.auth import BearerToken, OAuth1Signer, OAuth2ClientCredentials
from connectors.oneroster.config import (
    BearerAuth,
    OAuth1Auth,
    OAuth2Auth,
    OneRosterSourceConfig,
)
from connectors.oneroster.decode import (
    DecodedPage,
    DecodeError,
    decode_known,
    decode_page,
    decoder_failed,
    forget_known,
    pool_size,
    records_of,
    start_pool,
)
from connectors.oneroster.direct import ClientSpec, DirectRequest, fetch_page, proxy_configured
from connectors.oneroster.errors import (
    describe,
    failed_request,
    raise_for_status,
    token_for,
    transport_error,
    undecodable,
)
from connectors.oneroster.normalize import normalize, parse_session
from connectors.oneroster.paging import OffsetPaginator, Page, paginate, parse_total
from rostersync.errors import DeltaUnsupportedError
from rostersync.source.connector import ConnectorContext, FetchMode
from rostersync.source.records import (
    STUDENT,
    TEACHER,
    AcademicSession,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterPerson,
    RosterRecord,
    TeacherRef,
    TeacherRoster,
)
from rostersync.source.retry import RetryPolicy
from rostersync.source.rows import KnownSpec, StagedBatch

#: What a full or delta run reads (side by side), with each answer's envelope key.
COLLECTIONS = ("orgs", "users", "classes", "enrollments")

#: Pages of a collection in progress at once, per request allowed in flight: a page is in
#: progress from its request until it is decoded. The requests themselves stay within
#: ``max_concurrency`` (the semaphore in ``_get``); the extra pages are answers that wait
#: for the decode pool. With one page per request, the pages waiting for a busy decode
#: worker held every request slot, and the connection sat idle while the worker caught up
#: (a quarter of both cores went unused during a district's fetch).
PAGES_PER_REQUEST_SLOT = 2

#: Decoded batches the collections may read ahead of the engine's staging.
BATCHES_AHEAD = 16

#: The decode workers' own requests (connectors.oneroster.direct) stop for the run after this
#: many answers of 401: one is an OAuth2 token revoked early, which the sync process renews.
DIRECT_MAX_401 = 3


class _Missing(Exception):
    """A relation endpoint answered 404: some servers say "no classes" that way."""


def build_auth(source: str, config: OneRosterSourceConfig) -> httpx.Auth:
    auth = config.auth
    if isinstance(auth, OAuth1Auth):
        return OAuth1Signer(auth.client_id, auth.client_secret.get_secret_value())
    if isinstance(auth, OAuth2Auth):
        return OAuth2ClientCredentials(
            source,
            auth.token_url,
            auth.client_id,
            auth.client_secret.get_secret_value(),
            config.scope,
        )
    if isinstance(auth, BearerAuth):
        return BearerToken(auth.token.get_secret_value())
    raise TypeError(f"unknown auth settings {type(auth).__name__}")


class OneRosterConnector:
    """See the module docstring."""

    #: Read at offsets: an id sent twice means records moved, maybe past others (sync/repeats).
    pages_may_shift = True

    def __init__(self, ctx: ConnectorContext) -> None:
        if not isinstance(ctx.config, OneRosterSourceConfig):
            raise TypeError(f"source {ctx.source!r}: expected a oneroster source config")
        self.config: OneRosterSourceConfig = ctx.config
        self.source = ctx.source
        self._http = ctx.http
        self._log = ctx.logger
        self._auth = build_auth(ctx.source, ctx.config)
        self._retry = RetryPolicy(ctx.config.retry, log=self._log)
        self._slots: asyncio.Semaphore | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._pool_broken = False
        self._own_requests = ctx.own_requests
        self._rows = ctx.rows
        #: why the workers no longer send requests themselves (None while they do)
        self._direct_off: str | None = None
        #: the shortest time a page the sync process asked for took to come (see _workers)
        self._fastest_page: float | None = None
        self._direct_401s = 0
        self._client_spec: ClientSpec | None = None
        #: pages the decode workers requested themselves, over the connector's life
        self.pages_by_workers = 0
        self.closed = False
        #: the academic sessions the last fetch read, by sourcedId (``terms: {mode: current}``)
        self.academic_sessions: dict[str, AcademicSession] = {}
        #: what the last fetch forgave, for the run's report (complete once the fetch ends)
        self.warnings: list[str] = []
        #: set by the engine for a full run: where the decode workers read the mirror's
        #: fingerprints, to leave out the records it holds as they are (rostersync.sync.known)
        self.skip_known: KnownSpec | None = None

    @property
    def supports_delta(self) -> bool:
        return True

    # -- requests -----------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.config.base_url}{path}"

    async def _get(
        self,
        path: str,
        params: dict[str, str] | None = None,
        *,
        passthrough: frozenset[int] = frozenset(),
        read: Callable[[httpx.Response], Awaitable[Any]] | None = None,
    ) -> tuple[httpx.Response, Any]:
        """GET ``base_url + path`` with retries; the parsed JSON (None for a passthrough status),
        or what ``read`` makes of the answer. Parsing is part of each try: a body cut short
        (a 200 all the same) is asked for again, like a dropped connection."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_concurrency)
        slots = self._slots
        url = self._url(path)

        async def attempt() -> tuple[httpx.Response, Any]:
            # A fresh request per try: the auth flow signs each one anew (nonce, timestamp).
            request = self._http.build_request(
                "GET", url, params=params, headers={"Accept": "application/json"}
            )
            async with slots:
                try:
                    response = await self._http.send(request, auth=self._auth)
                except httpx.TransportError as exc:
                    where = describe(request)
                    if (failed := failed_request(exc, request)) is not request:
                        where = token_for(failed.url.path, request)
                    raise transport_error(self.source, exc, where) from exc
            if response.status_code in passthrough:
                return response, None
            raise_for_status(self.source, response)
            try:
                # orjson: parsing is a third of a large district's fetch; the stdlib is 2-3x slower.
                return response, await read(response) if read else orjson.loads(response.content)
            except DecodeError as exc:
                raise undecodable(self.source, response, str(exc)) from None
            except orjson.JSONDecodeError:
                raise undecodable(self.source, response, "invalid JSON") from None

        return await self._retry.call(attempt)

    async def _decode(self, key: str, response: httpx.Response, total: int | None) -> DecodedPage:
        """The page, normalized: in the decode pool when it is worth the trip (a large page
        of a collection that is large, or whose size the server does not say)."""
        content = response.content
        if len(content) >= decode.POOL_MIN_BYTES and self._pool_worth(total):
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(
                    self._start_pool(), decode_known, key, content, self.skip_known
                )
            except BrokenExecutor as exc:
                self._pool_failed(exc)
            except Exception as exc:  # not all DecodeErrors (a call or answer failing to cross):
                raise decoder_failed(exc) from None  # named by _get, as a page that does not decode
        # As fingerprinted rows, like the workers' pages; in a full run the records the
        # mirror holds as they are are left out unparsed here too (0.9 ms a page, not 6.4).
        if self._rows and self.skip_known is not None:
            return decode_known(key, content, self.skip_known)
        return decode_page(key, content, self._rows)

    # -- the decode pool ----------------------------------------------------------------------

    def _workers(self) -> int:
        cfg = self.config
        return pool_size(
            cfg.decode_workers, cfg.max_concurrency, self._own_requests, self._fastest_page
        )

    def _pool_worth(self, total: int | None) -> bool:
        """A collection of ``total`` records (None: the server does not say) is decoded in
        the pool: the workers' start-up pays for itself on a large one only."""
        return (
            self._workers() > 0
            and not self._pool_broken
            and (total is None or total >= decode.POOL_MIN_RECORDS)
        )

    def _start_pool(self) -> ProcessPoolExecutor:
        if self.closed:
            # Its processes would outlive the connector, and the program would wait for them.
            raise BrokenExecutor("the connector is closed")
        if self._pool is None:
            requests = (forkserver.REQUESTS,) if self._own_requests else ()
            preload = requests + forkserver.store_driver(getattr(self.skip_known, "dialect", None))
            workers = self._workers()
            self._pool = start_pool(workers, preload=preload)
            fastest = self._fastest_page
            self._log.info(
                "decode pool started",
                workers=workers,
                requests=self._own_requests,
                fastest_page_ms=None if fastest is None else round(fastest * 1000, 1),
            )
        return self._pool

    def _pool_failed(self, exc: BrokenExecutor) -> None:
        # A worker died, or could not start (multiprocessing re-imports the program's main
        # module in each worker, which fails for `python -c` or stdin). Slower, but the run
        # goes on: requests and decoding here from now on; one warning for all waiting pages.
        if not self._pool_broken:
            self._pool_broken = True
            self._log.warning("decode pool failed; decoding in the sync process", error=str(exc))

    # -- pages the decode workers request themselves ------------------------------------------

    def _direct_ok(self, total: int | None) -> bool:
        return self._own_requests and self._direct_off is None and self._pool_worth(total)

    def _direct_headers(self) -> tuple[tuple[str, str], ...] | None:
        """What a worker's request carries besides the OAuth 1.0a signature it makes itself;
        None when it cannot go (no valid OAuth2 token now: the sync process fetches one)."""
        accept = ("Accept", "application/json")
        auth = self._auth
        if isinstance(auth, OAuth1Signer):
            return (accept,)
        if isinstance(auth, BearerToken):
            return (accept, ("Authorization", auth.header))
        if isinstance(auth, OAuth2ClientCredentials):
            token = auth.current_token()
            return None if token is None else (accept, ("Authorization", f"Bearer {token}"))
        return None

    def _spec(self) -> ClientSpec:
        if self._client_spec is None:
            cfg = self.config
            auth = cfg.auth
            self._client_spec = ClientSpec(
                timeout=cfg.timeout.total_seconds(),
                verify_tls=cfg.verify_tls,
                ca_bundle=str(cfg.ca_bundle) if cfg.ca_bundle is not None else None,
                oauth1=(auth.client_id, auth.client_secret.get_secret_value())
                if isinstance(auth, OAuth1Auth)
                else None,
                via_httpx=proxy_configured(),
            )
        return self._client_spec

    async def _direct_page(
        self, path: str, key: str, offset: int, extra: dict[str, str]
    ) -> Page | str | None:
        """The page, requested and decoded by a decode worker; else the sync process must ask
        for it itself (see connectors.oneroster.direct): what the worker got, or None when no
        worker asked."""
        headers = self._direct_headers()
        if headers is None:
            return None
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_concurrency)
        params = {"limit": str(self.config.page_size), "offset": str(offset), **extra}
        request = DirectRequest(
            self._spec(), self._url(path), tuple(params.items()), headers, key, self.skip_known
        )
        hooks = self._http.event_hooks
        # The client's hooks (the daemon's request metrics) see the workers' requests too.
        shown = None
        if hooks["request"] or hooks["response"]:
            shown = httpx.Request("GET", request.url, params=params)
        loop = asyncio.get_running_loop()
        async with self._slots:
            for hook in hooks["request"] if shown is not None else ():
                await hook(shown)
            try:
                answer = await loop.run_in_executor(self._start_pool(), fetch_page, request)
            except BrokenExecutor as exc:
                self._pool_failed(exc)
                return None
            except Exception as exc:  # fetch_page answers every failure: a bug, asked again here
                return self._direct_failed(path, offset, 0, f"failed ({type(exc).__name__})")
        if shown is not None and answer.status:
            response = httpx.Response(answer.status, request=shown)
            for hook in hooks["response"]:
                await hook(response)
        if answer.page is None:
            return self._direct_failed(path, offset, answer.status, answer.problem or "no page")
        self.pages_by_workers += 1
        return paging.answered(offset, answer.total, answer.link, answer.page, by_worker=True)

    def _direct_failed(self, path: str, offset: int, status: int, problem: str) -> str:
        """The sync process asks again, the careful way; after anything but an OAuth2
        token's 401 it asks for every page itself from now on (a server that is failing or
        limiting us gets no extra requests). ``problem``, for asked_again."""
        if status == 401 and isinstance(self._auth, OAuth2ClientCredentials):
            self._direct_401s += 1
            if self._direct_401s < DIRECT_MAX_401:
                return problem
        if self._direct_off is None:
            self._direct_off = problem
            self._log.info(
                "pages requested by the sync process from now on",
                reason=problem,
                request=f"GET {httpx.URL(self._url(path)).path}",
                offset=offset,
            )
        return problem

    async def _page(
        self,
        path: str,
        key: str,
        offset: int,
        extra: dict[str, str],
        *,
        may_be_missing: bool,
        rows: bool = False,
    ) -> Page:
        params = {"limit": str(self.config.page_size), "offset": str(offset), **extra}
        passthrough = frozenset({400} if "filter" in extra else ()) | (
            frozenset({404}) if may_be_missing else frozenset()
        )

        async def read(response: httpx.Response) -> Any:
            # A DecodeError raised here is sorted by _get: cut JSON retried, a wrong shape fatal.
            if rows:
                return await self._decode(
                    key, response, parse_total(response.headers.get("X-Total-Count"))
                )
            return records_of(orjson.loads(response.content), key)

        response, body = await self._get(path, params, passthrough=passthrough, read=read)
        with contextlib.suppress(RuntimeError):  # elapsed: once the response was read
            took = response.elapsed.total_seconds()
            fastest = self._fastest_page
            self._fastest_page = took if fastest is None else min(fastest, took)
        if response.status_code == 404 and may_be_missing:
            raise _Missing(path)
        if response.status_code == 400 and "filter" in extra:
            raise DeltaUnsupportedError(
                self.source,
                "the server rejected the delta filter "
                f"(HTTP 400 from {describe(response.request)})",
            )
        headers = response.headers
        total, link = headers.get("X-Total-Count"), headers.get("Link")
        if rows:
            return paging.answered(offset, total, link, body)
        return replace(paging.answered(offset, total, link), records=body)

    async def _pages(
        self,
        path: str,
        key: str,
        extra: dict[str, str] | None = None,
        *,
        may_be_missing: bool = False,
        rows: bool = False,
    ) -> AsyncIterator[Page]:
        params = extra or {}
        sized: list[int | None] = []  # the first page's X-Total-Count, once it is read

        async def fetch(offset: int) -> Page:
            worker: str | None = None  # what a decode worker got instead of the page, if one asked
            if rows and sized and self._direct_ok(sized[0]):
                page = await self._direct_page(path, key, offset, params)
                if isinstance(page, Page):
                    return page
                worker = page
            with errors.asked_again(worker):
                page = await self._page(
                    path, key, offset, params, may_be_missing=may_be_missing, rows=rows
                )
            if not sized:
                sized.append(page.total)
            return page

        paginator = OffsetPaginator(self.source, path, self.config.page_size)
        width = self.config.max_concurrency * PAGES_PER_REQUEST_SLOT
        async for page in paginate(fetch, paginator, width):
            yield page
        self.warnings += paginator.notes

    async def _all(self, path: str, key: str) -> list[Any] | None:
        """Every record of a relation endpoint; None when the server says it does not exist."""
        try:
            return [
                r
                async for page in self._pages(path, key, may_be_missing=True)
                for r in page.records
            ]
        except _Missing:
            return None

    async def _sessions(self) -> tuple[dict[str, AcademicSession], list[str]]:
        """Every academic session, whatever the run's mode: a delta run needs the dates of
        the terms of the classes it reads too, and a district has a few dozen sessions.
        ``/academicSessions`` first, ``/terms`` when a server has only that."""
        raw: list[Any] | None = None
        for path, key in (("/academicSessions", "academicSessions"), ("/terms", "terms")):
            raw = await self._all(path, key)
            if raw is not None:
                break
        if raw is None:
            return {}, [
                "academic sessions not read: the server has neither /academicSessions nor "
                "/terms (404), so every class counts as current"
            ]
        found: dict[str, AcademicSession] = {}
        bad: list[str] = []
        for item in raw:
            session = parse_session(item)
            if isinstance(session, AcademicSession):
                found[session.sourced_id] = session
            else:
                bad.append(session)
        notes = []
        if bad:
            shown = "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
            notes.append(f"{len(bad)} academic sessions not read ({shown})")
        return found, notes

    # -- the Connector protocol ---------------------------------------------------------------

    async def fetch(
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord] | StagedBatch]:
        """Every page of the four collections, read side by side: a delta run's collections
        are a few pages each, and one after another it waited out each one's first request
        and its tail. Requests stay within ``max_concurrency`` (the semaphore is shared);
        batches come out in the order they are decoded, which staging does not mind."""
        self.academic_sessions, self.warnings = {}, []
        if self.config.terms.mode == "current":
            self.academic_sessions, self.warnings = await self._sessions()
        extra: dict[str, str] = {}
        if mode is FetchMode.DELTA and since is not None:
            extra["filter"] = paging.delta_filter(since, self.config.delta_overlap)
        # Bounded: a consumer that stages slowly holds the collections back.
        out: asyncio.Queue[Sequence[RosterRecord] | StagedBatch | BaseException | None]
        out = asyncio.Queue(maxsize=BATCHES_AHEAD)

        async def read(collection: str) -> None:
            started, pages, count = time.monotonic(), 0, 0
            by_workers = 0
            try:
                async for page in self._pages(f"/{collection}", collection, extra, rows=True):
                    pages += 1
                    by_workers += page.by_worker
                    decoded: DecodedPage = page.decoded
                    count += decoded.length
                    if decoded.length:
                        await out.put(decoded.batch)
            except Exception as exc:
                await out.put(exc)
                return
            self._log.info(
                "collection fetched",
                collection=collection,
                mode=str(mode),
                records=count,
                pages=pages,
                pages_by_workers=by_workers,
                seconds=round(time.monotonic() - started, 3),
            )
            await out.put(None)

        readers = [asyncio.create_task(read(c)) for c in COLLECTIONS]
        try:
            for _ in readers:
                while (item := await out.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item  # the first collection to fail fails the fetch
                    yield item
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            forget_known()  # what the pages decoded here read of the mirror

    async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
        tid = teacher.sourced_id
        out = TeacherRoster(teacher=None)
        user_path = f"/users/{quote(tid, safe='')}"
        _, body = await self._get(user_path, passthrough=frozenset({404}))
        if body is not None:
            record = normalize("users", body.get("user") if isinstance(body, dict) else None)
            if isinstance(record, Rejected):
                out.rejected.append(record)
            elif isinstance(record, RosterPerson):
                out.teacher = record
        raw_classes = await self._all(f"/teachers/{quote(tid, safe='')}/classes", "classes") or []
        for raw in raw_classes:
            klass = normalize("classes", raw)
            if isinstance(klass, Rejected):
                out.rejected.append(klass)
            elif isinstance(klass, RosterClass) and klass.status == "active":
                out.classes.append(klass)

        async def students(klass: RosterClass) -> tuple[RosterClass, list[Any]]:
            path = f"/classes/{quote(klass.sourced_id, safe='')}/students"
            return klass, await self._all(path, "users") or []

        # The semaphore in _get bounds how many of these run at once.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(students(k)) for k in out.classes]
        seen: dict[str, RosterPerson] = {}
        for task in tasks:
            klass, raw_users = task.result()
            cid = klass.sourced_id
            out.enrollments.append(
                RosterEnrollment(f"live:{cid}:{tid}:{TEACHER}", cid, tid, TEACHER)
            )
            for raw in raw_users:
                person = normalize("users", raw)
                if isinstance(person, Rejected):
                    out.rejected.append(person)
                    continue
                # Some servers (ClassLink) list the class's teachers here too.
                if not isinstance(person, RosterPerson) or person.role != STUDENT:
                    continue
                if person.status != "active":
                    continue
                seen.setdefault(person.sourced_id, person)
                out.enrollments.append(
                    RosterEnrollment(
                        f"live:{cid}:{person.sourced_id}:{STUDENT}", cid, person.sourced_id, STUDENT
                    )
                )
        out.persons = list(seen.values())
        return out

    async def aclose(self) -> None:
        # The engine owns the HTTP client; the decode pool is ours. Closed first: a page's
        # task still running (a fetch abandoned by its caller) starts no pool again.
        self.closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

"""OneRoster offset/limit paging, as a state machine testable without HTTP.

The server may help in two ways and we use whichever it offers:

* ``X-Total-Count`` on the first page: every remaining offset is known, so those pages are
  fetched concurrently (at most ``max_concurrency`` in flight). If the last page comes back
  full and the server gave no ``Link`` saying it was the last, one more page is asked for:
  some servers count wrongly, and an extra empty page is cheaper than a missed one.
* ``Link: <...>; rel="next"``: followed one page at a time. Only the ``offset`` is read from
  the link; the URL itself is always built from ``base_url`` and our own parameters, because
  some servers put another host (or plain http) in their links.
* Neither: keep going until a page comes back short or empty. A short first page ends the
  collection at once (no request for an empty page after it), unless its length is a multiple
  of :data:`LIKELY_CAP`: then it may be the server's own page limit rather than the end. A
  short page after the first is confirmed by one more request, a step further: a server may
  drop records from a page after applying the limit (ClassLink advises stopping on an empty
  page), and a full run would take every record after it for gone.

Quirks handled:

* A server that caps ``limit`` below what we asked (asked 5000, got 1000 of 50000): the first
  page's length becomes the step, or we would skip four records in five. The total, or a
  ``rel="next"`` link, says so; without either, only a round length (servers cap at 100, 500,
  1000, ...) is taken for a cap, at the cost of one request that may come back empty.
* A server that ignores ``offset`` and returns the same page forever: two neighbouring pages
  with the same first ``sourcedId`` and the same length stop the run with a clear
  :class:`~rostersync.errors.FatalSourceError` instead of looping.
"""

from __future__ import annotations

import asyncio
import bisect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from rostersync.errors import FatalSourceError

#: Without a total or a Link, a short first page whose length is a multiple of this may be a
#: server's silent page limit (the spec's default of 100 among them), so paging goes on.
LIKELY_CAP = 50

_LINK_PART = re.compile(r"<([^>]*)>\s*((?:;\s*[^;,]+)*)")
_REL = re.compile(r"""rel\s*=\s*"?([^";]+)"?""", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Page:
    """One answer: its records and what the headers said about the rest.

    ``records`` are the raw JSON objects, unless the page was decoded straight into staging
    rows (``decoded``); then ``count`` and ``first_id`` tell paging what it needs of them.
    """

    offset: int
    records: list[Any]
    total: int | None = None  # X-Total-Count
    has_link: bool = False  # a Link header was sent at all
    next_offset: int | None = None  # the offset its rel="next" link asks for, if any
    has_next: bool = False  # the Link header had rel="next"
    decoded: Any = None
    count: int | None = None
    first_id: str | None = None
    by_worker: bool = False  # a decode worker requested it (connectors.oneroster.direct)

    @property
    def size(self) -> int:
        """How many records the page held."""
        return len(self.records) if self.count is None else self.count

    @property
    def signature(self) -> tuple[str, int] | None:
        """(first sourcedId, length): equal on two different offsets means a repeated page."""
        if self.count is not None:
            return (self.first_id, self.count) if self.first_id else None
        if not self.records or not isinstance(self.records[0], dict):
            return None
        first = self.records[0].get("sourcedId")
        return (first, len(self.records)) if isinstance(first, str) and first else None


def answered(
    offset: int,
    total: str | None,
    link: str | None,
    decoded: Any = None,
    *,
    by_worker: bool = False,
) -> Page:
    """The page at ``offset`` as paging sees it: its ``X-Total-Count`` and ``Link`` headers, and
    its records when they came decoded into staging rows (a ``DecodedPage``)."""
    has_link, has_next, next_offset = parse_link(link)
    return Page(
        offset=offset,
        records=[],
        total=parse_total(total),
        has_link=has_link,
        has_next=has_next,
        next_offset=next_offset,
        decoded=decoded,
        count=None if decoded is None else decoded.length,
        first_id=None if decoded is None else decoded.first_id,
        by_worker=by_worker,
    )


def parse_total(value: str | None) -> int | None:
    """The ``X-Total-Count`` header as a count, or None when absent or unreadable."""
    if value is None:
        return None
    try:
        total = int(value.strip())
    except ValueError:
        return None
    return total if total >= 0 else None


def parse_link(value: str | None) -> tuple[bool, bool, int | None]:
    """(a Link header was sent, it has rel="next", the next link's ``offset`` parameter)."""
    if value is None or not value.strip():
        return False, False, None
    for match in _LINK_PART.finditer(value):
        url, params = match.group(1), match.group(2)
        rels = {r.lower() for m in _REL.finditer(params) for r in m.group(1).split()}
        if "next" not in rels:
            continue
        offsets = parse_qs(urlsplit(url).query).get("offset")
        try:
            return True, True, int(offsets[0]) if offsets else None
        except ValueError:
            return True, True, None
    return True, False, None


@dataclass
class OffsetPaginator:
    """Decides which offsets to fetch and spots a server that ignores ``offset``."""

    source: str
    path: str
    limit: int
    step: int = field(init=False)
    #: what the paging noticed for the run's report (a total the server did not serve)
    notes: list[str] = field(init=False, default_factory=list)
    _seen: list[tuple[int, tuple[str, int] | None]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.step = self.limit

    def start(self, first: Page) -> Sequence[int] | None:
        """After the first page: the remaining offsets when the total is known, else None.
        A range, not a list: a server may count 10**18 records (X-Total-Count) and serve a
        few hundred, and paging stops at its first empty page."""
        self.record(first)
        got = first.size
        if 0 < got < self.limit and (
            first.total > got
            if first.total is not None
            else first.has_next or got % LIKELY_CAP == 0
        ):
            # The server serves smaller pages than we asked for (or, without a total or a
            # link, may do so). Any other short first page is the whole collection.
            self.step = got
        if first.total is None:
            return None
        if got == 0:
            return []
        return range(self.step, first.total, self.step)

    def next_offset(self, page: Page) -> int | None:
        """Sequential paging: where the page after ``page`` starts, or None if it was the last."""
        got = page.size
        if got == 0:
            return None
        if page.has_link:
            if not page.has_next:
                return None
            if page.next_offset is not None and page.next_offset > page.offset:
                return page.next_offset
            return page.offset + got
        return page.offset + got if got >= self.step else None

    def past_short_page(self, page: Page) -> int | None:
        """Without a Link header, where to confirm that a short page past the first one
        ended the collection (the offset after its whole step), else None."""
        if page.has_link or page.offset == 0 or not 0 < page.size < self.step:
            return None
        return page.offset + self.step

    def after_counted(self, last: Page) -> int | None:
        """Past the counted pages: go on only if the last one was full and not known to be last."""
        if last.size < self.step or (last.has_link and not last.has_next):
            return None
        return last.offset + last.size

    def record(self, page: Page) -> None:
        """Remember the page; fail if it repeats the page at a neighbouring offset."""
        sig = page.signature
        keys = [offset for offset, _ in self._seen]
        at = bisect.bisect_left(keys, page.offset)
        if at < len(keys) and keys[at] == page.offset:
            return
        if sig is not None:
            for neighbour in (at - 1, at):
                if 0 <= neighbour < len(self._seen) and self._seen[neighbour][1] == sig:
                    other = self._seen[neighbour][0]
                    low, high = sorted((other, page.offset))
                    raise FatalSourceError(
                        self.source,
                        f"the server answered offset={low} and offset={high} of {self.path} "
                        f"with the same page (first sourcedId {sig[0]!r}, {sig[1]} records): "
                        "it ignores `offset`, so paging would never end",
                    )
        self._seen.insert(at, (page.offset, sig))


async def _concurrently(
    fetch: Callable[[int], Awaitable[Page]], offsets: Iterable[int], width: int
) -> AsyncIterator[Page]:
    """Fetch pages at most ``width`` at a time; yield each as it arrives (order not kept)."""
    todo = iter(offsets)
    running: set[asyncio.Task[Page]] = set()

    def launch() -> None:
        offset = next(todo, None)
        if offset is not None:
            running.add(asyncio.ensure_future(fetch(offset)))

    try:
        for _ in range(width):
            launch()
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: t.exception() is None):
                # Failures first, so an error is raised before any further page is yielded.
                running.discard(task)
                page = task.result()
                launch()
                yield page
    finally:
        for task in running:
            task.cancel()
        # Collect every outcome so no task is left pending or with an unread exception.
        await asyncio.gather(*running, return_exceptions=True)


async def paginate(
    fetch: Callable[[int], Awaitable[Page]],
    paginator: OffsetPaginator,
    max_concurrency: int,
) -> AsyncIterator[Page]:
    """Every page of one collection, fetched as :class:`OffsetPaginator` decides."""
    first = await fetch(0)
    remaining = paginator.start(first)
    yield first
    last = first
    if remaining is not None:
        # An empty counted page ends the collection: a server whose X-Total-Count is far
        # beyond what it serves would otherwise be asked for every page up to that count.
        empty_at: list[int] = []

        def counted() -> Iterable[int]:
            for offset in remaining:
                if empty_at and offset > empty_at[0]:
                    return
                yield offset

        async for page in _concurrently(fetch, counted(), max_concurrency):
            paginator.record(page)
            if page.size == 0 and (not empty_at or page.offset < empty_at[0]):
                empty_at[:] = [page.offset]
            if page.offset > last.offset:
                last = page
            yield page
        if empty_at:
            paginator.notes.append(
                f"{paginator.path}: the server counted {first.total} records "
                f"(X-Total-Count) but served none from offset {empty_at[0]}: paging stopped there"
            )
            return
        offset = paginator.after_counted(last)
        if offset is not None:
            # Checking past the total: a server that clamps an offset beyond the end to its last
            # page is telling us there is no more, not ignoring `offset`.
            page = await fetch(offset)
            if page.signature is not None and page.signature == last.signature:
                return
            paginator.record(page)
            yield page
            offset = paginator.next_offset(page)
    else:
        offset = paginator.next_offset(first)
    while offset is not None:
        page = await fetch(offset)
        paginator.record(page)
        yield page
        offset = paginator.next_offset(page)
        confirm = paginator.past_short_page(page) if offset is None else None
        if confirm is not None:
            # A page that came back short mid-collection may be one the server filtered
            # after applying the limit: the collection ends only where a page is empty.
            extra = await fetch(confirm)
            if extra.size == 0 or extra.signature == page.signature:
                return  # the end, or an offset past it clamped to the last page
            paginator.notes.append(
                f"{paginator.path}: the server served {page.size} records at "
                f"offset={page.offset} (pages of {paginator.step}) and more after them: "
                "paging went on to the first empty page"
            )
            paginator.record(extra)
            yield extra
            offset = paginator.next_offset(extra)


def delta_filter(since: datetime, overlap: timedelta) -> str:
    """The OneRoster filter for records changed after ``since - overlap`` (UTC, whole seconds)."""
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    # Dropping the fraction moves the bound earlier, never later: nothing is missed.
    start = (since - overlap).astimezone(UTC).replace(microsecond=0)
    return f"dateLastModified>'{start:%Y-%m-%dT%H:%M:%SZ}'"

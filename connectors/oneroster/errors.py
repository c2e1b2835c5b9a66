"""Sorting HTTP outcomes into the core's error tree.

* 429 and 5xx are :class:`~rostersync.errors.RetriableSourceError`; ``Retry-After`` (seconds or
  an HTTP date) rides on the error so the retry policy waits as long as the server asked.
* Timeouts and transport failures (refused or dropped connections) are retriable too.
* 401/403 are fatal with a hint about credentials; every other 4xx is fatal.
* A redirect (3xx) is fatal, naming where it points: it is never followed, since the request's
  credentials would go along to another address.
* A 200 whose JSON does not parse (a body cut short by a proxy or a server that gave up
  half-way) is retriable; an answer of the wrong shape is fatal.

Messages carry the source (through :class:`~rostersync.errors.SourceError`), the method, the
URL *path* and the page's offset (:func:`describe`) only: no host, no other query parameter, no
header, so no secret can leak into a log line. The retry policy adds how many tries were made
(``HTTP 503 Service Unavailable from GET /ims/oneroster/v1p1/enrollments at offset=52000
after 6 attempts``), and a page a decode worker asked for first says so and what the worker
got (:func:`asked_again`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from rostersync.errors import FatalSourceError, RetriableSourceError, SourceError

_REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests"}


def describe(request: httpx.Request) -> str:
    """``GET /ims/oneroster/v1p1/users at offset=2000``: what error messages name. Of the
    query, the offset alone: it tells which page without echoing the rest (a signature's
    ``oauth_*`` parameters, a filter)."""
    where = f"{request.method} {request.url.path}"
    offset = request.url.params.get("offset")
    return where if offset is None else f"{where} at offset={offset}"


@contextmanager
def asked_again(problem: str | None) -> Iterator[None]:
    """Around the sync process's request for a page a decode worker could not get (its
    ``DirectAnswer.problem``; None: no worker asked): the error it ends in says that the
    worker tried first, and what it got, so the message counts every request of the page."""
    try:
        yield
    except SourceError as exc:
        if problem is not None:
            exc.amend(f" (a decode worker had tried first: {problem})")
        raise


def undecodable(source: str, response: httpx.Response, problem: str) -> SourceError:
    """The error for an answer that did not decode (``problem``, a DecodeError's text)."""
    where = describe(response.request)
    if problem == "invalid JSON":
        # A proxy's or a maintenance page says what it is: "(a text/html answer)".
        kind = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        shown = f" (a {kind[:60]} answer)" if kind and "json" not in kind else ""
        return RetriableSourceError(source, f"invalid JSON{shown} from {where}")
    return FatalSourceError(source, f"unexpected answer from {where}: {problem}")


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def raise_for_status(source: str, response: httpx.Response, where: str | None = None) -> None:
    """Raise the right source error for a non-2xx answer; return quietly on success."""
    status = response.status_code
    if status < 300:
        return
    where = where or describe(response.request)
    reason = _REASONS.get(status, response.reason_phrase or "")
    what = f"HTTP {status} {reason}".rstrip()
    if status < 400:
        # Never followed: the auth would go along to wherever it points. Read as a page, its
        # body (empty, or a login form) failed as "invalid JSON" after every retry.
        raise FatalSourceError(
            source,
            f"{what} from {where}: the server redirects{redirect_target(response)}; "
            "redirects are not followed (the credentials would go along), so point the "
            "source's base_url (or token_url) at the address it names",
        )
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise RetriableSourceError(source, f"{what} from {where}", retry_after=retry_after)
    if status in (401, 403):
        raise FatalSourceError(
            source,
            f"{what} from {where}: the server refused our credentials or their permissions; "
            "check the source's auth settings",
        )
    raise FatalSourceError(source, f"{what} from {where}")


def redirect_target(response: httpx.Response) -> str:
    """`` to https://host/path`` from a redirect's ``Location`` (no query: it may hold a
    token), or "" when there is none."""
    location = response.headers.get("Location", "").strip()
    if not location:
        return ""
    try:
        target = response.request.url.join(location)
    except (httpx.InvalidURL, RuntimeError, ValueError):
        return ""
    return f" to {target.scheme}://{target.netloc.decode('ascii', 'replace')}{target.path}"


def token_for(token_path: str, request: httpx.Request) -> str:
    """``POST /oauth/token (the token for GET /ims/oneroster/v1p1/users at offset=0)``: a token
    request, named with the page it was made for."""
    return f"POST {token_path} (the token for {describe(request)})"


def failed_request(exc: httpx.TransportError, sent: httpx.Request) -> httpx.Request:
    """The request a transport error happened on: the one sent, or a request its auth flow
    made first (an OAuth2 token)."""
    try:
        return exc.request
    except RuntimeError:  # httpx raises it for an error without its request
        return sent


def transport_error(source: str, exc: httpx.TransportError, where: str) -> RetriableSourceError:
    """A retriable error for a timeout or a failed/dropped connection."""
    if isinstance(exc, httpx.TimeoutException):
        return RetriableSourceError(source, f"timed out ({type(exc).__name__}) on {where}")
    return RetriableSourceError(source, f"connection failed ({type(exc).__name__}) on {where}")

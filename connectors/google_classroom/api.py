"""Reading Classroom API responses: sorting failures, and following ``nextPageToken``.

Both are pure functions of a response, so they are unit-tested on hand-built responses.

Sorting (Google's errors are ``{"error": {"code", "message", "status"}}``):

* 429, or any status ``RESOURCE_EXHAUSTED`` -> :class:`RetriableSourceError` (honours
  ``Retry-After``); 5xx -> retriable too.
* 401 -> :class:`FatalSourceError` with what to check (the token was refused).
* 403 -> :class:`ForbiddenError`, 404 -> :class:`NotFoundError`: fatal for the course list,
  but the connector turns them into a rejection of one course when a roster is refused.
* any other 4xx -> fatal.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from rostersync.errors import FatalSourceError, RetriableSourceError

_MESSAGE_LIMIT = 200


class _RefusedRequest(FatalSourceError):
    def __init__(self, source: str, detail: str) -> None:
        super().__init__(source, f"{self.label} ({detail})")
        #: What was refused and Google's reason; safe to put in a rejection.
        self.detail = detail

    label = "refused"


class ForbiddenError(_RefusedRequest):
    """403 PERMISSION_DENIED on one request."""

    label = "forbidden"


class NotFoundError(_RefusedRequest):
    """404 NOT_FOUND: the course or user does not exist (any more)."""

    label = "not found"


def google_error(response: httpx.Response) -> tuple[str, str]:
    """``(status, message)`` from a Google error body; empty strings when it is not one."""
    try:
        body = json.loads(response.content or b"null")
    except (ValueError, RecursionError):  # see json_body
        return "", ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", ""
    status = error.get("status")
    message = error.get("message")
    return (
        status if isinstance(status, str) else "",
        message[:_MESSAGE_LIMIT] if isinstance(message, str) else "",
    )


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (the HTTP-date form is rare from Google and ignored)."""
    value = response.headers.get("Retry-After", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def raise_for_response(
    source: str, response: httpx.Response, path: str, *, auth_hint: str = ""
) -> None:
    """Raise the error a non-2xx Classroom response stands for; return on success."""
    code = response.status_code
    if 200 <= code < 300:
        return
    status, message = google_error(response)
    what = f"GET {path} -> {code}" + (f" {status}" if status else "")
    detail = f"{what}: {message}" if message else what
    if code == 429 or status == "RESOURCE_EXHAUSTED":
        raise RetriableSourceError(
            source, f"over quota ({detail})", retry_after=retry_after(response)
        )
    if code >= 500:
        raise RetriableSourceError(source, detail, retry_after=retry_after(response))
    if code == 401:
        raise FatalSourceError(source, f"the API refused the access token ({detail}). {auth_hint}")
    if code == 403:
        raise ForbiddenError(source, detail)
    if code == 404:
        raise NotFoundError(source, detail)
    raise FatalSourceError(source, detail)


def json_body(source: str, response: httpx.Response, path: str) -> dict[str, Any]:
    try:
        body = response.json()
    # ValueError: not JSON, not text, or an integer of more digits than Python converts;
    # RecursionError: arrays or objects nested deeper than the stdlib parser goes.
    except (ValueError, RecursionError):
        raise FatalSourceError(source, f"GET {path} did not return JSON") from None
    if not isinstance(body, dict):
        raise FatalSourceError(source, f"GET {path} returned {type(body).__name__}, not an object")
    return body


class PageTokens:
    """Follows ``nextPageToken`` and refuses a token it has already seen.

    A server that hands back an earlier token would otherwise keep a sync looping forever
    (and spending quota) while yielding the same records again.
    """

    def __init__(self, source: str, path: str) -> None:
        self._source = source
        self._path = path
        self._seen: set[str] = set()
        self.token: str | None = None
        self.pages = 0

    def advance(self, body: dict[str, Any]) -> bool:
        """Take the next token from a page; False when that page was the last."""
        self.pages += 1
        token = body.get("nextPageToken")
        if token is None or token == "":
            self.token = None
            return False
        if not isinstance(token, str):
            raise FatalSourceError(self._source, f"GET {self._path}: nextPageToken is not a string")
        if token in self._seen:
            raise FatalSourceError(
                self._source,
                f"GET {self._path}: page {self.pages} repeated an earlier nextPageToken; "
                "stopping rather than looping",
            )
        self._seen.add(token)
        self.token = token
        return True

"""Decoders with a bug, for the decode workers: a worker unpickles them by name, so they live
in a module of their own (importable there, no test's fixtures with them)."""

from __future__ import annotations

from typing import Any

from connectors.oneroster import decode, normalize
from connectors.oneroster.decode import DecodedPage
from connectors.oneroster.direct import DirectAnswer, DirectRequest
from rostersync.source.rows import KnownSpec

#: The record the bugs trip on: the first of the second page of users (tests' page_size 5).
TRIGGER = "u-005"


def _user_row_with_a_bug(raw: dict[str, Any]) -> Any:
    if raw.get("sourcedId") == TRIGGER:
        raise TypeError("a bug")
    return normalize.user_row(raw)


def raising_in_the_worker(collection: str, content: bytes, known: KnownSpec | None) -> DecodedPage:
    """Raises TypeError out of the worker itself for the page holding TRIGGER (as a decode
    function that let one escape would)."""
    if TRIGGER.encode() in content:
        raise TypeError("a bug")
    return decode.decode_known(collection, content, known)


def normalizer_bug_in_the_worker(
    collection: str, content: bytes, known: KnownSpec | None
) -> DecodedPage:
    """The worker's real decode_known, with the users' row builder raising TypeError on
    TRIGGER (patched in the worker: it runs in another process than the test)."""
    entity, kind, _ = normalize.ROW_BUILDERS["users"]
    normalize.ROW_BUILDERS["users"] = (entity, kind, _user_row_with_a_bug)
    return decode.decode_known(collection, content, known)


def fetch_with_a_bug(request: DirectRequest) -> DirectAnswer:
    """A worker's own request that raises instead of answering (fetch_page never should)."""
    raise KeyError("a bug")

"""One file row -> one :class:`RowInput`: cells parsed and checked on their own (no directory).

Checks that need the directory (roles, sites, groups exist and are visible; the user exists)
are in :mod:`rostersync.importer.plan`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from rostersync.emails import MAX_EMAIL, email_problem, normalize_email
from rostersync.importer.columns import ColumnMap
from rostersync.importer.reader import RawRow
from rostersync.importer.statuses import Status

MAX_NAME, MAX_ROLE, MAX_SITE = 256, 256, 50
DEFAULT_DISPLAY_NAME = "Console User"
#: An email cell too long to be an address is shown cut to this many characters (… included).
SHOWN_EMAIL = 60

_TRUE = {"true", "yes", "y", "1", "t"}
_FALSE = {"false", "no", "n", "0", "f", ""}


def split_list(cell: str, separators: str = ";") -> tuple[str, ...]:
    parts = re.split(f"[{re.escape(separators)}]", cell)
    out: list[str] = []
    for p in parts:
        p = p.strip()
        if p and p not in out:
            out.append(p)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class RowInput:
    """A parsed row. None means "column absent or cell blank": leave that part alone."""

    row: int
    email: str  # lower-cased, stripped
    display_name: str | None = None
    roles: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    send_verification: bool = False
    data_sync: bool = False
    overwrite: bool = False
    delegated: bool = False
    status: str | None = None  # "active" | "archived"
    source_usernames: tuple[tuple[str, str], ...] = ()
    # The first problem found decides the row's status.
    problem: tuple[Status, str] | None = None


def _flag(cells: ColumnMap, values: tuple[str, ...], name: str, header: str) -> bool:
    given = (cells.get(values, name) or "").strip()
    cell = given.lower()
    if cell in _TRUE:
        return True
    if cell in _FALSE:
        return False
    # The cell as the file has it (`Maybe`), not as it was compared.
    raise _Bad(f"{header} must be TRUE or FALSE, not {given!r}")


class _Bad(Exception):
    pass


def shown_email(email: str) -> str:
    """``email`` as a row's result shows it: whole unless longer than any address can be."""
    return email if len(email) <= MAX_EMAIL else email[: SHOWN_EMAIL - 1] + "…"


def parse_row(raw: RawRow, cells: ColumnMap, sources: Mapping[str, object]) -> RowInput:
    """Parse a row; ``sources`` are the configured source names (for Source Username(s))."""
    values = raw.values
    # A row the csv module refused still names its email, from its loosely split cells.
    email = normalize_email(cells.get(values or raw.loose, "email"))
    if raw.problem is not None:  # the file itself is broken on this row: nothing to trust
        return RowInput(raw.row, shown_email(email), problem=(Status.FAILED, raw.problem))
    problem = email_problem(email)
    if problem is not None:
        return RowInput(raw.row, shown_email(email), problem=(Status.INVALID_EMAIL, problem))
    try:
        return _parse(raw.row, email, values, cells, sources)
    except _Bad as exc:
        return RowInput(raw.row, email, problem=(Status.FAILED, str(exc)))


def _parse(
    row: int, email: str, values: tuple[str, ...], cells: ColumnMap, sources: Mapping[str, object]
) -> RowInput:
    name = (cells.get(values, "display_name") or "").strip()
    if not name:
        first = (cells.get(values, "first_name") or "").strip()
        last = (cells.get(values, "last_name") or "").strip()
        name = " ".join(p for p in (first, last) if p)
    if len(name) > MAX_NAME:
        raise _Bad(f"display name is longer than {MAX_NAME} characters")

    roles = split_list(cells.get(values, "roles") or "")
    for r in roles:
        if len(r) > MAX_ROLE:
            raise _Bad(f"role name {r[:40]!r}... is longer than {MAX_ROLE} characters")
    sites = split_list(cells.get(values, "sites") or "")
    for s in sites:
        if len(s) > MAX_SITE:
            raise _Bad(f"site name {s[:40]!r}... is longer than {MAX_SITE} characters")
    groups = split_list(cells.get(values, "groups") or "", ",;")
    if len(groups) == 1 and groups[0].casefold() == "none":
        groups = ()  # the template's way of saying "no groups" explicitly

    status_given = (cells.get(values, "status") or "").strip()
    status_cell = status_given.lower()
    if status_cell not in ("", "active", "archived"):
        # The cell as the file has it (`Deleted`), not as it was compared.
        raise _Bad(f"Current Status must be Active or Archived, not {status_given!r}")

    identities: list[tuple[str, str]] = []
    for item in split_list(cells.get(values, "source_usernames") or "", ",;"):
        source, sep, username = item.partition(":")
        source, username = source.strip(), username.strip()
        if not sep or not source or not username:
            raise _Bad(f"Source Username(s) item {item!r} is not source:username")
        if source not in sources:
            known = ", ".join(sorted(sources)) or "none"
            raise _Bad(f"Source Username(s): no source named {source!r} (configured: {known})")
        identities.append((source, username))

    return RowInput(
        row=row,
        email=email,
        display_name=name or None,
        roles=roles,
        sites=sites,
        groups=groups,
        send_verification=_flag(cells, values, "send_verification", "SendVerification"),
        data_sync=_flag(cells, values, "data_sync", "DataSync"),
        overwrite=_flag(cells, values, "overwrite", "Overwrite"),
        delegated=_flag(cells, values, "delegated", "Delegated"),
        status=status_cell or None,
        source_usernames=tuple(identities),
    )

"""Which column is which: headers matched case- and space-insensitively, with aliases."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rostersync.csvrecords import one_column_hint
from rostersync.importer.errors import ImportRefused

#: field -> accepted header spellings (compared after :func:`header_key`).
ALIASES: Mapping[str, tuple[str, ...]] = {
    "email": ("Email", "Primary Email"),
    "display_name": ("DisplayName", "Display Name", "Name"),
    "first_name": ("First Name",),
    "last_name": ("Last Name",),
    "roles": ("Role", "Roles"),
    "sites": ("Site", "Sites"),
    "groups": ("Groups", "Group(s)", "Group"),
    "send_verification": ("SendVerification",),
    "data_sync": ("DataSync",),
    "overwrite": ("Overwrite",),
    "delegated": ("Delegated",),
    "status": ("Current Status",),
    "source_usernames": ("Source Username(s)", "Source Usernames", "Source Username"),
}
REQUIRED = ("email",)
#: Columns a report adds: re-importing a report must not warn about them.
REPORT_COLUMNS = ("Status", "Message")


def header_key(header: str) -> str:
    return re.sub(r"\s+", "", header).casefold()


_BY_KEY = {header_key(alias): field for field, names in ALIASES.items() for alias in names}
_IGNORED = {header_key(c) for c in REPORT_COLUMNS}


@dataclass(frozen=True, slots=True)
class ColumnMap:
    """field -> index of its column in each row; unknown headers for the warning."""

    index: Mapping[str, int]
    unknown: tuple[str, ...]

    def get(self, values: Sequence[str], field: str) -> str | None:
        """The cell of ``field`` in a row; None when the file has no such column."""
        i = self.index.get(field)
        if i is None:
            return None
        return values[i] if i < len(values) else ""


def match_columns(headers: Sequence[str], name: str) -> ColumnMap:
    index: dict[str, int] = {}
    unknown: list[str] = []
    for i, header in enumerate(headers):
        if not header:
            continue
        key = header_key(header)
        field = _BY_KEY.get(key)
        if field is None:
            if key not in _IGNORED:
                unknown.append(header)
            continue
        if field in index:
            first = headers[index[field]]
            raise ImportRefused(
                f"{name}: columns {first!r} and {header!r} both give the {field.replace('_', ' ')};"
                " keep one"
            )
        index[field] = i
    for field in REQUIRED:
        if field not in index:
            spellings = " or ".join(repr(a) for a in ALIASES[field])
            hint = one_column_hint(headers, ",;\t")
            raise ImportRefused(f"{name}: required column {spellings} is missing{hint}")
    return ColumnMap(index, tuple(unknown))

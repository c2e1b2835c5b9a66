"""Records a run receives more than once under one sourcedId.

The last version sent wins, as staging keeps it. Two things follow for the run's report and
its safety:

* versions that **differ** are worth a warning: a second person sent under a colleague's id
  would otherwise take her account without a word;
* a source whose collections are read page by page at offsets (a OneRoster server) that sends
  any id twice moved its records while the run read them, so it may have skipped as many:
  a full run of such a source that would remove records of that kind (what it did not see)
  is held, as the safety limits hold a run, rather than take those records for gone.

Repeats are found where they are settled anyway, so a run without any pays nothing:
PostgreSQL's staging write (within a batch; the upsert of a batch that repeats an earlier
one), SQLite's apply (its index build fails on the repeat), and, for records a full run left
out of staging as the mirror holds them (rostersync.sync.known), the view of the mirror that
left them out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rostersync.source.rows import COLUMNS, Row

#: Where each kind's row tuple carries its hash.
HASH_AT = {kind: cols.index("row_hash") for kind, cols in COLUMNS.items()}

#: How the report names each kind (its ``fetched`` counts too).
NAMES = {"org": "orgs", "person": "persons", "class": "classes", "enrollment": "enrollments"}

#: Ids named in a warning or a hold reason, at most.
SHOWN = 5


@dataclass
class Repeats:
    """The sourcedIds a run received more than once, by kind; among them those whose versions
    differ; and how many records of each kind were copies (each id's sendings after its
    first), which the run's record counts take off (:meth:`counts`)."""

    ids: dict[str, set[str]] = field(default_factory=dict)
    differing: dict[str, set[str]] = field(default_factory=dict)
    copies: dict[str, int] = field(default_factory=dict)

    def add(
        self, kind: str, ids: Iterable[str], differing: Iterable[str] = (), copies: int = 0
    ) -> None:
        """These ids came more than once; ``copies`` records beyond each one's first (at
        least one per id)."""
        other = set(differing)
        every = set(ids) | other
        if every:
            self.ids.setdefault(kind, set()).update(every)
            self.copies[kind] = self.copies.get(kind, 0) + max(copies, len(every))
        if other:
            self.differing.setdefault(kind, set()).update(other)

    def update(self, other: Repeats) -> None:
        for kind, ids in other.ids.items():
            self.add(kind, ids, other.differing.get(kind, ()), other.copies.get(kind, 0))

    def counts(self) -> dict[str, int]:
        """The copies by kind, as the run's fetched counts name them (``persons_repeated``):
        the safety check on a shrunken source compares records, not sendings
        (rostersync.sync.scope, ``ratio_counts``)."""
        return {f"{NAMES[kind]}_repeated": n for kind, n in sorted(self.copies.items()) if n}

    def __bool__(self) -> bool:
        return bool(self.ids)


def in_rows(kind: str, rows: Iterable[Row]) -> Repeats:
    """The ids that come more than once among ``rows``."""
    at = HASH_AT[kind]
    first: dict[str, Any] = {}
    out = Repeats()
    for row in rows:
        sid, row_hash = row[0], row[at]
        if sid in first:
            out.add(kind, [sid], [sid] if first[sid] != row_hash else [])
        else:
            first[sid] = row_hash
    return out


def shown(ids: Iterable[str], most: int = SHOWN) -> str:
    """Ids for a message: the first ``most`` in order (each cut to 100 characters), and how
    many more."""
    ordered = sorted(str(i)[:100] for i in ids)
    more = f" and {len(ordered) - most} more" if len(ordered) > most else ""
    return ", ".join(ordered[:most]) + more


def _many(n: int) -> str:
    return f"{n} sourcedIds" if n > 1 else "1 sourcedId"


def warnings(repeats: Repeats) -> list[str]:
    """One warning per kind of record the source sent twice with different content."""
    return [
        f"{name}: the source sent {_many(len(ids))} more than once with different content "
        f"({shown(ids)}); the last version sent of each was kept"
        for kind, name in NAMES.items()
        if (ids := repeats.differing.get(kind))
    ]


def hold_reasons(repeats: Repeats, missing: Mapping[str, set[str]]) -> list[str]:
    """Why a full run of a source that pages by offset is held: for each kind it received
    some id of more than once and would remove records of that it did not see."""
    return [
        f"{name}: the source sent {_many(len(ids))} more than once ({shown(ids)}): its "
        f"records moved while the run paged through them, so the {len(gone)} "
        f"{name if len(gone) > 1 else kind} it did not see may only have been skipped; run "
        "it again, or approve the run to remove them"
        for kind, name in NAMES.items()
        if (ids := repeats.ids.get(kind)) and (gone := missing.get(kind))
    ]

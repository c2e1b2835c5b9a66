"""The group rules of a resync batch, as pure functions over plain values.

:mod:`rostersync.resync.groups` reads the mirror and the directory, asks these functions what each
group must have, and writes their answers: no I/O here, so every decision is tested without
a database. The decisions, in the order a batch takes them:

1. :func:`wanted_groups`: which groups the batch's users want (the populated classes they
   teach) and under which title;
2. :func:`groups_to_create`, then :func:`groups_to_rename` once the new groups have ids;
3. :func:`groups_to_refresh`: whose members are re-read in full (the rest only where a sync
   marked a member);
4. :func:`owner_changes` and :func:`member_changes`: owners and members made exact;
5. :func:`owners_released`: the batch's users let go of the groups they no longer want (a
   group left without any owner is then removed);
6. :func:`credit_changes`: each created, updated or removed group counted for one user.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field

GroupKey = tuple[str, str]  # (source, class sourced_id)
#: (group id, user id): one owner of one group
OwnerPair = tuple[int, int]
#: (group id, person sourced_id): one member of one group
MemberKey = tuple[int, str]
#: a member's stored (email, name)
MemberValues = tuple[str | None, str]


@dataclass(frozen=True)
class Wanted:
    """The groups a batch's users want: each populated class one of them teaches."""

    #: the title each wanted group must have (its class's)
    titles: dict[GroupKey, str] = field(default_factory=dict)
    #: the batch's users who want each group (teach its class)
    wanted_by: dict[GroupKey, frozenset[int]] = field(default_factory=dict)

    def classes_by_source(self) -> dict[str, list[str]]:
        """The wanted classes of each source, sorted (the SQL reads them source by source)."""
        out: dict[str, list[str]] = {}
        for src, cls in sorted(self.titles):
            out.setdefault(src, []).append(cls)
        return out


def wanted_groups(rows: Iterable[tuple[int, str, str, str]]) -> Wanted:
    """The groups wanted, from (user id, source, class, title) rows: one per class a batch
    user teaches. A class read twice keeps its last title."""
    titles: dict[GroupKey, str] = {}
    wanted_by: dict[GroupKey, set[int]] = {}
    for uid, src, cls, title in rows:
        titles[(src, cls)] = title
        wanted_by.setdefault((src, cls), set()).add(uid)
    return Wanted(titles, {key: frozenset(users) for key, users in wanted_by.items()})


def groups_to_create(wanted: Wanted, existing: Set[GroupKey]) -> list[GroupKey]:
    """The wanted groups that do not exist yet, in key order (the order they are inserted)."""
    return sorted(key for key in wanted.titles if key not in existing)


def groups_to_rename(wanted: Wanted, names: Mapping[GroupKey, str]) -> list[GroupKey]:
    """The wanted groups whose name (``names``: every wanted group's current one) is not
    their class's title any more, in key order."""
    return sorted(key for key, title in wanted.titles.items() if names[key] != title)


def groups_to_refresh(
    wanted: Wanted,
    *,
    dirty: Set[GroupKey],
    created: Set[GroupKey],
    refresh_all: Set[int],
) -> set[GroupKey]:
    """The wanted groups whose members are compared in full: those of a class a sync marked
    changed (``dirty``), those just created, and every group of a user in ``refresh_all``
    (manual and live resyncs). The others only re-read the members a sync marked."""
    return {
        key
        for key in wanted.titles
        if key in dirty or key in created or wanted.wanted_by[key] & refresh_all
    }


def owner_changes(
    want: Set[OwnerPair], have: Set[OwnerPair]
) -> tuple[list[OwnerPair], list[OwnerPair]]:
    """The roster owners to add and to drop (each sorted) so that the groups' roster owners
    are exactly ``want``. ``have`` holds the current roster owners of the same groups."""
    return sorted(want - have), sorted(have - want)


@dataclass(frozen=True)
class MemberChanges:
    """The member rows to insert, delete and update to turn what is held into what is wanted."""

    added: list[MemberKey]
    gone: list[MemberKey]
    updated: list[MemberKey]

    @property
    def groups(self) -> set[int]:
        """The groups whose members change."""
        return {gid for gid, _ in (*self.added, *self.gone, *self.updated)}


def member_changes(
    want: Mapping[MemberKey, MemberValues], have: Mapping[MemberKey, MemberValues]
) -> MemberChanges:
    """Compare the members wanted with those held, each with its stored email and name."""
    return MemberChanges(
        added=[key for key in want if key not in have],
        gone=[key for key in have if key not in want],
        updated=[key for key, values in want.items() if key in have and have[key] != values],
    )


def owners_released(
    wanted: Wanted,
    groups: Mapping[GroupKey, int],
    owned_by_batch: Mapping[int, Set[int]],
) -> list[OwnerPair]:
    """The (group, user) roster ownerships the batch's users give up, sorted: every group a
    batch user owns (``owned_by_batch``: group id to those users; ``groups``: id by key) but
    no longer wants. Users outside the batch keep theirs."""
    released: list[OwnerPair] = []
    for key, gid in groups.items():
        wanting = wanted.wanted_by.get(key, frozenset())
        released += [(gid, uid) for uid in owned_by_batch.get(gid, ()) if uid not in wanting]
    return sorted(released)


def credit_changes(
    users: Iterable[int],
    wanted: Wanted,
    owned_by_batch: Mapping[int, Set[int]],
    key_of: Mapping[int, GroupKey],
    *,
    created: Iterable[GroupKey],
    updated: Iterable[int],
    removed: Iterable[int],
) -> dict[int, Counter[str]]:
    """Per-user counts of groups_created, groups_updated and groups_removed: each change is
    credited to exactly one user of the batch, so that the jobs' counts add up to the
    batch's. The lowest user id that wants the group, else the lowest that owned it, else
    the batch's lowest. ``created`` are keys; ``updated`` and ``removed`` group ids
    (``key_of`` gives their keys)."""
    uids = sorted(set(users))
    result: dict[int, Counter[str]] = {u: Counter() for u in uids}
    if not uids:
        return result
    batch = set(uids)

    def credit(key: GroupKey, what: str, fallback: Iterable[int] = ()) -> None:
        who = wanted.wanted_by.get(key) or set(fallback) & batch or {uids[0]}
        result[min(who)][what] += 1

    for key in created:
        credit(key, "groups_created")
    for gid in sorted(removed):
        credit(key_of[gid], "groups_removed", owned_by_batch.get(gid, ()))
    for gid in sorted(updated):
        credit(key_of[gid], "groups_updated", owned_by_batch.get(gid, ()))
    return result

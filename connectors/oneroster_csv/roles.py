"""OneRoster 1.2 people: ``users.csv`` rows with their roles from ``roles.csv``.

``roles.csv`` (``userSourcedId``, ``roleType`` primary/secondary, ``role``, ``orgSourcedId``,
...) is read first, into memory: one entry per user, and users with the same roles at the same
org share one value, so a district of 200,000 users costs a few tens of MB while the drop is
read. Then each ``users.csv`` row becomes a person:

* its roles are the user's ``active`` rows of ``roles.csv`` (a ``tobedeleted`` role has
  ended). The person's ``role`` is the primary role at ``primaryOrgSourcedId``, else the first
  primary role, else the first role listed; every other role is in ``other_roles`` (any may
  make a teacher). A 1.2 ``users.csv`` that still has 1.1's ``role`` column falls back to it
  for a user without rows in ``roles.csv``;
* its orgs are ``primaryOrgSourcedId``, then ``orgSourcedIds`` if the file has that 1.1
  column, then each role's org;
* an active user without any role is rejected; so is a user one of whose role rows is unusable
  (no role, an unknown status, malformed CSV, the wrong number of fields): with a role missing
  they might stop counting as a teacher, and a rejected person keeps what the last run stored.
  A row so broken that it names no user is rejected alone;
* a ``roleType`` other than primary/secondary is read as secondary, with a warning.

In a **delta drop** whose ``roles.csv`` is not bulk, the drop gives only the roles that
changed, and rostersync keeps no copy of earlier drops to fill in the rest. So a changed user
must come with all their roles: an active user without an active primary role in the drop is
rejected ("a changed user needs all their roles in the same drop") rather than stored with
the wrong roles, and roles of a user whose ``users.csv`` row is not in the drop are rejected as
not applied. In a bulk drop, roles of a user missing from ``users.csv`` are a warning.
"""

from __future__ import annotations

from collections.abc import Iterator

from connectors.oneroster_csv.entities import (
    ROLES,
    V12,
    Parser,
    RowError,
    boolean,
    date,
    id_list,
    rows,
    status,
)
from connectors.oneroster_csv.files import Bundle, Row, best_effort_values
from connectors.oneroster_csv.notes import Notes, quote
from rostersync.source.records import Rejected, RosterPerson

#: One role of a user: (role, lower-cased; is it a primary role; its org's sourcedId or "").
RoleEntry = tuple[str, bool, str]


class RolesIndex:
    """Every user's active roles from ``roles.csv``, and the users whose rows were unusable.

    ``complete`` says ``roles.csv`` lists every role of every user (a bulk file), not only the
    roles that changed (a delta file, or none at all)."""

    def __init__(self, *, complete: bool, from_file: bool = True) -> None:
        self.complete = complete
        self.from_file = from_file  # False: the drop has no roles.csv
        self._roles: dict[str, tuple[RoleEntry, ...]] = {}
        self._taken: dict[str, tuple[RoleEntry, ...]] = {}
        self._problems: dict[str, str] = {}
        # Many users have the same roles (every student of a school): one tuple for them all.
        self._shared: dict[tuple[RoleEntry, ...], tuple[RoleEntry, ...]] = {}

    def mention(self, user: str) -> None:
        """The drop says something of this user's roles (if only that one has ended)."""
        self._roles.setdefault(user, ())

    def add(self, user: str, role: str, primary: bool, org: str) -> None:
        entries = (*self._roles.get(user, ()), (role, primary, org))
        self._roles[user] = self._shared.setdefault(entries, entries)

    def problem(self, user: str, reason: str) -> None:
        self.mention(user)
        self._problems.setdefault(user, reason)

    def take(self, user: str) -> tuple[tuple[RoleEntry, ...], str | None]:
        """The user's roles and the first problem with them, once the users.csv row is read."""
        if user in self._roles:
            self._taken[user] = self._roles.pop(user)
        return self._taken.get(user, ()), self._problems.get(user)

    def untaken(self) -> set[str]:
        """Users with rows in roles.csv but none in users.csv."""
        return set(self._roles)


def read_roles(
    bundle: Bundle, encoding: str, notes: Notes, *, complete: bool
) -> tuple[RolesIndex, list[Rejected]]:
    """``roles.csv`` as an index, and the rows that name no user (rejected on their own)."""
    index = RolesIndex(complete=complete)
    rejected: list[Rejected] = []
    names: dict[str, str] = {}  # one string per role name and org, not one per row
    # An unreadable row is charged to its user where the user can be read from it: with a
    # role missing they might stop counting as a teacher, while a rejected person keeps what
    # the last run stored.
    broken: dict[int, Rejected] = {}  # rows malformed as CSV: no fields to name a user
    for row in rows(bundle, ROLES, encoding, V12, key="userSourcedId"):
        if isinstance(row, Rejected):
            if row.sourced_id:
                index.problem(row.sourced_id, f"{row.location}: {row.reason}")
            else:
                broken[_line(row)] = row
            continue
        user = row.get("userSourcedId")
        if not user:
            sid = row.get("sourcedId") or None
            rejected.append(Rejected("role", sid, "missing userSourcedId", row.location))
            continue
        try:
            state = status(row)
        except RowError as exc:
            index.problem(user, f"{row.location}: {exc}")
            continue
        if state == "tobedeleted":
            index.mention(user)
            continue
        role = row.get("role").lower()
        if not role:
            index.problem(user, f"{row.location}: missing role")
            continue
        kind = row.get("roleType").lower()
        if kind not in ("primary", "secondary"):
            notes.add(
                f"{ROLES}: roleType neither primary nor secondary",
                f"{row.location}: roleType {quote(row.get('roleType'))} is neither primary nor "
                "secondary; read as secondary",
            )
        org = row.get("orgSourcedId")
        index.add(user, names.setdefault(role, role), kind == "primary", names.setdefault(org, org))
    users = best_effort_values(bundle, ROLES, encoding, set(broken), "userSourcedId")
    for line, row in broken.items():
        if line in users:
            index.problem(users[line], f"{row.location}: {row.reason}")
        else:
            rejected.append(row)
    return index, rejected


def _line(row: Rejected) -> int:
    """The line of a row the reader rejected (its location is ``"roles.csv line N"``)."""
    return int((row.location or "0").rsplit(" ", 1)[-1])


def _choose(entries: tuple[RoleEntry, ...], home: str) -> RoleEntry | None:
    primary = [e for e in entries if e[1]]
    return (
        next((e for e in primary if home and e[2] == home), None)
        or (primary[0] if primary else None)
        or (entries[0] if entries else None)
    )


def person_parser(index: RolesIndex) -> Parser:
    """The parser of a 1.2 ``users.csv`` row, taking the user's roles from ``index``."""

    def parse(row: Row, notes: Notes) -> RosterPerson:
        sourced_id = row.get("sourcedId")
        state = status(row)
        entries, problem = index.take(sourced_id)
        if problem is not None:
            raise RowError(problem)
        home = row.get("primaryOrgSourcedId")
        chosen = _choose(entries, home)
        if state == "active":
            if chosen is None and not row.get("role"):
                if not index.from_file:
                    raise RowError(f"no role: the role column is blank and the drop has no {ROLES}")
                if index.complete:
                    raise RowError(f"no role: {ROLES} has no row for this user")
                raise RowError(
                    f"no role in this delta drop: {ROLES} carries none of this user's roles, "
                    "and a changed user needs all their roles in the same drop"
                )
            if chosen is not None and not index.complete and not chosen[1]:
                raise RowError(
                    f"no primary role in this delta drop: {ROLES} carries only some of this "
                    "user's roles, and a changed user needs all their roles in the same drop"
                )
        role = chosen[0] if chosen is not None else row.get("role").lower()
        others: list[str] = []
        for name, _, _ in entries:
            if name != role and name not in others:
                others.append(name)
        orgs = dict.fromkeys(
            o for o in (home, *id_list(row, "orgSourcedIds"), *(e[2] for e in entries)) if o
        )
        return RosterPerson(
            sourced_id,
            role,
            row.get("givenName"),
            row.get("familyName"),
            row.get("email") or None,
            row.get("username") or None,
            enabled=boolean(row, "enabledUser", True),
            org_ids=tuple(orgs),
            status=state,
            date_last_modified=date(row, notes),
            other_roles=tuple(others),
        )

    return parse


def untaken_roles(
    bundle: Bundle, encoding: str, index: RolesIndex, notes: Notes, *, applied: bool
) -> Iterator[Rejected]:
    """Users with roles but no ``users.csv`` row, at the first line of their roles. When the
    roles are ``applied`` as changes (a delta drop) the change is lost: rejected, so the run's
    report says so. Otherwise (a bulk ``users.csv``) they name nobody: a warning."""
    left = index.untaken()
    if not left:
        return
    for row in rows(bundle, ROLES, encoding, V12, key="userSourcedId"):
        user = row.sourced_id if isinstance(row, Rejected) else row.get("userSourcedId")
        if user is None or user not in left:
            continue
        left.discard(user)
        if applied:
            yield Rejected(
                "user",
                user,
                f"{ROLES} changes this user's roles, but users.csv of this delta drop has no "
                "row for them: not applied (a drop with their users.csv row applies it)",
                row.location,
            )
        else:
            notes.add(
                f"{ROLES}: roles of users not in users.csv",
                f"{row.location}: user {quote(user)} has roles but no row in users.csv",
            )

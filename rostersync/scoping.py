"""The scope rules on plain values: which academic sessions run, which orgs a source's
``schools`` settings select, and whether a person is of a school in scope.

No database here (``config check`` and the connectors use these too); the engine's step that
applies them to a run's staged rows is :mod:`rostersync.sync.scope`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta

from rostersync.source.records import AcademicSession

__all__ = [
    "OrgInfo",
    "Schools",
    "classes_out_of_term",
    "person_in_scope",
    "resolve_schools",
    "term_runs",
]


# -- terms ----------------------------------------------------------------------------------


def term_runs(session: AcademicSession, today: date, grace_days: int) -> bool:
    """Whether ``today`` falls within the session, widened by ``grace_days`` each side."""
    grace = timedelta(days=grace_days)
    return session.start_date - grace <= today <= session.end_date + grace


def classes_out_of_term(
    class_terms: Mapping[str, tuple[str, ...]],
    sessions: Mapping[str, AcademicSession],
    today: date,
    grace_days: int,
) -> tuple[set[str], dict[str, set[str]]]:
    """The classes none of whose terms runs today, and the unknown term ids by class.

    A class with a term the source did not send counts: that term may well be running."""
    out: set[str] = set()
    unknown: dict[str, set[str]] = {}
    for class_id, term_ids in class_terms.items():
        missing = {t for t in term_ids if t not in sessions}
        if missing:
            unknown[class_id] = missing
            continue
        if term_ids and not any(term_runs(sessions[t], today, grace_days) for t in term_ids):
            out.add(class_id)
    return out, unknown


# -- schools --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrgInfo:
    name: str
    type: str
    parent_id: str | None


@dataclass
class Schools:
    """The orgs a source's ``schools`` settings select (see :func:`resolve_schools`)."""

    included: set[str] | None  # None: no include list, every org not excluded
    excluded: set[str]
    unknown: list[str] = field(default_factory=list)  # entries matching no org

    def in_scope(self, org_id: str) -> bool:
        if org_id in self.excluded:
            return False
        return self.included is None or org_id in self.included


def _below(roots: set[str], orgs: Mapping[str, OrgInfo]) -> set[str]:
    """``roots`` and every org under them (by ``parent_id``)."""
    children: dict[str, list[str]] = {}
    for oid, org in orgs.items():
        if org.parent_id:
            children.setdefault(org.parent_id, []).append(oid)
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def resolve_schools(
    orgs: Mapping[str, OrgInfo], include: Iterable[str], exclude: Iterable[str]
) -> Schools:
    """Match each entry to orgs by sourcedId, else by exact name; an entry that matches
    neither is reported in ``unknown`` (as ``include 'X'``)."""
    by_name: dict[str, set[str]] = {}
    for oid, org in orgs.items():
        by_name.setdefault(org.name, set()).add(oid)
    unknown: list[str] = []

    def matched(key: str, entries: Iterable[str]) -> set[str]:
        ids: set[str] = set()
        for entry in entries:
            hit = {entry} if entry in orgs else by_name.get(entry, set())
            if not hit:
                unknown.append(f"{key} {entry!r}")
            ids |= hit
        return ids

    include = list(include)
    included = _below(matched("include", include), orgs) if include else None
    excluded = _below(matched("exclude", exclude), orgs)
    return Schools(included, excluded, unknown)


def person_in_scope(org_ids: Iterable[str], orgs: Mapping[str, OrgInfo], schools: Schools) -> bool:
    """A person with a school in scope, or with no school among their orgs (an org the
    source did not send counts as a school)."""
    their_schools = [o for o in org_ids if o and (o not in orgs or orgs[o].type == "school")]
    return not their_schools or any(schools.in_scope(o) for o in their_schools)

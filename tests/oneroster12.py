"""OneRoster 1.2 CSV drops written by the tests, following the 1.2 CSV binding's files.

1.2 moved a person's roles out of ``users.csv`` into ``roles.csv`` (one row per role and org,
``roleType`` primary or secondary) and gave ``users.csv`` a ``primaryOrgSourcedId``. Written
from a :class:`~rostersync.source.records.MemoryRoster`: each person gets a primary role row for each
of their orgs (``role``) and a secondary row for each of ``other_roles`` at their first org.

A **bulk** drop leaves ``status`` and ``dateLastModified`` blank except on ``tobedeleted``
rows; a **delta** drop holds the records given (the changes) with both filled in.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from rostersync.source.records import MemoryRoster, RosterPerson

ORGS = ("sourcedId", "status", "dateLastModified", "name", "type", "identifier", "parentSourcedId")
USERS = (
    "sourcedId", "status", "dateLastModified", "enabledUser", "username", "userIds",
    "givenName", "familyName", "middleName", "identifier", "email", "sms", "phone",
    "agentSourcedIds", "grades", "password", "userMasterIdentifier", "resourceSourcedIds",
    "preferredGivenName", "preferredMiddleName", "preferredFamilyName", "primaryOrgSourcedId",
    "pronouns",
)  # fmt: skip
ROLES = (
    "sourcedId", "status", "dateLastModified", "userSourcedId", "roleType", "role",
    "beginDate", "endDate", "orgSourcedId", "userProfileSourcedId",
)  # fmt: skip
CLASSES = (
    "sourcedId", "status", "dateLastModified", "title", "grades", "courseSourcedId",
    "classCode", "classType", "location", "schoolSourcedId", "termSourcedIds", "subjects",
    "subjectCodes", "periods",
)  # fmt: skip
ENROLLMENTS = (
    "sourcedId", "status", "dateLastModified", "classSourcedId", "schoolSourcedId",
    "userSourcedId", "role", "primary", "beginDate", "endDate",
)  # fmt: skip
#: Every file.* property of the 1.2 binding, and the name of each file this module writes.
MANIFEST_FILES = (
    "academicSessions", "categories", "classes", "classResources", "courses",
    "courseResources", "demographics", "enrollments", "lineItemLearningObjectiveIds",
    "lineItems", "lineItemScoreScales", "orgs", "resources", "resultLearningObjectiveIds",
    "results", "resultScoreScales", "roles", "scoreScales", "userProfiles", "userResources",
    "users",
)  # fmt: skip
WRITTEN = ("orgs", "users", "roles", "classes", "enrollments")

DELTA_STAMP = datetime(2026, 10, 1, 8, 30, tzinfo=UTC)


def _stamp(status: str, modified: datetime | None, delta: bool) -> tuple[str, str]:
    if not delta and status != "tobedeleted":
        return "", ""
    when = (modified or DELTA_STAMP).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return status, when


def role_rows(p: RosterPerson, delta: bool) -> list[tuple[str, ...]]:
    """The person's rows of roles.csv (status follows the person's)."""
    stamp = _stamp(p.status, p.date_last_modified, delta)
    orgs = p.org_ids or ("",)
    rows: list[tuple[str, ...]] = [
        (f"r-{p.sourced_id}-{n}", *stamp, p.sourced_id, "primary", p.role, "", "", org, "")
        for n, org in enumerate(orgs)
    ]
    rows += [
        (f"r-{p.sourced_id}-x{n}", *stamp, p.sourced_id, "secondary", role, "", "", orgs[0], "")
        for n, role in enumerate(p.other_roles)
    ]
    return rows


def tables(roster: MemoryRoster, *, delta: bool = False) -> dict[str, list[Sequence[str]]]:
    """Each data file's rows, header first."""
    school_of = {c.sourced_id: c.school_id or "" for c in roster.classes}
    out: dict[str, list[Sequence[str]]] = {
        "orgs": [ORGS],
        "users": [USERS],
        "roles": [ROLES],
        "classes": [CLASSES],
        "enrollments": [ENROLLMENTS],
    }
    for o in roster.orgs:
        out["orgs"].append(
            (o.sourced_id, *_stamp(o.status, o.date_last_modified, delta), o.name, o.type,
             o.identifier or "", o.parent_id or "")
        )  # fmt: skip
    for p in roster.persons:
        out["users"].append(
            (
                p.sourced_id, *_stamp(p.status, p.date_last_modified, delta),
                "true" if p.enabled else "false", p.username or "", "", p.given_name,
                p.family_name, "", "", p.email or "", "", "", "", "", "", "", "", "", "", "",
                p.org_ids[0] if p.org_ids else "", "",
            )
        )  # fmt: skip
        out["roles"].extend(role_rows(p, delta))
    for c in roster.classes:
        out["classes"].append(
            (
                c.sourced_id, *_stamp(c.status, c.date_last_modified, delta), c.title, "", "",
                c.class_code or "", "scheduled", "", c.school_id or "", ",".join(c.term_ids),
                "", "", "",
            )
        )  # fmt: skip
    for e in roster.enrollments:
        out["enrollments"].append(
            (
                e.sourced_id, *_stamp(e.status, e.date_last_modified, delta), e.class_id,
                school_of.get(e.class_id, ""), e.user_id, e.role,
                "true" if e.primary else "false", "", "",
            )
        )  # fmt: skip
    return out


def write_drop(
    roster: MemoryRoster,
    folder: Path,
    *,
    delta: bool = False,
    modes: Mapping[str, str] | None = None,
    extra: Mapping[str, Iterable[Sequence[str]]] | None = None,
    zip_path: Path | None = None,
) -> Path:
    """Write `roster` as a 1.2 drop (every file bulk, or with ``delta`` every file delta);
    ``modes`` overrides a file's manifest entry, ``extra`` adds files (name -> rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    mode = "delta" if delta else "bulk"
    files: dict[str, list[Sequence[str]]] = {**tables(roster, delta=delta)}
    for name, rows in (extra or {}).items():
        files[name] = list(rows)
    manifest: list[Sequence[str]] = [
        ("propertyName", "value"),
        ("manifest.version", "1.0"),
        ("oneroster.version", "1.2"),
    ]
    for name in MANIFEST_FILES:
        default = mode if name in files else "absent"
        manifest.append((f"file.{name}", (modes or {}).get(name, default)))
    manifest += [("source.systemName", "rostersync tests"), ("source.systemCode", "1.2")]
    files["manifest"] = manifest
    for name, rows in files.items():
        with open(folder / f"{name}.csv", "w", encoding="utf-8", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows(rows)
    if zip_path is not None:
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in files:
                zf.write(folder / f"{name}.csv", f"{name}.csv")
    return folder

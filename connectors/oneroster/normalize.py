"""OneRoster 1.1/1.2 JSON objects to :mod:`rostersync.source.records` values.

Shapes are told apart by what a record carries, not by the configured version, because
servers mix them (1.1 servers adding ``roles``, 1.2 servers keeping ``role``):

* 1.1 ``role`` vs 1.2 ``roles[]``: the primary role wins (the one for ``primaryOrg`` if several
  orgs each have one), else the first listed; well-known roles are lower-cased (``Teacher``).
* Booleans (``enabledUser``, enrollment ``primary``) are the strings ``"true"``/``"false"`` in
  the spec; real booleans are accepted too.
* ``status`` ``tobedeleted``, and 1.0's ``inactive``, both become ``tobedeleted``; a missing
  status means active. A ``tobedeleted`` record may carry little more than its ``sourcedId``
  (delta feeds often send just that), so its other required fields are not enforced.
* Optional fields may be absent or null; references are ``{"sourcedId": ...}`` objects whose
  ``href`` is ignored (it may name another host).
* ``dateLastModified`` is kept as an aware datetime (UTC when the server omits the zone) so the
  engine can take the delta high-water mark from the data.

A record that breaks the schema (no ``sourcedId``, unknown status, no role, an enrollment
without its user or class, an unreadable date or boolean) becomes a
:class:`~rostersync.source.records.Rejected` with the reason; it never stops the run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime
from functools import lru_cache
from itertools import repeat
from typing import Any, TypeVar

import msgspec
import orjson

from rostersync.source.records import (
    AcademicSession,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    Status,
    digest,
    digest_text,
    person_digest,
    person_roles,
)
from rostersync.source.rows import COLUMNS, Row, StagedBatch, keep_fitting, rejected_id, utc_text

#: Roles from both versions, keyed by lower case: ``Teacher`` and ``teacher`` are one role.
_ROLES = {
    r.lower(): r
    for r in (
        *("administrator", "aide", "guardian", "parent", "proctor", "relative", "student"),
        *("teacher", "counselor", "principal", "siteAdministrator", "districtAdministrator"),
        "systemAdministrator",
    )
}
#: The spellings servers actually send, straight to the canonical name (the fast path).
_EXACT_ROLES = {**{r: r for r in _ROLES.values()}, **{r.capitalize(): r for r in _ROLES.values()}}
_STATUS: dict[str, Status] = {
    "active": "active",
    "tobedeleted": "tobedeleted",
    "inactive": "tobedeleted",  # OneRoster 1.0
}
_TRUE = {"true": True, "false": False, "1": True, "0": False}


_T = TypeVar("_T")


class _Bad(ValueError):
    """One record's schema violation; becomes a Rejected."""


# Each helper tries the shape a conforming server sends first (a plain, clean string) and only
# then the lenient fallbacks: a district is millions of records, so the common path must be short.


def _sourced_id(raw: dict[str, Any]) -> str:
    return _sourced_id_of(raw.get("sourcedId"))


def _sourced_id_of(value: Any) -> str:
    if value.__class__ is str and value and not value[0].isspace() and not value[-1].isspace():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise _Bad("no sourcedId")
    return value.strip()


def _status(raw: dict[str, Any]) -> Status:
    return _status_of(raw.get("status"))


def _status_of(value: Any) -> Status:
    if value == "active":
        return "active"
    if value is None or value == "":
        return "active"
    status = _STATUS.get(str(value).strip().lower())
    if status is None:
        raise _Bad(f"unknown status {value!r}")
    return status


@lru_cache(maxsize=4096)
def _parse_date(text: str) -> datetime:
    # Bulk loads stamp thousands of records with one time, so the cache saves most parses.
    value = datetime.fromisoformat(text.strip())
    if value.tzinfo is not None:  # OverflowError: year 1 ahead of UTC, 9999 behind it
        value.astimezone(UTC)  # (no instant a staging row holds: rows.utc_text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _modified(raw: dict[str, Any]) -> datetime | None:
    return _modified_of(raw.get("dateLastModified"))


def _modified_of(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Bad(f"dateLastModified {value!r} is not a date-time")
    try:
        return _parse_date(value)
    except (ValueError, OverflowError):
        raise _Bad(f"dateLastModified {value!r} is not a date-time") from None


#: The form servers send (``2026-09-01T12:30:00.000Z``): its UTC text is a rearrangement. Not
#: hour 24, which some Pythons read as the next day's midnight (the full path then decides).
_CANONICAL_DATE = re.compile(r"\d{4}-\d\d-\d\dT(?!24)\d\d:\d\d:\d\d\.\d{3}Z", re.ASCII)


def _date_text(raw: dict[str, Any]) -> str | None:
    """``dateLastModified`` as a staging row holds it: ``rows.utc_text`` of :func:`_modified`."""
    return _date_text_of(raw.get("dateLastModified"))


def _date_text_of(value: Any) -> str | None:
    if value.__class__ is str and _CANONICAL_DATE.fullmatch(value):
        try:
            datetime.fromisoformat(value)  # the checks of the full path: no 31 September
        except ValueError:
            raise _Bad(f"dateLastModified {value!r} is not a date-time") from None
        return f"{value[:10]} {value[11:23]}000"
    return utc_text(_modified_of(value))


def _bool(raw: dict[str, Any], key: str, default: bool) -> bool:
    return _bool_of(raw.get(key), key, default)


def _bool_of(value: Any, key: str, default: bool) -> bool:
    if value == "true" or value is True:
        return True
    if value == "false" or value is False:
        return False
    if value is None or value == "":
        return default
    found = _TRUE.get(str(value).strip().lower())
    if found is None:
        raise _Bad(f"{key} {value!r} is not true or false")
    return found


def _text(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _ref(value: Any) -> str | None:
    """A GUID reference's sourcedId; the href is never used."""
    return _ref_id(value.get("sourcedId") if value.__class__ is dict else value)


def _ref_id(value: Any) -> str | None:
    """A reference's sourcedId, or the reference given as a bare id (a string or a number)."""
    if value.__class__ is str and value and not value[0].isspace() and not value[-1].isspace():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _role_name(value: Any) -> str | None:
    if value.__class__ is str:
        known = _EXACT_ROLES.get(value)
        if known is not None:
            return known
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    return _ROLES.get(text.lower(), text)


def _user_role(raw: dict[str, Any]) -> str | None:
    roles = raw.get("roles")
    if isinstance(roles, list) and roles:
        entries = [r for r in roles if isinstance(r, dict) and _role_name(r.get("role"))]
        primary = [r for r in entries if str(r.get("roleType", "")).lower() == "primary"]
        home = _ref(raw.get("primaryOrg"))
        chosen = (
            next((r for r in primary if home and _ref(r.get("org")) == home), None)
            or (primary[0] if primary else None)
            or (entries[0] if entries else None)
        )
        if chosen is not None:
            return _role_name(chosen.get("role"))
    return _role_name(raw.get("role"))


def _user_orgs(raw: dict[str, Any]) -> tuple[str, ...]:
    found: dict[str, None] = {}  # ordered set: primaryOrg first, then as listed
    home = _ref(raw.get("primaryOrg"))
    if home:
        found[home] = None
    orgs = raw.get("orgs")
    if isinstance(orgs, list):
        for org in orgs:
            if (ref := _ref(org)) is not None:
                found[ref] = None
    roles = raw.get("roles")
    if isinstance(roles, list):
        for role in roles:
            if isinstance(role, dict) and (ref := _ref(role.get("org"))) is not None:
                found[ref] = None
    return tuple(found)


# Each record type has one ``_X_fields`` function, the only place its checks live, and two
# builders over it: ``normalize_X`` (a record value, for live resync and the inline path) and
# ``X_row`` (the staging row straight from the JSON object, for the decode workers: skipping the
# frozen dataclass and reading the date's text as-is halves a million enrollments' CPU).


def _org_fields(raw: dict[str, Any]) -> tuple[str, str, str, str | None, str | None, Status]:
    status = _status(raw)
    name = _text(raw, "name")
    if name is None and status == "active":
        raise _Bad("no name")
    sourced_id = _sourced_id(raw)
    return (
        sourced_id,
        name or "",
        _text(raw, "type") or "school",
        _text(raw, "identifier"),
        _ref(raw.get("parent")),
        status,
    )


def normalize_org(raw: dict[str, Any]) -> RosterOrg:
    return RosterOrg(*_org_fields(raw), date_last_modified=_modified(raw))


def org_row(raw: dict[str, Any]) -> Row:
    sid, name, kind, identifier, parent, status = _org_fields(raw)
    return (
        sid, name, kind, identifier, parent, status, _date_text(raw),
        digest(name, kind, identifier, parent, status),
    )  # fmt: skip


_PersonFields = tuple[
    str, str, tuple[str, ...], str, str, str | None, str | None, bool, tuple[str, ...], Status
]


def _other_roles(raw: dict[str, Any], primary: str | None) -> tuple[str, ...]:
    """The roles besides ``primary`` that a 1.2 ``roles[]`` lists (primary or secondary), and a
    1.1 ``role`` sent beside it: each once."""
    found: list[str] = []
    roles = raw.get("roles")
    names = [e.get("role") for e in roles if isinstance(e, dict)] if isinstance(roles, list) else []
    for value in (*names, raw.get("role")):
        name = _role_name(value)
        if name is not None and name != primary and name not in found:
            found.append(name)
    return tuple(found)


def _person_fields(raw: dict[str, Any]) -> _PersonFields:
    status = _status(raw)
    role = _user_role(raw)
    if role is None and status == "active":
        raise _Bad("no role")
    email = _text(raw, "email")
    sourced_id = _sourced_id(raw)
    return (
        sourced_id,
        role or "",
        _other_roles(raw, role),
        _text(raw, "givenName") or "",
        _text(raw, "familyName") or "",
        email,
        _text(raw, "username"),
        _bool(raw, "enabledUser", True),
        _user_orgs(raw),
        status,
    )


def normalize_user(raw: dict[str, Any]) -> RosterPerson:
    sid, role, others, given, family, email, username, enabled, orgs, status = _person_fields(raw)
    return RosterPerson(
        sid, role, given, family, email, username, enabled, orgs, status,
        date_last_modified=_modified(raw), other_roles=others,
    )  # fmt: skip


def user_row(raw: dict[str, Any]) -> Row:
    sid, role, others, given, family, email, username, enabled, orgs, status = _person_fields(raw)
    roles = person_roles(role, others)
    return (
        sid, role, roles, given, family, email, username, enabled, ",".join(orgs), status,
        _date_text(raw),
        person_digest(role, roles, given, family, email, username, enabled, orgs, status),
    )  # fmt: skip


def _class_fields(raw: dict[str, Any]) -> tuple[str, str, str | None, str | None, Status]:
    status = _status(raw)
    title = _text(raw, "title")
    if title is None and status == "active":
        raise _Bad("no title")
    sourced_id = _sourced_id(raw)
    return sourced_id, title or "", _text(raw, "classCode"), _ref(raw.get("school")), status


def class_terms(raw: dict[str, Any]) -> tuple[str, ...]:
    """The sourcedIds of a class's ``terms`` (GUID references; a bad entry is left out)."""
    refs = raw.get("terms")
    if not isinstance(refs, list):
        return ()
    return tuple(dict.fromkeys(ref for ref in map(_ref, refs) if ref is not None))


def _day(raw: dict[str, Any], key: str) -> date:
    value = raw.get(key)
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip()[:10])
        except ValueError:
            pass
    raise _Bad(f"{key} {value!r} is not a date (YYYY-MM-DD)")


def parse_session(raw: Any) -> AcademicSession | str:
    """One academic session, or why it cannot be read (a sentence naming it)."""
    if not isinstance(raw, dict):
        return "not a JSON object"
    try:
        sid = _sourced_id(raw)
    except _Bad as exc:
        return str(exc)
    try:
        return AcademicSession(
            sid,
            _text(raw, "title") or "",
            _text(raw, "type") or "",
            _day(raw, "startDate"),
            _day(raw, "endDate"),
            parent_id=_ref(raw.get("parent")),
            school_year=_text(raw, "schoolYear"),
            status=_status(raw),
        )
    except _Bad as exc:
        return f"{sid}: {exc}"


def normalize_class(raw: dict[str, Any]) -> RosterClass:
    return RosterClass(
        *_class_fields(raw), date_last_modified=_modified(raw), term_ids=class_terms(raw)
    )


def class_row(raw: dict[str, Any]) -> Row:
    sid, title, code, school, status = _class_fields(raw)
    return (
        sid, title, code, school, status, _date_text(raw),
        digest(title, code, school, status),
    )  # fmt: skip


def _enrollment_fields(raw: dict[str, Any]) -> tuple[str, str, str, str, Status, bool]:
    return _enrollment_values(
        raw.get("sourcedId"),
        raw.get("status"),
        _ref(raw.get("user")),
        _ref(raw.get("class")),
        raw.get("role"),
        raw.get("primary"),
    )


def _enrollment_values(
    sid: Any, status_value: Any, user_id: str | None, class_id: str | None, role_value: Any,
    primary_value: Any,
) -> tuple[str, str, str, str, Status, bool]:  # fmt: skip
    """An enrollment's fields from its values as sent (the references' ids already read)."""
    status = _status_of(status_value)
    role = _role_name(role_value)
    if status == "active":
        if user_id is None:
            raise _Bad("no user reference")
        if class_id is None:
            raise _Bad("no class reference")
        if role is None:
            raise _Bad("no role")
    sourced_id = _sourced_id_of(sid)
    primary = _bool_of(primary_value, "primary", False)
    return sourced_id, class_id or "", user_id or "", role or "", status, primary


def normalize_enrollment(raw: dict[str, Any]) -> RosterEnrollment:
    return RosterEnrollment(*_enrollment_fields(raw), date_last_modified=_modified(raw))


def enrollment_row(raw: dict[str, Any] | TypedEnrollment) -> Row:
    if isinstance(raw, TypedEnrollment):
        return _typed_enrollment_row(raw)
    return _enrollment_row(_enrollment_fields(raw), raw.get("dateLastModified"))


def _enrollment_row(fields: tuple[str, str, str, str, Status, bool], date_value: Any) -> Row:
    sid, class_id, user_id, role, status, primary = fields
    return (
        sid, class_id, user_id, role, status, primary, _date_text_of(date_value),
        # what RosterEnrollment.content_hash joins, written out: a million calls
        digest_text(f"{class_id}\x1f{user_id}\x1f{role}\x1f{status}\x1f{primary}"),
    )  # fmt: skip


# -- typed records ------------------------------------------------------------------------------
# A conforming server's enrollment, decoded by msgspec straight into a struct of the fields a
# row reads: no dict per record and per reference, and the keys nobody reads (metadata, href,
# dates of the term) skipped while parsing. A value of another JSON type than these fails the
# decode, and the page or record is decoded into dicts instead: the same rows either way.


class _TypedRef(msgspec.Struct):
    sourcedId: str | None = None


class TypedEnrollment(msgspec.Struct, rename={"class_": "class"}):
    sourcedId: str | None = None
    status: str | None = None
    dateLastModified: str | None = None
    user: _TypedRef | None = None
    class_: _TypedRef | None = None
    role: str | None = None
    primary: str | bool | None = None


class _TypedEnrollments(msgspec.Struct):
    enrollments: list[TypedEnrollment]


def _typed_ref(ref: _TypedRef | None) -> str | None:
    return None if ref is None else _ref_id(ref.sourcedId)


def _typed_enrollment_row(e: TypedEnrollment) -> Row:
    fields = _enrollment_values(
        e.sourcedId, e.status, _typed_ref(e.user), _typed_ref(e.class_), e.role, e.primary
    )
    return _enrollment_row(fields, e.dateLastModified)


_TYPED_PAGES: dict[str, msgspec.json.Decoder[Any]] = {
    "enrollments": msgspec.json.Decoder(_TypedEnrollments),
}
_TYPED_RECORDS: dict[str, msgspec.json.Decoder[Any]] = {
    "enrollments": msgspec.json.Decoder(TypedEnrollment),
}


def typed_page(collection: str, content: bytes) -> list[Any] | None:
    """The page's records as typed structs, where the collection has them and every record
    fits their types; else None (decode the page into dicts)."""
    decoder = _TYPED_PAGES.get(collection)
    if decoder is None:
        return None
    try:
        page = decoder.decode(content)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    records: list[Any] = getattr(page, collection)
    return records


def typed_record(collection: str, raw: bytes | memoryview) -> Any:
    """One record as a typed struct where it fits (see :func:`typed_page`), else as a dict."""
    decoder = _TYPED_RECORDS.get(collection)
    if decoder is not None:
        try:
            return decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            pass
    return orjson.loads(raw)


Normalizer = Callable[[dict[str, Any]], RosterOrg | RosterPerson | RosterClass | RosterEnrollment]

#: collection name -> (entity name used in reports, normalizer)
NORMALIZERS: dict[str, tuple[str, Normalizer]] = {
    "orgs": ("org", normalize_org),
    "users": ("user", normalize_user),
    "classes": ("class", normalize_class),
    "enrollments": ("enrollment", normalize_enrollment),
}


def _converted(
    entity: str, convert: Callable[[dict[str, Any]], _T], records: Iterable[Any]
) -> Iterator[_T | Rejected]:
    """Each record converted, in order, or its rejection: a schema violation, or not an object.
    (Objects are not type-checked up front: a million ``isinstance`` calls for the rare list.)"""
    for raw in records:
        try:
            yield convert(raw)
        except _Bad as exc:
            sourced_id = raw.sourcedId if raw.__class__ is TypedEnrollment else raw.get("sourcedId")
            yield Rejected(entity, rejected_id(sourced_id), str(exc))
        except AttributeError:
            if isinstance(raw, dict):
                raise
            yield Rejected(entity, None, "not a JSON object")


def normalize_page(
    collection: str, records: list[Any]
) -> list[RosterOrg | RosterPerson | RosterClass | RosterEnrollment | Rejected]:
    """Every record of one page, in order (bad ones as :class:`Rejected`)."""
    entity, convert = NORMALIZERS[collection]
    return list(_converted(entity, convert, records))


#: collection name -> (entity name used in reports, staging table kind, row builder)
ROW_BUILDERS: dict[str, tuple[str, str, Callable[[dict[str, Any]], Row]]] = {
    "orgs": ("org", "org", org_row),
    "users": ("user", "person", user_row),
    "classes": ("class", "class", class_row),
    "enrollments": ("enrollment", "enrollment", enrollment_row),
}
_DATE_COLUMN = {kind: COLUMNS[kind].index("date_last_modified") for kind in COLUMNS}


def rows_page(collection: str, records: list[Any], fps: Sequence[int] | None = None) -> StagedBatch:
    """Every record of one page as staging rows: what ``rows.sort_batch(normalize_page(...))``
    gives, rejections and the newest date included, without the record values between.
    ``fps``: each record's fingerprint (decode.fingerprint), the rows' last column; else
    None there."""
    entity, kind, build = ROW_BUILDERS[collection]
    out = StagedBatch()
    rows = out.rows[kind]
    marks: Iterable[int | None] = repeat(None) if fps is None else fps
    for row, fp in zip(_converted(entity, build, records), marks, strict=fps is not None):
        if isinstance(row, Rejected):
            out.rejected.append(row)
        else:
            rows.append((*row, fp))
    rows = out.rows[kind] = keep_fitting(kind, rows, out.rejected)
    if kind == "class":
        staged = {row[0] for row in rows}
        for raw in records:
            terms = class_terms(raw) if raw.__class__ is dict else ()
            if terms:
                try:
                    sid = _sourced_id(raw)
                except _Bad:
                    continue
                if sid in staged:
                    out.terms[sid] = terms
    # utc_text is fixed-width, so the greatest text is the newest instant.
    at = _DATE_COLUMN[kind]
    newest = max((d for row in rows if (d := row[at]) is not None), default=None)
    if newest is not None:
        out.newest = datetime.fromisoformat(newest).replace(tzinfo=UTC)
    return out


def normalize(
    collection: str, raw: Any
) -> RosterOrg | RosterPerson | RosterClass | RosterEnrollment | Rejected:
    """One record of ``collection`` (``users``, ``classes``, ...) or its rejection."""
    entity, convert = NORMALIZERS[collection]
    if not isinstance(raw, dict):
        return Rejected(entity, None, "not a JSON object")
    return next(_converted(entity, convert, [raw]))

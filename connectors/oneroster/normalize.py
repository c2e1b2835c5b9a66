"""OneRoster 1.1/1.2 JSON objects to :mod:`rostersync.records` values.

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
:class:`~rostersync.records.Rejected` with the reason; it never stops the run.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from rostersync.records import (
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    Status,
)

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


class _Bad(ValueError):
    """One record's schema violation; becomes a Rejected."""


# Each helper tries the shape a conforming server sends first (a plain, clean string) and only
# then the lenient fallbacks: a district is millions of records, so the common path must be short.


def _sourced_id(raw: dict[str, Any]) -> str:
    value = raw.get("sourcedId")
    if value.__class__ is str and value and not value[0].isspace() and not value[-1].isspace():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise _Bad("no sourcedId")
    return value.strip()


def _status(raw: dict[str, Any]) -> Status:
    value = raw.get("status")
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
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _modified(raw: dict[str, Any]) -> datetime | None:
    value = raw.get("dateLastModified")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Bad(f"dateLastModified {value!r} is not a date-time")
    try:
        return _parse_date(value)
    except ValueError:
        raise _Bad(f"dateLastModified {value!r} is not a date-time") from None


def _bool(raw: dict[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key)
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
    if value.__class__ is dict:
        value = value.get("sourcedId")
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


def normalize_org(raw: dict[str, Any]) -> RosterOrg:
    status = _status(raw)
    name = _text(raw, "name")
    if name is None and status == "active":
        raise _Bad("no name")
    return RosterOrg(
        sourced_id=_sourced_id(raw),
        name=name or "",
        type=_text(raw, "type") or "school",
        identifier=_text(raw, "identifier"),
        parent_id=_ref(raw.get("parent")),
        status=status,
        date_last_modified=_modified(raw),
    )


def normalize_user(raw: dict[str, Any]) -> RosterPerson:
    status = _status(raw)
    role = _user_role(raw)
    if role is None and status == "active":
        raise _Bad("no role")
    email = _text(raw, "email")
    return RosterPerson(
        sourced_id=_sourced_id(raw),
        role=role or "",
        given_name=_text(raw, "givenName") or "",
        family_name=_text(raw, "familyName") or "",
        email=email,
        username=_text(raw, "username"),
        enabled=_bool(raw, "enabledUser", True),
        org_ids=_user_orgs(raw),
        status=status,
        date_last_modified=_modified(raw),
    )


def normalize_class(raw: dict[str, Any]) -> RosterClass:
    status = _status(raw)
    title = _text(raw, "title")
    if title is None and status == "active":
        raise _Bad("no title")
    return RosterClass(
        sourced_id=_sourced_id(raw),
        title=title or "",
        class_code=_text(raw, "classCode"),
        school_id=_ref(raw.get("school")),
        status=status,
        date_last_modified=_modified(raw),
    )


def normalize_enrollment(raw: dict[str, Any]) -> RosterEnrollment:
    status = _status(raw)
    user_id = _ref(raw.get("user"))
    class_id = _ref(raw.get("class"))
    role = _role_name(raw.get("role"))
    if status == "active":
        if user_id is None:
            raise _Bad("no user reference")
        if class_id is None:
            raise _Bad("no class reference")
        if role is None:
            raise _Bad("no role")
    return RosterEnrollment(
        sourced_id=_sourced_id(raw),
        class_id=class_id or "",
        user_id=user_id or "",
        role=role or "",
        status=status,
        primary=_bool(raw, "primary", False),
        date_last_modified=_modified(raw),
    )


Normalizer = Callable[[dict[str, Any]], RosterOrg | RosterPerson | RosterClass | RosterEnrollment]

#: collection name -> (entity name used in reports, normalizer)
NORMALIZERS: dict[str, tuple[str, Normalizer]] = {
    "orgs": ("org", normalize_org),
    "users": ("user", normalize_user),
    "classes": ("class", normalize_class),
    "enrollments": ("enrollment", normalize_enrollment),
}


def normalize_page(
    collection: str, records: list[Any]
) -> list[RosterOrg | RosterPerson | RosterClass | RosterEnrollment | Rejected]:
    """Every record of one page, in order (bad ones as :class:`Rejected`)."""
    entity, convert = NORMALIZERS[collection]
    out: list[RosterOrg | RosterPerson | RosterClass | RosterEnrollment | Rejected] = []
    append = out.append
    for raw in records:
        try:
            append(convert(raw))
        except _Bad as exc:
            sourced_id = raw.get("sourcedId")
            append(Rejected(entity, sourced_id if isinstance(sourced_id, str) else None, str(exc)))
        except AttributeError:
            if isinstance(raw, dict):
                raise
            append(Rejected(entity, None, "not a JSON object"))
    return out


def normalize(
    collection: str, raw: Any
) -> RosterOrg | RosterPerson | RosterClass | RosterEnrollment | Rejected:
    """One record of ``collection`` (``users``, ``classes``, ...) or its rejection."""
    entity, convert = NORMALIZERS[collection]
    if not isinstance(raw, dict):
        return Rejected(entity, None, "not a JSON object")
    try:
        return convert(raw)
    except _Bad as exc:
        sourced_id = raw.get("sourcedId")
        return Rejected(entity, sourced_id if isinstance(sourced_id, str) else None, str(exc))

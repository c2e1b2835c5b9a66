"""Hostile records for the OneRoster normalizer: random JSON values in place of each field of a
user, class, enrollment and org. Every page decodes, on every path (records, staging rows,
typed structs, records left out as known), into records and rejections that each give a row,
or into rejections naming their record, or fails as a DecodeError the connector names the
page by: never another exception, which the decode workers would hand back unnamed."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.oneroster.decode import (
    DecodedPage,
    DecodeError,
    decode_page,
    fingerprint,
    split_page,
)
from connectors.oneroster.normalize import normalize, normalize_page, rows_page
from rostersync.source.records import Rejected
from rostersync.source.rows import StagedBatch, sort_batch

ENTITIES = {"users": "user", "classes": "class", "enrollments": "enrollment", "orgs": "org"}


def _ref(sourced_id: str) -> dict[str, Any]:
    return {"href": "https://elsewhere.invalid/x", "sourcedId": sourced_id, "type": "x"}


#: A valid record of each collection: each field is the one a drawn value may replace.
BASE: dict[str, dict[str, Any]] = {
    "users": {
        "sourcedId": "u-1",
        "status": "active",
        "dateLastModified": "2026-09-01T00:00:00.000Z",
        "username": "ann",
        "enabledUser": "true",
        "givenName": "Ann",
        "familyName": "Lee",
        "email": "ann@example.org",
        "role": "teacher",
        "roles": [{"roleType": "primary", "role": "teacher", "org": _ref("sch-1")}],
        "primaryOrg": _ref("sch-1"),
        "orgs": [_ref("sch-1")],
    },
    "classes": {
        "sourcedId": "c-1",
        "status": "active",
        "dateLastModified": "2026-09-01T00:00:00.000Z",
        "title": "Algebra",
        "classCode": "ALG-1",
        "school": _ref("sch-1"),
        "terms": [_ref("t-1")],
    },
    "enrollments": {
        "sourcedId": "e-1",
        "status": "active",
        "dateLastModified": "2026-09-01T00:00:00.000Z",
        "user": _ref("u-1"),
        "class": _ref("c-1"),
        "role": "student",
        "primary": "false",
    },
    "orgs": {
        "sourcedId": "o-1",
        "status": "active",
        "dateLastModified": "2026-09-01T00:00:00.000Z",
        "name": "North High",
        "type": "school",
        "identifier": "NH",
        "parent": _ref("dist"),
    },
}

#: Values that have broken parsers of this kind: edges of dates (a year-1 time ahead of UTC
#: is before the first instant a datetime holds), ids and names past their column, blanks,
#: control characters, numbers past 64 bits.
SPECIAL = st.sampled_from(
    [
        "0001-01-01T00:00:00+05:00",
        "9999-12-31T23:59:59-05:00",
        "9999-12-31T24:00:00Z",
        "0001-01-01",
        "2026-09-01T00:00:00.000+24:00",
        "x" * 300,
        " " + "y" * 255,
        "z" * 5000,
        "",
        " ",
        "\x00",
        "a\x1fb",
        "\u2028",
        "teacher",
        "Teacher",
        "active",
        "tobedeleted",
        "true",
        10**30,
        -(2**63),
        2**64,
        1e308,
        -0.0,
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    SPECIAL,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["sourcedId", "role", "roleType", "org", "x"]), inner),
    ),
    max_leaves=6,
)


@st.composite
def hostile_record(draw: st.DrawFn, collection: str) -> Any:
    """The collection's valid record with some fields replaced by random JSON or left out;
    now and then no object at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON)
    record = dict(BASE[collection])
    for key in draw(st.lists(st.sampled_from(sorted(record)), min_size=1, max_size=4)):
        if draw(st.booleans()) and key != "sourcedId":
            record[key] = draw(JSON)
        elif draw(st.integers(0, 3)) == 0:
            record.pop(key, None)
        else:
            record[key] = draw(JSON)
    return record


PAGES = st.sampled_from(sorted(BASE)).flatmap(
    lambda c: st.tuples(st.just(c), st.lists(hostile_record(c), min_size=1, max_size=4))
)


def _named(raw: Any) -> str | None:
    """The id a rejection of ``raw`` must carry: the sourcedId the record would have had."""
    sid = raw.get("sourcedId") if isinstance(raw, dict) else None
    if isinstance(sid, int) and not isinstance(sid, bool):
        sid = str(sid)
    return sid.strip()[:256] or None if isinstance(sid, str) else None


def _check_rejections(collection: str, rejected: list[Rejected], raws: list[Any]) -> None:
    named = {_named(raw) for raw in raws}
    for r in rejected:
        assert r.entity == ENTITIES[collection]
        assert isinstance(r.reason, str) and r.reason
        assert r.sourced_id in named, (r, named)
        assert r.sourced_id is None or 0 < len(r.sourced_id) <= 256


def _decode(collection: str, content: bytes, *args: Any) -> DecodedPage | None:
    """The page decoded, or None for a DecodeError (which names no record: the caller names
    the page); any other exception fails the test."""
    try:
        return decode_page(collection, content, *args)
    except DecodeError:
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(page=PAGES, skip=st.sets(st.integers(0, 3)))
def test_every_hostile_record_is_decoded_rejected_or_the_page_a_decode_error(
    page: tuple[str, list[Any]], skip: set[int]
) -> None:
    """Each path decodes the page or raises DecodeError; every rejection names its record, and
    the records it decodes give the rows the workers' row builders give."""
    collection, drawn = page
    content = json.dumps({collection: drawn}).encode()
    as_records = _decode(collection, content)
    if as_records is None:
        assert _decode(collection, content, True) is None
        return
    raws = orjson.loads(content)[collection]  # as the decoders read numbers
    assert not isinstance(as_records.batch, StagedBatch)  # records, not rows, were asked for
    records = list(as_records.batch)
    _check_rejections(collection, [r for r in records if isinstance(r, Rejected)], raws)
    slow = sort_batch(records)  # a decoded record gives a row (its date converts to UTC)
    _check_rejections(collection, slow.rejected, raws)
    fast = rows_page(collection, raws)
    assert (fast.rows, fast.newest) == (slow.rows, slow.newest)
    assert sorted(map(repr, fast.rejected)) == sorted(map(repr, slow.rejected))
    for raw in raws:
        one = normalize(collection, raw)
        if isinstance(one, Rejected):
            _check_rejections(collection, [one], [raw])
    as_rows = _decode(collection, content, True)
    assert as_rows is not None and isinstance(as_rows.batch, StagedBatch)
    _check_rejections(collection, as_rows.batch.rejected, raws)
    raw_bytes = split_page(collection, content)
    known = {fingerprint(raw_bytes[i]) for i in skip if i < len(raw_bytes)} or {0}
    left_out = _decode(collection, content, True, known)
    assert left_out is not None and isinstance(left_out.batch, StagedBatch)
    _check_rejections(collection, left_out.batch.rejected, raws)
    assert normalize_page(collection, raws) == records


# -- what the fuzzing found ------------------------------------------------------------------


def _both_ways(collection: str, raw: dict[str, Any]) -> list[Rejected]:
    """The record's rejections as records and as staging rows (they must agree)."""
    as_records = sort_batch(normalize_page(collection, [raw]))
    as_rows = rows_page(collection, [raw])
    assert as_records.rejected == as_rows.rejected
    assert as_records.rows == as_rows.rows
    return as_rows.rejected


def test_a_date_before_or_after_what_utc_holds_rejects_its_record() -> None:
    """Year 1 at +05:00 is before the first instant a row holds (and 9999 behind UTC after the
    last): the record is rejected naming the date; converting it raised OverflowError, which
    failed the run (or came back from a decode worker without the page named)."""
    for when in ("0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"):
        raw = {**BASE["users"], "dateLastModified": when}
        assert _both_ways("users", raw) == [
            Rejected("user", "u-1", f"dateLastModified {when!r} is not a date-time")
        ]


def test_a_rejection_names_the_id_the_record_would_have_had() -> None:
    """A number's digits and an id without its blanks, as the record is staged by; cut to
    the report's column. A numeric id was named None, so the rejection named no record."""
    cases = [(42, "42"), (" u-7 ", "u-7"), ("x" * 300, "x" * 256), (True, None), (" ", None)]
    for sent, named in cases:
        raw = {**BASE["classes"], "sourcedId": sent, "title": None}
        assert _both_ways("classes", raw) == [Rejected("class", named, "no title")]

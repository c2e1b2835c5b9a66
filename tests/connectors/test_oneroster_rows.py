"""The decode workers' row builders give exactly what normalizing and then ``sort_batch`` give.

``rows_page`` turns JSON objects straight into staging rows (no record values between, the
date's text rearranged instead of parsed and formatted). A row that differed would be written
to the mirror with another fingerprint or date, so every shape the normalizer accepts or
rejects is compared here, the lenient fallbacks included.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from connectors.oneroster.decode import (
    DecodedPage,
    DecodeError,
    decode_page,
    decode_records,
    fingerprint,
    records_of,
    split_page,
)
from connectors.oneroster.normalize import (
    TypedEnrollment,
    normalize_page,
    rows_page,
    typed_page,
    typed_record,
)
from rostersync.sampledata import DistrictSpec, generate_district
from rostersync.source.records import RosterEnrollment
from rostersync.source.rows import StagedBatch, enrollment_tuple, sort_batch
from tests.fakes.oneroster_server import Version, encode_record

DATES: list[Any] = [
    "2026-09-01T12:30:45.123Z",  # the form servers send: the fast path
    "2026-09-01T12:30:45Z",
    "2026-09-01T12:30:45.123456Z",
    "2026-09-01T12:30:45.123+02:00",  # another zone: converted to UTC
    "2026-09-01T12:30:45.123",  # no zone: read as UTC
    "2026-09-01 12:30:45.123Z",
    " 2026-09-01T12:30:45.123Z ",
    "2026-09-01",
    "2026-02-30T00:00:00.000Z",  # the fast path's shape, but no such day: rejected
    "2026-09-01T24:00:00.000Z",
    "2026-13-01T00:00:00.000Z",
    "\uff12\uff10\uff12\uff16-09-01T00:00:00.000Z",  # full-width digits: not a date either way
    "2026-W36-1T00:00:00.000Z",  # an ISO week date as long as the fast form
    "yesterday",
    "",
    None,
    20260901,
]


def _ref(sourced_id: Any) -> dict[str, Any]:
    return {"href": "https://elsewhere.invalid/x", "sourcedId": sourced_id, "type": "x"}


def _enrollments() -> list[Any]:
    base = {
        "sourcedId": "e-1",
        "status": "active",
        "dateLastModified": "2026-09-01T00:00:00.000Z",
        "user": _ref("u-1"),
        "class": _ref("c-1"),
        "role": "student",
        "primary": "false",
    }
    variants: list[dict[str, Any]] = [
        {},
        {"role": "Teacher", "primary": "true"},
        {"role": " administrator ", "primary": True},
        {"primary": "1"},
        {"primary": "maybe"},
        {"primary": None},
        {"user": "u-2", "class": 7},  # bare ids: accepted leniently
        {"user": _ref(" u-3 ")},
        {"user": None},
        {"class": {}},
        {"role": None},
        {"sourcedId": " e-2 "},
        {"sourcedId": 42},
        {"sourcedId": None},
        {"status": "tobedeleted", "user": None, "class": None, "role": None},
        {"status": "inactive"},
        {"status": "archived"},
        {"status": ""},
    ]
    out: list[Any] = [
        {**base, **v, "sourcedId": v.get("sourcedId", f"e-{i}")} for i, v in enumerate(variants)
    ]
    out += [{**base, "sourcedId": f"e-d{i}", "dateLastModified": d} for i, d in enumerate(DATES)]
    out += [{"sourcedId": "e-sparse", "status": "tobedeleted"}, ["not", "an", "object"], None]
    return out


def _users() -> list[Any]:
    base = {
        "sourcedId": "u-1",
        "status": "active",
        "dateLastModified": "2026-09-01T00:00:00.000Z",
        "username": "ann",
        "enabledUser": "true",
        "givenName": "Ann",
        "familyName": "Lee",
        "email": "Ann.Lee@Example.org",
        "role": "teacher",
        "orgs": [_ref("sch-1"), _ref("sch-2")],
    }
    variants: list[dict[str, Any]] = [
        {},
        {"email": "  spaced@example.org  ", "givenName": " ", "familyName": None},
        {"email": None, "username": None, "orgs": []},
        {"enabledUser": "false"},
        {"enabledUser": "nope"},
        {"role": "Student", "orgs": [_ref("sch-1"), "sch-3", 4]},
        {"role": None},
        {
            "role": None,
            "primaryOrg": _ref("sch-2"),
            "roles": [
                {"roleType": "secondary", "role": "aide", "org": _ref("sch-1")},
                {"roleType": "primary", "role": "teacher", "org": _ref("sch-2")},
            ],
        },
        {"status": "tobedeleted", "role": None},
        {"givenName": 7, "familyName": "Émile"},
    ]
    out: list[Any] = [{**base, **v, "sourcedId": f"u-{i}"} for i, v in enumerate(variants)]
    out += [{**base, "sourcedId": f"u-d{i}", "dateLastModified": d} for i, d in enumerate(DATES)]
    return out


def _classes() -> list[Any]:
    base = {
        "sourcedId": "c-1",
        "status": "active",
        "dateLastModified": "2026-09-01T00:00:00.000Z",
        "title": "Algebra",
        "classCode": "ALG-1",
        "school": _ref("sch-1"),
    }
    variants: list[dict[str, Any]] = [
        {},
        {"classCode": None, "school": None},
        {"title": None},
        {"title": None, "status": "tobedeleted"},
        {"title": "  Biology  ", "classCode": 12},
    ]
    return [{**base, **v, "sourcedId": f"c-{i}"} for i, v in enumerate(variants)]


def _orgs() -> list[Any]:
    base = {
        "sourcedId": "o-1",
        "status": "active",
        "dateLastModified": "2026-09-01T00:00:00.000Z",
        "name": "North High",
        "type": "school",
        "identifier": "NH",
        "parent": _ref("dist"),
    }
    variants: list[dict[str, Any]] = [
        {},
        {"type": None, "identifier": None, "parent": None},
        {"name": None},
        {"name": None, "status": "tobedeleted"},
    ]
    return [{**base, **v, "sourcedId": f"o-{i}"} for i, v in enumerate(variants)]


def _slow(collection: str, records: list[Any]) -> StagedBatch:
    return sort_batch(normalize_page(collection, records))


def _assert_same(collection: str, records: list[Any]) -> StagedBatch:
    fast, slow = rows_page(collection, records), _slow(collection, records)
    assert fast.rows == slow.rows
    assert fast.rejected == slow.rejected
    assert fast.newest == slow.newest
    return fast


@pytest.mark.parametrize(
    ("collection", "records"),
    [
        ("enrollments", _enrollments()),
        ("users", _users()),
        ("classes", _classes()),
        ("orgs", _orgs()),
    ],
)
def test_rows_equal_the_normalized_records_rows(collection: str, records: list[Any]) -> None:
    """Every shape, accepted or rejected, gives the same rows, rejections and newest date."""
    batch = _assert_same(collection, records)
    assert batch.rejected  # the corpus does exercise the rejections
    assert sum(map(len, batch.rows.values())) > len(batch.rejected)


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_rows_of_a_generated_district_equal_the_normalized_ones(version: Version) -> None:
    """The sample district as a server encodes it (edge cases included), in both versions."""
    roster = generate_district(DistrictSpec(schools=2, teachers=8, students=60, classes=12))
    schools: dict[str, str] = {}
    for collection, records in (
        ("orgs", roster.orgs),
        ("users", roster.persons),
        ("classes", roster.classes),
        ("enrollments", roster.enrollments),
    ):
        raw = [encode_record(r, version, schools) for r in records]
        batch = _assert_same(collection, raw)
        assert sum(map(len, batch.rows.values())) > 0


@pytest.mark.parametrize("text", [d for d in DATES if isinstance(d, str) and d])
def test_a_dates_text_is_the_parsed_dates_text(text: str) -> None:
    """The date column holds utc_text of the parsed date, or the record is rejected alike."""
    raw = {"sourcedId": "e", "user": _ref("u"), "class": _ref("c"), "role": "student"}
    raw["dateLastModified"] = text
    fast = rows_page("enrollments", [raw])
    slow = normalize_page("enrollments", [raw])
    if isinstance(slow[0], RosterEnrollment):
        assert fast.rows["enrollment"] == [enrollment_tuple(slow[0])]
        assert fast.newest == slow[0].date_last_modified
    else:
        assert fast.rejected == slow
        assert "is not a date-time" in fast.rejected[0].reason


def test_the_newest_date_is_the_latest_instant_across_zones() -> None:
    """Texts compare as instants: 12:00+02:00 is older than 11:00Z."""
    raw = [
        {"sourcedId": "c-1", "title": "A", "dateLastModified": "2026-09-01T12:00:00.000+02:00"},
        {"sourcedId": "c-2", "title": "B", "dateLastModified": "2026-09-01T11:00:00.000Z"},
        {"sourcedId": "c-3", "title": "C", "dateLastModified": "2026-09-01T10:30:00.000Z"},
        {"sourcedId": "c-4", "title": "D"},
    ]
    assert rows_page("classes", raw).newest == datetime(2026, 9, 1, 11, tzinfo=UTC)
    assert rows_page("classes", raw[3:]).newest is None


def test_the_decode_workers_import_only_what_decoding_uses() -> None:
    """The pool's forkserver preloads connectors.oneroster.decode: neither the config models
    (pydantic), the HTTP client, the store nor the logging set-up come with it."""
    import subprocess
    import sys

    heavy = ("pydantic", "httpx", "sqlalchemy", "structlog", "tenacity", "authlib")
    code = (
        "import sys, connectors.oneroster.decode; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
    # The package's public names are still there, each on first use.
    import connectors.oneroster as package

    assert package.PLUGIN.type == "oneroster"
    assert package.PLUGIN is package.PLUGIN
    assert package.OneRosterSourceConfig.__name__ == "OneRosterSourceConfig"


# -- typed records -------------------------------------------------------------------------------
# Conforming enrollments are decoded straight into structs (normalize.typed_page): the rows,
# rejections, dates and first id must be the dicts' exactly, and anything that does not fit
# the structs' types must fall back to the dicts.


def _page(collection: str, records: list[Any]) -> bytes:
    # json, not orjson: a page may hold an integer beyond 64 bits, as a server may send.
    return json.dumps({collection: records, "statusInfoSet": []}).encode()


def _dict_decoded(collection: str, content: bytes) -> DecodedPage:
    """The page decoded as before typed records: one orjson parse into dicts."""
    fps = [fingerprint(raw) for raw in split_page(collection, content)]
    records = records_of(orjson.loads(content), collection)
    return decode_records(collection, records, as_rows=True, fps=fps)


def _assert_same_page(got: DecodedPage, want: DecodedPage) -> None:
    assert isinstance(got.batch, StagedBatch) and isinstance(want.batch, StagedBatch)
    assert got.batch.rows == want.batch.rows
    assert got.batch.rejected == want.batch.rejected
    assert got.batch.newest == want.batch.newest
    assert {k: list(v) for k, v in got.batch.order.items()} == {
        k: list(v) for k, v in want.batch.order.items()
    }
    assert (got.length, got.first_id) == (want.length, want.first_id)


def test_each_enrollment_shape_gives_the_same_row_typed_or_not() -> None:
    """Each record of the corpus alone: typed where it fits the structs, else a dict, and the
    same row or rejection either way (a bare id, a number, a true boolean fall back)."""
    fitted = 0
    for record in _enrollments():
        content = json.dumps(record).encode()
        decoded = typed_record("enrollments", content)
        fitted += isinstance(decoded, TypedEnrollment)
        got, want = rows_page("enrollments", [decoded]), rows_page("enrollments", [record])
        assert (got.rows, got.rejected, got.newest) == (want.rows, want.rejected, want.newest)
    assert 0 < fitted < len(_enrollments())  # both ways are exercised


def test_a_conforming_page_is_decoded_typed_and_an_odd_one_as_dicts() -> None:
    """A page of conforming records takes the typed path, one odd record sends the whole
    page to the dicts, and both give what the dicts give."""
    conforming = [
        r
        for r in _enrollments()
        if isinstance(typed_record("enrollments", orjson.dumps(r)), TypedEnrollment)
    ]
    odd = [
        *conforming,
        {"sourcedId": "e-odd", "user": "u-9", "class": _ref("c-1"), "role": "student"},
    ]
    for records, typed in ((conforming, True), (odd, False)):
        content = _page("enrollments", records)
        assert (typed_page("enrollments", content) is not None) is typed
        _assert_same_page(
            decode_page("enrollments", content, True), _dict_decoded("enrollments", content)
        )


_TEXTS = st.sampled_from(["", " ", "x", " x ", "e-1", "Active", "\u00e9", "true", "false", "1"])
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.just(10**30),
    st.just(1.5),
    _TEXTS,
    st.text(max_size=4),
)
_REFS = st.one_of(
    _VALUES,
    st.fixed_dictionaries({}, optional={"sourcedId": _VALUES, "href": _TEXTS, "type": _TEXTS}),
    st.lists(_TEXTS, max_size=2),
)
_ENROLLMENT = st.fixed_dictionaries(
    {},
    optional={
        "sourcedId": st.one_of(_VALUES, st.sampled_from(["e-1", "e-2", "e-3"])),
        "status": st.one_of(_VALUES, st.sampled_from(["active", "tobedeleted", "inactive", "x"])),
        "dateLastModified": st.one_of(
            _VALUES, st.sampled_from([d for d in DATES if d is not None])
        ),
        "user": _REFS,
        "class": _REFS,
        "role": st.one_of(_VALUES, st.sampled_from(["student", "Teacher", " aide ", "guest"])),
        "primary": _VALUES,
        "metadata": st.one_of(st.none(), st.dictionaries(_TEXTS, _VALUES, max_size=2)),
    },
)


_MAYBE_TEXT = st.one_of(st.none(), _TEXTS)
#: Records of the types the structs take (their values still odd: blank ids, unknown
#: statuses, dates of every form), so that most pages take the typed path.
_TYPED_SHAPE = st.fixed_dictionaries(
    {
        "sourcedId": st.one_of(_MAYBE_TEXT, st.sampled_from(["e-1", "e-2", "e-3"])),
        "user": st.one_of(st.none(), st.fixed_dictionaries({"sourcedId": _MAYBE_TEXT})),
        "class": st.fixed_dictionaries({"sourcedId": _MAYBE_TEXT, "href": _TEXTS}),
    },
    optional={
        "status": st.one_of(st.none(), st.sampled_from(["active", "tobedeleted", "x", ""])),
        "dateLastModified": st.sampled_from([d for d in DATES if isinstance(d, str)]),
        "role": st.one_of(_MAYBE_TEXT, st.sampled_from(["student", "Teacher", " aide "])),
        "primary": st.one_of(st.none(), st.booleans(), _TEXTS),
        "metadata": st.dictionaries(_TEXTS, _VALUES, max_size=2),
    },
)


@settings(max_examples=300, deadline=None)
@given(
    records=st.lists(st.one_of(_TYPED_SHAPE, _TYPED_SHAPE, _ENROLLMENT, _VALUES), max_size=6),
    skip=st.sets(st.integers(0, 5)),
)
def test_any_enrollment_page_decodes_as_the_dicts_decode_it(
    records: list[Any], skip: set[int]
) -> None:
    """Random pages of enrollments, typed or odd, whole or with known records left out: the
    rows, rejections, order and first id are those of the dicts (or the same DecodeError)."""
    content = _page("enrollments", records)
    try:
        want = _dict_decoded("enrollments", content)
    except orjson.JSONDecodeError:
        with pytest.raises(DecodeError):
            decode_page("enrollments", content, True)
        return
    event("typed page" if typed_page("enrollments", content) is not None else "dict page")
    _assert_same_page(decode_page("enrollments", content, True), want)
    raws = split_page("enrollments", content)
    known = {fingerprint(raws[i]) for i in skip if i < len(raws)}
    if known:
        got = decode_page("enrollments", content, True, known)
        parsed = records_of(orjson.loads(content), "enrollments")  # as orjson reads numbers
        kept = [r for raw, r in zip(raws, parsed, strict=True) if fingerprint(raw) not in known]
        assert isinstance(got.batch, StagedBatch)
        fps = [fingerprint(raw) for raw in raws if fingerprint(raw) not in known]
        dicts = rows_page("enrollments", kept, fps)
        assert (got.batch.rows, got.batch.rejected) == (dicts.rows, dicts.rejected)


def test_a_page_naming_its_list_twice_is_read_by_its_last_list_either_way() -> None:
    """Hostile JSON: two ``enrollments`` keys. The raw split (fingerprints), the typed decode
    and orjson all take the last list, so each row keeps its own record's fingerprint."""
    one = {"sourcedId": "e-a", "user": _ref("u-1"), "class": _ref("c-1"), "role": "student"}
    two = [{**one, "sourcedId": "e-b"}, {**one, "sourcedId": "e-c"}]
    content = (
        b'{"enrollments": ' + json.dumps([one]).encode() + b', "enrollments": '
        + json.dumps(two).encode() + b"}"
    )  # fmt: skip
    assert typed_page("enrollments", content) is not None
    got = decode_page("enrollments", content, True)
    _assert_same_page(got, _dict_decoded("enrollments", content))
    assert isinstance(got.batch, StagedBatch)
    assert [r[0] for r in got.batch.rows["enrollment"]] == ["e-b", "e-c"]

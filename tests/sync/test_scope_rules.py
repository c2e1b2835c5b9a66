"""The scope rules on plain values: terms, schools, and what min_source_ratio compares."""

from __future__ import annotations

from datetime import date

from rostersync.scoping import (
    OrgInfo,
    classes_out_of_term,
    person_in_scope,
    resolve_schools,
    term_runs,
)
from rostersync.source.records import AcademicSession
from rostersync.sync.scope import last_counts, ratio_counts

FALL = AcademicSession("fall", "Fall", "term", date(2026, 8, 20), date(2026, 12, 20))
ORGS = {
    "d": OrgInfo("District", "district", None),
    "n": OrgInfo("North High", "school", "d"),
    "s": OrgInfo("South Middle", "school", "d"),
    "s-annex": OrgInfo("South Annex", "school", "s"),
}


def test_a_term_runs_from_start_minus_grace_to_end_plus_grace_inclusive() -> None:
    assert term_runs(FALL, date(2026, 8, 6), 14)
    assert not term_runs(FALL, date(2026, 8, 5), 14)
    assert term_runs(FALL, date(2027, 1, 3), 14)
    assert not term_runs(FALL, date(2027, 1, 4), 14)
    assert term_runs(FALL, date(2026, 12, 20), 0) and not term_runs(FALL, date(2026, 12, 21), 0)


def test_classes_out_of_term_spare_classes_with_no_or_unknown_terms() -> None:
    spring = AcademicSession("spring", "Spring", "term", date(2027, 1, 5), date(2027, 6, 1))
    sessions = {"fall": FALL, "spring": spring}
    out, unknown = classes_out_of_term(
        {"a": ("fall",), "b": ("spring",), "c": (), "d": ("fall", "spring"), "e": ("x", "spring")},
        sessions,
        date(2026, 10, 1),
        0,
    )
    assert out == {"b"}
    assert unknown == {"e": {"x"}}


def test_schools_match_by_id_or_name_and_take_the_orgs_under_them() -> None:
    schools = resolve_schools(ORGS, ["South Middle"], [])
    assert schools.included == {"s", "s-annex"}
    assert [schools.in_scope(o) for o in ("n", "s", "s-annex", "other")] == [
        False,
        True,
        True,
        False,
    ]
    schools = resolve_schools(ORGS, [], ["s", "Nowhere"])
    assert schools.included is None and schools.excluded == {"s", "s-annex"}
    assert schools.unknown == ["exclude 'Nowhere'"]
    assert schools.in_scope("n") and schools.in_scope("unknown-org")


def test_a_person_is_judged_by_their_schools_only() -> None:
    only_north = resolve_schools(ORGS, ["n"], [])
    assert person_in_scope(["d", "n"], ORGS, only_north)
    assert not person_in_scope(["d", "s"], ORGS, only_north)
    assert person_in_scope(["d"], ORGS, only_north)  # district staff: no school to judge by
    assert person_in_scope([""], ORGS, only_north)
    assert not person_in_scope(["gone"], ORGS, only_north)  # an org not sent counts as a school


def test_the_ratio_compares_records_in_scope_while_the_scope_stays() -> None:
    fetched = {"persons": 100, "classes": 10, "enrollments": 50, "classes_ignored": 6}
    kept = last_counts(fetched, 7)
    assert kept["scope"] == 7 and kept["kept_classes"] == 4 and kept["classes"] == 10
    now = {"persons": 100, "classes": 12, "enrollments": 50, "classes_ignored": 11}
    assert ratio_counts(now, kept, 7) == (
        {"persons": 100, "classes": 1, "enrollments": 50},
        {"persons": 100, "classes": 4, "enrollments": 50},
    )
    # The scope changed: what the source sent is compared.
    assert ratio_counts(now, kept, 8)[0]["classes"] == 12
    assert ratio_counts(now, kept, 8)[1] == {"persons": 100, "classes": 10, "enrollments": 50}
    # A state from before scoping (no kept counts) and no scope: as before.
    old = {"persons": 100, "classes": 10, "enrollments": 50}
    assert ratio_counts(old, old, 0) == (old, old)
    assert ratio_counts(old, None, 0) == (old, None)
    assert "scope" not in last_counts(old, 0)

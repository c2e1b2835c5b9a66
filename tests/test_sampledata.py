from __future__ import annotations

import csv
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from rostersync import sampledata as sd
from rostersync.sampledata import DistrictSpec, generate_district, iter_district
from rostersync.source.records import RosterEnrollment, RosterOrg, RosterPerson
from rostersync.source.testing import MemoryRoster

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "config" / "sample-district"
SMALL = DistrictSpec(seed=3, schools=4, teachers=10, students=200, classes=20, students_per_class=7)


@pytest.fixture(scope="module")
def district() -> MemoryRoster:
    return generate_district(DistrictSpec())


def is_edge(sourced_id: str) -> bool:
    return "-edge-" in sourced_id


def person(roster: MemoryRoster, sourced_id: str) -> RosterPerson:
    return next(p for p in roster.persons if p.sourced_id == sourced_id)


def taught_by(roster: MemoryRoster, teacher: str) -> set[str]:
    return {e.class_id for e in roster.enrollments if e.user_id == teacher and e.role == "teacher"}


def students_of(roster: MemoryRoster, class_id: str) -> list[RosterEnrollment]:
    return [e for e in roster.enrollments if e.class_id == class_id and e.role == "student"]


# --- determinism and size --------------------------------------------------------------------


def test_same_seed_gives_identical_district() -> None:
    """Two runs of the same spec produce equal rosters."""
    assert generate_district(SMALL) == generate_district(SMALL)


def test_different_seed_gives_different_district() -> None:
    """Another seed changes names and memberships."""
    a = generate_district(SMALL)
    b = generate_district(
        DistrictSpec(seed=4, **{k: v for k, v in vars(SMALL).items() if k != "seed"})
    )
    assert [p.email for p in a.persons] != [p.email for p in b.persons]
    assert {(e.class_id, e.user_id) for e in a.enrollments} != {
        (e.class_id, e.user_id) for e in b.enrollments
    }


def test_sizes_match_the_spec() -> None:
    """Counts follow the spec exactly; edge cases only add records whose ids contain -edge-."""
    roster = generate_district(SMALL)
    regular_people = Counter(p.role for p in roster.persons if not is_edge(p.sourced_id))
    assert regular_people == {"teacher": 10, "student": 200}
    assert len(roster.orgs) == 1 + 4
    assert len([c for c in roster.classes if not is_edge(c.sourced_id)]) == 20
    regular = [e for e in roster.enrollments if not is_edge(e.class_id)]
    assert len(regular) == 20 * (1 + 7)
    plain = generate_district(DistrictSpec(**{**vars(SMALL), "edge_cases": False}))
    assert not [r for r in plain.records() if is_edge(r.sourced_id or "")]
    assert len(plain.persons) == 210


def test_each_class_has_one_primary_teacher_and_distinct_students_of_its_school() -> None:
    """Regular classes: one primary teacher and students_per_class distinct same-school students."""
    roster = generate_district(SMALL)
    school_of = {p.sourced_id: p.org_ids for p in roster.persons}
    for c in roster.classes:
        if is_edge(c.sourced_id):
            continue
        rows = [e for e in roster.enrollments if e.class_id == c.sourced_id]
        teachers = [e for e in rows if e.role == "teacher"]
        assert [(t.primary, school_of[t.user_id]) for t in teachers] == [(True, (c.school_id,))]
        students = [e.user_id for e in rows if e.role == "student"]
        assert len(set(students)) == len(students) == 7
        assert all(school_of[s] == (c.school_id,) for s in students)


def test_students_per_class_is_capped_by_school_size() -> None:
    """A school with fewer students than students_per_class enrols all it has."""
    roster = generate_district(
        DistrictSpec(
            schools=2, teachers=2, students=6, classes=2, students_per_class=25, edge_cases=False
        )
    )
    assert [len(students_of(roster, c.sourced_id)) for c in roster.classes] == [3, 3]


def test_iter_district_is_lazy_and_matches_generate_district() -> None:
    """Streaming yields the same records in order, and starts without building the district."""
    assert list(iter_district(SMALL)) == generate_district(SMALL).records()
    huge = iter_district(DistrictSpec(students=10_000_000, classes=2_000_000, teachers=100_000))
    first = next(huge)
    assert isinstance(first, RosterOrg) and first.sourced_id == sd.DISTRICT_ID


def test_invalid_spec_is_refused() -> None:
    """Impossible specs fail early with a clear message."""
    with pytest.raises(ValueError, match="at least one school"):
        DistrictSpec(schools=0)
    with pytest.raises(ValueError, match="at least one teacher"):
        DistrictSpec(teachers=0)
    with pytest.raises(ValueError, match="edge cases need"):
        DistrictSpec(students=0, classes=0)


# --- shape of the default district -----------------------------------------------------------


def test_default_district_shape(district: MemoryRoster) -> None:
    """Default: a district plus North High, South Middle, East Elementary; ids as documented."""
    assert [(o.sourced_id, o.name, o.type) for o in district.orgs] == [
        ("org-district", "Springfield Public Schools", "district"),
        ("sch-001", "North High", "school"),
        ("sch-002", "South Middle", "school"),
        ("sch-003", "East Elementary", "school"),
    ]
    ids = [p.sourced_id for p in district.persons if not is_edge(p.sourced_id)]
    assert (
        ids[0] == "t-0001"
        and ids[39] == "t-0040"
        and ids[40] == "s-000001"
        and ids[-1] == "s-001000"
    )
    assert district.classes[0].sourced_id == "c-00001"
    assert district.classes[0].title.endswith(")") and " (P" in district.classes[0].title


def test_ids_are_unique_and_enrollments_reference_existing_records(district: MemoryRoster) -> None:
    """Every sourcedId is unique per kind and every enrollment names a real person and class."""
    for records in (district.orgs, district.persons, district.classes, district.enrollments):
        ids = [r.sourced_id for r in records]
        assert len(ids) == len(set(ids))
    people = {p.sourced_id for p in district.persons}
    classes = {c.sourced_id for c in district.classes}
    assert all(e.user_id in people and e.class_id in classes for e in district.enrollments)
    schools = {o.sourced_id for o in district.orgs}
    assert all(c.school_id in schools for c in district.classes)
    assert all(set(p.org_ids) <= schools for p in district.persons)


def test_emails_are_unique_and_lower_case_except_the_upper_case_edge(
    district: MemoryRoster,
) -> None:
    """Emails are unique and lower-case first.last{n}@domain, but the deliberate Mixed.Case one."""
    emails = [p.email for p in district.persons if p.email]
    assert len(emails) == len({e.lower() for e in emails})
    not_lower = {p.sourced_id for p in district.persons if p.email and p.email != p.email.lower()}
    assert not_lower == {sd.EDGE_UPPER_EMAIL}
    assert person(district, sd.EDGE_UPPER_EMAIL).email == "Mixed.Case@springfield.example.org"
    pattern = re.compile(r"[a-z]+\.[a-z]+\d+@springfield\.example\.org")
    regular = [p for p in district.persons if not is_edge(p.sourced_id)]
    assert all(p.email and pattern.fullmatch(p.email) for p in regular)


# --- edge cases ------------------------------------------------------------------------------


def test_edge_teachers_all_teach_in_the_first_school(district: MemoryRoster) -> None:
    """Every edge teacher belongs to sch-001 and every edge class is in sch-001."""
    edge_teachers = [p for p in district.persons if is_edge(p.sourced_id)]
    assert {p.sourced_id for p in edge_teachers} == set(sd.EDGE_ELIGIBLE) | set(sd.EDGE_INELIGIBLE)
    assert all(p.role == "teacher" and "sch-001" in p.org_ids for p in edge_teachers)
    assert {c.school_id for c in district.classes if is_edge(c.sourced_id)} == {"sch-001"}


def test_edge_teacher_with_no_classes(district: MemoryRoster) -> None:
    """EDGE_NO_CLASSES exists and teaches nothing."""
    assert person(district, sd.EDGE_NO_CLASSES).email
    assert taught_by(district, sd.EDGE_NO_CLASSES) == set()


def test_edge_teacher_whose_classes_have_no_students(district: MemoryRoster) -> None:
    """EDGE_EMPTY_CLASSES teaches only EDGE_EMPTY_CLASS, which has no students."""
    assert taught_by(district, sd.EDGE_EMPTY_CLASSES) == {sd.EDGE_EMPTY_CLASS}
    assert students_of(district, sd.EDGE_EMPTY_CLASS) == []


def test_edge_teacher_whose_student_enrollments_are_all_tobedeleted(district: MemoryRoster) -> None:
    """EDGE_ONLY_DELETED's class has students, every one of them tobedeleted."""
    assert taught_by(district, sd.EDGE_ONLY_DELETED) == {sd.EDGE_DELETED_CLASS}
    rows = students_of(district, sd.EDGE_DELETED_CLASS)
    assert len(rows) == sd.EDGE_CLASS_STUDENTS
    assert {e.status for e in rows} == {"tobedeleted"}


@pytest.mark.parametrize(
    ("teacher", "klass"),
    [
        (sd.EDGE_NO_EMAIL, sd.EDGE_NO_EMAIL_CLASS),
        (sd.EDGE_UPPER_EMAIL, sd.EDGE_UPPER_EMAIL_CLASS),
        (sd.EDGE_DISABLED, sd.EDGE_DISABLED_CLASS),
    ],
)
def test_edge_teachers_with_active_students(
    district: MemoryRoster, teacher: str, klass: str
) -> None:
    """The no-email, upper-case-email and disabled teachers each teach active students."""
    assert taught_by(district, teacher) == {klass}
    rows = students_of(district, klass)
    assert len(rows) == sd.EDGE_CLASS_STUDENTS
    assert {e.status for e in rows} == {"active"}


def test_edge_no_email_and_disabled_teachers(district: MemoryRoster) -> None:
    """EDGE_NO_EMAIL has no email; EDGE_DISABLED has one but enabled=False; others are enabled."""
    assert person(district, sd.EDGE_NO_EMAIL).email is None
    disabled = person(district, sd.EDGE_DISABLED)
    assert (disabled.enabled, bool(disabled.email)) == (False, True)
    assert [p.sourced_id for p in district.persons if not p.enabled] == [sd.EDGE_DISABLED]


def test_edge_co_taught_class(district: MemoryRoster) -> None:
    """EDGE_COTEACH_CLASS has a primary teacher and a non-primary co-teacher, plus students."""
    teachers = {
        (e.user_id, e.primary)
        for e in district.enrollments
        if e.class_id == sd.EDGE_COTEACH_CLASS and e.role == "teacher"
    }
    assert teachers == {(sd.EDGE_COTEACH_PRIMARY, True), (sd.EDGE_COTEACHER, False)}
    assert len(students_of(district, sd.EDGE_COTEACH_CLASS)) == sd.EDGE_CLASS_STUDENTS
    assert person(district, sd.EDGE_COTEACHER).org_ids == ("sch-001", "sch-002")


# --- CSV output ------------------------------------------------------------------------------


def test_csv_headers_manifest_and_quoting(tmp_path: Path, district: MemoryRoster) -> None:
    """Files carry the exact 1.1 headers; the manifest declares bulk files; lists are quoted."""
    sd.write_oneroster_csv(district, tmp_path)
    first = {
        name: (tmp_path / name).read_text(encoding="utf-8").splitlines()[0] for name in sd.CSV_FILES
    }
    assert first["users.csv"] == ",".join(sd.USERS_HEADER)
    assert first["classes.csv"].startswith("sourcedId,status,dateLastModified,title,grades,")
    assert first["enrollments.csv"] == (
        "sourcedId,status,dateLastModified,classSourcedId,schoolSourcedId,"
        "userSourcedId,role,primary,beginDate,endDate"
    )
    manifest = (tmp_path / "manifest.csv").read_text().splitlines()
    for line in (
        "oneroster.version,1.1",
        "file.users,bulk",
        "file.enrollments,bulk",
        "file.courses,absent",
    ):
        assert line in manifest
    users = (tmp_path / "users.csv").read_text(encoding="utf-8")
    assert f'{sd.EDGE_COTEACHER},,,true,"sch-001,sch-002",teacher,' in users
    assert f"{sd.EDGE_DISABLED},,,false," in users
    enrollments = (tmp_path / "enrollments.csv").read_text()
    assert ",tobedeleted,2026-09-01T00:00:00Z,c-edge-deleted,sch-001," in enrollments


def test_zip_holds_the_same_bytes_and_is_reproducible(tmp_path: Path) -> None:
    """The zip holds exactly the folder's files, and writing twice gives identical zips."""
    roster = generate_district(SMALL)
    sd.write_oneroster_csv(roster, tmp_path / "a", zip_path=tmp_path / "a.zip")
    sd.write_oneroster_csv(roster, tmp_path / "b", zip_path=tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        assert zf.namelist() == list(sd.CSV_FILES)
        for name in sd.CSV_FILES:
            assert zf.read(name) == (tmp_path / "a" / name).read_bytes()


def test_committed_sample_district_matches_the_generator(tmp_path: Path) -> None:
    """config/sample-district is exactly what config/make_sample_district.py writes today."""
    out = tmp_path / "regenerated"
    subprocess.run(
        [sys.executable, str(ROOT / "config" / "make_sample_district.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    committed = sorted(p.name for p in SAMPLE.iterdir())
    assert committed == sorted(p.name for p in out.iterdir()) == sorted(sd.CSV_FILES)
    for name in committed:
        assert (SAMPLE / name).read_bytes() == (out / name).read_bytes(), (
            f"{name} is stale: rerun the script"
        )


def test_sample_district_has_the_advertised_size() -> None:
    """The bundled sample: about 1,000 students, 40 teachers, 100 classes, at least 3 schools."""

    def rows(name: str) -> list[dict[str, str]]:
        with open(SAMPLE / name, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))

    roles = Counter(row["role"] for row in rows("users.csv"))
    assert roles["student"] == 1000
    assert 40 <= roles["teacher"] <= 50
    assert 100 <= len(rows("classes.csv")) <= 110
    assert len([o for o in rows("orgs.csv") if o["type"] == "school"]) >= 3

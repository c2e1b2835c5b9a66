"""OneRoster 1.2 CSV drops, bulk and delta, and what the manifest decides."""

from __future__ import annotations

import asyncio
import shutil
import zipfile
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.oneroster_csv import OneRosterCsvConnector
from rostersync.errors import ChangesOnlyError, FatalSourceError
from rostersync.sampledata import DistrictSpec, generate_district, write_oneroster_csv
from rostersync.source.connector import Connector, FetchMode
from rostersync.source.records import (
    AcademicSession,
    MemoryRoster,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    RosterRecord,
    TeacherRef,
)
from rostersync.source.testdata import small_roster
from rostersync.source.testing import ConnectorContract, collect
from tests.hostile import hostile_bytes
from tests.oneroster12 import ROLES, USERS, write_drop

SMALL = Path(__file__).parent / "files" / "oneroster-1.2" / "small"


class TestCsv12Connector(ConnectorContract):
    """The hand-written 1.2 bulk drop of the small roster passes the contract."""

    @pytest.fixture(params=["folder", "zip"])
    async def connector(
        self, request: pytest.FixtureRequest, tmp_path: Path
    ) -> AsyncIterator[Connector]:
        path = tmp_path / "drop.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for f in sorted(SMALL.iterdir()):
                zf.write(f, f"export/{f.name}")
        c = OneRosterCsvConnector("csv", path if request.param == "zip" else SMALL, batch_size=4)
        yield c
        await c.aclose()


# --- helpers ---------------------------------------------------------------------------------


def small_drop(tmp_path: Path, **files: str) -> Path:
    """A copy of the hand-written drop with some files replaced (``roles_csv="..."``) or
    removed (``roles_csv=""``)."""
    folder = tmp_path / "small"
    shutil.copytree(SMALL, folder)
    for key, content in files.items():
        target = folder / key.replace("_csv", ".csv")
        if content:
            target.write_text(content, encoding="utf-8")
        else:
            target.unlink()
    return folder


def edit(folder: Path, name: str, old: str, new: str) -> None:
    path = folder / name
    text = path.read_text()
    assert old in text, (name, old)
    path.write_text(text.replace(old, new))


async def read(path: Path, mode: FetchMode = FetchMode.FULL) -> list[RosterRecord]:
    return await collect(OneRosterCsvConnector("csv", path), mode)


def persons(records: list[RosterRecord]) -> dict[str, RosterPerson]:
    return {r.sourced_id: r for r in records if isinstance(r, RosterPerson)}


def rejected(records: list[RosterRecord]) -> list[Rejected]:
    return [r for r in records if isinstance(r, Rejected)]


ROLES_HEADER = ",".join(ROLES)


def roles_file(*rows: str) -> str:
    return "\n".join([ROLES_HEADER, *rows, ""])


# --- bulk drops ------------------------------------------------------------------------------


async def test_people_take_their_roles_and_orgs_from_roles_csv() -> None:
    """Each person's role is their primary role (the one at primaryOrgSourcedId when several
    orgs each have one), the others are other_roles; orgs start with the primary org."""
    got = persons(await read(SMALL))
    expected = {p.sourced_id: p for p in small_roster().persons}
    assert set(got) == set(expected)
    for sid, person in got.items():
        assert replace(person, org_ids=(), other_roles=()) == replace(
            expected[sid], org_ids=(), other_roles=()
        )
    assert (got["t-2"].role, got["t-2"].other_roles) == ("teacher", ("counselor",))
    assert (got["t-3"].role, got["t-3"].other_roles) == ("teacher", ("districtadministrator",))
    assert got["t-3"].org_ids == ("sch-2", "org-d")
    assert got["s-1"].org_ids == ("sch-1",)


async def test_a_1_2_drop_gives_the_records_a_1_1_drop_of_the_same_roster_gives(
    tmp_path: Path,
) -> None:
    """The generated district written as 1.1 and as 1.2 reads back as the same records."""
    roster = generate_district(DistrictSpec(students=150, classes=15, teachers=8))
    write_oneroster_csv(roster, tmp_path / "v11")
    v12 = write_drop(roster, tmp_path / "v12")
    old, new = await read(tmp_path / "v11"), await read(v12)
    assert rejected(old) == rejected(new) == []
    for kind in (RosterOrg, RosterPerson, RosterClass, RosterEnrollment):
        assert {r for r in new if isinstance(r, kind)} == {r for r in old if isinstance(r, kind)}


async def test_academic_sessions_and_class_terms_are_kept() -> None:
    """academicSessions.csv is read onto the connector; each class keeps its termSourcedIds."""
    connector = OneRosterCsvConnector("csv", SMALL)
    got = await collect(connector)
    assert connector.academic_sessions["as-2026-s1"] == AcademicSession(
        "as-2026-s1",
        "Fall 2026",
        "semester",
        date(2026, 8, 24),
        date(2027, 1, 16),
        parent_id="as-2026",
        school_year="2027",
    )
    assert set(connector.academic_sessions) == {"as-2026", "as-2026-s1", "as-2026-s2"}
    terms = {r.sourced_id: r.term_ids for r in got if isinstance(r, RosterClass)}
    assert terms == {
        "c-1": ("as-2026-s1",),
        "c-2": ("as-2026-s1", "as-2026-s2"),
        "c-3": ("as-2026",),
    }
    assert connector.warnings == []


async def test_bad_academic_sessions_are_warnings_and_the_rest_is_read(tmp_path: Path) -> None:
    """A session without usable dates is a warning naming its line; no rule needs sessions
    yet, so nothing else changes."""
    folder = small_drop(tmp_path)
    edit(folder, "academicSessions.csv", "2027-01-19", "19/01/2027")
    connector = OneRosterCsvConnector("csv", folder)
    got = await collect(connector)
    assert set(connector.academic_sessions) == {"as-2026", "as-2026-s1"}
    assert connector.warnings == [
        "academicSessions.csv line 4: startDate '19/01/2027' is not a date (YYYY-MM-DD); "
        "the session is not read"
    ]
    assert rejected(got) == []


@pytest.mark.parametrize(
    ("content", "warning"),
    [
        (
            "sourcedId,title,type\nas-1,Fall,semester\n",
            "academicSessions.csv: missing required columns 'startDate', 'endDate'; "
            "no academic session is read",
        ),
        (
            "sourcedId,startDate,endDate\nas-1,2026-08-24,2027-01-16\nas-2,\xff\n",
            "academicSessions.csv line 3: cannot decode as utf-8-sig",
        ),
    ],
    ids=["missing columns", "undecodable"],
)
async def test_an_unreadable_academic_sessions_file_is_a_warning(
    tmp_path: Path, content: str, warning: str
) -> None:
    """academicSessions.csv that cannot be read costs its sessions (all of them), never the
    run: the people, classes and enrollments are read as usual."""
    folder = small_drop(tmp_path)
    (folder / "academicSessions.csv").write_bytes(content.encode("latin-1"))
    connector = OneRosterCsvConnector("csv", folder)
    got = await collect(connector)
    assert connector.academic_sessions == {}
    [said] = connector.warnings
    assert warning in said
    assert len(persons(got)) == 8 and rejected(got) == []


async def test_a_person_without_a_role_is_rejected(tmp_path: Path) -> None:
    """An active user with no row in roles.csv is rejected at their users.csv line."""
    folder = small_drop(tmp_path)
    edit(folder, "roles.csv", "r-s5,,,s-5,primary,student,,,sch-1,\n", "")
    got = await read(folder)
    assert rejected(got) == [
        Rejected("user", "s-5", "no role: roles.csv has no row for this user", "users.csv line 9")
    ]


async def test_an_unusable_role_row_rejects_its_person(tmp_path: Path) -> None:
    """A role row without a role, or with an unknown status, rejects the person it names (a
    rejected person keeps what the last run stored); one naming no user is rejected alone."""
    folder = small_drop(tmp_path)
    edit(folder, "roles.csv", "r-t2-c,,,t-2,secondary,counselor,", "r-t2-c,,,t-2,secondary,,")
    edit(folder, "roles.csv", "r-s1,,,s-1,", "r-s1,retired,,s-1,")
    edit(folder, "roles.csv", "r-s2,,,s-2,", "r-s2,,,,")
    got = await read(folder)
    assert sorted(rejected(got), key=lambda r: str(r.sourced_id)) == [
        Rejected("role", "r-s2", "missing userSourcedId", "roles.csv line 8"),
        Rejected("user", "s-1", "roles.csv line 7: unknown status 'retired'", "users.csv line 5"),
        # Its only role row named nobody.
        Rejected("user", "s-2", "no role: roles.csv has no row for this user", "users.csv line 6"),
        Rejected("user", "t-2", "roles.csv line 4: missing role", "users.csv line 3"),
    ]


async def test_a_malformed_role_row_rejects_its_person_not_just_the_role(tmp_path: Path) -> None:
    """A teacher whose secondary teacher role sits on a row broken as CSV (or with a field too
    many) is rejected, keeping what the last run stored, instead of being read as an aide
    only, which would cost them their account."""
    folder = small_drop(tmp_path)
    edit(folder, "roles.csv", "r-t2,,,t-2,primary,teacher,", "r-t2,,,t-2,primary,aide,")
    edit(
        folder,
        "roles.csv",
        "r-t2-c,,,t-2,secondary,counselor,,,sch-1,",
        'r-t2-c,,,t-2,secondary,"teach"er,,,sch-1,',
    )
    edit(
        folder,
        "roles.csv",
        "r-t3,,,t-3,primary,teacher,2026-08-24,,sch-2,",
        "r-t3,,,t-3,primary,teacher,2026-08-24,,sch-2,,extra",
    )
    got = await read(folder)
    assert {(r.entity, r.sourced_id, r.location) for r in rejected(got)} == {
        ("user", "t-2", "users.csv line 3"),
        ("user", "t-3", "users.csv line 4"),
    }
    reasons = {r.sourced_id: r.reason for r in rejected(got)}
    assert reasons["t-2"].startswith("roles.csv line 4: malformed CSV")
    assert reasons["t-3"] == "roles.csv line 6: expected 10 fields, found 11"


async def test_an_ended_role_is_not_a_role(tmp_path: Path) -> None:
    """A role row marked tobedeleted no longer counts."""
    folder = small_drop(tmp_path)
    edit(folder, "roles.csv", "r-t2-c,,", "r-t2-c,tobedeleted,2026-09-30T10:00:00Z")
    assert persons(await read(folder))["t-2"].other_roles == ()


async def test_an_unknown_role_type_is_read_as_secondary_with_a_warning(tmp_path: Path) -> None:
    """roleType is matched without case; an unknown one is a warning and the role secondary."""
    folder = small_drop(tmp_path)
    edit(folder, "roles.csv", "r-t1,,,t-1,primary,", "r-t1,,,t-1,PRIMARY,")
    edit(folder, "roles.csv", "r-t2-c,,,t-2,secondary,", "r-t2-c,,,t-2,other,")
    connector = OneRosterCsvConnector("csv", folder)
    got = persons(await collect(connector))
    assert got["t-1"].role == "teacher"
    assert (got["t-2"].role, got["t-2"].other_roles) == ("teacher", ("counselor",))
    assert connector.warnings == [
        "roles.csv line 4: roleType 'other' is neither primary nor secondary; read as secondary"
    ]


async def test_roles_of_users_not_in_users_csv_are_a_warning_in_a_bulk_drop(
    tmp_path: Path,
) -> None:
    """In a bulk drop, roles naming a user users.csv does not have name nobody: a warning."""
    folder = small_drop(tmp_path)
    edit(folder, "roles.csv", "r-s5,", "r-x,,,ghost,primary,teacher,,,sch-1,\nr-s5,")
    connector = OneRosterCsvConnector("csv", folder)
    got = await collect(connector)
    assert rejected(got) == []
    assert connector.warnings == [
        "roles.csv line 11: user 'ghost' has roles but no row in users.csv"
    ]


async def test_a_users_csv_keeping_the_1_1_role_column_needs_no_roles_csv(tmp_path: Path) -> None:
    """A 1.2 users.csv that still has 1.1's role and orgSourcedIds is read without roles.csv."""
    folder = small_drop(tmp_path, roles_csv="")
    edit(folder, "manifest.csv", "file.roles,bulk", "file.roles,absent")
    users = (folder / "users.csv").read_text().splitlines()
    rows = [users[0] + ",role,orgSourcedIds"]
    rows += [
        line + ("," + ("student" if line.startswith("s-") else "teacher")) + ',"sch-1,org-d"'
        for line in users[1:]
    ]
    (folder / "users.csv").write_text("\n".join(rows) + "\n")
    got = persons(await read(folder))
    assert {p.role for p in got.values()} == {"teacher", "student"}
    assert got["t-3"].org_ids == ("sch-2", "sch-1", "org-d")
    edit(
        folder,
        "users.csv",
        "Dent,,,s5@example.org,,,,10,,S0005,,,,,sch-1,,student,",
        "Dent,,,s5@example.org,,,,10,,S0005,,,,,sch-1,,,",
    )
    assert rejected(await read(folder)) == [
        Rejected(
            "user",
            "s-5",
            "no role: the role column is blank and the drop has no roles.csv",
            "users.csv line 9",
        )
    ]


async def test_a_bulk_users_csv_without_roles_is_refused(tmp_path: Path) -> None:
    """A 1.2 drop whose users.csv is bulk and which has no roles.csv would have nobody with a
    role: the run fails saying so."""
    folder = small_drop(tmp_path, roles_csv="")
    edit(folder, "manifest.csv", "file.roles,bulk", "file.roles,absent")
    with pytest.raises(
        FatalSourceError, match=r"users\.csv is bulk but the drop has no roles\.csv"
    ):
        await read(folder)


async def test_the_version_comes_from_the_manifest(tmp_path: Path) -> None:
    """`1.2.1` is read as 1.2; a 1.2 drop whose manifest says 1.1 fails on users.csv's missing
    role column, with a hint at the manifest."""
    folder = small_drop(tmp_path)
    edit(folder, "manifest.csv", "oneroster.version,1.2", "oneroster.version,1.2.1")
    assert len(persons(await read(folder))) == 8
    edit(folder, "manifest.csv", "oneroster.version,1.2.1", "oneroster.version,1.1")
    with pytest.raises(
        FatalSourceError,
        match=r"users\.csv: missing required column 'role' \(the drop has roles\.csv, as "
        r"OneRoster 1\.2 drops do, but manifest\.csv says oneroster\.version '1\.1'\)",
    ):
        await read(folder)


async def test_every_missing_column_of_every_file_is_reported_at_once(tmp_path: Path) -> None:
    """A drop in another format lists each file's missing columns, and a listed file that is
    missing, in one error: an admin fixes them in one go, not one per run."""
    folder = small_drop(tmp_path, enrollments_csv="")
    (folder / "users.csv").write_text("sourcedId,username,familyName\nu-1,u1,One\n")
    (folder / "classes.csv").write_text("sourcedId,name\nc-1,Algebra\n")
    with pytest.raises(FatalSourceError) as err:
        await read(folder)
    message = str(err.value)
    assert message.startswith(f"source 'csv': 3 problems in the drop: {folder}: manifest lists ")
    assert "manifest lists enrollments.csv as bulk but it is missing" in message
    assert f"{folder / 'users.csv'}: missing required columns 'givenName', 'email'" in message
    assert (
        f"{folder / 'classes.csv'}: missing required columns 'title', 'schoolSourcedId'" in message
    )


# --- delta drops -------------------------------------------------------------------------------

STAMP = datetime(2026, 10, 1, 8, 30, tzinfo=UTC)


def changes() -> MemoryRoster:
    """A day's changes to the small roster: a renamed teacher (with all her roles), a new
    student in Algebra I, Computing dropped, and a student gone."""
    base = {p.sourced_id: p for p in small_roster().persons}
    return MemoryRoster(
        persons=[
            replace(base["t-1"], family_name="King", date_last_modified=STAMP),
            RosterPerson(
                "s-6",
                "student",
                "Stu6",
                "Dent",
                "s6@example.org",
                "s6",
                org_ids=("sch-1",),
                date_last_modified=STAMP,
            ),
            replace(base["s-5"], status="tobedeleted", date_last_modified=STAMP),
        ],
        classes=[
            RosterClass("c-2", "Computing", "CS1", "sch-1", "tobedeleted", date_last_modified=STAMP)
        ],
        enrollments=[
            RosterEnrollment("e-s6c1", "c-1", "s-6", "student", date_last_modified=STAMP),
            RosterEnrollment(
                "e-s5c2", "c-2", "s-5", "student", "tobedeleted", date_last_modified=STAMP
            ),
        ],
    )


async def test_a_full_fetch_of_a_delta_drop_raises_changes_only(tmp_path: Path) -> None:
    """A delta drop holds changes only: a full fetch refuses it (the engine then runs delta)."""
    folder = write_drop(changes(), tmp_path / "delta", delta=True)
    with pytest.raises(
        ChangesOnlyError,
        match=r"a delta drop \(file\.roles, file\.orgs, file\.users, file\.classes and "
        r"file\.enrollments are delta\): it holds changes only",
    ):
        await read(folder)


async def test_a_delta_fetch_yields_the_changes_with_their_status(tmp_path: Path) -> None:
    """Each delta row arrives as written, tobedeleted rows included; nothing is rejected."""
    folder = write_drop(changes(), tmp_path / "delta", delta=True)
    connector = OneRosterCsvConnector("csv", folder)
    got = await collect(connector, FetchMode.DELTA)
    assert rejected(got) == []
    assert persons(got)["t-1"] == replace(changes().persons[0], org_ids=("sch-1",))
    assert persons(got)["s-5"].status == "tobedeleted"
    assert {(r.sourced_id, r.status) for r in got if isinstance(r, RosterEnrollment)} == {
        ("e-s6c1", "active"),
        ("e-s5c2", "tobedeleted"),
    }
    assert connector.warnings == []


async def test_a_tobedeleted_row_needs_only_its_sourced_id(tmp_path: Path) -> None:
    """Delta exports often send a deletion as little more than its id: it is accepted."""
    folder = write_drop(MemoryRoster(), tmp_path / "delta", delta=True)
    (folder / "enrollments.csv").write_text(
        "sourcedId,status,dateLastModified,classSourcedId,userSourcedId,role\n"
        "e-s5c2,tobedeleted,2026-10-01T08:30:00Z,,,\n"
    )
    (folder / "users.csv").write_text(
        ",".join(USERS) + "\n" + "s-5,tobedeleted,2026-10-01T08:30:00Z" + "," * 20 + "\n"
    )
    got = await read(folder, FetchMode.DELTA)
    assert rejected(got) == []
    assert [(r.sourced_id, r.status, r.role) for r in got if isinstance(r, RosterPerson)] == [
        ("s-5", "tobedeleted", "")
    ]
    [gone] = [r for r in got if isinstance(r, RosterEnrollment)]
    assert (gone.sourced_id, gone.status) == ("e-s5c2", "tobedeleted")


async def test_a_changed_user_needs_all_their_roles_in_a_delta_drop(tmp_path: Path) -> None:
    """Rostersync keeps no copy of earlier drops: a changed user whose roles the delta drop
    does not carry in full (none, or no primary one) is rejected rather than stored with the
    wrong roles; roles changed for a user the drop has no users.csv row for are rejected as
    not applied."""
    folder = write_drop(changes(), tmp_path / "delta", delta=True)
    stamp = "2026-10-01T08:30:00.000Z"
    (folder / "roles.csv").write_text(
        roles_file(
            f"r-t-1-0,active,{stamp},t-1,primary,teacher,,,sch-1,",
            f"r-s-6-x,active,{stamp},s-6,secondary,aide,,,sch-1,",
            f"r-t-2-c,tobedeleted,{stamp},t-2,secondary,counselor,,,sch-1,",
        )
    )
    got = await read(folder, FetchMode.DELTA)
    assert set(persons(got)) == {"t-1", "s-5"}  # s-5 is tobedeleted: no role needed
    assert sorted(rejected(got), key=lambda r: str(r.sourced_id)) == [
        Rejected(
            "user",
            "s-6",
            "no primary role in this delta drop: roles.csv carries only some of this user's "
            "roles, and a changed user needs all their roles in the same drop",
            "users.csv line 3",
        ),
        Rejected(
            "user",
            "t-2",
            "roles.csv changes this user's roles, but users.csv of this delta drop has no row "
            "for them: not applied (a drop with their users.csv row applies it)",
            "roles.csv line 4",
        ),
    ]
    (folder / "roles.csv").write_text(roles_file())
    got = await read(folder, FetchMode.DELTA)
    assert {r.sourced_id for r in rejected(got)} == {"t-1", "s-6"}
    assert all(r.reason.startswith("no role in this delta drop") for r in rejected(got))


async def test_a_drop_mixing_bulk_and_delta_files_is_a_delta_drop(tmp_path: Path) -> None:
    """One delta file makes a delta drop; its bulk files are applied as changes, with a
    warning that what they leave out is not removed."""
    folder = small_drop(tmp_path)
    edit(folder, "manifest.csv", "file.enrollments,bulk", "file.enrollments,delta")
    connector = OneRosterCsvConnector("csv", folder)
    with pytest.raises(ChangesOnlyError, match=r"file\.enrollments is delta"):
        await collect(connector)
    got = await collect(connector, FetchMode.DELTA)
    assert len(persons(got)) == 8
    assert connector.warnings == [
        "roles.csv, orgs.csv, users.csv, classes.csv are bulk in a delta drop: applied as "
        "changes, so records left out of them are not removed (a full run of a bulk drop "
        "removes them)"
    ]


async def test_live_resync_reads_a_1_2_drop_and_refuses_a_delta_drop(tmp_path: Path) -> None:
    """`resync --live` reads the teacher's roles from roles.csv; a delta drop cannot say which
    classes a teacher has now, so a live read of one fails instead of removing the rest."""
    live = await OneRosterCsvConnector("csv", SMALL).fetch_teacher(TeacherRef("t-2", None))
    assert live.teacher is not None and live.teacher.other_roles == ("counselor",)
    assert [c.sourced_id for c in live.classes] == ["c-2"]
    folder = write_drop(changes(), tmp_path / "delta", delta=True)
    with pytest.raises(
        FatalSourceError, match=r"a delta drop .* `resync --live` needs a bulk drop"
    ):
        await OneRosterCsvConnector("csv", folder).fetch_teacher(TeacherRef("t-1", None))


# --- hostile text: fuzzed ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_drop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz12") / "drop"
    shutil.copytree(SMALL, folder)
    return folder


@settings(max_examples=120, deadline=None)
@given(body=hostile_bytes, name=st.sampled_from(["roles.csv", "academicSessions.csv"]))
def test_hostile_roles_or_sessions_file_is_read_or_refused_never_crashes(
    fuzz_drop: Path, body: bytes, name: str
) -> None:
    """Any bytes after the header of roles.csv or academicSessions.csv give records (bad rows
    rejected or charged to their person), warnings, or a FatalSourceError naming the file;
    never another exception. Nobody is read with roles from a row that could not be read."""
    for pristine in ("roles.csv", "academicSessions.csv"):
        shutil.copy(SMALL / pristine, fuzz_drop / pristine)
    header = (SMALL / name).read_bytes().split(b"\n", 1)[0] + b"\n"
    (fuzz_drop / name).write_bytes(header + body)
    connector = OneRosterCsvConnector("csv", fuzz_drop)
    try:
        got = asyncio.run(collect(connector))
    except FatalSourceError as exc:
        assert name in str(exc)
        return
    for r in rejected(got):
        assert r.location is not None and r.location.split(" line ")[0] in (name, "users.csv")
    if name == "roles.csv":
        # Users the fuzzed file gives no (readable) role are rejected, never role-less.
        assert all(p.role for p in persons(got).values())
    else:
        assert len(persons(got)) == 8

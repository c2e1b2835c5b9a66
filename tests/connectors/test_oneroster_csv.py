from __future__ import annotations

import asyncio
import codecs
import csv
import io
import re
import zipfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from connectors.oneroster_csv import PLUGIN, CsvSourceConfig, OneRosterCsvConnector
from connectors.oneroster_csv import files as csv_files
from rostersync.config.models import Settings
from rostersync.errors import ChangesOnlyError, FatalSourceError
from rostersync.resync.queue import queue_resync
from rostersync.sampledata import (
    ENROLLMENTS_HEADER,
    USERS_HEADER,
    DistrictSpec,
    generate_district,
    write_oneroster_csv,
)
from rostersync.source.connector import ENTRY_POINT_GROUP, Connector, ConnectorContext, FetchMode
from rostersync.source.records import (
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterPerson,
    RosterRecord,
    TeacherRef,
)
from rostersync.source.rows import sort_batch
from rostersync.source.testdata import small_roster
from rostersync.source.testing import ConnectorContract, collect, people
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from tests.hostile import HUGE, hostile_bytes
from tests.sync.helpers import groups, user_id, users


class TestCsvConnector(ConnectorContract):
    @pytest.fixture(params=["folder", "zip"])
    async def connector(
        self, request: pytest.FixtureRequest, tmp_path: Path
    ) -> AsyncIterator[Connector]:
        zip_path = tmp_path / "drop.zip"
        write_oneroster_csv(small_roster(), tmp_path / "drop", zip_path=zip_path)
        path = zip_path if request.param == "zip" else tmp_path / "drop"
        c = OneRosterCsvConnector("csv", path, batch_size=4)
        yield c
        await c.aclose()


# --- helpers ---------------------------------------------------------------------------------


def drop(tmp_path: Path, **files: str | bytes) -> Path:
    """The small roster as a CSV folder, with some files replaced (``users_csv="..."``)."""
    folder = tmp_path / "drop"
    write_oneroster_csv(small_roster(), folder)
    for key, content in files.items():
        target = folder / key.replace("_csv", ".csv")
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
    return folder


def table(header: tuple[str, ...], *rows: dict[str, str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def user(sourced_id: str, **values: str) -> dict[str, str]:
    row = {
        "sourcedId": sourced_id,
        "enabledUser": "true",
        "orgSourcedIds": "sch-1",
        "role": "teacher",
        "givenName": "Given",
        "familyName": "Family",
        "email": f"{sourced_id}@example.org",
    }
    row.update(values)
    return row


def enrollment(sourced_id: str, **values: str) -> dict[str, str]:
    row = {
        "sourcedId": sourced_id,
        "classSourcedId": "c-1",
        "userSourcedId": "s-1",
        "role": "student",
        "primary": "false",
    }
    row.update(values)
    return row


async def fetch_all(path: Path, **options: int | str) -> list[RosterRecord]:
    connector = OneRosterCsvConnector("csv", path, **options)  # type: ignore[arg-type]
    return await collect(connector)


def rejected(records: list[RosterRecord]) -> list[Rejected]:
    return [r for r in records if isinstance(r, Rejected)]


def person(records: list[RosterRecord], sourced_id: str) -> RosterPerson:
    return next(r for r in records if isinstance(r, RosterPerson) and r.sourced_id == sourced_id)


# --- per-row rejections ----------------------------------------------------------------------

BAD_USERS = {
    "missing sourcedId": (user(""), None, "missing sourcedId"),
    "unknown status": (user("u-9", status="archived"), "u-9", "unknown status 'archived'"),
    "bad boolean": (user("u-9", enabledUser="yes"), "u-9", "enabledUser 'yes' is not true"),
    "empty role": (user("u-9", role=""), "u-9", "missing role"),
}


@pytest.mark.parametrize("case", list(BAD_USERS), ids=list(BAD_USERS))
async def test_bad_user_row_is_rejected_with_file_and_line(tmp_path: Path, case: str) -> None:
    """A bad users.csv row becomes a Rejected naming users.csv and its line; neighbours load."""
    bad, sourced_id, reason = BAD_USERS[case]
    path = drop(tmp_path, users_csv=table(USERS_HEADER, user("u-1"), bad, user("u-2")))
    got = await fetch_all(path)
    [rej] = rejected(got)
    assert (rej.entity, rej.sourced_id, rej.location) == ("user", sourced_id, "users.csv line 3")
    assert reason in rej.reason
    assert {"u-1", "u-2"} <= {r.sourced_id for r in got if isinstance(r, RosterPerson)}


async def test_malformed_date_is_a_warning_and_the_row_is_read(tmp_path: Path) -> None:
    """A dateLastModified that is not ISO 8601 is a warning naming file and line; the person is
    read without the date, the others with theirs."""
    rows = (user("u-1", dateLastModified="1/05/2023"), user("u-2", dateLastModified="2023-01-05"))
    connector = OneRosterCsvConnector("csv", drop(tmp_path, users_csv=table(USERS_HEADER, *rows)))
    got = await collect(connector)
    assert rejected(got) == []
    assert person(got, "u-1").date_last_modified is None
    assert person(got, "u-2").date_last_modified == datetime(2023, 1, 5, tzinfo=UTC)
    assert connector.warnings == [
        "users.csv line 2: dateLastModified '1/05/2023' is not an ISO 8601 date-time; "
        "the row was read without it"
    ]


async def test_a_date_no_row_holds_is_a_warning_and_the_row_is_read(tmp_path: Path) -> None:
    """Year 1 ahead of UTC is before the first instant a row holds: converting it raised
    OverflowError when the run staged the row, which failed the run."""
    rows = (user("u-1", dateLastModified="0001-01-01T00:00:00+05:00"),)
    connector = OneRosterCsvConnector("csv", drop(tmp_path, users_csv=table(USERS_HEADER, *rows)))
    got = await collect(connector)
    assert person(got, "u-1").date_last_modified is None
    sort_batch(got)  # the rows a run stages
    assert connector.warnings == [
        "users.csv line 2: dateLastModified '0001-01-01T00:00:00+05:00' is not an ISO 8601 "
        "date-time; the row was read without it"
    ]


async def test_a_warning_quotes_a_long_value_cut_short(tmp_path: Path) -> None:
    """A 100,000-character date is named by its start and length, not copied whole."""
    path = drop(
        tmp_path, users_csv=table(USERS_HEADER, user("u-1", dateLastModified="9" * 100_000))
    )
    connector = OneRosterCsvConnector("csv", path)
    await collect(connector)
    assert connector.warnings == [
        f"users.csv line 2: dateLastModified {'9' * 60!r}... (100000 characters) is not an "
        "ISO 8601 date-time; the row was read without it"
    ]


async def test_warnings_of_one_kind_are_listed_up_to_a_limit_then_counted(tmp_path: Path) -> None:
    """A bad date on every row lists the first 20 rows and counts the rest in one line; each
    fetch starts its warnings afresh."""
    rows = [user(f"u-{i}", dateLastModified="yesterday") for i in range(25)]
    bad_class = "c-1,,05/01/2023,Algebra I,,,ALG1,scheduled,,sch-1,,,,\n"
    classes = Path(drop(tmp_path)) / "classes.csv"
    classes_text = classes.read_text().splitlines(keepends=True)[0] + bad_class
    folder = drop(tmp_path, users_csv=table(USERS_HEADER, *rows), classes_csv=classes_text)
    connector = OneRosterCsvConnector("csv", folder)
    await collect(connector)
    listed = [w for w in connector.warnings if w.startswith("users.csv line ")]
    assert [w.split(":")[0] for w in listed] == [f"users.csv line {n}" for n in range(2, 22)]
    assert "users.csv: rows read without their dateLastModified: 5 more not listed (25 in all)" in (
        connector.warnings
    )
    assert any(
        w.startswith("classes.csv line 2: dateLastModified '05/01/2023'")
        for w in connector.warnings
    )
    (folder / "users.csv").write_text(table(USERS_HEADER, user("u-1")))
    (folder / "classes.csv").write_text(classes_text.replace("05/01/2023", ""))
    await collect(connector)
    assert connector.warnings == []


BAD_ENROLLMENTS = {
    "missing class": (enrollment("e-9", classSourcedId=""), "missing classSourcedId"),
    "missing user": (enrollment("e-9", userSourcedId=""), "missing userSourcedId"),
    "bad primary": (enrollment("e-9", primary="yes"), "primary 'yes' is not true or false"),
    "empty role": (enrollment("e-9", role=""), "missing role"),
}


@pytest.mark.parametrize("case", list(BAD_ENROLLMENTS), ids=list(BAD_ENROLLMENTS))
async def test_bad_enrollment_row_is_rejected_with_file_and_line(tmp_path: Path, case: str) -> None:
    """A bad enrollments.csv row becomes a Rejected naming enrollments.csv and its line."""
    bad, reason = BAD_ENROLLMENTS[case]
    text = table(ENROLLMENTS_HEADER, enrollment("e-1"), enrollment("e-2", userSourcedId="s-2"), bad)
    got = await fetch_all(drop(tmp_path, enrollments_csv=text))
    [rej] = rejected(got)
    assert (rej.entity, rej.sourced_id, rej.location) == (
        "enrollment",
        "e-9",
        "enrollments.csv line 4",
    )
    assert reason in rej.reason
    assert {r.sourced_id for r in got if isinstance(r, RosterEnrollment)} == {"e-1", "e-2"}


async def test_row_with_wrong_number_of_fields_is_rejected(tmp_path: Path) -> None:
    """A row with too few or too many fields is rejected with its line; the file goes on."""
    good = table(USERS_HEADER, user("u-1"))
    text = (
        good
        + "u-short,,,true\n"
        + good.splitlines()[1]
        + ",extra\n"
        + table(USERS_HEADER, user("u-3")).splitlines()[1]
        + "\n"
    )
    got = await fetch_all(drop(tmp_path, users_csv=text))
    assert [(r.sourced_id, r.location) for r in rejected(got)] == [
        ("u-short", "users.csv line 3"),
        ("u-1", "users.csv line 4"),
    ]
    assert all("expected 18 fields" in r.reason for r in rejected(got))
    assert "u-3" in {r.sourced_id for r in got if isinstance(r, RosterPerson)}


async def test_stray_quote_rejects_only_its_row(tmp_path: Path) -> None:
    """A quote in the middle of a field rejects that row as malformed CSV; later rows load."""
    rows = table(USERS_HEADER, user("u-1"), user("u-3")).splitlines()
    text = "\n".join([rows[0], 'u-2,,,true,sch-1,teacher,"ab"c' + ",x" * 11, rows[2], ""])
    got = await fetch_all(drop(tmp_path, users_csv=text))
    [rej] = rejected(got)
    assert (rej.location, rej.reason.startswith("malformed CSV")) == ("users.csv line 2", True)
    assert "u-3" in {r.sourced_id for r in got if isinstance(r, RosterPerson)}


async def test_stray_quote_in_header_is_fatal_naming_file_and_line(tmp_path: Path) -> None:
    """A header with text after a closing quote makes the file unreadable: users.csv line 1."""
    rows = table(USERS_HEADER, user("u-1")).splitlines()
    text = "\n".join(['"sourcedId"x' + rows[0].removeprefix("sourcedId"), rows[1], ""])
    with pytest.raises(
        FatalSourceError,
        match=r"users\.csv line 1: unreadable header \(malformed CSV: ',' expected after '\"': text follows",
    ):
        await fetch_all(drop(tmp_path, users_csv=text))


async def test_huge_header_field_is_fatal(tmp_path: Path) -> None:
    """A header cell over the csv field limit is an unreadable header, not a crash."""
    text = '"' + "h" * 140_000 + '",' + ",".join(USERS_HEADER) + "\n"
    with pytest.raises(
        FatalSourceError,
        match=r"users\.csv line 1: unreadable header \(a field is longer than 131072",
    ):
        await fetch_all(drop(tmp_path, users_csv=text))


async def test_well_quoted_huge_field_rejects_only_its_row(tmp_path: Path) -> None:
    """A quoted 200 KiB field rejects its own row, with its line; the rows after it load."""
    text = table(
        USERS_HEADER, user("u-1"), user("u-2", givenName="x" * 200_000), user("u-3"), user("u-4")
    )
    got = await fetch_all(drop(tmp_path, users_csv=text))
    [rej] = rejected(got)
    assert (rej.entity, rej.location) == ("user", "users.csv line 3")
    assert rej.reason == "a field is longer than 131072 characters"
    assert {"u-1", "u-3", "u-4"} <= {r.sourced_id for r in got if isinstance(r, RosterPerson)}


async def test_huge_field_running_past_its_line_is_fatal(tmp_path: Path) -> None:
    """A huge quoted field that goes on over a line break hides where its row ends: fatal."""
    big = user("u-2", givenName="x" * 200_000 + "\nmore")
    text = table(USERS_HEADER, user("u-1"), big, user("u-3"))
    with pytest.raises(FatalSourceError, match=r"users\.csv line 3: a field is longer than"):
        await fetch_all(drop(tmp_path, users_csv=text))


async def test_quote_left_open_until_a_later_quote_is_fatal(tmp_path: Path) -> None:
    """An unclosed quote that a later row's quote "closes" would swallow the rows in between:
    the file is unreadable from the line the quote opened on, instead of losing them quietly."""
    rows = table(USERS_HEADER, user("u-1"), user("u-3"), user("u-4")).splitlines()
    quoted = table(USERS_HEADER, user("u-5", givenName="Smith, J")).splitlines()[1]
    text = "\n".join(
        [
            rows[0],
            rows[1],
            'u-2,,,true,sch-1,teacher,"oops' + ",x" * 11,
            rows[2],
            rows[3],
            quoted,
            "",
        ]
    )
    with pytest.raises(
        FatalSourceError,
        match=r"users\.csv line 3: malformed CSV: .* \(on line 6\), in a quoted field that runs over lines 3-6",
    ):
        await fetch_all(drop(tmp_path, users_csv=text))


async def test_nul_character_rejects_its_row(tmp_path: Path) -> None:
    """A NUL in a field (no roster value has one; PostgreSQL cannot store it) rejects the row."""
    text = table(USERS_HEADER, user("u-1"), user("u-2", familyName="Nu\x00ll"), user("u-3"))
    got = await fetch_all(drop(tmp_path, users_csv=text))
    [rej] = rejected(got)
    assert (rej.sourced_id, rej.reason, rej.location) == (
        "u-2",
        "a field contains a NUL character",
        "users.csv line 3",
    )
    assert {"u-1", "u-3"} <= {r.sourced_id for r in got if isinstance(r, RosterPerson)}


async def test_lone_carriage_return_rejects_its_row(tmp_path: Path) -> None:
    """A CR inside an unquoted field rejects that row alone, said in plain words."""
    rows = table(USERS_HEADER, user("u-1"), user("u-2"), user("u-3")).splitlines()
    text = "\n".join([rows[0], rows[1], rows[2].replace("Given", "Gi\rven"), rows[3], ""])
    got = await fetch_all(drop(tmp_path, users_csv=text))
    [rej] = rejected(got)
    assert (rej.reason, rej.location) == (
        "a carriage return (CR) inside an unquoted field",
        "users.csv line 3",
    )
    assert {"u-1", "u-3"} <= {r.sourced_id for r in got if isinstance(r, RosterPerson)}


async def test_a_drop_with_classic_mac_line_ends_is_read_line_by_line(tmp_path: Path) -> None:
    """Files whose lines end with a lone CR ("CSV (Macintosh)" from Excel for Mac) are read
    as lines, a bad row named by its line, instead of failing on an unreadable header."""
    folder = drop(tmp_path)
    users_csv = table(USERS_HEADER, user("u-1"), user("u-2", status="archived"), user("u-3"))
    (folder / "users.csv").write_text(users_csv)
    for path in folder.glob("*.csv"):
        path.write_bytes(path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r"))
    got = await fetch_all(folder)
    assert {"u-1", "u-3"} <= {r.sourced_id for r in got if isinstance(r, RosterPerson)}
    [bad] = rejected(got)
    assert (bad.sourced_id, bad.location) == ("u-2", "users.csv line 3")
    assert len(got) == len(await fetch_all(drop(tmp_path / "lf", users_csv=users_csv)))


async def test_bom_in_header_without_utf8_sig_is_ignored(tmp_path: Path) -> None:
    """With `encoding: utf-8` a BOM stays in the text; it is still no part of the first name."""
    text = "\ufeff" + table(USERS_HEADER, user("u-1"))
    got = await fetch_all(drop(tmp_path, users_csv=text), encoding="utf-8")
    assert person(got, "u-1").email == "u-1@example.org"


async def test_org_without_name_and_class_without_title_are_rejected(tmp_path: Path) -> None:
    """An org with no name and a class with no title are rejected, each at its own line."""
    path = drop(
        tmp_path,
        orgs_csv="sourcedId,status,dateLastModified,name,type,identifier,parentSourcedId\n"
        "org-d,,,District,district,,\nsch-x,,,,school,,org-d\n",
        classes_csv="sourcedId,title,schoolSourcedId\nc-1,Algebra I,sch-1\nc-x,,sch-1\n",
    )
    got = await fetch_all(path)
    assert {(r.entity, r.sourced_id, r.reason, r.location) for r in rejected(got)} == {
        ("org", "sch-x", "missing name", "orgs.csv line 3"),
        ("class", "c-x", "missing title", "classes.csv line 3"),
    }


async def test_quoted_comma_and_newline_keep_physical_line_numbers(tmp_path: Path) -> None:
    """A quoted field holding a comma and a newline is one value; later rows keep true lines."""
    text = table(
        USERS_HEADER,
        user("u-1", givenName="Ann, Marie\nSecond line", orgSourcedIds="sch-1,sch-2"),
        user("u-2", status="bogus"),
    )
    got = await fetch_all(drop(tmp_path, users_csv=text))
    ann = person(got, "u-1")
    assert ann.given_name == "Ann, Marie\nSecond line"
    assert ann.org_ids == ("sch-1", "sch-2")
    [rej] = rejected(got)
    assert rej.location == "users.csv line 4"


async def test_multi_line_row_is_located_at_its_first_line(tmp_path: Path) -> None:
    """A rejected row that spans lines is reported at the line it starts on."""
    text = table(USERS_HEADER, user("u-1"), user("u-2", givenName="two\nlines", status="bogus"))
    got = await fetch_all(drop(tmp_path, users_csv=text))
    assert [r.location for r in rejected(got)] == ["users.csv line 3"]


# --- value mapping ---------------------------------------------------------------------------


async def test_status_mapping(tmp_path: Path) -> None:
    """Blank/active map to active; tobedeleted and 1.0's inactive map to tobedeleted."""
    text = table(
        USERS_HEADER,
        user("u-blank"),
        user("u-active", status="active"),
        user("u-gone", status="tobedeleted"),
        user("u-inactive", status="inactive"),
        user("u-caps", status="TOBEDELETED"),
    )
    got = await fetch_all(drop(tmp_path, users_csv=text))
    statuses = {r.sourced_id: r.status for r in got if isinstance(r, RosterPerson)}
    assert {k: v for k, v in statuses.items() if k.startswith("u-")} == {
        "u-blank": "active",
        "u-active": "active",
        "u-gone": "tobedeleted",
        "u-inactive": "tobedeleted",
        "u-caps": "tobedeleted",
    }


async def test_booleans_written_as_1_and_0_are_read(tmp_path: Path) -> None:
    """An exporter writing enabledUser and primary as 1/0 (or TRUE) has its rows read, as
    the REST connector reads them, instead of every user and enrollment rejected."""
    users_csv = table(
        USERS_HEADER,
        user("u-1", enabledUser="1"),
        user("u-2", enabledUser="0"),
        user("u-3", enabledUser="TRUE"),
    )
    enrollments_csv = table(
        ENROLLMENTS_HEADER,
        enrollment("e-1", userSourcedId="u-1", role="teacher", primary="1"),
        enrollment("e-2", userSourcedId="u-2", primary="0"),
    )
    got = await fetch_all(drop(tmp_path, users_csv=users_csv, enrollments_csv=enrollments_csv))
    assert rejected(got) == []
    assert [person(got, f"u-{n}").enabled for n in (1, 2, 3)] == [True, False, True]
    primary = {r.sourced_id: r.primary for r in got if isinstance(r, RosterEnrollment)}
    assert primary == {"e-1": True, "e-2": False}


async def test_user_field_defaults_and_email_case(tmp_path: Path) -> None:
    """enabledUser blank is true, blank email is None, email case is kept, dates are aware UTC."""
    text = table(
        USERS_HEADER,
        user("u-1", enabledUser="", email="", dateLastModified="2026-03-04T05:06:07Z"),
        user("u-2", enabledUser="FALSE", email="Mixed.Case@Example.org", role="Teacher"),
        user("u-3", dateLastModified="2026-03-04T05:06:07"),
    )
    got = await fetch_all(drop(tmp_path, users_csv=text))
    u1, u2, u3 = (person(got, f"u-{n}") for n in (1, 2, 3))
    assert (u1.enabled, u1.email) == (True, None)
    assert u1.date_last_modified == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert (u2.enabled, u2.email, u2.role) == (False, "Mixed.Case@Example.org", "teacher")
    assert u3.date_last_modified == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


async def test_header_with_bom_spaces_and_extra_columns_is_accepted(tmp_path: Path) -> None:
    """A UTF-8 BOM, spaces around header names and unknown columns do not matter."""
    text = "\ufeff sourcedId , role ,givenName,familyName, email ,vendorExtra\n"
    text += "u-1,teacher,Zoë,Ng,zoe@example.org,whatever\n"
    got = await fetch_all(drop(tmp_path, users_csv=text))
    u1 = person(got, "u-1")
    assert (u1.role, u1.given_name, u1.email, u1.enabled) == (
        "teacher",
        "Zoë",
        "zoe@example.org",
        True,
    )
    assert rejected(got) == []


async def test_records_arrive_in_batches_of_batch_size(tmp_path: Path) -> None:
    """Batches hold at most batch_size records and together hold every record."""
    connector = OneRosterCsvConnector("csv", drop(tmp_path), batch_size=5)
    sizes = [len(batch) async for batch in connector.fetch(FetchMode.FULL, None)]
    roster = small_roster()
    assert sum(sizes) == len(roster.records())
    assert max(sizes) == 5
    assert all(size == 5 for size in sizes[:-1])


# --- whole-file failures ---------------------------------------------------------------------


async def test_missing_required_column_is_fatal(tmp_path: Path) -> None:
    """A file without a required column stops the run, naming the file and the column."""
    text = "sourcedId,givenName,familyName,email\nu-1,A,B,a@example.org\n"
    with pytest.raises(FatalSourceError, match=r"users\.csv: missing required column 'role'"):
        await fetch_all(drop(tmp_path, users_csv=text))


async def test_a_file_saved_with_semicolons_says_its_header_is_one_column(tmp_path: Path) -> None:
    """A spreadsheet's "CSV" in many locales is ;-separated: the missing columns come with
    why they are missing; a header of several columns gets no such hint."""
    text = "sourcedId;role;givenName;familyName;email\nu-1;teacher;A;B;a@example.org\n"
    with pytest.raises(FatalSourceError) as raised:
        await fetch_all(drop(tmp_path, users_csv=text))
    assert str(raised.value).endswith(
        "users.csv: missing required columns 'sourcedId', 'role', 'givenName', 'familyName', "
        "'email' (the header row is one column holding ';': columns are separated by ',')"
    )
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(FatalSourceError) as raised:
        await fetch_all(drop(other, users_csv="sourcedId;x,givenName\nu-1,A\n"))
    assert "header row" not in str(raised.value)


async def test_header_names_are_case_sensitive(tmp_path: Path) -> None:
    """Header names must be spelled as in OneRoster 1.1: `SourcedID` is not `sourcedId`."""
    text = "SourcedID,role,givenName,familyName,email\nu-1,teacher,A,B,a@example.org\n"
    with pytest.raises(FatalSourceError, match="'sourcedId'"):
        await fetch_all(drop(tmp_path, users_csv=text))


async def test_a_column_named_twice_in_a_header_is_fatal_naming_file_and_columns(
    tmp_path: Path,
) -> None:
    """Two `email` columns (an export appending its own): which one is the person's identity
    cannot be told, so the run stops naming the file, the column and both positions."""
    text = "sourcedId,role,givenName,familyName,email,email\n"
    text += "u-1,teacher,A,B,,a@example.org\n"
    with pytest.raises(FatalSourceError) as raised:
        await fetch_all(drop(tmp_path, users_csv=text))
    assert str(raised.value).endswith(
        "users.csv: the header names 'email' 2 times (columns 5 and 6): which one holds the "
        "value cannot be told"
    )


async def test_a_column_not_read_may_be_named_twice(tmp_path: Path) -> None:
    """A vendor's extra column named twice harms nothing: the rows are read."""
    text = "sourcedId,role,givenName,familyName,email,sms,sms\n"
    text += "u-1,teacher,A,B,a@example.org,1,2\n"
    got = await fetch_all(drop(tmp_path, users_csv=text))
    assert person(got, "u-1").email == "a@example.org"
    assert rejected(got) == []


class _RewrittenMidRead(OneRosterCsvConnector):
    """Reads a folder drop while its exporter rewrites users.csv (cut to one row) after the
    first batch: an upload in progress."""

    async def fetch(
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord]]:
        rewritten = False
        async for batch in super().fetch(mode, since):
            yield batch
            if not rewritten:
                users_csv = self.path / "users.csv"
                users_csv.write_text("".join(users_csv.read_text().splitlines(True)[:2]))
                rewritten = True


async def test_a_folder_drop_rewritten_while_read_fails_naming_the_file(tmp_path: Path) -> None:
    """A file that changes while the drop is read fails the fetch once everything was read,
    naming the file and both sizes."""
    folder = drop(tmp_path)
    size = (folder / "users.csv").stat().st_size
    with pytest.raises(FatalSourceError) as raised:
        await collect(_RewrittenMidRead("csv", folder, batch_size=1))
    shrunk = (folder / "users.csv").stat().st_size
    assert str(raised.value).endswith(
        f"users.csv: changed while the drop was read ({size} bytes when first opened, {shrunk} "
        "now): is an upload still in progress? Nothing of this read is applied; the next run "
        "reads the drop again"
    )
    assert len(await collect(OneRosterCsvConnector("csv", folder))) > 0  # read as it is now


async def test_a_sync_of_a_drop_rewritten_while_read_changes_nothing(
    tmp_path: Path, store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The run fails, and no teacher the half-written users.csv leaves out is archived."""
    folder = drop(tmp_path)
    settings = make_settings(memory_sources=("csv",))
    first = SyncEngine(settings, store, connectors={"csv": OneRosterCsvConnector("csv", folder)})
    await first.sync("csv")
    await first.drain()
    before = users(store), groups(store)
    connector = _RewrittenMidRead("csv", folder, batch_size=1)
    second = await SyncEngine(settings, store, connectors={"csv": connector}).sync("csv")
    assert second.status == "failed"
    assert "changed while the drop was read" in (second.error or "")
    assert (users(store), groups(store)) == before


@pytest.mark.parametrize(
    ("step", "said"), [("is_dir", "cannot read"), ("iterdir", "cannot list the folder")]
)
async def test_a_folder_that_cannot_be_listed_is_fatal_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, said: str
) -> None:
    """A drop folder whose permissions changed since `config check` (or a stale network
    mount) fails the run naming the folder, not with a traceback."""
    folder = drop(tmp_path)

    def refused(self: Path) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, step, refused)
    with pytest.raises(FatalSourceError) as raised:
        await fetch_all(folder)
    assert str(raised.value).endswith(f"{folder}: {said} (Permission denied)")


async def test_missing_manifest_is_fatal(tmp_path: Path) -> None:
    """A drop without manifest.csv fails, naming the path."""
    folder = drop(tmp_path)
    (folder / "manifest.csv").unlink()
    with pytest.raises(FatalSourceError, match=rf"{folder}: manifest\.csv not found"):
        await fetch_all(folder)


async def test_missing_folder_or_zip_is_fatal(tmp_path: Path) -> None:
    """A path that does not exist fails, naming it."""
    for missing in (tmp_path / "nowhere", tmp_path / "nowhere.zip"):
        with pytest.raises(FatalSourceError, match=str(missing)):
            await fetch_all(missing)


async def test_bulk_file_listed_but_missing_is_fatal(tmp_path: Path) -> None:
    """A file the manifest lists as bulk must exist."""
    folder = drop(tmp_path)
    (folder / "enrollments.csv").unlink()
    with pytest.raises(FatalSourceError, match=r"enrollments\.csv as bulk but it is missing"):
        await fetch_all(folder)


async def test_absent_file_in_manifest_is_skipped(tmp_path: Path) -> None:
    """A file marked absent is not read even if present."""
    folder = drop(tmp_path)
    manifest = (folder / "manifest.csv").read_text().replace("file.orgs,bulk", "file.orgs,absent")
    (folder / "manifest.csv").write_text(manifest)
    got = await fetch_all(folder)
    assert not [r for r in got if r.entity == "org"]
    assert any(isinstance(r, RosterPerson) for r in got)


@pytest.mark.parametrize("how", ["absent", "left out"])
@pytest.mark.parametrize("name", ["users", "classes", "enrollments"])
async def test_a_full_fetch_of_a_drop_without_users_classes_or_enrollments_is_changes_only(
    tmp_path: Path, name: str, how: str
) -> None:
    """A bulk drop whose manifest says users.csv is absent (or that lacks it) says nothing of
    users: a full fetch is refused as changes only, a delta fetch reads the rest, and a live
    read refuses the drop."""
    folder = drop(tmp_path)
    if how == "absent":
        manifest = (folder / "manifest.csv").read_text()
        (folder / "manifest.csv").write_text(
            manifest.replace(f"file.{name},bulk", f"file.{name},absent")
        )
    else:
        manifest = (folder / "manifest.csv").read_text()
        (folder / "manifest.csv").write_text(manifest.replace(f"file.{name},bulk\n", ""))
        (folder / f"{name}.csv").unlink()
    connector = OneRosterCsvConnector("csv", folder)
    with pytest.raises(ChangesOnlyError) as raised:
        await collect(connector)
    assert str(raised.value).endswith(
        f"manifest.csv: a drop in part ({name}.csv is absent): it says nothing of those "
        "records, and a full run would remove every one of them"
    )
    got = await collect(connector, FetchMode.DELTA)
    entity = {"users": "user", "classes": "class", "enrollments": "enrollment"}[name]
    assert got
    assert not [r for r in got if r.entity == entity]
    with pytest.raises(FatalSourceError, match=r"a drop in part .* `resync --live` needs a bulk"):
        await connector.fetch_teacher(TeacherRef("t-1", None))


async def test_a_sync_of_a_drop_without_users_removes_no_one(
    tmp_path: Path, store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A bulk drop sent without its users.csv (file.users,absent) after a full one: the run
    is a delta run that says why, and no account is archived nor group removed."""
    folder = drop(tmp_path)
    settings = make_settings(memory_sources=("csv",))
    engine = SyncEngine(settings, store, connectors={"csv": OneRosterCsvConnector("csv", folder)})
    first = await engine.sync("csv")
    await engine.drain()
    assert first.status == "succeeded"
    before_users, before_groups = users(store), groups(store)
    manifest = (folder / "manifest.csv").read_text()
    (folder / "manifest.csv").write_text(manifest.replace("file.users,bulk", "file.users,absent"))
    second = await engine.sync("csv")
    await engine.drain()
    assert (second.status, second.mode) == ("succeeded", "delta")
    assert second.counts["users_archived"] == second.counts["groups_removed"] == 0
    assert any(
        "users.csv is absent" in w and "ran a delta run instead" in w for w in second.warnings
    )
    assert (users(store), groups(store)) == (before_users, before_groups)


def _manifest_edited(tmp_path: Path, old: str, new: str) -> Path:
    folder = drop(tmp_path)
    manifest = (folder / "manifest.csv").read_text()
    assert old in manifest
    (folder / "manifest.csv").write_text(manifest.replace(old, new))
    return folder


async def test_a_manifest_row_that_cannot_be_read_is_fatal(tmp_path: Path) -> None:
    """`file.users,delta,` (a stray comma) was skipped, and users.csv then read as bulk: a full
    run would have removed everyone the delta file leaves out. The manifest is read whole."""
    folder = _manifest_edited(tmp_path, "file.users,bulk", "file.users,delta,")
    with pytest.raises(FatalSourceError) as raised:
        await fetch_all(folder)
    assert not isinstance(raised.value, ChangesOnlyError)
    assert str(raised.value).endswith(
        "manifest.csv line 16: expected 2 fields, found 3 (the manifest must be read whole: it "
        "says which files are bulk, delta or absent)"
    )


async def test_a_manifest_property_given_twice_with_two_values_is_fatal(tmp_path: Path) -> None:
    """Which of `file.users,bulk` and `file.users,delta` holds cannot be told."""
    folder = drop(tmp_path)
    with (folder / "manifest.csv").open("a") as manifest:
        manifest.write("file.users,delta\n")
    with pytest.raises(FatalSourceError) as raised:
        await fetch_all(folder)
    assert str(raised.value).endswith(
        "manifest.csv: lines 16 and 19 give file.users two values ('bulk', 'delta')"
    )


async def test_manifest_property_names_match_in_any_case(tmp_path: Path) -> None:
    """`File.Users,Delta` says users.csv is a delta file: a full fetch is refused as changes
    only, not read as a bulk drop."""
    folder = _manifest_edited(tmp_path, "file.users,bulk", "File.Users,Delta")
    with pytest.raises(ChangesOnlyError, match=r"file\.users is delta"):
        await fetch_all(folder)


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
async def test_a_patch_version_of_1_1_reads_a_1_1_drop(tmp_path: Path, version: str) -> None:
    """`oneroster.version,1.1.0` is OneRoster 1.1, as `1.2.0` is 1.2."""
    folder = _manifest_edited(tmp_path, "oneroster.version,1.1", f"oneroster.version,{version}")
    assert people(await fetch_all(folder)) == people(await fetch_all(drop(tmp_path / "plain")))


async def test_unknown_oneroster_version_is_refused(tmp_path: Path) -> None:
    """A manifest naming a OneRoster version rostersync does not know is refused, not misread."""
    folder = drop(tmp_path)
    manifest = (
        (folder / "manifest.csv")
        .read_text()
        .replace("oneroster.version,1.1", "oneroster.version,2.0")
    )
    (folder / "manifest.csv").write_text(manifest)
    with pytest.raises(FatalSourceError, match=r"oneroster\.version '2\.0' is not supported"):
        await fetch_all(folder)


async def test_undecodable_bytes_half_way_fail_after_earlier_records(tmp_path: Path) -> None:
    """Bad bytes on line 4 fail the run naming file and line; rows before them were yielded."""
    good = table(USERS_HEADER, user("u-1"), user("u-2")).encode()
    bad = table(USERS_HEADER, user("u-bad", givenName="X")).encode().splitlines()[1]
    content = good + bad.replace(b"X", b"\xff\xfe") + b"\n" + b"u-4" + b",x" * 17 + b"\n"
    connector = OneRosterCsvConnector("csv", drop(tmp_path, users_csv=content), batch_size=1)
    seen: list[RosterRecord] = []
    with pytest.raises(FatalSourceError, match=r"users\.csv line 4: cannot decode as utf-8-sig"):
        async for batch in connector.fetch(FetchMode.FULL, None):
            seen.extend(batch)
    assert {"u-1", "u-2"} <= {r.sourced_id for r in seen if isinstance(r, RosterPerson)}


async def test_unterminated_quote_is_fatal(tmp_path: Path) -> None:
    """An unclosed quote would swallow the rest of the file: the run fails at its line."""
    text = (
        table(USERS_HEADER, user("u-1"))
        + 'u-2,,,true,sch-1,teacher,"oops\n'
        + table(USERS_HEADER, user("u-3")).splitlines()[1]
        + "\n"
    )
    with pytest.raises(FatalSourceError, match=r"users\.csv line 3: unterminated quoted field"):
        await fetch_all(drop(tmp_path, users_csv=text))


async def test_corrupt_zip_member_is_fatal(tmp_path: Path) -> None:
    """A zip member whose compressed bytes are damaged fails the run naming the member."""
    roster = generate_district(DistrictSpec(students=300, classes=30, teachers=10))
    zip_path = tmp_path / "drop.zip"
    write_oneroster_csv(roster, tmp_path / "drop", zip_path=zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo("enrollments.csv")
    data = bytearray(zip_path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    middle = start + info.compress_size // 2
    data[middle : middle + 64] = bytes(64)
    zip_path.write_bytes(bytes(data))
    with pytest.raises(
        FatalSourceError, match=r"drop\.zip!enrollments\.csv line \d+: file is truncated or corrupt"
    ):
        await fetch_all(zip_path)


async def test_truncated_zip_is_fatal(tmp_path: Path) -> None:
    """A zip cut short (no central directory) fails the run, naming the zip."""
    zip_path = tmp_path / "drop.zip"
    write_oneroster_csv(small_roster(), tmp_path / "drop", zip_path=zip_path)
    zip_path.write_bytes(zip_path.read_bytes()[:200])
    with pytest.raises(FatalSourceError, match=r"drop\.zip: not a readable zip"):
        await fetch_all(zip_path)


def _zip_with_users_entry_changed(tmp_path: Path, flag: int = 0, method: int | None = None) -> Path:
    """The small roster as a zip whose users.csv entry claims a flag bit or a compression
    method (encryption, an unsupported method) in both its local and central headers."""
    zip_path = tmp_path / "drop.zip"
    write_oneroster_csv(small_roster(), tmp_path / "drop", zip_path=zip_path)
    data = bytearray(zip_path.read_bytes())
    with zipfile.ZipFile(zip_path) as zf:
        local = zf.getinfo("users.csv").header_offset
    central = data.find(b"PK\x01\x02" + bytes(data[local + 4 : local + 6]))
    while data[central + 46 : central + 46 + len("users.csv")] != b"users.csv":
        central = data.find(b"PK\x01\x02", central + 4)
    for flags_at, method_at in ((local + 6, local + 8), (central + 8, central + 10)):
        data[flags_at] |= flag
        if method is not None:
            data[method_at : method_at + 2] = method.to_bytes(2, "little")
    zip_path.write_bytes(bytes(data))
    return zip_path


async def test_encrypted_zip_member_is_fatal(tmp_path: Path) -> None:
    """A password-protected member fails the run naming it (zipfile raises RuntimeError)."""
    with pytest.raises(FatalSourceError, match=r"drop\.zip!users\.csv: cannot open \(.*encrypted"):
        await fetch_all(_zip_with_users_entry_changed(tmp_path, flag=1))


async def test_zip_member_with_unsupported_compression_is_fatal(tmp_path: Path) -> None:
    """A member compressed with a method zipfile lacks (Deflate64) fails the run naming it."""
    with pytest.raises(FatalSourceError, match=r"users\.csv: cannot open \(.*not supported"):
        await fetch_all(_zip_with_users_entry_changed(tmp_path, method=9))


async def test_utf16_without_byte_order_mark_is_fatal(tmp_path: Path) -> None:
    """`encoding: utf-16` on UTF-8 files (no BOM) fails the run naming the first file read."""
    with pytest.raises(
        FatalSourceError,
        match=r"manifest\.csv line 1: cannot decode as utf-16 \(UTF-16 stream does not start",
    ):
        await fetch_all(drop(tmp_path), encoding="utf-16")


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be"])
async def test_files_with_a_utf16_byte_order_mark_are_read_as_utf16(
    tmp_path: Path, codec: str
) -> None:
    """ "Unicode text" from a spreadsheet is UTF-16 with a byte-order mark: with the default
    encoding every file is read all the same, names beyond Latin-1 and line numbers intact."""
    folder = drop(tmp_path)
    users_csv = table(USERS_HEADER, user("u-1", givenName="Zoë 李"), user("u-2", status="archived"))
    (folder / "users.csv").write_text(users_csv)
    for path in folder.glob("*.csv"):
        text = path.read_text(encoding="utf-8")
        bom = codecs.BOM_UTF16_BE if codec == "utf-16-be" else b""
        path.write_bytes(bom + text.encode(codec))
    got = await fetch_all(folder)
    assert person(got, "u-1").given_name == "Zoë 李"
    [bad] = rejected(got)
    assert (bad.sourced_id, bad.location) == ("u-2", "users.csv line 3")


async def test_bytes_another_encoding_wrote_fail_naming_the_encoding_setting(
    tmp_path: Path,
) -> None:
    """A file saved as Windows-1252 (é, a curly apostrophe) fails at its line, saying which
    setting reads it; set to cp1252, the same drop is read."""
    text = table(USERS_HEADER, user("u-1", givenName="Zoé", familyName="O\u2019Brien"))
    folder = drop(tmp_path, users_csv=text.encode("cp1252"))
    with pytest.raises(FatalSourceError) as raised:
        await fetch_all(folder)
    assert str(raised.value).endswith(
        "users.csv line 2: cannot decode as utf-8-sig (invalid continuation byte); a file saved "
        "in another encoding needs the source's `encoding` set to it, such as cp1252 for a "
        "spreadsheet saved as CSV on Windows"
    )
    assert person(await fetch_all(folder, encoding="cp1252"), "u-1").family_name == "O\u2019Brien"


@pytest.mark.parametrize("encoding", ["rot13", "hex", "no-such-codec"])
def test_encoding_that_is_not_a_text_encoding_is_refused(tmp_path: Path, encoding: str) -> None:
    """A bytes-to-bytes codec (rot13, hex) is no text encoding: refused like an unknown one."""
    with pytest.raises(FatalSourceError, match="unknown text encoding"):
        OneRosterCsvConnector("csv", drop(tmp_path), encoding=encoding)


async def test_zip_with_files_in_a_subfolder_is_read(tmp_path: Path) -> None:
    """Exports that wrap the CSV files in one folder inside the zip are read the same."""
    folder = drop(tmp_path)
    zip_path = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"export-2026/{f.name}")
    got = await fetch_all(zip_path)
    assert {r.sourced_id for r in got if isinstance(r, RosterClass)} == {"c-1", "c-2", "c-3"}


# --- delta, plug-in, config ------------------------------------------------------------------


def _zip_of(path: Path, members: dict[str, Path | str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            if isinstance(content, Path):
                zf.write(content, name)
            else:
                zf.writestr(name, content)
    return path


async def test_a_zip_drop_is_read_from_its_manifests_folder_only(tmp_path: Path) -> None:
    """A users.csv in another folder of the zip (an older export kept in it) is never read
    in place of the drop's own: the drop's missing file is named instead."""
    folder = drop(tmp_path)
    old_users = table(USERS_HEADER, user("t-old", email="someone.else@example.org"))
    members: dict[str, Path | str] = {
        f.name: f for f in sorted(folder.iterdir()) if f.name != "users.csv"
    }
    members["2025-backup/users.csv"] = old_users
    zip_path = _zip_of(tmp_path / "mixed.zip", members)
    with pytest.raises(FatalSourceError, match=r"manifest lists users\.csv as bulk but it is"):
        await fetch_all(zip_path)


async def test_a_zip_holding_two_drops_is_refused_naming_them(tmp_path: Path) -> None:
    """Two exports side by side in one zip: which to read cannot be told."""
    folder = drop(tmp_path)
    members: dict[str, Path | str] = {}
    for sub in ("monday", "tuesday"):
        members |= {f"{sub}/{f.name}": f for f in sorted(folder.iterdir())}
    with pytest.raises(FatalSourceError) as raised:
        await fetch_all(_zip_of(tmp_path / "two.zip", members))
    assert str(raised.value).endswith(
        "two.zip: the zip holds 2 drops (monday/manifest.csv, tuesday/manifest.csv): which one "
        "to read cannot be told; give a zip of one drop"
    )


async def test_a_drop_zipped_twice_is_named_as_such(tmp_path: Path) -> None:
    """A zip holding the drop's zip says so instead of only that no manifest was found."""
    inner = tmp_path / "inner.zip"
    _zip_of(inner, {f.name: f for f in sorted(drop(tmp_path).iterdir())})
    with pytest.raises(FatalSourceError, match=r"manifest\.csv not found \(the zip holds inner"):
        await fetch_all(_zip_of(tmp_path / "outer.zip", {"inner.zip": inner}))


async def test_delta_fetch_of_a_bulk_drop_reads_it_as_changes(tmp_path: Path) -> None:
    """A delta run may read a bulk drop: every record comes, and the report warns that what
    the drop leaves out is not removed by such a run."""
    connector = OneRosterCsvConnector("csv", drop(tmp_path))
    assert connector.supports_delta is True
    got = await collect(connector, FetchMode.DELTA)
    assert people(got) == people(list(small_roster().persons))
    [warning] = connector.warnings
    assert warning.startswith(
        "orgs.csv, users.csv, classes.csv, enrollments.csv are bulk in a bulk drop read by a "
        "delta run: applied as changes"
    )


def test_config_resolves_relative_path_against_base_dir(tmp_path: Path) -> None:
    """A relative `path` is taken relative to the config file's folder; defaults apply."""
    (tmp_path / "sample-district").mkdir()
    config = CsvSourceConfig.model_validate(
        {"type": "oneroster_csv", "path": "sample-district"}, context={"base_dir": tmp_path}
    )
    assert config.path == tmp_path / "sample-district"
    assert (config.encoding, config.batch_size) == ("utf-8-sig", 1000)
    zipped = tmp_path / "elsewhere" / "drop.zip"
    zipped.parent.mkdir()
    with zipfile.ZipFile(zipped, "w"):
        pass
    absolute = CsvSourceConfig.model_validate(
        {"type": "oneroster_csv", "path": str(zipped)}, context={"base_dir": tmp_path / "sub"}
    )
    assert absolute.path == zipped


def test_config_check_names_a_drop_that_is_missing_or_not_a_zip(tmp_path: Path) -> None:
    """`path` must be a folder or a .zip now, and `encoding` a codec Python knows."""
    (tmp_path / "notes.txt").write_text("not a zip")
    for path, message in (
        ("nowhere", f"{tmp_path / 'nowhere'} does not exist"),
        ("nowhere.zip", f"{tmp_path / 'nowhere.zip'} does not exist"),
        ("notes.txt", f"{tmp_path / 'notes.txt'} is neither a folder nor a .zip file"),
    ):
        with pytest.raises(ValidationError) as err:
            CsvSourceConfig.model_validate(
                {"type": "oneroster_csv", "path": path}, context={"base_dir": tmp_path}
            )
        [error] = err.value.errors()
        assert error["loc"] == ("path",) and message in error["msg"]
    with pytest.raises(ValidationError) as err:
        CsvSourceConfig.model_validate(
            {"type": "oneroster_csv", "path": ".", "encoding": "utf-9"},
            context={"base_dir": tmp_path},
        )
    assert err.value.errors()[0]["loc"] == ("encoding",)


def test_config_rejects_unknown_keys_and_bad_batch_size() -> None:
    """Typos and a zero batch size are config errors."""
    with pytest.raises(ValueError, match="pth"):
        CsvSourceConfig.model_validate({"type": "oneroster_csv", "path": "x", "pth": "y"})
    with pytest.raises(ValueError, match="batch_size"):
        CsvSourceConfig.model_validate({"type": "oneroster_csv", "path": "x", "batch_size": 0})


async def test_plugin_is_registered_and_builds_a_connector(tmp_path: Path) -> None:
    """The entry point finds PLUGIN, and its factory reads the configured drop."""
    [ep] = entry_points(group=ENTRY_POINT_GROUP, name="oneroster_csv")
    assert ep.load() is PLUGIN
    drop(tmp_path)
    config = CsvSourceConfig.model_validate(
        {"type": "oneroster_csv", "path": "drop", "batch_size": 3}, context={"base_dir": tmp_path}
    )
    async with httpx.AsyncClient() as http:
        connector = PLUGIN.create(ConnectorContext(source="sample", config=config, http=http))
        got = await collect(connector)
    assert isinstance(connector, Connector)
    assert len(got) == len(small_roster().records())


async def test_fetch_teacher_for_unknown_teacher_is_empty(tmp_path: Path) -> None:
    """A teacher the files do not know gets an empty roster, not an error."""
    connector = OneRosterCsvConnector("csv", drop(tmp_path))
    got = await connector.fetch_teacher(TeacherRef("t-404", None))
    assert (got.teacher, got.classes, got.enrollments, got.persons) == (None, [], [], [])


async def test_sample_district_reads_back_without_rejections(tmp_path: Path) -> None:
    """The generated district survives a CSV round trip: same people, classes, enrollments."""
    roster = generate_district(DistrictSpec(students=200, classes=20, teachers=8))
    write_oneroster_csv(roster, tmp_path / "d")
    got = await fetch_all(tmp_path / "d")
    assert rejected(got) == []
    # Bulk files leave dateLastModified blank for active records.
    want_people = {replace(p, date_last_modified=None) for p in roster.persons}
    assert {p for p in got if isinstance(p, RosterPerson)} == want_people
    want_enrollments = {
        (e.sourced_id, e.class_id, e.user_id, e.role, e.status, e.primary)
        for e in roster.enrollments
    }
    assert {
        (e.sourced_id, e.class_id, e.user_id, e.role, e.status, e.primary)
        for e in got
        if isinstance(e, RosterEnrollment)
    } == want_enrollments


# --- hostile text: fuzzed ------------------------------------------------------------------

_LOCATION = re.compile(r"users\.csv line (\d+)")


def _read_users(folder: Path, content: bytes) -> list[RosterRecord]:
    (folder / "users.csv").write_bytes(content)
    return asyncio.run(fetch_all(folder))


@pytest.fixture(scope="module")
def fuzz_drop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "drop"
    write_oneroster_csv(small_roster(), folder)
    return folder


@settings(max_examples=150, deadline=None)
@given(body=hostile_bytes, with_header=st.booleans())
def test_hostile_users_csv_is_read_or_refused_never_crashes(
    fuzz_drop: Path, body: bytes, with_header: bool
) -> None:
    """Any bytes in users.csv give records (bad rows rejected at a line of the file) or a
    FatalSourceError naming the file; never another exception."""
    header = (",".join(USERS_HEADER) + "\n").encode() if with_header else b""
    content = header + body
    try:
        got = _read_users(fuzz_drop, content)
    except FatalSourceError as exc:
        assert "users.csv" in str(exc)
        return
    lines = max(1, len(content.split(b"\n")))
    for rej in rejected(got):
        if rej.location and rej.location.startswith("users.csv"):
            match = _LOCATION.fullmatch(rej.location)
            assert match is not None and 2 <= int(match.group(1)) <= lines


_ONE_LINE_BREAKAGES = {
    "huge quoted field": lambda row: row.replace("Given", '"' + HUGE + '"'),
    "text after a closing quote": lambda row: row.replace("Given", '"Gi"ven'),
    "NUL": lambda row: row.replace("Given", "Gi\x00ven"),
    "lone CR": lambda row: row.replace("Given", "Gi\rven"),
    "a field too many": lambda row: row + ",extra",
}


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=12),
    data=st.data(),
    breakage=st.sampled_from(sorted(_ONE_LINE_BREAKAGES)),
)
def test_one_broken_row_is_rejected_alone_at_its_line(
    fuzz_drop: Path, count: int, data: st.DataObject, breakage: str
) -> None:
    """One row broken on its own line, anywhere in the file, is rejected at exactly that line
    and every other row is read."""
    rows = table(USERS_HEADER, *(user(f"u-{i}") for i in range(count))).splitlines()
    bad = data.draw(st.integers(min_value=1, max_value=count))
    rows[bad] = _ONE_LINE_BREAKAGES[breakage](rows[bad])
    got = _read_users(fuzz_drop, ("\n".join(rows) + "\n").encode())
    [rej] = rejected(got)
    assert rej.location == f"users.csv line {bad + 1}"
    read = {r.sourced_id for r in got if isinstance(r, RosterPerson)}
    assert {f"u-{i}" for i in range(count) if i != bad - 1} <= read
    assert f"u-{bad - 1}" not in read


async def test_endless_line_is_fatal_before_it_fills_the_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line with no end (a zip member unpacking to gigabytes of it) fails the run at its
    line once it passes the limit; it is read in pieces, never whole."""
    monkeypatch.setattr(csv_files, "MAX_LINE_CHARS", 50_000)
    monkeypatch.setattr(csv_files, "_READ_SIZE", 4096)
    text = table(USERS_HEADER, user("u-1")) + "u-2," + "x" * 200_000 + "\n"
    with pytest.raises(
        FatalSourceError, match=r"users\.csv line 3: more than 50000 characters without a line"
    ):
        await fetch_all(drop(tmp_path, users_csv=text))


# --- live answers (resync --live) -----------------------------------------------------------


def _edit_enrollments(folder: Path, **rows: str) -> None:
    """Replace the rows of enrollments.csv whose sourcedId is a key (``e_t1c1="..."``)."""
    path = folder / "enrollments.csv"
    lines = path.read_text().splitlines()
    for key, line in rows.items():
        sid = key.replace("_", "-")
        [at] = [i for i, text in enumerate(lines) if text.startswith(f"{sid},")]
        lines[at] = line
    path.write_text("\n".join(lines) + "\n")


async def test_live_answer_lists_the_teachers_rejected_enrollment_with_file_and_line(
    tmp_path: Path,
) -> None:
    """A malformed row of the teacher's own enrollment is listed as rejected in the live
    answer, with file and line, as the full fetch lists it; its class is not in the answer."""
    folder = drop(tmp_path)
    _edit_enrollments(folder, e_t1c1="e-t1c1,,,c-1,sch-1,t-1,teacher,maybe,,")
    connector = OneRosterCsvConnector("csv", folder)
    got = await connector.fetch_teacher(TeacherRef("t-1", "ada@example.org"))
    full = rejected(await collect(connector))
    assert got.rejected == full
    assert [(r.entity, r.sourced_id, r.location) for r in got.rejected] == [
        ("enrollment", "e-t1c1", "enrollments.csv line 2")
    ]
    assert "primary 'maybe' is not true or false" in got.rejected[0].reason
    assert [c.sourced_id for c in got.classes] == ["c-2"]


async def test_a_rejected_row_names_its_enrollments_class_and_user(tmp_path: Path) -> None:
    """A rejected enrollment row carries its class and user as far as the row has them (the
    live apply keeps only the rows it may be), in the full fetch and the live answer alike."""
    folder = drop(tmp_path)
    _edit_enrollments(
        folder,
        e_s1c1="e-s1c1,,,c-1,sch-1,s-1,student,maybe,,",
        e_s5c2="e-s5c2,,,, sch-1,s-5,student,false,,",
        e_t1c2="e-t1c2,,,c-2,sch-1, ,teacher,false,,",
    )
    connector = OneRosterCsvConnector("csv", folder)
    full = rejected(await collect(connector))
    assert [(r.sourced_id, r.class_id, r.user_id) for r in full] == [
        ("e-t1c2", "c-2", None),
        ("e-s1c1", "c-1", "s-1"),
        ("e-s5c2", None, "s-5"),
    ]
    got = await connector.fetch_teacher(TeacherRef("t-1", None))
    assert got.rejected == full
    assert all(r.as_dict().keys() <= {"entity", "sourced_id", "reason", "location"} for r in full)


async def test_a_live_resync_through_a_drop_with_another_students_bad_row_drops_what_went(
    tmp_path: Path, store: Store, make_settings: Callable[..., Settings]
) -> None:
    """One malformed row without a class (s-5's) no longer stops every teacher's live resync
    from dropping anything: the source dropped s-1 from Algebra I, and Ada's live resync
    takes s-1 out of the group; s-5 stays in Computing (the rejected row may be that one)."""
    folder = drop(tmp_path)
    settings = make_settings(memory_sources=("csv",))
    first = SyncEngine(settings, store, connectors={"csv": OneRosterCsvConnector("csv", folder)})
    await first.sync("csv")
    await first.drain()
    before = groups(store)
    assert "s-1" in {m["sourced_id"] for m in before["c-1"]["members"]}
    _edit_enrollments(folder, e_s5c2="e-s5c2,,,,sch-1,s-5,student,false,,")
    path = folder / "enrollments.csv"
    path.write_text("".join(x for x in path.read_text().splitlines(True) if "e-s1c1," not in x))
    with store.write() as conn:
        queue_resync(
            conn, [user_id(conn, "ada@example.org")], reason="manual", run_id=None, live=True
        )
    live = SyncEngine(settings, store, connectors={"csv": OneRosterCsvConnector("csv", folder)})
    assert [o for _, o in await live.process_batch()] == ["succeeded"]
    after = groups(store)
    assert {m["sourced_id"] for m in after["c-1"]["members"]} == {
        m["sourced_id"] for m in before["c-1"]["members"]
    } - {"s-1"}
    assert after["c-2"]["members"] == before["c-2"]["members"]


async def test_live_answer_lists_rejected_student_enrollments_of_the_teachers_classes(
    tmp_path: Path,
) -> None:
    """Rejected rows of the teacher's classes are listed, malformed CSV and rows without a
    class included; another class's rejected rows are not."""
    folder = drop(tmp_path)
    _edit_enrollments(
        folder,
        e_s1c1="e-s1c1,archived,,c-1,sch-1,s-1,student,false,,",  # the teacher's class
        e_s4c2="e-s4c2,,,c-2,sch-1,s-4,student",  # too few fields: c-2 is Ada's
        e_s5c2="e-s5c2,,,,sch-1,s-5,student,false,,",  # no class: may be one of hers
        e_t3c3="e-t3c3,,,c-3,sch-2,t-3,teacher,maybe,,",  # Grace's class, not Ada's
    )
    got = await OneRosterCsvConnector("csv", folder).fetch_teacher(TeacherRef("t-1", None))
    assert [(r.sourced_id, r.location) for r in got.rejected] == [
        ("e-s1c1", "enrollments.csv line 6"),
        ("e-s4c2", "enrollments.csv line 10"),
        ("e-s5c2", "enrollments.csv line 11"),
    ]
    other = await OneRosterCsvConnector("csv", folder).fetch_teacher(TeacherRef("t-3", None))
    assert [r.sourced_id for r in other.rejected] == ["e-t3c3", "e-s5c2"]

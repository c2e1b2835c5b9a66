"""Syncing a OneRoster CSV drop through the plug-in path (entry point, config, connector)."""

from __future__ import annotations

from pathlib import Path

import yaml
from structlog.testing import capture_logs

from rostersync.config.loader import load_settings_text
from rostersync.sampledata import DistrictSpec, generate_district, write_oneroster_csv
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from tests.sync.helpers import snapshot, users


def settings_for(folder: Path, tmp_path: Path) -> object:
    data = {
        "organization": "Springfield",
        "roles": ["Teacher"],
        "sites": ["North High"],
        "provisioning": {"default_role": "Teacher", "default_site": "North High"},
        "sources": {"csv": {"type": "oneroster_csv", "path": str(folder)}},
    }
    return load_settings_text(yaml.safe_dump(data), base_dir=tmp_path)


async def test_csv_file_breaking_half_way_changes_nothing(store: Store, tmp_path: Path) -> None:
    """An enrollments.csv that turns to garbage half-way fails the run and leaves everything as it was."""
    folder = tmp_path / "drop"
    write_oneroster_csv(
        generate_district(DistrictSpec(teachers=10, students=200, classes=20)), folder
    )
    settings = settings_for(folder, tmp_path)
    engine = SyncEngine(settings, store)  # type: ignore[arg-type]
    first = await engine.sync("csv")
    await engine.drain()
    assert first.status in ("succeeded", "succeeded_with_errors")
    assert len(users(store)) > 5
    before = snapshot(store)

    enrollments = folder / "enrollments.csv"
    data = enrollments.read_bytes()
    half = len(data) // 2
    # Drop a teacher's enrollments from the first half and corrupt the second half: if the
    # first half were applied, that teacher would be archived.
    enrollments.write_bytes(
        data[:half].replace(b",teacher,", b",aide,") + b"\xff\xfe\xfa broken \xff\n" + data[half:]
    )
    report = await engine.sync("csv")
    assert report.status == "failed"
    assert "enrollments.csv" in (report.error or "")
    assert snapshot(store) == before


def _first_sync(store: Store, tmp_path: Path) -> tuple[Path, SyncEngine]:
    folder = tmp_path / "drop"
    write_oneroster_csv(generate_district(DistrictSpec(teachers=6, students=60, classes=8)), folder)
    engine = SyncEngine(settings_for(folder, tmp_path), store)  # type: ignore[arg-type]
    return folder, engine


async def test_broken_users_header_fails_the_run_naming_file_and_line(
    store: Store, tmp_path: Path
) -> None:
    """A stray quote in users.csv's header fails the run with `users.csv line 1` in its error,
    logs it without a traceback, and changes nothing."""
    folder, engine = _first_sync(store, tmp_path)
    assert (await engine.sync("csv")).status in ("succeeded", "succeeded_with_errors")
    await engine.drain()
    before = snapshot(store)
    users_csv = folder / "users.csv"
    users_csv.write_text('"sourcedId"x' + users_csv.read_text().removeprefix("sourcedId"))
    with capture_logs() as logs:
        report = await engine.sync("csv")
    assert report.status == "failed"
    assert "users.csv line 1: unreadable header (malformed CSV" in (report.error or "")
    [failed] = [e for e in logs if e["event"] == "sync_failed"]
    assert failed["error_type"] == "FatalSourceError" and failed.get("exc_info") is None
    assert snapshot(store) == before


async def test_huge_and_nul_fields_reject_their_rows_and_the_rest_syncs(
    store: Store, tmp_path: Path
) -> None:
    """A teacher row with a 200 KiB field and one with a NUL are rejected at their lines; the
    other teachers get their accounts (PostgreSQL never sees the NUL)."""
    folder, engine = _first_sync(store, tmp_path)
    clean = Store(f"sqlite:///{tmp_path / 'clean.db'}")
    clean.ensure_schema(auto_upgrade=True)
    clean_engine = SyncEngine(settings_for(folder, tmp_path), clean)  # type: ignore[arg-type]
    await clean_engine.sync("csv")
    await clean_engine.drain()
    users_csv = folder / "users.csv"
    lines = users_csv.read_text().splitlines(keepends=True)
    emails = set(users(clean))
    huge, nul = [i for i, line in enumerate(lines) if any(e in line.lower() for e in emails)][:2]
    lost = {e for e in emails if e in lines[huge].lower() or e in lines[nul].lower()}
    lines[huge] = lines[huge].replace(",teacher,", ',teacher,"' + "x" * 200_000 + '",', 1)
    lines[huge] = lines[huge].replace(",,", ",", 1)  # keep the field count
    lines[nul] = lines[nul].replace("@", "\x00@", 1)  # in the email: PostgreSQL refused it
    users_csv.write_text("".join(lines))
    report = await engine.sync("csv")
    await engine.drain()
    assert report.status == "succeeded_with_errors"
    located = {(r.get("location"), r["reason"]) for r in report.rejected}
    assert (f"users.csv line {huge + 1}", "a field is longer than 131072 characters") in located
    assert (f"users.csv line {nul + 1}", "a field contains a NUL character") in located
    assert len(lost) == 2 and set(users(store)) == emails - lost


async def test_malformed_date_keeps_the_teacher_and_is_reported_as_a_warning(
    store: Store, tmp_path: Path
) -> None:
    """A teacher whose users.csv row has `1/05/2023` as dateLastModified still gets their
    account; the row is not rejected, and the run's report warns with the file and line."""
    folder, engine = _first_sync(store, tmp_path)
    users_csv = folder / "users.csv"
    lines = users_csv.read_text().splitlines(keepends=True)
    [at] = [i for i, line in enumerate(lines) if line.startswith("t-0001,")]
    lines[at] = lines[at].replace("t-0001,,,", "t-0001,,1/05/2023,", 1)
    users_csv.write_text("".join(lines))
    report = await engine.sync("csv")
    await engine.drain()
    # The sample district's teacher without an email is the only rejection, as in every run.
    [reason] = [r["reason"] for r in report.rejected]
    assert reason is not None and reason.split(":")[0] == "no email"
    teacher_email = lines[at].split(",")[12].lower()
    assert teacher_email in users(store)
    assert (
        f"users.csv line {at + 1}: dateLastModified '1/05/2023' is not an ISO 8601 date-time; "
        "the row was read without it"
    ) in report.warnings


async def test_a_drop_in_another_format_fails_with_every_missing_column_at_once(
    store: Store, tmp_path: Path
) -> None:
    """A drop whose files lack columns (another product's CSV format) fails the run with every
    missing column of every file in one error, and changes nothing."""
    folder, engine = _first_sync(store, tmp_path)
    assert (await engine.sync("csv")).status == "succeeded_with_errors"
    before = snapshot(store)
    (folder / "users.csv").write_text("sourcedId,username,givenName,familyName\nu-1,u1,A,B\n")
    (folder / "classes.csv").write_text("sourcedId,name,schoolSourcedId\nc-1,Algebra,sch-001\n")
    report = await engine.sync("csv")
    assert report.status == "failed"
    assert (report.error or "").startswith("source 'csv': 2 problems in the drop: ")
    assert f"{folder / 'users.csv'}: missing required columns 'role', 'email'" in (
        report.error or ""
    )
    assert f"{folder / 'classes.csv'}: missing required column 'title'" in (report.error or "")
    assert snapshot(store) == before


async def test_a_malformed_teacher_enrollment_row_keeps_the_group_through_a_live_resync(
    store: Store, tmp_path: Path
) -> None:
    """Ada's enrollments.csv row for her class turns malformed: `resync --live` lists it as
    rejected, and she keeps the class's group until a full sync decides."""
    from rostersync.resync.queue import queue_resync
    from rostersync.source.testdata import small_roster
    from tests.sync.helpers import groups, user_id

    folder = tmp_path / "drop"
    write_oneroster_csv(small_roster(), folder)
    engine = SyncEngine(settings_for(folder, tmp_path), store)  # type: ignore[arg-type]
    await engine.sync("csv")
    await engine.drain()
    assert "ada@example.org" in groups(store)["c-1"]["owners"]
    path = folder / "enrollments.csv"
    path.write_text(path.read_text().replace("e-t1c1,,,c-1,sch-1,t-1,teacher,true", "e-t1c1,,,c-1"))
    with store.write() as conn:
        queue_resync(conn, [user_id(conn, "ada@example.org")], reason="m", run_id=None, live=True)
    assert [o for _, o in await engine.process_batch()] == ["succeeded"]
    assert "ada@example.org" in groups(store)["c-1"]["owners"]

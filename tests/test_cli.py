"""The CLI on the bundled sample district: the README's quick start, JSON shapes, exit codes."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from rostersync import sampledata
from rostersync.cli.main import cli
from rostersync.store.db import Store
from tests.changediff import Picture, difference, picture, plain

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The example config, with its database in tmp_path and the sample district copied beside it."""
    shutil.copytree(REPO / "config" / "sample-district", tmp_path / "sample-district")
    data = yaml.safe_load((REPO / "config" / "rostersync.example.yaml").read_text())
    data["database"] = "sqlite:///state/rostersync.db"
    data["logging"] = {"level": "warning", "format": "json"}
    path = tmp_path / "rostersync.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


def as_json(result: Result) -> object:
    return json.loads(result.stdout)


def test_quick_start_creates_users_and_groups_then_reruns_with_zero_counts(config: Path) -> None:
    """The sample district yields teacher users and class groups; a second sync changes nothing."""
    first = run(config, "sync", "--json")
    assert first.exit_code == 0, first.output
    report = as_json(first)["runs"][0]  # type: ignore[index]
    assert report["source"] == "sample" and report["mode"] == "full"
    assert report["status"] == "succeeded_with_errors"  # the teacher without an email
    assert report["counts"]["users_created"] == 43
    assert report["counts"]["groups_created"] == 102
    assert report["rejected"] == [
        {
            "entity": "user",
            "sourced_id": sampledata.EDGE_NO_EMAIL,
            "reason": "no email: teaches classes with students but has no email address",
        }
    ]
    second = as_json(run(config, "sync", "--json"))["runs"][0]  # type: ignore[index]
    rerun_counts = dict(second["counts"])
    assert rerun_counts.pop("records_rejected") == 1  # the same teacher, reported again
    assert set(rerun_counts.values()) == {0}


def test_users_list_json_shape_and_edge_cases(config: Path) -> None:
    """users list --json gives the contract's fields; edge-case teachers are in or out as they should be."""
    run(config, "sync")
    users = as_json(run(config, "users", "list", "--json"))
    assert isinstance(users, list)
    by_email = {u["email"]: u for u in users}
    assert set(users[0]) >= {"email", "display_name", "roles", "sites", "status", "sources"}
    assert "mixed.case@springfield.example.org" in by_email  # upper-case email, lower-cased
    assert all(u["email"] == u["email"].lower() for u in users)
    assert by_email["mixed.case@springfield.example.org"]["roles"] == ["Teacher"]
    assert by_email["mixed.case@springfield.example.org"]["sources"] == ["sample"]
    edge_ids = {u.split("@")[0] for u in by_email}
    assert not any(
        "noclasses" in e or "emptyclasses" in e or "onlydeleted" in e or "disabled" in e
        for e in edge_ids
    )


def test_groups_list_json_shape_and_co_taught_class(config: Path) -> None:
    """groups list --json gives owners and members; the co-taught class has two owners."""
    run(config, "sync")
    groups = as_json(run(config, "groups", "list", "--json"))
    assert isinstance(groups, list)
    co = next(g for g in groups if g["external_id"] == sampledata.EDGE_COTEACH_CLASS)
    assert set(co) == {"source", "external_id", "name", "owners", "members"}
    assert len(co["owners"]) == 2
    assert co["members"] and set(co["members"][0]) == {"sourced_id", "email", "name"}
    assert not any(g["external_id"] == sampledata.EDGE_EMPTY_CLASS for g in groups)


def test_runs_and_queue_listings(config: Path) -> None:
    """runs list/show and queue list answer in JSON with the contract's fields."""
    run(config, "sync")
    runs = as_json(run(config, "runs", "list", "--json"))
    assert isinstance(runs, list) and runs[0]["status"] == "succeeded_with_errors"
    shown = as_json(run(config, "runs", "show", str(runs[0]["id"]), "--json"))
    assert shown["id"] == runs[0]["id"] and shown["rejected"]  # type: ignore[index]
    jobs = as_json(run(config, "queue", "list", "--json"))
    assert isinstance(jobs, list) and jobs
    assert set(jobs[0]) >= {"id", "user", "state", "attempts", "reason", "last_error"}
    assert {j["state"] for j in jobs} == {"succeeded"}
    assert run(config, "runs", "show", "999").exit_code == 2


def test_unknown_source_is_usage_error(config: Path) -> None:
    """sync --source with a name not in the config exits 2."""
    result = run(config, "sync", "--source", "nope")
    assert result.exit_code == 2
    assert "no source named nope" in result.stderr


def test_resync_queues_jobs_and_rejects_unknown_users(config: Path) -> None:
    """resync --user queues one job per user; an unknown email is a usage error."""
    run(config, "sync")
    res = run(config, "resync", "--user", "Mixed.Case@springfield.example.org", "--json")
    assert res.exit_code == 0, res.output
    doc = as_json(res)
    assert doc["queued"] == 1 and doc["jobs"][0]["state"] == "queued"  # type: ignore[index]
    assert run(config, "resync", "--user", "ghost@example.org").exit_code == 2
    assert run(config, "resync").exit_code == 2
    once = run(config, "run", "--once", "--json")
    assert once.exit_code == 0
    jobs = as_json(run(config, "queue", "list", "--json"))
    assert all(j["state"] == "succeeded" for j in jobs)  # type: ignore[union-attr]


def test_held_run_exits_1_and_approve_applies_it(config: Path, tmp_path: Path) -> None:
    """A held sync exits 1; `runs approve` applies it and exits 0."""
    run(config, "sync")
    users_csv = tmp_path / "sample-district" / "enrollments.csv"
    lines = users_csv.read_text().splitlines()
    users_csv.write_text("\n".join(lines[: len(lines) // 4]) + "\n")  # three quarters gone
    held = run(config, "sync", "--json")
    assert held.exit_code == 1
    report = as_json(held)["runs"][0]  # type: ignore[index]
    assert report["status"] == "held" and "shrunken source" in report["hold_reason"]
    approved = run(config, "runs", "approve", str(report["id"]), "--json", "--yes")
    assert approved.exit_code == 0, approved.output
    assert as_json(approved)["runs"][0]["status"] == "succeeded"  # type: ignore[index]
    again = run(config, "runs", "approve", str(report["id"]))
    assert again.exit_code == 1 and "not held" in again.stderr


def test_dry_run_changes_nothing(config: Path) -> None:
    """sync --dry-run reports what would be created and creates nothing."""
    res = run(config, "sync", "--dry-run", "--json")
    assert as_json(res)["runs"][0]["counts"]["users_created"] == 43  # type: ignore[index]
    assert as_json(run(config, "users", "list", "--json")) == []


def test_console_script_runs(config: Path) -> None:
    """The installed `rostersync` entry point works in a real process; logs go to stderr."""
    exe = shutil.which("rostersync") or f"{sys.executable} -m rostersync"
    proc = subprocess.run(
        [*exe.split(), "--config", str(config), "sync", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["runs"][0]["counts"]["users_created"] == 43


def _cut_drop_to_a_tenth(config: Path) -> None:
    drop = config.parent / "sample-district"
    for name in ("users.csv", "enrollments.csv", "classes.csv"):
        lines = (drop / name).read_text().splitlines(keepends=True)
        (drop / name).write_text("".join(lines[: 1 + (len(lines) - 1) // 10]))


def test_a_dry_run_is_marked_as_one_and_runs_approve_refuses_it(config: Path) -> None:
    """The trial that archived 27 users for real: a dry run of a drop cut to a tenth says a
    real run would be held, is listed as a dry run, and `runs approve` refuses it (exit 1)."""
    assert run(config, "sync").exit_code == 0
    before = as_json(run(config, "users", "list", "--json"))
    _cut_drop_to_a_tenth(config)
    dry = run(config, "sync", "--dry-run")
    assert dry.exit_code == 1
    assert "(dry run): held" in dry.stdout and "a real run would be held" in dry.stdout
    assert "runs approve" not in dry.stdout
    dry_id = as_json(run(config, "runs", "list", "--json"))[0]["id"]  # type: ignore[index]
    shown = as_json(run(config, "runs", "show", str(dry_id), "--json"))
    assert shown["dry_run"] is True and shown["status"] == "held"  # type: ignore[index]
    listed = run(config, "runs", "list").stdout.splitlines()
    assert re.match(rf"{dry_id}\s+sample\s+full\s+held \(dry run\)\s+cli\s", listed[2])
    approve = run(config, "runs", "approve", str(dry_id))
    assert approve.exit_code == 1
    assert "is a dry run" in approve.stderr
    assert as_json(run(config, "users", "list", "--json")) == before


def test_a_missing_drop_folder_fails_its_source_not_every_command(config: Path) -> None:
    """`config check` reports a CSV drop that is gone (exit 2), but listing users still works
    and a sync of that source fails on its own, saying why."""
    assert run(config, "sync").exit_code == 0
    shutil.rmtree(config.parent / "sample-district")
    check = run(config, "config", "check")
    assert check.exit_code == 2
    assert "sources.sample.path" in check.stderr and "does not exist" in check.stderr
    listed = run(config, "users", "list", "--json")
    assert listed.exit_code == 0 and len(as_json(listed)) == 43  # type: ignore[arg-type]
    failed = run(config, "sync", "--json")
    assert failed.exit_code == 1
    report = as_json(failed)["runs"][0]  # type: ignore[index]
    assert report["status"] == "failed" and "sample-district" in report["error"]


def test_an_approved_run_no_longer_offers_its_approval(config: Path) -> None:
    """After `runs approve`, the run's report says it was approved and why it had been held,
    not "apply with runs approve"."""
    assert run(config, "sync").exit_code == 0
    _cut_drop_to_a_tenth(config)
    held = run(config, "sync")
    assert held.exit_code == 1 and "apply with `rostersync runs approve 2`" in held.stdout
    approved = run(config, "runs", "approve", "2", "--yes")
    assert approved.exit_code == 0, approved.output
    assert "run 2  source sample  full: succeeded" in approved.stdout
    assert "; it had been held: " in approved.stdout
    assert "runs approve" not in approved.stdout
    shown = as_json(run(config, "runs", "show", "2", "--json"))
    assert shown["approved_at"] is not None and shown["hold_reason"]  # type: ignore[index]


# -- change sets, approval and run reports (issue 19, items 1-3) ------------------------------


def _picture(config: Path) -> Picture:
    """The sample source's users and groups, as the change set speaks of them."""
    store = Store(f"sqlite:///{config.parent / 'state' / 'rostersync.db'}", create=False)
    try:
        return picture(store, "sample")
    finally:
        store.dispose()


def test_a_held_runs_change_set_is_listed_and_is_what_approval_does(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`runs show ID --changes` lists every user and group of a held run (text, JSON, CSV);
    `runs approve` shows it, asks on a terminal, and then does exactly that."""
    assert run(config, "sync").exit_code == 0
    _cut_drop_to_a_tenth(config)
    assert run(config, "sync").exit_code == 1
    text_out = run(config, "runs", "show", "2", "--changes")
    assert text_out.exit_code == 0, text_out.output
    assert text_out.stdout.startswith("change set of run 2: users: archive 35; groups: remove 94")
    doc = as_json(run(config, "runs", "show", "2", "--changes", "--members", "--json"))
    assert isinstance(doc, dict)
    assert set(doc) >= {"run_id", "users", "groups"} and doc["run_id"] == 2
    assert set(doc["users"][0]) >= {"action", "email", "display_name", "sourced_id", "reason"}
    assert set(doc["groups"][0]) >= {
        "action",
        "class_sourced_id",
        "name",
        "owners_added",
        "owners_removed",
        "members_added",
        "members_removed",
    }
    assert {u["action"] for u in doc["users"]} == {"archive"} and len(doc["users"]) == 35
    plain_doc = as_json(run(config, "runs", "show", "2", "--changes", "--json"))
    assert "members" not in plain_doc["groups"][0]  # type: ignore[index]
    sheet = tmp_path / "changes.csv"
    wrote = run(config, "runs", "show", "2", "--changes", "--csv", str(sheet))
    assert wrote.exit_code == 0, wrote.output
    rows = list(csv.DictReader(sheet.read_text(encoding="utf-8-sig").splitlines()))
    assert sum(r["kind"] == "user" for r in rows) == 35
    assert sum(r["kind"] == "group" for r in rows) == len(doc["groups"])
    bad = run(config, "runs", "show", "2", "--changes", "--csv", str(tmp_path / "no" / "x.csv"))
    assert bad.exit_code == 1 and "cannot write" in bad.stderr

    before = _picture(config)
    no_tty = run(config, "runs", "approve", "2")
    assert no_tty.exit_code == 2 and "--yes" in no_tty.stderr
    assert "users: archive 35" in no_tty.stdout  # the summary came first
    monkeypatch.setattr("rostersync.cli.runs._interactive", lambda: True)
    declined = CliRunner().invoke(
        cli, ["--config", str(config), "runs", "approve", "2"], input="n\n"
    )
    assert declined.exit_code == 1 and "not approved" in declined.stderr
    assert _picture(config) == before
    approved = CliRunner().invoke(
        cli, ["--config", str(config), "runs", "approve", "2"], input="y\n"
    )
    assert approved.exit_code == 0, approved.output
    assert "Apply run 2?" in approved.stderr
    assert "apply with" not in approved.stdout and "applied by an approval" in approved.stdout
    assert plain(doc) == difference(before, _picture(config), "sample")
    gone = run(config, "runs", "show", "2", "--changes")
    assert gone.exit_code == 1 and "approved and applied" in gone.stderr
    listed = as_json(run(config, "runs", "list", "--json"))
    assert listed[0]["trigger"] == "approval"  # type: ignore[index]


def test_a_dry_run_lists_its_change_set(config: Path) -> None:
    """`sync --dry-run --changes` prints the change set (in JSON with the run), and a real
    sync then does just that."""
    res = run(config, "sync", "--dry-run", "--changes", "--members", "--json")
    assert res.exit_code == 0, res.output
    changes = as_json(res)["runs"][0]["changes"]  # type: ignore[index]
    assert changes["summary"]["users"]["create"] == 43
    assert changes["summary"]["groups"]["create"] == 102
    store_before = _picture(config)
    assert run(config, "sync").exit_code == 0
    assert plain(changes) == difference(store_before, _picture(config), "sample")
    shown = run(config, "sync", "--dry-run", "--changes")
    assert "change set of run 3: users: no change; groups: no change" in shown.stdout
    usage = run(config, "sync", "--changes")
    assert usage.exit_code == 2 and "--dry-run" in usage.stderr
    assert run(config, "sync", "--dry-run", "--members").exit_code == 2


def test_runs_list_gives_trigger_duration_and_superseded_held_runs(config: Path) -> None:
    """A held run that a later run overtook is listed `superseded`; approving it is refused;
    runs carry their trigger and duration."""
    assert run(config, "sync").exit_code == 0
    drop = config.parent / "sample-district"
    saved = {n: (drop / n).read_text() for n in ("users.csv", "enrollments.csv", "classes.csv")}
    _cut_drop_to_a_tenth(config)
    assert run(config, "sync").exit_code == 1
    for name, body in saved.items():
        (drop / name).write_text(body)
    assert run(config, "sync").exit_code == 0
    listed = as_json(run(config, "runs", "list", "--json"))
    assert isinstance(listed, list)
    held = next(r for r in listed if r["id"] == 2)
    assert held["status"] == "superseded" and held["superseded_by"] == 3
    assert all(r["trigger"] == "cli" for r in listed)
    assert all(isinstance(r["duration_seconds"], float) for r in listed)
    table_out = run(config, "runs", "list").stdout.splitlines()
    assert re.match(r"2\s+sample\s+full\s+superseded\s+cli\s+\S+\s+\d+\.\ds\s", table_out[3])
    shown = run(config, "runs", "show", "2")
    assert "superseded: run 3 of sample has succeeded since" in shown.stdout
    assert "runs approve" not in shown.stdout
    refused = run(config, "runs", "approve", "2", "--yes")
    assert refused.exit_code == 1 and "out of date" in refused.stderr
    gone = run(config, "runs", "show", "2", "--changes")
    assert gone.exit_code == 1 and "overtaken by run 3" in gone.stderr


def test_the_report_says_which_rejections_are_which(config: Path) -> None:
    """The summary splits rejections into the connector's and the provisioning rules', and
    no longer prints a `rejected 0` fetch figure beside `records rejected 1`."""
    out = run(config, "sync").stdout
    assert (
        "records rejected 1: 0 by the connector (records it could not read or accept), 1 by "
        "the provisioning rules" in out
    )
    fetched = next(line for line in out.splitlines() if "fetched:" in line)
    assert "rejected" not in fetched
    assert "started " in out and "by the command line, took " in out


#: What a light command must not pay for: database, migrations, HTTP, spreadsheets, crypto.
_HEAVY = ("sqlalchemy", "sqlmodel", "alembic", "psycopg", "httpx", "openpyxl", "cryptography")
_IMPORTED = """
import sys
from rostersync.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})), file=sys.stderr)
"""


def _top_level_imports(*args: str, cwd: Path) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running the command."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTED, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(done.stderr.split())


def test_help_imports_no_database_http_or_spreadsheet_module(tmp_path: Path) -> None:
    """`rostersync --help` loads click and a few small modules of ours, nothing heavy."""
    loaded = _top_level_imports("--help", cwd=tmp_path)
    assert "click" in loaded
    assert not loaded & {*_HEAVY, "pydantic", "yaml", "structlog", "asyncio"}


def test_users_list_imports_no_orm_migrations_or_http(config: Path) -> None:
    """`users list` opens the database with SQLAlchemy Core, and needs no ORM tables, Alembic,
    HTTP client or spreadsheet reader (the connector plug-ins load without them)."""
    assert run(config, "db", "upgrade").exit_code == 0
    loaded = _top_level_imports("--config", str(config), "users", "list", cwd=config.parent)
    assert "sqlalchemy" in loaded
    assert not loaded & (set(_HEAVY) - {"sqlalchemy"})

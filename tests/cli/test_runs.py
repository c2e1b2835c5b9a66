"""`runs list|show|approve` on the bundled sample district: held runs, change sets, approvals."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from rostersync.cli.main import cli
from tests.changediff import difference, plain
from tests.cli.sample import as_json, cut_drop_to_a_tenth, run, sample_picture


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
    doc = as_json(approved)["runs"][0]  # type: ignore[index]
    assert doc["status"] == "succeeded"
    # The archived teachers' resyncs ran in the command's drain, every one of them done.
    states = doc["resync_states"]
    assert states["succeeded"] == doc["counts"]["resync_queued"] > 0
    assert states["queued"] == states["running"] == states["failed"] == 0
    held_states = {"queued": 0, "running": 0, "succeeded": 0, "failed": 0}
    assert report["resync_states"] == held_states  # held: it queued nothing
    again = run(config, "runs", "approve", str(report["id"]))
    assert again.exit_code == 1 and "was approved already" in again.stderr


@pytest.mark.parametrize("when", ["in the preview", "before the apply", "in the resyncs"])
def test_an_approval_stopped_by_ctrl_c_says_whether_the_run_was_applied(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Ctrl-C during `runs approve` exits 1 saying what the run is now: still held (nothing
    applied), or applied with its resync jobs left for the next drain."""
    run(config, "sync")
    enrollments = tmp_path / "sample-district" / "enrollments.csv"
    lines = enrollments.read_text().splitlines()
    enrollments.write_text("\n".join(lines[: len(lines) // 4]) + "\n")
    held = as_json(run(config, "sync", "--json"))["runs"][0]  # type: ignore[index]

    async def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    def interrupted_preview(*_args: object) -> bool:
        raise KeyboardInterrupt

    if when == "in the preview":
        monkeypatch.setattr("rostersync.cli.runs._approval_preview", interrupted_preview)
    elif when == "before the apply":
        monkeypatch.setattr("rostersync.sync.engine.SyncEngine.approve", interrupted)
    else:
        monkeypatch.setattr("rostersync.cli.runs.drain_with_progress", interrupted)
    stopped = run(config, "runs", "approve", str(held["id"]), "--yes")
    assert stopped.exit_code == 1
    listed = as_json(run(config, "runs", "list", "--json"))
    status = listed[0]["status"]  # type: ignore[index]
    if when != "in the resyncs":
        assert status == "held"
        assert (
            f"rostersync: stopped: run {held['id']} was not applied; it is still held and may "
            "be approved again"
        ) in stopped.stderr
    else:
        assert status == "succeeded"
        assert (
            f"rostersync: stopped while processing the resync jobs run {held['id']} queued: "
            "the run is applied (succeeded)"
        ) in stopped.stderr


def test_a_dry_run_is_marked_as_one_and_runs_approve_refuses_it(config: Path) -> None:
    """The trial that archived 27 users for real: a dry run of a drop cut to a tenth says a
    real run would be held, is listed as a dry run, and `runs approve` refuses it (exit 1)."""
    assert run(config, "sync").exit_code == 0
    before = as_json(run(config, "users", "list", "--json"))
    cut_drop_to_a_tenth(config)
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


def test_an_approved_run_no_longer_offers_its_approval(config: Path) -> None:
    """After `runs approve`, the run's report says it was approved and why it had been held,
    not "apply with runs approve"."""
    assert run(config, "sync").exit_code == 0
    cut_drop_to_a_tenth(config)
    held = run(config, "sync")
    assert held.exit_code == 1
    assert f"apply with `rostersync --config {config} runs approve 2`" in held.stdout
    approved = run(config, "runs", "approve", "2", "--yes")
    assert approved.exit_code == 0, approved.output
    assert "run 2  source sample  full: succeeded" in approved.stdout
    assert "; it had been held: " in approved.stdout
    assert "runs approve" not in approved.stdout
    shown = as_json(run(config, "runs", "show", "2", "--json"))
    assert shown["approved_at"] is not None and shown["hold_reason"]  # type: ignore[index]


def test_the_counts_of_a_run_that_changed_nothing_say_so(config: Path) -> None:
    """A held or dry run's report prefixes its counts with "not applied:" (it archived no
    one); once the held run is approved, the same counts stand alone."""
    assert run(config, "sync").exit_code == 0
    cut_drop_to_a_tenth(config)
    held, dry = run(config, "sync"), run(config, "sync", "--dry-run")
    for result in (held, dry, run(config, "runs", "show", "2")):
        assert result.exit_code in (0, 1), result.output
        [counts] = [line for line in result.stdout.splitlines() if "users created" in line]
        assert re.fullmatch(
            r"  not applied: users created 0, users linked 0, users archived [1-9]\d*, .*", counts
        )
    approved = run(config, "runs", "approve", "2", "--yes")
    [counts] = [line for line in approved.stdout.splitlines() if "users created" in line]
    assert counts.startswith("  users created 0, users linked 0, users archived ")


def test_a_held_run_shows_the_resyncs_its_approval_queues(config: Path) -> None:
    """`runs show` of a held run gives, among its not-applied counts, the resyncs approving
    it queues (it said `resync queued 0`, and the approval then queued 43); the approval
    reports that number, and so does a dry run of the same drop, with and without
    --changes."""
    assert run(config, "sync").exit_code == 0
    cut_drop_to_a_tenth(config)
    assert run(config, "sync").exit_code == 1
    shown = run(config, "runs", "show", "2")
    assert shown.exit_code == 0, shown.output
    [counts] = [line for line in shown.stdout.splitlines() if "users created" in line]
    assert counts.startswith("  not applied: ")
    found = re.search(r"resync queued (\d+)", counts)
    assert found is not None, counts
    queued = int(found.group(1))
    assert queued > 0
    for dry in (("--dry-run",), ("--dry-run", "--changes")):
        doc = as_json(run(config, "sync", *dry, "--json"))["runs"][0]  # type: ignore[index]
        assert doc["status"] == "held" and doc["counts"]["resync_queued"] == queued
    approved = as_json(run(config, "runs", "approve", "2", "--yes", "--json"))
    assert approved["runs"][0]["counts"]["resync_queued"] == queued  # type: ignore[index]


def test_approving_a_run_twice_says_it_was_approved_already(config: Path) -> None:
    """A second `runs approve` of the same run is refused (exit 1, nothing changes) saying it
    was approved already and when, not only that its status is not held."""
    assert run(config, "sync").exit_code == 0
    cut_drop_to_a_tenth(config)
    assert run(config, "sync").exit_code == 1
    assert run(config, "runs", "approve", "2", "--yes").exit_code == 0
    before = as_json(run(config, "users", "list", "--json"))
    shown = as_json(run(config, "runs", "show", "2", "--json"))
    when = str(shown["approved_at"])[:19].replace("T", " ")  # type: ignore[index]
    again = run(config, "runs", "approve", "2", "--yes")
    assert again.exit_code == 1
    assert f"run 2 was approved already, at {when}Z (it is now succeeded)" in again.stderr
    assert "nothing to approve" in again.stderr
    assert as_json(run(config, "users", "list", "--json")) == before


def test_a_held_runs_change_set_is_listed_and_is_what_approval_does(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`runs show ID --changes` lists every user and group of a held run (text, JSON, CSV);
    `runs approve` shows it, asks on a terminal, and then does exactly that."""
    assert run(config, "sync").exit_code == 0
    cut_drop_to_a_tenth(config)
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

    before = sample_picture(config)
    no_tty = run(config, "runs", "approve", "2")
    assert no_tty.exit_code == 2 and "--yes" in no_tty.stderr
    assert "users: archive 35" in no_tty.stdout  # the summary came first
    monkeypatch.setattr("rostersync.cli.runs._interactive", lambda: True)
    declined = CliRunner().invoke(
        cli, ["--config", str(config), "runs", "approve", "2"], input="n\n"
    )
    assert declined.exit_code == 1 and "not approved" in declined.stderr
    assert sample_picture(config) == before
    approved = CliRunner().invoke(
        cli, ["--config", str(config), "runs", "approve", "2"], input="y\n"
    )
    assert approved.exit_code == 0, approved.output
    assert "Apply run 2?" in approved.stderr
    assert "apply with" not in approved.stdout and "applied by an approval" in approved.stdout
    assert plain(doc) == difference(before, sample_picture(config), "sample")
    gone = run(config, "runs", "show", "2", "--changes")
    assert gone.exit_code == 1 and "approved and applied" in gone.stderr
    # The command it points to works as pasted: with the --config this one was given.
    assert f"`rostersync --config {config} runs show 2` says what it did" in gone.stderr
    listed = as_json(run(config, "runs", "list", "--json"))
    assert listed[0]["trigger"] == "approval"  # type: ignore[index]


def test_runs_list_gives_trigger_duration_and_superseded_held_runs(config: Path) -> None:
    """A held run that a later run overtook is listed `superseded`; approving it is refused;
    runs carry their trigger and duration."""
    assert run(config, "sync").exit_code == 0
    drop = config.parent / "sample-district"
    saved = {n: (drop / n).read_text() for n in ("users.csv", "enrollments.csv", "classes.csv")}
    cut_drop_to_a_tenth(config)
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
    assert re.match(
        r"2\s+sample\s+full\s+superseded\s+cli\s+\S+ \S+Z\s+\d+\.\ds\s", table_out[3]
    ), table_out[3]
    # What the superseded run would have archived is in brackets, and said so; the runs that
    # were applied show what they did.
    archived = held["counts"]["users_archived"]
    assert archived > 0
    assert re.search(rf"\s0\s+\({archived}\)\s+\d+$", table_out[3]), table_out[3]
    assert re.search(r"\s43\s+0\s+1$", table_out[4]), table_out[4]
    assert table_out[-1].startswith("(n): what a run that changed nothing")
    shown = run(config, "runs", "show", "2")
    assert "superseded: run 3 of sample has succeeded since" in shown.stdout
    assert "runs approve" not in shown.stdout
    refused = run(config, "runs", "approve", "2", "--yes")
    assert refused.exit_code == 1 and "out of date" in refused.stderr
    gone = run(config, "runs", "show", "2", "--changes")
    assert gone.exit_code == 1 and "overtaken by run 3" in gone.stderr


def test_runs_list_shows_when_a_run_started_as_runs_show_and_status_do(config: Path) -> None:
    """The "started" column reads `2026-12-07 16:49:31Z` (UTC, to the second), the moment
    `runs show` gives, not the JSON's `2026-12-07T16:49:31.743987+00:00`; the JSON keeps it."""
    assert run(config, "sync").exit_code == 0
    listed = run(config, "runs", "list").stdout.splitlines()
    header, row = listed[0], listed[2]
    started = row[header.index("started") :].split("  ")[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", started), row
    assert f"  started {started} by the command line" in run(config, "runs", "show", "1").stdout
    docs = as_json(run(config, "runs", "list", "--json"))
    assert isinstance(docs, list)
    [doc] = docs
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", doc["started_at"])
    assert doc["started_at"][:19].replace("T", " ") + "Z" == started
    status = run(config, "status").stdout.splitlines()[2]
    assert re.search(r"run 1 succeeded_with_errors at \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", status)


@pytest.mark.parametrize("args", [("runs", "approve", "99", "--yes"), ("runs", "show", "99")])
def test_a_run_id_that_names_no_run_is_a_usage_error(config: Path, args: tuple[str, ...]) -> None:
    """`runs approve 99` (and `runs show 99`) of a run that does not exist exits 2, as
    README says beside the refusals that exit 1, and changes nothing."""
    assert run(config, "sync").exit_code == 0
    before = as_json(run(config, "users", "list", "--json"))
    result = run(config, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr == "rostersync: run 99 does not exist\n"
    assert as_json(run(config, "users", "list", "--json")) == before


def test_runs_list_of_a_source_the_config_does_not_name_says_which_it_does(config: Path) -> None:
    """`runs list --source smaple` (a typo, no runs) exits 2 naming the config's sources; a
    configured source without runs yet lists nothing, exit 0."""
    assert run(config, "db", "upgrade").exit_code == 0
    typo = run(config, "runs", "list", "--source", "smaple")
    assert typo.exit_code == 2, typo.output
    assert (
        "rostersync: no runs of source 'smaple', and the config has no such source (sample)"
    ) in typo.stderr
    empty = run(config, "runs", "list", "--source", "sample", "--json")
    assert empty.exit_code == 0, empty.output
    assert as_json(empty) == []


def test_runs_show_says_where_the_runs_resync_jobs_stand(config: Path) -> None:
    """`runs show` gives the jobs a run queued by state (JSON `resync_states`, a line of text):
    all done after a sync's drain; one failed for good and one waiting are named, and the
    failed one points at `queue list`. A dry run queues none and shows no line."""
    from sqlalchemy import text

    from rostersync.store.db import Store

    done = as_json(run(config, "sync", "--json"))["runs"][0]  # type: ignore[index]
    queued = done["counts"]["resync_queued"]
    assert queued > 2
    shown = as_json(run(config, "runs", "show", str(done["id"]), "--json"))
    states = shown["resync_states"]  # type: ignore[index]
    assert states == {"queued": 0, "running": 0, "succeeded": queued, "failed": 0}
    text_out = run(config, "runs", "show", str(done["id"])).stdout
    assert f"  resync jobs: {queued} succeeded\n" in text_out
    store = Store(f"sqlite:///{config.parent / 'state' / 'rostersync.db'}", create=False)
    try:
        with store.write() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    text("SELECT id FROM resync_job WHERE run_id = :r ORDER BY id LIMIT 2"),
                    {"r": done["id"]},
                )
            ]
            conn.execute(
                text("UPDATE resync_job SET state = 'failed' WHERE id = :i"), {"i": ids[0]}
            )
            conn.execute(
                text("UPDATE resync_job SET state = 'queued' WHERE id = :i"), {"i": ids[1]}
            )
    finally:
        store.dispose()
    text_out = run(config, "runs", "show", str(done["id"])).stdout
    assert (
        f"  resync jobs: 1 queued, {queued - 2} succeeded, 1 failed; "
        f"`rostersync --config {config} queue list` says why\n"
    ) in text_out
    dry = as_json(run(config, "sync", "--dry-run", "--json"))["runs"][0]  # type: ignore[index]
    dry_shown = as_json(run(config, "runs", "show", str(dry["id"]), "--json"))
    assert "resync_states" not in dry_shown  # type: ignore[operator]
    assert "resync jobs" not in run(config, "runs", "show", str(dry["id"])).stdout


def test_a_dry_runs_change_set_is_shown_until_a_later_run_succeeds(config: Path) -> None:
    """`runs show N --changes` of a dry run made with --changes shows its change set; once a
    later run of the source has succeeded the set is dropped, and the refusal says both when
    one is recorded and when it goes (exit 1), as for a dry run made without --changes."""
    dry = as_json(run(config, "sync", "--dry-run", "--changes", "--json"))["runs"][0]  # type: ignore[index]
    shown = run(config, "runs", "show", str(dry["id"]), "--changes")
    assert shown.exit_code == 0, shown.output
    assert f"change set of run {dry['id']}: users: create 43; groups: create 102" in shown.stdout
    plain = as_json(run(config, "sync", "--dry-run", "--json"))["runs"][0]  # type: ignore[index]
    assert run(config, "sync").exit_code == 0
    for rid in (dry["id"], plain["id"]):
        gone = run(config, "runs", "show", str(rid), "--changes")
        assert gone.exit_code == 1
        assert (
            f"run {rid} is a dry run with no change set: one is recorded only by `sync "
            "--dry-run --changes`, and dropped once a later run of the source succeeds"
        ) in gone.stderr

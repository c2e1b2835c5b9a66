"""`sync` and `resync` on the bundled sample district: the README's quick start, dry runs, exit codes, run reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from rostersync import sampledata
from rostersync.store.db import Store
from tests.changediff import difference, plain
from tests.cli.sample import as_json, run, sample_picture
from tests.recovery.conftest import lease, register, remote_holder
from tests.sync.helpers import console_down


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


def test_sync_says_which_of_its_resyncs_did_not_succeed(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resyncs that fail in the command's drain are not done: the text says how many wait
    for a retry, --json gives each run's jobs by state; a drain that did all says nothing."""
    monkeypatch.setattr("rostersync.resync.worker.rebuild_groups", console_down)
    failing = run(config, "sync")
    assert failing.exit_code == 0, failing.output
    assert (
        "  not done: 43 resync(s) wait for a retry, 0 failed for good "
        f"(`rostersync --config {config} queue list` says why)" in failing.stdout
    )
    monkeypatch.undo()
    again = as_json(run(config, "sync", "--json"))["runs"][0]  # type: ignore[index]
    # A run that changed nothing queued nothing: the first run's jobs wait for their retry.
    assert again["resync_states"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0}
    assert [j["state"] for j in as_json(run(config, "queue", "list", "--json"))] == [  # type: ignore[attr-defined]
        "queued"
    ] * 43
    dry = as_json(run(config, "sync", "--dry-run", "--json"))["runs"][0]  # type: ignore[index]
    assert "resync_states" not in dry


def test_run_once_says_what_became_of_its_resyncs(config: Path) -> None:
    """`run --once` drains as `sync` does, and its runs carry their jobs by state."""
    once = run(config, "run", "--once", "--json")
    assert once.exit_code == 0, once.output
    doc = as_json(once)["runs"][0]  # type: ignore[index]
    assert doc["resync_states"] == {"queued": 0, "running": 0, "succeeded": 43, "failed": 0}
    assert "not done" not in run(config, "run", "--once").stdout


def test_unknown_source_is_usage_error(config: Path) -> None:
    """sync --source with a name not in the config exits 2."""
    result = run(config, "sync", "--source", "nope")
    assert result.exit_code == 2
    assert "no source named nope" in result.stderr


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
    assert isinstance(jobs, list)
    assert all(j["state"] == "succeeded" for j in jobs)


def test_run_once_records_the_trigger_it_is_given(config: Path) -> None:
    """`run --once` records its runs as `cli`, or as `schedule` when the timer unit says
    so; `--trigger` or `--json` without `--once` is a usage error (the daemon records its
    own triggers and prints no document)."""
    assert run(config, "run", "--once").exit_code == 0
    assert run(config, "run", "--once", "--trigger", "schedule").exit_code == 0
    runs = as_json(run(config, "runs", "list", "--json"))
    assert isinstance(runs, list)
    assert [r["trigger"] for r in runs] == ["schedule", "cli"]
    wrong = run(config, "run", "--trigger", "schedule")
    assert wrong.exit_code == 2
    assert "--trigger goes with --once" in wrong.output
    quiet = run(config, "run", "--json")  # the daemon would print no document: refused
    assert quiet.exit_code == 2
    assert "--json goes with --once" in quiet.output
    assert run(config, "run", "--once", "--trigger", "approval").exit_code == 2
    unit = Path(__file__).parents[2] / "deploy" / "rostersync-once.service"
    assert "run --once --trigger schedule" in unit.read_text(encoding="utf-8")


def test_a_dry_run_lists_its_change_set(config: Path) -> None:
    """`sync --dry-run --changes` prints the change set (in JSON with the run), and a real
    sync then does just that."""
    res = run(config, "sync", "--dry-run", "--changes", "--members", "--json")
    assert res.exit_code == 0, res.output
    changes = as_json(res)["runs"][0]["changes"]  # type: ignore[index]
    assert changes["summary"]["users"]["create"] == 43
    assert changes["summary"]["groups"]["create"] == 102
    store_before = sample_picture(config)
    assert run(config, "sync").exit_code == 0
    assert plain(changes) == difference(store_before, sample_picture(config), "sample")
    shown = run(config, "sync", "--dry-run", "--changes")
    assert "change set of run 3: users: no change; groups: no change" in shown.stdout
    usage = run(config, "sync", "--changes")
    assert usage.exit_code == 2 and "--dry-run" in usage.stderr
    assert run(config, "sync", "--dry-run", "--members").exit_code == 2


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


def test_a_source_another_instance_is_syncing_is_skipped_and_listed_while_the_others_run(
    config: Path,
) -> None:
    """With two sources, one leased by an instance on another host: `sync --json` and
    `run --once --json` still run the other, print one document listing the skipped source
    under `busy` (its holder named), say so on stderr and exit 1; the busy source gets no run."""
    data = yaml.safe_load(config.read_text())
    data["sources"]["second"] = dict(data["sources"]["sample"], enabled=True)
    config.write_text(yaml.safe_dump(data))
    assert run(config, "db", "upgrade").exit_code == 0
    store = Store(f"sqlite:///{config.parent / 'state' / 'rostersync.db'}", create=False)
    try:
        far = remote_holder()
        register(store, far)
        lease(store, "sample", far.owner, timedelta(minutes=5))
    finally:
        store.dispose()
    for command in (["sync", "--json"], ["run", "--once", "--json"]):
        result = run(config, *command)
        assert result.exit_code == 1, result.output
        doc = as_json(result)
        assert isinstance(doc, dict)
        assert [r["source"] for r in doc["runs"]] == ["second"]
        assert doc["busy"] == [
            {"source": "sample", "error": "source 'sample' is being synced by far-away:4242"}
        ]
        assert "rostersync: source 'sample' is being synced by far-away:4242" in result.stderr
    listed = as_json(run(config, "runs", "list", "--json"))
    assert isinstance(listed, list) and {r["source"] for r in listed} == {"second"}
    # A source nobody holds: `busy` is there, empty.
    quiet = as_json(run(config, "sync", "--source", "second", "--json"))
    assert isinstance(quiet, dict) and quiet["busy"] == []


def test_full_and_delta_together_are_a_usage_error(config: Path) -> None:
    """Given both, one would silently win; the command refuses them and runs nothing."""
    for args in (["--full", "--delta"], ["--delta", "--full"]):
        result = run(config, "sync", *args, "--json")
        assert result.exit_code == 2, result.output
        assert "--full and --delta cannot be used together" in result.stderr
        assert result.stdout == ""
    assert not (config.parent / "state" / "rostersync.db").exists()


def test_a_sync_stopped_while_it_processes_its_resyncs_says_its_runs_are_done(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the run succeeded, in the resync jobs it queued: the command exits 1 and
    says the runs are done and the jobs wait for the next drain, not that a run it had not
    finished is failed (the run stays succeeded)."""

    async def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("rostersync.cli.sync.drain_with_progress", interrupted)
    stopped = run(config, "sync")
    assert stopped.exit_code == 1
    assert "a run it had not finished" not in stopped.stderr
    assert (
        "rostersync: stopped while processing the resync jobs its runs queued: the runs are "
        f"done (`rostersync --config {config} runs list`); the jobs left wait for the daemon, "
        "or the next `sync` or `run --once`"
    ) in stopped.stderr
    listed = as_json(run(config, "runs", "list", "--json"))
    assert isinstance(listed, list)
    assert [r["status"] for r in listed] == ["succeeded_with_errors"]


def test_a_dry_run_whose_csv_folder_is_missing_is_refused_before_it_runs(
    config: Path, tmp_path: Path
) -> None:
    """`sync --dry-run --changes --csv missing/changes.csv` exits 2 naming the folder before
    the dry run (a long one on a large district), as `import --report` does; no run is made."""
    assert run(config, "sync").exit_code == 0
    target = tmp_path / "missing" / "changes.csv"
    refused = run(config, "sync", "--dry-run", "--changes", "--csv", str(target))
    assert refused.exit_code == 2, refused.output
    assert (
        f"--csv {target}: the folder '{target.parent}' does not exist or is not writable; "
        "nothing was run"
    ) in refused.stderr
    listed = as_json(run(config, "runs", "list", "--json"))
    assert isinstance(listed, list)
    assert [r["id"] for r in listed] == [1]

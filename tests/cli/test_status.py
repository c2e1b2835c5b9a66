"""`status`: each source's last run, the held runs waiting for an approval, the queue and the
directory, on one screen and in one JSON document."""

from __future__ import annotations

from pathlib import Path

from tests.cli.sample import as_json, cut_drop_to_a_tenth, plant_stopped_jobs, run


def test_status_names_each_sources_last_run_and_the_held_run_to_review(config: Path) -> None:
    """After a good sync and a held one: the source's last run is the held one, the held run
    is named with the commands to review and approve it, and the directory is what the first
    sync made."""
    assert run(config, "sync").exit_code == 0
    cut_drop_to_a_tenth(config)
    assert run(config, "sync").exit_code == 1
    shown = run(config, "status")
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["source", "type", "schedule", "last", "run", "held"]
    assert lines[2].split()[:6] == ["sample", "oneroster_csv", "every", "6h", "run", "2"]
    assert lines[2].split()[6:8] == ["held", "at"] and lines[2].endswith("  1")
    # The commands carry the --config the status was given, to be pasted as they are.
    assert lines[3] == (
        f"held: run 2 of sample waits for an approval: review with `rostersync --config {config} "
        f"runs show 2 --changes`, apply with `rostersync --config {config} runs approve 2`"
    )
    assert lines[4].startswith("resync queue: 0 queued, 0 running, 0 failed for good, ")
    assert lines[5] == (
        "directory: 43 active user(s) (license_limit 5000), 0 archived; 102 group(s)"
    )
    doc = as_json(run(config, "status", "--json"))
    assert isinstance(doc, dict)
    [source] = doc["sources"]
    assert source["name"] == "sample" and source["enabled"] is True
    assert source["schedule"] == "every 6h" and source["held_runs"] == [2]
    assert source["last_run"]["id"] == 2 and source["last_run"]["status"] == "held"
    assert doc["held_runs"] == [{"id": 2, "source": "sample"}]
    assert doc["users"] == {"active": 43, "archived": 0} and doc["groups"] == 102
    assert doc["queue"]["queued"] == 0 and doc["license_limit"] == 5000


def test_status_of_a_database_no_sync_has_run_on_says_never_run(config: Path) -> None:
    """A source that never ran says so; an approved held run is no longer listed as held."""
    assert run(config, "db", "upgrade").exit_code == 0
    shown = run(config, "status")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[2].split() == [
        "sample",
        "oneroster_csv",
        "every",
        "6h",
        "never",
        "run",
        "0",
    ]
    assert run(config, "sync").exit_code == 0
    cut_drop_to_a_tenth(config)
    assert run(config, "sync").exit_code == 1
    assert run(config, "runs", "approve", "2", "--yes").exit_code == 0
    doc = as_json(run(config, "status", "--json"))
    assert isinstance(doc, dict)
    assert doc["held_runs"] == [] and doc["sources"][0]["last_run"]["status"] == "succeeded"


def test_status_counts_running_jobs_of_a_stopped_process_apart(config: Path) -> None:
    """The queue line says how many running jobs a stopped process left (and JSON counts them
    as `running_interrupted`); a live process's job is counted as running only."""
    plant_stopped_jobs(config)
    shown = run(config, "status")
    assert shown.exit_code == 0, shown.output
    assert (
        "resync queue: 0 queued, 3 running, of which 2 left by a stopped process (the next "
        "sync or the daemon puts them back in the queue), 0 failed for good, 0 succeeded"
    ) in shown.stdout.splitlines()
    doc = as_json(run(config, "status", "--json"))
    assert isinstance(doc, dict)
    assert doc["queue"] == {
        "queued": 0,
        "running": 3,
        "running_interrupted": 2,
        "succeeded": 0,
        "failed": 0,
    }


def test_status_without_stopped_jobs_keeps_its_queue_line(config: Path) -> None:
    """No running job of a stopped process: the line is as before, the JSON count 0."""
    assert run(config, "db", "upgrade").exit_code == 0
    shown = run(config, "status")
    assert "resync queue: 0 queued, 0 running, 0 failed for good, 0 succeeded" in shown.stdout
    doc = as_json(run(config, "status", "--json"))
    assert isinstance(doc, dict) and doc["queue"]["running_interrupted"] == 0

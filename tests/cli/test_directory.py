"""`users list`, `groups list` and `queue list` on the bundled sample district: JSON shapes."""

from __future__ import annotations

from pathlib import Path

from rostersync import sampledata
from tests.cli.sample import as_json, plant_stopped_jobs, run


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


def test_queue_list_says_a_running_job_s_process_stopped(config: Path) -> None:
    """A job leased by a killed `sync` reads `running (its process ... stopped; ...)` in the
    table and keeps `"state": "running"` in JSON, marked interrupted with the reason; the live
    process's job is plainly running. Listing writes nothing: the next listing is the same."""
    owner, ids = plant_stopped_jobs(config)
    shown = run(config, "queue", "list")
    assert shown.exit_code == 0, shown.output
    rows = {line.split()[1]: line for line in shown.stdout.splitlines()[2:]}
    assert f"running (its process {owner} (process " in rows["d0@example.org"]
    assert (
        "stopped; the next sync or the daemon puts it back in the queue)" in rows["d1@example.org"]
    )
    assert rows["alive@example.org"].split()[2:4] == ["running", "1"]
    jobs = as_json(run(config, "queue", "list", "--json"))
    assert isinstance(jobs, list)
    by_user = {j["user"]: j for j in jobs}
    for email in ("d0@example.org", "d1@example.org"):
        assert by_user[email]["state"] == "running" and by_user[email]["interrupted"] is True
        assert by_user[email]["interrupted_reason"].startswith(f"its process {owner} ")
    assert by_user["alive@example.org"]["state"] == "running"
    assert by_user["alive@example.org"]["interrupted"] is False
    assert as_json(run(config, "queue", "list", "--json")) == jobs
    assert sorted(j["id"] for j in jobs if j["interrupted"]) == ids


def test_queue_list_limit_below_zero_is_a_usage_error(config: Path) -> None:
    """The command refuses --limit -1 before it reads anything (exit 2)."""
    assert run(config, "db", "upgrade").exit_code == 0
    assert run(config, "queue", "list", "--limit", "-1").exit_code == 2

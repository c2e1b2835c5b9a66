"""`users list`, `groups list` and `queue list` on the bundled sample district: JSON shapes."""

from __future__ import annotations

from pathlib import Path

from rostersync import sampledata
from tests.cli.sample import as_json, run


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

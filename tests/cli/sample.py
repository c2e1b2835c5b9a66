"""The sample district set up for a CLI test, and how the tests drive the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner, Result

from rostersync.cli.main import cli
from rostersync.store.db import Store
from tests.changediff import Picture, picture
from tests.recovery.conftest import dead_pid, leased_job, local_holder, register

REPO = Path(__file__).resolve().parents[2]


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


def as_json(result: Result) -> object:
    return json.loads(result.stdout)


def cut_drop_to_a_tenth(config: Path) -> None:
    drop = config.parent / "sample-district"
    for name in ("users.csv", "enrollments.csv", "classes.csv"):
        lines = (drop / name).read_text().splitlines(keepends=True)
        (drop / name).write_text("".join(lines[: 1 + (len(lines) - 1) // 10]))


def plant_stopped_jobs(config: Path) -> tuple[str, list[int]]:
    """A database with two running jobs of a process of this host that is gone, and one of
    this (live) process; returns the dead owner and the dead one's job ids."""
    assert run(config, "db", "upgrade").exit_code == 0
    store = Store(f"sqlite:///{config.parent / 'state' / 'rostersync.db'}", create=False)
    try:
        dead, alive = local_holder(dead_pid()), local_holder(os.getpid())
        register(store, dead)
        register(store, alive)
        ids = [leased_job(store, f"d{i}@example.org", dead.owner) for i in range(2)]
        leased_job(store, "alive@example.org", alive.owner)
    finally:
        store.dispose()
    return dead.owner, ids


def sample_picture(config: Path) -> Picture:
    """The sample source's users and groups, as the change set speaks of them."""
    store = Store(f"sqlite:///{config.parent / 'state' / 'rostersync.db'}", create=False)
    try:
        return picture(store, "sample")
    finally:
        store.dispose()

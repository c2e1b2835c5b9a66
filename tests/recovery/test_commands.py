"""Every command that syncs or processes jobs first puts right what a killed process of this
host left: its run, its source lease, its leased jobs and its staging."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from sqlalchemy import text

from rostersync.cli.main import cli
from rostersync.store.db import Store
from tests.recovery.conftest import (
    dead_pid,
    lease,
    lease_owner,
    leased_job,
    local_holder,
    register,
    run_row,
    running_run,
    staged_rows,
)

REPO = Path(__file__).resolve().parents[2]
TEACHER = "ada.phillips40@springfield.example.org"  # a teacher of the sample district


def write_config(tmp_path: Path, store: Store, **overrides: Any) -> Path:
    """The example config on the sample district, with its database on ``store``."""
    shutil.copytree(REPO / "config" / "sample-district", tmp_path / "sample-district")
    data = yaml.safe_load((REPO / "config" / "rostersync.example.yaml").read_text())
    data["database"] = store.url
    data["logging"] = {"level": "warning", "format": "json"}
    data.update(overrides)
    path = tmp_path / "rostersync.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def invoke(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


COMMANDS: dict[str, tuple[list[str], dict[str, Any], int]] = {
    # id: (arguments, config overrides, expected exit code)
    "sync": (["sync"], {}, 0),
    "run --once": (["run", "--once"], {}, 0),
    "resync --wait": (["resync", "--user", TEACHER, "--wait"], {}, 0),
    "runs approve": (["runs", "approve", "999"], {}, 2),  # no such run: refused after recovery
    "teachers import": (
        ["teachers", "import", "--source", "sample", "--email", TEACHER],
        {"provisioning": {"auto_create_users": False, "default_role": "Teacher"}},
        0,
    ),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_command_first_recovers_what_a_killed_process_left(
    store: Store, tmp_path: Path, command: str
) -> None:
    """The killed process's run fails as interrupted, its staging is cleared, its lease is
    free, and the job it had leased runs now, counted once."""
    args, overrides, code = COMMANDS[command]
    config = write_config(tmp_path, store, **overrides)
    first = invoke(config, "sync")
    assert first.exit_code == 0, first.output
    killed = local_holder(dead_pid())
    register(store, killed)
    lease(store, "sample", killed.owner, timedelta(minutes=30))
    run_id = running_run(store, "sample")
    job_id = leased_job(store, "left.behind@example.org", killed.owner)

    result = invoke(config, *args)

    assert result.exit_code == code, result.output
    status, error = run_row(store, run_id)
    assert status == "failed" and error is not None and error.startswith("interrupted")
    assert staged_rows(store, run_id) == 0
    assert lease_owner(store, "sample") is None
    with store.read() as conn:
        state, attempts, owner = conn.execute(
            text("SELECT state, attempts, lease_owner FROM resync_job WHERE id = :j"),
            {"j": job_id},
        ).one()
        instances = [r[0] for r in conn.execute(text("SELECT id FROM instance"))]
    processes_jobs = command != "runs approve"
    assert (state, attempts) == (("succeeded", 1) if processes_jobs else ("queued", 0))
    assert owner is None
    assert instances == []  # the command's own row is gone with it, the dead one's too

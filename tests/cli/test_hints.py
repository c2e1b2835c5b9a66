"""The commands a message tells the operator to run carry the `--config` the command was given
on its command line, shell-quoted, so that a newcomer can paste them; a config found through
$ROSTERSYNC_CONFIG or the default place is found the same way by the pasted command."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from rostersync import hints
from rostersync.cli.main import cli, main
from tests.cli.sample import REPO, cut_drop_to_a_tenth


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The example config on the sample district, in a folder whose name needs quoting."""
    folder = tmp_path / "my rosters"
    shutil.copytree(REPO / "config" / "sample-district", folder / "sample-district")
    data = yaml.safe_load((REPO / "config" / "rostersync.example.yaml").read_text())
    data["database"] = "sqlite:///state/rostersync.db"
    (folder / "state").mkdir()
    data["logging"] = {"level": "warning", "format": "json"}
    path = folder / "rostersync.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def backticked(text: str) -> list[str]:
    return re.findall(r"`(rostersync [^`]*)`", text)


def held_run(config: Path) -> Result:
    """A good sync, then one the shrunken drop holds (run 2)."""
    assert invoke("--config", str(config), "sync").exit_code == 0
    cut_drop_to_a_tenth(config)
    held = invoke("--config", str(config), "sync")
    assert held.exit_code == 1, held.output
    return held


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_held_runs_hints_carry_the_config_given_and_work_when_pasted(
    config: Path, where: str
) -> None:
    """`sync --config 'my rosters/rostersync.yaml'` that is held says `rostersync --config
    '.../my rosters/rostersync.yaml' runs show 2 --changes` and `... runs approve 2`, quoted,
    whether --config came before the command or after it; pasted, both work."""
    held = held_run(config)
    quoted = shlex.quote(str(config))
    assert quoted != str(config)  # the space needs quoting
    assert (
        f"review with `rostersync --config {quoted} runs show 2 --changes`, "
        f"apply with `rostersync --config {quoted} runs approve 2`"
    ) in held.stdout
    status = (
        invoke("--config", str(config), "status")
        if where == "before"
        else invoke("status", "--config", str(config))
    )
    review, approve = backticked(status.stdout)
    assert review == f"rostersync --config {quoted} runs show 2 --changes"
    shown = invoke(*shlex.split(review)[1:])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.startswith("change set of run 2: ")
    approved = invoke(*shlex.split(approve)[1:], "--yes")
    assert approved.exit_code == 0, approved.output
    assert "run 2  source sample  full: succeeded" in approved.stdout


def test_a_config_from_the_environment_is_not_added_to_the_hints(config: Path) -> None:
    """With $ROSTERSYNC_CONFIG (or the default place) the pasted command finds the config
    the same way: the hints stay `rostersync runs approve 2`."""
    env = {"ROSTERSYNC_CONFIG": str(config)}
    assert invoke("sync", env=env).exit_code == 0
    cut_drop_to_a_tenth(config)
    held = invoke("sync", env=env)
    assert held.exit_code == 1, held.output
    assert "apply with `rostersync runs approve 2`" in held.stdout
    assert backticked(invoke("status", env=env).stdout) == [
        "rostersync runs show 2 --changes",
        "rostersync runs approve 2",
    ]


def test_an_error_from_below_the_cli_carries_the_config_too(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A listing before the first sync says the database does not exist and that `db upgrade`
    creates it: with the --config given, which then works as pasted."""
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config), "users", "list"])
    assert exit_.value.code == 1
    [upgrade] = backticked(capsys.readouterr().err)
    assert upgrade == f"rostersync --config {shlex.quote(str(config))} db upgrade"
    assert invoke(*shlex.split(upgrade)[1:]).exit_code == 0
    assert invoke("--config", str(config), "users", "list").exit_code == 0


def test_no_config_is_carried_once_the_command_has_ended(config: Path) -> None:
    """The --config of one command does not stick to what runs after it in the process
    (tests, an embedding program)."""
    assert invoke("--config", str(config), "config", "check").exit_code == 0
    assert hints.command("runs list") == "rostersync runs list"

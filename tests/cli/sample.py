"""The sample district set up for a CLI test, and how the tests drive the command line."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

from rostersync.cli.main import cli
from rostersync.store.db import Store
from tests.changediff import Picture, picture

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


def sample_picture(config: Path) -> Picture:
    """The sample source's users and groups, as the change set speaks of them."""
    store = Store(f"sqlite:///{config.parent / 'state' / 'rostersync.db'}", create=False)
    try:
        return picture(store, "sample")
    finally:
        store.dispose()

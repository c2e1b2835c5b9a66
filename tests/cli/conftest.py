"""The `config` fixture every CLI test module shares (a module may define its own)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.cli.sample import REPO


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The example config, with its database in tmp_path and the sample district copied beside it."""
    shutil.copytree(REPO / "config" / "sample-district", tmp_path / "sample-district")
    data = yaml.safe_load((REPO / "config" / "rostersync.example.yaml").read_text())
    data["database"] = "sqlite:///state/rostersync.db"
    (tmp_path / "state").mkdir()  # rostersync creates the database file, never its folder
    data["logging"] = {"level": "warning", "format": "json"}
    path = tmp_path / "rostersync.yaml"
    path.write_text(yaml.safe_dump(data))
    return path

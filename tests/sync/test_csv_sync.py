"""Syncing a OneRoster CSV drop through the plug-in path (entry point, config, connector)."""

from __future__ import annotations

from pathlib import Path

import yaml

from rostersync.config.loader import load_settings_text
from rostersync.sampledata import DistrictSpec, generate_district, write_oneroster_csv
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from tests.sync.helpers import snapshot, users


def settings_for(folder: Path, tmp_path: Path) -> object:
    data = {
        "organization": "Springfield",
        "roles": ["Teacher"],
        "sites": ["North High"],
        "provisioning": {"default_role": "Teacher", "default_site": "North High"},
        "sources": {"csv": {"type": "oneroster_csv", "path": str(folder)}},
    }
    return load_settings_text(yaml.safe_dump(data), base_dir=tmp_path)


async def test_csv_file_breaking_half_way_changes_nothing(store: Store, tmp_path: Path) -> None:
    """An enrollments.csv that turns to garbage half-way fails the run and leaves everything as it was."""
    folder = tmp_path / "drop"
    write_oneroster_csv(
        generate_district(DistrictSpec(teachers=10, students=200, classes=20)), folder
    )
    settings = settings_for(folder, tmp_path)
    engine = SyncEngine(settings, store)  # type: ignore[arg-type]
    first = await engine.sync("csv")
    await engine.drain()
    assert first.status in ("succeeded", "succeeded_with_errors")
    assert len(users(store)) > 5
    before = snapshot(store)

    enrollments = folder / "enrollments.csv"
    data = enrollments.read_bytes()
    half = len(data) // 2
    # Drop a teacher's enrollments from the first half and corrupt the second half: if the
    # first half were applied, that teacher would be archived.
    enrollments.write_bytes(
        data[:half].replace(b",teacher,", b",aide,") + b"\xff\xfe\xfa broken \xff\n" + data[half:]
    )
    report = await engine.sync("csv")
    assert report.status == "failed"
    assert "enrollments.csv" in (report.error or "")
    assert snapshot(store) == before

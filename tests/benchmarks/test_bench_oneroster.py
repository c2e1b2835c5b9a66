"""The benchmark's district with GUID sourcedIds (``--ids guid``) is the same district, and
its process that stays up runs syncs."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from rostersync.sampledata import DistrictSpec
from tests.benchmarks.bench_oneroster import (
    SCALES,
    WarmProcess,
    aged_roster,
    config_document,
    guid,
)
from tests.fakes.oneroster_server import FakeOneRoster

GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_guid_ids_keep_every_reference_and_nothing_else_changes() -> None:
    serial = aged_roster(SCALES["S"], seed=3)
    guids = aged_roster(SCALES["S"], seed=3, ids="guid")
    persons = {p.sourced_id for p in guids.persons}
    classes = {c.sourced_id for c in guids.classes}
    orgs = {o.sourced_id for o in guids.orgs}
    assert all(GUID.match(i) for i in persons | classes | orgs)
    assert len(persons) == len(serial.persons) and len(classes) == len(serial.classes)
    # Every reference points at a record of the district, as before.
    assert all(e.class_id in classes and e.user_id in persons for e in guids.enrollments)
    assert all(c.school_id in orgs for c in guids.classes if c.school_id)
    assert all(set(p.org_ids) <= orgs for p in guids.persons)
    # Same records otherwise: names, roles, emails, dates, and enrollments per class.
    for before, after in zip(serial.persons, guids.persons, strict=True):
        assert after.sourced_id == guid(before.sourced_id)
        assert (after.given_name, after.email, after.role, after.date_last_modified) == (
            before.given_name,
            before.email,
            before.role,
            before.date_last_modified,
        )
    per_class = Counter(guid(e.class_id) for e in serial.enrollments)
    assert Counter(e.class_id for e in guids.enrollments) == per_class


@pytest.mark.slow
def test_the_warm_process_runs_syncs_as_the_daemon_does(tmp_path: Path) -> None:
    """The benchmark's process that stays up (``_warm``): a first load, a no-op that changes
    nothing, then a renamed class seen by a full run and by a delta run, each timed in the
    child and reported as its run ended; closing it ends the child."""
    from tests.e2e.test_oneroster_e2e import aged_district

    spec = DistrictSpec(seed=3, schools=2, teachers=4, students=30, classes=6, students_per_class=5)
    with FakeOneRoster(aged_district(spec)) as srv:
        config = tmp_path / "rostersync.yaml"
        source = srv.source_config(page_size=20)
        document = config_document(f"sqlite:///{tmp_path / 'bench.db'}", source)
        config.write_text(yaml.safe_dump(document), encoding="utf-8")
        warm = WarmProcess(config, tmp_path)
        try:
            first = warm.run("full")
            noop = warm.run("full")
            srv.mutate_fraction(0.5, seed=1)
            full = warm.run("full")
            srv.mutate_fraction(0.5, seed=2)
            delta = warm.run("delta")
        finally:
            warm.close()
    assert first.counts["users_created"] > 0 and first.counts["groups_created"] > 0
    assert noop.counts["groups_updated"] == noop.counts["users_created"] == 0
    assert full.mode == "full" and full.counts["groups_updated"] > 0
    assert delta.mode == "delta" and delta.counts["groups_updated"] > 0
    assert all(r.seconds > 0 for r in (first, noop, full, delta))
    assert warm._proc.returncode == 0

"""The fetch and stage step: batches staged while the fetch goes on."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from rostersync.config.models import Settings
from rostersync.source.rows import StagedBatch
from rostersync.source.testdata import small_roster
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from rostersync.sync.known import KnownRows
from rostersync.sync.repeats import Repeats
from tests.sync.helpers import groups, sync, users


async def test_batches_arriving_during_a_slow_staging_write_are_staged_together(
    store: Store,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The fetch does not wait for each staging write: batches that arrive meanwhile go in
    the next write together, in arrival order (a repeated sourcedId keeps its last version),
    and the run ends as an ordinary one does."""
    roster = small_roster()
    # t-1 sent twice, the later version renamed: the later one must win.
    renamed = replace(next(p for p in roster.persons if p.sourced_id == "t-1"), given_name="Ida")
    roster.enrollments = [*roster.enrollments, renamed]  # type: ignore[list-item]
    writes: list[int] = []
    real_stage = SyncEngine._stage

    def slow_stage(
        self: SyncEngine,
        run_id: int,
        batch: list[StagedBatch],
        known: KnownRows | None = None,
        held: StagedBatch | None = None,
        repeats: Repeats | None = None,
        *,
        last: bool = False,
    ) -> None:
        writes.append(sum(map(len, batch)))
        time.sleep(0.05)
        real_stage(self, run_id, batch, known, held, repeats, last=last)

    monkeypatch.setattr(SyncEngine, "_stage", slow_stage)
    report = await sync(make_settings(), store, roster)  # batches of 7 records
    assert report.status == "succeeded", report.error
    batches = -(-len(roster.records()) // 7)
    assert sum(writes) == len(roster.records())
    assert 1 < len(writes) < batches  # later writes took several batches at once
    assert users(store)["ada@example.org"]["display_name"] == "Ida Lovelace"

    monkeypatch.setattr(SyncEngine, "_stage", real_stage)
    other = Store(f"sqlite:///{tmp_path / 'plain.db'}")
    other.upgrade()
    try:
        plain = await sync(make_settings(), other, roster)
        assert plain.counts == report.counts
        assert users(other).keys() == users(store).keys()
        assert groups(other) == groups(store)
    finally:
        other.dispose()

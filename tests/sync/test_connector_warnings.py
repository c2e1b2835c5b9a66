"""A connector's warnings (what it forgave while fetching) reach the run's report."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime

from rostersync.config.models import Settings
from rostersync.source.connector import FetchMode
from rostersync.source.records import MemoryRoster, RosterRecord
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine


class WarningConnector(MemoryConnector):
    """The memory connector, with warnings that are complete only once its fetch has ended."""

    def __init__(self, warnings: list[str]) -> None:
        super().__init__(small_roster(), batch_size=3)
        self.to_report = warnings
        self.warnings: list[str] = []

    async def fetch(
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord]]:
        self.warnings = []
        async for batch in super().fetch(mode, since):
            yield batch
        self.warnings = list(self.to_report)


async def test_warnings_reach_the_report_of_applied_held_and_dry_runs(
    make_settings: Callable[..., Settings], store: Store
) -> None:
    """The connector's warnings, complete once its fetch ends, are in the run's report, after
    the engine's own, for an applied run, a dry run and a held run alike; secrets are scrubbed
    and each warning is cut at 1,000 characters."""
    said = [
        "users.csv line 7: dateLastModified '1/05/2023' is not an ISO 8601 date-time",
        "a cell said Authorization: Bearer abc.def.ghi",
        "x" * 5000,
    ]
    connector = WarningConnector(said)
    engine = SyncEngine(make_settings(), store, connectors={"mem": connector})
    dry = await engine.sync("mem", dry_run=True)
    applied = await engine.sync("mem")
    connector.roster = MemoryRoster()  # an empty pull after a good one is held
    held = await engine.sync("mem")
    assert (dry.status, applied.status, held.status) == ("succeeded", "succeeded", "held")
    for report in (dry, applied, held):
        assert report.warnings[0] == said[0]
        assert "abc.def.ghi" not in report.warnings[1] and "[redacted]" in report.warnings[1]
        assert report.warnings[2] == "x" * 1000

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rostersync.errors import DeltaUnsupportedError
from rostersync.source.connector import Connector, FetchMode
from rostersync.source.testdata import small_roster
from rostersync.source.testing import ConnectorContract, MemoryConnector


class TestMemoryConnector(ConnectorContract):
    @pytest.fixture
    async def connector(self) -> AsyncIterator[Connector]:
        c = MemoryConnector(small_roster(), batch_size=4)
        yield c
        await c.aclose()


async def test_memory_connector_refuses_delta_when_not_enabled() -> None:
    """A connector without delta support raises DeltaUnsupportedError for a delta fetch."""
    c = MemoryConnector(small_roster())
    with pytest.raises(DeltaUnsupportedError):
        async for _ in c.fetch(FetchMode.DELTA, None):
            pass


async def test_live_answer_lists_the_rosters_rejections_that_concern_the_teacher() -> None:
    """The memory connector's live answer lists the rejected classes and users of the
    teacher's answer (and those naming no id), not another teacher's."""
    from rostersync.source.records import Rejected, TeacherRef

    roster = small_roster()
    mine = [
        Rejected("class", "c-2", "no title"),
        Rejected("user", "t-1", "no role"),
        Rejected("user", "s-4", "no role"),
        Rejected("user", None, "missing sourcedId"),
    ]
    others = [Rejected("class", "c-3", "no title"), Rejected("user", "t-3", "no role")]
    roster.rejected = [*mine, *others]
    got = await MemoryConnector(roster).fetch_teacher(TeacherRef("t-1", None))
    assert got.rejected == mine

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

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from connectors.memory import MemoryConnector
from rostersync.errors import DeltaUnsupportedError
from rostersync.source.connector import Connector, FetchMode
from tests.connectors.contract import ConnectorContract
from tests.rosterdata import small_roster


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

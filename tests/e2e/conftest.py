"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.oneroster import connector as connector_module
from connectors.oneroster import decode


@pytest.fixture
def pooled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every page goes to the decode pool when the source has workers; lists the pools
    started (their sizes)."""
    monkeypatch.setattr(decode, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(decode, "POOL_MIN_RECORDS", 0)
    started: list[int] = []
    real_start = decode.start_pool

    def counting_start(workers: int) -> Any:
        started.append(workers)
        return real_start(workers)

    monkeypatch.setattr(connector_module, "start_pool", counting_start)
    return started

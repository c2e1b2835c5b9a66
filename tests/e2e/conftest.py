"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def pooled(pool_starts: Callable[[int], list[int]]) -> list[int]:
    """Every page goes to the decode pool when the source has workers; lists the pools
    started (their sizes)."""
    return pool_starts(0)

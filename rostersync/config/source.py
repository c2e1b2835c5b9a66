"""The keys every source shares. Each connector subclasses :class:`SourceConfig` with its own."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from pydantic import Field

from rostersync.config.schedule import Schedule
from rostersync.config.types import Duration, StrictModel


class SourceSafety(StrictModel):
    """Per-source overrides of the top-level `safety` block."""

    max_removals: int | None = Field(default=None, ge=0)
    max_removal_percent: float | None = Field(default=None, ge=0, le=100)
    min_source_ratio: float | None = Field(default=None, ge=0, le=1)


class SourceConfig(StrictModel):
    """Keys common to every source type. Connectors add their own fields in a subclass."""

    type: str
    enabled: bool = True
    schedule: Schedule | None = None
    mode: Literal["full", "delta"] = "full"
    full_every: Duration = Field(
        default=timedelta(hours=24), description="in delta mode, run a full sync this often"
    )
    safety: SourceSafety | None = None

    def http_client_options(self) -> dict[str, Any]:
        """Keyword arguments for the `httpx.AsyncClient` the engine builds for this source."""
        return {}


__all__ = ["Schedule", "SourceConfig", "SourceSafety"]

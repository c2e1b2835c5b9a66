"""The keys every source shares. Each connector subclasses :class:`SourceConfig` with its own."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from pydantic import Field, model_validator

from rostersync.config.types import Duration, StrictModel


class Schedule(StrictModel):
    """When the daemon runs this source: ``{interval: 1h}`` or ``{cron: "0 2 * * *"}``."""

    interval: Duration | None = None
    cron: str | None = Field(default=None, description="five-field cron expression, local time")
    jitter: Duration = Field(
        default=timedelta(seconds=30), description="random delay added to each start"
    )

    @model_validator(mode="after")
    def _one_trigger(self) -> Schedule:
        if (self.interval is None) == (self.cron is None):
            raise ValueError("give exactly one of interval or cron")
        if self.interval is not None and self.interval.total_seconds() < 1:
            raise ValueError("interval must be at least 1s")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(f"cron {self.cron!r} must have five fields (m h dom mon dow)")
        return self


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

"""The keys every source shares. Each connector subclasses :class:`SourceConfig` with its own."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from rostersync.config.schedule import Schedule
from rostersync.config.types import Duration, StrictModel


class SourceSafety(StrictModel):
    """Per-source overrides of the top-level `safety` block."""

    max_removals: int | None = Field(default=None, ge=0)
    max_removal_percent: float | None = Field(default=None, ge=0, le=100)
    min_source_ratio: float | None = Field(default=None, ge=0, le=1)
    hold_on_repeats: bool | None = None


class TermsConfig(StrictModel):
    """Which classes count, by their academic sessions (terms)."""

    mode: Literal["all", "current"] = Field(
        default="all",
        description="all: every class counts; current: a class counts only while one of its "
        "terms runs (classes without terms always count)",
    )
    grace_days: int = Field(
        default=14,
        ge=0,
        le=366,
        description="a term runs from this many days before its start date to this many days "
        "after its end date",
    )


class SchoolScope(StrictModel):
    """Which schools of a source are synced; the others' records are ignored."""

    include: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="school sourcedIds or names; when given, only these schools (and the "
        "orgs under them) are synced",
    )
    exclude: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="school sourcedIds or names (and the orgs under them) never synced",
    )

    @model_validator(mode="after")
    def _not_both(self) -> SchoolScope:
        both = sorted(set(self.include) & set(self.exclude))
        if both:
            raise ValueError(f"{', '.join(map(repr, both))} is both included and excluded")
        return self


def _kind_of(value: object) -> str:
    """What kind of YAML value was written, named rather than shown."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    return "a string" if isinstance(value, str) else type(value).__name__


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

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_is_a_mapping(cls, value: Any) -> Any:
        """`schedule: hourly` (or `1h`, `0 2 * * *`) is refused saying what a schedule looks
        like, where pydantic's "valid dictionary or instance of Schedule" names a class."""
        if value is None or isinstance(value, Mapping | Schedule):
            return value
        raise ValueError(
            f"must be a mapping: {{interval: 1h}} or {{cron: '0 2 * * *'}}, not {_kind_of(value)}"
        )

    def prepare_http(self) -> None:
        """Start, in the background, what http_client_options will need and is slow to make
        (a TLS context). A command about to sync calls it before its heavy imports; the
        default has nothing to prepare."""

    def prepare_workers(self, store_dialect: str | None = None) -> None:
        """Start, in the background, the processes a full fetch of this source hands its
        pages to, so that they load their modules while this process loads its own. A
        command about to sync in a process of its own calls it before its heavy imports (a
        process that stays alive starts them when it needs them), with the dialect of the
        store (``sqlite``, ``postgresql``) those processes may read; the default has none."""

    def http_client_options(self) -> dict[str, Any]:
        """Keyword arguments for the `httpx.AsyncClient` the engine builds for this source."""
        return {}


class ScopedSourceConfig(SourceConfig):
    """A source whose classes belong to schools and terms (OneRoster): it may be scoped."""

    terms: TermsConfig = Field(default_factory=TermsConfig)
    schools: SchoolScope = Field(default_factory=SchoolScope)

    def scope_fingerprint(self) -> int:
        """0 for the defaults (nothing scoped); else a number that changes with the settings
        that decide which records are in scope."""
        if self.terms.mode == "all" and not self.schools.include and not self.schools.exclude:
            return 0
        text = json.dumps(
            [self.terms.model_dump(mode="json"), self.schools.model_dump(mode="json")],
            sort_keys=True,
        )
        return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


__all__ = [
    "Schedule",
    "SchoolScope",
    "ScopedSourceConfig",
    "SourceConfig",
    "SourceSafety",
    "TermsConfig",
]

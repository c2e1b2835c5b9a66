"""The ``oneroster_csv`` connector: its config, the fetch, and the live teacher read.

CSV files carry no change filter: ``supports_delta`` is false and a delta fetch raises
:class:`~rostersync.errors.DeltaUnsupportedError`. ``fetch_teacher`` re-reads the files.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import Field

from connectors.oneroster_csv.entities import CLASSES, ENROLLMENTS, USERS, records
from connectors.oneroster_csv.files import Bundle
from connectors.oneroster_csv.manifest import data_files
from connectors.oneroster_csv.notes import Notes
from rostersync.config.source import SourceConfig
from rostersync.config.types import ConfigPath
from rostersync.connector import ConnectorContext, ConnectorPlugin, FetchMode
from rostersync.errors import DeltaUnsupportedError, FatalSourceError
from rostersync.records import (
    STUDENT,
    TEACHER,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterPerson,
    RosterRecord,
    TeacherRef,
    TeacherRoster,
)


class CsvSourceConfig(SourceConfig):
    """A OneRoster 1.1 bulk CSV drop."""

    type: Literal["oneroster_csv"]
    path: ConfigPath = Field(
        description="a folder or a .zip of OneRoster 1.1 CSV files (relative to the config file)"
    )
    encoding: str = Field(default="utf-8-sig", description="text encoding of the CSV files")
    batch_size: int = Field(default=1000, ge=1, description="records per batch handed on")


class OneRosterCsvConnector:
    """Reads a OneRoster 1.1 bulk CSV drop (see the module docstring for the rules)."""

    def __init__(
        self,
        source: str,
        path: Path,
        *,
        encoding: str = "utf-8-sig",
        batch_size: int = 1000,
    ) -> None:
        try:
            # Not codecs.lookup(): it also knows bytes-to-bytes codecs (hex, rot13, base64).
            "a".encode(encoding)
        except LookupError:
            raise FatalSourceError(source, f"unknown text encoding {encoding!r}") from None
        self.source = source
        self.path = path
        self.encoding = encoding
        self.batch_size = batch_size
        self.closed = False
        #: the last fetch's warnings, for the run's report (complete once the fetch ends)
        self.warnings: list[str] = []

    @property
    def supports_delta(self) -> bool:
        return False

    def _files(self, bundle: Bundle) -> list[str]:
        return data_files(bundle, self.encoding)

    def _iter_records(self, bundle: Bundle, notes: Notes) -> Iterator[RosterRecord]:
        for name in self._files(bundle):
            yield from records(bundle, name, self.encoding, notes)

    async def fetch(
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord]]:
        if mode is FetchMode.DELTA:
            raise DeltaUnsupportedError(self.source, "a OneRoster CSV drop has no delta filter")
        self.warnings = []
        notes = Notes()
        bundle = Bundle(self.source, self.path)
        try:
            batch: list[RosterRecord] = []
            for record in self._iter_records(bundle, notes):
                batch.append(record)
                if len(batch) >= self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:
            bundle.close()
        self.warnings = notes.lines()

    def _teacher_roster(self, teacher: TeacherRef) -> TeacherRoster:
        """Four passes over the files, keeping only what concerns this teacher."""
        bundle = Bundle(self.source, self.path)
        try:
            files = self._files(bundle)
            notes = Notes()  # a live read reports no warnings

            def read(name: str) -> Iterator[RosterRecord]:
                return records(bundle, name, self.encoding, notes) if name in files else iter(())

            class_ids = {
                r.class_id
                for r in read(ENROLLMENTS)
                if isinstance(r, RosterEnrollment)
                and r.user_id == teacher.sourced_id
                and r.role == TEACHER
            }
            enrollments = [
                r
                for r in read(ENROLLMENTS)
                if isinstance(r, RosterEnrollment) and r.class_id in class_ids
            ]
            student_ids = {e.user_id for e in enrollments if e.role == STUDENT}
            roster = TeacherRoster(teacher=None, enrollments=enrollments)
            for r in read(CLASSES):
                if isinstance(r, RosterClass) and r.sourced_id in class_ids:
                    roster.classes.append(r)
                elif isinstance(r, Rejected) and r.sourced_id in class_ids:
                    roster.rejected.append(r)
            for r in read(USERS):
                if isinstance(r, RosterPerson):
                    if r.sourced_id == teacher.sourced_id:
                        roster.teacher = r
                    elif r.sourced_id in student_ids:
                        roster.persons.append(r)
                elif isinstance(r, Rejected) and (
                    r.sourced_id == teacher.sourced_id or r.sourced_id in student_ids
                ):
                    roster.rejected.append(r)
            return roster
        finally:
            bundle.close()

    async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
        # A one-shot blocking read: a thread keeps the event loop (and other workers) moving.
        return await asyncio.to_thread(self._teacher_roster, teacher)

    async def aclose(self) -> None:
        self.closed = True


def create(ctx: ConnectorContext) -> OneRosterCsvConnector:
    config = ctx.config
    if not isinstance(config, CsvSourceConfig):
        raise TypeError(f"oneroster_csv needs a CsvSourceConfig, got {type(config).__name__}")
    return OneRosterCsvConnector(
        ctx.source, config.path, encoding=config.encoding, batch_size=config.batch_size
    )


PLUGIN = ConnectorPlugin(
    type="oneroster_csv",
    config_model=CsvSourceConfig,
    create=create,
    description="OneRoster 1.1 bulk CSV files in a folder or a zip",
)

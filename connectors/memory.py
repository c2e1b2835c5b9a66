"""An in-memory connector: a roster held in Python objects. Used by tests and as the model
of the smallest correct connector."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime

from rostersync.errors import DeltaUnsupportedError, FatalSourceError
from rostersync.source.connector import FetchMode
from rostersync.source.records import (
    STUDENT,
    TEACHER,
    AcademicSession,
    MemoryRoster,
    Rejected,
    RosterRecord,
    TeacherRef,
    TeacherRoster,
)

__all__ = ["MemoryConnector", "MemoryRoster"]


class MemoryConnector:
    """Serves a :class:`MemoryRoster`. ``fail_after`` batches, it raises (to test failed runs)."""

    def __init__(
        self,
        roster: MemoryRoster,
        *,
        batch_size: int = 100,
        fail_after: int | None = None,
        delta: bool = False,
    ) -> None:
        self.roster = roster
        self.batch_size = batch_size
        self.fail_after = fail_after
        self._delta = delta
        self.closed = False

    @property
    def supports_delta(self) -> bool:
        return self._delta

    @property
    def academic_sessions(self) -> dict[str, AcademicSession]:
        return {s.sourced_id: s for s in self.roster.sessions}

    async def fetch(
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord]]:
        if mode is FetchMode.DELTA and not self._delta:
            raise DeltaUnsupportedError("memory", "delta filter not supported")
        records = self.roster.records()
        if mode is FetchMode.DELTA and since is not None:
            records = [
                r
                for r in records
                if isinstance(r, Rejected)
                or (r.date_last_modified is not None and r.date_last_modified > since)
            ]
        for n, start in enumerate(range(0, len(records), self.batch_size)):
            if self.fail_after is not None and n >= self.fail_after:
                raise FatalSourceError("memory", "connection lost half-way (injected)")
            yield records[start : start + self.batch_size]

    async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
        person = next((p for p in self.roster.persons if p.sourced_id == teacher.sourced_id), None)
        class_ids = {
            e.class_id
            for e in self.roster.enrollments
            if e.user_id == teacher.sourced_id and e.role == TEACHER
        }
        classes = [c for c in self.roster.classes if c.sourced_id in class_ids]
        enrollments = [e for e in self.roster.enrollments if e.class_id in class_ids]
        student_ids = {e.user_id for e in enrollments if e.role == STUDENT}
        persons = [p for p in self.roster.persons if p.sourced_id in student_ids]
        return TeacherRoster(
            teacher=person, classes=classes, enrollments=enrollments, persons=persons
        )

    async def aclose(self) -> None:
        self.closed = True

"""For connector authors: the in-memory connector and the contract every connector passes.

:class:`MemoryConnector` serves a :class:`MemoryRoster` held in Python objects; rostersync's
own tests sync it, and it is the model of the smallest correct connector.

:class:`ConnectorContract` is the shared suite (it needs pytest, with pytest-asyncio in
``asyncio_mode = "auto"``). Subclass it in a test module and provide the ``connector`` fixture,
serving :func:`~rostersync.source.testdata.small_roster` in the connector's own format (or, for
sources whose ids differ, override ``expected``)::

    from rostersync.source.testing import ConnectorContract

    class TestMyConnector(ConnectorContract):
        @pytest.fixture
        def connector(self) -> Connector: ...

Ids are compared as the connector reports them; emails lower-cased; sets, not order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime

import pytest

from rostersync.errors import DeltaUnsupportedError, FatalSourceError
from rostersync.source.connector import Connector, FetchMode
from rostersync.source.records import (
    STUDENT,
    TEACHER,
    AcademicSession,
    MemoryRoster,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterPerson,
    RosterRecord,
    TeacherRef,
    TeacherRoster,
)
from rostersync.source.testdata import small_roster

__all__ = [
    "ConnectorContract",
    "MemoryConnector",
    "MemoryRoster",
    "classes",
    "collect",
    "enrollments",
    "people",
    "small_roster",
]


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
        records = self.sent()
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

    def sent(self) -> list[RosterRecord]:
        """The records a fetch sends, in order (a subclass may send others than it answers
        a live read with)."""
        return self.roster.records()

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
        # The rejections that concern the answer, as real connectors list them: a rejection
        # naming no id may be any record of its kind. A rejected enrollment says neither its
        # class nor its user here, so none is listed (a test adds those it wants).
        people = {teacher.sourced_id, *student_ids}
        rejected = [
            r
            for r in self.roster.rejected
            if (r.entity == "class" and (r.sourced_id is None or r.sourced_id in class_ids))
            or (r.entity == "user" and (r.sourced_id is None or r.sourced_id in people))
        ]
        return TeacherRoster(
            teacher=person,
            classes=classes,
            enrollments=enrollments,
            persons=persons,
            rejected=rejected,
        )

    async def aclose(self) -> None:
        self.closed = True


async def collect(connector: Connector, mode: FetchMode = FetchMode.FULL) -> list[RosterRecord]:
    out: list[RosterRecord] = []
    async for batch in connector.fetch(mode, None):
        assert isinstance(batch, Sequence)
        out.extend(batch)
    return out


def people(records: list[RosterRecord]) -> set[tuple[str, str, str | None]]:
    return {
        (r.sourced_id, r.role, (r.email or "").lower() or None)
        for r in records
        if isinstance(r, RosterPerson)
    }


def classes(records: list[RosterRecord]) -> set[tuple[str, str]]:
    return {(r.sourced_id, r.title) for r in records if isinstance(r, RosterClass)}


def enrollments(records: list[RosterRecord]) -> set[tuple[str, str, str]]:
    return {(r.class_id, r.user_id, r.role) for r in records if isinstance(r, RosterEnrollment)}


class ConnectorContract:
    """Behaviour every connector shares; subclasses supply the `connector` fixture."""

    @pytest.fixture
    def expected(self) -> MemoryRoster:
        return small_roster()

    async def test_full_fetch_yields_every_person(
        self, connector: Connector, expected: MemoryRoster
    ) -> None:
        """A full fetch yields each person once, with role and email."""
        got = await collect(connector)
        assert people(got) == people(list(expected.persons))

    async def test_full_fetch_yields_classes_and_enrollments(
        self, connector: Connector, expected: MemoryRoster
    ) -> None:
        """A full fetch yields every class and every enrollment."""
        got = await collect(connector)
        assert classes(got) == classes(list(expected.classes))
        assert enrollments(got) == enrollments(list(expected.enrollments))

    async def test_full_fetch_rejects_nothing_on_clean_data(self, connector: Connector) -> None:
        """Clean data produces no rejections."""
        got = await collect(connector)
        assert [r for r in got if isinstance(r, Rejected)] == []

    async def test_enrollments_reference_fetched_records(self, connector: Connector) -> None:
        """Every enrollment points at a class and a person the same fetch yielded."""
        got = await collect(connector)
        person_ids = {r.sourced_id for r in got if isinstance(r, RosterPerson)}
        class_ids = {r.sourced_id for r in got if isinstance(r, RosterClass)}
        for e in got:
            if isinstance(e, RosterEnrollment):
                assert e.user_id in person_ids
                assert e.class_id in class_ids

    async def test_fetch_teacher_returns_their_classes_and_students(
        self, connector: Connector, expected: MemoryRoster
    ) -> None:
        """A live teacher fetch returns that teacher's classes and those classes' students."""
        teacher = next(p for p in expected.persons if p.role == "teacher" and p.sourced_id == "t-1")
        got = await connector.fetch_teacher(TeacherRef(teacher.sourced_id, teacher.email))
        want_classes = {
            e.class_id for e in expected.enrollments if e.user_id == "t-1" and e.role == "teacher"
        }
        assert {c.sourced_id for c in got.classes} == want_classes
        want_students = {
            e.user_id
            for e in expected.enrollments
            if e.class_id in want_classes and e.role == "student"
        }
        assert {p.sourced_id for p in got.persons if p.role == "student"} == want_students
        assert {(e.class_id, e.user_id) for e in got.enrollments if e.role == "student"} == {
            (e.class_id, e.user_id)
            for e in expected.enrollments
            if e.class_id in want_classes and e.role == "student"
        }

    async def test_aclose_can_be_called_twice(self, connector: Connector) -> None:
        """Closing is idempotent."""
        await connector.aclose()
        await connector.aclose()

"""The contract every connector passes. Subclass :class:`ConnectorContract` in a test module
and provide the ``connector`` fixture, serving :func:`tests.rosterdata.small_roster` (or, for
sources whose ids differ, override ``expected``).

Ids are compared as the connector reports them; emails lower-cased; sets, not order.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from connectors.memory import MemoryRoster
from rostersync.source.connector import Connector, FetchMode
from rostersync.source.records import (
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterPerson,
    RosterRecord,
    TeacherRef,
)
from tests.rosterdata import small_roster


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

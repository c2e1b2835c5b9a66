"""The Google Classroom connector: courses, then every page of each course's roster.

Mapping onto the normalized records (the same vocabulary OneRoster sources use):

* course -> :class:`RosterClass` ``(id, name)``; with a section, the title is
  ``"name (section)"`` so a teacher's "Algebra I" periods get distinguishable groups. Status is
  ``active`` for ACTIVE courses and ``tobedeleted`` for any other state that
  ``course_states`` lets through. No class code or school: Classroom has neither.
* teacher/student -> :class:`RosterPerson` (id = ``userId``, email = ``profile.emailAddress``)
  and :class:`RosterEnrollment` ``"{courseId}:{userId}:{role}"``; the course owner's teacher
  enrollment is ``primary``. Each person is yielded once per fetch, as a teacher if they teach
  anywhere (a teacher who is also a student in some course is still a teacher).

Rosters are read only for ACTIVE courses: a non-active course becomes a ``tobedeleted`` class
and no group is built from it, so reading its roster would spend quota (archived courses pile
up over the years) for nothing.

People are held until the end of a fetch (one small record per distinct person) because
"teacher wins" needs every course seen; classes and enrollments stream out as courses finish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from connectors.google_classroom.api import (
    ForbiddenError,
    NotFoundError,
    PageTokens,
    json_body,
    raise_for_response,
)
from connectors.google_classroom.auth import ServiceAccountAuth
from connectors.google_classroom.config import GoogleClassroomSourceConfig
from connectors.google_classroom.quota import Clock, QuotaLimiter, Sleep
from rostersync.errors import (
    DeltaUnsupportedError,
    FatalSourceError,
    RetriableSourceError,
    SourceError,
)
from rostersync.source.connector import ConnectorContext, FetchMode
from rostersync.source.records import (
    STUDENT,
    TEACHER,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterPerson,
    RosterRecord,
    Status,
    TeacherRef,
    TeacherRoster,
)
from rostersync.source.retry import RetryPolicy

NO_EMAIL_REASON = "no email address (is the classroom.profile.emails scope granted?)"
#: Records per yielded batch: big enough for bulk inserts, small enough to stay flat.
BATCH_SIZE = 1000

Json = dict[str, Any]


@dataclass(slots=True)
class _CourseRoster:
    """One course's records, or its rejection (then nothing else of it is used)."""

    course: RosterClass
    enrollments: list[RosterEnrollment] = field(default_factory=list)
    persons: list[RosterPerson] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    refused: Rejected | None = None


class _People:
    """Each person once; a teacher anywhere stays a teacher."""

    def __init__(self) -> None:
        self._by_id: dict[str, RosterPerson] = {}

    def add(self, person: RosterPerson) -> None:
        seen = self._by_id.get(person.sourced_id)
        if seen is None or (seen.role != TEACHER and person.role == TEACHER):
            self._by_id[person.sourced_id] = person

    def records(self) -> list[RosterRecord]:
        out: list[RosterRecord] = []
        for person in self._by_id.values():
            out.append(person)
            if not person.email:
                # The person is still yielded (with email None): the engine decides who is
                # eligible, and this rejection tells the admin why they were not.
                out.append(Rejected("user", person.sourced_id, NO_EMAIL_REASON))
        return out


class GoogleClassroomConnector:
    """Reads a Workspace domain's Classroom as the configured delegated admin."""

    def __init__(
        self,
        ctx: ConnectorContext,
        *,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not isinstance(ctx.config, GoogleClassroomSourceConfig):
            raise TypeError(f"expected GoogleClassroomSourceConfig, got {type(ctx.config)!r}")
        self.config = ctx.config
        self._source = ctx.source
        self._http = ctx.http
        self._log = ctx.logger
        self._base = self.config.api_base_url
        self.auth = ServiceAccountAuth(
            source=ctx.source,
            key=self.config.service_account,
            subject=self.config.delegated_admin,
            token_url=self.config.effective_token_url,
            clock=clock,
        )
        self.quota = QuotaLimiter(
            self.config.quota.per_minute,
            self.config.quota.per_user_per_minute,
            clock=monotonic,
            sleep=sleep,
        )
        self._retry = RetryPolicy(self.config.retry, log=self._log)
        self._in_flight = asyncio.Semaphore(self.config.max_concurrency)
        self.closed = False

    # -- Connector protocol --------------------------------------------------------------

    @property
    def supports_delta(self) -> bool:
        return False

    @property
    def api_calls(self) -> int:
        """Classroom API calls made so far (token requests not included)."""
        return self.quota.calls

    async def fetch(
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord]]:
        if mode is FetchMode.DELTA:
            raise DeltaUnsupportedError(self._source, "Google Classroom has no change filter")
        people = _People()
        pending: list[RosterRecord] = []
        courses = rejected = 0
        pages = PageTokens(self._source, "/v1/courses")
        while True:
            body = await self._course_page(pages.token)
            page, nameless = _courses(body)
            pending.extend(nameless)
            for roster in await self._rosters(page):
                courses += 1
                if roster.refused is not None:
                    rejected += 1
                    pending.append(roster.refused)
                else:
                    pending.append(roster.course)
                    pending.extend(roster.enrollments)
                    pending.extend(roster.rejected)
                    for person in roster.persons:
                        people.add(person)
                if len(pending) >= BATCH_SIZE:
                    yield pending
                    pending = []
            if not pages.advance(body):
                break
        pending.extend(people.records())
        for start in range(0, len(pending), BATCH_SIZE):
            yield pending[start : start + BATCH_SIZE]
        self._log.info(
            "classroom_fetched",
            courses=courses,
            courses_rejected=rejected,
            api_calls=self.quota.calls,
            throttled=self.quota.throttled,
        )

    async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
        # Classroom accepts the email or the numeric id; the email survives id changes
        # between Workspace accounts and is what admins type.
        teacher_id = teacher.email or teacher.sourced_id
        out = TeacherRoster(teacher=None)
        people = _People()
        pages = PageTokens(self._source, "/v1/courses")
        while True:
            try:
                body = await self._course_page(pages.token, teacherId=teacher_id)
            except NotFoundError:
                return out  # no such user in the domain: no classes to mirror
            page, nameless = _courses(body)
            out.rejected.extend(r for r in nameless if isinstance(r, Rejected))
            for roster in await self._rosters(page):
                if roster.refused is not None:
                    out.rejected.append(roster.refused)
                    continue
                out.classes.append(roster.course)
                out.enrollments.extend(roster.enrollments)
                out.rejected.extend(roster.rejected)
                for person in roster.persons:
                    people.add(person)
            if not pages.advance(body):
                break
        email = (teacher.email or "").lower()
        for record in people.records():
            if isinstance(record, Rejected):
                out.rejected.append(record)
            elif isinstance(record, RosterPerson):
                is_them = record.sourced_id == teacher.sourced_id or bool(
                    email and (record.email or "").lower() == email
                )
                if is_them and record.role == TEACHER:
                    out.teacher = record
                else:
                    out.persons.append(record)
        return out

    async def aclose(self) -> None:
        # The HTTP client belongs to the engine; nothing of ours holds a resource.
        self.closed = True

    # -- reading -------------------------------------------------------------------------

    async def _course_page(self, token: str | None, **extra: str) -> Json:
        try:
            return await self._get("/v1/courses", self._course_params(token, **extra))
        except ForbiddenError as exc:
            # Refused the course list itself: nothing can be read, so the run stops.
            raise FatalSourceError(
                self._source,
                f"the course list was refused ({exc.detail}). "
                f"Is {self.config.delegated_admin} a Workspace admin with Classroom enabled? "
                f"{self.auth.hint}",
            ) from None

    def _course_params(self, token: str | None, **extra: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            # Always explicit: Google's default set of states has changed before.
            "courseStates": list(self.config.course_states),
            "pageSize": self.config.page_size,
            **extra,
        }
        if token:
            params["pageToken"] = token
        return params

    async def _rosters(self, courses: list[Json]) -> list[_CourseRoster]:
        """Every course's roster, concurrently (calls bounded by ``max_concurrency``)."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._course_roster(c)) for c in courses]
        except BaseExceptionGroup as failures:
            # The siblings are cancelled; surface the first real error, not the group, so
            # callers see the SourceError the Connector protocol promises.
            raise _first(failures) from None
        return [task.result() for task in tasks]

    async def _course_roster(self, course: Json) -> _CourseRoster:
        course_id = str(course["id"])
        state = course.get("courseState")
        roster = _CourseRoster(course=_to_class(course))
        if state != "ACTIVE":
            return roster
        owner = course.get("ownerId")
        try:
            for role, path in (
                (TEACHER, f"/v1/courses/{course_id}/teachers"),
                (STUDENT, f"/v1/courses/{course_id}/students"),
            ):
                key = "teachers" if role == TEACHER else "students"
                for member in await self._list_all(path, key):
                    _add_member(roster, course_id, role, member, owner)
        except (ForbiddenError, NotFoundError) as exc:
            # One refused course must not sink the run; and no class is yielded for it, so no
            # group is ever built from half a roster.
            reason = "forbidden" if isinstance(exc, ForbiddenError) else "not found"
            self._log.warning("classroom_course_skipped", course_id=course_id, reason=exc.detail)
            roster.refused = Rejected("class", course_id, f"{reason}: {exc.detail}")
        return roster

    async def _list_all(self, path: str, key: str) -> list[Json]:
        """Every page of a roster: stopping at the first page is the classic bug."""
        items: list[Json] = []
        pages = PageTokens(self._source, path)
        while True:
            params: dict[str, Any] = {"pageSize": self.config.page_size}
            if pages.token:
                params["pageToken"] = pages.token
            body = await self._get(path, params)
            items.extend(_items(body, key))
            if not pages.advance(body):
                return items

    async def _get(self, path: str, params: dict[str, Any]) -> Json:
        url = self._base + path

        async def once() -> Json:
            async with self._in_flight:
                await self.quota.acquire()
                try:
                    response = await self._http.get(url, params=params, auth=self.auth)
                except httpx.TimeoutException:
                    raise RetriableSourceError(self._source, f"GET {path} timed out") from None
                except httpx.TransportError as exc:
                    raise RetriableSourceError(
                        self._source, f"GET {path} failed: {type(exc).__name__}"
                    ) from None
            raise_for_response(self._source, response, path, auth_hint=self.auth.hint)
            return json_body(self._source, response, path)

        return await self._retry.call(once)


def create(ctx: ConnectorContext) -> GoogleClassroomConnector:
    return GoogleClassroomConnector(ctx)


# -- mapping -------------------------------------------------------------------------------


def _items(body: Json, key: str) -> list[Json]:
    items = body.get(key) or []
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _courses(body: Json) -> tuple[list[Json], list[RosterRecord]]:
    """A page's courses, and a rejection for any without an id (nothing can refer to it)."""
    good: list[Json] = []
    bad: list[RosterRecord] = []
    for course in _items(body, "courses"):
        if course.get("id"):
            good.append(course)
        else:
            bad.append(Rejected("class", None, f"a course without an id ({course.get('name')!r})"))
    return good, bad


def _to_class(course: Json) -> RosterClass:
    course_id = str(course["id"])
    name = str(course.get("name") or course_id)
    section = course.get("section")
    title = f"{name} ({section})" if section else name
    status: Status = "active" if course.get("courseState") == "ACTIVE" else "tobedeleted"
    return RosterClass(sourced_id=course_id, title=title, status=status)


def _add_member(
    roster: _CourseRoster, course_id: str, role: str, member: Json, owner: object
) -> None:
    profile = member.get("profile") if isinstance(member.get("profile"), dict) else {}
    assert isinstance(profile, dict)
    user_id = member.get("userId") or profile.get("id")
    if not user_id:
        roster.rejected.append(
            Rejected("enrollment", None, f"a {role} of course {course_id} has no userId")
        )
        return
    user_id = str(user_id)
    name = profile.get("name") if isinstance(profile.get("name"), dict) else {}
    assert isinstance(name, dict)
    email = profile.get("emailAddress")
    roster.persons.append(
        RosterPerson(
            sourced_id=user_id,
            role=role,
            given_name=str(name.get("givenName") or ""),
            family_name=str(name.get("familyName") or ""),
            email=str(email) if email else None,
        )
    )
    roster.enrollments.append(
        RosterEnrollment(
            sourced_id=f"{course_id}:{user_id}:{role}",
            class_id=course_id,
            user_id=user_id,
            role=role,
            primary=role == TEACHER and user_id == owner,
        )
    )


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first SourceError in a (nested) group, else its first exception."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[0:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    return next((e for e in leaves if isinstance(e, SourceError)), leaves[0])

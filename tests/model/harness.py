"""Drives the real engine in-process for the model test: one store reused across examples,
settings made from the oracle's config, a memory connector over the feed, and a fault
injector that fails the apply transaction at a chosen statement."""

from __future__ import annotations

import asyncio
import gc
import threading
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import xxhash
import yaml
from sqlalchemy import Connection, bindparam, event, text

from connectors.oneroster import decode as decode_worker
from connectors.oneroster.decode import known_fingerprints
from rostersync import directory
from rostersync.config.loader import load_settings_text
from rostersync.config.models import Provisioning, Settings
from rostersync.config.source import ScopedSourceConfig
from rostersync.daemon import recovery
from rostersync.resync import queue
from rostersync.resync.queue import LeasedJob
from rostersync.source.connector import Connector, FetchMode
from rostersync.source.records import (
    STUDENT,
    TEACHER,
    Rejected,
    RosterEnrollment,
    RosterPerson,
    RosterRecord,
    TeacherRef,
    TeacherRoster,
)
from rostersync.source.rows import KnownSpec, Row, StagedBatch, sort_batch
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store, utcnow
from rostersync.store.tables import metadata
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import Outcome, RunContext, RunReport, instance_id, load_report
from rostersync.sync.staging import STAGING, stage
from tests.model.feed import ENTITY, TODAY, Feed
from tests.model.oracle import SOURCE, Config
from tests.recovery.conftest import dead_pid, lease, local_holder, register

T = TypeVar("T")

#: The engine knows provisioning.teacher_roles and email_domains (issue 16, items 2 and 3).
NEW_KEYS = "teacher_roles" in Provisioning.model_fields and (
    "email_domains" in Provisioning.model_fields
)

#: Records per batch the memory connector yields: small, so fetch failures land mid-run.
BATCH = 7


class InjectedFault(Exception):
    """The failure the model injects at a statement of a run's apply."""


class FaultInjector:
    """Raises InjectedFault at the n-th statement executed while armed (once)."""

    def __init__(self, store: Store) -> None:
        self._lock = threading.Lock()
        self._remaining: int | None = None
        self.fired = False
        event.listen(store.engine, "before_cursor_execute", self._before)

    def plan(self, statement: int | None) -> None:
        with self._lock:
            self._remaining = statement
            self.fired = False

    def settle(self) -> bool:
        """Disarm; returns whether the fault fired. After one has, collect the garbage its
        traceback left at once: a result it caught half-read keeps a statement open on a
        pooled SQLite connection until then, and a later DROP INDEX on that connection
        fails ("database table is locked") whenever the collector has not yet run, which
        would make this test flaky. test_found.py reproduces that with the collector off."""
        with self._lock:
            fired, self.fired, self._remaining = self.fired, False, None
        if fired:
            gc.collect()
        return fired

    def _before(self, *_args: Any) -> None:
        with self._lock:
            if self._remaining is None or not _armed.value:
                return
            if self._remaining > 0:
                self._remaining -= 1
                return
            self._remaining = None
            self.fired = True
        raise InjectedFault("statement failed (injected by the model test)")


class JobFault(Exception):
    """The failure the model injects into the resync batches of chosen users."""


class _Armed(threading.local):
    value = False


_armed = _Armed()


class ProbedEngine(SyncEngine):
    """The engine, with the fault injector armed for exactly the apply transaction, and
    (``failing``) the resync batches of some users failing before they write anything, as
    when the directory cannot be written for them."""

    failing: frozenset[int] = frozenset()

    def _materialise(
        self, jobs: list[LeasedJob], live: Mapping[int, list[tuple[str, str, TeacherRoster]]]
    ) -> None:
        doomed = sorted(j.user_id for j in jobs if j.user_id in self.failing)
        if doomed:
            raise JobFault(f"resync of users {doomed} failed (injected by the model test)")
        super()._materialise(jobs, live)

    def _apply_in(self, conn: Connection, ctx: RunContext) -> Outcome:
        _armed.value = True
        try:
            return super()._apply_in(conn, ctx)
        finally:
            _armed.value = False


@cache
def _settings(config: Config, base_dir: str, others: tuple[str, ...] = ()) -> Settings:
    raw = yaml.safe_dump(config.as_yaml(new_keys=NEW_KEYS), allow_unicode=True)
    settings = load_settings_text(raw, base_dir=Path(base_dir))
    schools = {"include": list(config.schools_include), "exclude": list(config.schools_exclude)}
    terms = {"mode": "current" if config.terms_current else "all", "grace_days": config.grace_days}
    source = {"type": "memory", "schools": schools, "terms": terms}
    # Other sources (the two-source machine's) take the same settings: the machine that
    # has them draws no scope.
    sources = {name: ScopedSourceConfig.model_validate(source) for name in {SOURCE, *others}}
    return settings.model_copy(update={"sources": sources})


#: What a rejected enrollment row of a CSV-shaped live answer names (the CSV connector reads
#: its class and user as far as the row has them): ``both``, the ``class`` only (no user in
#: the row), the ``user`` only (no class), ``neither``; or the row is ``malformed`` as CSV,
#: when the connector names neither and lists it only if its class or user, read leniently,
#: is the teacher's (``connectors/oneroster_csv/connector.py::_enrollments_concerning``).
Refs = Literal["both", "class", "user", "neither", "malformed"]


@dataclass(frozen=True)
class Answers:
    """How the connector answers a live request. ``oneroster``: shaped as the OneRoster
    connector's answer (see :meth:`FeedConnector.oneroster_answer`), else as the memory
    connector's. ``unnamed``: the entities (``class``, ``user``) whose rejections name no id,
    as for a record that is not a JSON object. ``refs``: what each rejected enrollment's row
    names, the i-th of the feed's rejected enrollments taking ``refs[i % len(refs)]`` (so
    one answer may mix them)."""

    oneroster: bool = False
    unnamed: frozenset[str] = frozenset()
    refs: tuple[Refs, ...] = ("both",)


#: Records the fingerprinting connector left out, since the machine last counted them.
LEFT_OUT: Counter[str] = Counter()

#: The memory connector's answers, every rejection named.
PLAIN = Answers()


class FeedConnector(MemoryConnector):
    """The memory connector over the feed, whose live answers also list the rejections that
    concern them, as the CSV connector's do (the shipped memory connector lists no rejected
    enrollment): a rejected class of the teacher's, the teacher or a student of theirs
    rejected, and a rejected enrollment row that names one of their classes or the teacher,
    or leaves its class or its user blank (it may be one of theirs). A rejected record is
    missing from the answer, as from the feed."""

    def __init__(
        self, feed: Feed, *, answers: Answers = PLAIN, fingerprints: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(feed.roster(), **kwargs)
        self.records = feed.records()  # what a fetch sends: the decoys too
        self.held_back = dict(feed.rejected)
        self.answers = answers
        #: yield fingerprinted rows, leaving out those the mirror holds, as the OneRoster
        #: connector's decode workers do (set by the engine for a full run)
        self.fingerprints = fingerprints
        self.skip_known: KnownSpec | None = None
        # Each rejected enrollment's row shape, by its place among them (stable: the feed
        # keeps its rejections in the order it made them).
        held = [sid for kind, sid in self.held_back if kind == "enrollment"]
        refs = answers.refs or ("both",)
        self.row_shape: dict[str, Refs] = {sid: refs[i % len(refs)] for i, sid in enumerate(held)}

    #: the feed is read as a OneRoster server is (oracle.PAGES_SHIFT)
    pages_may_shift = True

    def sent(self) -> list[RosterRecord]:
        return self.records

    # MemoryConnector declares fetch as yielding records only; the Connector protocol (which the
    # engine reads it through) allows the StagedBatch this one yields as a decode worker would.
    async def fetch(  # type: ignore[override]
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord] | StagedBatch]:
        decode_worker._known.clear()  # a reset store numbers its runs from 1 again
        async for records in super().fetch(mode, since):
            yield self._fingerprinted(records) if self.fingerprints else records

    def _fingerprinted(self, records: Sequence[RosterRecord]) -> StagedBatch:
        """The batch as a decode worker gives it: each row with its record's fingerprint (of
        the row's values: the model's records have no bytes), those whose fingerprint the
        mirror holds left out and marked in the batch's order. The mirror's fingerprints are
        read as the workers read them (connectors.oneroster.decode.known_fingerprints)."""
        out = sort_batch(records)
        for kind, rows in out.rows.items():
            skip: Collection[int] = (
                known_fingerprints(self.skip_known, kind) if self.skip_known else set()
            )
            order = array("q")
            kept: list[Row] = []
            for row in rows:
                fp = xxhash.xxh3_64_intdigest(repr(row[:-1]).encode(), decode_worker.SEED) >> 1
                if fp in skip:
                    order.append(~fp)
                else:
                    order.append(fp)
                    kept.append((*row[:-1], fp))
            if rows:
                out.rows[kind] = kept
                out.order[kind] = order
                out.skipped[kind] = len(rows) - len(kept)
                LEFT_OUT["records left out by fingerprint"] += len(rows) - len(kept)
        return out

    def _rejected(self, kind: str, sid: str) -> Rejected:
        entity = ENTITY[kind]
        reason = f"{entity} {sid} does not parse (model)"
        if kind == "enrollment":
            cls, user = self._refs(sid)
            return Rejected(entity, sid, reason, class_id=cls, user_id=user)
        named = None if entity in self.answers.unnamed else sid
        return Rejected(entity, named, reason)

    def _refs(self, sid: str) -> tuple[str | None, str | None]:
        """The class and user a rejected enrollment's row names (None: blank, or unread)."""
        record = self.held_back[("enrollment", sid)]
        assert isinstance(record, RosterEnrollment)
        shape = self.row_shape[sid]
        cls = record.class_id if shape in ("both", "class") else None
        user = record.user_id if shape in ("both", "user") else None
        return cls, user

    def _lists_enrollment(self, sid: str, tid: str, class_ids: set[str]) -> bool:
        """Whether the CSV connector lists this rejected enrollment row in ``tid``'s answer:
        a row that names one of the teacher's classes or the teacher (in any role), or
        leaves its class or its user blank. A row malformed as CSV is read leniently, and
        the model's rows hold both ids, so it is listed when one of them is the answer's."""
        record = self.held_back[("enrollment", sid)]
        assert isinstance(record, RosterEnrollment)
        if self.row_shape[sid] == "malformed":
            return record.class_id in class_ids or record.user_id == tid
        cls, user = self._refs(sid)
        return cls is None or cls in class_ids or user is None or user == tid

    async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
        if self.answers.oneroster:
            return self.oneroster_answer(teacher.sourced_id)
        answer = await super().fetch_teacher(teacher)
        answer.rejected = []  # listed below, enrollments included (the memory answer has none)
        tid = teacher.sourced_id
        # The answer's classes: every class of the teacher's teacher enrollments, read or not.
        class_ids = {e.class_id for e in answer.enrollments}
        students = {e.user_id for e in answer.enrollments if e.role == STUDENT}
        for kind, sid in self.held_back:
            if kind == "class":
                concerns = sid in class_ids
            elif kind == "person":
                concerns = sid == tid or sid in students
            elif kind == "enrollment":
                concerns = self._lists_enrollment(sid, tid, class_ids)
            else:
                concerns = False
            if concerns:
                answer.rejected.append(self._rejected(kind, sid))
        return answer

    def oneroster_answer(self, tid: str) -> TeacherRoster:
        """What connectors/oneroster answers, the feed being the server's data: the teacher
        (``/users/{id}``), their active classes (``/teachers/{id}/classes``: the classes of
        their active teacher enrollments), each class's active students (``/classes/{id}/
        students``: active student enrollments), and made-up enrollments with ``live:`` ids,
        the teacher's own included. A record the connector cannot read is rejected; it reads
        no enrollment, so the server's enrollments count whether the feed rejects them or
        not, and none is rejected."""
        persons = {p.sourced_id: p for p in self.roster.persons}
        classes = {c.sourced_id: c for c in self.roster.classes}
        enrollments = [
            *self.roster.enrollments,
            *(r for (kind, _), r in self.held_back.items() if kind == "enrollment"),
        ]
        out = TeacherRoster(teacher=persons.get(tid))
        if ("person", tid) in self.held_back:
            out.rejected.append(self._rejected("person", tid))
        elif tid not in persons:
            return out  # no such user: the server knows no classes of theirs
        taught = {
            e.class_id
            for e in enrollments
            if e.user_id == tid and e.role == TEACHER and e.status == "active"
        }
        for cid in sorted(taught):
            if ("class", cid) in self.held_back:
                out.rejected.append(self._rejected("class", cid))
            elif cid in classes and classes[cid].status == "active":
                out.classes.append(classes[cid])
        students: dict[str, RosterPerson] = {}
        for klass in out.classes:
            cid = klass.sourced_id
            out.enrollments.append(
                RosterEnrollment(f"live:{cid}:{tid}:{TEACHER}", cid, tid, TEACHER)
            )
            listed = sorted(
                {
                    e.user_id
                    for e in enrollments
                    if e.class_id == cid and e.role == STUDENT and e.status == "active"
                }
            )
            for sid in listed:
                p = persons.get(sid)
                if ("person", sid) in self.held_back:
                    out.rejected.append(self._rejected("person", sid))
                elif p is not None and p.role.lower() == STUDENT and p.status == "active":
                    students.setdefault(sid, p)
                    out.enrollments.append(
                        RosterEnrollment(f"live:{cid}:{sid}:{STUDENT}", cid, sid, STUDENT)
                    )
        out.persons = list(students.values())
        return out


class Harness:
    """One store for a whole test: reset between examples, not re-created."""

    def __init__(self, store: Store, base_dir: Path) -> None:
        self.store = store
        self.base_dir = str(base_dir)
        self.fault = FaultInjector(store)
        #: this example's connector fingerprints records (the OneRoster path) or not (CSV)
        self.fingerprints = False
        #: the source the machine's steps act on, and the feeds of the others it syncs (the
        #: two-source machine's: every engine knows all of them)
        self.source = SOURCE
        self.others: dict[str, Feed] = {}

    def reset(self) -> None:
        """Empty every table (the schema and its migrations stay)."""
        self.source = SOURCE
        self.others = {}
        tables = [t.name for t in reversed(metadata.sorted_tables)]
        with self.store.write() as conn:
            if self.store.is_postgres:
                names = ", ".join(f'"{t}"' for t in tables)
                conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            else:
                for t in tables:
                    conn.execute(text(f'DELETE FROM "{t}"'))

    def settings(self, config: Config) -> Settings:
        return _settings(config, self.base_dir, tuple(sorted({self.source, *self.others})))

    def engine(
        self,
        config: Config,
        feed: Feed,
        *,
        fail_after: int | None = None,
        answers: Answers = PLAIN,
        batch_size: int | None = None,
        failing: Collection[int] = (),
    ) -> ProbedEngine:
        """The engine over the feed. ``batch_size``: the resync jobs leased per batch.
        ``failing``: the users (ids) whose resync jobs fail, for good at the first attempt
        (``resync.max_attempts: 1``); jobs are then leased one per batch, so that no other
        job shares a failing batch's fate."""
        connector = FeedConnector(
            feed,
            answers=answers,
            batch_size=BATCH,
            fail_after=fail_after,
            delta=True,
            fingerprints=self.fingerprints,
        )
        # The other sources' connectors serve their feeds plainly: the steps that inject
        # faults and draw answers act on the current source.
        connectors: dict[str, Connector] = {
            name: FeedConnector(other, batch_size=BATCH, delta=True, fingerprints=self.fingerprints)
            for name, other in self.others.items()
        }
        connectors[self.source] = connector
        settings = self.settings(config)
        update: dict[str, Any] = {}
        if batch_size is not None:
            update["batch_size"] = batch_size
        if failing:
            update.update(batch_size=1, max_attempts=1, backoff=timedelta(0))
        if update:
            resync = settings.resync.model_copy(update=update)
            settings = settings.model_copy(update={"resync": resync})
        engine = ProbedEngine(settings, self.store, connectors=connectors)
        engine.failing = frozenset(failing)
        engine.today = lambda: TODAY  # the terms rules judge by the model's fixed day
        return engine

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(coro)

    def report(self, run_id: int) -> RunReport:
        with self.store.read() as conn:
            return load_report(conn, run_id)

    def users(self) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            return directory.list_users(conn)

    def groups(self) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            return directory.list_groups(conn)

    def orphans(self) -> dict[str, int]:
        """Members and owners whose group is gone: none, ever. PostgreSQL has no key that
        would delete them with their group (migration 0020), so the code must."""
        from sqlalchemy import text

        sql = "SELECT count(*) FROM {t} x WHERE NOT EXISTS (SELECT 1 FROM groups g WHERE g.id = x.group_id)"
        with self.store.read() as conn:
            found = {
                t: conn.execute(text(sql.format(t=t))).scalar_one()
                for t in ("group_member", "group_owner")
            }
        return {t: int(n) for t, n in found.items() if n}

    def user_ids(self, emails: list[str]) -> list[int]:
        with self.store.read() as conn:
            found, _missing = directory.user_ids_by_email(conn, emails)
        return sorted(found.values())

    def mirror(self, kind: str, source: str | None = None) -> dict[str, tuple[Any, ...]]:
        """The engine's mirror of the source (by default the one the steps act on): the
        columns the rules read, by sourced id."""
        columns = {
            "org": "name",
            "person": "role, given_name, family_name, email, enabled, org_ids, status",
            "class": "title, school_id, status",
            "enrollment": "class_id, user_id, role, status",
        }[kind]
        with self.store.read() as conn:
            rows = conn.execute(
                text(f"SELECT sourced_id, {columns} FROM roster_{kind} WHERE source = :s"),
                {"s": source or self.source},
            )
            out = {r[0]: tuple(r[1:]) for r in rows}
        if kind == "person":  # SQLite hands the boolean back as 0/1
            out = {k: (*v[:4], bool(v[4]), *v[5:]) for k, v in out.items()}
        return out

    def run_inputs(self) -> tuple[Any, ...]:
        """What a run reads besides the directory and the config: the mirror, each user's
        last resync job's state (who is queued again, who waits) and what the source's state
        says of the last decision. A held run's approval reports the resyncs the held run
        counted while these, the directory and the config are unchanged."""
        with self.store.read() as conn:
            last_jobs = sorted(
                (int(uid), state)
                for uid, state in conn.execute(
                    text(
                        "SELECT j.user_id, j.state FROM resync_job j WHERE NOT EXISTS "
                        "(SELECT 1 FROM resync_job k WHERE k.user_id = j.user_id AND k.id > j.id)"
                    )
                )
            )
            state = conn.execute(
                text("SELECT decided_with, license_waiting FROM source_state WHERE source = :s"),
                {"s": self.source},
            ).first()
        kinds = ("org", "person", "class", "enrollment")
        mirror = tuple(sorted(self.mirror(kind).items()) for kind in kinds)
        decided = None if state is None else (state[0], bool(state[1]))
        return (mirror, tuple(last_jobs), decided)

    def plant_killed_run(self, records: list[Any], *, job: bool) -> int:
        """What a `rostersync sync` killed with SIGKILL leaves: its registry row (a pid that
        no longer exists), the source's lease, its run `running` with some rows staged, and
        (``job``) a resync job it had leased. Returns the run's id."""
        holder = local_holder(dead_pid(), started=1)
        register(self.store, holder)
        lease(self.store, self.source, holder.owner, timedelta(minutes=30))
        with self.store.write() as conn:
            run_id = int(
                conn.execute(
                    text(
                        "INSERT INTO sync_run (source, mode, requested_mode, trigger, status, "
                        "dry_run, started_at, counts, fetched, warnings) VALUES (:s, 'full', "
                        "'full', 'cli', 'running', :no, :n, '{}', '{}', '[]') RETURNING id"
                    ),
                    {"s": self.source, "n": utcnow(), "no": False},
                ).scalar_one()
            )
            stage(conn, run_id, sort_batch(records))
            user = conn.execute(text('SELECT min(id) FROM "user"')).scalar()
            if job and user is not None:
                conn.execute(
                    text(
                        "INSERT INTO resync_job (user_id, state, live, attempts, reason, "
                        "run_after, created_at, result, lease_owner, lease_expires) VALUES "
                        "(:u, 'running', :no, 1, 'killed', :n, :n, '{}', :o, :e)"
                    ),
                    {"u": user, "no": False, "n": utcnow(), "o": holder.owner,
                     "e": utcnow() + timedelta(minutes=5)},
                )  # fmt: skip
        return run_id

    def recover(self) -> None:
        """What every command does first (``App.prepare``): recover dead processes' leftovers."""
        recovery.recover(self.store, instance_id())

    def staged(self, run_id: int) -> int:
        with self.store.read() as conn:
            return sum(
                int(
                    conn.execute(
                        text(f"SELECT count(*) FROM {t.name} WHERE run_id = :r"), {"r": run_id}
                    ).scalar_one()
                )
                for t in STAGING.values()
            )

    def kill_resync(self, batch: int) -> list[int]:
        """A resync process leases up to ``batch`` due jobs and is killed (SIGKILL) before its
        transaction commits: the jobs stay `running` under a pid that no longer exists.
        Returns the ids of the jobs it held."""
        holder = local_holder(dead_pid(), started=1)
        register(self.store, holder)
        held = queue.lease(self.store, holder.owner, limit=batch, lease_for=timedelta(minutes=5))
        return [job.id for job in held]

    def failed_jobs(self, after: int) -> dict[int, str | None]:
        """The jobs with an id above ``after`` that failed, with their last error."""
        with self.store.read() as conn:
            rows = conn.execute(
                text("SELECT id, last_error FROM resync_job WHERE id > :a AND state = 'failed'"),
                {"a": after},
            )
            return {int(job_id): error for job_id, error in rows}

    def last_job(self) -> int:
        with self.store.read() as conn:
            return int(conn.execute(text("SELECT max(id) FROM resync_job")).scalar() or 0)

    def job_states(self, after: int) -> dict[str, int]:
        """How many jobs with an id above ``after`` are in each state, and the most
        interruptions of any of them."""
        with self.store.read() as conn:
            counts = {
                state: int(n)
                for state, n in conn.execute(
                    text("SELECT state, count(*) FROM resync_job WHERE id > :a GROUP BY state"),
                    {"a": after},
                )
            }
            most = conn.execute(
                text("SELECT max(interruptions) FROM resync_job WHERE id > :a"), {"a": after}
            ).scalar()
        counts["interruptions"] = int(most or 0)
        return counts

    def queued_users(self) -> set[str]:
        """The emails of the users with a resync job queued or running."""
        with self.store.read() as conn:
            rows = conn.execute(
                text(
                    'SELECT DISTINCT u.email FROM resync_job j JOIN "user" u ON u.id = j.user_id '
                    "WHERE j.state IN ('queued', 'running')"
                )
            )
            return {email for (email,) in rows}

    def pending_jobs(self) -> dict[int, str]:
        """The jobs queued or running: their users' emails, by job id."""
        with self.store.read() as conn:
            rows = conn.execute(
                text(
                    'SELECT j.id, u.email FROM resync_job j JOIN "user" u ON u.id = j.user_id '
                    "WHERE j.state IN ('queued', 'running')"
                )
            )
            return {int(job_id): email for job_id, email in rows}

    def jobs_ended(self, job_ids: Collection[int]) -> dict[int, tuple[str, str | None]]:
        """These jobs' states and last errors, by id."""
        with self.store.read() as conn:
            rows = conn.execute(
                text("SELECT id, state, last_error FROM resync_job WHERE id IN :ids").bindparams(
                    bindparam("ids", expanding=True)
                ),
                {"ids": sorted(job_ids)},
            )
            return {int(job_id): (state, error) for job_id, state, error in rows}

    def emails_of(self, user_ids: list[int]) -> set[str]:
        with self.store.read() as conn:
            rows = conn.execute(
                text('SELECT email FROM "user" WHERE id IN :ids').bindparams(
                    bindparam("ids", expanding=True)
                ),
                {"ids": sorted(set(user_ids))},
            )
            return {email for (email,) in rows}

    def most_interruptions(self) -> int:
        """The most interruptions of any queued job."""
        with self.store.read() as conn:
            most = conn.execute(
                text("SELECT max(interruptions) FROM resync_job WHERE state = 'queued'")
            ).scalar()
        return int(most or 0)

    def leased_jobs(self) -> int:
        with self.store.read() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM resync_job WHERE state = 'running'")
                ).scalar_one()
            )

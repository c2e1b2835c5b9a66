"""Helpers for engine tests: run a sync against a MemoryConnector and read the directory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from rostersync import directory
from rostersync.config.models import Settings
from rostersync.source.records import MemoryRoster, Rejected, TeacherRef, TeacherRoster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import RunReport, load_report


async def sync(
    settings: Settings,
    store: Store,
    roster: MemoryRoster,
    *,
    source: str = "mem",
    drain: bool = True,
    **kwargs: Any,
) -> RunReport:
    """One sync of `roster` as source `source`, then the resync jobs it queued."""
    fail_after = kwargs.pop("fail_after", None)
    engine = SyncEngine(
        settings,
        store,
        connectors={source: MemoryConnector(roster, batch_size=7, fail_after=fail_after)},
    )
    report = await engine.sync(source, **kwargs)
    if drain:
        await engine.drain()
    with store.read() as conn:
        return load_report(conn, report.id)


def users(store: Store) -> dict[str, dict[str, Any]]:
    with store.read() as conn:
        return {u["email"]: u for u in directory.list_users(conn)}


def groups(store: Store) -> dict[str, dict[str, Any]]:
    with store.read() as conn:
        return {g["external_id"]: g for g in directory.list_groups(conn)}


def snapshot(store: Store) -> tuple[Any, ...]:
    """Everything a user can see of the directory and mirror, for before/after comparisons."""
    from sqlalchemy import text

    with store.read() as conn:
        mirror = tuple(
            tuple(sorted(tuple(map(str, r)) for r in conn.execute(text(f"SELECT * FROM {t}"))))
            for t in (
                "roster_org",
                "roster_person",
                "roster_class",
                "roster_enrollment",
                "user_identity",
            )
        )
        return (
            tuple(sorted(users(store).items())).__repr__(),
            repr(sorted(groups(store).items())),
            mirror,
        )


def add_user(conn: Any, email: str, *, name: str = "X", created_by: str = "import") -> int:
    """A directory user made outside a sync (by an admin or an import)."""
    from sqlalchemy import text

    return int(
        conn.execute(
            text(
                'INSERT INTO "user" (email, display_name, status, created_by, archived_by_sync, '
                "delegated) VALUES (:e, :n, 'active', :c, false, false) RETURNING id"
            ),
            {"e": email, "n": name, "c": created_by},
        ).scalar_one()
    )


def add_import_owner(conn: Any, email: str, class_id: str) -> int:
    """A new user an admin made an owner of this class's group by import (its Groups
    column): the ``group_owner`` row an import writes. Returns the user's id."""
    from sqlalchemy import text

    uid = add_user(conn, email, name="Coach", created_by="import")
    conn.execute(
        text(
            "INSERT INTO group_owner (group_id, user_id, origin) SELECT id, :u, 'import' "
            "FROM groups WHERE external_id = :c"
        ),
        {"u": uid, "c": class_id},
    )
    return uid


def user_id(conn: Any, email: str) -> int:
    from sqlalchemy import text

    return int(
        conn.execute(text('SELECT id FROM "user" WHERE email = :e'), {"e": email}).scalar_one()
    )


ZERO = {
    "users_created": 0,
    "users_linked": 0,
    "users_archived": 0,
    "users_skipped_license": 0,
    "groups_created": 0,
    "groups_updated": 0,
    "groups_removed": 0,
    "resync_queued": 0,
}


def counts(report: object) -> dict[str, int]:
    return {k: v for k, v in report.counts.items() if k in ZERO}  # type: ignore[attr-defined]


class _Rejecting(MemoryConnector):
    """Answers a live request from the roster, and lists ``rejected`` in the answer as the
    records it could not read."""

    def __init__(self, roster: MemoryRoster, rejected: Sequence[Rejected]) -> None:
        super().__init__(roster)
        self.rejected = list(rejected)

    async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
        answer = await super().fetch_teacher(teacher)
        answer.rejected.extend(self.rejected)
        return answer


async def live_resync(
    store: Store,
    settings: Settings,
    roster: MemoryRoster,
    email: str = "ada@example.org",
    *,
    rejected: Sequence[Rejected] = (),
) -> None:
    """One live resync (``resync --live``) of the teacher with ``email``, the source answering
    from ``roster`` (with the ``rejected`` records); it must succeed."""
    from rostersync.resync.queue import queue_resync

    with store.write() as conn:
        queue_resync(conn, [user_id(conn, email)], reason="manual", run_id=None, live=True)
    engine = SyncEngine(settings, store, connectors={"mem": _Rejecting(roster, rejected)})
    assert [o for _, o in await engine.process_batch()] == ["succeeded"]


def console_down(*args: object, **kwargs: object) -> None:
    """A group writer that fails: the console cannot be written."""
    raise RuntimeError("console down")


async def drain_failing(store: Store, settings: Settings, roster: MemoryRoster) -> None:
    """Drain the queue while every resync fails; with ``resync.max_attempts`` 1 in
    ``settings``, each job fails for good at its only attempt."""
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr("rostersync.resync.worker.rebuild_groups", console_down)
        engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
        await engine.drain()

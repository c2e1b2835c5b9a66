"""Drives the real engine in-process for the model test: one store reused across examples,
settings made from the oracle's config, a memory connector over the feed, and a fault
injector that fails the apply transaction at a chosen statement."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Coroutine
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from sqlalchemy import Connection, event, text
from sqlmodel import SQLModel

import rostersync.store.tables  # noqa: F401  (registers every table in SQLModel.metadata)
from connectors.memory import MemoryConnector
from rostersync import directory
from rostersync.config.loader import load_settings_text
from rostersync.config.models import Provisioning, Settings
from rostersync.config.source import SourceConfig
from rostersync.records import MemoryRoster
from rostersync.store.db import Store
from rostersync.sync.engine import Outcome, RunContext, RunReport, SyncEngine, load_report
from tests.model.oracle import SOURCE, Config

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


class _Armed(threading.local):
    value = False


_armed = _Armed()


class ProbedEngine(SyncEngine):
    """The engine, with the fault injector armed for exactly the apply transaction."""

    def _apply_in(self, conn: Connection, ctx: RunContext) -> Outcome:
        _armed.value = True
        try:
            return super()._apply_in(conn, ctx)
        finally:
            _armed.value = False


@cache
def _settings(config: Config, base_dir: str) -> Settings:
    raw = yaml.safe_dump(config.as_yaml(new_keys=NEW_KEYS), allow_unicode=True)
    settings = load_settings_text(raw, base_dir=Path(base_dir))
    sources = {SOURCE: SourceConfig(type="memory")}
    return settings.model_copy(update={"sources": sources})


class Harness:
    """One store for a whole test: reset between examples, not re-created."""

    def __init__(self, store: Store, base_dir: Path) -> None:
        self.store = store
        self.base_dir = str(base_dir)
        self.fault = FaultInjector(store)

    def reset(self) -> None:
        """Empty every table (the schema and its migrations stay)."""
        tables = [t.name for t in reversed(SQLModel.metadata.sorted_tables)]
        with self.store.write() as conn:
            if self.store.is_postgres:
                names = ", ".join(f'"{t}"' for t in tables)
                conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            else:
                for t in tables:
                    conn.execute(text(f'DELETE FROM "{t}"'))

    def settings(self, config: Config) -> Settings:
        return _settings(config, self.base_dir)

    def engine(
        self, config: Config, roster: MemoryRoster, *, fail_after: int | None = None
    ) -> ProbedEngine:
        connector = MemoryConnector(roster, batch_size=BATCH, fail_after=fail_after, delta=True)
        return ProbedEngine(self.settings(config), self.store, connectors={SOURCE: connector})

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

    def user_ids(self, emails: list[str]) -> list[int]:
        with self.store.read() as conn:
            found, _missing = directory.user_ids_by_email(conn, emails)
        return sorted(found.values())

    def mirror(self, kind: str) -> dict[str, tuple[Any, ...]]:
        """The engine's mirror of the source: the columns the rules read, by sourced id."""
        columns = {
            "org": "name",
            "person": "role, given_name, family_name, email, enabled, org_ids, status",
            "class": "title, school_id, status",
            "enrollment": "class_id, user_id, role, status",
        }[kind]
        with self.store.read() as conn:
            rows = conn.execute(
                text(f"SELECT sourced_id, {columns} FROM roster_{kind} WHERE source = :s"),
                {"s": SOURCE},
            )
            out = {r[0]: tuple(r[1:]) for r in rows}
        if kind == "person":  # SQLite hands the boolean back as 0/1
            out = {k: (*v[:4], bool(v[4]), *v[5:]) for k, v in out.items()}
        return out

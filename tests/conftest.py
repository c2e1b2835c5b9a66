"""Shared fixtures: settings built from YAML text, and stores on SQLite and PostgreSQL.

PostgreSQL tests use the server at 127.0.0.1:5432 (database ``test``, trust auth). Each test
gets its own schema, dropped afterwards. Without a reachable server they skip, saying why.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from rostersync.config.loader import load_settings_text
from rostersync.config.models import Settings
from rostersync.config.source import SourceConfig
from rostersync.store.db import Store

# The shared connector contract lives in the package (for third-party connector authors):
# its asserts get pytest's detailed messages only if rewritten, which must be asked before import.
pytest.register_assert_rewrite("rostersync.source.testing")

PG_BASE = os.environ.get("ROSTERSYNC_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_pg_state: dict[str, Any] = {}


def postgres_unavailable() -> str | None:
    """None if the test PostgreSQL answers, else why not (cached per session)."""
    if "reason" not in _pg_state:
        try:
            import psycopg

            dsn = PG_BASE.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(dsn, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _pg_state["reason"] = None
        except Exception as exc:  # any failure to connect means: skip, with the reason
            _pg_state["reason"] = f"PostgreSQL at {PG_BASE} is not reachable: {exc}"
    reason: str | None = _pg_state["reason"]
    return reason


def require_postgres() -> None:
    """Skip (or, in CI with ROSTERSYNC_REQUIRE_PG=1, fail) when PostgreSQL is unreachable."""
    reason = postgres_unavailable()
    if reason:
        if os.environ.get("ROSTERSYNC_REQUIRE_PG") == "1":
            pytest.fail(f"{reason} (ROSTERSYNC_REQUIRE_PG=1: CI must run the PostgreSQL tests)")
        pytest.skip(reason)


def _pg_schema_store() -> Iterator[Store]:
    require_postgres()
    import psycopg

    schema = f"rs_{uuid.uuid4().hex[:12]}"
    dsn = PG_BASE.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    store = Store(f"{PG_BASE}?options=-csearch_path%3D{schema}")
    try:
        yield store
    finally:
        store.dispose()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty, migrated store on each backend."""
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'rostersync.db'}")
        s.upgrade()
        yield s
        s.dispose()
    else:
        for s in _pg_schema_store():
            s.upgrade()
            yield s


@pytest.fixture
def pg_store() -> Iterator[Store]:
    """An empty, migrated store on PostgreSQL only (behaviour SQLite has no counterpart of)."""
    for s in _pg_schema_store():
        s.upgrade()
        yield s


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'rostersync.db'}")
    s.upgrade()
    yield s
    s.dispose()


BASE_CONFIG: dict[str, Any] = {
    "organization": "Springfield Public Schools",
    "database": "sqlite:///unused.db",
    "roles": [
        "Teacher",
        {"name": "Organization Admin", "permissions": ["import_users"], "scope": "organization"},
        {"name": "Site Admin", "permissions": ["import_users"], "scope": "site"},
    ],
    "sites": ["North High", "South Middle"],
    "provisioning": {
        "auto_create_users": True,
        "default_role": "Teacher",
        "default_site": "North High",
    },
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings from BASE_CONFIG merged with overrides; `memory_sources` adds connector-less sources
    that tests serve with a MemoryConnector."""

    def make(memory_sources: tuple[str, ...] = ("mem",), **overrides: Any) -> Settings:
        data = deep_merge(BASE_CONFIG, overrides)
        settings = load_settings_text(yaml.safe_dump(data), base_dir=tmp_path)
        sources = dict(settings.sources)
        for name in memory_sources:
            sources[name] = SourceConfig(type="memory")
        return settings.model_copy(update={"sources": sources})

    return make


@pytest.fixture
def pool_starts(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[int]]:
    """``pool_starts(min_records)``: every page of a OneRoster collection of at least
    ``min_records`` goes to the decode pool (when the source has workers); returns the list
    the sizes of the pools started are appended to."""

    def counting(min_records: int) -> list[int]:
        from connectors.oneroster import connector as connector_module
        from connectors.oneroster import decode

        monkeypatch.setattr(decode, "POOL_MIN_BYTES", 0)
        monkeypatch.setattr(decode, "POOL_MIN_RECORDS", min_records)
        started: list[int] = []
        real_start = decode.start_pool

        def counting_start(workers: int, preload: Sequence[str] = ()) -> Any:
            started.append(workers)
            return real_start(workers, preload)

        monkeypatch.setattr(connector_module, "start_pool", counting_start)
        return started

    return counting


@pytest.fixture
def info_logged() -> Iterator[None]:
    """Info lines reach ``structlog.testing.capture_logs`` whatever level an earlier test
    configured (capture_logs replaces the processors, not the level filter)."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    yield
    structlog.configure(**saved)

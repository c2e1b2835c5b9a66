"""Helpers for import tests: CSV text in, an ImportResult out; users and roles set up directly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import insert, text

from rostersync.config.models import Settings
from rostersync.config.source import SourceConfig
from rostersync.importer import ImportResult, parse_bytes, run_import
from rostersync.store.db import Store
from rostersync.store.tables import group_owner, groups, user, user_role, user_site
from rostersync.sync.provisioning import sync_catalog

Run = Callable[..., ImportResult]


def sheet(csv_text: str, name: str = "users.csv", max_rows: int = 2000) -> Any:
    return parse_bytes(csv_text.encode("utf-8"), name, max_rows=max_rows)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """BASE_CONFIG: roles Teacher / Organization Admin / Site Admin, sites North High / South Middle."""
    return make_settings(memory_sources=())


def with_google(settings: Settings, name: str = "workspace") -> Settings:
    sources = {**settings.sources, name: SourceConfig(type="google_classroom")}
    return settings.model_copy(update={"sources": sources})


@pytest.fixture
def run(store: Store, settings: Settings) -> Run:
    """Import CSV text into `store`: run(text, actor_email=..., dry_run=..., settings=...)."""

    def go(csv_text: str, *, settings_: Settings | None = None, **kw: Any) -> ImportResult:
        return run_import(store, settings_ or settings, sheet(csv_text), **kw)

    return go


def add_user(
    store: Store,
    settings: Settings,
    email: str,
    *,
    roles: tuple[str, ...] = (),
    sites: tuple[str, ...] = (),
    name: str = "Someone",
    status: str = "active",
) -> int:
    """A directory user made directly (as another path would have made it)."""
    with store.write() as conn:
        sync_catalog(conn, settings)
        uid = int(
            conn.execute(
                insert(user)
                .values(email=email, display_name=name, status=status, created_by="test")
                .returning(user.c.id)
            ).scalar_one()
        )
        role_ids: dict[str, int] = dict(conn.execute(text("SELECT name, id FROM role")).all())
        site_ids: dict[str, int] = dict(conn.execute(text("SELECT name, id FROM site")).all())
        for r in roles:
            conn.execute(insert(user_role).values(user_id=uid, role_id=role_ids[r]))
        for s in sites:
            conn.execute(insert(user_site).values(user_id=uid, site_id=site_ids[s]))
    return uid


def add_group(store: Store, name: str, *, owner: int | None = None, ext: str | None = None) -> int:
    with store.write() as conn:
        gid = int(
            conn.execute(
                insert(groups)
                .values(source="mem", external_id=ext or name, name=name)
                .returning(groups.c.id)
            ).scalar_one()
        )
        if owner is not None:
            conn.execute(insert(group_owner).values(group_id=gid, user_id=owner))
    return gid


def user_row(store: Store, email: str) -> dict[str, Any]:
    """One user as a dict with role and site names (sorted)."""
    with store.read() as conn:
        u = (
            conn.execute(
                text(
                    'SELECT id, email, display_name, status, delegated, created_by FROM "user" WHERE email = :e'
                ),
                {"e": email},
            )
            .mappings()
            .one()
        )
        roles = sorted(
            r
            for (r,) in conn.execute(
                text(
                    "SELECT r.name FROM user_role ur JOIN role r ON r.id = ur.role_id WHERE ur.user_id = :u"
                ),
                {"u": u["id"]},
            )
        )
        sites = sorted(
            s
            for (s,) in conn.execute(
                text(
                    "SELECT s.name FROM user_site us JOIN site s ON s.id = us.site_id WHERE us.user_id = :u"
                ),
                {"u": u["id"]},
            )
        )
    return {**dict(u), "roles": roles, "sites": sites, "delegated": bool(u["delegated"])}


def count(store: Store, sql: str) -> int:
    with store.read() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def statuses(result: ImportResult) -> list[str]:
    return [str(r.status) for r in result.rows]

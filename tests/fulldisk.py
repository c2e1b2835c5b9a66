"""A SQLite database that runs out of room: the disk-full path without filling a disk."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from rostersync.store import db


def fill_up_after(
    monkeypatch: pytest.MonkeyPatch, database: Path, pages: int
) -> Callable[[], None]:
    """Make every store opened from now on find ``database`` full once it has grown by
    ``pages`` pages (SQLite then fails writes with "database or disk is full", as on a full
    disk: ``PRAGMA max_page_count`` on each new connection). Returns what lifts the limit."""
    with sqlite3.connect(database) as conn:
        (now,) = conn.execute("PRAGMA page_count").fetchone()
    setup = db._sqlite_setup

    def limited(engine: Any) -> None:
        setup(engine)
        event.listen(
            engine, "connect", lambda c, _r: c.execute(f"PRAGMA max_page_count = {now + pages}")
        )

    monkeypatch.setattr(db, "_sqlite_setup", limited)
    return lambda: monkeypatch.setattr(db, "_sqlite_setup", setup)

"""The SQLite file behind a ``sqlite:///PATH`` URL: finding it, recognising it, opening one
that must exist, and the folder one may be created in. Kept apart from
:mod:`rostersync.store.db` (the Store itself)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from sqlalchemy.engine import make_url

from rostersync import hints
from rostersync.errors import ConfigError, ConfigIssue, StoreError


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL; None for other databases, memory and URI forms."""
    parsed = make_url(url)
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or not db or db == ":memory:":
        return None
    return None if parsed.query.get("uri") else Path(db)


#: The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def is_sqlite_file(path: Path) -> bool:
    """Empty (SQLite sets it up) or starting with SQLite's header; unreadable: the open says."""
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError:
        return True
    return not head or head == SQLITE_HEADER


def not_writable(path: Path) -> str | None:
    """Why SQLite cannot open ``path`` for writing, when a permission or a read-only file
    system is the reason: it writes beside the file (its ``-wal`` and ``-shm`` files) even
    for a command that only reads, and then says no more than "unable to open database
    file". None when the file and its folder are writable, or the file is not there."""
    if not path.exists():
        return None
    for what, where in (("file", path), ("folder", path.parent)):
        if not os.access(where, os.W_OK):
            return (
                f"the database {what} {where} is not writable (read-only, or owned by another "
                "user): SQLite writes beside the database even to read it; make it writable "
                "by the user rostersync runs as"
            )
    return None


def open_existing_sqlite(path: Path) -> Callable[[], sqlite3.Connection]:
    """A connection factory for a SQLite file that must already exist.

    ``mode=rw`` makes SQLite itself refuse to create the file, so a file deleted after this
    check is not silently re-created empty either.
    """
    if not path.exists():
        if not path.parent.is_dir():
            # `db upgrade` would be refused too (require_folder): the hint names what to fix.
            raise StoreError(
                f"database {path} does not exist, nor its folder {path.parent}: check "
                "`database` in the config, or create the folder; then a sync or "
                f"`{hints.command('db upgrade')}` creates the database"
            )
        raise StoreError(
            f"database {path} does not exist: check `database` in the config. Commands that "
            f"only read never create it; a sync or `{hints.command('db upgrade')}` does"
        )
    if not path.is_file():
        raise StoreError(f"database {path} is not a file: check `database` in the config")
    uri = f"file:{quote(str(path.resolve()))}?mode=rw"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

    return connect


def require_folder(path: Path) -> None:
    """Before a command that writes creates the database file: its folder must exist.

    Creating the folders too made a mistyped path (``/var/lib/rostersync/typo/x.db``) a new,
    empty database nobody looks at, and every user and group provisioned again into it. The
    folders of the documented set-ups exist already: the config's own folder (the default
    ``sqlite:///rostersync.db``), systemd's ``StateDirectory``, the image's volume, the
    repository's ``var/`` (the sample config)."""
    folder = path.parent
    if folder.is_dir():
        return
    what = "is not a folder" if folder.exists() else "does not exist"
    raise ConfigError(
        [
            ConfigIssue(
                "database",
                f"the folder {folder} {what}: correct the path, or create the folder "
                "(rostersync creates the database file, never its folder)",
            )
        ]
    )

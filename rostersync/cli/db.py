"""`db upgrade`: apply the database's pending migrations."""

from __future__ import annotations

import click

from rostersync.cli.app import App, Group


@click.group("db", cls=Group)
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade", short_help="Apply pending migrations.")
@click.pass_obj
def db_upgrade(app: App) -> None:
    """Apply pending migrations (a database at the newest revision is left as it is, and
    says so)."""
    from rostersync.sync.provisioning import sync_catalog

    store = app.open_store()
    try:
        before, after = store.upgrade()
        with store.write() as conn:
            sync_catalog(conn, app.settings)
    finally:
        # Closed, as every command closes its store: SQLite's log is copied into the file
        # and its -wal and -shm files go.
        store.dispose()
    # The file, or the server URL without its password (not the Store's repr).
    if before is not None and before == after:
        click.echo(
            f"database {store.location}: already at {after}, the newest revision (nothing to do)"
        )
    else:
        click.echo(f"database {store.location}: {before or 'empty'} -> {after}")

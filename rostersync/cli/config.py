"""`config check` and `config schema`: validate a config file; print its JSON Schema."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rostersync import hints
from rostersync.cli.app import EXIT_USAGE, App, Group, OutputPath
from rostersync.errors import ConfigError


@click.group("config", cls=Group)
def config_group() -> None:
    """Validate the config; print its JSON Schema."""


@config_group.command("check", short_help="Report every config error (exit 2 if any).")
@click.pass_obj
def config_check(app: App) -> None:
    """Report every config error with its YAML path and line (exit 2 if any)."""
    from rostersync.config.loader import config_path, load_settings
    from rostersync.store.sqlitefile import is_sqlite_file, sqlite_file

    path = config_path(app.config_file)
    try:
        # The name as given (None for the default), so that a missing default file's error
        # says how to name another, as every other command's does.
        settings = load_settings(app.config_file, check_files=True)
    except ConfigError as exc:
        click.echo(f"{path}: {len(exc.issues)} error(s)", err=True)
        for issue in exc.issues:
            click.echo(f"  {issue}", err=True)
        sys.exit(EXIT_USAGE)
    db = sqlite_file(settings.database)
    if db is not None and db.is_file() and not is_sqlite_file(db):
        # The config loads, but every command would fail to open this file.
        click.echo(f"{path}: 1 error(s)", err=True)
        click.echo(f"  database: {db} is not a SQLite database", err=True)
        sys.exit(EXIT_USAGE)
    enabled = [n for n, s in settings.sources.items() if s.enabled]
    click.echo(
        f"{path}: OK ({len(settings.sources)} source(s), {len(enabled)} enabled: {', '.join(enabled) or 'none'})"
    )
    if db is not None and not db.exists():
        # Not an error (the first sync creates it), but a mistyped path shows up here first.
        # Nor is a missing folder: StateDirectory makes /var/lib/rostersync at the unit's start.
        if db.parent.is_dir():
            click.echo(
                f"  note: database {db} does not exist yet; a sync or "
                f"`{hints.command('db upgrade')}` creates it"
            )
        else:
            click.echo(
                f"  note: database {db} does not exist, nor its folder {db.parent}: a sync refuses "
                "it until the folder is created (systemd's StateDirectory creates it for the unit)"
            )


@config_group.command("schema")
@click.option(
    "--output", type=OutputPath(dir_okay=False, path_type=Path), help="write to this file"
)
def config_schema(output: Path | None) -> None:
    """Print the config's JSON Schema (for editors' YAML completion)."""
    from rostersync.config.loader import json_schema_text

    text = json_schema_text()
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        click.echo(text, nl=False)

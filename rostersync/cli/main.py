"""The `rostersync` command: the root group and every command group added to it.

Each command module imports only click and :mod:`rostersync.cli.app` at import time, and its
heavy modules (the database, HTTP, spreadsheets) inside its command functions, so
`rostersync --help` loads none of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from rostersync import __version__
from rostersync.cli import config, db, directory, importing, runs, sync
from rostersync.cli.app import CONFIG_HELP, LOG_LEVELS, App, accept_global_options, run


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", metavar="PATH", help=CONFIG_HELP)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="override logging.level")
@click.version_option(__version__, prog_name="rostersync")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, log_level: str | None) -> None:
    """Keep console users and class groups in step with school rosters."""
    ctx.obj = App(config_file, log_level)
    ctx.call_on_close(ctx.obj.close)


for command in (
    sync.sync,
    sync.run,
    sync.resync,
    directory.users,
    directory.groups,
    directory.queue,
    runs.runs,
    config.config_group,
    db.db_group,
    importing.import_cmd,
    importing.teachers,
    importing.outbox,
):
    cli.add_command(command)

# Last, so that every command and subcommand has them.
accept_global_options(cli)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script `rostersync` and `python -m rostersync`."""
    run(cli, argv)

"""The `rostersync` command: the root group and every command group added to it.

Each command module imports only click and :mod:`rostersync.cli.app` at import time, and its
heavy modules (the database, HTTP, spreadsheets) inside its command functions, so
`rostersync --help` loads none of them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

import click

from rostersync import __version__
from rostersync.cli import config, db, directory, importing, runs, status, sync
from rostersync.cli.app import (
    CONFIG_HELP,
    LOG_LEVELS,
    App,
    Root,
    accept_global_options,
    config_given,
    run,
)
from rostersync.cli.console import started


@click.group(
    cls=Root,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Exit codes: 0 success; 1 a run failed or was held, a waited-for job failed, or the "
    "database cannot be used; 2 bad usage, bad config or an input file that cannot be read. "
    "`rostersync COMMAND --help` describes a command; README.md and docs/ the rest.",
)
@click.option("--config", "config_file", metavar="PATH", help=CONFIG_HELP, callback=config_given)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="override logging.level")
@click.version_option(__version__, prog_name="rostersync")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, log_level: str | None) -> None:
    """Keep console users and class groups in step with school rosters."""
    started()  # Ctrl-C is click's and the command's from here
    ctx.obj = App(config_file, log_level)
    ctx.call_on_close(ctx.obj.close)


for command in (
    sync.sync,
    sync.run,
    sync.resync,
    status.status,
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
    """The command line, for callers that stay alive afterwards (tests, embedding)."""
    run(cli, argv)


def console() -> NoReturn:
    """The console script `rostersync` and `python -m rostersync`: :func:`main`, then the
    process ends the way the interpreter would end it, less its teardown.

    Python's own exit frees every object and module one by one, a fifth to a third of a
    second after a sync whose work is done (hundreds of thousands of mirror hashes, the
    SQLAlchemy and pydantic models). Everything that exit does for others is done here
    first: other non-daemon threads are waited for, the ``atexit`` handlers run (logging,
    multiprocessing), and stdout and stderr are flushed; only then does the process exit."""
    code = 0
    App.whole_process = True
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            # Started with it closed (`>&-`): Python leaves None there, where every echo and
            # log line would be an internal error. /dev/null also takes the descriptor, so a
            # file opened later (the database) cannot become the command's output.
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
    sys.stdout = _ReaderGoneIsDevNull(sys.stdout)
    try:
        main()
    except SystemExit as exc:
        code = _exit_status(exc.code)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to say there
            stream.flush()
    if "multiprocessing.forkserver" in sys.modules:
        from rostersync.daemon.procs import end_fork_server

        end_fork_server()
    os._exit(code)


class _ReaderGoneIsDevNull:
    """The console script's stdout. When the reader of a pipe goes away (`rostersync sync |
    head -1`), the rest of the output goes to /dev/null and the command goes on to its own
    end and status: click would stop it there and exit 1, which says a run failed or was
    held, and would leave an approval that had printed its preview undone."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)
        except OSError as exc:
            raise _named(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()
        except OSError as exc:
            raise _named(exc) from None

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError):  # what the pipe refused goes to /dev/null now
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _named(exc: OSError) -> OSError:
    """An error writing the output (a full disk behind `> out.json`) names it, so that the
    command reports it as a file it could not write (exit 1), not as an internal error."""
    if exc.filename is None:
        exc.filename = "the standard output"
    return exc


def _exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` gives the process (a message is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1

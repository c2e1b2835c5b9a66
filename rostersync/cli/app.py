"""What every `rostersync` command shares: the App (settings and store, loaded lazily), output
helpers, exit codes, global options, and the handling of errors around a whole invocation
(see CONTRACT.md for names, JSON shapes and exit codes).

Exit codes: 0 success; 1 a run failed or was held (or a job failed); 2 bad usage or bad
config. With ``--json`` the only thing on stdout is one JSON document; logs go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from rostersync import __version__
from rostersync.errors import ConfigError, RostersyncError, StoreError

if TYPE_CHECKING:
    from rostersync.config.models import Settings
    from rostersync.store.db import Store
    from rostersync.sync.engine import SyncEngine

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class App:
    """Lazily loaded settings and store, shared by the subcommands of one invocation."""

    #: True in a process of its own (the console script), which it may tune: not in tests
    #: or an embedding program, whose process outlives the command.
    whole_process = False

    def __init__(self, config_file: str | None, log_level: str | None) -> None:
        self.config_file = config_file
        self.log_level = log_level
        self._settings: Settings | None = None
        self._store: Store | None = None
        self._owner: str | None = None

    @property
    def config_file(self) -> str | None:
        """The ``--config`` given on the command line (before or after the command), or None."""
        return self._config_file

    @config_file.setter
    def config_file(self, value: str | None) -> None:
        from rostersync import hints

        self._config_file = value
        # The commands its messages tell the operator to run carry it (rostersync.hints).
        hints.use_config(value)

    @property
    def settings(self) -> Settings:
        from rostersync.config.loader import load_settings
        from rostersync.logs import configure as configure_logging
        from rostersync.logs import register_secrets_in

        if self._settings is None:
            self._settings = load_settings(self.config_file)
            register_secrets_in(self._settings)
            configure_logging(
                self.log_level or self._settings.logging.level, self._settings.logging.format
            )
        return self._settings

    @property
    def store(self) -> Store:
        """The database for commands that write: an empty one is created and migrated."""
        if self._store is None:
            self._store = self.open_store()
            self._store.ensure_schema(auto_upgrade=True)
        return self._store

    def open_store(self) -> Store:
        """The database, created if missing (not its folder: a config error naming the file)."""
        from rostersync.config.loader import config_path
        from rostersync.store.db import Store

        try:
            return Store(self.settings.database)
        except ConfigError as exc:
            raise ConfigError(exc.issues, str(config_path(self.config_file))) from None

    @property
    def read_store(self) -> Store:
        """The database for commands that only read: it must exist with the current schema.
        Nothing is created or migrated, so a mistyped path is an error, not an empty listing."""
        from rostersync.store.db import Store

        if self._store is None:
            # Kept before the check, so close() disposes of it even when the check fails.
            self._store = Store(self.settings.database, create=False)
            self._store.ensure_schema(auto_upgrade=False)
        return self._store

    def engine(self, *, owner: str | None = None, **kwargs: Any) -> SyncEngine:
        """An engine for a command that syncs or processes jobs (see prepare)."""
        from rostersync.sync.engine import SyncEngine

        owner = self.prepare(owner)
        self.settle_collector()
        return SyncEngine(
            self.settings,
            self.store,
            owner=owner,
            interrupted_by="the command was stopped",
            **kwargs,
        )

    def settle_collector(self) -> None:
        """In a process of its own that is about to sync: the garbage collector's settings
        for the rest of it (rostersync.daemon.procs.settle_collector), its modules loaded."""
        if App.whole_process:
            from rostersync.daemon.procs import settle_collector

            settle_collector()

    def prepare(self, owner: str | None = None) -> str:
        """Before this command takes leases: put right what dead processes of this host left
        (their runs, source leases, job leases and staging; see rostersync.daemon.recovery), then
        register this process. Once per command; returns its owner name."""
        import structlog

        from rostersync.daemon import recovery
        from rostersync.sync.runs import instance_id

        if self._owner is None:
            name = owner or instance_id()
            found = recovery.recover(self.store, name)
            if found:
                structlog.get_logger().warning("recovered_after_crash", **found.as_log())
            recovery.register(self.store, name, "command")
            self._owner = name
        return self._owner

    def close(self) -> None:
        """At the command's end: drop this process's registry row, close the database."""
        from rostersync import hints

        hints.use_config(None)
        if self._store is None:
            return
        if self._owner is not None:
            import structlog

            from rostersync.daemon import recovery

            try:
                recovery.unregister(self._store, self._owner)
            except Exception as exc:  # the next recovery on this host drops the row
                structlog.get_logger().debug("unregister_failed", error=str(exc))
            self._owner = None
        with _sigint_deferred():
            self._store.dispose()
        self._store = None


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ctrl-C inside the block is delivered when it ends: closing the database, where a
    KeyboardInterrupt inside SQLAlchemy's pool is logged with its traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


#: Control characters (C0, DEL, C1): shown escaped in a table, where a name holding a line
#: break or a terminal escape from a roster would forge rows or recolour the terminal.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([line, sep, *body])


class WholeNumber(click.IntRange):
    """A count such as --limit: `'abc' is not a valid whole number.`, where click's IntRange
    says "not a valid integer range"."""

    name = "whole number"


class Seconds(click.FloatRange):
    """A duration in seconds such as --timeout: `'abc' is not a valid number of seconds.`,
    where click's FloatRange says "not a valid float range"."""

    name = "number of seconds"


def refuse_empty_user(emails: Sequence[str | None]) -> None:
    """`--user ""` (an unset `$EMAIL` in a script) names nobody: a usage error, never "every
    user" (what `groups list` made of it) nor "no such user: " with nothing after it."""
    if any(e is not None and not e.strip() for e in emails):
        fail("--user is empty: give the user's email address", EXIT_USAGE)


class OutputPath(click.Path):
    """A file a command writes (``--output``, ``--report``, ``--csv``): an empty value (an
    unset shell variable) is bad usage naming the option, where it was taken for the
    current folder ("Is a directory") or skipped."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("the path is empty: give a file's path, or leave the option out", param, ctx)
        return super().convert(value, param, ctx)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    from rostersync.logs import stderr_line

    click.echo(stderr_line(f"rostersync: {message}"), err=True)
    sys.exit(code)


class Interrupted(click.exceptions.Abort):
    """Ctrl-C while a command ran (see :class:`Root`)."""


def after_ctrl_c() -> None:
    """On a terminal, end the line the terminal's ``^C`` began: a command's last line after a
    Ctrl-C is a line of its own there, and no blank line precedes it in a log."""
    if sys.stderr.isatty():
        click.echo(err=True)


class _RootContext(click.Context):
    def __exit__(self, *exc_info: Any) -> None:
        # Its close callbacks (App.close) run here, outside Root.invoke.
        try:
            super().__exit__(*exc_info)
        except KeyboardInterrupt:
            raise Interrupted() from None


class Root(click.Group):
    """The command line's root group: a Ctrl-C while the command line parses, runs or closes
    ends as :func:`run` says it, not after click's own blank line (on stderr whatever it is)."""

    context_class = _RootContext

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except KeyboardInterrupt:
            raise Interrupted() from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None


class Group(click.Group):
    """A command group (`users`, `runs`, ...) that points a command given under it which is a
    command of its own (`users import FILE`) to that command."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand as exc:
            root = ctx.find_root().command
            name = exc.command_name
            if isinstance(root, click.Group) and name in root.commands and not exc.possibilities:
                raise click.UsageError(
                    f"No such command {name!r}. Did you mean 'rostersync {name}'?",
                    ctx,
                ) from None
            raise


def writable_folder_or_fail(flag: str, path: str | os.PathLike[str], nothing: str) -> None:
    """Before a command's work: exit 2 unless ``path``'s folder exists and can be written, so
    that an output named with a mistyped folder does not cost the work (a dry run, an import
    committed) before it fails. ``nothing``: what was therefore not done."""
    folder = Path(path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        fail(
            f"{flag} {path}: the folder {str(folder)!r} does not exist or is not writable; "
            f"{nothing}",
            EXIT_USAGE,
        )


CONFIG_HELP = "config file (default: $ROSTERSYNC_CONFIG, else /etc/rostersync/rostersync.yaml)"
LOG_LEVELS = ("debug", "info", "warning", "error")


def config_given(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """`--config ""` (`--config "$CONF"` with the variable unset) is refused: taken as not
    given, it read $ROSTERSYNC_CONFIG or /etc/rostersync/rostersync.yaml, another config
    (production's) than the one meant."""
    if value is not None and not value.strip():
        raise click.BadParameter(
            "the path is empty: give the config file's path (without --config, "
            "$ROSTERSYNC_CONFIG or /etc/rostersync/rostersync.yaml is read)"
        )
    return value


def _set_on_app(attr: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
    """A callback that records a global option given after the command on the App."""

    def record(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if attr == "config_file":
            value = config_given(ctx, param, value)
        app = ctx.find_object(App)
        if value is not None and app is not None:
            setattr(app, attr, value)

    return record


def accept_global_options(group: click.Group) -> None:
    """Let `--config` and `--log-level` follow any command and subcommand too
    (`rostersync users list --config X`), as well as precede it."""
    for command in group.commands.values():
        if not any(p.name in ("global_config", "global_log_level") for p in command.params):
            command.params += [
                click.Option(
                    ["--config", "global_config"],
                    metavar="PATH",
                    expose_value=False,
                    callback=_set_on_app("config_file"),
                    help=CONFIG_HELP,
                ),
                click.Option(
                    ["--log-level", "global_log_level"],
                    type=click.Choice(LOG_LEVELS),
                    expose_value=False,
                    callback=_set_on_app("log_level"),
                    help="override logging.level",
                ),
            ]
        if isinstance(command, click.Group):
            accept_global_options(command)


def run(group: click.Group, argv: Sequence[str] | None = None) -> None:
    """Run the command line ``group`` with ``argv`` (default: the process's arguments), turning
    every error into its message and exit code, and a bug into an internal-error report."""
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        group.main(
            args=args,
            prog_name="rostersync",
            standalone_mode=False,
        )
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        if isinstance(exc, Interrupted):
            after_ctrl_c()
        fail("aborted", EXIT_FAILED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except ConfigError as exc:
        from rostersync.logs import stderr_line

        click.echo(stderr_line(f"rostersync: {exc}"), err=True)
        sys.exit(EXIT_USAGE)
    except StoreError as exc:
        from rostersync.logs import stderr_line

        click.echo(stderr_line(f"rostersync: {exc}"), err=True)
        sys.exit(EXIT_FAILED)
    except RostersyncError as exc:
        import structlog  # here: `--help` and light commands never need it

        from rostersync.logs import stderr_line

        structlog.get_logger().debug("command_failed", error=str(exc))
        click.echo(stderr_line(f"rostersync: {exc}"), err=True)
        sys.exit(EXIT_FAILED)
    except OSError as exc:
        if exc.filename is None:
            internal_error(exc, args)
        # A path the user gave (an --output folder that does not exist, a full disk): theirs
        # to fix, and the path and the reason say it all.
        fail(f"{exc.filename}: {exc.strerror or exc}", EXIT_FAILED)
    except Exception as exc:
        if _lock_wait_over(exc):
            from rostersync.store.postgres import READ_LOCK_WAIT_S

            fail(
                "the database is locked: another session has held a lock on a table this "
                f"command reads for more than {READ_LOCK_WAIT_S:g} s (a VACUUM FULL, a "
                "migration, LOCK TABLE, a first sync's apply; PostgreSQL's pg_locks names "
                "it); run it again when that session is done",
                EXIT_FAILED,
            )
        if _sqlite_busy(exc):
            from rostersync.store.db import BUSY_TIMEOUT_MS

            fail(
                "the database is locked: another process has held a write transaction on it "
                f"for more than {BUSY_TIMEOUT_MS / 1000:g} s (a sync, an import, the daemon "
                "applying a run, or a tool such as sqlite3); what this command was writing was "
                "rolled back: run it again when that process is done",
                EXIT_FAILED,
            )
        internal_error(exc, args)


def _lock_wait_over(exc: BaseException) -> bool:
    """PostgreSQL's lock_timeout, which only a command that reads sets (store.postgres)."""
    from rostersync.store.postgres import LOCK_NOT_AVAILABLE

    return getattr(getattr(exc, "orig", None), "sqlstate", None) == LOCK_NOT_AVAILABLE


def _sqlite_busy(exc: BaseException) -> bool:
    """SQLite's "database is locked" after the busy timeout ran out: another process's to
    finish, not a bug (an import's rows and the daemon wait it out and try again; a command
    that cannot stops here)."""
    orig = getattr(exc, "orig", None)
    return (getattr(orig, "sqlite_errorcode", 0) & 0xFF) == 5  # SQLITE_BUSY


# -- errors nobody expected ---------------------------------------------------------------------


def internal_error(exc: BaseException, args: Sequence[str]) -> NoReturn:
    """A bug, not bad input: one line for the user, the full trace kept where they can send it.

    The trace goes to a private file and, when logs are JSON lines (journald, pipes), into the
    log as well; a terminal gets the line only. Secrets are scrubbed from all of them.
    """
    import structlog

    from rostersync.logs import configure as configure_logging
    from rostersync.logs import renders_json, scrub, stderr_line

    summary = _one_line(scrub(f"{type(exc).__name__}: {exc}"))
    trace = scrub("".join(traceback.format_exception(exc)))
    path, why_not = _save_trace(trace, summary, args)
    if not structlog.is_configured():
        configure_logging()  # failed before the config was read: keep logs off stdout
    as_json = renders_json()
    # A terminal gets the trace only when it could not be saved anywhere.
    with_trace = {"exception": trace} if as_json or path is None else {}
    structlog.get_logger().error(
        "internal_error", error=summary, trace_file=str(path) if path else None, **with_trace
    )
    where = f"full trace in {path}" if path else f"the trace could not be saved ({why_not})"
    click.echo(stderr_line(f"rostersync: internal error: {summary} ({where})"), err=True)
    sys.exit(EXIT_FAILED)


def _one_line(text: str, limit: int = 500) -> str:
    lines = text.strip().splitlines() or [""]
    line = lines[0] + (" ..." if len(lines) > 1 else "")
    line = "".join(c if c.isprintable() else "?" for c in line)  # no escapes to the terminal
    return line if len(line) <= limit else line[: limit - 3] + "..."


def trace_dirs() -> list[Path]:
    """Where a trace is kept, best first: systemd's StateDirectory, the XDG state folder, then
    the system temp folder (a plain private file there, no folder of ours to hijack)."""
    dirs: list[Path] = []
    if state := os.environ.get("STATE_DIRECTORY"):
        dirs.append(Path(state.split(":")[0]) / "internal-errors")
    xdg = os.environ.get("XDG_STATE_HOME", "")
    try:
        base = Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".local" / "state"
        dirs.append(base / "rostersync")
    except RuntimeError:  # no home directory to be found
        pass
    dirs.append(Path(tempfile.gettempdir()))
    return dirs


def _save_trace(trace: str, summary: str, args: Sequence[str]) -> tuple[Path | None, str]:
    """Write the trace to a new file readable by its owner only; its path, or why not."""
    from rostersync.logs import scrub

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    header = (
        f"rostersync {__version__} (Python {platform.python_version()}) at {stamp}\n"
        f"command: rostersync {scrub(shlex.join(args))}\n"
        f"error: {summary}\n\n"
    )
    problems: list[str] = []
    temp = Path(tempfile.gettempdir())
    for folder in trace_dirs():
        try:
            if folder != temp:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkstemp: a fresh name, created exclusively, mode 0600.
            fd, name = tempfile.mkstemp(
                prefix=f"rostersync-internal-error-{stamp}-", suffix=".log", dir=folder
            )
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(header + trace)
            return Path(name), ""
        except OSError as exc:
            problems.append(f"{folder}: {exc.strerror or exc}")
    return None, "; ".join(problems)

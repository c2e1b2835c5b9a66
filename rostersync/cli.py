"""The `rostersync` command line (see CONTRACT.md for names, JSON shapes and exit codes).

Exit codes: 0 success; 1 a run failed or was held (or a job failed); 2 bad usage or bad
config. With ``--json`` the only thing on stdout is one JSON document; logs go to stderr.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from rostersync import __version__
from rostersync.errors import ConfigError, RostersyncError, RunNotFound, RunStateError, StoreError

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from rostersync.config.models import Settings
    from rostersync.progress import SyncProgress
    from rostersync.store.db import Store
    from rostersync.sync.changes import ChangeSet
    from rostersync.sync.engine import SyncEngine
    from rostersync.sync.runs import RunReport

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: What started a run (``sync_run.trigger``), as the reports say it.
TRIGGERS = {
    "cli": "the command line",
    "schedule": "the schedule",
    "startup": "the daemon's start (the source was due)",
    "approval": "an approval (`runs approve`)",
}


class App:
    """Lazily loaded settings and store, shared by the subcommands of one invocation."""

    def __init__(self, config_file: str | None, log_level: str | None) -> None:
        self.config_file = config_file
        self.log_level = log_level
        self._settings: Settings | None = None
        self._store: Store | None = None
        self._owner: str | None = None

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
        from rostersync.store.db import Store

        if self._store is None:
            self._store = Store(self.settings.database)
            self._store.ensure_schema(auto_upgrade=True)
        return self._store

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
        return SyncEngine(
            self.settings,
            self.store,
            owner=owner,
            interrupted_by="the command was stopped",
            **kwargs,
        )

    def prepare(self, owner: str | None = None) -> str:
        """Before this command takes leases: put right what dead processes of this host left
        (their runs, source leases, job leases and staging; see rostersync.recovery), then
        register this process. Once per command; returns its owner name."""
        import structlog

        from rostersync import recovery
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
        if self._store is None:
            return
        if self._owner is not None:
            import structlog

            from rostersync import recovery

            try:
                recovery.unregister(self._store, self._owner)
            except Exception as exc:  # the next recovery on this host drops the row
                structlog.get_logger().debug("unregister_failed", error=str(exc))
            self._owner = None
        self._store.dispose()
        self._store = None


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([line, sep, *body])


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    from rostersync.logs import stderr_line

    click.echo(stderr_line(f"rostersync: {message}"), err=True)
    sys.exit(code)


CONFIG_HELP = "config file (default: $ROSTERSYNC_CONFIG, else /etc/rostersync/rostersync.yaml)"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _set_on_app(attr: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
    """A callback that records a global option given after the command on the App."""

    def record(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", metavar="PATH", help=CONFIG_HELP)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="override logging.level")
@click.version_option(__version__, prog_name="rostersync")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, log_level: str | None) -> None:
    """Keep console users and class groups in step with school rosters."""
    ctx.obj = App(config_file, log_level)
    ctx.call_on_close(ctx.obj.close)


# -- sync ------------------------------------------------------------------------------------


def _print_report(r: RunReport) -> None:
    from rostersync.commands.runs import duration_text, rejections_line
    from rostersync.sync.runs import COUNT_KEYS

    flag = " (dry run)" if r.dry_run else ""
    click.echo(f"run {r.id}  source {r.source}  {r.mode}{flag}: {r.shown_status}")
    when = r.started_at.strftime("%Y-%m-%d %H:%M:%SZ") if r.started_at else "?"
    took = "" if r.duration is None else f", took {duration_text(r.duration)}"
    if r.approved_at is not None and r.trigger == "approval":
        approved = r.approved_at.strftime("%Y-%m-%d %H:%M:%SZ")
        click.echo(f"  started {when}; applied by an approval at {approved}{took}")
    else:
        click.echo(f"  started {when} by {TRIGGERS.get(r.trigger, r.trigger)}{took}")
    if r.error:
        click.echo(f"  error: {r.error}")
    if r.hold_reason and r.dry_run:
        click.echo(f"  a real run would be held: {r.hold_reason}")
        click.echo("  (a dry run changes nothing and cannot be approved)")
    elif r.hold_reason and r.status != "held":
        when = r.approved_at.strftime("%Y-%m-%d %H:%M:%SZ") if r.approved_at else "?"
        click.echo(f"  approved {when}; it had been held: {r.hold_reason}")
    elif r.superseded_by is not None:
        click.echo(f"  held: {r.hold_reason}")
        click.echo(
            f"  superseded: run {r.superseded_by} of {r.source} has succeeded since, so this "
            "run can no longer be approved"
        )
    elif r.hold_reason:
        click.echo(f"  held: {r.hold_reason}")
        click.echo(
            f"  review with `rostersync runs show {r.id} --changes`, "
            f"apply with `rostersync runs approve {r.id}`"
        )
    for w in r.warnings:
        click.echo(f"  warning: {w}")
    # Rejections get a line of their own, split by who rejected: the connector's figure
    # beside the fetch counts read as a contradiction of the total.
    figures = ", ".join(
        f"{k.replace('_', ' ')} {r.counts.get(k, 0)}" for k in COUNT_KEYS if k != "records_rejected"
    )
    click.echo(f"  {figures}")
    extra = {k: v for k, v in r.counts.items() if k not in COUNT_KEYS and v}
    if extra:
        click.echo("  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in extra.items()))
    fetched = {k: v for k, v in r.fetched.items() if k != "rejected"}
    if fetched:
        click.echo("  fetched: " + ", ".join(f"{k} {v}" for k, v in fetched.items()))
    if r.status != "failed" or r.counts.get("records_rejected"):
        click.echo("  " + rejections_line(r.counts, r.rejected))
    for rej in r.rejected[:20]:
        where = f" ({rej['location']})" if rej.get("location") else ""
        click.echo(f"  rejected {rej['entity']} {rej['sourced_id'] or '?'}: {rej['reason']}{where}")
    if len(r.rejected) > 20:
        click.echo(f"  ... and {len(r.rejected) - 20} more: `rostersync runs show {r.id}`")


async def _sync_and_drain(
    app: App,
    sources: list[str],
    mode: str | None,
    *,
    dry_run: bool,
    show_progress: bool = True,
    owner: str | None = None,
    changes: bool = False,
) -> list[RunReport]:
    from rostersync.logs import configure as configure_logging
    from rostersync.progress import SyncProgress
    from rostersync.sync.runs import SourceBusy, load_report

    # Progress only on a terminal: elsewhere stderr carries JSON log lines and nothing else.
    progress = SyncProgress(sys.stderr) if show_progress and sys.stderr.isatty() else None
    if progress is not None:
        # Log lines print above the live display instead of through it.
        settings = app.settings
        configure_logging(
            app.log_level or settings.logging.level, settings.logging.format, progress.log_stream
        )
    try:
        engine = app.engine(progress=progress, owner=owner)
        reports = []
        for name in sources:
            try:
                report = await engine.sync(name, mode=mode, dry_run=dry_run, changes=changes)
            except SourceBusy as exc:
                fail(str(exc))
            reports.append(report)
            if progress is not None:
                progress.applied(name, report.id, report.status, report.counts)
        if not dry_run:
            await _drain_with_progress(app, engine, progress)
            with app.store.read() as conn:
                reports = [load_report(conn, r.id) for r in reports]
    finally:
        if progress is not None:
            progress.close()
            settings = app.settings
            configure_logging(app.log_level or settings.logging.level, settings.logging.format)
    return reports


def _write_change_csv(path: Path, found: list[ChangeSet], *, members: bool) -> None:
    from rostersync.commands.runs import write_csv
    from rostersync.logs import notice

    try:
        rows = write_csv(path, found, members=members)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    notice("changes_written", f"wrote {rows} change(s) to {path}", rows=rows, path=str(path))


async def _drain_with_progress(app: App, engine: SyncEngine, progress: SyncProgress | None) -> None:
    """engine.drain(), reporting jobs done and still queued after every batch."""
    from rostersync.resync.queue import queue_depth

    def queued() -> int:
        with app.store.read() as conn:
            return int(queue_depth(conn)["queued"])

    def report(done: int) -> None:
        if progress is not None:
            progress.resync(done, queued(), final=False)

    done = await engine.drain(on_batch=report)
    if progress is not None and done:
        progress.resync(done, queued(), final=True)


@cli.command()
@click.option(
    "--source", "sources", multiple=True, metavar="NAME", help="only this source (repeatable)"
)
@click.option("--full", "mode", flag_value="full", help="read everything and sweep what is gone")
@click.option(
    "--delta", "mode", flag_value="delta", help="read only what changed since the last run"
)
@click.option("--dry-run", is_flag=True, help="report what would change; change nothing")
@click.option(
    "--changes",
    is_flag=True,
    help="with --dry-run: list every user and group the run would change",
)
@click.option(
    "--members", is_flag=True, help="with --changes: list owners and members added and removed"
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="with --changes: also write the change set to this CSV file",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def sync(
    app: App,
    sources: tuple[str, ...],
    mode: str | None,
    dry_run: bool,
    changes: bool,
    members: bool,
    csv_path: Path | None,
    as_json: bool,
) -> None:
    """Sync now in the foreground, then process the resync jobs it queued."""
    import asyncio

    if changes and not dry_run:
        fail(
            "--changes needs --dry-run (a held run's change set: `rostersync runs show ID "
            "--changes`)",
            EXIT_USAGE,
        )
    if (members or csv_path) and not changes:
        fail("--members and --csv need --changes", EXIT_USAGE)
    settings = app.settings
    unknown = [s for s in sources if s not in settings.sources]
    if unknown:
        fail(
            f"no source named {', '.join(unknown)} (configured: {', '.join(settings.sources) or 'none'})",
            EXIT_USAGE,
        )
    names = list(sources) or [n for n, s in settings.sources.items() if s.enabled]
    if not names:
        fail("no enabled source in the config", EXIT_USAGE)
    reports = asyncio.run(_sync_and_drain(app, names, mode, dry_run=dry_run, changes=changes))
    found: dict[int, ChangeSet] = {}
    if changes:
        from rostersync.commands.runs import change_set_lines
        from rostersync.sync import changes as changeset

        with app.store.read() as conn:
            for r in reports:
                cs = changeset.load(conn, r.id)
                if cs is not None:
                    found[r.id] = cs
        if csv_path is not None:
            _write_change_csv(csv_path, list(found.values()), members=members)
    if as_json:
        docs = []
        for r in reports:
            doc = r.as_json()
            if changes:
                cs = found.get(r.id)
                doc["changes"] = cs.as_json(members=members) if cs is not None else None
            docs.append(doc)
        emit_json({"runs": docs})
    else:
        for r in reports:
            _print_report(r)
            if r.id in found:
                click.echo("")
                for line in change_set_lines(found[r.id], members=members):
                    click.echo(f"  {line}" if line else "")
    if any(r.status in ("failed", "held") for r in reports):
        sys.exit(EXIT_FAILED)


# -- run ---------------------------------------------------------------------------------------


@cli.command()
@click.option("--once", is_flag=True, help="sync every enabled source, drain the queue, exit")
@click.option("--json", "as_json", is_flag=True, help="with --once: print one JSON document")
@click.option(
    "--instance-id",
    metavar="ID",
    help="this instance's name in leases (default HOSTNAME:PID; must be unique among running instances)",
)
@click.option(
    "--stop-timeout",
    type=float,
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="on SIGTERM, wait this long for in-flight syncs and jobs before giving their leases back",
)
@click.pass_obj
def run(app: App, once: bool, as_json: bool, instance_id: str | None, stop_timeout: float) -> None:
    """The daemon: scheduled syncs and resync workers (--once: one cycle, then exit)."""
    import asyncio

    from rostersync.config.loader import config_path

    settings = app.settings
    if once:
        names = [n for n, s in settings.sources.items() if s.enabled]
        # No progress lines: `run --once` is for timers and containers; their log is the JSON.
        reports = asyncio.run(
            _sync_and_drain(app, names, None, dry_run=False, show_progress=False, owner=instance_id)
        )
        if as_json:
            emit_json({"runs": [r.as_json() for r in reports]})
        else:
            for r in reports:
                _print_report(r)
        if any(r.status in ("failed", "held") for r in reports):
            sys.exit(EXIT_FAILED)
        return
    from rostersync.daemon import run_daemon

    sys.exit(
        run_daemon(
            app.settings,
            app.store,
            config_file=str(config_path(app.config_file)),
            instance_id=instance_id,
            stop_timeout=stop_timeout,
            log_level=app.log_level,
        )
    )


# -- resync --------------------------------------------------------------------------------------


@cli.command()
@click.option("--user", "users", multiple=True, metavar="EMAIL", help="this user (repeatable)")
@click.option("--all", "all_users", is_flag=True, help="every active user linked to a roster")
@click.option("--live", is_flag=True, help="refresh the teacher's classes from the source first")
@click.option(
    "--wait",
    is_flag=True,
    help="block until the jobs end (processing them here if no daemon runs); exit 1 if any failed",
)
@click.option(
    "--timeout",
    type=float,
    default=600.0,
    show_default=True,
    metavar="SECONDS",
    help="with --wait: give up waiting after this long (the jobs stay queued)",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def resync(
    app: App,
    users: tuple[str, ...],
    all_users: bool,
    live: bool,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Queue group resyncs; a running daemon (or `run --once`) picks them up."""
    import asyncio

    from rostersync import directory
    from rostersync.logs import notice
    from rostersync.resync.queue import queue_resync

    if bool(users) == all_users:
        fail("give --user EMAIL (one or more) or --all", EXIT_USAGE)
    started = time.monotonic()
    store = app.store
    with store.write() as conn:
        if all_users:
            from sqlalchemy import text

            ids = [
                r[0]
                for r in conn.execute(
                    text(
                        'SELECT DISTINCT u.id FROM "user" u JOIN user_identity i ON i.user_id = u.id '
                        "WHERE u.status = 'active'"
                    )
                )
            ]
        else:
            found, missing = directory.user_ids_by_email(conn, list(users))
            if missing:
                fail(f"no such user: {', '.join(missing)}", EXIT_USAGE)
            ids = sorted(found.values())
        queue_resync(
            conn, ids, reason="manual resync" + (" (live)" if live else ""), run_id=None, live=live
        )
        # Read the ids before the commit: a running daemon (woken by NOTIFY) may lease the
        # jobs within milliseconds of it, and they would no longer be `queued`.
        job_users = _queued_job_ids(conn, ids)
    job_ids = sorted(job_users)
    if not as_json:
        click.echo(f"queued {len(job_ids)} resync job(s)")
    waited = None
    if wait:
        waited = asyncio.run(_wait_for_jobs(app, job_users, timeout))
        jobs = waited.jobs
    else:
        with store.read() as conn:
            jobs = directory.list_jobs(conn, job_ids)
        if not as_json and job_ids and not _daemons(app):
            notice(
                "resync_no_daemon",
                "no daemon is running against this database: the jobs wait for "
                "one; `rostersync run --once` (or `resync --wait`) processes them now",
                "warning",
            )
    if as_json:
        doc: dict[str, Any] = {"queued": len(job_ids), "jobs": jobs}
        if waited is not None:
            doc["processed_by"] = waited.processed_by
            doc["timed_out"] = waited.timed_out
        emit_json(doc)
    elif wait:
        click.echo(_jobs_table(jobs))
        click.echo(_summary(jobs, waited, time.monotonic() - started))
    if waited is not None and waited.timed_out:
        unfinished = [j for j in jobs if j["state"] not in ("succeeded", "failed")]
        states = ", ".join(
            f"{n} {state}"
            for state in ("queued", "running")
            if (n := sum(j["state"] == state for j in unfinished))
        )
        then = (
            "the daemon goes on with them"
            if waited.processed_by == "daemon"
            else "they stay queued for a daemon or `rostersync run --once`"
        )
        fail(
            f"timed out after {timeout:g}s: {len(unfinished)} of {len(jobs)} job(s) not "
            f"finished ({states}); {then}"
        )
    if wait and any(j["state"] != "succeeded" for j in jobs):
        sys.exit(EXIT_FAILED)


def _summary(jobs: list[dict[str, Any]], waited: _Waited | None, seconds: float) -> str:
    """The last line of `resync --wait`: how the jobs ended, who did them, how long it took."""
    states = {s: sum(j["state"] == s for j in jobs) for s in ("succeeded", "failed")}
    left = len(jobs) - sum(states.values())
    parts = [f"{n} {state}" for state, n in states.items()]
    if left:
        parts.append(f"{left} unfinished")
    by = f" by {waited.processed_by}" if waited is not None and waited.processed_by else ""
    return f"{len(jobs)} job(s): {', '.join(parts)}; processed{by} in {seconds:.1f}s"


def _queued_job_ids(conn: Connection, user_ids: list[int]) -> dict[int, int]:
    """job id -> user id of the users' queued jobs."""
    from sqlalchemy import bindparam, text

    return {
        r[0]: r[1]
        for r in conn.execute(
            text(
                "SELECT id, user_id FROM resync_job WHERE state = 'queued' AND user_id IN :u"
            ).bindparams(bindparam("u", expanding=True)),
            {"u": user_ids or [-1]},
        )
    }


def _daemons(app: App) -> list[str]:
    from rostersync import recovery

    return recovery.live_daemons(app.store, app.settings.leases.expire_after)


@dataclass
class _Waited:
    jobs: list[dict[str, Any]]
    timed_out: bool
    processed_by: str | None  # "daemon", "this command", or None when nothing had to be done


#: How often `resync --wait` looks at its jobs (and for a daemon) while a daemon works.
WAIT_POLL = 0.25


async def _wait_for_jobs(app: App, job_users: dict[int, int], seconds: float) -> _Waited:
    """Wait until every job ended (succeeded, or failed for good), or ``seconds`` passed.

    While a daemon runs against the database it does the work and this only watches. When
    none does (none registered, or its heartbeat is older than ``leases.expire_after``), the
    jobs would wait for nobody: this command processes the queue itself, as `run --once`
    would, and says so; if a daemon appears meanwhile, it leaves the rest to it. The timeout
    is checked between batches."""
    import asyncio

    from rostersync.logs import configure as configure_logging
    from rostersync.progress import SyncProgress

    deadline = time.monotonic() + seconds
    progress = SyncProgress(sys.stderr) if sys.stderr.isatty() else None
    if progress is not None:
        configure_logging(
            app.log_level or app.settings.logging.level,
            app.settings.logging.format,
            progress.log_stream,
        )
    engine: SyncEngine | None = None
    by: str | None = None
    waiting = dict(job_users)
    try:
        app.prepare()  # jobs leased by a dead process of this host go back to the queue now
        while True:
            jobs = await asyncio.to_thread(_follow_jobs, app.store, waiting)
            unfinished = [j for j in jobs if j["state"] not in ("succeeded", "failed")]
            if progress is not None and jobs:
                done = len(jobs) - len(unfinished)
                progress.resync(done, len(unfinished), final=not unfinished)
            if not unfinished:
                return _Waited(jobs, timed_out=False, processed_by=by)
            daemons = await asyncio.to_thread(_daemons, app)
            if daemons and by != "daemon":
                by = "daemon"
                _notice(
                    progress,
                    "resync_waiting_for_daemon",
                    f"waiting for the daemon {daemons[0]} to process them",
                )
            elif not daemons and by != "this command":
                by = "this command"
                _notice(
                    progress,
                    "resync_processing_here",
                    "no daemon is running against this database: processing the queue here "
                    "(as `rostersync run --once` would)",
                )
            left = deadline - time.monotonic()
            if left <= 0:
                return _Waited(jobs, timed_out=True, processed_by=by)
            if daemons:
                await asyncio.sleep(min(WAIT_POLL, left))
                continue
            if engine is None:
                engine = app.engine()
            if not await engine.process_batch():
                # Nothing due: ours wait out a retry's backoff, or another process holds them.
                due = await asyncio.to_thread(_due_soonest, app.store)
                await asyncio.sleep(min(max(due or 0.0, WAIT_POLL), 1.0, left))
    finally:
        if progress is not None:
            progress.close()
            configure_logging(
                app.log_level or app.settings.logging.level, app.settings.logging.format
            )


def _follow_jobs(store: Store, waiting: dict[int, int]) -> list[dict[str, Any]]:
    """The jobs waited for. A job that is gone was folded into a newer job of its user (a
    retry that found one queued): that one is followed instead."""
    from sqlalchemy import bindparam, text

    from rostersync import directory

    with store.read() as conn:
        jobs = directory.list_jobs(conn, sorted(waiting))
        gone = set(waiting) - {j["id"] for j in jobs}
        if gone:
            users = {waiting.pop(job_id) for job_id in gone}
            newer = conn.execute(
                text(
                    "SELECT max(id), user_id FROM resync_job WHERE user_id IN :u GROUP BY user_id"
                ).bindparams(bindparam("u", expanding=True)),
                {"u": sorted(users)},
            ).all()
            waiting.update({int(job_id): int(user_id) for job_id, user_id in newer})
            jobs = directory.list_jobs(conn, sorted(waiting))
    return jobs


def _due_soonest(store: Store) -> float | None:
    from rostersync.resync.queue import job_due_soonest

    with store.read() as conn:
        return job_due_soonest(conn)


def _notice(progress: SyncProgress | None, event: str, message: str) -> None:
    from rostersync.logs import notice

    if progress is not None:
        progress.log_stream.write(f"{message}\n")
    else:
        notice(event, message)


def _jobs_table(jobs: list[dict[str, Any]]) -> str:
    return table(
        [
            (j["id"], j["user"], j["state"], j["attempts"], j["reason"], j["last_error"] or "")
            for j in jobs
        ],
        ["id", "user", "state", "attempts", "reason", "last error"],
    )


# -- listings ------------------------------------------------------------------------------------


@cli.group()
def users() -> None:
    """The directory's users."""


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def users_list(app: App, as_json: bool) -> None:
    """List users with roles, sites, status and sources."""
    from rostersync import directory

    with app.read_store.read() as conn:
        rows = directory.list_users(conn)
    if as_json:
        emit_json(rows)
        return
    click.echo(
        table(
            [
                (
                    u["email"],
                    u["display_name"],
                    ", ".join(u["roles"]),
                    ", ".join(u["sites"]),
                    u["status"],
                    ", ".join(u["sources"]),
                )
                for u in rows
            ],
            ["email", "name", "roles", "sites", "status", "sources"],
        )
    )
    click.echo(f"{len(rows)} user(s)")


@cli.group()
def groups() -> None:
    """Groups mirrored from classes."""


@groups.command("list")
@click.option("--user", "user", metavar="EMAIL", help="only groups this user owns")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def groups_list(app: App, user: str | None, as_json: bool) -> None:
    """List groups with owners and members."""
    from rostersync import directory

    with app.read_store.read() as conn:
        if user:
            missing = directory.user_ids_by_email(conn, [user])[1]
            if missing:
                fail(f"no such user: {', '.join(missing)}", EXIT_USAGE)
        rows = directory.list_groups(conn, user)
    if as_json:
        emit_json(rows)
        return
    click.echo(
        table(
            [
                (
                    g["source"],
                    g["external_id"],
                    g["name"],
                    ", ".join(g["owners"]),
                    len(g["members"]),
                )
                for g in rows
            ],
            ["source", "class", "name", "owners", "members"],
        )
    )
    click.echo(f"{len(rows)} group(s)")


@cli.group()
def queue() -> None:
    """The resync queue."""


@queue.command("list")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.option(
    "--limit", type=int, default=1000, show_default=True, help="show at most this many jobs"
)
@click.pass_obj
def queue_list(app: App, as_json: bool, limit: int) -> None:
    """List resync jobs (running and queued first)."""
    from rostersync import directory

    with app.read_store.read() as conn:
        jobs = directory.list_jobs(conn, limit=limit)
    if as_json:
        emit_json(jobs)
        return
    click.echo(_jobs_table(jobs))


@cli.group()
def runs() -> None:
    """Sync-run history, reports and approvals."""


@runs.command("list")
@click.option("--source", metavar="NAME", help="only the runs of this source")
@click.option(
    "--limit", type=int, default=50, show_default=True, help="show at most this many runs"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def runs_list(app: App, source: str | None, limit: int, as_json: bool) -> None:
    """List sync runs, newest first (a held run a later run overtook: superseded)."""
    from rostersync import directory
    from rostersync.commands.runs import duration_text

    with app.read_store.read() as conn:
        rows = directory.list_runs(conn, source, limit)
    if as_json:
        emit_json(rows)
        return
    click.echo(
        table(
            [
                (
                    r["id"],
                    r["source"],
                    r["mode"],
                    r["status"] + (" (dry run)" if r["dry_run"] else ""),
                    r["trigger"],
                    r["started_at"],
                    duration_text(r["duration_seconds"]),
                    r["counts"].get("users_created", 0),
                    r["counts"].get("users_archived", 0),
                    r["counts"].get("records_rejected", 0),
                )
                for r in rows
            ],
            [
                "id",
                "source",
                "mode",
                "status",
                "trigger",
                "started",
                "took",
                "created",
                "archived",
                "rejected",
            ],
        )
    )


def _no_change_set(report: RunReport) -> str:
    """Why a run has no change set to show."""
    rid = report.id
    if report.status == "failed":
        return f"run {rid} failed: it changed nothing, and has no change set"
    if report.status == "running":
        return f"run {rid} is still running"
    if report.superseded_by is not None:
        return (
            f"run {rid} was overtaken by run {report.superseded_by}: its change set no longer "
            "describes anything and was dropped"
        )
    if report.dry_run:
        return (
            f"run {rid} is a dry run without a change set: it is kept only for "
            "`sync --dry-run --changes`, until a later run of the source succeeds"
        )
    if report.approved_at is not None:
        return f"run {rid} was approved and applied: `runs show {rid}` says what it did"
    if report.status == "held":
        return (
            f"run {rid} was held before this version recorded change sets: run a new sync "
            "of the source to see one"
        )
    return (
        f"run {rid} was applied ({report.status}): change sets are kept for held runs and "
        "for dry runs made with --changes"
    )


@runs.command("show")
@click.argument("run_id", type=int)
@click.option("--changes", is_flag=True, help="the exact change set of a held or dry run")
@click.option(
    "--members", is_flag=True, help="with --changes: list owners and members added and removed"
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="with --changes: write the change set to this CSV file instead",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def runs_show(
    app: App, run_id: int, changes: bool, members: bool, csv_path: Path | None, as_json: bool
) -> None:
    """One run's report: counts, warnings, every rejected record (--changes: what it would
    change)."""
    if (members or csv_path) and not changes:
        fail("--members and --csv need --changes", EXIT_USAGE)
    if as_json and csv_path:
        fail("--json and --csv cannot be used together", EXIT_USAGE)
    from rostersync.commands.runs import change_set_lines
    from rostersync.sync import changes as changeset
    from rostersync.sync.runs import load_report

    try:
        with app.read_store.read() as conn:
            report = load_report(conn, run_id)
            found = changeset.load(conn, run_id) if changes else None
    except RunNotFound as exc:
        fail(str(exc), EXIT_USAGE)
    if changes:
        if found is None:
            fail(_no_change_set(report))
        if csv_path is not None:
            _write_change_csv(csv_path, [found], members=members)
        elif as_json:
            emit_json(found.as_json(members=members))
        else:
            for line in change_set_lines(found, members=members):
                click.echo(line)
        return
    if as_json:
        emit_json(report.as_json())
        return
    _print_report(report)
    for rej in report.rejected[20:]:
        where = f" ({rej['location']})" if rej.get("location") else ""
        click.echo(f"  rejected {rej['entity']} {rej['sourced_id'] or '?'}: {rej['reason']}{where}")


#: Users and groups of the change set `runs approve` shows before it asks.
APPROVE_PREVIEW_ROWS = 5


def _interactive() -> bool:
    """Whether `runs approve` may ask (stdin and stdout are a terminal)."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def _approval_preview(app: App, run_id: int) -> bool:
    """Before an approval: refuse a dry run (exit 1) and show the change set's summary and
    first lines (the whole of it is `runs show ID --changes`). False when there is nothing
    to ask about: the engine then refuses the run, saying why."""
    from rostersync.commands.runs import change_set_lines
    from rostersync.sync import changes as changeset
    from rostersync.sync.runs import load_report

    try:
        with app.read_store.read() as conn:
            report = load_report(conn, run_id)
            found = changeset.load(conn, run_id)
    except RunNotFound as exc:
        fail(str(exc), EXIT_USAGE)
    if report.dry_run:
        fail(
            f"run {run_id} is a dry run: a preview that is never applied. Run "
            f"`rostersync sync --source {report.source}` to sync the source for real"
        )
    if report.status != "held" or report.superseded_by is not None:
        return False
    click.echo(f"run {run_id} of {report.source} was held: {report.hold_reason}")
    if found is None:
        click.echo("  (no change set was recorded for this run)")
        return True
    for line in change_set_lines(found, limit=APPROVE_PREVIEW_ROWS):
        click.echo(f"  {line}" if line else "")
    click.echo(f"  (all of it, members too: `rostersync runs show {run_id} --changes --members`)")
    return True


@runs.command("approve")
@click.argument("run_id", type=int)
@click.option("--yes", is_flag=True, help="do not ask (required when not on a terminal)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def runs_approve(app: App, run_id: int, yes: bool, as_json: bool) -> None:
    """Apply a held run as it was staged, then process the resyncs it queued. Shows the
    run's change set first and, on a terminal, asks."""
    import asyncio
    import contextlib

    from rostersync.logs import configure as configure_logging
    from rostersync.progress import SyncProgress
    from rostersync.sync.runs import load_report

    app.prepare()  # what a killed process left is put right first (its run may be this one)
    if not as_json:
        ask = _approval_preview(app, run_id)
    else:
        # stdout carries the JSON document alone, and stderr off a terminal JSON log lines.
        with contextlib.ExitStack() as stack:
            shown = sys.stderr
            if not sys.stderr.isatty():
                shown = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(shown))
            ask = _approval_preview(app, run_id)
    if ask and not yes:
        if not _interactive():
            fail(
                "runs approve asks for confirmation, and there is no terminal to ask on: "
                "review the change set (`rostersync runs show "
                f"{run_id} --changes`), then run `rostersync runs approve {run_id} --yes`",
                EXIT_USAGE,
            )
        if not click.confirm(f"Apply run {run_id}?", default=False, err=True):
            fail("not approved: nothing changed")
    progress = SyncProgress(sys.stderr) if not as_json else None
    if progress is not None and not progress.tty:
        progress = None  # progress lines are for a terminal; the report follows anyway
    settings = app.settings
    if progress is not None:
        # Log lines print above the live display instead of through it.
        configure_logging(
            app.log_level or settings.logging.level, settings.logging.format, progress.log_stream
        )

    async def go() -> RunReport:
        engine = app.engine(progress=progress)
        if progress is not None:
            click.echo(f"applying run {run_id} ...", err=True)
        report = await engine.approve(run_id)
        if progress is not None:
            progress.applied(report.source, report.id, report.status, report.counts)
        await _drain_with_progress(app, engine, progress)
        with app.store.read() as conn:
            return load_report(conn, report.id)

    try:
        report = asyncio.run(go())
    except RunNotFound as exc:
        fail(str(exc), EXIT_USAGE)
    except RunStateError as exc:
        fail(str(exc), EXIT_FAILED)
    finally:
        if progress is not None:
            progress.close()
            configure_logging(app.log_level or settings.logging.level, settings.logging.format)
    if as_json:
        emit_json({"runs": [report.as_json()]})
    else:
        _print_report(report)
    if report.status in ("failed", "held"):
        sys.exit(EXIT_FAILED)


# -- config and database ----------------------------------------------------------------------------


@cli.group("config")
def config_group() -> None:
    """Validate the config; print its JSON Schema."""


@config_group.command("check")
@click.pass_obj
def config_check(app: App) -> None:
    """Report every config error with its YAML path and line (exit 2 if any)."""
    from rostersync.config.loader import config_path, load_settings
    from rostersync.store.db import sqlite_file

    path = config_path(app.config_file)
    try:
        settings = load_settings(path, check_files=True)
    except ConfigError as exc:
        click.echo(f"{path}: {len(exc.issues)} error(s)", err=True)
        for issue in exc.issues:
            click.echo(f"  {issue}", err=True)
        sys.exit(EXIT_USAGE)
    enabled = [n for n, s in settings.sources.items() if s.enabled]
    click.echo(
        f"{path}: OK ({len(settings.sources)} source(s), {len(enabled)} enabled: {', '.join(enabled) or 'none'})"
    )
    db = sqlite_file(settings.database)
    if db is not None and not db.exists():
        # Not an error (the first sync creates it), but a mistyped path shows up here first.
        click.echo(
            f"  note: database {db} does not exist yet; a sync or `rostersync db upgrade` creates it"
        )


@config_group.command("schema")
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), help="write to this file"
)
def config_schema(output: Path | None) -> None:
    """Print the config's JSON Schema (for editors' YAML completion)."""
    from rostersync.config.loader import json_schema_text

    text = json_schema_text()
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        click.echo(text, nl=False)


@cli.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@click.pass_obj
def db_upgrade(app: App) -> None:
    """Apply pending migrations."""
    from rostersync.store.db import Store
    from rostersync.sync.provisioning import sync_catalog

    store = Store(app.settings.database)
    before, after = store.upgrade()
    with store.write() as conn:
        sync_catalog(conn, app.settings)
    click.echo(f"database {store!r}: {before or 'empty'} -> {after}")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        cli.main(
            args=args,
            prog_name="rostersync",
            standalone_mode=False,
        )
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
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
        internal_error(exc, args)


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


# -- commands defined in their own modules --------------------------------------------------------
# (each module adds its commands to `cli` here; keep this block at the end of the file)
from rostersync.commands.importing import import_cmd, outbox, teachers  # noqa: E402

cli.add_command(import_cmd, "import")
cli.add_command(teachers)
cli.add_command(outbox)

# Last, so that every command above and from the modules has them.
accept_global_options(cli)

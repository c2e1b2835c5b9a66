"""`runs list`, `runs show` and `runs approve`: sync-run history, reports, change sets and
approvals of held runs."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from rostersync import hints
from rostersync.cli.app import (
    EXIT_FAILED,
    EXIT_USAGE,
    App,
    Group,
    OutputPath,
    WholeNumber,
    emit_json,
    fail,
    table,
)
from rostersync.cli.draining import drain_with_progress, resync_states
from rostersync.cli.report import (
    change_set_lines,
    duration_text,
    jobs_line,
    print_report,
    print_run,
    run_doc,
    when_text,
    write_change_csv,
)
from rostersync.errors import RunNotFound, RunStateError

if TYPE_CHECKING:
    from rostersync.sync.runs import RunReport


class RunId(click.IntRange):
    """A run's id: the ids the database's integer column holds (PostgreSQL's and SQLite's
    refuse a larger number with an error of their own). What is no number at all, 0 or a
    negative number is named as not a run id, not as click's "not in the range 1<=x<=...";
    a number beyond the column's range names no run, and says so as an unknown id does."""

    name = "run id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1:
            self.fail(f"{str(value)!r} is not a run id (a whole number from 1)", param, ctx)
        if self.max is not None and number > self.max:
            fail(f"run {number} does not exist", EXIT_USAGE)
        return super().convert(value, param, ctx)


RUN_ID = RunId(min=1, max=2**31 - 1)


class RunIdCommand(click.Command):
    """A command whose RUN_ID may be mistyped as a negative number: `-5` is given to RUN_ID
    (which names it as no run id) instead of being taken for an unknown option."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" not in args and any(_negative(a) for a in args):
            args = [*(a for a in args if not _negative(a)), "--", *filter(_negative, args)]
        return super().parse_args(ctx, args)


def _negative(arg: str) -> bool:
    return arg.startswith("-") and arg[1:].isdigit()


@click.group("runs", cls=Group)
def runs() -> None:
    """Sync-run history, reports and approvals."""


@runs.command("list", short_help="List sync runs, newest first.")
@click.option("--source", metavar="NAME", help="only the runs of this source")
@click.option(
    "--limit",
    type=WholeNumber(min=0),
    metavar="N",
    default=50,
    show_default=True,
    help="show at most this many runs",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def runs_list(app: App, source: str | None, limit: int, as_json: bool) -> None:
    """List sync runs, newest first (a held run a later run overtook: superseded)."""
    from rostersync.sync.history import list_runs

    if source is not None and not source.strip():
        # `--source "$SOURCE"` with the variable unset: not "every source".
        known = ", ".join(sorted(app.settings.sources)) or "none"
        fail(f"--source is empty: give a source's name (configured: {known})", EXIT_USAGE)
    with app.read_store.read() as conn:
        rows = list_runs(conn, source, limit)
    if source is not None and not rows and source not in app.settings.sources:
        # Most likely a mistyped name: say which sources there are rather than list nothing.
        known = ", ".join(sorted(app.settings.sources)) or "none"
        fail(
            f"no runs of source '{source}', and the config has no such source ({known})", EXIT_USAGE
        )
    if as_json:
        emit_json(rows)
        return

    def done(r: dict[str, Any], count: str) -> str:
        # A held, dry, superseded or failed run changed nothing: its counts are what it would
        # have done, and must not read as accounts created or archived.
        n = int(r["counts"].get(count, 0))
        applied = r["status"] in ("succeeded", "succeeded_with_errors") and not r["dry_run"]
        return str(n) if applied or not n else f"({n})"

    cells = [
        (
            r["id"],
            r["source"],
            r["mode"],
            r["status"] + (" (dry run)" if r["dry_run"] else ""),
            r["trigger"],
            when_text(r["started_at"]),
            duration_text(r["duration_seconds"]),
            done(r, "users_created"),
            done(r, "users_archived"),
            r["counts"].get("records_rejected", 0),
        )
        for r in rows
    ]
    click.echo(
        table(
            cells,
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
    if any(str(c).startswith("(") for row in cells for c in row[7:9]):
        click.echo(
            "(n): what a run that changed nothing (held, dry, superseded, failed) would have done"
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
            f"run {rid} is a dry run with no change set: one is recorded only by `sync "
            "--dry-run --changes`, and dropped once a later run of the source succeeds"
        )
    if report.approved_at is not None:
        return (
            f"run {rid} was approved and applied: `{hints.command(f'runs show {rid}')}` says "
            "what it did"
        )
    if report.status == "held":
        return (
            f"run {rid} was held before this version recorded change sets: run a new sync "
            "of the source to see one"
        )
    return (
        f"run {rid} was applied ({report.status}): change sets are kept for held runs and "
        "for dry runs made with --changes"
    )


@runs.command("show", cls=RunIdCommand, short_help="One run's report, or its change set.")
@click.argument("run_id", type=RUN_ID)
@click.option("--changes", is_flag=True, help="the exact change set of a held or dry run")
@click.option(
    "--members", is_flag=True, help="with --changes: list owners and members added and removed"
)
@click.option(
    "--csv",
    "csv_path",
    type=OutputPath(dir_okay=False, path_type=Path),
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
    from rostersync.resync.queue import run_job_states
    from rostersync.sync import changes as changeset
    from rostersync.sync.runs import load_report

    try:
        with app.read_store.read() as conn:
            report = load_report(conn, run_id)
            found = changeset.load(conn, run_id) if changes else None
            # A dry run queues nothing; a held one queues its jobs only when approved.
            states = {} if report.dry_run else {run_id: run_job_states(conn, run_id)}
    except RunNotFound as exc:
        fail(str(exc), EXIT_USAGE)
    if changes:
        if found is None:
            fail(_no_change_set(report))
        if csv_path is not None:
            write_change_csv(csv_path, [found], members=members)
        elif as_json:
            emit_json(found.as_json(members=members))
        else:
            for line in change_set_lines(found, members=members):
                click.echo(line)
        return
    if as_json:
        emit_json(run_doc(report, states))
        return
    print_report(report)
    if (jobs := jobs_line(states.get(run_id, {}))) is not None:
        click.echo(f"  {jobs}")
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
            f"`{hints.command(f'sync --source {shlex.quote(report.source)}')}` to sync the "
            "source for real"
        )
    if report.status != "held" or report.superseded_by is not None:
        return False
    click.echo(f"run {run_id} of {report.source} was held: {report.hold_reason}")
    if found is None:
        click.echo("  (no change set was recorded for this run)")
        return True
    for line in change_set_lines(found, limit=APPROVE_PREVIEW_ROWS):
        click.echo(f"  {line}" if line else "")
    everything = hints.command(f"runs show {run_id} --changes --members")
    click.echo(f"  (all of it, members too: `{everything}`)")
    return True


def _approval_stopped(app: App, run_id: int) -> str:
    """What an approval stopped by Ctrl-C or SIGTERM left (it waited for its apply to end)."""
    from rostersync.sync.runs import load_report

    with app.store.read() as conn:
        status = load_report(conn, run_id).status
    if status == "held":
        return f"stopped: run {run_id} was not applied; it is still held and may be approved again"
    if status in ("succeeded", "succeeded_with_errors"):
        return (
            f"stopped while processing the resync jobs run {run_id} queued: the run is applied "
            f"({status}); the jobs left wait for the daemon, or the next `sync` or `run --once`"
        )
    return f"stopped: run {run_id} is {status} (`{hints.command(f'runs show {run_id}')}`)"


@runs.command(
    "approve",
    cls=RunIdCommand,
    short_help="Apply a held run (its changes are shown first).",
    epilog="Exit 1 when the run cannot be approved (a dry run, not held, overtaken by a later "
    "run, its staged data gone), was not approved at the question, or failed; 2 when there "
    "is no such run, or no terminal to ask on and no --yes.",
)
@click.argument("run_id", type=RUN_ID)
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

    try:
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
    except KeyboardInterrupt:
        fail(_approval_stopped(app, run_id), EXIT_FAILED)
    if ask and not yes:
        if not _interactive():
            fail(
                "runs approve asks for confirmation, and there is no terminal to ask on: "
                "review the change set "
                f"(`{hints.command(f'runs show {run_id} --changes')}`), then run "
                f"`{hints.command(f'runs approve {run_id} --yes')}`",
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
        await drain_with_progress(app, engine, progress)
        with app.store.read() as conn:
            return load_report(conn, report.id)

    try:
        report = asyncio.run(go())
    except RunNotFound as exc:
        fail(str(exc), EXIT_USAGE)
    except RunStateError as exc:
        fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        fail(_approval_stopped(app, run_id), EXIT_FAILED)
    finally:
        if progress is not None:
            progress.close()
            configure_logging(app.log_level or settings.logging.level, settings.logging.format)
    states = resync_states(app, [report])
    if as_json:
        emit_json({"runs": [run_doc(report, states)]})
    else:
        print_run(report, states)
    if report.status in ("failed", "held"):
        sys.exit(EXIT_FAILED)

"""`sync`, `run` (the daemon, or `--once`) and `resync`: the commands that change the directory
and then process the resync jobs they queued, showing progress on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from rostersync import hints
from rostersync.cli import waiting
from rostersync.cli.app import (
    EXIT_FAILED,
    EXIT_USAGE,
    App,
    OutputPath,
    Seconds,
    after_ctrl_c,
    emit_json,
    fail,
    refuse_empty_user,
    writable_folder_or_fail,
)
from rostersync.cli.draining import (
    drain_with_progress,
    resync_states,
    stop_on_sigterm,
    terminal_progress,
)
from rostersync.cli.report import (
    change_set_lines,
    jobs_table,
    print_run,
    run_doc,
    write_change_csv,
)

if TYPE_CHECKING:
    from rostersync.sync.changes import ChangeSet
    from rostersync.sync.runs import RunReport

_T = TypeVar("_T")


async def _sync_and_drain(
    app: App,
    sources: list[str],
    mode: str | None,
    *,
    dry_run: bool,
    show_progress: bool = True,
    owner: str | None = None,
    changes: bool = False,
    trigger: str = "cli",
    phase: _Phase | None = None,
) -> tuple[list[RunReport], dict[str, str]]:
    """Each source's run, then the resyncs they queued: the runs' reports, and the sources
    another instance was syncing (name -> why), which are skipped while the others run.
    ``phase`` is told when the runs are done and the resyncs begin."""
    for name in sources:  # before the imports below: see SourceConfig.prepare_http
        source = app.settings.sources[name]
        if App.whole_process and (mode or source.mode) == "full":
            source.prepare_workers(app.settings.database_dialect)
        source.prepare_http()
    from rostersync.sync.leasing import SourceBusy
    from rostersync.sync.runs import load_report

    # The runs end as interrupted and give their leases back now, not at the next recovery.
    stop_on_sigterm()
    with terminal_progress(app, show=show_progress) as progress:
        engine = app.engine(progress=progress, owner=owner)
        if App.whole_process:  # the process ends after these runs (SyncEngine._keep)
            from rostersync.daemon.procs import KEPT_UNTIL_EXIT

            engine.spent = KEPT_UNTIL_EXIT
        reports = []
        busy: dict[str, str] = {}
        for name in sources:
            try:
                report = await engine.sync(
                    name, mode=mode, dry_run=dry_run, changes=changes, trigger=trigger
                )
            except SourceBusy as exc:
                busy[name] = str(exc)
                continue
            reports.append(report)
            if progress is not None:
                progress.applied(name, report.id, report.status, report.counts)
        if not dry_run and reports:
            if engine.spent and any(
                r.counts.get("resync_queued") for r in reports if r.status != "held"
            ):
                # Resyncs to run: the view of the mirror goes first, so that their memory
                # does not come on top of it (a steady-state run at XL: 90 MiB more at peak).
                # A held run's count is what it would queue: it queued none.
                engine.spent.clear()
            if phase is not None:
                phase.draining = True
            await drain_with_progress(app, engine, progress)
            with app.store.read() as conn:
                reports = [load_report(conn, r.id) for r in reports]
    return reports, busy


@dataclass
class _Phase:
    """Where a command's runs are: their resyncs begin once every run is done."""

    draining: bool = False


def _stoppable(runs: Callable[[_Phase], Coroutine[Any, Any, _T]]) -> _T:
    """``asyncio.run(runs(phase))``; stopped by Ctrl-C or SIGTERM, one line saying so (not
    "aborted"): while the runs go, the engine has failed each
    unfinished one as interrupted; in their resyncs, the runs are done and what is left of
    the jobs waits for the next drain."""
    import asyncio

    phase = _Phase()
    try:
        return asyncio.run(runs(phase))
    except KeyboardInterrupt:
        after_ctrl_c()
        if phase.draining:
            fail(
                "stopped while processing the resync jobs its runs queued: the runs are done "
                f"(`{hints.command('runs list')}`); the jobs left wait for the daemon, or the "
                "next `sync` or `run --once`",
                EXIT_FAILED,
            )
        fail("stopped: a run it had not finished is failed as interrupted", EXIT_FAILED)


def _end(reports: list[RunReport], busy: dict[str, str]) -> None:
    """After the runs' output: each source skipped as busy on stderr, and exit 1 when a run
    failed or was held or a source could not be synced."""
    from rostersync.logs import stderr_line

    for why in busy.values():
        click.echo(stderr_line(f"rostersync: {why}"), err=True)
    if busy or any(r.status in ("failed", "held") for r in reports):
        sys.exit(EXIT_FAILED)


def _busy_json(busy: dict[str, str]) -> list[dict[str, str]]:
    return [{"source": name, "error": why} for name, why in busy.items()]


@click.command(
    "sync",
    short_help="Sync now, then process the resyncs it queued.",
    epilog="Exit 1 when a run failed or was held (a dry run: a real run would be held) or a "
    "source was being synced elsewhere; 2 for bad usage or config.",
)
@click.option(
    "--source", "sources", multiple=True, metavar="NAME", help="only this source (repeatable)"
)
@click.option("--full", is_flag=True, help="read everything and sweep what is gone")
@click.option("--delta", is_flag=True, help="read only what changed since the last run")
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
    type=OutputPath(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="with --changes: also write the change set to this CSV file",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def sync(
    app: App,
    sources: tuple[str, ...],
    full: bool,
    delta: bool,
    dry_run: bool,
    changes: bool,
    members: bool,
    csv_path: Path | None,
    as_json: bool,
) -> None:
    """Sync now in the foreground, then process the resync jobs it queued."""

    if full and delta:
        # Given both, one would silently win: an operator who added --full to force a sweep
        # would get a delta run.
        fail("--full and --delta cannot be used together", EXIT_USAGE)
    mode = "full" if full else "delta" if delta else None
    if changes and not dry_run:
        fail(
            "--changes needs --dry-run (a held run's change set: "
            f"`{hints.command('runs show ID --changes')}`)",
            EXIT_USAGE,
        )
    if (members or csv_path) and not changes:
        fail("--members and --csv need --changes", EXIT_USAGE)
    if csv_path is not None:
        writable_folder_or_fail("--csv", csv_path, "nothing was run")
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
    reports, busy = _stoppable(
        lambda phase: _sync_and_drain(
            app, names, mode, dry_run=dry_run, changes=changes, phase=phase
        )
    )
    found: dict[int, ChangeSet] = {}
    if changes:
        from rostersync.sync import changes as changeset

        with app.store.read() as conn:
            for r in reports:
                cs = changeset.load(conn, r.id)
                if cs is not None:
                    found[r.id] = cs
        if csv_path is not None:
            write_change_csv(csv_path, list(found.values()), members=members)
    states = resync_states(app, reports)
    if as_json:
        docs = []
        for r in reports:
            doc = run_doc(r, states)
            if changes:
                cs = found.get(r.id)
                doc["changes"] = cs.as_json(members=members) if cs is not None else None
            docs.append(doc)
        emit_json({"runs": docs, "busy": _busy_json(busy)})
    else:
        for r in reports:
            print_run(r, states)
            if r.id in found:
                click.echo("")
                for line in change_set_lines(found[r.id], members=members):
                    click.echo(f"  {line}" if line else "")
    _end(reports, busy)


# -- run ---------------------------------------------------------------------------------------


@click.command(
    "run",
    short_help="The daemon (--once: one cycle, then exit).",
    epilog="Exit (--once) 1 when a run failed or was held or a source was being synced "
    "elsewhere; the daemon exits 0 when stopped. 2 for bad usage or config.",
)
@click.option("--once", is_flag=True, help="sync every enabled source, drain the queue, exit")
@click.option("--json", "as_json", is_flag=True, help="with --once: print one JSON document")
@click.option(
    "--trigger",
    type=click.Choice(["cli", "schedule"]),
    default="cli",
    show_default=True,
    help="with --once: the trigger its runs record (rostersync-once.service says schedule)",
)
@click.option(
    "--instance-id",
    metavar="ID",
    help="this instance's name in leases (default HOSTNAME:PID; must be unique among running instances)",
)
@click.option(
    "--stop-timeout",
    type=Seconds(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="on SIGTERM, wait this long for in-flight syncs and jobs before giving their leases back",
)
@click.pass_obj
def run(
    app: App,
    once: bool,
    as_json: bool,
    trigger: str,
    instance_id: str | None,
    stop_timeout: float,
) -> None:
    """The daemon: scheduled syncs and resync workers (--once: one cycle, then exit)."""

    from rostersync.config.loader import config_path

    if not once and (as_json or trigger != "cli"):
        # The daemon prints no document and records its own triggers: a flag it would
        # ignore is a mistake to point out, not to start a daemon over.
        flag = "--json" if as_json else "--trigger"
        fail(f"{flag} goes with --once", EXIT_USAGE)
    settings = app.settings
    if once:
        names = [n for n, s in settings.sources.items() if s.enabled]
        # No progress lines: `run --once` is for timers and containers; their log is the JSON.
        reports, busy = _stoppable(
            lambda phase: _sync_and_drain(
                app,
                names,
                None,
                dry_run=False,
                show_progress=False,
                owner=instance_id,
                trigger=trigger,
                phase=phase,
            )
        )
        states = resync_states(app, reports)
        if as_json:
            emit_json({"runs": [run_doc(r, states) for r in reports], "busy": _busy_json(busy)})
        else:
            for r in reports:
                print_run(r, states)
        _end(reports, busy)
        return
    from rostersync.daemon.service import run_daemon

    app.settle_collector()
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


@click.command("resync", short_help="Queue group resyncs of users.")
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
    type=Seconds(min=0),
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
    from rostersync.resync.queue import queue_resync, queued_job_ids

    if bool(users) == all_users:
        fail("give --user EMAIL (one or more) or --all", EXIT_USAGE)
    refuse_empty_user(users)
    started = time.monotonic()
    store = app.store
    with store.write() as conn:
        if all_users:
            ids = directory.active_linked_user_ids(conn)
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
        job_users = queued_job_ids(conn, ids)
    job_ids = sorted(job_users)
    if not as_json:
        click.echo(f"queued {len(job_ids)} resync job(s)")
    waited = None
    if wait:
        waited = asyncio.run(waiting.wait_for_jobs(app, job_users, timeout))
        jobs = waited.jobs
    else:
        with store.read() as conn:
            jobs = directory.list_jobs(conn, job_ids)
        if not as_json and job_ids and not waiting.live_daemons(app):
            notice(
                "resync_no_daemon",
                "no daemon is running against this database: the jobs wait for "
                f"one; `{hints.command('run --once')}` processes them now (with --wait, "
                "resync does it itself)",
                "warning",
            )
    rejected = waiting.records_rejected(jobs)
    if as_json:
        doc: dict[str, Any] = {"queued": len(job_ids), "jobs": jobs}
        if waited is not None:
            doc["processed_by"] = waited.processed_by
            doc["timed_out"] = waited.timed_out
        if live:
            doc["records_rejected"] = rejected
        emit_json(doc)
    elif wait:
        click.echo(jobs_table(jobs))
        if rejected:
            # The records stay as the last sync left them: say so, or nobody looks.
            click.echo(
                f"the source rejected {rejected} record(s) in the live answers: they keep "
                "what the last sync stored (see the `live_answer_rejected` log line)"
            )
        click.echo(waiting.wait_summary(jobs, waited, time.monotonic() - started))
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
            else f"they stay queued for a daemon or `{hints.command('run --once')}`"
        )
        fail(
            f"timed out after {timeout:g}s: {len(unfinished)} of {len(jobs)} job(s) not "
            f"finished ({states}); {then}"
        )
    if wait and any(j["state"] != "succeeded" for j in jobs):
        sys.exit(EXIT_FAILED)

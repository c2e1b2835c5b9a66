"""`status`: one screen of what an operator checks first (each source's last run, the held
runs waiting for an approval, the queue, the directory's size), read only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from rostersync import hints
from rostersync.cli.app import App, emit_json, table
from rostersync.cli.report import when_text

if TYPE_CHECKING:
    from rostersync.config.source import SourceConfig


@click.command(
    "status",
    short_help="Sources' last runs, held runs, queue and directory.",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def status(app: App, as_json: bool) -> None:
    """Each source's schedule and last run, the held runs waiting for an approval, the
    resync queue and the directory's users and groups. Reads only: a database that does not
    exist is an error (exit 1), never created."""
    from sqlalchemy import text

    from rostersync.daemon.recovery import stopped_jobs
    from rostersync.resync.queue import queue_depth
    from rostersync.store.db import as_utc
    from rostersync.sync import history

    settings = app.settings
    with app.read_store.read() as conn:
        last = {
            source: (st, rid, as_utc(at))
            for source, st, rid, at in history.last_finished_runs(conn)
        }
        held = history.approvable_held_runs(conn)
        queue = queue_depth(conn)
        # Running jobs whose process stopped stay `running` until a writer puts them back.
        queue["running_interrupted"] = len(stopped_jobs(conn))
        users = dict.fromkeys(("active", "archived"), 0)
        users.update(
            {
                str(st): int(n)
                for st, n in conn.execute(
                    text('SELECT status, count(*) FROM "user" GROUP BY status')
                )
            }
        )
        group_count = int(conn.execute(text("SELECT count(*) FROM groups")).scalar_one())
    sources: list[dict[str, Any]] = []
    for name, cfg in settings.sources.items():
        run = last.get(name)
        sources.append(
            {
                "name": name,
                "type": cfg.type,
                "enabled": cfg.enabled,
                "schedule": _schedule(cfg),
                "last_run": None
                if run is None
                else {
                    "id": run[1],
                    "status": run[0],
                    "finished_at": run[2].isoformat() if run[2] else None,
                },
                "held_runs": [rid for source, rid in held if source == name],
            }
        )
    doc = {
        "sources": sources,
        "held_runs": [{"id": rid, "source": source} for source, rid in held],
        "queue": queue,
        "users": users,
        "license_limit": settings.license_limit,
        "groups": group_count,
    }
    if as_json:
        emit_json(doc)
        return
    _print(doc)


def _schedule(cfg: SourceConfig) -> str | None:
    from rostersync.config.types import format_duration

    if cfg.schedule is None:
        return None
    if cfg.schedule.interval is not None:
        return f"every {format_duration(cfg.schedule.interval)}"
    return f"cron {cfg.schedule.cron}"


def _print(doc: dict[str, Any]) -> None:
    rows = []
    for s in doc["sources"]:
        run = s["last_run"]
        last = "never run"
        if run is not None:
            last = f"run {run['id']} {run['status']} at {when_text(run['finished_at'])}"
        rows.append(
            (
                s["name"],
                s["type"],
                s["schedule"] or "(none)" if s["enabled"] else "disabled",
                last,
                len(s["held_runs"]),
            )
        )
    click.echo(table(rows, ["source", "type", "schedule", "last run", "held"]))
    for h in doc["held_runs"]:
        review = hints.command(f"runs show {h['id']} --changes")
        apply = hints.command(f"runs approve {h['id']}")
        click.echo(
            f"held: run {h['id']} of {h['source']} waits for an approval: review with "
            f"`{review}`, apply with `{apply}`"
        )
    q, u = doc["queue"], doc["users"]
    stopped = ""
    if q["running_interrupted"]:
        stopped = (
            f", of which {q['running_interrupted']} left by a stopped process (the next "
            "sync or the daemon puts them back in the queue)"
        )
    click.echo(
        f"resync queue: {q['queued']} queued, {q['running']} running{stopped}, {q['failed']} "
        f"failed for good, {q['succeeded']} succeeded"
    )
    limit = doc["license_limit"]
    of_limit = f" (license_limit {limit})" if limit is not None else ""
    click.echo(
        f"directory: {u['active']} active user(s){of_limit}, {u['archived']} archived; "
        f"{doc['groups']} group(s)"
    )

"""Run history as the CLI (`runs list`, `status`), the daemon's status page and its metrics
read it: lists and counts of runs, read-only. The run row itself, its report and when a held
run is superseded are :mod:`rostersync.sync.runs`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

from rostersync.directory import iso_text, json_dict
from rostersync.sync.runs import find_superseded_by, run_duration

__all__ = ["approvable_held_runs", "held_counts", "last_finished_runs", "list_runs"]


def list_runs(conn: Connection, source: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Runs, newest first. A held run a later real run overtook is listed ``superseded``
    (``superseded_by`` names that run)."""
    where = "WHERE source = :source " if source else ""
    rows = conn.execute(
        text(
            "SELECT id, source, mode, status, trigger, dry_run, started_at, finished_at, counts, "
            f"hold_reason, error, approved_at FROM sync_run {where}ORDER BY id DESC LIMIT :limit"
        ),
        {"source": source, "limit": limit},
    ).all()
    out = []
    for rid, src, mode, status, trigger, dry, started, finished, counts, hold, err, ok in rows:
        newer = find_superseded_by(conn, rid) if status == "held" and not dry else None
        out.append(
            {
                "id": rid,
                "source": src,
                "mode": mode,
                "status": "superseded" if newer is not None else status,
                "superseded_by": newer,
                "trigger": trigger,
                "dry_run": bool(dry),
                "started_at": iso_text(started),
                "finished_at": iso_text(finished),
                "approved_at": iso_text(ok),
                "duration_seconds": run_duration(started, ok, finished),
                "counts": json_dict(counts),
                "hold_reason": hold,
                "error": err,
            }
        )
    return out


def last_finished_runs(conn: Connection) -> list[tuple[str, str, int, Any]]:
    """(source, status, id, finished_at) of each source's last real run that has ended."""
    rows = conn.execute(
        text(
            "SELECT source, status, id, finished_at FROM sync_run WHERE id IN "
            "(SELECT max(id) FROM sync_run WHERE status <> 'running' AND dry_run = :no "
            "GROUP BY source)"
        ),
        {"no": False},
    ).all()
    return [
        (str(source), str(status), int(run_id), finished)
        for source, status, run_id, finished in rows
    ]


def approvable_held_runs(conn: Connection) -> list[tuple[str, int]]:
    """(source, id) of each held run that can still be approved, oldest first (the runs
    :func:`held_counts` counts)."""
    rows = conn.execute(
        text(
            "SELECT h.source, h.id FROM sync_run h WHERE h.status = 'held' "
            "AND h.dry_run = :no AND NOT EXISTS (SELECT 1 FROM sync_run s "
            "WHERE s.source = h.source AND s.id > h.id AND s.dry_run = :no "
            "AND s.status IN ('succeeded', 'succeeded_with_errors')) ORDER BY h.id"
        ),
        {"no": False},
    )
    return [(str(source), int(run_id)) for source, run_id in rows]


def held_counts(conn: Connection) -> dict[str, int]:
    """Held runs per source that can still be approved (no later real run has succeeded)."""
    rows = conn.execute(
        text(
            "SELECT h.source, count(*) FROM sync_run h WHERE h.status = 'held' "
            "AND h.dry_run = :no AND NOT EXISTS (SELECT 1 FROM sync_run s "
            "WHERE s.source = h.source AND s.id > h.id AND s.dry_run = :no "
            "AND s.status IN ('succeeded', 'succeeded_with_errors')) GROUP BY h.source"
        ),
        {"no": False},
    )
    return {str(source): int(n) for source, n in rows}

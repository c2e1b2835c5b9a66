"""How the commands show runs, change sets and resync jobs to a person: run reports, text
tables, CSV rows, durations and the rejection breakdown, from stored values."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from rostersync import hints
from rostersync.cli.app import fail, table

if TYPE_CHECKING:
    from rostersync.sync.changes import ChangeSet
    from rostersync.sync.runs import RunReport

CSV_COLUMNS = (
    "run_id",
    "kind",
    "action",
    "email",
    "display_name",
    "sourced_id",
    "reason",
    "source",
    "class_sourced_id",
    "name",
    "owners_added",
    "owners_removed",
    "members_added",
    "members_removed",
)


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> list[str]:
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return out


def _signed(added: int, removed: int) -> str:
    return f"+{added} -{removed}"


def change_set_lines(
    changes: ChangeSet, *, members: bool = False, limit: int | None = None
) -> list[str]:
    """The change set as text: a summary line, a table of users, a table of groups, and with
    ``members`` each group's owners and members added and removed, one per line. ``limit``:
    at most this many rows of each table (the rest is counted)."""
    from rostersync.sync.changes import summary_text

    # A group of another source (a user the run changes teaches there too) is named with it.
    one_source = len({g.get("source") for g in changes.groups}) <= 1
    users = changes.users[:limit] if limit is not None else changes.users
    groups = changes.groups[:limit] if limit is not None else changes.groups
    lines = [f"change set of run {changes.run_id}: {summary_text(changes.summary())}"]
    lines += [f"note: {n}" for n in changes.notes]
    if users:
        lines.append("")
        lines += _table(
            [
                (
                    u["action"],
                    u["email"],
                    u["display_name"],
                    ",".join(u["sourced_ids"]),
                    u["reason"],
                )
                for u in users
            ],
            ["user", "email", "name", "person", "reason"],
        )
        if len(changes.users) > len(users):
            lines.append(f"... and {len(changes.users) - len(users)} more users")
    if groups:
        lines.append("")
        lines += _table(
            [
                (
                    g["action"],
                    g["class_sourced_id"]
                    if one_source
                    else f"{g.get('source')}/{g['class_sourced_id']}",
                    g["name"] + (f" (was {g['old_name']})" if g.get("old_name") else ""),
                    _signed(g["owners_added"], g["owners_removed"]),
                    _signed(g["members_added"], g["members_removed"]),
                )
                for g in groups
            ],
            ["group", "class", "name", "owners", "members"],
        )
        if len(changes.groups) > len(groups):
            lines.append(f"... and {len(changes.groups) - len(groups)} more groups")
    if members:
        for g in changes.groups:
            detail = list(_member_lines(g))
            if detail:
                lines.append("")
                lines.append(f"{g['action']} {g['class_sourced_id']} {g['name']}:")
                lines += detail
        if not changes.members_listed:
            lines.append("(members are counted, not listed: see the note above)")
    if not changes.users and not changes.groups:
        lines.append("nothing would change")
    return lines


def _member_lines(group: dict[str, Any]) -> Iterable[str]:
    for sign, key in (("+", "added"), ("-", "removed")):
        for email in group["owners"][key]:
            yield f"  {sign} owner  {email}"
    listed = group.get("members")
    if listed is None:
        return
    for sign, key in (("+", "added"), ("-", "removed")):
        for m in listed[key]:
            who = m["email"] or "(no email)"
            yield f"  {sign} member {m['sourced_id']}  {who}  {m['name']}"


def csv_rows(changes: ChangeSet, *, members: bool = False) -> Iterable[dict[str, Any]]:
    """One row per user and group change; with ``members`` one more per owner and member
    added or removed (kind ``owner``/``member``, action ``added``/``removed``)."""
    for u in changes.users:
        yield {
            "run_id": changes.run_id,
            "kind": "user",
            **{k: u[k] for k in ("action", "email", "display_name", "reason")},
            "sourced_id": ",".join(u["sourced_ids"]),
        }
    for g in changes.groups:
        base = {
            "run_id": changes.run_id,
            "source": g.get("source", ""),
            "class_sourced_id": g["class_sourced_id"],
        }
        yield {
            **base,
            "kind": "group",
            "action": g["action"],
            "name": g["name"],
            **{
                k: g[k]
                for k in ("owners_added", "owners_removed", "members_added", "members_removed")
            },
        }
        if not members:
            continue
        for key in ("added", "removed"):
            for email in g["owners"][key]:
                yield {**base, "kind": "owner", "action": key, "email": email}
            for m in (g.get("members") or {}).get(key, []):
                yield {
                    **base,
                    "kind": "member",
                    "action": key,
                    "email": m["email"],
                    "display_name": m["name"],
                    "sourced_id": m["sourced_id"],
                }


def write_csv(path: Path, change_sets: Iterable[ChangeSet], *, members: bool = False) -> int:
    """Write the change sets to ``path`` (OSError for the caller to report); returns rows.
    Text cells are neutralised against formula injection, as the import report's are (names
    come from the roster); UTF-8 with a BOM, so that Excel reads the names right."""
    # Imported here: the importer package is large, and only this command writes CSV.
    from rostersync.importer.report import neutralize

    n = 0
    with path.open("w", newline="", encoding="utf-8-sig") as f:
        out = csv.DictWriter(f, CSV_COLUMNS, restval="")
        out.writeheader()
        for changes in change_sets:
            for row in csv_rows(changes, members=members):
                out.writerow(
                    {k: neutralize(v) if isinstance(v, str) else v for k, v in row.items()}
                )
                n += 1
    return n


def rejections_line(counts: dict[str, int], rejected: Sequence[dict[str, Any]]) -> str:
    """``records rejected 2: 1 by the connector (...), 1 by the provisioning rules (...)``:
    the records the source sent that the connector could not take, apart from the teachers
    the rules refused an account for (their email)."""
    from rostersync.sync.rules import EMAIL_REJECTIONS

    total = counts.get("records_rejected", 0)
    by_rules = sum(1 for r in rejected if str(r.get("reason") or "").startswith(EMAIL_REJECTIONS))
    by_connector = max(total - by_rules, 0)
    return (
        f"records rejected {total}: {by_connector} by the connector (records it could not "
        f"read or accept), {by_rules} by the provisioning rules (teachers whose email cannot "
        "be an account)"
    )


#: What started a run (``sync_run.trigger``), as the reports say it.
TRIGGERS = {
    "cli": "the command line",
    "schedule": "the schedule",
    "startup": "the daemon's start (the source was due)",
    "approval": "an approval (`runs approve`)",
}


def when_text(value: datetime | str | None) -> str:
    """A moment as every text output shows it (`sync`, `status`, `runs list`, `runs show`):
    UTC to the second, ``2026-12-07 16:49:31Z``; "?" for none. ``value``: a datetime (naive
    ones are UTC, as the store keeps them) or the ISO text of the JSON documents."""
    if value is None:
        return "?"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%SZ")


def print_report(r: RunReport) -> None:
    from rostersync.sync.runs import COUNT_KEYS

    flag = " (dry run)" if r.dry_run else ""
    click.echo(f"run {r.id}  source {r.source}  {r.mode}{flag}: {r.shown_status}")
    when = when_text(r.started_at)
    took = "" if r.duration is None else f", took {duration_text(r.duration)}"
    if r.approved_at is not None and r.trigger == "approval":
        approved = when_text(r.approved_at)
        click.echo(f"  started {when}; applied by an approval at {approved}{took}")
    else:
        click.echo(f"  started {when} by {TRIGGERS.get(r.trigger, r.trigger)}{took}")
    if r.error:
        click.echo(f"  error: {r.error}")
    if r.hold_reason and r.dry_run:
        click.echo(f"  a real run would be held: {r.hold_reason}")
        click.echo("  (a dry run changes nothing and cannot be approved)")
    elif r.hold_reason and r.status != "held":
        when = when_text(r.approved_at)
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
            f"  review with `{hints.command(f'runs show {r.id} --changes')}`, "
            f"apply with `{hints.command(f'runs approve {r.id}')}`"
        )
    for w in r.warnings:
        click.echo(f"  warning: {w}")
    # Rejections get a line of their own, split by who rejected: the connector's figure
    # beside the fetch counts read as a contradiction of the total.
    figures = ", ".join(
        f"{k.replace('_', ' ')} {r.counts.get(k, 0)}" for k in COUNT_KEYS if k != "records_rejected"
    )
    # A held or dry run's counts are what it would have done: its report says "users
    # archived 30" of a run that archived no one, as `runs list` puts them in parentheses.
    unapplied = r.dry_run or r.status == "held"
    click.echo(f"  {'not applied: ' if unapplied else ''}{figures}")
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
        click.echo(f"  ... and {len(r.rejected) - 20} more: `{hints.command(f'runs show {r.id}')}`")


def write_change_csv(path: Path, found: list[ChangeSet], *, members: bool) -> None:
    from rostersync.logs import notice

    try:
        rows = write_csv(path, found, members=members)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    notice("changes_written", f"wrote {rows} change(s) to {path}", rows=rows, path=str(path))


def run_doc(report: RunReport, states: Mapping[int, Mapping[str, int]]) -> dict[str, Any]:
    """A run's JSON, with its resync jobs by state where the command drained them."""
    doc = report.as_json()
    if report.id in states:
        doc["resync_states"] = dict(states[report.id])
    return doc


def print_run(report: RunReport, states: Mapping[int, Mapping[str, int]]) -> None:
    """A run's report, then what of its resyncs the command's drain did not finish."""
    print_report(report)
    if (line := unfinished_line(states.get(report.id, {}))) is not None:
        click.echo(f"  {line}")


def unfinished_line(states: Mapping[str, int]) -> str | None:
    """What of a command's resyncs its drain did not finish: a failed one waits for its
    retry (the daemon's, or the next command's drain), or failed for good."""
    retry, failed = states.get("queued", 0), states.get("failed", 0)
    if not retry and not failed:
        return None
    return (
        f"not done: {retry} resync(s) wait for a retry, {failed} failed for good "
        f"(`{hints.command('queue list')}` says why)"
    )


def jobs_line(states: Mapping[str, int]) -> str | None:
    """Where the resync jobs a run queued stand now (`runs show`); None when it has none (a
    job queued again by a later run before it ran counts there)."""
    shown = [f"{n} {state}" for state, n in states.items() if n]
    if not shown:
        return None
    why = f"; `{hints.command('queue list')}` says why" if states.get("failed") else ""
    return f"resync jobs: {', '.join(shown)}{why}"


def jobs_table(jobs: list[dict[str, Any]]) -> str:
    return table(
        [
            (j["id"], j["user"], _job_state(j), j["attempts"], j["reason"], _job_note(j))
            for j in jobs
        ],
        ["id", "user", "state", "attempts", "reason", "last error or note"],
    )


def _job_state(job: dict[str, Any]) -> str:
    """The state, and for a running job whose process stopped, that it did (it reads
    ``running`` until the next writer puts it back, see directory.list_jobs)."""
    if job.get("interrupted"):
        return f"{job['state']} ({job['interrupted_reason']})"
    return str(job["state"])


def _job_note(job: dict[str, Any]) -> str:
    """The job's last error; for a live job whose answer held records the source rejected,
    how many (they keep what the last sync stored): the table shows what the log said once."""
    if job["last_error"]:
        return str(job["last_error"])
    rejected = int((job.get("result") or {}).get("records_rejected", 0))
    if rejected:
        return f"live answer: {rejected} record(s) rejected (see live_answer_rejected)"
    return ""

"""`users list`, `groups list` and `queue list`: the directory and the resync queue, read only."""

from __future__ import annotations

import click

from rostersync.cli.app import (
    EXIT_USAGE,
    App,
    Group,
    WholeNumber,
    emit_json,
    fail,
    refuse_empty_user,
    table,
)
from rostersync.cli.report import jobs_table


@click.group("users", cls=Group)
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


@click.group("groups", cls=Group)
def groups() -> None:
    """Groups mirrored from classes."""


@groups.command("list")
@click.option("--user", "user", metavar="EMAIL", help="only groups this user owns")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def groups_list(app: App, user: str | None, as_json: bool) -> None:
    """List groups with owners and members."""
    from rostersync import directory

    refuse_empty_user([user])
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


@click.group("queue", cls=Group)
def queue() -> None:
    """The resync queue."""


@queue.command("list")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.option(
    "--limit",
    type=WholeNumber(min=0),
    metavar="N",
    default=1000,
    show_default=True,
    help="show at most this many jobs",
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
    click.echo(jobs_table(jobs))

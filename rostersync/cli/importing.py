"""`import FILE`, `import template`, `teachers list|import` and `outbox send` (docs/import.md).

Exit codes: 0 when the file was processed, whatever its rows' statuses (each row reports its
own; a script re-running a partial import must not stop at rows that already went in):
``--fail-on-errors`` turns any failed row into exit 1. A refused file (unreadable, a required
column missing, more than ``import.max_rows`` rows, unknown ``--sheet`` or ``--as`` user)
changes nothing and exits 2 naming the file, column or count.
"""

from __future__ import annotations

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
    emit_json,
    fail,
    table,
    writable_folder_or_fail,
)
from rostersync.cli.draining import drain_now
from rostersync.cli.report import unfinished_line
from rostersync.emails import normalize_email

if TYPE_CHECKING:
    from rostersync.importer import ImportResult

DEFAULT_XLSX_TEMPLATE = "rostersync-import-template.xlsx"
_IMPORT_EXIT = (
    "Exit 0 whatever the rows' statuses (each row has its own; --fail-on-errors: 1 if any "
    "row failed); 2 when the file is refused whole (unreadable, no Email column, too many "
    "rows), changing nothing."
)


class _ImportGroup(Group):
    """`import FILE [options]` and `import template [options]` share one word: anything that is
    not a subcommand name is a FILE for the hidden `file` subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # `--config X` / `--log-level L` may come first (`import --config X template`).
        lead: list[str] = []
        rest = list(args)
        while rest:
            taken = 2 if rest[0] in ("--config", "--log-level") else 0
            if rest[0].startswith(("--config=", "--log-level=")):
                taken = 1
            if not taken:
                break
            lead, rest = [*lead, *rest[:taken]], rest[taken:]
        if not rest or (rest[0] not in self.commands and rest[0] not in ("-h", "--help")):
            rest = ["file", *rest]
        return super().parse_args(ctx, [*lead, *rest])

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "FILE [--as EMAIL] [--dry-run] [--json] ...")
        formatter.write_usage(ctx.command_path, "template [--format csv|xlsx] [--output PATH]")


class _ImportFileContext(click.Context):
    """The hidden `file` subcommand is `import FILE` to the user: its usage line and its
    errors' "Try '... --help'" name `rostersync import`, never `rostersync import file`."""

    @property
    def command_path(self) -> str:
        return self.parent.command_path if self.parent is not None else super().command_path


class _ImportFileCommand(click.Command):
    context_class = _ImportFileContext

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "FILE [OPTIONS]")


@click.group(
    "import",
    cls=_ImportGroup,
    short_help="Bulk user import from CSV, TSV or XLSX.",
    epilog=_IMPORT_EXIT,
)
def import_cmd() -> None:
    """Bulk user import from CSV, TSV or XLSX (FILE; `-` reads pasted text from stdin).

    \b
    Options of `import FILE`:
      --as EMAIL        import as this admin (their permissions and sites apply)
      --dry-run         validate and preview; change nothing
      --json            print one JSON document
      --report PATH     write the rows with Status and Message as CSV
      --sheet NAME      XLSX: read this sheet (default: the first)
      --fail-on-errors  exit 1 if any row failed
      --no-wait         only queue the group resyncs; do not run them now
    The columns, each row's status and examples: docs/import.md.
    """


@import_cmd.command("file", cls=_ImportFileCommand, hidden=True, epilog=_IMPORT_EXIT)
@click.argument("file", metavar="FILE")
@click.option("--as", "actor", metavar="EMAIL", help="import as this admin user")
@click.option("--dry-run", is_flag=True, help="validate and preview; change nothing")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.option(
    "--report",
    "report_path",
    metavar="PATH",
    type=OutputPath(dir_okay=False),
    help="write the rows with Status and Message as CSV",
)
@click.option("--sheet", metavar="NAME", help="XLSX: the sheet to read (default: the first)")
@click.option("--fail-on-errors", is_flag=True, help="exit 1 if any row failed")
@click.option("--no-wait", is_flag=True, help="only queue the group resyncs; do not run them now")
@click.pass_obj
def import_file(
    app: App,
    file: str,
    actor: str | None,
    dry_run: bool,
    as_json: bool,
    report_path: str | None,
    sheet: str | None,
    fail_on_errors: bool,
    no_wait: bool,
) -> None:
    """Import users from FILE (CSV, TSV, XLSX; `-` for stdin), then process the group resyncs
    it queued (users created, linked, archived or reactivated), as `sync` does."""
    from rostersync.importer import ImportRefused, parse_bytes, read_path, run_import, write_report
    from rostersync.logs import notice

    if actor is not None and not actor.strip():
        # `--as "$ADMIN"` with the variable unset would import with the operator's
        # organization scope, the widest there is: refused, as an unknown --as user is.
        fail(
            "--as is empty: give the admin's email address (without --as the import has the "
            "operator's organization scope); nothing was imported",
            EXIT_USAGE,
        )
    settings = app.settings
    max_rows = settings.import_.max_rows
    if report_path:
        # Checked first: the report is written after the import has been committed.
        writable_folder_or_fail("--report", report_path, "nothing was imported")
    try:
        if file == "-":
            # Bytes, not text: an XLSX workbook may be piped in, and the BOM/encoding sniffing
            # needs the raw data.
            data = sys.stdin.buffer.read()
            parsed = parse_bytes(data, "<stdin>", max_rows=max_rows, sheet=sheet)
        else:
            parsed = read_path(file, max_rows=max_rows, sheet=sheet)
        result = run_import(app.store, settings, parsed, actor_email=actor, dry_run=dry_run)
    except ImportRefused as exc:
        fail(f"{exc}; nothing was imported", EXIT_USAGE)
        return  # fail() exits; the lazily imported module hides its NoReturn from mypy
    for warning in result.warnings:
        notice("import_warning", f"warning: {warning}", "warning")
    if report_path:
        write_report(report_path, parsed, result.rows)
    processed, states = 0, {}
    if result.resyncs_queued and not result.dry_run and not no_wait:
        # Without it the groups waited for a daemon, which many installs (timer, one-off
        # imports) do not run; a dry run rolled its jobs back with the rest.
        processed = drain_now(app, f"import {result.import_id} is committed")
        from rostersync.resync.queue import newest_job_states

        with app.store.read() as conn:
            states = newest_job_states(conn, result.resync_users)
    if as_json:
        emit_json({**result.as_json(), "resyncs_processed": processed, "resync_states": states})
    else:
        _print_result(result, report_path, processed=processed, waited=not no_wait)
        if (line := unfinished_line(states)) is not None:
            click.echo(line)
    if fail_on_errors and result.counts["failed"]:
        sys.exit(EXIT_FAILED)


def _print_result(
    result: ImportResult, report_path: str | None, *, processed: int = 0, waited: bool = True
) -> None:
    c = result.counts
    figures = (
        f"{c['created']} new, {c['updated']} updated, {c['unchanged']} unchanged, "
        f"{c['failed']} failed"
    )
    if result.dry_run:
        click.echo(f"Preview of {result.file_name} (dry run: nothing was changed)")
        click.echo(figures)
        flagged = [r for r in result.rows if not r.status.ok]
        if flagged:
            click.echo(
                table(
                    [(r.row, r.email, r.status, r.message) for r in flagged],
                    ["row", "email", "status", "message"],
                )
            )
        else:
            click.echo("no problems found")
    else:
        click.echo(
            table(
                [(r.row, r.email, r.status, r.message) for r in result.rows],
                ["row", "email", "status", "message"],
            )
        )
        click.echo(f"import {result.import_id} of {result.file_name}: {figures}")
        if result.verifications_queued:
            click.echo(
                f"{result.verifications_queued} verification email(s) queued "
                f"(the daemon sends them; or `{hints.command('outbox send')}`)"
            )
        _resyncs_line(result.resyncs_queued, processed, waited=waited)
    if report_path:
        click.echo(f"report written to {report_path}")


def _resyncs_line(queued: int, processed: int, *, waited: bool) -> None:
    """What became of an import's group resyncs: processed here, or left to the daemon."""
    if queued and waited:
        click.echo(f"{queued} group resync(s) queued; {processed} resync job(s) processed")
    elif queued:
        click.echo(
            f"{queued} group resync(s) queued (the daemon processes them; "
            f"or `{hints.command('run --once')}`)"
        )


@import_cmd.command("template", short_help="Write the import template (CSV or XLSX).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "xlsx"]),
    default="csv",
    show_default=True,
    help="the template's file format",
)
@click.option(
    "--output",
    metavar="PATH",
    type=OutputPath(dir_okay=False),
    help=f"write here (default: csv to stdout, xlsx to ./{DEFAULT_XLSX_TEMPLATE})",
)
def import_template(fmt: str, output: str | None) -> None:
    """Write the import template (CSV header row, or an XLSX workbook with a help sheet)."""
    from rostersync.importer import template_csv, template_xlsx

    if fmt == "csv":
        if output is None:
            click.echo(template_csv(), nl=False)
            return
        # A BOM so Excel reads the file as UTF-8 when the admin fills in accented names.
        Path(output).write_text(template_csv(), encoding="utf-8-sig", newline="")
    else:
        output = output or DEFAULT_XLSX_TEMPLATE
        Path(output).write_bytes(template_xlsx())
    click.echo(f"template written to {output}", err=True)


# -- teachers -------------------------------------------------------------------------------------


@click.group(cls=Group, short_help="Eligible teachers who are not users; their import.")
def teachers() -> None:
    """Eligible teachers of a roster source who are not users yet, and their manual import."""


def _check_source(app: App, source: str) -> None:
    if source not in app.settings.sources:
        configured = ", ".join(app.settings.sources) or "none"
        fail(f"no source named {source} (configured: {configured})", EXIT_USAGE)


@teachers.command("list", short_help="Eligible teachers of a source who are not users.")
@click.option("--source", required=True, metavar="NAME", help="the roster source")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def teachers_list(app: App, source: str, as_json: bool) -> None:
    """Eligible teachers (classes with students) of the --source who are not users yet."""
    from rostersync.importer import candidates
    from rostersync.sync.rules import sites_for

    _check_source(app, source)
    prov = app.settings.provisioning
    with app.read_store.read() as conn:
        found = candidates(conn, source, app.settings)
    rows = [
        {
            "sourced_id": t.sourced_id,
            "email": normalize_email(t.email),
            "display_name": t.display_name,
            "schools": list(t.school_names),
            "sites": list(sites_for(t, prov)),
        }
        for t in found
    ]
    if as_json:
        emit_json(rows)
        return
    click.echo(
        table(
            [
                (r["email"], r["display_name"], ", ".join(r["schools"]), ", ".join(r["sites"]))
                for r in rows
            ],
            ["email", "name", "schools", "default sites"],
        )
    )
    click.echo(f"{len(rows)} teacher(s) not yet users in {source}")


@teachers.command("import", short_help="Create users for eligible teachers of a source.")
@click.option("--source", required=True, metavar="NAME", help="the roster source")
@click.option("--email", "emails", multiple=True, metavar="EMAIL", help="this teacher (repeatable)")
@click.option("--all", "all_teachers", is_flag=True, help="every teacher `teachers list` shows")
@click.option("--role", metavar="ROLE", help="role to give (default: provisioning.default_role)")
@click.option("--site", metavar="SITE", help="site to give (default: site_map, then default_site)")
@click.option("--no-wait", is_flag=True, help="only queue the group resyncs; do not run them now")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.option("--fail-on-errors", is_flag=True, help="exit 1 if any teacher failed")
@click.pass_obj
def teachers_import(
    app: App,
    source: str,
    emails: tuple[str, ...],
    all_teachers: bool,
    role: str | None,
    site: str | None,
    no_wait: bool,
    as_json: bool,
    fail_on_errors: bool,
) -> None:
    """Create users for eligible teachers of the --source and build their groups."""
    from rostersync.importer import import_teachers

    if bool(emails) == all_teachers:
        fail("give --email EMAIL (one or more) or --all", EXIT_USAGE)
        return
    for flag, value, default in (
        ("--role", role, "provisioning.default_role"),
        ("--site", site, "the site_map sites, then provisioning.default_site"),
    ):
        if value is not None and not value.strip():
            # `--role "$ROLE"` with the variable unset: not the default, silently.
            fail(f"{flag} is empty: give its name, or leave {flag} out for {default}", EXIT_USAGE)
    _check_source(app, source)
    result = import_teachers(
        app.store,
        app.settings,
        source,
        emails=None if all_teachers else list(emails),
        role=role,
        site=site,
    )
    processed, states = 0, {}
    if result.resyncs_queued and not no_wait:
        processed = drain_now(app, "the teachers are imported")
        from rostersync.resync.queue import newest_job_states

        with app.store.read() as conn:
            states = newest_job_states(conn, result.resync_users)
    if as_json:
        emit_json({**result.as_json(), "resyncs_processed": processed, "resync_states": states})
    else:
        click.echo(
            table(
                [(o.email, o.sourced_id or "", o.status, o.message) for o in result.outcomes],
                ["email", "sourced id", "status", "message"],
            )
        )
        c = result.counts
        click.echo(
            f"{c['created']} created, {c['updated']} linked, {c['unchanged']} already users, "
            f"{c['failed']} failed"
        )
        _resyncs_line(result.resyncs_queued, processed, waited=not no_wait)
        if (line := unfinished_line(states)) is not None:
            click.echo(line)
    if fail_on_errors and result.counts["failed"]:
        sys.exit(EXIT_FAILED)


# -- outbox -----------------------------------------------------------------------------------------


@click.group(cls=Group)
def outbox() -> None:
    """Queued emails (verification invitations)."""


@outbox.command("send", short_help="Send the queued emails now over SMTP.")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.pass_obj
def outbox_send(app: App, as_json: bool) -> None:
    """Send queued emails now over the configured SMTP server (exit 1 if any failed for good)."""
    from rostersync.importer import send_outbox

    smtp = app.settings.smtp
    if smtp is None:
        fail("no smtp block in the config: nothing can be sent", EXIT_USAGE)
        return  # fail() exits; the lazily imported module hides its NoReturn from mypy
    result = send_outbox(app.store, smtp)
    doc: dict[str, Any] = {
        "sent": result.sent,
        "failed": result.failed,
        "deferred": result.deferred,
        "errors": result.errors,
    }
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"{result.sent} sent, {result.deferred} to retry, {result.failed} failed")
        for err in result.errors:
            click.echo(f"  {err}")
        if result.deferred:
            click.echo(
                f"the {result.deferred} to retry stay queued: the daemon's mailer tries them "
                f"again, or run `{hints.command('outbox send')}` once the SMTP server answers"
            )
    if result.failed:
        sys.exit(EXIT_FAILED)


__all__ = ["import_cmd", "outbox", "teachers"]

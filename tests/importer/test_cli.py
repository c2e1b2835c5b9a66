"""`rostersync import`, `import template`, `teachers` and `outbox` through the real CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from click.testing import CliRunner, Result
from openpyxl import Workbook, load_workbook

from rostersync.cli.main import cli
from rostersync.errors import StoreError
from rostersync.importer import TEMPLATE_COLUMNS
from rostersync.importer.rows import SHOWN_EMAIL
from rostersync.sampledata import write_oneroster_csv
from rostersync.source.testdata import small_roster
from tests.conftest import BASE_CONFIG
from tests.fulldisk import fill_up_after
from tests.hostile import SHEET_XML, edit_member, replace_in, valid_xlsx
from tests.sync.helpers import console_down


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    # The CLI points structlog at the runner's stderr, which is closed after each invoke.
    yield
    structlog.reset_defaults()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    data: dict[str, Any] = {
        **BASE_CONFIG,
        "database": "sqlite:///rs.db",
        "provisioning": {
            "auto_create_users": False,
            "default_role": "Teacher",
            "default_site": "North High",
        },
        "sources": {"sample": {"type": "oneroster_csv", "path": "roster"}},
    }
    write_oneroster_csv(small_roster(), tmp_path / "roster")
    path = tmp_path / "rostersync.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def rs(config: Path, *args: str, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], input=input)


def _csv(tmp_path: Path, body: str, name: str = "users.csv") -> str:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return str(path)


def test_import_json_shape_and_exit_codes(config: Path, tmp_path: Path) -> None:
    """--json prints the contract's document; failed rows still exit 0, --fail-on-errors exits 1."""
    f = _csv(tmp_path, "Email,Display Name\nA@Example.org,Ada\nnot-an-email,X\n")
    result = rs(config, "import", f, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["dry_run"] is False
    assert doc["counts"] == {"created": 1, "updated": 0, "unchanged": 0, "failed": 1}
    assert doc["rows"] == [
        {"row": 2, "email": "a@example.org", "status": "Success", "message": "created"},
        {"row": 3, "email": "not-an-email", "status": "Invalid email",
         "message": "'not-an-email' is not a valid email address"},
    ]  # fmt: skip
    strict = rs(config, "import", f, "--json", "--fail-on-errors")
    assert strict.exit_code == 1
    assert json.loads(strict.stdout)["rows"][0]["status"] == "Already Exists"


def test_refused_files_exit_2_and_change_nothing(config: Path, tmp_path: Path) -> None:
    """A missing Email column or 2,001 rows exit 2 naming the column or the count; nothing is imported."""
    missing = rs(config, "import", _csv(tmp_path, "Name\nAda\n", "noemail.csv"))
    assert missing.exit_code == 2
    assert "noemail.csv: required column 'Email' or 'Primary Email' is missing" in missing.stderr
    big = "Email\n" + "".join(f"u{i}@example.org\n" for i in range(2001))
    too_many = rs(config, "import", _csv(tmp_path, big, "big.csv"), "--dry-run")
    assert too_many.exit_code == 2
    assert "2001 rows exceed the limit of 2000" in too_many.stderr
    users = rs(config, "users", "list", "--json")
    assert json.loads(users.stdout) == []


def test_dry_run_preview(config: Path, tmp_path: Path) -> None:
    """The dry run prints counts and every flagged row, and creates nobody."""
    f = _csv(tmp_path, "Email,Role\na@example.org,Teacher\nb@example.org,Wizard\n")
    result = rs(config, "import", f, "--dry-run")
    assert result.exit_code == 0
    assert "dry run: nothing was changed" in result.stdout
    assert "1 new, 0 updated, 0 unchanged, 1 failed" in result.stdout
    assert "Role not found" in result.stdout and "a@example.org" not in result.stdout
    assert json.loads(rs(config, "users", "list", "--json").stdout) == []


def test_stdin_paste_and_report(config: Path, tmp_path: Path) -> None:
    """`-` reads pasted tab-separated text; --report writes the columns plus Status and Message, neutralized."""
    report = tmp_path / "report.csv"
    pasted = "Email\tDisplay Name\tNotes\nz@example.org\tZoë\t@mention\n"
    result = rs(config, "import", "-", "--report", str(report), input=pasted)
    assert result.exit_code == 0, result.output
    assert "unknown column 'Notes' ignored" in result.stderr
    raw = report.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    lines = raw.decode("utf-8-sig").splitlines()
    assert lines == [
        "Email,Display Name,Notes,Status,Message",
        "z@example.org,Zoë,'@mention,Success,created",
    ]


def test_template_csv_and_xlsx_round_trip(config: Path, tmp_path: Path) -> None:
    """The CSV template is the header row; the XLSX template, filled in, imports (XLSX in)."""
    csv_out = rs(config, "import", "template")
    assert csv_out.exit_code == 0
    assert csv_out.stdout.strip() == ",".join(TEMPLATE_COLUMNS)
    xlsx = tmp_path / "template.xlsx"
    made = rs(config, "import", "template", "--format", "xlsx", "--output", str(xlsx))
    assert made.exit_code == 0
    wb = load_workbook(xlsx)
    assert wb.sheetnames == ["Users", "Help"]
    wb["Users"].append(["x@example.org", "Xavier", "Teacher", "South Middle", "none", True, False])
    wb.save(xlsx)
    result = rs(config, "import", str(xlsx), "--sheet", "Users", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"][0]["status"] == "Success"
    users = json.loads(rs(config, "users", "list", "--json").stdout)
    assert [(u["email"], u["sites"]) for u in users] == [("x@example.org", ["South Middle"])]


def test_import_as_site_admin(config: Path, tmp_path: Path) -> None:
    """--as applies the admin's scope: a Site Admin cannot place users in another site."""
    admin = _csv(tmp_path, "Email,Role,Site\nsa@example.org,Site Admin,North High\n", "admin.csv")
    assert rs(config, "import", admin).exit_code == 0
    f = _csv(tmp_path, "Email,Site\na@example.org,South Middle\nb@example.org,North High\n")
    doc = json.loads(rs(config, "import", f, "--as", "sa@example.org", "--json").stdout)
    assert [r["status"] for r in doc["rows"]] == ["Site not found", "Success"]
    unknown = rs(config, "import", f, "--as", "ghost@example.org")
    assert unknown.exit_code == 2 and "no such user" in unknown.stderr


def test_import_json_names_the_actor_as_its_log_line_does(config: Path, tmp_path: Path) -> None:
    """--json's actor is "operator" without --as, the --as email (lower-cased) with it, as logged."""
    admin = _csv(tmp_path, "Email,Role\nboss@example.org,Organization Admin\n", "admin.csv")
    plain = rs(config, "import", admin, "--json")
    assert json.loads(plain.stdout)["actor"] == "operator"
    assert '"actor": "operator"' in plain.stderr
    f = _csv(tmp_path, "Email\na@example.org\n")
    as_admin = rs(config, "import", f, "--as", "Boss@Example.org", "--json")
    assert json.loads(as_admin.stdout)["actor"] == "boss@example.org"
    assert '"actor": "boss@example.org"' in as_admin.stderr


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_as_is_refused_not_the_operators_scope(
    config: Path, tmp_path: Path, value: str
) -> None:
    """`import FILE --as "$ADMIN"` with ADMIN unset exits 2 and imports nothing; it imported
    with the operator's organization scope, as if --as had not been given."""
    f = _csv(tmp_path, "Email\na@example.org\n")
    result = rs(config, "import", f, "--as", value, "--json")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "rostersync: --as is empty: give the admin's email address (without --as the import "
        "has the operator's organization scope); nothing was imported\n"
    )
    assert not (tmp_path / "rs.db").exists()  # refused before the database was touched


def test_teachers_list_and_import(config: Path) -> None:
    """After a sync with auto-creation off, teachers list shows candidates and teachers import
    creates them and builds their groups at once."""
    assert rs(config, "sync", "--source", "sample").exit_code == 0
    listed = json.loads(rs(config, "teachers", "list", "--source", "sample", "--json").stdout)
    assert [t["email"] for t in listed] == ["ada@example.org", "alan.turing@example.org"]
    assert listed[0]["sites"] == ["North High"]
    result = rs(
        config, "teachers", "import", "--source", "sample", "--email", "ada@example.org", "--json"
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["status"] for r in doc["rows"]] == ["Success"]
    groups = json.loads(rs(config, "groups", "list", "--user", "ada@example.org", "--json").stdout)
    assert sorted(g["name"] for g in groups) == ["Algebra I", "Computing"]


def test_teachers_import_says_what_became_of_the_resyncs_it_queued(config: Path) -> None:
    """As a file import: --json gives the resyncs it processed and their states; --no-wait
    leaves them to the daemon and says so."""
    assert rs(config, "sync", "--source", "sample").exit_code == 0
    args = ("teachers", "import", "--source", "sample", "--email")
    doc = json.loads(rs(config, *args, "ada@example.org", "--json").stdout)
    assert (doc["resyncs_queued"], doc["resyncs_processed"], doc["resync_states"]) == (
        1,
        1,
        {"queued": 0, "running": 0, "succeeded": 1, "failed": 0},
    )
    left = rs(config, *args, "alan.turing@example.org", "--no-wait")
    assert left.exit_code == 0, left.output
    assert (
        "1 group resync(s) queued (the daemon processes them; "
        f"or `rostersync --config {config} run --once`)" in left.stdout
    )
    assert _queue_states(config) == ["queued", "succeeded"]


def test_teachers_import_says_which_of_its_resyncs_did_not_succeed(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resync that fails in the import's drain: processed, but not done, as a file import
    says it (--json: its state)."""
    assert rs(config, "sync", "--source", "sample").exit_code == 0
    monkeypatch.setattr("rostersync.resync.worker.rebuild_groups", console_down)
    args = ("teachers", "import", "--source", "sample", "--email")
    doc = json.loads(rs(config, *args, "ada@example.org", "--json").stdout)
    assert doc["resyncs_processed"] == 1
    assert doc["resync_states"] == {"queued": 1, "running": 0, "succeeded": 0, "failed": 0}
    shown = rs(config, *args, "alan.turing@example.org")
    assert shown.exit_code == 0, shown.output
    assert "1 group resync(s) queued; 1 resync job(s) processed" in shown.stdout
    assert (
        "not done: 1 resync(s) wait for a retry, 0 failed for good "
        f"(`rostersync --config {config} queue list` says why)" in shown.stdout
    )


def test_teachers_usage_errors(config: Path) -> None:
    """Neither --email nor --all, or an unknown source, is bad usage (exit 2)."""
    assert rs(config, "teachers", "import", "--source", "sample").exit_code == 2
    unknown = rs(config, "teachers", "list", "--source", "nope")
    assert unknown.exit_code == 2 and "no source named nope" in unknown.stderr


@pytest.mark.parametrize(
    ("flag", "default"),
    [
        ("--role", "provisioning.default_role"),
        ("--site", "the site_map sites, then provisioning.default_site"),
    ],
)
def test_teachers_import_with_an_empty_role_or_site_is_bad_usage(
    config: Path, flag: str, default: str
) -> None:
    """`teachers import --role "$ROLE"` with ROLE unset exits 2 and creates no one; it gave
    the default silently, as if the flag had not been given."""
    assert rs(config, "sync").exit_code == 0
    result = rs(config, "teachers", "import", "--source", "sample", "--all", flag, "")
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"rostersync: {flag} is empty: give its name, or leave {flag} out for {default}\n"
    )
    assert json.loads(rs(config, "users", "list", "--json").stdout) == []


def test_outbox_send_needs_smtp(config: Path) -> None:
    """`outbox send` without an smtp block is bad usage."""
    result = rs(config, "outbox", "send")
    assert result.exit_code == 2 and "no smtp block" in result.stderr


def test_outbox_send_says_what_becomes_of_the_messages_to_retry(
    config: Path, tmp_path: Path
) -> None:
    """An SMTP server that does not answer leaves the message queued: the output says the
    daemon retries it, or which command to run again (with the --config given)."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["smtp"] = {"host": "127.0.0.1", "port": 1, "from": "rs@example.org"}
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    f = _csv(tmp_path, "Email,SendVerification\na@example.org,TRUE\n")
    assert "verification email queued" in rs(config, "import", f).stdout
    sent = rs(config, "outbox", "send")
    assert sent.exit_code == 0, sent.output
    assert sent.stdout.splitlines()[0] == "0 sent, 1 to retry, 0 failed"
    assert sent.stdout.splitlines()[-1] == (
        "the 1 to retry stay queued: the daemon's mailer tries them again, or run "
        f"`rostersync --config {config} outbox send` once the SMTP server answers"
    )


def test_xlsx_from_stdin(config: Path) -> None:
    """An XLSX workbook piped to `import -` is recognised by its content."""
    wb = Workbook()
    wb.active.append(["Primary Email", "Name"])
    wb.active.append(["p@example.org", "Pat"])
    buf = io.BytesIO()
    wb.save(buf)
    result = rs(config, "import", "-", "--json", input=buf.getvalue())
    assert json.loads(result.stdout)["rows"][0]["status"] == "Success"


def test_damaged_xlsx_exits_2_on_one_line_and_writes_nothing(config: Path, tmp_path: Path) -> None:
    """A damaged workbook, in a real process: exit 2, one line naming the file and the problem,
    no traceback, and no database is even created."""
    bad = tmp_path / "damaged.xlsx"
    bad.write_bytes(
        edit_member(valid_xlsx(), SHEET_XML, replace_in('t="s"><v>0</v>', 't="s"><v>99</v>'))
    )
    proc = subprocess.run(
        [sys.executable, "-m", "rostersync", "--config", str(config), "import", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"rostersync: {bad}: not a readable XLSX workbook (sheet 'Sheet1': IndexError: list "
        "index out of range); nothing was imported\n"
    )
    assert proc.stdout == ""
    assert not (tmp_path / "rs.db").exists()


def test_csv_row_the_csv_module_cannot_read_fails_alone(config: Path, tmp_path: Path) -> None:
    """A 200 KiB cell and a stray quote fail their own rows with their lines; the rest import."""
    body = (
        "Email,Display Name\na@example.org,Ada\n"
        f'b@example.org,"{"x" * 200_000}"\nc@example.org,"Cy"ril\nd@example.org,Dee\n'
    )
    result = rs(config, "import", _csv(tmp_path, body), "--json")
    assert result.exit_code == 0, result.output
    rows = [(r["row"], r["status"], r["message"]) for r in json.loads(result.stdout)["rows"]]
    assert rows[0] == (2, "Success", "created") and rows[3] == (5, "Success", "created")
    assert rows[1] == (3, "Failed", "line 3: a field is longer than 131072 characters")
    assert rows[2][:2] == (4, "Failed") and rows[2][2].startswith("line 4: malformed CSV")


def test_a_row_failed_by_an_over_long_cell_shows_its_email(config: Path, tmp_path: Path) -> None:
    """Rows the csv module refuses show their email like any failed row; an email cell too long
    to be an address is shown cut, in JSON and in the text table alike."""
    long_local = "d" * 200_000
    body = (
        "Email,Display Name\n"
        f'b@example.org,"{"x" * 200_000}"\n'  # 2: the name cell is over the csv limit
        'c@example.org,"Cy"ril\n'  # 3: text after a closing quote
        f'"{long_local}@example.org",Dee\n'  # 4: the email cell itself is the long one
        f"{'e' * 300}@example.org,Eve\n"  # 5: over-long, but within the csv limit
    )
    f = _csv(tmp_path, body)
    result = rs(config, "import", f, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["row"]: r for r in json.loads(result.stdout)["rows"]}
    assert rows[2]["email"] == "b@example.org" and rows[2]["status"] == "Failed"
    assert rows[3]["email"] == "c@example.org" and rows[3]["status"] == "Failed"
    assert rows[4]["status"] == "Failed"
    assert rows[4]["email"] == "d" * (SHOWN_EMAIL - 1) + "…"
    assert rows[5]["status"] == "Invalid email"
    assert rows[5]["email"] == "e" * (SHOWN_EMAIL - 1) + "…"
    text = rs(config, "import", f, "--dry-run")
    assert text.exit_code == 0, text.output
    assert "b@example.org" in text.stdout and "c@example.org" in text.stdout
    assert max(map(len, text.stdout.splitlines())) < 300  # no 200,000-character line


def test_report_into_a_missing_folder_is_refused_before_importing(
    config: Path, tmp_path: Path
) -> None:
    """--report into a folder that does not exist exits 2 up front; nothing is imported."""
    f = _csv(tmp_path, "Email\na@example.org\n")
    result = rs(config, "import", f, "--report", str(tmp_path / "nodir" / "r.csv"))
    assert result.exit_code == 2
    assert "nodir' does not exist or is not writable; nothing was imported" in result.stderr
    assert not (config.parent / "rs.db").exists()  # refused before the database was touched


def test_utf16_unicode_text_and_protected_workbooks(config: Path, tmp_path: Path) -> None:
    """Excel's "Unicode Text" (UTF-16, tabs) imports; a password-protected workbook is refused
    saying so, not as a broken zip."""
    text = tmp_path / "unicode.txt"
    text.write_bytes("Email\tDisplay Name\r\nzoe@example.org\tZoë\r\n".encode("utf-16"))
    result = rs(config, "import", str(text), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"][0]["status"] == "Success"
    protected = tmp_path / "protected.xlsx"
    protected.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))
    refused = rs(config, "import", str(protected))
    assert refused.exit_code == 2
    assert "a password-protected workbook or an old .xls file" in refused.stderr


def test_a_full_disk_stops_the_whole_import_and_keeps_none_of_it(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database filling up mid-import is no row's fault: the import stops with one line
    naming the database and the cause, exit 1, and keeps none of its rows (rather than a
    report of rows "not saved" beside rows that were); with room, the same file imports."""
    assert rs(config, "db", "upgrade").exit_code == 0
    lift = fill_up_after(monkeypatch, tmp_path / "rs.db", 12)
    body = "Email,Display Name\n" + "".join(f"u{i}@example.org,User {i}\n" for i in range(2000))
    f = _csv(tmp_path, body)
    full = rs(config, "import", f)
    # (The runner calls the command group itself: the StoreError is what `rostersync` turns
    # into its one line and exit 1, as tests/cli/test_store.py shows.)
    assert isinstance(full.exception, StoreError), full.output
    assert "the disk is full" in str(full.exception)
    assert "import_row_failed" not in full.output  # no row blamed for it
    lift()
    assert json.loads(rs(config, "users", "list", "--json").stdout) == []
    again = rs(config, "import", f, "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["counts"]["created"] == 2000


def _queue_states(config: Path) -> list[str]:
    return sorted(j["state"] for j in json.loads(rs(config, "queue", "list", "--json").stdout))


def _groups_of(config: Path, email: str) -> list[str]:
    shown = rs(config, "groups", "list", "--user", email, "--json")
    return sorted(g["name"] for g in json.loads(shown.stdout))


def test_import_processes_the_resyncs_it_queued_before_it_returns(
    config: Path, tmp_path: Path
) -> None:
    """No daemon runs: an import that links a new user to a roster person builds their groups
    at once, one that archives them removes them, one that reactivates them builds them again,
    as `sync` processes the resyncs it queued; the output says how many jobs it processed."""
    assert rs(config, "sync", "--source", "sample").exit_code == 0
    linked = _csv(tmp_path, "Email,Source Username(s)\nada@example.org,sample:ada\n")
    result = rs(config, "import", linked, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["rows"][0]["status"] == "Success"
    assert doc["resyncs_queued"] == 1 and doc["resyncs_processed"] == 1
    assert _groups_of(config, "ada@example.org") == ["Algebra I", "Computing"]
    assert _queue_states(config) == ["succeeded"]
    archive = _csv(tmp_path, "Email,Current Status,Overwrite\nada@example.org,Archived,TRUE\n")
    shown = rs(config, "import", archive)
    assert shown.exit_code == 0, shown.output
    assert "1 group resync(s) queued; 1 resync job(s) processed" in shown.stdout
    assert _groups_of(config, "ada@example.org") == []
    back = _csv(tmp_path, "Email,Current Status,Overwrite\nada@example.org,Active,TRUE\n")
    assert rs(config, "import", back).exit_code == 0
    assert _groups_of(config, "ada@example.org") == ["Algebra I", "Computing"]
    assert _queue_states(config) == ["succeeded"] * 3


def test_import_says_which_of_its_resyncs_did_not_succeed(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resync that fails in the import's drain is not done: --json gives the states of the
    import's jobs, and the text counts those waiting for a retry and those failed for good."""
    assert rs(config, "sync", "--source", "sample").exit_code == 0
    monkeypatch.setattr("rostersync.resync.worker.rebuild_groups", console_down)
    linked = _csv(tmp_path, "Email,Source Username(s)\nada@example.org,sample:ada\n")
    doc = json.loads(rs(config, "import", linked, "--json").stdout)
    assert doc["resyncs_processed"] == 1
    assert doc["resync_states"] == {"queued": 1, "running": 0, "succeeded": 0, "failed": 0}
    archive = _csv(tmp_path, "Email,Current Status,Overwrite\nada@example.org,Archived,TRUE\n")
    shown = rs(config, "import", archive)
    assert shown.exit_code == 0, shown.output
    assert (
        "not done: 1 resync(s) wait for a retry, 0 failed for good "
        f"(`rostersync --config {config} queue list` says why)" in shown.stdout
    )
    assert _queue_states(config) == ["queued"]


def test_import_dry_run_and_no_wait_process_nothing(config: Path, tmp_path: Path) -> None:
    """A dry run queues and runs nothing; --no-wait queues the resync and leaves it to the
    daemon (or `run --once`), saying so."""
    assert rs(config, "sync", "--source", "sample").exit_code == 0
    linked = _csv(tmp_path, "Email,Source Username(s)\nada@example.org,sample:ada\n")
    dry = json.loads(rs(config, "import", linked, "--dry-run", "--json").stdout)
    assert dry["dry_run"] is True and dry["resyncs_processed"] == 0
    assert _queue_states(config) == []
    shown = rs(config, "import", linked, "--no-wait")
    assert shown.exit_code == 0, shown.output
    assert (
        "1 group resync(s) queued (the daemon processes them; or "
        f"`rostersync --config {config} run --once`)" in shown.stdout
    )
    assert _queue_states(config) == ["queued"]
    assert _groups_of(config, "ada@example.org") == []


def test_an_import_stopped_while_it_processes_its_resyncs_stays_committed(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM) in the resyncs after the commit: exit 1 saying the import is
    committed and the jobs left wait; the user is there, the job still queued."""

    async def interrupted(*_args: object) -> int:
        raise KeyboardInterrupt

    assert rs(config, "sync", "--source", "sample").exit_code == 0
    monkeypatch.setattr("rostersync.cli.draining.drain_with_progress", interrupted)
    linked = _csv(tmp_path, "Email,Source Username(s)\nada@example.org,sample:ada\n")
    stopped = rs(config, "import", linked)
    assert stopped.exit_code == 1
    assert (
        "rostersync: stopped while processing the resync jobs: import 1 is committed; the jobs "
        "left wait for the daemon, or the next `sync` or `run --once`"
    ) in stopped.stderr
    users = json.loads(rs(config, "users", "list", "--json").stdout)
    assert [u["email"] for u in users] == ["ada@example.org"]
    assert _queue_states(config) == ["queued"]

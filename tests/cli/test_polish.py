"""The command line as a newcomer meets it: help on everything, global options anywhere,
suggestions for typos, usage errors that exit 2, and deploy files that work as documented."""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from rostersync.cli.main import cli, main

REPO = Path(__file__).resolve().parents[2]


def walk(
    command: click.Command, path: tuple[str, ...] = ("rostersync",)
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(sub, (*path, name))


@pytest.fixture
def config(config: Path) -> Path:
    """tests/cli/conftest.py's example config on the sample district, synced once."""
    path = config
    assert invoke("--config", str(path), "sync").exit_code == 0
    return path


def invoke(*args: str, prog_name: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, prog_name=prog_name)


def test_every_command_and_option_has_help() -> None:
    """Walks the whole command tree: a command without a description or an option without
    help text fails the test, naming it."""
    missing = []
    for path, command in walk(cli):
        if not (command.help or command.short_help) and not command.hidden:
            missing.append(" ".join(path))
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden and not param.help:
                missing.append(f"{' '.join(path)} {'/'.join(param.opts)}")
    assert missing == []


def test_every_command_is_in_the_readmes_command_table() -> None:
    """Each command `rostersync --help` lists (and each subcommand of a group) has a row in
    README.md's command table: `outbox send` was only in docs/import.md."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("| command | does |")
    rows = readme[start : readme.index("\n\n", start)]
    missing = [
        " ".join(path[1:])
        for path, command in walk(cli)
        if len(path) > 1
        and not command.hidden
        and not isinstance(command, click.Group)
        and f"`{' '.join(path[1:])}" not in rows
    ]
    assert missing == []


def test_help_points_only_at_commands_it_shows() -> None:
    """A help text that says "see `rostersync X --help`" names a command that exists and is
    listed, not a hidden one (`import --help` pointed at the hidden `import file --help`)."""
    wrong = []
    for path, command in walk(cli):
        if command.hidden:
            continue
        shown = invoke(*path[1:], "--help")
        assert shown.exit_code == 0, path
        for named in re.findall(r"`rostersync ([a-z -]+?) --help`", shown.stdout):
            target: click.Command | None = cli
            for word in named.split():
                if not isinstance(target, click.Group) or target.hidden:
                    break
                target = target.commands.get(word)
            if target is None or target.hidden:
                wrong.append(f"{' '.join(path)}: {named}")
    assert wrong == []


def test_import_file_help_and_errors_name_the_documented_form() -> None:
    """`import x.csv --help` and a mistake in `import x.csv ...` show `rostersync import FILE`
    and a `--help` hint that works, never the hidden `import file` subcommand."""
    shown = invoke("import", "x.csv", "--help", prog_name="rostersync")
    assert shown.exit_code == 0
    assert shown.stdout.startswith("Usage: rostersync import FILE [OPTIONS]\n")
    for args in (("import", "x.csv", "--bogus"), ("import",)):
        wrong = invoke(*args, prog_name="rostersync")
        assert wrong.exit_code == 2
        assert wrong.stderr.startswith(
            "Usage: rostersync import FILE [OPTIONS]\nTry 'rostersync import --help' for help.\n"
        )
    for result in (shown, wrong):
        assert "import file" not in result.output
    assert invoke("import", "--help").exit_code == 0


def test_no_commands_summary_is_cut_short_in_its_groups_help() -> None:
    """`rostersync --help` and each group's help list their commands with a whole summary
    at 80 columns, not one cut off with "..." ("Bulk user import from CSV, TSV or XLSX
    (FILE; `-` reads...")."""
    cut = []
    for path, command in walk(cli):
        if isinstance(command, click.Group):
            result = CliRunner(env={"COLUMNS": "80"}).invoke(cli, [*path[1:], "--help"])
            assert result.exit_code == 0, result.output
            listing = result.stdout.partition("\nCommands:\n")[2]
            cut += [line.strip() for line in listing.splitlines() if line.endswith("...")]
    assert cut == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), "Exit codes: 0 success; 1 a run failed or was held"),
        (("sync",), "Exit 1 when a run failed or was held (a dry run: a real run would be"),
        (("run",), "Exit (--once) 1 when a run failed or was held"),
        (("runs", "approve"), "Exit 1 when the run cannot be approved"),
        (("import",), "Exit 0 whatever the rows' statuses"),
        (("import", "file"), "Exit 0 whatever the rows' statuses"),
    ],
)
def test_the_help_tells_the_exit_codes(args: tuple[str, ...], says: str) -> None:
    """`rostersync --help` lists the exit codes, and the commands whose status a script
    acts on (a held sync, a refused approval, an import with failed rows) say theirs."""
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert says in " ".join(result.stdout.split())


def test_every_command_accepts_the_global_options_after_it() -> None:
    """--config and --log-level are options of every command and group, not only of the root."""
    for path, command in walk(cli):
        names = {opt for p in command.params for opt in getattr(p, "opts", [])}
        assert {"--config", "--log-level"} <= names, " ".join(path)


@pytest.mark.parametrize(
    "args",
    [
        ("users", "list", "--config", "{config}"),
        ("users", "--config", "{config}", "list"),
        ("groups", "list", "--json", "--config={config}"),
        ("runs", "list", "--config", "{config}"),
        ("queue", "list", "--config", "{config}", "--limit", "5"),
    ],
)
def test_config_may_follow_the_command(config: Path, args: tuple[str, ...]) -> None:
    """`rostersync users list --config X` reads X, as `rostersync --config X users list` does."""
    result = invoke(*(a.format(config=config) for a in args))
    assert result.exit_code == 0, result.output
    assert result.stdout


def test_a_config_after_the_command_wins_over_one_before(config: Path, tmp_path: Path) -> None:
    """Given twice, the later --config counts (as with any repeated option)."""
    result = invoke(
        "--config", str(tmp_path / "missing.yaml"), "users", "list", "--config", str(config)
    )
    assert result.exit_code == 0, result.output
    assert "43 user(s)" in result.stdout


def test_log_level_may_follow_the_command(config: Path) -> None:
    """`sync --log-level info` shows the info lines the config's `warning` level hides."""
    quiet = invoke("--config", str(config), "sync")
    loud = invoke("--config", str(config), "sync", "--log-level", "info")
    assert quiet.exit_code == loud.exit_code == 0
    assert "sync_started" not in quiet.stderr
    assert "sync_started" in loud.stderr


def test_import_takes_the_global_options_before_its_subcommand(config: Path) -> None:
    """`import --config X template` still means the template, not a file named `template`."""
    result = invoke("import", "--config", str(config), "template")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Email,")


@pytest.mark.parametrize(
    ("args", "suggestion"),
    [(("sycn",), "'sync'"), (("users", "lst"), "'list'"), (("rnus", "list"), "'runs'")],
)
def test_a_mistyped_command_gets_a_suggestion_and_exit_2(
    args: tuple[str, ...], suggestion: str
) -> None:
    """An unknown command exits 2 and names the command it resembles."""
    result = invoke(*args)
    assert result.exit_code == 2
    assert "No such command" in result.stderr and suggestion in result.stderr


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (("users", "import", "users.csv"), "'rostersync import'"),
        (("runs", "sync"), "'rostersync sync'"),
        (("groups", "resync"), "'rostersync resync'"),
    ],
)
def test_a_top_level_command_under_a_group_is_pointed_to(args: tuple[str, ...], hint: str) -> None:
    """`users import FILE` (import is a command of its own) exits 2 and names the command
    meant, where it said only "No such command 'import'"."""
    result = invoke(*args)
    assert result.exit_code == 2
    assert f"No such command '{args[1]}'. Did you mean {hint}?" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("runs", "list", "--limit", "-1"),
        ("queue", "list", "--limit", "-1"),
        ("resync", "--all", "--wait", "--timeout", "-5"),
        ("run", "--stop-timeout", "-1"),
    ],
)
def test_a_number_out_of_range_is_a_usage_error(config: Path, args: tuple[str, ...]) -> None:
    """A run id past the database's integers, a negative --limit (PostgreSQL: "LIMIT must not
    be negative") or timeout exits 2 naming the value, not an internal error, a listing of
    everything, or a wait that has timed out before it began."""
    result = invoke("--config", str(config), *args)
    assert result.exit_code == 2, result.output
    assert "Invalid value for" in result.stderr and "is not in the range" in result.stderr


@pytest.mark.parametrize(
    "args",
    [("runs", "show", "abc"), ("runs", "show", "abc", "--changes"), ("runs", "approve", "abc")],
)
def test_a_run_id_that_is_no_number_says_what_a_run_id_is(
    config: Path, args: tuple[str, ...]
) -> None:
    """`runs show abc` and `runs approve abc` exit 2 saying a run id is a whole number from 1,
    not click's "'abc' is not a valid integer range"."""
    result = invoke("--config", str(config), *args)
    assert result.exit_code == 2, result.output
    assert (
        "Invalid value for 'RUN_ID': 'abc' is not a run id (a whole number from 1)" in result.stderr
    )
    assert "integer range" not in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("runs", "list", "--limit", "abc"), "'--limit': 'abc' is not a valid whole number."),
        (("queue", "list", "--limit", "1.5"), "'--limit': '1.5' is not a valid whole number."),
        (
            ("resync", "--all", "--wait", "--timeout", "soon"),
            "'--timeout': 'soon' is not a valid number of seconds.",
        ),
        (("run", "--stop-timeout", "x"), "'--stop-timeout': 'x' is not a valid number of seconds."),
    ],
)
def test_a_count_or_timeout_that_is_no_number_says_what_it_should_be(
    config: Path, args: tuple[str, ...], says: str
) -> None:
    """`--limit abc` or `--timeout soon` exits 2 saying a whole number or a number of seconds
    is wanted, not click's "not a valid integer range" / "float range"."""
    result = invoke("--config", str(config), *args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {says}" in result.stderr
    assert " range" not in result.stderr


@pytest.mark.parametrize("command", [("runs", "show"), ("runs", "approve", "--yes")])
@pytest.mark.parametrize("run_id", ["0", "-5", "-99999999999999999999"])
def test_a_run_id_below_1_says_what_a_run_id_is(
    config: Path, command: tuple[str, ...], run_id: str
) -> None:
    """0 or a negative run id exits 2 as `abc` does (not click's "not in the range 1<=x<=...",
    nor "No such option '-5'")."""
    result = invoke("--config", str(config), *command, run_id)
    assert result.exit_code == 2, result.output
    assert (
        f"Invalid value for 'RUN_ID': '{run_id}' is not a run id (a whole number from 1)"
        in result.stderr
    )
    assert "range" not in result.stderr and "No such option" not in result.stderr


@pytest.mark.parametrize("command", [("runs", "show"), ("runs", "approve", "--yes")])
@pytest.mark.parametrize("run_id", ["2147483648", "99999999999999999999"])
def test_a_run_id_past_the_database_integers_is_an_unknown_run(
    config: Path, command: tuple[str, ...], run_id: str
) -> None:
    """A run id past the database's integers names no run: exit 2 with the unknown id's message,
    not click's range and not an internal error."""
    unknown = invoke("--config", str(config), *command, "12345")
    assert (unknown.exit_code, unknown.stderr) == (2, "rostersync: run 12345 does not exist\n")
    result = invoke("--config", str(config), *command, run_id)
    assert (result.exit_code, result.stderr) == (2, f"rostersync: run {run_id} does not exist\n")


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_user_is_a_usage_error_not_every_group(config: Path, value: str) -> None:
    """`groups list --user "$EMAIL"` with EMAIL unset lists nobody's groups: exit 2 saying
    --user is empty (it listed every group), as `resync --user ""` does (which said "no such
    user: " and nothing after it)."""
    assert invoke("--config", str(config), "sync").exit_code == 0
    groups = invoke("--config", str(config), "groups", "list", "--user", value, "--json")
    resync = invoke("--config", str(config), "resync", "--user", value)
    assert groups.exit_code == resync.exit_code == 2
    assert groups.stdout == ""
    said = "rostersync: --user is empty: give the user's email address\n"
    assert groups.stderr == resync.stderr == said


def test_runs_list_of_an_empty_source_is_a_usage_error_not_every_run(config: Path) -> None:
    """`runs list --source "$SOURCE"` with SOURCE unset: exit 2 naming the configured
    sources, not every source's runs."""
    assert invoke("--config", str(config), "sync").exit_code == 0
    result = invoke("--config", str(config), "runs", "list", "--source", "", "--json")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "rostersync: --source is empty: give a source's name (configured: sample)\n"
    )


def test_groups_list_for_an_unknown_user_exits_2_like_resync(config: Path) -> None:
    """`groups list --user` of nobody is a usage error (exit 2), not an empty listing."""
    groups = invoke("--config", str(config), "groups", "list", "--user", "nobody@example.org")
    resync = invoke("--config", str(config), "resync", "--user", "nobody@example.org")
    assert groups.exit_code == resync.exit_code == 2
    assert groups.stderr == resync.stderr == "rostersync: no such user: nobody@example.org\n"
    owner = json.loads(invoke("--config", str(config), "groups", "list", "--json").stdout)[0][
        "owners"
    ][0]
    known = invoke("--config", str(config), "groups", "list", "--user", owner.upper(), "--json")
    assert known.exit_code == 0 and json.loads(known.stdout)


def test_resync_all_wait_ends_with_a_summary_line(config: Path) -> None:
    """`resync --all --wait` ends with how many jobs succeeded or failed, and who did them."""
    result = invoke("--config", str(config), "resync", "--all", "--wait")
    assert result.exit_code == 0, result.output
    last = result.stdout.splitlines()[-1]
    assert re.fullmatch(
        r"43 job\(s\): 43 succeeded, 0 failed; processed by this command in \d+\.\ds", last
    ), last


# -- deploy files --------------------------------------------------------------------------------


def test_the_units_documentation_is_what_the_install_steps_install() -> None:
    """Each unit's Documentation= names files that deploy/README.md's install steps put there
    (nothing points at a man page or a file that no step installs)."""
    readme = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    installed = set(re.findall(r"sudo install -D -m 0644 (\S+) (\S+)", readme))
    targets = {target for _source, target in installed}
    for source, _target in installed:
        assert (REPO / source).is_file(), source
    for unit in ("rostersync.service", "rostersync-once.service"):
        text = (REPO / "deploy" / unit).read_text(encoding="utf-8")
        docs = [
            u
            for line in text.splitlines()
            if line.startswith("Documentation=")
            for u in line.split("=", 1)[1].split()
        ]
        assert docs, unit
        for uri in docs:
            assert uri.startswith("file://"), uri
            assert uri.removeprefix("file://") in targets, f"{unit}: {uri} is not installed"


def test_container_build_lines_keep_the_healthcheck() -> None:
    """Podman and buildah drop HEALTHCHECK from OCI images: the documented build lines use
    `--format docker`, and the Containerfile has a health check to keep."""
    readme = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    containerfile = (REPO / "deploy" / "Containerfile").read_text(encoding="utf-8")
    builds = re.findall(
        r"(?:podman|buildah) (?:build|bud) [^\n]*-f deploy/Containerfile[^\n]*",
        readme + containerfile,
    )
    assert any(b.startswith("podman") for b in builds)
    assert any(b.startswith("buildah") for b in builds)
    for line in builds:
        assert "--format docker" in line, line
    assert re.search(r"^HEALTHCHECK ", containerfile, re.M)


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_resync_all_wait_shows_progress_on_a_terminal_only(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a terminal the jobs' progress is drawn on stderr; piped, stderr has JSON lines only."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    main(["--config", str(config), "resync", "--all", "--wait"])  # exits only on failure
    drawn = terminal.getvalue()
    assert "\x1b[2K" in drawn and "43 job(s) done" in drawn
    assert "processing the queue here" in drawn
    assert capsys.readouterr().out.splitlines()[-1].startswith("43 job(s): 43 succeeded")

    monkeypatch.undo()
    piped = invoke("--config", str(config), "--log-level", "info", "resync", "--all", "--wait")
    assert piped.exit_code == 0
    lines = piped.stderr.splitlines()
    assert lines and all(json.loads(line)["event"] for line in lines)
    assert "job(s) done" not in piped.stderr


def test_an_import_warning_is_a_json_line_off_a_terminal(config: Path, tmp_path: Path) -> None:
    """A file's warning (read as Windows-1252) reaches a pipe as a JSON log line."""
    upload = tmp_path / "ansi.csv"
    upload.write_bytes("Email;Display Name\r\nzoe@example.org;Zoë Müller\r\n".encode("cp1252"))
    result = invoke("--config", str(config), "import", str(upload), "--dry-run")
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    warning = next(line for line in lines if line["event"] == "import_warning")
    assert warning["level"] == "warning" and "Windows-1252" in warning["message"]


def test_resync_live_wait_tells_of_the_records_the_source_rejected(config: Path) -> None:
    """A live resync whose answer had a rejected row says so (text, `--json`, `queue list
    --json`, the log); the teacher keeps the class of the malformed row."""
    teacher = "elijah.baker1@springfield.example.org"
    enrollments = config.parent / "sample-district" / "enrollments.csv"
    enrollments.write_text(
        enrollments.read_text().replace(
            "e-0000001,,,c-00001,sch-001,t-0001,teacher,true,",
            "e-0000001,,,c-00001,sch-001,t-0001,teacher,maybe,",
        )
    )
    text = invoke("--config", str(config), "resync", "--user", teacher, "--live", "--wait")
    assert text.exit_code == 0, text.output
    assert (
        "the source rejected 1 record(s) in the live answers: they keep what the last sync "
        "stored (see the `live_answer_rejected` log line)"
    ) in text.stdout.splitlines()
    assert re.fullmatch(r"1 job\(s\): 1 succeeded, 0 failed; .*", text.stdout.splitlines()[-1])
    [logged] = [json.loads(x) for x in text.stderr.splitlines() if "live_answer_rejected" in x]
    assert logged["count"] == 1 and "enrollments.csv line 2" in logged["reasons"][0]
    as_json = invoke(
        "--config", str(config), "resync", "--user", teacher, "--live", "--wait", "--json"
    )
    doc = json.loads(as_json.stdout)
    assert doc["records_rejected"] == 1
    assert doc["jobs"][0]["result"]["records_rejected"] == 1
    assert {"queued", "jobs", "processed_by", "timed_out"} <= set(doc)
    jobs = json.loads(invoke("--config", str(config), "queue", "list", "--json").stdout)
    assert [j["result"]["records_rejected"] for j in jobs if j["live"]] == [1, 1]
    listed = invoke("--config", str(config), "queue", "list").stdout.splitlines()
    noted = [line for line in listed if teacher in line and "(live)" in line]
    assert len(noted) == 2 and all(
        line.rstrip().endswith("live answer: 1 record(s) rejected (see live_answer_rejected)")
        for line in noted
    ), listed
    assert "last error or note" in listed[0]
    mine = invoke("--config", str(config), "groups", "list", "--user", teacher, "--json")
    assert "c-00001" in {g["external_id"] for g in json.loads(mine.stdout)}


def test_sync_prepares_each_sources_http_before_it_builds_the_engine(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sync` asks each source it syncs to prepare its HTTP client's slow parts (a TLS
    context, built in a thread) before it imports and builds the engine, so that the two
    overlap."""
    from rostersync.cli.app import App
    from rostersync.config.source import SourceConfig

    calls: list[tuple[str, str | None]] = []
    monkeypatch.setattr(
        SourceConfig, "prepare_http", lambda self: calls.append(("prepare", self.type))
    )
    real_engine = App.engine

    def engine(self: App, **kwargs: Any) -> Any:
        calls.append(("engine", None))
        return real_engine(self, **kwargs)

    monkeypatch.setattr(App, "engine", engine)
    assert invoke("--config", str(config), "sync").exit_code == 0
    assert calls == [("prepare", "oneroster_csv"), ("engine", None)]


def test_control_characters_from_a_roster_are_escaped_in_tables(config: Path) -> None:
    """A name holding a line break and a terminal escape lists as one row with them escaped:
    it cannot forge a row of `users list` or recolour the operator's terminal."""
    users_csv = config.parent / "sample-district" / "users.csv"
    text = users_csv.read_text(encoding="utf-8")
    text = text.replace(",Elijah,Baker,", ',"Eli\x1b[31mjah","Baker\r\nInjected: yes",', 1)
    users_csv.write_text(text, encoding="utf-8")
    # A new database: names are taken when an account is created.
    config.write_text(config.read_text().replace("state/rostersync.db", "state/fresh.db"))
    assert invoke("--config", str(config), "sync").exit_code == 0
    listed = invoke("--config", str(config), "users", "list").stdout
    assert "\x1b" not in listed and "\r" not in listed
    row = next(line for line in listed.splitlines() if "elijah.baker1@" in line)
    assert "Eli\\x1b[31mjah Baker\\r\\nInjected: yes" in row
    assert not any(line.startswith("Injected") for line in listed.splitlines())


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (("config", "schema"), "--output"),
        (("import", "template"), "--output"),
        (("import", "{users}", "--dry-run"), "--report"),
        (("sync", "--dry-run", "--changes"), "--csv"),
        (("runs", "show", "1", "--changes"), "--csv"),
    ],
)
def test_an_empty_output_path_is_a_usage_error(
    config: Path, tmp_path: Path, command: tuple[str, ...], option: str
) -> None:
    """`--output "$OUT"` with OUT unset: exit 2 naming the option, before anything runs
    (`config schema` and `import template` said ".: Is a directory", exit 1)."""
    users = tmp_path / "users.csv"
    users.write_text("Email\nnew.teacher@example.org\n", encoding="utf-8")
    args = [part.format(users=users) for part in command]
    result = invoke("--config", str(config), *args, option, "")
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': the path is empty" in result.stderr
    assert result.stdout == ""

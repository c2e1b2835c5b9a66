"""Config loading: every error at once with its YAML path and line; env vars; secret files."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from rostersync.cli.main import cli, main
from rostersync.config.loader import json_schema_text, load_settings, load_settings_text
from rostersync.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
#: What a ``*_file`` key naming no file says: never the name, which may be a pasted secret.
MISSING_SECRET_FILE = (
    "cannot read secret file: no such file (a relative name is looked up beside the config "
    "file, then in $CREDENTIALS_DIRECTORY; the name is not repeated here, in case it is the "
    "secret itself)"
)


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int | str | None, str]:
    """The installed entry point (its error handling included): exit code and all output."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out = capsys.readouterr()
    return exit_.value.code, out.out + out.err


GOOD = """\
organization: Springfield
database: sqlite:///state/rs.db
roles: [Teacher]
sites: [North High]
provisioning:
  default_role: Teacher
  default_site: North High
sources:
  sample:
    type: oneroster_csv
    path: district
    schedule: {interval: 1h}
"""

THREE_MISTAKES = """\
organization: Springfield
roles: [Teacher]
sites: [North High]
provisioning:
  default_role: Principal
  default_site: North High
  on_teacher_removed: delete
sources:
  sample:
    type: oneroster_csv
    path: district
    shedule: {interval: 1h}
"""


@pytest.fixture(autouse=True)
def _a_drop_folder_beside_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GOOD's `path: district` exists: in tmp_path, which is also the working directory (the
    folder relative paths resolve against when a test gives no base_dir)."""
    (tmp_path / "district").mkdir()
    monkeypatch.chdir(tmp_path)


def test_good_config_loads_and_resolves_relative_paths(tmp_path: Path) -> None:
    """Relative paths (source path, SQLite file) resolve against the config file's folder."""
    cfg = tmp_path / "rs.yaml"
    cfg.write_text(GOOD)
    settings = load_settings(cfg)
    assert settings.database == f"sqlite:///{tmp_path / 'state' / 'rs.db'}"
    src = settings.sources["sample"]
    assert Path(src.path) == tmp_path / "district"  # type: ignore[attr-defined]
    assert src.schedule is not None and src.schedule.interval == timedelta(hours=1)


def test_three_mistakes_are_all_reported_with_path_and_line() -> None:
    """Every error comes at once, each naming its YAML path and line."""
    with pytest.raises(ConfigError) as err:
        load_settings_text(THREE_MISTAKES)
    text = [str(i) for i in err.value.issues]
    assert (
        "provisioning.on_teacher_removed: line 7: Input should be 'archive' or 'keep', got "
        "'delete'" in text
    )
    assert (
        "sources.sample.shedule: line 12: unknown key (not allowed here); did you mean 'schedule'?"
        in text
    )
    assert any(
        t.startswith("provisioning.default_role: line 5: 'Principal' is not one of roles")
        for t in text
    )


def test_semantic_errors_are_reported_alongside_schema_errors() -> None:
    """A bad default_role is reported even when other keys are invalid too."""
    bad = THREE_MISTAKES.replace("shedule", "schedule")
    with pytest.raises(ConfigError) as err:
        load_settings_text(bad)
    paths = [i.path for i in err.value.issues]
    assert "provisioning.on_teacher_removed" in paths


def test_missing_secret_names_the_auth_block_and_line(tmp_path: Path) -> None:
    """A oneroster auth block without its secret says which keys are required, with the line."""
    pytest.importorskip("connectors.oneroster")
    text = (
        GOOD
        + """\
  district:
    type: oneroster
    base_url: https://example-vn-v2.rosterserver.com/ims/oneroster/v1p1
    auth: {type: oauth1, client_id: abc}
"""
    )
    with pytest.raises(ConfigError) as err:
        load_settings_text(text, base_dir=tmp_path)
    issues = [str(i) for i in err.value.issues]
    assert any(
        i.startswith("sources.district.auth: line 16:") and "client_secret" in i for i in issues
    ), issues


def test_unknown_keys_are_errors() -> None:
    """A misspelt top-level key is an error, not silently ignored."""
    with pytest.raises(ConfigError) as err:
        load_settings_text(GOOD + "licence_limit: 10\n")
    assert [str(i) for i in err.value.issues] == [
        "licence_limit: line 13: unknown key (not allowed here); did you mean 'license_limit'?"
    ]


def test_an_unknown_key_suggests_the_key_it_was_meant_to_be_wherever_it_is() -> None:
    """Nested, in a list, behind a connector's or an auth type's tag: the suggestion is a key
    of that very place; a key like none of them gets no suggestion."""
    pytest.importorskip("connectors.oneroster")
    text = GOOD.replace("roles: [Teacher]", "roles: [Teacher, {name: Aide, permisions: []}]")
    text = text.replace("  default_role:", "  defualt_role: x\n  default_role:", 1)
    text += (
        "  district:\n"
        "    type: oneroster\n"
        "    base_url: https://roster.example/ims/oneroster/v1p1\n"
        "    auth: {type: oauth1, client_id: abc, client_secret: s3cret-value, clientid: 1}\n"
        "    ful_every: 24h\n"
        "    zzzz: 1\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings_text(text)
    hints = {i.path: i.message for i in err.value.issues}
    assert hints["roles[1].permisions"].endswith("did you mean 'permissions'?")
    assert hints["provisioning.defualt_role"].endswith("did you mean 'default_role'?")
    assert hints["sources.district.auth.clientid"].endswith("did you mean 'client_id'?")
    assert hints["sources.district.ful_every"].endswith("did you mean 'full_every'?")
    assert hints["sources.district.zzzz"] == "unknown key (not allowed here)"


def test_default_site_must_be_a_site() -> None:
    """default_site must be one of sites."""
    with pytest.raises(ConfigError) as err:
        load_settings_text(GOOD.replace("default_site: North High", "default_site: Nowhere"))
    assert err.value.issues[0].path == "provisioning.default_site"
    assert err.value.issues[0].line == 7


@pytest.mark.parametrize(
    ("sites", "path", "problem"),
    [
        ("North High, South Middle", "sites", "must be a list ([a, b], or one '- item' a line), "
         "not a string"),
        ("{North High: 1}", "sites", "must be a list ([a, b], or one '- item' a line), not a mapping"),
        ("", "sites", "must be a list ([a, b], or one '- item' a line), not empty"),
        ("[7, '']", "sites[0]", "Input should be a valid string, got 7"),
    ],
)  # fmt: skip
def test_an_invalid_sites_list_is_reported_once_not_as_no_sites(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sites: str, path: str, problem: str
) -> None:
    """The sites list's own problem is the error, with its path and line: default_site and
    site_map are not also said to be missing from "(none)", a list nobody wrote."""
    cfg = tmp_path / "sites.yaml"
    cfg.write_text(
        GOOD.replace("sites: [North High]", f"sites: {sites}").replace(
            "  default_site: North High\n",
            "  default_site: North High\n  site_map: {s1: North High}\n",
        )
    )
    code, output = run_main(capsys, "--config", str(cfg), "config", "check")
    assert code == 2
    assert f"  {path}: line 4: {problem}\n" in output
    assert "(none)" not in output
    assert "provisioning" not in output


def test_default_site_without_any_sites_says_so() -> None:
    """No `sites` key at all: default_site names a site that is not listed, as before."""
    with pytest.raises(ConfigError) as err:
        load_settings_text(GOOD.replace("sites: [North High]\n", ""))
    [issue] = err.value.issues
    assert issue.path == "provisioning.default_site"
    assert issue.message == "'North High' is not one of sites (none)"


def test_env_variables_are_substituted_and_missing_ones_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """${VAR} takes the environment's value; an unset one is an error naming the variable."""
    monkeypatch.setenv("RS_ORG", "Shelbyville")
    settings = load_settings_text(GOOD.replace("Springfield", "${RS_ORG}"))
    assert settings.organization == "Shelbyville"
    monkeypatch.delenv("RS_ORG")
    with pytest.raises(ConfigError) as err:
        load_settings_text(GOOD.replace("Springfield", "${RS_ORG}"))
    assert "environment variable RS_ORG is not set" in str(err.value)


def test_secret_file_and_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`password_file` is read from the config folder, or from $CREDENTIALS_DIRECTORY by bare name."""
    (tmp_path / "smtp.secret").write_text("s3cret-value\n")
    text = GOOD + "smtp: {host: localhost, from: rs@example.org, password_file: smtp.secret}\n"
    settings = load_settings_text(text, base_dir=tmp_path)
    assert settings.smtp is not None and settings.smtp.password is not None
    assert settings.smtp.password.get_secret_value() == "s3cret-value"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mail").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    text = GOOD + "smtp: {host: localhost, from: rs@example.org, password_file: mail}\n"
    settings = load_settings_text(text, base_dir=tmp_path)
    assert settings.smtp is not None and settings.smtp.password is not None
    assert settings.smtp.password.get_secret_value() == "from-systemd"


def test_dangling_credential_link_is_named_by_the_path_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare `x_file` name that is a dangling link in $CREDENTIALS_DIRECTORY is reported by that
    link's path (the one read), not by a path beside the config, and its content is not shown."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mail").symlink_to(tmp_path / "gone" / "mail.secret")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    text = GOOD + "smtp: {host: localhost, from: rs@example.org, password_file: mail}\n"
    with pytest.raises(ConfigError) as err:
        load_settings_text(text, base_dir=tmp_path)
    assert [str(i) for i in err.value.issues] == [
        f"smtp.password_file: line 13: cannot read secret file {creds / 'mail'}: it is a "
        f"symbolic link to {tmp_path / 'gone' / 'mail.secret'}, which does not exist"
    ]


def test_unreadable_secret_file_is_an_error_without_content(tmp_path: Path) -> None:
    """A missing secret file is reported by its key and line, not by its name: a secret pasted
    where its file's path belongs would otherwise be printed."""
    text = GOOD + "smtp: {host: localhost, from: rs@example.org, password_file: hunter2-Xy9/q}\n"
    with pytest.raises(ConfigError) as err:
        load_settings_text(text, base_dir=tmp_path)
    assert [str(i) for i in err.value.issues] == [
        f"smtp.password_file: line 13: {MISSING_SECRET_FILE}"
    ]
    assert "hunter2" not in str(err.value) and "Xy9" not in str(err.value)


ENV_MISTAKES = """\
organization: Springfield
database: "sqlite://${RS_HOST}/rs.db"
roles: [Teacher]
sites: [North High]
provisioning:
  default_role: "${RS_ROLE}"
  default_site: North High
sources:
  rest:
    type: oneroster
    base_url: "${RS_TOKEN}"
    auth: {type: oauth2, client_id: abc, client_secret: "${RS_TOKEN}", token_url: "${RS_LONG}"}
    page_size: "${RS_SHORT}"
"""


def test_a_value_from_the_environment_is_shown_by_its_reference_never_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A variable may hold a secret: an error at a key it was substituted into names the
    reference (whole or within the text as written), also where the message would cut a long
    value or quote it in another key's error; short values too, where the whole key is theirs."""
    pytest.importorskip("connectors.oneroster")
    monkeypatch.setenv("RS_TOKEN", "tok-3f9a77c1e2")
    monkeypatch.setenv("RS_LONG", "L" * 30 + "-long-value-" + "Q" * 30)
    monkeypatch.setenv("RS_HOST", "db-host-77.internal")
    monkeypatch.setenv("RS_ROLE", "Principal-9")
    monkeypatch.setenv("RS_SHORT", "abc")
    with pytest.raises(ConfigError) as err:
        load_settings_text(ENV_MISTAKES)
    messages = {i.path: i.message for i in err.value.issues}
    assert messages == {
        "database": "'sqlite://${RS_HOST}/rs.db': a SQLite URL has three slashes before a "
        "relative path (sqlite:///PATH)",
        "provisioning.default_role": "the value of ${RS_ROLE} is not one of roles (Teacher)",
        "sources.rest.base_url": "the value of ${RS_TOKEN} is not an http(s) URL",
        "sources.rest.auth.token_url": "the value of ${RS_LONG} is not an http(s) URL",
        "sources.rest.page_size": "Input should be a valid integer, got the value of ${RS_SHORT}",
    }
    text = str(err.value)
    for secret in ("tok-3f9a", "db-host-77", "Principal-9", "LLLLLL", "QQQQQQ", "'abc'"):
        assert secret not in text


def test_yaml_syntax_error_has_a_line() -> None:
    """Broken YAML is reported with its line."""
    with pytest.raises(ConfigError) as err:
        load_settings_text("organization: [unclosed\nroles: x\n")
    assert err.value.issues[0].line is not None


def test_duplicate_keys_are_errors() -> None:
    """A key given twice in one mapping is an error (YAML would silently keep the last)."""
    with pytest.raises(ConfigError) as err:
        load_settings_text(GOOD + "organization: Again\n")
    assert any(i.message == "duplicate key" and i.line == 13 for i in err.value.issues)


def test_example_config_passes_config_check() -> None:
    """The shipped example config is accepted by `config check`."""
    result = CliRunner().invoke(
        cli, ["--config", str(REPO / "config" / "rostersync.example.yaml"), "config", "check"]
    )
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_config_check_exits_2_listing_every_error(tmp_path: Path) -> None:
    """`config check` on a bad file prints each error with path and line and exits 2."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(THREE_MISTAKES)
    result = CliRunner().invoke(cli, ["--config", str(cfg), "config", "check"])
    assert result.exit_code == 2
    assert "3 error(s)" in result.output
    assert "sources.sample.shedule: line 12" in result.output


def test_committed_schema_is_current() -> None:
    """config/rostersync.schema.json equals what `rostersync config schema` prints now."""
    committed = (REPO / "config" / "rostersync.schema.json").read_text()
    assert committed == json_schema_text(), (
        "run: rostersync config schema --output config/rostersync.schema.json"
    )


def test_schema_describes_every_source_type() -> None:
    """The JSON Schema offers each installed connector's keys under sources."""
    schema = json.loads(json_schema_text())
    text = json.dumps(schema)
    assert '"oneroster_csv"' in text
    assert "provisioning" in schema["properties"]


def test_a_cron_the_scheduler_refuses_or_that_never_fires_is_an_error_with_its_line() -> None:
    """Every bad schedule is reported at once, naming the field the scheduler refused."""
    text = GOOD.replace("schedule: {interval: 1h}", 'schedule: {cron: "0 25 * * *"}') + (
        "  feb31:\n"
        "    type: oneroster_csv\n"
        "    path: district\n"
        '    schedule: {cron: "0 0 31 2 *"}\n'
        "  weekdays:\n"
        "    type: oneroster_csv\n"
        "    path: district\n"
        '    schedule: {cron: "0 2 * * 1/0"}\n'
        "  short:\n"
        "    type: oneroster_csv\n"
        "    path: district\n"
        "    schedule: {interval: 0s}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings_text(text)
    assert [str(i) for i in err.value.issues] == [
        "sources.sample.schedule.cron: line 12: cron '0 25 * * *': hour '25': "
        "the last value (25) is higher than the maximum value (23)",
        "sources.feb31.schedule.cron: line 16: cron '0 0 31 2 *' never fires (no date matches it)",
        "sources.weekdays.schedule.cron: line 20: cron '0 2 * * 1/0': day of week: "
        "day-of-week step '0' is not a positive number",
        "sources.short.schedule.interval: line 24: interval must be at least 1s",
    ]


@pytest.mark.parametrize(
    ("value", "kind"),
    [("hourly", "a string"), ('"0 2 * * *"', "a string"), ("3600", "a number"), ("[1h]", "a list")],
)
def test_a_schedule_that_is_not_a_mapping_says_what_a_schedule_looks_like(
    value: str, kind: str
) -> None:
    """`schedule: hourly` names the two forms a schedule takes, not pydantic's "Input should
    be a valid dictionary or instance of Schedule"."""
    with pytest.raises(ConfigError) as err:
        load_settings_text(GOOD.replace("schedule: {interval: 1h}", f"schedule: {value}"))
    assert [str(i) for i in err.value.issues] == [
        "sources.sample.schedule: line 12: must be a mapping: {interval: 1h} or "
        f"{{cron: '0 2 * * *'}}, not {kind}"
    ]


def test_a_good_cron_passes() -> None:
    """Crontab day names, ranges and steps are accepted."""
    settings = load_settings_text(
        GOOD.replace("schedule: {interval: 1h}", 'schedule: {cron: "*/15 6-18 * 1-6,9-12 mon-fri"}')
    )
    schedule = settings.sources["sample"].schedule
    assert schedule is not None and schedule.cron == "*/15 6-18 * 1-6,9-12 mon-fri"


@pytest.mark.parametrize("value", ["99999999999d", "36501d", ".inf", ".nan", "1.0e+300"])
def test_absurd_durations_are_errors_not_tracebacks(value: str) -> None:
    """A duration too large for date arithmetic, or not a number at all, is a config error."""
    with pytest.raises(ConfigError) as err:
        load_settings_text(GOOD + f"resync: {{lease: {value}}}\n")
    [issue] = err.value.issues
    assert (issue.path, issue.line) == ("resync.lease", 13)


def test_config_check_reports_a_bad_cron_and_run_refuses_it_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`config check` and `run` both exit 2 on a cron the daemon could not schedule."""
    cfg = tmp_path / "rs.yaml"
    cfg.write_text(GOOD.replace("schedule: {interval: 1h}", 'schedule: {cron: "0 25 * * *"}'))
    for command in (["config", "check"], ["run"]):
        code, output = run_main(capsys, "--config", str(cfg), *command)
        assert code == 2, output
        assert "sources.sample.schedule.cron: line 12" in output
        assert "Traceback" not in output


EVERY_FILE = """\
organization: Springfield
roles: [Teacher]
provisioning: {default_role: Teacher}
smtp: {host: localhost, from: rs@example.org, password_file: smtp.secret}
sources:
  drop:
    type: oneroster_csv
    path: nowhere
  district:
    type: oneroster
    base_url: https://roster.example/ims/oneroster/v1p1
    ca_bundle: district-ca.pem
    auth: {type: oauth1, client_id: abc, client_secret_file: classlink.secret}
  proxy:
    type: oneroster
    base_url: https://proxy.example/ims/oneroster/v1p1
    auth:
      type: bearer
      token_file: proxy.token
  workspace:
    type: google_classroom
    service_account_file: google-sa.json
    delegated_admin: admin@example.org
"""


def test_config_check_reports_every_missing_file_with_its_key_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing CSV drop, secret files, CA bundle and service-account key: all reported at once, exit 2."""
    pytest.importorskip("connectors.oneroster")
    pytest.importorskip("connectors.google_classroom")
    cfg = tmp_path / "rostersync.yaml"
    cfg.write_text(EVERY_FILE)
    code, output = run_main(capsys, "--config", str(cfg), "config", "check")
    assert code == 2
    lines = [line.strip() for line in output.splitlines()[1:]]
    assert lines == [
        f"smtp.password_file: line 4: {MISSING_SECRET_FILE}",
        f"sources.drop.path: line 8: {tmp_path}/nowhere does not exist "
        "(give a folder or a .zip of CSV files)",
        f"sources.district.ca_bundle: line 12: cannot read {tmp_path}/district-ca.pem: "
        "No such file or directory",
        f"sources.district.auth.client_secret_file: line 13: {MISSING_SECRET_FILE}",
        f"sources.proxy.auth.token_file: line 19: {MISSING_SECRET_FILE}",
        f"sources.workspace.service_account_file: line 22: cannot read service_account_file "
        f"{tmp_path}/google-sa.json: No such file or directory",
    ]


def test_empty_or_binary_secret_files_are_errors_that_never_show_the_bytes(tmp_path: Path) -> None:
    """An empty secret file is an error; an undecodable one is named without quoting its bytes."""
    pytest.importorskip("connectors.oneroster")
    (tmp_path / "smtp.secret").write_text("  \n")
    (tmp_path / "classlink.secret").write_bytes(b"\xffs3cr3t-bytes")
    text = EVERY_FILE.replace("path: nowhere", "path: district").replace(
        "    ca_bundle: district-ca.pem\n", ""
    )
    (tmp_path / "district").mkdir(exist_ok=True)
    with pytest.raises(ConfigError) as err:
        load_settings_text(text.split("  proxy:")[0], base_dir=tmp_path)
    assert [str(i) for i in err.value.issues] == [
        f"smtp.password_file: line 4: secret file {tmp_path}/smtp.secret is empty",
        f"sources.district.auth.client_secret_file: line 12: secret file "
        f"{tmp_path}/classlink.secret is not UTF-8 text",
    ]
    assert "s3cr3t" not in str(err.value) and "xff" not in str(err.value)


def test_a_ca_bundle_without_certificates_is_an_error(tmp_path: Path) -> None:
    """ca_bundle is loaded as the run loads it: a file of no PEM certificates is reported."""
    pytest.importorskip("connectors.oneroster")
    (tmp_path / "district-ca.pem").write_text("not a certificate\n")
    (tmp_path / "classlink.secret").write_text("secret\n")
    text = EVERY_FILE.split("  proxy:")[0].replace("path: nowhere", "path: district")
    text = text.replace(", password_file: smtp.secret", "")
    with pytest.raises(ConfigError) as err:
        load_settings_text(text, base_dir=tmp_path)
    assert [str(i) for i in err.value.issues] == [
        f"sources.district.ca_bundle: line 12: {tmp_path}/district-ca.pem holds no PEM certificates"
    ]


def test_a_missing_secret_is_reported_without_the_union_tag() -> None:
    """The auth block's error reads 'client_secret or client_secret_file is required', not 'oauth1: ...'."""
    pytest.importorskip("connectors.oneroster")
    text = GOOD + (
        "  district:\n"
        "    type: oneroster\n"
        "    base_url: https://roster.example/ims/oneroster/v1p1\n"
        "    auth: {type: oauth1, client_id: abc}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings_text(text)
    assert [str(i) for i in err.value.issues] == [
        "sources.district.auth: line 16: client_secret or client_secret_file is required"
    ]


def test_a_secret_problem_does_not_hide_the_other_errors_of_its_block(tmp_path: Path) -> None:
    """A missing or doubled secret is reported beside the block's other mistakes, not instead of them."""
    pytest.importorskip("connectors.oneroster")
    (tmp_path / "secret").write_text("s3cret\n")
    text = GOOD + (
        "  district:\n"
        "    type: oneroster\n"
        "    base_url: https://roster.example/ims/oneroster/v1p1\n"
        "    auth: {type: oauth2, client_id: abc}\n"
        "  proxy:\n"
        "    type: oneroster\n"
        "    base_url: https://proxy.example/ims/oneroster/v1p1\n"
        "    auth:\n"
        "      type: oauth2\n"
        "      token_url: ftp://proxy.example/token\n"
        "      client_id: abc\n"
        "      client_secret: inline\n"
        "      client_secret_file: secret\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings_text(text, base_dir=tmp_path)
    assert [str(i) for i in err.value.issues] == [
        "sources.district.auth: line 16: token_url is required",
        "sources.district.auth: line 16: client_secret or client_secret_file is required",
        "sources.proxy.auth.token_url: line 22: 'ftp://proxy.example/token' is not an http(s) URL",
        "sources.proxy.auth.client_secret: line 24: give client_secret or client_secret_file, not both",
    ]
    assert "inline" not in str(err.value) and "s3cret" not in str(err.value)


def test_a_yaml_syntax_error_names_where_the_unclosed_part_began() -> None:
    """An unclosed `[` is found lines later, where the parser gives up: the error names that
    line and the one where the list began."""
    text = "database: sqlite:///x.db\nroles: [Teacher,\n  Admin\nsites: [North High]\n"
    with pytest.raises(ConfigError) as raised:
        load_settings_text(text)
    [issue] = raised.value.issues
    assert issue.line == 4
    assert issue.message.startswith("YAML syntax: expected ',' or ']'")
    assert "flow sequence that starts on line 2" in issue.message
    with pytest.raises(ConfigError) as raised:  # a mistake within one line: that line alone
        load_settings_text("database: sqlite:///x.db\nroles: [Teacher, a: b: c]\n")
    [issue] = raised.value.issues
    assert issue.line == 2 and "starts on line" not in issue.message


@pytest.mark.parametrize(
    "text",
    [
        "organization: X\nprovisioning:\n\tdefault_role: Teacher\n",
        "organization:\tX\n",
    ],
)
def test_a_tab_in_a_config_says_yaml_wants_spaces(text: str) -> None:
    """A tab, which PyYAML calls a character that "cannot start any token", is named as a
    tab with its line and column, and the fix (spaces) is given."""
    with pytest.raises(ConfigError) as raised:
        load_settings_text(text)
    [issue] = raised.value.issues
    assert issue.line == text[: text.index("\t")].count("\n") + 1
    column = len(text[: text.index("\t")].rpartition("\n")[2]) + 1
    assert f"a tab (column {column})" in issue.message
    assert "YAML indents and separates with spaces, never tabs" in issue.message


@pytest.mark.parametrize(
    "line",
    [
        "auth: {type: oauth1, client_id: abc, client_secret: ${SECRET}}",
        "sites: [${SITE}, South Middle]",
    ],
)
def test_an_env_reference_inside_braces_or_brackets_says_to_quote_it(line: str) -> None:
    """`${VAR}` unquoted in a `{...}` or `[...]` is a YAML syntax error (its `{` opens a
    mapping): the error says to quote it, since the docs offer `${VAR}` for any value."""
    with pytest.raises(ConfigError) as raised:
        load_settings_text(f"organization: X\n{line}\n")
    [issue] = raised.value.issues
    assert issue.line == 2
    assert issue.message.startswith("YAML syntax: expected ',' or")
    assert "quote a ${VAR} inside [...] or {...}" in issue.message


def test_a_quoted_env_reference_inside_braces_is_read() -> None:
    """The fix the hint gives works: a quoted `${VAR}` in a flow mapping is substituted."""
    with pytest.raises(ConfigError) as raised:
        load_settings_text('organization: X\nauth: {secret: "${ROSTERSYNC_TEST_UNSET_VAR}"}\n')
    assert "environment variable ROSTERSYNC_TEST_UNSET_VAR is not set" in str(raised.value)
    assert "YAML syntax" not in str(raised.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "the file is empty"),
        ("# organization: X\n", "the file is empty"),
        ("- organization: X\n", "the file must be a YAML mapping of keys (key: value), not a list"),
        ("organization X\n", "the file must be a YAML mapping of keys (key: value), not a string"),
    ],
)
def test_a_config_that_is_not_a_mapping_says_what_it_is(text: str, says: str) -> None:
    """An empty file, or one that is a list or a lone string (a missing colon), is told apart."""
    with pytest.raises(ConfigError) as raised:
        load_settings_text(text)
    [issue] = raised.value.issues
    assert issue.message == says


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite://rs.db", "three slashes"),
        ("sqlite:///", "needs a file"),
        ("'sqlite:///:memory:'", "needs a file"),
        ("mysql://db/rs", "use sqlite:///PATH or postgresql"),
    ],
)
def test_a_database_url_no_command_could_open_is_a_config_error(url: str, says: str) -> None:
    """A SQLite URL with a host part, or one with no file, would pass the config and then fail
    every command as an internal error: it is the `database` key's error, with its line."""
    text = GOOD.replace("database: sqlite:///state/rs.db", f"database: {url}")
    with pytest.raises(ConfigError) as raised:
        load_settings_text(text)
    [issue] = raised.value.issues
    assert (issue.path, issue.line) == ("database", 2)
    assert says in issue.message


@pytest.mark.parametrize("encoding", ["utf-16", "cp1252"])
def test_a_config_file_that_is_not_utf8_is_an_error_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    """A config saved as UTF-16 or Windows-1252 (an editor's choice) is a config error with the
    line where decoding stopped, exit 2, not an internal error."""
    cfg = tmp_path / "rs.yaml"
    cfg.write_bytes(GOOD.replace("Springfield", "Saint-Étienne").encode(encoding))
    code, output = run_main(capsys, "--config", str(cfg), "config", "check")
    assert code == 2, output
    assert "not UTF-8" in output and "save it as UTF-8" in output
    assert "(top level): line 1:" in output  # the BOM, or the é on the first line
    assert "Traceback" not in output and "internal error" not in output


def test_an_unset_variable_is_one_error_with_its_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """What validating the empty value would add at the same key (too short, not a duration,
    a secret required) is not reported beside the unset variable; other keys' errors are."""
    for name in ("RS_ID", "RS_SECRET", "RS_EVERY"):
        monkeypatch.delenv(name, raising=False)
    text = GOOD.replace("schedule: {interval: 1h}", 'schedule: {interval: "${RS_EVERY}"}') + (
        "  rest:\n"
        "    type: oneroster\n"
        "    base_url: https://roster.example.org/ims/oneroster/v1p1\n"
        "    auth: {type: oauth2, token_url: 'https://roster.example.org/token',\n"
        "           client_id: '${RS_ID}', client_secret: '${RS_SECRET}'}\n"
        "    page_size: 0\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_settings_text(text)
    assert [(i.path, i.line, i.message) for i in raised.value.issues] == [
        ("sources.sample.schedule.interval", 12, "environment variable RS_EVERY is not set"),
        ("sources.rest.auth.client_id", 17, "environment variable RS_ID is not set"),
        ("sources.rest.auth.client_secret", 17, "environment variable RS_SECRET is not set"),
        ("sources.rest.page_size", 18, "Input should be greater than or equal to 1, got 0"),
    ]


def test_a_source_without_a_type_or_of_an_unknown_type_says_so_plainly() -> None:
    """Not pydantic's "discriminator" and "tag": the `type` key, and the types there are."""
    text = GOOD + "  other:\n    path: district\n  dir:\n    type: ldap\n"
    with pytest.raises(ConfigError) as raised:
        load_settings_text(text)
    assert [(i.path, i.line, i.message) for i in raised.value.issues] == [
        ("sources.other", 13, "type is required"),
        (
            "sources.dir",
            15,
            "type 'ldap' is not one of 'google_classroom', 'oneroster', 'oneroster_csv'",
        ),
    ]


@pytest.mark.parametrize("command", [("users", "list"), ("config", "check")])
def test_no_config_anywhere_says_how_to_name_one(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
) -> None:
    """Without --config and ROSTERSYNC_CONFIG the default file is read; when it is not there
    the error says how to name another (`config check`, a newcomer's first command, too).
    A file the operator named gets no such hint."""
    monkeypatch.delenv("ROSTERSYNC_CONFIG", raising=False)
    monkeypatch.setattr("rostersync.config.loader.DEFAULT_CONFIG", tmp_path / "absent.yaml")
    code, output = run_main(capsys, *command)
    assert code == 2, output
    assert "cannot read config file: No such file or directory" in output
    assert "give --config PATH or set ROSTERSYNC_CONFIG" in output
    code, output = run_main(capsys, "--config", str(tmp_path / "named.yaml"), *command)
    assert code == 2 and "cannot read config file" in output
    assert "ROSTERSYNC_CONFIG" not in output


def test_a_missing_config_named_by_the_environment_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config file $ROSTERSYNC_CONFIG names that is not there: the error says the variable
    named it (the operator gave no path and may not know it is set)."""
    monkeypatch.setenv("ROSTERSYNC_CONFIG", str(tmp_path / "gone.yaml"))
    code, output = run_main(capsys, "status")
    assert code == 2, output
    assert (
        f"{tmp_path / 'gone.yaml'}: 1 configuration error(s):\n  (top level): cannot read config "
        "file: No such file or directory (named by $ROSTERSYNC_CONFIG: correct it, or give "
        "--config PATH)"
    ) in output


@pytest.mark.parametrize("where", ["before", "after"])
def test_an_empty_config_option_is_refused_not_read_as_not_given(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """`--config "$CONF"` with CONF unset exits 2 saying the path is empty; it read the config
    $ROSTERSYNC_CONFIG names (or /etc's), which may be another installation's."""
    other = tmp_path / "production.yaml"
    other.write_text(GOOD, encoding="utf-8")
    monkeypatch.setenv("ROSTERSYNC_CONFIG", str(other))
    args = ("--config", "", "config", "check")
    code, output = run_main(capsys, *(args if where == "before" else (*args[2:], *args[:2])))
    assert code == 2, output
    assert (
        "Invalid value for '--config': the path is empty: give the config file's path (without "
        "--config, $ROSTERSYNC_CONFIG or /etc/rostersync/rostersync.yaml is read)"
    ) in output
    assert "production.yaml" not in output and "OK" not in output


def test_a_stray_byte_far_into_a_config_file_is_named_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past the first block a reader decodes, the line is still the byte's own."""
    cfg = tmp_path / "rs.yaml"
    padding = "".join(f"# comment line {i:05d} of a long header\n" for i in range(1, 401))
    cfg.write_bytes(
        padding.encode() + GOOD.replace("Springfield", "Saint-\xc9tienne").encode("cp1252")
    )
    code, output = run_main(capsys, "--config", str(cfg), "config", "check")
    assert code == 2, output
    assert "(top level): line 401: the file is not UTF-8 (byte 0xc9)" in output


URL_MISTAKES = """\
organization: Springfield
database: "sqlite://admin:DbPw-77@host/rs.db"
roles: [Teacher]
sites: [North High]
provisioning: {default_role: Teacher, default_site: North High}
sources:
  rest:
    type: oneroster
    base_url: "htp://admin:UrlPw-55@example.org/ims"
    auth: {type: oauth2, client_id: abc, client_secret: x, token_url: "htp://u:TokPw-33@x/t"}
    timeout: "%s"
  gc:
    type: google_classroom
    service_account_json: "{}"
    delegated_admin: admin@example.org
    api_base_url: "ftp://u:ApiPw-11@x"
""" % ("9" * 30 + "minutes-or-so" + "Z" * 30)


def test_a_url_quoted_in_an_error_has_its_password_masked_and_long_values_are_cut() -> None:
    """Every message that quotes a URL masks its password, the validators' own messages as
    pydantic's; a value they quote is cut to 40 characters as pydantic's are."""
    pytest.importorskip("connectors.oneroster")
    pytest.importorskip("connectors.google_classroom")
    with pytest.raises(ConfigError) as err:
        load_settings_text(URL_MISTAKES)
    messages = {i.path: i.message for i in err.value.issues}
    assert messages["database"] == (
        "'sqlite://admin:***@host/rs.db': a SQLite URL has three slashes before a relative "
        "path (sqlite:///PATH)"
    )
    assert messages["sources.rest.base_url"] == (
        "'htp://admin:***@example.org/ims' is not an http(s) URL"
    )
    assert messages["sources.rest.auth.token_url"] == "'htp://u:***@x/t' is not an http(s) URL"
    assert messages["sources.gc.api_base_url"] == "'ftp://u:***@x' is not an http(s) URL"
    assert messages["sources.rest.timeout"] == (
        f"'{'9' * 30}minutes-o…' is not a duration (use e.g. 30s, 15m, 1h, 1d or seconds)"
    )
    assert "Pw-" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (
            "postgresql+psycopg://u:PgPw@h:badport/db",
            "the port is not a number from 1 to 65535 (postgresql+psycopg://user@host:5432/db)",
        ),
        (
            "postgresql+psycopg://u@h:0/db",
            "the port is not a number from 1 to 65535 (postgresql+psycopg://user@host:5432/db)",
        ),
        (
            "postgresql+psycopg2://u:PgPw@h/db",
            "'postgresql+psycopg2': rostersync reaches PostgreSQL through psycopg 3 "
            "(postgresql+psycopg://user@host/db)",
        ),
    ],
)
def test_a_postgresql_url_a_command_could_not_open_is_a_config_error(
    url: str, problem: str
) -> None:
    """What SQLAlchemy would only find when a command opens the database (an internal error
    with a traceback) is a config error on `database` with its line, the password unsaid."""
    with pytest.raises(ConfigError) as err:
        load_settings_text(GOOD.replace("sqlite:///state/rs.db", f'"{url}"'))
    assert [str(i) for i in err.value.issues] == [f"database: line 2: {problem}"]
    assert "PgPw" not in str(err.value)


def test_postgresql_without_its_driver_installed_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PostgreSQL database with psycopg not installed: `config check` (and every command,
    as they load the config) says which extra to install, where each failed with
    ModuleNotFoundError as an internal error."""
    monkeypatch.setattr("rostersync.config.loader._driver_installed", lambda: False)
    with pytest.raises(ConfigError) as err:
        load_settings_text(GOOD.replace("sqlite:///state/rs.db", "postgresql+psycopg://u@h/db"))
    assert [str(i) for i in err.value.issues] == [
        "database: line 2: PostgreSQL's driver, psycopg, is not installed: "
        "pip install 'rostersync[postgres]'"
    ]


def test_a_plain_postgresql_url_names_psycopg_3() -> None:
    """`postgresql://` would make SQLAlchemy load psycopg2, a driver rostersync does not use:
    it is taken as `postgresql+psycopg://`."""
    pytest.importorskip("psycopg")
    settings = load_settings_text(GOOD.replace("sqlite:///state/rs.db", "postgresql://u@h:5433/db"))
    assert settings.database == "postgresql+psycopg://u@h:5433/db"


def test_a_secret_of_more_than_one_line_is_a_config_error(tmp_path: Path) -> None:
    """A secret goes into an HTTP header or a login, where a line break fails as a connection
    error saying nothing of the file: `config check` refuses it, from a file or the YAML,
    without showing it."""
    pytest.importorskip("connectors.oneroster")
    (tmp_path / "two.secret").write_text("Line1Secret\nLine2Secret\n")
    text = GOOD + (
        "  rest:\n    type: oneroster\n    base_url: https://x.example.org/ims\n"
        "    auth: {type: oauth2, client_id: abc, client_secret_file: two.secret, "
        "token_url: https://x.example.org/t}\n"
        "  bearer:\n    type: oneroster\n    base_url: https://y.example.org/ims\n"
        '    auth: {type: bearer, token: "Tok1\\nTok2"}\n'
    )
    with pytest.raises(ConfigError) as err:
        load_settings_text(text, base_dir=tmp_path)
    assert [str(i) for i in err.value.issues] == [
        f"sources.rest.auth.client_secret_file: line 16: secret file {tmp_path}/two.secret "
        "holds more than one line: a secret is one line, alone in it",
        "sources.bearer.auth.token: line 20: holds more than one line: a secret is one line",
    ]
    assert "Line1" not in str(err.value) and "Tok1" not in str(err.value)


@pytest.mark.parametrize(
    ("schedule", "problem"),
    [
        ("{interval: 1h, jitter: 2h}", "jitter (2h) must be shorter than the interval (1h)"),
        ("{interval: 10m, jitter: 10m}", "jitter (10m) must be shorter than the interval (10m)"),
        ("{interval: 1h, jitter: 59m}", None),
        ("{interval: 20s}", None),  # the default 30s jitter given by nobody: not refused
        ('{cron: "0 2 * * *", jitter: 2h}', None),
    ],
)
def test_a_jitter_as_long_as_the_interval_is_an_error(schedule: str, problem: str | None) -> None:
    """Each start moves by up to the jitter: one given as long as the interval or longer
    would bring the runs in no order."""
    text = GOOD.replace("schedule: {interval: 1h}", f"schedule: {schedule}")
    if problem is None:
        assert load_settings_text(text).sources["sample"].schedule is not None
        return
    with pytest.raises(ConfigError) as err:
        load_settings_text(text)
    assert [str(i) for i in err.value.issues] == [f"sources.sample.schedule: line 12: {problem}"]

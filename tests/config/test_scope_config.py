"""The `terms` and `schools` keys of a OneRoster source: loading, errors, `config check`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from rostersync.cli.main import cli
from rostersync.config.loader import load_settings, load_settings_text
from rostersync.config.source import ScopedSourceConfig
from rostersync.errors import ConfigError
from rostersync.source.records import RosterOrg
from rostersync.source.testdata import small_roster
from tests.oneroster12 import write_drop

HEAD = """\
organization: Springfield
database: sqlite:///state/rs.db
roles: [Teacher]
provisioning: {default_role: Teacher}
sources:
"""


def csv_source(scope: str) -> str:
    return HEAD + f"  district:\n    type: oneroster_csv\n    path: drop\n{scope}"


def issues(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_settings_text(text, base_dir=tmp_path)
    return [str(i) for i in err.value.issues]


def test_terms_and_schools_load_with_their_defaults(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    settings = load_settings_text(csv_source(""), base_dir=tmp_path)
    source = settings.sources["district"]
    assert isinstance(source, ScopedSourceConfig)
    assert (source.terms.mode, source.terms.grace_days) == ("all", 14)
    assert source.schools.include == [] and source.schools.exclude == []
    assert source.scope_fingerprint() == 0
    scoped = load_settings_text(
        csv_source(
            "    terms: {mode: current, grace_days: 7}\n"
            "    schools: {include: [sch-1, North High], exclude: []}\n"
        ),
        base_dir=tmp_path,
    ).sources["district"]
    assert isinstance(scoped, ScopedSourceConfig) and scoped.scope_fingerprint() != 0
    assert scoped.schools.include == ["sch-1", "North High"]


def test_bad_terms_and_schools_are_errors_with_path_and_line(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    found = issues(
        csv_source(
            "    terms: {mode: now, grace_days: -1}\n"
            "    schools: {include: [sch-1], exclude: [sch-1], only: [x]}\n"
        ),
        tmp_path,
    )
    assert (
        "sources.district.terms.mode: line 9: Input should be 'all' or 'current', got 'now'"
        in found
    )
    assert any(i.startswith("sources.district.terms.grace_days: line 9:") for i in found)
    assert "sources.district.schools.only: line 10: unknown key (not allowed here)" in found


def test_a_school_both_included_and_excluded_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    found = issues(csv_source("    schools: {include: [sch-1], exclude: [sch-1]}\n"), tmp_path)
    assert any(
        i.startswith("sources.district.schools: line 9:") and "'sch-1' is both included" in i
        for i in found
    ), found


def test_a_google_classroom_source_has_no_terms_or_schools(tmp_path: Path) -> None:
    """Classroom courses have states of their own: the keys are unknown there."""
    pytest.importorskip("connectors.google_classroom")
    text = HEAD + (
        "  classroom:\n    type: google_classroom\n    service_account_file: sa.json\n"
        "    delegated_admin: admin@example.org\n    terms: {mode: current}\n"
    )
    found = issues(text, tmp_path)
    assert "sources.classroom.terms: line 10: unknown key (not allowed here)" in found


def test_config_check_names_a_school_the_bulk_drop_does_not_have(tmp_path: Path) -> None:
    """With the drop there (a bulk orgs.csv), `config check` knows its schools: an entry
    matching no org by sourcedId or name is an error; other commands do not read the drop."""
    roster = small_roster()
    roster.orgs.append(RosterOrg("sch-3", "East Elementary"))
    write_drop(roster, tmp_path / "drop")
    cfg = tmp_path / "rs.yaml"
    cfg.write_text(csv_source("    schools: {include: [sch-1, East Elementary, Nort High]}\n"))
    result = CliRunner().invoke(cli, ["--config", str(cfg), "config", "check"])
    assert result.exit_code == 2, result.output
    assert (
        "sources.district: line 6: schools: include 'Nort High' matches no org of the drop's "
        "orgs.csv (by sourcedId or name)"
    ) in result.output
    assert load_settings(cfg).sources["district"] is not None  # the daemon's load: no check
    cfg.write_text(csv_source("    schools: {include: [sch-1, East Elementary]}\n"))
    result = CliRunner().invoke(cli, ["--config", str(cfg), "config", "check"])
    assert result.exit_code == 0, result.output


def test_config_check_does_not_judge_schools_by_a_delta_drop(tmp_path: Path) -> None:
    """A delta drop's orgs.csv holds changes only: nothing to judge the settings by."""
    write_drop(small_roster(), tmp_path / "drop", delta=True)
    cfg = tmp_path / "rs.yaml"
    cfg.write_text(csv_source("    schools: {exclude: [Nowhere]}\n"))
    result = CliRunner().invoke(cli, ["--config", str(cfg), "config", "check"])
    assert result.exit_code == 0, result.output

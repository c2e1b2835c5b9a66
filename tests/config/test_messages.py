"""`config check` messages say what value was given to a type, range or choice check, shortened
and quoted, except for secrets, whose values they never show."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ValidationError

from rostersync.cli.main import cli
from rostersync.config.loader import load_settings_text
from rostersync.config.messages import message
from rostersync.errors import ConfigError

BAD_VALUES = """\
organization: Springfield
database: sqlite:///rs.db
roles: [Teacher]
sites: [North High, 5, {name: x}]
provisioning:
  default_role: Teacher
  on_teacher_removed: delete
resync:
  workers: -3
  batch_size: abc
logging:
  level: loud
smtp: {host: localhost, port: nope, from: a@example.org, username: u, password: 987654321}
sources:
  district:
    type: oneroster
    base_url: https://x.example.org/ims/oneroster/v1p1
    page_size: abc
    max_concurrency: -3
    enabled: maybe
    terms: {mode: sometimes, grace_days:}
    auth: {type: oauth2, client_id: 5, client_secret: 12345678, token_url: 9}
  bearer:
    type: oneroster
    base_url: https://x.example.org/ims/oneroster/v1p1
    auth: {type: bearer, token: 31415926535}
"""

#: The secret values BAD_VALUES gives (numbers, where strings belong): never in a message.
SECRETS = ("987654321", "12345678", "31415926535")


def _issues(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        load_settings_text(text, check_files=False)
    return {i.path: f"line {i.line}: {i.message}" for i in err.value.issues}


def test_a_plain_fields_message_says_the_value_given() -> None:
    """A number, a range and a choice name the value given; pydantic's "unable to parse
    string as an integer" gives way to the value itself."""
    issues = _issues(BAD_VALUES)
    assert issues["resync.batch_size"] == ("line 10: Input should be a valid integer, got 'abc'")
    assert issues["resync.workers"] == (
        "line 9: Input should be greater than or equal to 1, got -3"
    )
    assert issues["logging.level"] == (
        "line 12: Input should be 'debug', 'info', 'warning' or 'error', got 'loud'"
    )
    assert issues["provisioning.on_teacher_removed"] == (
        "line 7: Input should be 'archive' or 'keep', got 'delete'"
    )


def test_a_nested_fields_message_says_the_value_given() -> None:
    """Keys of a source, of its terms and of its auth block, and of smtp."""
    issues = _issues(BAD_VALUES)
    assert issues["sources.district.page_size"] == (
        "line 18: Input should be a valid integer, got 'abc'"
    )
    assert issues["sources.district.max_concurrency"] == (
        "line 19: Input should be greater than or equal to 1, got -3"
    )
    assert issues["sources.district.enabled"] == (
        "line 20: Input should be a valid boolean, got 'maybe'"
    )
    assert issues["sources.district.terms.mode"] == (
        "line 21: Input should be 'all' or 'current', got 'sometimes'"
    )
    assert issues["sources.district.terms.grace_days"] == (
        "line 21: Input should be a valid integer, got an empty value"
    )
    assert issues["sources.district.auth.client_id"] == (
        "line 22: Input should be a valid string, got 5"
    )
    # Named like a secret, but a URL: shown.
    assert issues["sources.district.auth.token_url"] == (
        "line 22: Input should be a valid string, got 9"
    )
    assert issues["smtp.port"] == "line 13: Input should be a valid integer, got 'nope'"


def test_a_list_items_message_says_the_value_given() -> None:
    """An item of a list: a scalar is shown, a mapping is named as one."""
    issues = _issues(BAD_VALUES)
    assert issues["sites[1]"] == "line 4: Input should be a valid string, got 5"
    assert issues["sites[2]"] == "line 4: Input should be a valid string, got a mapping"


def test_a_secret_fields_value_is_never_shown() -> None:
    """client_secret, password and token (SecretStr in the models) say `(value hidden)` and
    never their value."""
    issues = _issues(BAD_VALUES)
    for path, line in (
        ("smtp.password", 13),
        ("sources.district.auth.client_secret", 22),
        ("sources.bearer.auth.token", 26),
    ):
        assert issues[path] == f"line {line}: Input should be a valid string (value hidden)"
    text = "\n".join(issues.values())
    assert not [s for s in SECRETS if s in text]


def test_a_long_value_is_cut_and_quoted_and_a_urls_password_masked() -> None:
    """A value is cut to 40 characters (…), control characters are escaped by the quoting,
    and the password of a URL given where a choice belongs is masked."""
    long = "x" * 100
    issues = _issues(
        BAD_VALUES.replace("on_teacher_removed: delete", f"on_teacher_removed: {long}")
        .replace("level: loud", 'level: "https://admin:hunter22@example.org/"')
        .replace("mode: sometimes", 'mode: "a\\x1b[31mb"')
    )
    assert issues["provisioning.on_teacher_removed"].endswith(f", got '{'x' * 39}…'")
    assert issues["logging.level"].endswith(", got 'https://admin:***@example.org/'")
    assert issues["sources.district.terms.mode"].endswith(", got 'a\\x1b[31mb'")


def test_our_own_validators_messages_are_left_as_they_are() -> None:
    """A duration or cron that does not parse quotes the value in its own words, once."""
    issues = _issues(BAD_VALUES.replace("workers: -3", "lease: abc"))
    assert issues["resync.lease"] == (
        "line 9: 'abc' is not a duration (use e.g. 30s, 15m, 1h, 1d or seconds)"
    )


def test_config_check_prints_the_values_and_hides_the_secrets(tmp_path: Path) -> None:
    """`config check` prints the values with each error, and no secret anywhere."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(BAD_VALUES)
    result = CliRunner().invoke(cli, ["--config", str(cfg), "config", "check"])
    assert result.exit_code == 2
    assert (
        "sources.district.page_size: line 18: Input should be a valid integer, got 'abc'"
        in result.output
    )
    assert "smtp.password: line 13: Input should be a valid string (value hidden)" in result.output
    assert not [s for s in SECRETS if s in result.output]


def test_a_key_named_like_a_secret_is_hidden_whatever_its_type() -> None:
    """A connector's model may keep a secret in a plain field (`api_key: int`): its name is
    enough to hide the value; another field of the same model shows its own."""

    class Plugin(BaseModel):
        api_key: int
        retries: int

    with pytest.raises(ValidationError) as err:
        Plugin.model_validate({"api_key": "s3cr3t-value", "retries": "many"})
    shown = {e["loc"]: message(e, None, Plugin) for e in err.value.errors(include_url=False)}
    assert shown == {
        ("api_key",): "Input should be a valid integer (value hidden)",
        ("retries",): "Input should be a valid integer, got 'many'",
    }


def test_a_block_given_as_a_scalar_or_list_says_it_must_be_a_mapping() -> None:
    """`safety: strict` and the like: the message says what a block is written as, not
    pydantic's "valid dictionary or instance of Safety" (the name of a class of ours)."""
    text = BAD_VALUES.split("resync:")[0] + (
        "safety: strict\nsmtp: [localhost]\nlogging: 5\nsources: {}\n"
    )
    issues = _issues(text.replace("  on_teacher_removed: delete\n", ""))
    assert issues["safety"] == "line 7: must be a mapping of keys (key: value), not a string"
    assert issues["smtp"] == "line 8: must be a mapping of keys (key: value), not a list"
    assert issues["logging"] == "line 9: must be a mapping of keys (key: value), not a number"
    assert not any("instance of" in m for m in issues.values())

"""The JSON Schema agrees with the loader: a standard validator (``jsonschema``) accepts the
example config and every YAML snippet of the README and docs, and `config check` accepts them too.

The schema is generated from the models at test time, so keys a model gains are covered as
soon as it has them.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import certifi
import pytest
import yaml
from jsonschema import Draft202012Validator

from rostersync.cli.main import main
from rostersync.config.loader import json_schema, load_settings_text
from rostersync.config.types import DURATION_PATTERN, parse_duration
from rostersync.errors import ConfigError
from tests.conftest import deep_merge
from tests.fakes.classroom_server import generate_private_pem

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLE = REPO / "config" / "rostersync.example.yaml"

#: What a snippet that shows a few keys is merged into: the least `config check` accepts.
MINIMAL: dict[str, Any] = {
    "organization": "Example District",
    "roles": ["Teacher"],
    "provisioning": {"default_role": "Teacher"},
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```ya?ml[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)


def yaml_snippets() -> list[tuple[str, str]]:
    """Every fenced ```yaml block of the README and docs/*.md: (where, text), dedented."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            indent = len(m["indent"])
            body = "".join(line[indent:] for line in m["body"].splitlines(keepends=True))
            line = text.count("\n", 0, m.start()) + 1
            found.append((f"{doc.relative_to(REPO)}:{line}", body))
    return found


SNIPPETS = yaml_snippets()


def as_config(snippet: dict[str, Any]) -> dict[str, Any]:
    """A complete config from a snippet: a source on its own becomes `sources.example`."""
    if "type" in snippet and "sources" not in snippet:
        snippet = {"sources": {"example": snippet}}
    return deep_merge(MINIMAL, snippet)


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = json_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_errors(validator: Draft202012Validator, data: Any) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
        for e in validator.iter_errors(data)
    ]


def test_the_docs_have_yaml_snippets_to_check() -> None:
    """The extraction finds the snippets (a broken pattern must not make the tests below vacuous)."""
    places = [where for where, _ in SNIPPETS]
    assert len(places) >= 3, places
    assert any(p.startswith("docs/sources.md") for p in places)
    assert any(p.startswith("docs/import.md") for p in places)


def test_the_committed_schema_is_a_valid_draft_2020_12_schema() -> None:
    """config/rostersync.schema.json is itself valid JSON Schema (what editors load)."""
    schema = json.loads((REPO / "config" / "rostersync.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_the_example_config_is_valid_under_the_schema(validator: Draft202012Validator) -> None:
    """The bundled example, roles given by name included, passes a standard validator."""
    data = yaml.safe_load(EXAMPLE.read_text())
    assert schema_errors(validator, data) == []


@pytest.mark.parametrize(("where", "text"), SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_every_yaml_snippet_in_the_docs_is_valid_under_the_schema(
    validator: Draft202012Validator, where: str, text: str
) -> None:
    """Each README/docs snippet, merged into a minimal config when it shows a few keys, passes."""
    snippet = yaml.safe_load(text)
    assert isinstance(snippet, dict), f"{where}: a config snippet is a mapping"
    assert schema_errors(validator, as_config(snippet)) == [], where


def _stand_ins(data: Any, folder: Path, key: str = "") -> Any:
    """Replace every file the config names with a stand-in in ``folder`` (absolute paths too,
    since /etc/rostersync is not there in a test), created with content that passes."""
    if isinstance(data, dict):
        return {k: _stand_ins(v, folder, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [_stand_ins(v, folder, key) for v in data]
    is_file_key = key.endswith("_file") or key in ("path", "ca_bundle")
    if not (is_file_key and isinstance(data, str)):
        return data
    target = folder / "files" / Path(data).name
    target.parent.mkdir(exist_ok=True)
    if key == "path":
        target.mkdir()
    elif key == "ca_bundle":
        shutil.copy(certifi.where(), target)
    elif key == "service_account_file":
        target.write_text(json.dumps(_service_account()))
    else:
        target.write_text("stand-in-secret\n")
    return str(target)


def _service_account() -> dict[str, str]:
    return {
        "type": "service_account",
        "private_key": _private_pem(),
        "client_email": "sync@example.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }


_pem: list[str] = []


def _private_pem() -> str:
    if not _pem:  # RSA key generation is slow: once per session
        _pem.append(generate_private_pem())
    return _pem[0]


def config_check(config: dict[str, Any], folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    path = folder / "rostersync.yaml"
    path.write_text(yaml.safe_dump(_stand_ins(config, folder)))
    code: int | str | None = 0
    try:
        main(["--config", str(path), "config", "check"])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out


def test_config_check_accepts_the_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example passes `config check` (its sample district and all)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["sources"]["sample"]["path"] = str(REPO / "config" / "sample-district")
    data["database"] = f"sqlite:///{tmp_path / 'rs.db'}"
    assert "OK" in config_check(data, tmp_path, capsys)


@pytest.mark.parametrize(("where", "text"), SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_config_check_accepts_every_yaml_snippet_in_the_docs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, text: str
) -> None:
    """Each snippet, completed and with stand-ins for the files it names, passes `config check`."""
    assert "OK" in config_check(as_config(yaml.safe_load(text)), tmp_path, capsys), where


def _variants() -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(what, config, valid?) pairs around the forms the validators accept."""
    bearer = {"type": "oneroster", "base_url": "https://r.example/ims/oneroster/v1p1"}

    def source(**keys: Any) -> dict[str, Any]:
        return as_config({"sources": {"s": {**bearer, **keys}}})

    yield "token_file", source(auth={"type": "bearer", "token_file": "t"}), True
    yield "token", source(auth={"type": "bearer", "token": "t"}), True
    yield (
        "token and token_file",
        source(auth={"type": "bearer", "token": "t", "token_file": "t"}),
        False,
    )
    yield "neither token nor token_file", source(auth={"type": "bearer"}), False
    yield (
        "token: null beside token_file",
        source(auth={"type": "bearer", "token": None, "token_file": "t"}),
        True,
    )
    yield (
        "client_secret_file",
        source(auth={"type": "oauth1", "client_id": "c", "client_secret_file": "s"}),
        True,
    )
    yield "version: 1.2 unquoted", source(auth={"type": "bearer", "token": "t"}, version=1.2), True
    yield "version: 1.3", source(auth={"type": "bearer", "token": "t"}, version=1.3), False
    yield (
        "interval",
        as_config(
            {
                "sources": {
                    "s": {
                        **bearer,
                        "auth": {"type": "bearer", "token": "t"},
                        "schedule": {"interval": "1h 30m"},
                    }
                }
            }
        ),
        True,
    )
    yield (
        "interval and cron",
        as_config(
            {
                "sources": {
                    "s": {
                        **bearer,
                        "auth": {"type": "bearer", "token": "t"},
                        "schedule": {"interval": "1h", "cron": "0 2 * * *"},
                    }
                }
            }
        ),
        False,
    )
    yield (
        "neither interval nor cron",
        as_config(
            {
                "sources": {
                    "s": {
                        **bearer,
                        "auth": {"type": "bearer", "token": "t"},
                        "schedule": {"jitter": 0},
                    }
                }
            }
        ),
        False,
    )
    yield "a duration in words", as_config({"resync": {"lease": "5 minutes"}}), False
    yield "an empty duration", as_config({"resync": {"lease": ""}}), False
    yield (
        "${ENV} for a port",
        as_config({"smtp": {"host": "h", "from": "f@x.org", "port": "${SMTP_PORT}"}}),
        True,
    )
    yield "${ENV} for a choice", as_config({"logging": {"level": "${LOG_LEVEL}"}}), True
    yield (
        "password and password_file",
        as_config(
            {"smtp": {"host": "h", "from": "f@x.org", "password": "p", "password_file": "f"}}
        ),
        False,
    )
    yield (
        "a role by name and in full",
        as_config({"roles": ["Teacher", {"name": "Admin", "permissions": ["import_users"]}]}),
        True,
    )
    yield "a role without a name", as_config({"roles": [{"permissions": []}]}), False
    yield "an unknown key", as_config({"licence_limit": 3}), False
    yield (
        "a source name with a space",
        as_config({"sources": {"my source": {**bearer, "auth": {"type": "bearer", "token": "t"}}}}),
        False,
    )
    yield "a site name over 50 characters", as_config({"sites": ["x" * 51]}), False  # fmt: skip


@pytest.mark.parametrize(
    ("what", "config", "valid"), list(_variants()), ids=[v[0] for v in _variants()]
)
def test_the_schema_accepts_and_refuses_what_the_loader_does(
    validator: Draft202012Validator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    what: str,
    config: dict[str, Any],
    valid: bool,
) -> None:
    """Secret pairs, schedules, durations, ${ENV} values, roles: schema and loader agree."""
    assert (schema_errors(validator, config) == []) is valid, schema_errors(validator, config)
    for name in ("t", "s", "f"):
        (tmp_path / name).write_text("stand-in-secret\n")
    monkeypatch.setenv("SMTP_PORT", "587")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    try:
        load_settings_text(yaml.safe_dump(config), base_dir=tmp_path)
        loads = True
    except ConfigError:
        loads = False
    assert loads is valid


@pytest.mark.parametrize(
    "text",
    [
        "30s",
        "15m",
        "1h",
        "1d",
        "1h30m",
        "1h 30m",
        " 90 ",
        "2d12h",
        "",
        " ",
        "1 hour",
        "h",
        "1.5h",
        "-5",
        "1s1m",
        "5 s",
    ],
)
def test_the_duration_pattern_matches_what_parse_duration_reads(text: str) -> None:
    """The schema's duration pattern and the parser agree on every form."""
    try:
        parse_duration(text)
        parses = True
    except ValueError:
        parses = False
    # JSON Schema patterns are ECMA 262; these constructs mean the same in Python's re.
    assert bool(re.search(DURATION_PATTERN, text)) is parses


def test_defaults_of_durations_are_shown_as_durations() -> None:
    """An editor completing `jitter` offers 30s (what the loader reads), not PT30S."""
    schedule = json_schema()["$defs"]["Schedule"]["properties"]["jitter"]
    assert schedule["default"] == "30s" and parse_duration("30s") == timedelta(seconds=30)

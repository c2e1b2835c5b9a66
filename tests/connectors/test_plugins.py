"""Finding connectors: a config or a sync loads the connectors of the source types it names,
and every installed one when a type is not found under its own name."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import yaml

from rostersync.source import connector as plugins
from rostersync.source.connector import ENTRY_POINT_GROUP, load_plugins
from tests.connectors.test_google_classroom import service_account
from tests.fakes.classroom_server import generate_private_pem

BUILT_IN = ["google_classroom", "oneroster", "oneroster_csv"]
#: The modules of each built-in connector's package, as loaded in a fresh process.
PACKAGES = {
    "google_classroom": "connectors.google_classroom",
    "oneroster": "connectors.oneroster",
    "oneroster_csv": "connectors.oneroster_csv",
}


def test_every_installed_connector_and_only_those_asked_for() -> None:
    assert list(load_plugins()) == BUILT_IN
    assert list(load_plugins(["oneroster"])) == ["oneroster"]
    assert list(load_plugins(("oneroster_csv", "google_classroom"))) == [
        "google_classroom",
        "oneroster_csv",
    ]
    # A type nobody registers: every installed one, as the config's error lists them.
    assert list(load_plugins(["oneroster", "nosuch"])) == BUILT_IN


def test_a_type_registered_under_another_name_is_found_by_loading_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A third-party package may register its connector under any entry point name: asked
    for by type, it is still found, by loading every connector."""
    renamed = (
        EntryPoint("their-oneroster", "connectors.oneroster:PLUGIN", ENTRY_POINT_GROUP),
        EntryPoint("oneroster_csv", "connectors.oneroster_csv:PLUGIN", ENTRY_POINT_GROUP),
    )
    monkeypatch.setattr(plugins, "_installed", lambda: renamed)
    assert list(load_plugins(["oneroster"])) == ["oneroster", "oneroster_csv"]
    assert list(load_plugins(["oneroster_csv"])) == ["oneroster_csv"]


def test_a_broken_connector_asked_for_is_named_once(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = (
        EntryPoint("oneroster", "connectors.no_such_module:PLUGIN", ENTRY_POINT_GROUP),
        EntryPoint("oneroster_csv", "connectors.oneroster_csv:PLUGIN", ENTRY_POINT_GROUP),
    )
    monkeypatch.setattr(plugins, "_installed", lambda: broken)
    monkeypatch.setattr(plugins, "PLUGIN_ERRORS", {})
    assert list(load_plugins(["oneroster"])) == ["oneroster_csv"]
    assert list(plugins.PLUGIN_ERRORS) == ["oneroster"]
    assert "ModuleNotFoundError" in plugins.PLUGIN_ERRORS["oneroster"]


@pytest.mark.parametrize("kind", BUILT_IN)
def test_loading_a_config_imports_only_its_sources_connectors(tmp_path: Path, kind: str) -> None:
    """A process that reads a config naming one source type (and syncs it) does not import
    the other connectors: their modules and config models were 25 ms of every start-up."""
    sources = {
        "google_classroom": {
            "type": "google_classroom",
            "service_account_json": json.dumps(service_account(generate_private_pem())),
            "delegated_admin": "admin@example.org",
        },
        "oneroster": {
            "type": "oneroster",
            "base_url": "https://roster.example.org/ims/oneroster/v1p1",
            "auth": {"type": "bearer", "token": "not-a-real-token"},
        },
        "oneroster_csv": {"type": "oneroster_csv", "path": str(tmp_path)},
    }
    config = tmp_path / "rostersync.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "organization": "X",
                "database": "sqlite:///x.db",
                "roles": ["Teacher"],
                "sites": ["North High"],
                "provisioning": {"default_role": "Teacher", "default_site": "North High"},
                "sources": {"s": sources[kind]},
            }
        )
    )
    program = (
        "import sys; from rostersync.config.loader import load_settings; "
        "from rostersync.source.connector import load_plugins; "
        f"s = load_settings({str(config)!r}); "
        "load_plugins(sorted({c.type for c in s.sources.values()})); "
        "print(sorted(m for m in sys.modules if m.count('.') == 1 and m.startswith('connectors.')))"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = {PACKAGES[k] for k in BUILT_IN if f"'{PACKAGES[k]}'" in done.stdout}
    assert loaded == {PACKAGES[kind]}

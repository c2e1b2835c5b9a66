"""The model-based test of the whole rule set (issue 16): the engine against the oracle.

Profiles (``ROSTERSYNC_MODEL_PROFILE``): ``ci`` (default) is bounded and deterministic, a few
minutes at most on SQLite and fewer examples on PostgreSQL; ``long`` explores with fresh
random examples for as long as it is given (see tests/model/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis.stateful import run_state_machine_as_test

from rostersync.store.db import Store
from tests.model.harness import Harness
from tests.model.machine import STATS, RosterModel, ScopedRosterModel, TwoSourceModel

# (examples on SQLite, examples on PostgreSQL, steps per example)
SIZES = {"ci": (60, 10, 40), "long": (2000, 300, 80)}
#: The same for the scoped machine (its steps are those of the other, and a few more).
SCOPED_SIZES = {"ci": (25, 4, 40), "long": (1000, 150, 80)}
#: The same for the two-source machine.
TWO_SOURCE_SIZES = {"ci": (25, 4, 40), "long": (1000, 150, 80)}


def model_settings(backend: str, sizes: dict[str, tuple[int, int, int]] = SIZES) -> settings:
    profile = os.environ.get("ROSTERSYNC_MODEL_PROFILE", "ci")
    if profile not in SIZES:
        raise pytest.UsageError(
            f"ROSTERSYNC_MODEL_PROFILE={profile!r}: use one of {', '.join(sorted(SIZES))}"
        )
    sqlite_n, pg_n, steps = sizes[profile]
    examples = int(os.environ.get("ROSTERSYNC_MODEL_EXAMPLES") or 0) or (
        sqlite_n if backend == "sqlite" else pg_n
    )
    replay = os.environ.get("ROSTERSYNC_MODEL_REPLAY") == "1"
    return settings(
        # Replay: run just the failures .hypothesis/ keeps, printing every step.
        phases=[Phase.reuse] if replay else list(Phase),
        verbosity=Verbosity.verbose if replay else Verbosity.normal,
        max_examples=examples,
        stateful_step_count=int(os.environ.get("ROSTERSYNC_MODEL_STEPS") or 0) or steps,
        # CI runs the same examples every time; a long run draws new ones and keeps the
        # failures it finds in .hypothesis/, to replay them first the next time.
        derandomize=profile == "ci",
        database=None if profile == "ci" else settings().database,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def run_model(
    store: Store, tmp_path: Path, backend: str, *, scoped: bool = False, two: bool = False
) -> None:
    STATS.clear()
    harness = Harness(store, tmp_path)
    machine = TwoSourceModel if two else ScopedRosterModel if scoped else RosterModel
    try:
        # A factory works where a class is typed: the machine needs the harness.
        factory: Any = lambda: machine(harness)  # noqa: E731
        sizes = TWO_SOURCE_SIZES if two else SCOPED_SIZES if scoped else SIZES
        run_state_machine_as_test(factory, settings=model_settings(backend, sizes))
    finally:
        kinds = ", ".join(
            f"{k} {v}"
            for k, v in sorted(STATS.items())
            if k not in ("examples", "steps", "comparisons")
        )
        # (examples include the replays hypothesis makes while it shrinks a failure)
        print(
            f"\nmodel ({backend}): {STATS['examples']} examples, {STATS['steps']} steps, "
            f"{STATS['comparisons']} comparisons; {kinds}"
        )


def test_the_engine_follows_the_rules_on_sqlite(sqlite_store: Store, tmp_path: Path) -> None:
    """Random roster changes and operations: the directory and every report match the oracle."""
    run_model(sqlite_store, tmp_path, "sqlite")


@pytest.mark.postgres
def test_the_engine_follows_the_rules_on_postgresql(pg_store: Store, tmp_path: Path) -> None:
    """The same on PostgreSQL, with fewer examples."""
    run_model(pg_store, tmp_path, "postgres")


def test_the_engine_follows_the_scope_rules_on_sqlite(sqlite_store: Store, tmp_path: Path) -> None:
    """With the source's schools and terms changing too (ScopedRosterModel)."""
    run_model(sqlite_store, tmp_path, "sqlite", scoped=True)


@pytest.mark.postgres
def test_the_engine_follows_the_scope_rules_on_postgresql(pg_store: Store, tmp_path: Path) -> None:
    run_model(pg_store, tmp_path, "postgres", scoped=True)


def test_the_engine_follows_the_rules_across_two_sources_on_sqlite(
    sqlite_store: Store, tmp_path: Path
) -> None:
    """Two sources whose teachers share their addresses (TwoSourceModel)."""
    run_model(sqlite_store, tmp_path, "sqlite", two=True)


@pytest.mark.postgres
def test_the_engine_follows_the_rules_across_two_sources_on_postgresql(
    pg_store: Store, tmp_path: Path
) -> None:
    run_model(pg_store, tmp_path, "postgres", two=True)

"""The one interface every roster source implements, and how sources are found by name.

A connector streams normalized records (:mod:`rostersync.source.records`) in batches; the engine
stages each batch straight into the database, so memory stays flat however large the
district. Connectors are plug-ins: a package registers a :class:`ConnectorPlugin` under the
entry-point group ``rostersync.connectors`` and the core finds it by the source's ``type``.
The core never imports a concrete connector.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import structlog

from rostersync.config.source import SourceConfig
from rostersync.source.records import RosterRecord, TeacherRef, TeacherRoster
from rostersync.source.rows import StagedBatch

if TYPE_CHECKING:
    import httpx

ENTRY_POINT_GROUP = "rostersync.connectors"


class FetchMode(StrEnum):
    FULL = "full"
    DELTA = "delta"


@runtime_checkable
class Connector(Protocol):
    """A roster source.

    ``fetch(FULL, None)`` yields every record; ``fetch(DELTA, since)`` yields only what changed
    after ``since`` (records with status ``tobedeleted`` mean removals) and raises
    :class:`~rostersync.errors.DeltaUnsupportedError` if the source cannot filter. A source
    that holds changes only (a OneRoster CSV delta drop) raises
    :class:`~rostersync.errors.ChangesOnlyError` from a full fetch.
    Batches may mix record types; a :class:`~rostersync.source.records.Rejected` reports one bad
    record without stopping the run. A batch may also come already sorted into staging rows
    (:class:`~rostersync.source.rows.StagedBatch`, made by :func:`~rostersync.source.rows.sort_batch`): a
    connector that normalizes in worker processes sends those, since rows cross a process
    boundary far more cheaply than record objects. Errors: :mod:`rostersync.errors`.

    A connector may also have a ``warnings`` attribute (a list of strings), complete once a
    fetch has ended: problems it forgave (a CSV row read without a malformed date). The
    engine adds them to the run's report.
    """

    @property
    def supports_delta(self) -> bool: ...

    def fetch(
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord] | StagedBatch]: ...

    async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
        """The teacher's classes now, with their enrollments and students (``resync --live``)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """What the engine hands a connector factory: never a client the connector must build."""

    source: str
    config: SourceConfig
    http: httpx.AsyncClient
    log: Any = None  # a structlog BoundLogger with `source` bound
    #: The connector may also send requests of its own, outside ``http``, built from the
    #: source's settings (OneRoster's decode workers fetch a large collection's pages). The
    #: engine says no when a test swaps the network through ``http``; so does the default.
    own_requests: bool = False
    #: The engine takes staging rows (rostersync.source.rows.StagedBatch) as well as records:
    #: a connector may then yield every page as rows, fingerprinted where it can (see
    #: rostersync.sync.known). Others (the connector contract's tests) take records.
    rows: bool = False

    @property
    def logger(self) -> Any:
        return self.log if self.log is not None else structlog.get_logger().bind(source=self.source)


ConnectorFactory = Callable[[ConnectorContext], Connector]


@dataclass(frozen=True, slots=True)
class ConnectorPlugin:
    type: str
    config_model: builtins.type[SourceConfig]
    create: ConnectorFactory
    description: str = ""


#: Entry points that failed to load, by name, with the reason (shown by `config check`).
PLUGIN_ERRORS: dict[str, str] = {}


@functools.cache
def _installed() -> tuple[EntryPoint, ...]:
    """The connectors' entry points, read once per process: finding them reads every installed
    distribution's metadata (4-5 ms, and a config load and a sync each asked)."""
    return tuple(entry_points(group=ENTRY_POINT_GROUP))


def load_plugins(types: Collection[str] | None = None) -> dict[str, ConnectorPlugin]:
    """Every installed connector, by source `type`.

    ``types``: only these types' connectors are needed. Each is looked for under the entry
    point of its own name (as the built-in ones are registered), so that a process syncing a
    OneRoster source imports neither the Google Classroom connector nor the CSV one (25 ms of
    its start-up, with their config models); if one is not found so, every one is loaded.

    A broken third-party plugin must not take the others down: it is skipped, remembered in
    :data:`PLUGIN_ERRORS` and logged, and a source of its type is then a config error.
    """
    if types is not None:
        wanted = set(types)
        named = [ep for ep in _installed() if ep.name in wanted]
        found = _load(named)
        if wanted <= found.keys():
            return found
        rest = _load(ep for ep in _installed() if ep not in named)
        return dict(sorted({**found, **rest}.items()))
    return _load(_installed())


def _load(eps: Iterable[EntryPoint]) -> dict[str, ConnectorPlugin]:
    found: dict[str, ConnectorPlugin] = {}
    for ep in eps:
        try:
            plugin = ep.load()
        except Exception as exc:  # any import-time failure of a plug-in
            PLUGIN_ERRORS[ep.name] = f"{type(exc).__name__}: {exc}"
            structlog.get_logger().warning(
                "connector_plugin_failed", plugin=ep.name, error=str(exc)
            )
            continue
        if not isinstance(plugin, ConnectorPlugin):
            PLUGIN_ERRORS[ep.name] = f"{ep.value} is not a ConnectorPlugin"
            continue
        found[plugin.type] = plugin
    return dict(sorted(found.items()))

"""The exceptions rostersync raises.

::

    RostersyncError
    ├── ConfigError              bad YAML or values; carries every issue with its YAML path/line
    ├── StoreError               the database is unreachable or its schema is wrong
    ├── RunNotFound / RunStateError   `runs show|approve` on a missing run or a run in the wrong state
    ├── InstanceInUse            `run --instance-id ID` of a process still running on this host
    └── SourceError              anything about one roster source (names the source)
        ├── RetriableSourceError timeouts, dropped connections, 429, 5xx: worth another try
        └── FatalSourceError     401/403, unreadable file, a repeated page: stop the run
            ├── DeltaUnsupportedError  the source refused a delta filter; the engine runs full
            └── ChangesOnlyError       the source holds changes only (a CSV delta drop): no
                                       full run; the engine runs delta when that is safe

Messages never carry secrets: connectors name the source and the request path only.
"""

from __future__ import annotations

from dataclasses import dataclass


class RostersyncError(Exception):
    """Base of every error rostersync raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str  # dotted YAML path, e.g. "sources.district.auth"
    message: str
    line: int | None = None
    file: str | None = None

    def __str__(self) -> str:
        where = self.path or "(top level)"
        if self.line is not None:
            where = f"{where}: line {self.line}"
        return f"{where}: {self.message}"


class ConfigError(RostersyncError):
    def __init__(self, issues: list[ConfigIssue], file: str | None = None) -> None:
        self.issues = issues
        self.file = file
        head = f"{file}: " if file else ""
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{head}{len(issues)} configuration error(s):\n{lines}")


class StoreError(RostersyncError):
    pass


class RunNotFound(RostersyncError):
    pass


class RunStateError(RostersyncError):
    pass


class InstanceInUse(RostersyncError):
    pass


class SourceError(RostersyncError):
    def __init__(self, source: str, message: str) -> None:
        self.source = source
        self.detail = message  # without the source's name, to quote inside another message
        super().__init__(f"source {source!r}: {message}")

    def amend(self, more: str) -> None:
        """Add ``more`` to the end of the message: what was learnt after the error was raised
        (how many tries a retry policy made before it gave up)."""
        self.detail += more
        self.args = (f"source {self.source!r}: {self.detail}",)


class RetriableSourceError(SourceError):
    """Worth retrying: the source was busy, slow or briefly unreachable."""

    def __init__(self, source: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(source, message)
        self.retry_after = retry_after


class FatalSourceError(SourceError):
    """Retrying will not help: credentials, permissions, unreadable data."""


class DeltaUnsupportedError(FatalSourceError):
    """The source rejected the delta filter; the engine falls back to a full run."""


class ChangesOnlyError(FatalSourceError):
    """A full fetch of a source that holds changes only (a OneRoster CSV delta drop): a full
    run would remove everything the changes do not mention. The engine runs a delta run
    instead, unless a full run was asked for by hand or none has succeeded yet."""

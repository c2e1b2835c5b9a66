"""Warnings of one fetch: what the drop had wrong that the run could do without.

They reach the run's report (the engine collects a connector's ``warnings`` after the fetch).
A drop with a bad value on every row would bury the report, so each kind of warning lists its
first :data:`PER_KIND` rows and counts the rest in one closing line.
"""

from __future__ import annotations

PER_KIND = 20
#: The longest value a warning quotes: a cell may hold 128 KiB.
QUOTE_CHARS = 60


def quote(value: str) -> str:
    """``repr(value)``, cut short when long (a warning names the value, it need not hold it)."""
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return f"{value[:QUOTE_CHARS]!r}... ({len(value)} characters)"


class Notes:
    """Collects one fetch's warnings, each kind listed at most ``per_kind`` times."""

    def __init__(self, per_kind: int = PER_KIND) -> None:
        self.per_kind = per_kind
        self._listed: list[str] = []
        self._counts: dict[str, int] = {}

    def add(self, kind: str, text: str) -> None:
        """One warning; ``kind`` names what it is in the closing count (``"users.csv: rows
        read without their dateLastModified"``)."""
        seen = self._counts.get(kind, 0) + 1
        self._counts[kind] = seen
        if seen <= self.per_kind:
            self._listed.append(text)

    def lines(self) -> list[str]:
        out = list(self._listed)
        for kind, seen in self._counts.items():
            if seen > self.per_kind:
                out.append(f"{kind}: {seen - self.per_kind} more not listed ({seen} in all)")
        return out

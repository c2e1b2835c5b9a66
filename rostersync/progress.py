"""Progress of a foreground ``rostersync sync``: a live display on a TTY, plain lines otherwise.

On a TTY one line per source (and one for the resync jobs) is redrawn in place, at most ten
times a second; log lines are routed through :attr:`SyncProgress.log_stream` so they print
above the display instead of through it. The CLI shows progress on a terminal only (stderr
elsewhere carries JSON log lines and nothing else); for a caller that wants it in a file, a
plain line is written when a phase starts or ends, and at most every few seconds while
records are fetched.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TextIO, cast

_CLEAR_LINE = "\x1b[2K"
_FETCH_KEYS = ("orgs", "persons", "classes", "enrollments", "rejected")
_APPLY_KEYS = (
    "users_created",
    "users_linked",
    "users_archived",
    "groups_created",
    "groups_updated",
    "groups_removed",
    "resync_queued",
    "records_rejected",
)


def _figures(figures: Mapping[str, int], keys: tuple[str, ...]) -> str:
    shown = [f"{k.replace('_', ' ')} {figures.get(k, 0)}" for k in keys if figures.get(k)]
    return ", ".join(shown) or "nothing yet"


class _LogStream:
    """What the logger writes to while the display is up: clears it, writes, redraws."""

    def __init__(self, owner: SyncProgress) -> None:
        self._owner = owner

    def write(self, text: str) -> int:
        self._owner._write_above(text)
        return len(text)

    def flush(self) -> None:
        self._owner.stream.flush()

    def isatty(self) -> bool:
        return True


class SyncProgress:
    """Callbacks for :class:`~rostersync.sync.engine.SyncEngine` (``progress=``) and the CLI."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        redraw_every: float = 0.1,
        plain_every: float = 5.0,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.redraw_every = redraw_every
        self.plain_every = plain_every
        # Duck-typed: structlog's PrintLogger only calls write() and flush() (and isatty()).
        self.log_stream = cast("TextIO", _LogStream(self))
        self._lines: dict[str, str] = {}
        self._started: dict[str, float] = {}
        self._phase: dict[str, str] = {}
        self._last_plain: dict[str, float] = {}
        self._drawn = 0
        self._last_draw = 0.0

    # -- callbacks ----------------------------------------------------------------------------

    def __call__(self, source: str, phase: str, figures: Mapping[str, int]) -> None:
        """The engine's progress hook: ``phase`` is "fetch" while records stream in."""
        self._started.setdefault(source, time.monotonic())
        total = sum(v for k, v in figures.items() if k != "rejected")
        detail = f"{total} records ({_figures(figures, _FETCH_KEYS)})"
        # The engine reports batches while fetching; staging and apply follow the last one.
        self._set(source, f"{phase} + apply" if self.tty else phase, detail, final=False)

    def applied(self, source: str, run_id: int, status: str, counts: Mapping[str, int]) -> None:
        self._set(
            source, "done", f"run {run_id} {status}: {_figures(counts, _APPLY_KEYS)}", final=True
        )

    def resync(self, done: int, queued: int, *, final: bool = False) -> None:
        detail = f"{done} job(s) done" + (f", {queued} queued" if queued and not final else "")
        self._set("resync", "done" if final else "groups", detail, final=final)

    def close(self) -> None:
        if self.tty and self._lines:
            self._redraw(force=True)
        self._drawn = 0  # leave the last frame on screen

    # -- drawing ------------------------------------------------------------------------------

    def _set(self, key: str, phase: str, detail: str, *, final: bool) -> None:
        started = self._started.setdefault(key, time.monotonic())
        elapsed = time.monotonic() - started  # read after: never negative
        self._lines[key] = f"{key:<12} {phase:<13} {detail}  [{elapsed:.1f}s]"
        if self.tty:
            self._redraw(force=final)
            return
        now = time.monotonic()
        changed = self._phase.get(key) != phase
        if final or changed or now - self._last_plain.get(key, 0.0) >= self.plain_every:
            self._phase[key] = phase
            self._last_plain[key] = now
            self.stream.write(f"{key}: {phase}: {detail}\n")
            self.stream.flush()

    def _redraw(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.redraw_every:
            return
        self._last_draw = now
        width = 200
        out = [f"\x1b[{self._drawn}F" if self._drawn else ""]
        for line in self._lines.values():
            out.append(f"{_CLEAR_LINE}{line[:width]}\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(self._lines)

    def _write_above(self, text: str) -> None:
        if not self.tty or not self._drawn:
            self.stream.write(text)
            return
        # Up over the display, clear it, print the log text, then draw the display again.
        self.stream.write(f"\x1b[{self._drawn}F\x1b[J{text}")
        self._drawn = 0
        if text.endswith("\n"):
            self._redraw(force=True)

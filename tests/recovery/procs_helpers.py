"""Process trees read from /proc: what a process started, and whether those are gone."""

from __future__ import annotations

import os
from pathlib import Path

from rostersync.daemon import procs
from tests.daemon.conftest import wait_until


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process /proc shows."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        out[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return out


def descendants(pid: int) -> dict[int, int | None]:
    """Every process below ``pid``, with its start time (to tell a reused pid apart)."""
    parents = parent_pids()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {p: procs.start_ticks(p) for p in found}


def wait_all_gone(pids: dict[int, int | None], timeout: float, what: str) -> None:
    """Wait (bounded) until none of ``pids`` runs any more; fail naming the survivors."""

    def gone() -> bool:
        return not [p for p, started in pids.items() if procs.alive(p, started)]

    try:
        wait_until(gone, timeout, what, every=0.1)
    finally:
        for p, started in pids.items():  # never leave a survivor behind for the next test
            if procs.alive(p, started):
                os.kill(p, 9)

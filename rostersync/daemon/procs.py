"""Process identity on this machine: is the process that took a lease still the one running?

A pid alone does not say: after a crash the kernel hands the pid to another process sooner or
later, and a rebooted machine starts counting again. So a process is named by its pid, the
time it started (``/proc/PID/stat``, in clock ticks since boot), and the scope those numbers
are valid in: the boot (``/proc/sys/kernel/random/boot_id``) and the pid namespace
(``/proc/self/ns/pid``). Two containers with one hostname thus never mistake each other's
pids for their own.

Standard library only: the OneRoster decode workers import this module, and they must not
load the store.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: How often a watcher without pidfd support (not Linux) checks that its parent still runs.
POLL_SECONDS = 1.0


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def pid_scope() -> str | None:
    """Where this machine's pids mean the same process: boot id and pid namespace (Linux)."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        namespace = None
    if boot is None and namespace is None:
        return None
    return f"{boot or '?'}/{namespace or '?'}"


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from its third field on (the command name may hold spaces and
    parentheses, so the split is after the last ')')."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    _, sep, rest = text.rpartition(")")
    return rest.split() if sep else None


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot; None where /proc cannot say."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22, starttime
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ProcessId:
    pid: int
    started: int | None  # start_ticks(pid); None where unknown
    scope: str | None  # pid_scope(); None where unknown

    @classmethod
    def current(cls) -> ProcessId:
        pid = os.getpid()
        return cls(pid, start_ticks(pid), pid_scope())


def alive(pid: int, started: int | None = None) -> bool:
    """True while ``pid`` runs (not a zombie) and, if ``started`` is given, is the process
    that started then rather than a later one given the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists; another user's
    fields = _stat_fields(pid)
    if fields is None:
        # No /proc (not Linux), or it went away between the two looks.
        return not Path("/proc").is_dir()
    if fields[0] in ("Z", "X"):  # exited; its parent has not reaped it yet
        return False
    return started is None or start_ticks(pid) in (None, started)


def exit_with_parent(parent: int, started: int | None) -> None:
    """Make this process exit as soon as ``parent`` does (a daemon thread watches it).

    For ProcessPoolExecutor's ``initializer``: a worker blocks reading the pool's call queue,
    whose write end the other workers hold too, so a parent killed with SIGKILL would leave
    them (and the forkserver and resource tracker they keep alive) running for good.
    """
    threading.Thread(
        target=_watch, args=(parent, started), name="rostersync-parent-watch", daemon=True
    ).start()


def _watch(parent: int, started: int | None) -> None:
    fd: int | None = None
    with contextlib.suppress(AttributeError, OSError):  # no pidfd before Linux 5.3
        fd = os.pidfd_open(parent)
    # Checked after opening: a pid already reused would have given us the wrong process.
    if fd is not None and alive(parent, started):
        select.select([fd], [], [])  # readable once the process has exited
    else:
        while alive(parent, started):
            time.sleep(POLL_SECONDS)
    os._exit(1)


#: The first-generation threshold of the cyclic garbage collector in processes that sync
#: (the sync process, the daemon, the decode workers): a collection every 100,000 container
#: allocations instead of 700. A run's rows, pages and sets are trees freed by reference
#: counting; at the default the collector walked them, and everything the imports left,
#: again and again while they lived (a 1% delta run at district M: 66 ms of its 0.95 s).
GC_THRESHOLD = 100_000


def settle_collector() -> None:
    """Once a process's modules are loaded: leave what exists now out of every later
    collection (``gc.freeze``: the imports' tens of thousands of objects live as long as the
    process) and collect young objects every :data:`GC_THRESHOLD` allocations. Cycles made
    later are still collected, only less often."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD)


#: What a process that ends after its command keeps rather than frees (SyncEngine.spent): a
#: module's list lives until the console script's ``os._exit``, which frees nothing itself.
KEPT_UNTIL_EXIT: list[object] = []


def end_fork_server() -> bool:
    """At the end of a whole process, once its work is done: end the multiprocessing fork
    server it started (the decode workers'), if any, at once; True if there was one.

    The server holds the process's stdout and stderr as its own, and leaves only after the
    process has: it sees its parent gone, then tears its interpreter down, 60-70 ms in which
    a caller reading the output to its end (``sync --json | jq``, a script, the benchmark)
    still waits. SIGTERM, whose default action the server keeps, ends it with no teardown;
    its workers have left with their pool, and it is our unreaped child, so the pid is its.
    Reaped here (for a tenth of a second at most), so that it is gone when we are.
    """
    module = sys.modules.get("multiprocessing.forkserver")
    server = getattr(module, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 0.1
        while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.001)
    except OSError:  # already gone, or reaped by another
        pass
    return True

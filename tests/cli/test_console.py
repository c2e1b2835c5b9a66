"""The console script ends the process itself (rostersync.cli.main.console): same status,
output, atexit handlers and waited-for threads as the interpreter's own exit."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rostersync.cli.main import _exit_status


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


CONSOLE = (
    "import sys; sys.argv = ['rostersync', *sys.argv[1:]]; "
    "from rostersync.cli.main import console; "
)


def run_console(prelude: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The console script with ``args``, after ``prelude`` (Python run first, in the same
    process: hooks that report on stderr at exit)."""
    return run_python(CONSOLE + prelude + "console()", *args)


def at_exit(label: str, values: str) -> str:
    """A prelude that prints ``label`` and ``values`` (Python expressions) on stderr as the
    console's process ends."""
    return f"import atexit; atexit.register(lambda: print({label!r}, {values}, file=sys.stderr)); "


def test_the_status_and_output_are_the_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rostersync", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert done.stdout.startswith("rostersync, version ")
    missing = subprocess.run(
        [sys.executable, "-m", "rostersync", "--config", "/nonexistent/r.yaml", "users", "list"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert "/nonexistent/r.yaml" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_atexit_handlers_run_and_threads_are_waited_for(tmp_path: Path) -> None:
    marker = tmp_path / "thread-done"
    code = (
        "import atexit, threading, time, pathlib; "
        "atexit.register(lambda: print('atexit ran', flush=True)); "
        f"threading.Thread(target=lambda: (time.sleep(0.3), pathlib.Path({str(marker)!r})"
        ".write_text('x'))).start(); " + CONSOLE + "console()"
    )
    done = run_python(code, "--version")
    assert done.returncode == 0
    assert "rostersync, version" in done.stdout
    assert done.stdout.rstrip().endswith("atexit ran")
    assert marker.read_text() == "x"


def test_exit_codes_follow_sys_exit() -> None:
    assert _exit_status(None) == 0
    assert _exit_status(2) == 2
    assert _exit_status(256 + 3) == 3
    done = run_python(
        CONSOLE + "import rostersync.cli.main as m; m.main = lambda: sys.exit('bad'); console()"
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "bad"


def test_a_sync_process_settles_the_garbage_collector_and_a_tests_process_does_not(
    config: Path,
) -> None:
    """The console script's process, about to sync, freezes what it imported and collects
    young objects rarely (rostersync.daemon.procs.settle_collector); the same command run
    in this process (a test's, which outlives it) leaves the collector as it was."""
    import gc

    from rostersync.daemon.procs import GC_THRESHOLD
    from tests.cli.sample import as_json
    from tests.cli.sample import run as run_here

    before = (gc.get_threshold(), gc.get_freeze_count())
    assert as_json(run_here(config, "sync", "--dry-run", "--json"))["runs"][0]["dry_run"]  # type: ignore[index]
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
    assert before[0][0] < GC_THRESHOLD
    report = "import gc; " + at_exit(
        "collector", "gc.get_threshold()[0], gc.get_freeze_count() > 0"
    )
    done = run_console(report, "--config", str(config), "sync", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["runs"][0]["counts"]["users_created"] == 43
    assert f"collector {GC_THRESHOLD} True" in done.stderr


#: In the console's process: report, at the process's end, each start of the decode workers'
#: fork server and whether the store's SQLAlchemy had been imported by then.
_FORK_SERVER_STARTS = (
    "from multiprocessing import forkserver as fs; starts = []; run = fs.ensure_running; "
    "fs.ensure_running = lambda: (starts.append('sqlalchemy' in sys.modules), run())[1]; "
) + at_exit("fork server starts", "starts")


def _oneroster_config(config: Path) -> Path:
    """The example config with a OneRoster source whose server refuses at once."""
    data = yaml.safe_load(config.read_text())
    data["sources"] = {
        "district": {
            "type": "oneroster",
            "base_url": "http://127.0.0.1:9/ims/oneroster/v1p1",
            "auth": {"type": "bearer", "token": "not-a-real-token"},
            "retry": {"max_attempts": 1, "initial_wait": 0.01},
        }
    }
    config.write_text(yaml.safe_dump(data))
    return config


def test_a_full_sync_process_starts_the_decode_workers_fork_server_before_the_store(
    config: Path,
) -> None:
    """A process started to run a full sync of a OneRoster source starts the fork server its
    decode workers come from before it imports the store (the server loads their modules on
    another core meanwhile); a delta run, which seldom needs workers, does not, and neither
    does the same command run inside this process, which outlives it."""
    from tests.cli.sample import run as run_here

    _oneroster_config(config)
    args = ("--config", str(config), "sync", "--json")
    full = run_console(_FORK_SERVER_STARTS, *args, "--full")
    assert full.returncode == 1, full.stderr  # nobody answers at port 9: the run fails
    assert json.loads(full.stdout)["runs"][0]["status"] == "failed"
    assert "fork server starts [False]" in full.stderr
    delta = run_console(_FORK_SERVER_STARTS, *args, "--delta")
    assert json.loads(delta.stdout)["runs"][0]["status"] == "failed"
    assert "fork server starts []" in delta.stderr

    from multiprocessing import forkserver as mp_forkserver

    calls: list[bool] = []
    real = mp_forkserver.ensure_running
    try:
        mp_forkserver.ensure_running = lambda: calls.append(True)
        assert run_here(config, "sync", "--full", "--json").exit_code == 1
    finally:
        mp_forkserver.ensure_running = real
    assert calls == []


def test_a_sync_process_has_the_fork_server_preload_its_stores_driver(config: Path) -> None:
    """The decode workers of a PostgreSQL store read the mirror's fingerprints with psycopg:
    the fork server started ahead imports it (the database need not answer yet); for a
    SQLite store it imports no driver."""
    _oneroster_config(config)
    preloads = (
        "from multiprocessing import forkserver as fs; seen = []; "
        "fs.ensure_running = lambda: seen.append(list(fs._forkserver._preload_modules)); "
    ) + at_exit("preloads", "seen")
    args = ("--config", str(config), "sync", "--full", "--json")
    on_sqlite = run_console(preloads, *args)
    data = yaml.safe_load(config.read_text())
    data["database"] = "postgresql+psycopg://nobody@127.0.0.1:9/nothing"
    config.write_text(yaml.safe_dump(data))
    on_postgresql = run_console(preloads, *args)
    assert on_postgresql.returncode != 0  # nobody answers at port 9
    drivers = {"sqlite": on_sqlite.stderr, "postgresql": on_postgresql.stderr}
    for dialect, err in drivers.items():
        line = next(x for x in err.splitlines() if x.startswith("preloads"))
        assert "connectors.oneroster.decode" in line, err
        assert ("'psycopg'" in line) == (dialect == "postgresql"), err


def _holders(pipe: str) -> list[str]:
    """The command lines of this machine's processes whose stdout is ``pipe``."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and str((proc / "fd" / "1").readlink()) == pipe:
                found.append((proc / "cmdline").read_text().replace("\0", " "))
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc (Linux)")
def test_a_sync_process_ends_its_fork_server_with_it(config: Path) -> None:
    """A caller reading the command's output to its end (`sync --json | jq`, a script) is
    done when the command is: the decode workers' fork server, which holds the same stdout,
    is ended by the process before it exits, not left to notice and tear itself down."""
    _oneroster_config(config)
    command = [sys.executable, "-m", "rostersync", "--config", str(config), "sync", "--full"]
    proc = subprocess.Popen([*command, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    pipe = str(Path(f"/proc/self/fd/{proc.stdout.fileno()}").readlink())
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    left = _holders(pipe)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err  # nobody answers at port 9: the run fails
    assert json.loads(out)["runs"][0]["status"] == "failed"
    assert not [c for c in left if "forkserver" in c], left


def test_ending_the_fork_server_ends_it_at_once() -> None:
    """end_fork_server: the server this process started is gone (by SIGTERM) when it
    returns; with none started, it does nothing."""
    program = (
        "import os, signal; from multiprocessing import forkserver as fs; "
        "from rostersync.daemon.procs import end_fork_server; "
        "before = end_fork_server(); "
        "from connectors.oneroster.forkserver import start_ahead; "
        "assert start_ahead(('connectors.oneroster.decode',)); "
        "pid = fs._forkserver._forkserver_pid; "
        "print(before, end_fork_server(), os.path.exists(f'/proc/{pid}'))"
    )
    done = run_python(program)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "False"]


def test_a_sync_process_keeps_its_runs_views_of_the_mirror_until_it_exits(config: Path) -> None:
    """The console's `sync` ends after its runs: what a run fetched stays until the process's
    exit frees it all at once (SyncEngine.spent), unless resyncs follow, whose memory would
    come on top of it; the same command run inside this process, which goes on, keeps
    nothing."""
    from rostersync.daemon.procs import KEPT_UNTIL_EXIT
    from tests.cli.sample import as_json
    from tests.cli.sample import run as run_here

    report = "from rostersync.daemon import procs; " + at_exit(
        "kept", "[type(getattr(x, 'known', None)).__name__ for x in procs.KEPT_UNTIL_EXIT]"
    )
    args = ("--config", str(config), "sync", "--full", "--json")
    first = run_console(report, *args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["runs"][0]["counts"]["resync_queued"] > 0
    assert "kept []" in first.stderr  # let go before the resyncs ran
    again = run_console(report, *args)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["runs"][0]["counts"]["resync_queued"] == 0
    assert "kept ['KnownRows']" in again.stderr
    assert as_json(run_here(config, "sync", "--full", "--json"))["runs"][0]["mode"] == "full"  # type: ignore[index]
    assert KEPT_UNTIL_EXIT == []


def _with_stdout_closed(config: Path, *args: str) -> tuple[int, str]:
    """The console script with ``args``, its stdout a pipe whose reader has gone (`| head`
    that read what it wanted): the exit status and stderr."""
    command = [sys.executable, "-m", "rostersync", "--config", str(config), *args]
    read, write = os.pipe()
    os.close(read)  # before the process starts: its first write finds no reader
    try:
        done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    return done.returncode, done.stderr


def test_output_to_a_closed_pipe_keeps_the_commands_own_status(config: Path) -> None:
    """`rostersync sync | head -1`: the reader going away neither stops the command nor turns
    its status into 1 ("a run failed or was held"); a sync that succeeds exits 0, a listing
    exits 0, a held run still exits 1, and there is no traceback."""
    assert _with_stdout_closed(config, "sync", "--json", "--log-level", "error") == (0, "")
    assert _with_stdout_closed(config, "users", "list") == (0, "")
    drop = config.parent / "sample-district"
    for name in ("users.csv", "enrollments.csv", "classes.csv"):
        lines = (drop / name).read_text().splitlines(keepends=True)
        (drop / name).write_text("".join(lines[: 1 + (len(lines) - 1) // 10]))
    code, err = _with_stdout_closed(config, "sync", "--log-level", "error")
    assert code == 1, err
    assert "Traceback" not in err and "Broken pipe" not in err


def test_output_the_disk_refuses_is_named_not_an_internal_error(config: Path) -> None:
    """`rostersync users list --json > out.json` on a full disk (here /dev/full): one line
    naming the standard output and the reason, exit 1, no internal error."""
    from tests.cli.sample import run as run_here

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    assert run_here(config, "sync").exit_code == 0
    command = [sys.executable, "-m", "rostersync", "--config", str(config), "users", "list"]
    for extra in ([], ["--json"]):
        with open("/dev/full", "w") as full:
            done = subprocess.run(
                [*command, *extra], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120
            )
        assert done.returncode == 1, done.stderr
        assert done.stderr.splitlines()[-1] == (
            "rostersync: the standard output: No space left on device"
        )
        assert "internal error" not in done.stderr


def test_a_closed_stdout_or_stderr_is_no_internal_error(config: Path) -> None:
    """Started with stdout or stderr closed (`>&-` in a cron line), a command runs as with
    /dev/null there: its own status, no internal error."""
    from tests.cli.sample import run as run_here

    assert run_here(config, "sync").exit_code == 0
    command = [sys.executable, "-m", "rostersync", "--config", str(config), "users", "list"]
    no_stdout = subprocess.run(
        ["sh", "-c", '"$@" >&-', "sh", *command], stderr=subprocess.PIPE, text=True, timeout=120
    )
    assert (no_stdout.returncode, no_stdout.stderr) == (0, "")
    no_stderr = subprocess.run(
        ["sh", "-c", '"$@" 2>&-', "sh", *command, "--config", "/nonexistent/r.yaml"],
        stdout=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    assert (no_stderr.returncode, no_stderr.stdout) == (2, "")

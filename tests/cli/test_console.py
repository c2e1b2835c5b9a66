"""The console script ends the process itself (rostersync.cli.main.console): same status,
output, atexit handlers and waited-for threads as the interpreter's own exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rostersync.cli.main import _exit_status


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


CONSOLE = (
    "import sys; sys.argv = ['rostersync', *sys.argv[1:]]; "
    "from rostersync.cli.main import console; "
)


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
    report = (
        "import atexit, gc; atexit.register(lambda: print('collector', gc.get_threshold()[0], "
        "gc.get_freeze_count() > 0, file=sys.stderr)); "
    )
    done = run_python(CONSOLE + report + "console()", "--config", str(config), "sync", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["runs"][0]["counts"]["users_created"] == 43
    assert f"collector {GC_THRESHOLD} True" in done.stderr

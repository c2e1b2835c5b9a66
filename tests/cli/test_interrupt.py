"""Ctrl-C at any instant of the console script's start-up: one line, exit 1, no traceback, as
a Ctrl-C once the command runs (rostersync.cli.console)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from rostersync.cli import console

pytestmark = pytest.mark.slow

#: The console script pip wrote beside the interpreter, and `python -m rostersync`.
SCRIPT = Path(sys.executable).with_name("rostersync")
ENTRY_POINTS = [[str(SCRIPT)], [sys.executable, "-m", "rostersync"]]
#: SIGINT this long after the start, in seconds: imports, then the command (`status` reads the
#: database, importing SQLAlchemy as it begins).
INSTANTS = [0.01 + 0.025 * i for i in range(24)]


def _before_rostersync(stderr: str) -> bool:
    """Interrupted in the interpreter's own start (its site module, runpy finding the
    package), or in the entry module's first lines before its handler: the only frames of
    rostersync, if any, are the entry modules' imports."""
    ours = set(re.findall(r'File "[^"]*/rostersync/([^"]+)", line \d+, in (\S+)', stderr))
    return ours <= {("__main__.py", "<module>"), ("cli/console.py", "<module>")}


def test_ctrl_c_at_any_instant_of_start_up_is_one_line_and_exit_1(config: Path) -> None:
    """Interrupted while the modules import, the command line parses or the command begins,
    the process says `rostersync: aborted` (or a command's own line), exits 1, and shows no
    traceback; 0 if it had finished. Before rostersync's first line runs, the interpreter's
    own start (a few tens of ms) is beyond reach: those runs are left out, and most must not be."""
    assert SCRIPT.exists()
    subprocess.run(
        [sys.executable, "-m", "rostersync", "--config", str(config), "db", "upgrade"],
        check=True,
        capture_output=True,
    )
    judged = 0
    for i, delay in enumerate(INSTANTS):
        command = [*ENTRY_POINTS[i % 2], "--config", str(config), "status"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        stderr = err.decode()
        early = proc.returncode == -signal.SIGINT or "Traceback" in stderr
        if early and _before_rostersync(stderr):
            continue  # Python's own start, or its handler's default: no code of ours yet
        judged += 1
        where = f"{command[0]} interrupted after {delay:.3f} s"
        assert "Traceback" not in stderr, f"{where}:\n{stderr}"
        assert proc.returncode in (0, 1), f"{where}: exit {proc.returncode}\n{stderr}"
        if proc.returncode == 1:
            last = stderr.strip().splitlines()[-1]
            assert last.startswith("rostersync: "), f"{where}: {stderr}"
            # stderr is no terminal: no blank line for a `^C` echo (a log reader's lines)
            assert "" not in stderr.splitlines(), f"{where}: {stderr!r}"
    assert judged >= len(INSTANTS) // 2


def test_only_the_console_script_sets_its_handler() -> None:
    """Importing the command line (tests, a program embedding it) leaves SIGINT's handler as
    it was, and started() puts Python's back only in place of the console script's own."""
    import rostersync.cli.main  # noqa: F401

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def mine(signum: int, frame: object) -> None: ...

    previous = signal.signal(signal.SIGINT, mine)
    try:
        console.started()
        assert signal.getsignal(signal.SIGINT) is mine
        signal.signal(signal.SIGINT, console._interrupted)
        console.started()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("where", ["command", "parsing", "closing"])
@pytest.mark.parametrize("terminal", [True, False])
def test_a_command_stopped_by_ctrl_c_ends_the_terminals_line_first(
    terminal: bool, where: str
) -> None:
    """On a terminal the `^C` it echoed begins a line that the command's last line must not
    share; a log or the journal gets no blank line, whether the Ctrl-C came while the command
    ran, while the command line was parsed or while the command closed (its close callbacks,
    the database's disposal among them)."""
    import io

    from click.testing import CliRunner

    from rostersync.cli.app import Root, run

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    @click.group(cls=Root)
    @click.option("--flag", callback=stop if where == "parsing" else None, is_eager=True)
    @click.pass_context
    def root(ctx: click.Context, flag: str | None) -> None:
        if where == "closing":
            ctx.call_on_close(stop)

    @root.command()
    def go() -> None:
        if where == "command":
            stop()

    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    err = Stderr()
    with CliRunner().isolation(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stderr", err)
        with pytest.raises(SystemExit) as ended:
            run(root, ["--flag", "x", "go"])
    assert ended.value.code == 1
    assert err.getvalue() == ("\n" if terminal else "") + "rostersync: aborted\n"

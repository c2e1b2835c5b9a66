"""Process identity (pid, start time, scope) and decode workers that die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rostersync.daemon import procs
from tests.recovery.procs_helpers import descendants, wait_all_gone

REPO = Path(__file__).resolve().parents[2]
LINUX = Path("/proc/self/stat").exists()


def test_a_running_process_is_alive_and_an_exited_one_is_not() -> None:
    """alive() says yes for this process and no for a child that has exited and been reaped."""
    me = procs.ProcessId.current()
    assert procs.alive(me.pid, me.started)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not procs.alive(child.pid)


@pytest.mark.skipif(not LINUX, reason="start times come from /proc")
def test_a_reused_pid_is_not_the_process_that_started_before() -> None:
    """A pid whose start time differs from the recorded one belongs to another process."""
    me = procs.ProcessId.current()
    assert me.started is not None and me.scope is not None
    assert not procs.alive(me.pid, me.started + 1)


@pytest.mark.skipif(not LINUX, reason="zombies are read from /proc")
def test_an_exited_child_not_yet_reaped_counts_as_gone() -> None:
    """A zombie (exited, its parent has not waited for it) is not alive."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        from tests.daemon.conftest import wait_until

        wait_until(lambda: not procs.alive(child.pid), 10, "the child to exit")
        os.kill(child.pid, 0)  # still in the process table: a zombie
    finally:
        child.wait()


POOL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from connectors.oneroster.decode import start_pool
    pool = start_pool(2)
    print(pool.submit(os.getpid).result(), flush=True)
    time.sleep(120)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="process trees are read from /proc")
def test_decode_workers_forkserver_and_resource_tracker_exit_when_the_parent_is_killed() -> None:
    """SIGKILL of a process with a decode pool leaves none of the pool's processes running."""
    parent = subprocess.Popen(
        [sys.executable, "-c", POOL_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        below = descendants(parent.pid)
        # The worker, the forkserver it was forked from, the resource tracker.
        assert worker in below and len(below) >= 3, below
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]
    wait_all_gone(below, 20, "the decode pool's processes to exit after their parent")

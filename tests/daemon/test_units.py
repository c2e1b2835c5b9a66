"""The daemon's small parts in-process: cron days, sd_notify, metrics, progress, the unit file.
(Crash recovery has its own tests in tests/recovery.)"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from rostersync.config.schedule import Schedule, build_trigger, crontab_day_of_week
from rostersync.daemon.metrics import Metrics, MetricsServer
from rostersync.daemon.systemd import Notifier
from rostersync.daemon.workers import pg_conninfo
from rostersync.progress import SyncProgress
from rostersync.store.db import utcnow

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("cron", "aps"),
    [
        ("*", "*"),
        ("0", "sun"),
        ("7", "sun"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("0,6", "sun,sat"),
        ("5-7", "sun,fri,sat"),
        ("*/2", "sun,tue,thu,sat"),
        ("mon-wed", "mon,tue,wed"),
    ],
)
def test_crontab_days_of_week_count_sunday_as_0(cron: str, aps: str) -> None:
    """Crontab weekday numbers (0 and 7 = Sunday) become the day names APScheduler 3.x reads correctly."""
    assert crontab_day_of_week(cron) == aps


def test_a_cron_schedule_fires_on_the_crontab_weekday() -> None:
    """ "0 2 * * 1" fires on a Monday at 02:00, not on a Tuesday."""
    trigger = build_trigger(Schedule(cron="0 2 * * 1", jitter=timedelta(0)))
    fire = trigger.get_next_fire_time(None, utcnow().astimezone())
    assert fire is not None and fire.weekday() == 0 and (fire.hour, fire.minute) == (2, 0)


def test_a_cron_with_both_day_fields_fires_when_either_matches() -> None:
    """As in crontab, "0 2 13 * 5" runs on every 13th and on every Friday, not only on a
    Friday the 13th; a day field starting with * keeps both fields required."""
    start = datetime(2026, 3, 1, tzinfo=UTC).astimezone()  # a Sunday; the 13th is a Friday
    trigger = build_trigger(Schedule(cron="0 2 13 * 5", jitter=timedelta(0)))
    fires: list[datetime] = []
    previous = None
    while len(fires) < 8:
        fire = trigger.get_next_fire_time(previous, start)
        assert fire is not None
        fires.append(fire)
        previous, start = fire, fire
    assert [(f.month, f.day) for f in fires] == [
        *((3, 6), (3, 13), (3, 20), (3, 27)),
        *((4, 3), (4, 10), (4, 13), (4, 17)),  # April 13th is a Monday
    ]
    every_other = build_trigger(Schedule(cron="0 2 */2 * 5", jitter=timedelta(0)))
    fire = every_other.get_next_fire_time(None, datetime(2026, 3, 1, tzinfo=UTC).astimezone())
    assert fire is not None and fire.weekday() == 4 and fire.day % 2 == 1


def test_notifier_sends_datagrams_and_halves_the_watchdog(tmp_path: Path) -> None:
    """READY/STATUS/WATCHDOG go to $NOTIFY_SOCKET as one datagram each; keep-alives come at half WATCHDOG_USEC."""
    path = Path("/tmp") / f"rs-unit-{uuid.uuid4().hex[:8]}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        try:
            n = Notifier(
                {
                    "NOTIFY_SOCKET": str(path),
                    "WATCHDOG_USEC": "4000000",
                    "WATCHDOG_PID": str(os.getpid()),
                }
            )
            assert n.watchdog_interval == 2.0
            assert n.ready("sample: never run\nsecond line")
            assert n.watchdog()
            assert sock.recv(1024) == b"READY=1\nSTATUS=sample: never run second line"
            assert sock.recv(1024) == b"WATCHDOG=1"
        finally:
            path.unlink()
    silent = Notifier({})
    assert not silent.enabled and not silent.ready() and silent.watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval is None


async def test_http_hooks_time_requests_and_count_statuses() -> None:
    """The httpx event hooks count responses by status and time requests per host."""
    metrics = Metrics()
    transport = httpx.MockTransport(
        lambda req: httpx.Response(429 if req.url.path == "/slow" else 200)
    )
    async with httpx.AsyncClient(
        transport=transport, event_hooks=metrics.http_event_hooks()
    ) as client:
        await client.get("http://roster.example/users")
        await client.get("http://roster.example/slow")
    text_ = metrics.render().decode()
    assert 'rostersync_http_responses_total{host="roster.example",status="200"} 1.0' in text_
    assert 'rostersync_http_responses_total{host="roster.example",status="429"} 1.0' in text_
    assert (
        'rostersync_http_request_duration_seconds_count{host="roster.example",method="GET"} 2.0'
        in text_
    )


def test_healthz_answers_503_when_unhealthy() -> None:
    """/healthz is 503 with the reason when the health check fails."""
    server = MetricsServer("127.0.0.1:0", Metrics(), lambda: (False, {"database": False})).start()
    try:
        host, port = server.address
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5)
        assert err.value.code == 503
        assert b'"database": false' in err.value.read()
        err.value.close()
    finally:
        server.stop()


def test_pg_conninfo_keeps_the_search_path_option() -> None:
    """The LISTEN connection uses the same server, database and options as the store."""
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3Drs_x"
    assert (
        pg_conninfo(url) == "postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3Drs_x"
    )


def test_progress_prints_plain_lines_when_not_a_tty() -> None:
    """Without a TTY, progress is one plain line per phase, not a redrawn display."""
    out = io.StringIO()
    p = SyncProgress(out, tty=False)
    p("sample", "fetch", {"persons": 10, "classes": 2})
    p("sample", "fetch", {"persons": 20, "classes": 4})  # same phase within 5 s: no line
    p.applied("sample", 7, "succeeded", {"users_created": 3, "resync_queued": 3})
    p.resync(3, 0, final=True)
    p.close()
    assert out.getvalue().splitlines() == [
        "sample: fetch: 12 records (persons 10, classes 2)",
        "sample: done: run 7 succeeded: users created 3, resync queued 3",
        "resync: done: 3 job(s) done",
    ]
    assert "\x1b" not in out.getvalue()


def test_progress_redraws_in_place_on_a_tty_and_keeps_log_lines_above() -> None:
    """On a TTY the display is redrawn with cursor moves, and a log line is printed above it."""
    out = io.StringIO()
    p = SyncProgress(out, tty=True, redraw_every=0)
    p("sample", "fetch", {"persons": 10})
    p("sample", "fetch", {"persons": 20})
    p.log_stream.write('{"event": "fetch_done"}')
    p.log_stream.write("\n")
    p.applied("sample", 1, "succeeded", {"users_created": 1})
    p.close()
    shown = out.getvalue()
    assert "\x1b[1F" in shown and "\x1b[2K" in shown
    assert shown.index("persons 20") < shown.index("fetch_done") < shown.index("run 1 succeeded")


def test_the_systemd_units_verify() -> None:
    """`systemd-analyze verify` accepts the service, the one-shot service and the timer without warnings."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here; the unit files are not verified")
    exe = Path(sys.prefix) / "bin" / "rostersync"
    if not exe.exists():
        pytest.skip(
            f"{exe} is missing: install the package in this environment to verify ExecStart"
        )
    # ExecStart must name an executable that exists here, so verify a copy pointing at ours.
    workdir = Path("/tmp") / f"rs-units-{uuid.uuid4().hex[:8]}"
    workdir.mkdir()
    try:
        for name in ("rostersync.service", "rostersync-once.service", "rostersync.timer"):
            content = (REPO / "deploy" / name).read_text(encoding="utf-8")
            (workdir / name).write_text(
                content.replace("/opt/rostersync/bin/rostersync", str(exe)), encoding="utf-8"
            )
        units = [
            str(workdir / n)
            for n in ("rostersync.service", "rostersync-once.service", "rostersync.timer")
        ]
        done = subprocess.run(
            [tool, "verify", *units], capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        shutil.rmtree(workdir)
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "rostersync" in line]
    assert done.returncode == 0, done.stderr
    assert ours == [], ours

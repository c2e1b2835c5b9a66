"""Reload in-process: a new config is applied whole or not at all, systemd always hears READY=1,
and /healthz is not ok while a scheduled source has no job."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from rostersync.config.loader import load_settings
from rostersync.daemon.schedule import job_id
from rostersync.daemon.service import Daemon
from rostersync.daemon.systemd import Notifier
from rostersync.store.db import Store
from tests.daemon.conftest import SAMPLE, base_config, free_port, sqlite_url, write_config

# Crons that do not fire while a test runs: the tests look at jobs, not at syncs.
NEW_YEAR = "0 0 1 1 *"
SECOND_OF_JANUARY = "0 0 2 1 *"
THIRD_OF_JANUARY = "0 0 3 1 *"


class RecordingNotifier(Notifier):
    """Keeps every sd_notify message instead of sending it."""

    def __init__(self) -> None:
        super().__init__({})
        self.sent: list[tuple[str, ...]] = []

    def send(self, *fields: str) -> bool:
        self.sent.append(fields)
        return True

    def keys(self) -> list[str]:
        """The state changes sent, in order: READY, RELOADING, STOPPING."""
        flags = ("READY=1", "RELOADING=1", "STOPPING=1")
        return [f.removesuffix("=1") for message in self.sent for f in message if f in flags]


def source(cron: str | None, **extra: Any) -> dict[str, Any]:
    src: dict[str, Any] = {"type": "oneroster_csv", "path": str(SAMPLE), **extra}
    if cron is not None:
        src["schedule"] = {"cron": cron, "jitter": 0}
    return src


def config_with(url: str, **sources: dict[str, Any]) -> dict[str, Any]:
    return base_config(url, sources=sources)


def jobs(d: Daemon) -> dict[str, tuple[str, Any]]:
    """Every job as (trigger, next run time): what a rejected reload must leave as it was."""
    assert d.scheduler is not None
    return {j.id: (str(j.trigger), j.next_run_time) for j in d.scheduler.get_jobs()}


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Daemon]]:
    """Build a daemon on a config file, its scheduler and workers started (not `run`); all of it
    is stopped when the test ends."""
    started: list[Daemon] = []
    stores: list[Store] = []

    def make(config: dict[str, Any]) -> Daemon:
        path = write_config(tmp_path / "rostersync.yaml", config)
        settings = load_settings(path)
        store = Store(settings.database)
        store.ensure_schema()
        stores.append(store)
        # log_level fixed: a reload must not reconfigure logging under capture_logs().
        d = Daemon(
            settings, store, config_file=path, notifier=RecordingNotifier(), log_level="info"
        )
        d._apply_metrics_listen()
        d.start_scheduler()
        started.append(d)
        return d

    yield make
    for d in started:
        d._stopping = True
        d._wake_workers()
        await asyncio.gather(*(w.task for w in d.resync.workers if w.task), return_exceptions=True)
        if d.scheduler is not None and d.scheduler.running:
            d.scheduler.shutdown(wait=False)
        if d._server is not None:
            d._server.stop()
    for store in stores:
        store.dispose()


def rewrite(d: Daemon, config: dict[str, Any]) -> None:
    write_config(d.config_file, config)


def assert_ready_after_reloading(d: Daemon) -> None:
    assert isinstance(d.notifier, RecordingNotifier)
    keys = d.notifier.keys()
    assert keys[-2:] == ["RELOADING", "READY"], d.notifier.sent


async def test_a_bad_cron_on_reload_is_rejected_and_every_schedule_kept(
    tmp_path: Path, daemon: Callable[..., Daemon]
) -> None:
    """A cron the scheduler refuses is rejected with its YAML path; jobs, config and READY=1 stay right."""
    url = sqlite_url(tmp_path)
    d = daemon(config_with(url, sample=source(NEW_YEAR), other=source(SECOND_OF_JANUARY)))
    before, settings = jobs(d), d.settings
    rewrite(d, config_with(url, sample=source("0 25 * * *"), third=source(THIRD_OF_JANUARY)))
    with capture_logs() as logs:
        assert await d.reload() is False
    [rejected] = [e for e in logs if e["event"] == "config_reload_rejected"]
    assert any(
        e.startswith("sources.sample.schedule.cron: line ") and "hour '25'" in e
        for e in rejected["errors"]
    ), rejected
    assert jobs(d) == before and d.settings is settings
    assert_ready_after_reloading(d)
    assert d.health()[0] is True


async def test_a_cron_that_never_fires_is_rejected_on_reload(
    tmp_path: Path, daemon: Callable[..., Daemon]
) -> None:
    """February 31st never comes: the reload is rejected and the old job stays."""
    url = sqlite_url(tmp_path)
    d = daemon(config_with(url, sample=source(NEW_YEAR)))
    before = jobs(d)
    rewrite(d, config_with(url, sample=source("0 0 31 2 *")))
    with capture_logs() as logs:
        assert await d.reload() is False
    [rejected] = [e for e in logs if e["event"] == "config_reload_rejected"]
    assert any("never fires" in e for e in rejected["errors"]), rejected
    assert jobs(d) == before
    assert_ready_after_reloading(d)


async def test_a_good_reload_replaces_changed_jobs_and_keeps_unchanged_ones(
    tmp_path: Path, daemon: Callable[..., Daemon]
) -> None:
    """Changed schedules are replaced, new sources added, removed ones dropped, unchanged ones keep their next run."""
    url = sqlite_url(tmp_path)
    d = daemon(
        config_with(url, keep=source(NEW_YEAR), change=source(NEW_YEAR), drop=source(NEW_YEAR))
    )
    before = jobs(d)
    rewrite(
        d,
        config_with(
            url, keep=source(NEW_YEAR), change=source(SECOND_OF_JANUARY), add=source(NEW_YEAR)
        ),
    )
    assert await d.reload() is True
    after = jobs(d)
    assert set(after) == {job_id(n) for n in ("keep", "change", "add")}
    assert after[job_id("keep")] == before[job_id("keep")]
    assert after[job_id("change")] != before[job_id("change")]
    assert_ready_after_reloading(d)


async def test_a_failure_while_scheduling_puts_the_old_jobs_back(
    tmp_path: Path, daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If adding the second job fails, the first, already replaced, is put back as it was."""
    url = sqlite_url(tmp_path)
    d = daemon(config_with(url, first=source(NEW_YEAR), second=source(NEW_YEAR)))
    before, settings = jobs(d), d.settings
    assert d.scheduler is not None
    real_add_job = d.scheduler.add_job

    def add_job(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("id") == job_id("second") and kwargs.get("next_run_time") is None:
            raise RuntimeError("job store unavailable")
        return real_add_job(*args, **kwargs)

    monkeypatch.setattr(d.scheduler, "add_job", add_job)
    rewrite(d, config_with(url, first=source(SECOND_OF_JANUARY), second=source(THIRD_OF_JANUARY)))
    with capture_logs() as logs:
        assert await d.reload() is False
    [rejected] = [e for e in logs if e["event"] == "config_reload_rejected"]
    assert rejected["errors"] == ["RuntimeError: job store unavailable"]
    assert jobs(d) == before and d.settings is settings
    assert sorted(d.jobs.scheduled) == ["first", "second"]
    assert_ready_after_reloading(d)


async def test_a_failure_building_a_trigger_changes_nothing(
    tmp_path: Path, daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trigger that cannot be built fails the reload before the scheduler is touched."""
    url = sqlite_url(tmp_path)
    d = daemon(config_with(url, sample=source(NEW_YEAR)))
    before, settings = jobs(d), d.settings

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no trigger today")

    monkeypatch.setattr("rostersync.daemon.schedule.build_trigger", broken)
    rewrite(d, config_with(url, sample=source(SECOND_OF_JANUARY), new=source(NEW_YEAR)))
    with capture_logs() as logs:
        assert await d.reload() is False
    assert [e["errors"] for e in logs if e["event"] == "config_reload_rejected"] == [
        ["ValueError: no trigger today"]
    ]
    assert jobs(d) == before and d.settings is settings
    assert_ready_after_reloading(d)


async def test_a_failure_resizing_the_workers_undoes_the_schedules_and_config(
    tmp_path: Path, daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers step comes after the schedules: failing there puts the jobs and the config back."""
    url = sqlite_url(tmp_path)
    d = daemon(config_with(url, sample=source(NEW_YEAR)))
    before, settings = jobs(d), d.settings
    real_resize = d._resize_workers

    def resize(want: int) -> None:
        if want == 3:
            raise RuntimeError("cannot start workers")
        real_resize(want)

    monkeypatch.setattr(d, "_resize_workers", resize)
    new = config_with(url, sample=source(SECOND_OF_JANUARY), new=source(NEW_YEAR))
    new["resync"]["workers"] = 3
    rewrite(d, new)
    assert await d.reload() is False
    assert jobs(d) == before and d.settings is settings
    assert len([w for w in d.resync.workers if not w.retire]) == 2
    assert_ready_after_reloading(d)


async def test_a_metrics_address_in_use_is_rejected_and_the_old_listener_keeps_serving(
    tmp_path: Path, daemon: Callable[..., Daemon]
) -> None:
    """A new metrics.listen that cannot be bound rejects the reload; the old address still answers."""
    url = sqlite_url(tmp_path)
    old_port = free_port()
    d = daemon(
        config_with(url, sample=source(NEW_YEAR)) | {"metrics": {"listen": f"127.0.0.1:{old_port}"}}
    )
    before, settings = jobs(d), d.settings
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        rewrite(
            d,
            config_with(url, sample=source(SECOND_OF_JANUARY))
            | {"metrics": {"listen": f"127.0.0.1:{busy}"}},
        )
        with capture_logs() as logs:
            assert await d.reload() is False
    [rejected] = [e for e in logs if e["event"] == "config_reload_rejected"]
    # The key and the address, as every other reload error names its key.
    assert rejected["errors"][0].startswith(
        f"metrics.listen: cannot listen on 127.0.0.1:{busy}: [Errno 98]"
    ), rejected
    assert jobs(d) == before and d.settings is settings
    status, body = await asyncio.to_thread(healthz, old_port)
    assert status == 200 and body["status"] == "ok"
    assert_ready_after_reloading(d)


async def test_moving_metrics_to_another_spelling_of_the_same_port_works(
    tmp_path: Path, daemon: Callable[..., Daemon]
) -> None:
    """127.0.0.1:P to localhost:P: the old listener is let go first, then the new one binds."""
    url = sqlite_url(tmp_path)
    port = free_port()
    d = daemon(
        config_with(url, sample=source(NEW_YEAR)) | {"metrics": {"listen": f"127.0.0.1:{port}"}}
    )
    rewrite(
        d, config_with(url, sample=source(NEW_YEAR)) | {"metrics": {"listen": f"localhost:{port}"}}
    )
    assert await d.reload() is True
    assert d._server_listen == f"localhost:{port}"
    status, _ = await asyncio.to_thread(healthz, port)
    assert status == 200


async def test_healthz_is_503_while_a_scheduled_source_has_no_job(
    tmp_path: Path, daemon: Callable[..., Daemon]
) -> None:
    """A scheduled source without its job makes /healthz 503 naming it; a source with no
    schedule, or disabled, is fine."""
    url = sqlite_url(tmp_path)
    port = free_port()
    d = daemon(
        config_with(
            url,
            sample=source(NEW_YEAR),
            by_hand=source(None),
            disabled=source(NEW_YEAR, enabled=False),
        )
        | {"metrics": {"listen": f"127.0.0.1:{port}"}}
    )
    status, body = await asyncio.to_thread(healthz, port)
    assert (status, body["unscheduled_sources"]) == (200, [])
    assert d.scheduler is not None
    d.scheduler.remove_job(job_id("sample"))
    status, body = await asyncio.to_thread(healthz, port)
    assert status == 503 and body["status"] == "unhealthy"
    assert body["unscheduled_sources"] == ["sample"]


async def test_dropping_the_metrics_block_stops_the_listener(
    tmp_path: Path, daemon: Callable[..., Daemon]
) -> None:
    """A reload without `metrics` closes the old address."""
    url = sqlite_url(tmp_path)
    port = free_port()
    d = daemon(
        config_with(url, sample=source(NEW_YEAR)) | {"metrics": {"listen": f"127.0.0.1:{port}"}}
    )
    rewrite(d, config_with(url, sample=source(NEW_YEAR)))
    assert await d.reload() is True
    assert (d._server, d._server_listen) == (None, None)
    with pytest.raises(OSError):
        await asyncio.to_thread(healthz, port)


async def test_a_reload_with_a_missing_drop_folder_applies_and_warns(
    tmp_path: Path, daemon: Callable[..., Daemon]
) -> None:
    """A source whose CSV drop folder is gone still reloads (its runs fail, saying why) and
    keeps the other sources going; the log names the missing folder."""
    url = sqlite_url(tmp_path)
    d = daemon(config_with(url, a=source(NEW_YEAR)))
    gone = tmp_path / "not-mounted-yet"
    rewrite(d, config_with(url, a=source(NEW_YEAR), b=source(SECOND_OF_JANUARY, path=str(gone))))
    with capture_logs() as logs:
        assert await d.reload()
    assert set(jobs(d)) == {job_id("a"), job_id("b")}
    [warning] = [e for e in logs if e["event"] == "config_files_missing"]
    assert any("sources.b.path" in err and "does not exist" in err for err in warning["errors"])
    assert_ready_after_reloading(d)

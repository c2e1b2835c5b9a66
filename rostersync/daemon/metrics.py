"""Prometheus metrics and the health check, served on ``metrics.listen`` (opt-in).

Everything lives on its own :class:`~prometheus_client.CollectorRegistry`, so several daemons
(or tests) in one process never share counters; the library's process, platform and GC
collectors are registered on it as they are on its default registry. Counters and histograms
export no ``*_created`` series (Prometheus would read them as gauges of their own).

What the database knows is read from it at scrape time, so that runs of the CLI count as much
as the daemon's: the last success of each source, the held runs waiting for approval and the
live part of the queue (``queued``, ``running``). Finished jobs are a counter.

``/metrics``  the Prometheus text format, or OpenMetrics when the scraper asks for it, gzipped
              when it accepts that (the library's own negotiation)
``/healthz``  200 ``{"status": "ok", ...}`` while the scheduler is alive and the database
              answers; 503 with the same fields otherwise
"""

from __future__ import annotations

import errno
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import httpx
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    MetricsHandler,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rostersync import __version__

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from rostersync.config.schedule import Schedule

#: Names an operator's dashboards and alerts rely on (docs/operations.md lists them).
METRIC_NAMES = (
    "rostersync_sync_runs_total",
    "rostersync_sync_last_success_timestamp_seconds",
    "rostersync_sync_held_runs",
    "rostersync_sync_duration_seconds",
    "rostersync_source_schedule_period_seconds",
    "rostersync_resync_queue_jobs",
    "rostersync_resync_jobs_total",
    "rostersync_resync_job_duration_seconds",
    "rostersync_http_request_duration_seconds",
    "rostersync_http_responses_total",
    "rostersync_config_reloads_total",
    "rostersync_info",
)
#: Queue states a job is still in; finished ones are counted by rostersync_resync_jobs_total.
LIVE_STATES = ("queued", "running")

_START = "rostersync_started"  # request.extensions key: perf_counter() when the request left
HealthFn = Callable[[], tuple[bool, dict[str, Any]]]


@dataclass(frozen=True)
class StoreState:
    """What a scrape reads from the database (and the schedules the daemon runs)."""

    queue: Mapping[str, int]
    last_success: Mapping[str, float] = field(default_factory=dict)
    held: Mapping[str, int] = field(default_factory=dict)
    schedule_period: Mapping[str, float] = field(default_factory=dict)


def read_store_state(
    conn: Connection, sources: Iterable[str], schedules: Mapping[str, Schedule] | None = None
) -> StoreState:
    """One scrape's reading of the store. ``sources`` (the configured ones) get a held-runs
    series even at 0, so a dashboard shows them; a held run counts until it is approved or a
    later real run of its source succeeds (which makes it unapprovable)."""
    from rostersync.resync.queue import queue_depth
    from rostersync.store.db import as_utc
    from rostersync.sync import history, runs

    depth = queue_depth(conn)
    last: dict[str, float] = {}
    for source, when in runs.last_successes(conn):
        at = as_utc(when)
        if at is not None:
            last[str(source)] = at.timestamp()
    held = dict.fromkeys(sources, 0)
    held.update(history.held_counts(conn))
    periods = {name: schedule_period(s) for name, s in (schedules or {}).items()}
    return StoreState(
        {state: int(depth.get(state, 0)) for state in LIVE_STATES}, last, held, periods
    )


def schedule_period(schedule: Schedule, *, now: datetime | None = None) -> float:
    """Seconds between runs: the interval, or for a cron the longest gap among its next
    runs (``0 2 * * 1-5`` waits three days over a weekend, and an alert must allow that)."""
    from rostersync.config.schedule import cron_trigger

    if schedule.interval is not None:
        return schedule.interval.total_seconds()
    assert schedule.cron is not None
    trigger = cron_trigger(schedule.cron)
    at = now or datetime.now(UTC).astimezone()
    fires: list[datetime] = []
    previous: datetime | None = None
    for _ in range(15):  # two weeks of a daily cron: every weekday pattern shows up
        nxt = trigger.get_next_fire_time(previous, at)
        if nxt is None:
            break
        fires.append(nxt)
        previous, at = nxt, nxt + timedelta(seconds=1)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(fires)]
    return max(gaps, default=0.0)


class _StoreCollector(Collector):
    """Series read from the database at scrape time (so they are never stale, and runs of
    the CLI count as well as the daemon's)."""

    def __init__(self, read: Callable[[], StoreState]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        # What the registry checks the names against when this is registered: the families
        # alone. Without it the registry collects, reading the database before the daemon
        # has its schedules (a warning at every start).
        return self._families(StoreState(queue={}))

    def collect(self) -> Iterable[Metric]:
        try:
            state = self._read()
        except Exception as exc:  # a scrape must not fail because the database is down
            structlog.get_logger().warning("metrics_store_read_failed", error=str(exc))
            return []
        return self._families(state)

    @staticmethod
    def _families(state: StoreState) -> list[Metric]:
        queue = GaugeMetricFamily(
            "rostersync_resync_queue_jobs",
            "Resync jobs waiting (queued) or being processed (running)",
            labels=["state"],
        )
        for state_name, n in state.queue.items():
            queue.add_metric([state_name], n)
        last = GaugeMetricFamily(
            "rostersync_sync_last_success_timestamp_seconds",
            "Unix time of the last successful sync run per source (daemon or CLI)",
            labels=["source"],
        )
        for source, at in sorted(state.last_success.items()):
            last.add_metric([source], at)
        held = GaugeMetricFamily(
            "rostersync_sync_held_runs",
            "Held runs waiting for `rostersync runs approve` (not yet overtaken)",
            labels=["source"],
        )
        for source, n in sorted(state.held.items()):
            held.add_metric([source], n)
        period = GaugeMetricFamily(
            "rostersync_source_schedule_period_seconds",
            "Seconds between a scheduled source's runs (a cron: the longest gap)",
            labels=["source"],
        )
        for source, seconds in sorted(state.schedule_period.items()):
            period.add_metric([source], seconds)
        return [queue, last, held, period]


class Metrics:
    """The daemon's metrics; ``store_state`` is called on every scrape."""

    def __init__(
        self, store_state: Callable[[], StoreState] | None = None, *, instance: str = ""
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it untyped
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)  # registers nothing where the interpreter keeps no GC stats
        self.runs = Counter(
            "rostersync_sync_runs",
            "Finished sync runs of this daemon by source and status",
            ["source", "status"],
            registry=r,
        )
        self.sync_duration = Histogram(
            "rostersync_sync_duration_seconds",
            "Wall time of one sync run (fetch, stage, apply)",
            ["source"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.jobs = Counter(
            "rostersync_resync_jobs", "Resync jobs processed by outcome", ["outcome"], registry=r
        )
        self.job_duration = Histogram(
            "rostersync_resync_job_duration_seconds",
            "Seconds from a resync job's lease to its outcome (jobs are done in batches)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.http_duration = Histogram(
            "rostersync_http_request_duration_seconds",
            "Roster source HTTP requests: seconds until the response headers arrived",
            ["host", "method"],
            registry=r,
        )
        self.http_responses = Counter(
            "rostersync_http_responses",
            "Roster source HTTP responses by status",
            ["host", "status"],
            registry=r,
        )
        self.reloads = Counter(
            "rostersync_config_reloads", "SIGHUP config reloads by result", ["result"], registry=r
        )
        # instance_id, not instance: Prometheus gives every scraped series its own `instance`
        # (the target's host:port) and would rename ours to exported_instance.
        info = Gauge(
            "rostersync_info",
            "Version and instance id (--instance-id) of this daemon",
            ["version", "instance_id"],
            registry=r,
        )
        info.labels(__version__, instance).set(1)
        if store_state is not None:
            r.register(_StoreCollector(store_state))

    # -- recording ---------------------------------------------------------------------------

    def record_run(self, source: str, status: str, seconds: float) -> None:
        self.runs.labels(source, status).inc()
        self.sync_duration.labels(source).observe(seconds)

    def record_jobs(self, outcomes: Iterable[str], seconds: float) -> None:
        for outcome in outcomes:
            self.jobs.labels(outcome).inc()
            self.job_duration.observe(seconds)

    def http_event_hooks(self) -> dict[str, list[Callable[..., Any]]]:
        """httpx event hooks (async, as AsyncClient requires) that time requests and count statuses."""

        async def on_request(request: httpx.Request) -> None:
            request.extensions[_START] = time.perf_counter()

        async def on_response(response: httpx.Response) -> None:
            request = response.request
            host = request.url.host or "?"
            self.http_responses.labels(host, str(response.status_code)).inc()
            started = request.extensions.get(_START)
            if isinstance(started, float):
                self.http_duration.labels(host, request.method).observe(
                    time.perf_counter() - started
                )

        return {"request": [on_request], "response": [on_response]}

    def render(self) -> bytes:
        """The classic text format (what a scrape without an Accept header gets)."""
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP, in a thread so a stuck event loop shows up as
    an unhealthy answer rather than no answer."""

    def __init__(self, listen: str, metrics: Metrics, health: HealthFn) -> None:
        host, _, port = listen.rpartition(":")
        self.metrics = metrics
        self.health = health
        handler = type("_BoundHandler", (_Handler,), {"owner": self, "registry": metrics.registry})
        self._server = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics",
            daemon=True,
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Handler(MetricsHandler):
    """The library's handler for ``/metrics`` (format and gzip negotiation), plus ``/healthz``."""

    owner: MetricsServer
    server_version = "rostersync"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the log

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            super().do_GET()
        elif path == "/healthz":
            try:
                ok, detail = self.owner.health()
            except Exception as exc:  # the health check itself failing is unhealthy, not a 500
                ok, detail = False, {"error": str(exc)}
            body = json.dumps(
                {"status": "ok" if ok else "unhealthy", **detail}, default=str
            ).encode()
            self._reply(200 if ok else 503, body, "application/json")
        else:
            self._reply(404, b"not found: try /metrics or /healthz\n", "text/plain")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def listen_hint(exc: OSError) -> str | None:
    """What to do about a `metrics.listen` address the daemon cannot bind."""
    if exc.errno == errno.EADDRINUSE:
        return (
            "another process listens there (a second daemon on this host?): stop it, or give "
            "this daemon another metrics.listen"
        )
    if exc.errno == errno.EACCES:
        return "a port below 1024 needs privileges: give metrics.listen a port from 1024"
    return None

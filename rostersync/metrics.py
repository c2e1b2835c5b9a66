"""Prometheus metrics and the health check, served on ``metrics.listen`` (opt-in).

Everything lives on its own :class:`~prometheus_client.CollectorRegistry`, so several daemons
(or tests) in one process never share counters, and the default process collectors stay out.

``/metrics``  the Prometheus text format
``/healthz``  200 ``{"status": "ok", ...}`` while the scheduler is alive and the database
              answers; 503 with the same fields otherwise
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from rostersync import __version__

#: Names an operator's dashboards and alerts rely on (docs/operations.md lists them).
METRIC_NAMES = (
    "rostersync_sync_runs_total",
    "rostersync_sync_last_success_timestamp_seconds",
    "rostersync_sync_duration_seconds",
    "rostersync_resync_queue_jobs",
    "rostersync_resync_jobs_total",
    "rostersync_resync_job_duration_seconds",
    "rostersync_http_request_duration_seconds",
    "rostersync_http_responses_total",
    "rostersync_config_reloads_total",
    "rostersync_info",
)

_START = "rostersync_started"  # request.extensions key: perf_counter() when the request left
HealthFn = Callable[[], tuple[bool, dict[str, Any]]]


class _QueueCollector(Collector):
    """Queue depth by state, read from the database at scrape time (so it is never stale)."""

    def __init__(self, depth: Callable[[], Mapping[str, int]]) -> None:
        self._depth = depth

    def collect(self) -> Iterable[Metric]:
        try:
            depth = self._depth()
        except Exception as exc:  # a scrape must not fail because the database is down
            structlog.get_logger().warning("metrics_queue_depth_failed", error=str(exc))
            return []
        family = GaugeMetricFamily(
            "rostersync_resync_queue_jobs", "Resync jobs in the queue by state", labels=["state"]
        )
        for state, n in sorted(depth.items()):
            family.add_metric([state], n)
        return [family]


class Metrics:
    """The daemon's metrics; ``queue_depth`` is called on every scrape."""

    def __init__(
        self, queue_depth: Callable[[], Mapping[str, int]] | None = None, *, instance: str = ""
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs = Counter(
            "rostersync_sync_runs",
            "Finished sync runs by source and status",
            ["source", "status"],
            registry=r,
        )
        self.last_success = Gauge(
            "rostersync_sync_last_success_timestamp_seconds",
            "Unix time of the last successful sync run per source",
            ["source"],
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
        info = Gauge(
            "rostersync_info",
            "Version and instance of this daemon",
            ["version", "instance"],
            registry=r,
        )
        info.labels(__version__, instance).set(1)
        if queue_depth is not None:
            r.register(_QueueCollector(queue_depth))

    # -- recording ---------------------------------------------------------------------------

    def record_run(
        self, source: str, status: str, seconds: float, finished_at: float | None = None
    ) -> None:
        self.runs.labels(source, status).inc()
        self.sync_duration.labels(source).observe(seconds)
        if status in ("succeeded", "succeeded_with_errors"):
            self.last_success.labels(source).set(
                finished_at if finished_at is not None else time.time()
            )

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
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP, in a thread so a stuck event loop shows up as
    an unhealthy answer rather than no answer."""

    def __init__(self, listen: str, metrics: Metrics, health: HealthFn) -> None:
        host, _, port = listen.rpartition(":")
        self.metrics = metrics
        self.health = health
        handler = type("_BoundHandler", (_Handler,), {"owner": self})
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


class _Handler(BaseHTTPRequestHandler):
    owner: MetricsServer
    server_version = "rostersync"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the log

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, self.owner.metrics.render(), CONTENT_TYPE_LATEST)
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

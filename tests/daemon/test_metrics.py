"""Prometheus conventions of /metrics, the store-backed series, and the shipped dashboard and
alert rules checked against the names a live daemon exports."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from rostersync.config.schedule import Schedule
from rostersync.daemon.metrics import (
    METRIC_NAMES,
    Metrics,
    StoreState,
    read_store_state,
    schedule_period,
)
from rostersync.source.testdata import small_roster
from rostersync.store.db import Store, utcnow
from rostersync.store.tables import source_state, sync_run
from tests.daemon.conftest import (
    REPO,
    DaemonProcess,
    NotifySocket,
    base_config,
    cli,
    free_port,
    sqlite_url,
    wait_until,
    write_config,
)
from tests.fakes.oneroster_server import FakeOneRoster

RULES = REPO / "deploy" / "rostersync.rules.yml"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"

_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords and labels left out)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = _LABEL_LISTS.sub(" ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if m.start() > 0 and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] == "$"):
            continue  # a number's exponent or unit, or a Grafana variable
        if expr[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group(0) not in _PROMQL_WORDS:
            names.add(m.group(0))
    return names


def exported_names(exposition: str) -> set[str]:
    """Every family and series name a scrape offers, including families without samples yet."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum", ""),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def rules_expressions() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {rule["alert"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}


def dashboard_expressions() -> dict[str, str]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = {}
    for panel in doc["panels"]:
        for target in panel["targets"]:
            exprs[f"{panel['title']} {target['refId']}"] = target["expr"]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            # label_values(METRIC, LABEL): the metric is the first argument
            metric = var["definition"].removeprefix("label_values(").split(",")[0]
            exprs[f"variable {var['name']}"] = metric
    return exprs


def _get(url: str, **headers: str) -> tuple[dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - loopback test server
    with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
        return dict(resp.headers.items()), resp.read()


@pytest.fixture
def live_scrape(
    tmp_path: Path, notify_socket: NotifySocket, daemons: Callable[..., DaemonProcess]
) -> Iterator[tuple[str, str]]:
    """A daemon that synced its scheduled source and processed the jobs, after a CLI run of
    an unscheduled source: (its /metrics URL, one scrape in the text format)."""
    port = free_port()
    with FakeOneRoster(small_roster(), version="1.2") as srv:
        cfg = base_config(sqlite_url(tmp_path), metrics={"listen": f"127.0.0.1:{port}"})
        cfg["sources"]["sample"].pop("schedule")  # synced by hand, below
        cfg["sources"]["district"] = srv.source_config(schedule={"interval": "1h", "jitter": 0})
        config = write_config(tmp_path / "rostersync.yaml", cfg)
        d = daemons(config, notify_socket)
        notify_socket.wait_for("READY", "1")
        d.wait_event("scheduled_sync_done", source="district")
        done = cli(config, "sync", "--source", "sample")
        assert done.returncode == 0, done.stderr
        url = f"http://127.0.0.1:{port}/metrics"

        def scraped() -> str | None:
            text = _get(url)[1].decode()
            jobs_done = "rostersync_resync_jobs_total{" in text
            queue_empty = 'rostersync_resync_queue_jobs{state="queued"} 0.0' in text
            return text if jobs_done and queue_empty else None

        yield url, wait_until(scraped, 20, "the resync jobs done in /metrics")


@pytest.mark.slow
def test_a_live_daemon_follows_the_client_library_conventions(
    live_scrape: tuple[str, str],
) -> None:
    """No *_created series, process and platform collectors on, queue depth for live states
    only, last success of a CLI run read from the store, OpenMetrics and gzip on request."""
    url, text = live_scrape
    assert "_created" not in text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert f"\n{name}" in text, name
    states = set(re.findall(r'rostersync_resync_queue_jobs\{state="(\w+)"\}', text))
    assert states == {"queued", "running"}
    # The CLI synced "sample" (the daemon never did): its success comes from the store.
    assert 'rostersync_sync_last_success_timestamp_seconds{source="sample"}' in text
    assert 'rostersync_sync_runs_total{source="sample"' not in text
    assert 'rostersync_source_schedule_period_seconds{source="district"} 3600.0' in text
    assert 'rostersync_source_schedule_period_seconds{source="sample"}' not in text
    assert 'rostersync_sync_held_runs{source="sample"} 0.0' in text

    headers, body = _get(url, Accept="application/openmetrics-text; version=1.0.0")
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")
    assert b"_created" not in body

    headers, body = _get(url, **{"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"
    assert b"rostersync_info" in gzip.decompress(body)
    headers, body = _get(url)
    assert "Content-Encoding" not in headers and body.startswith(b"# HELP")


@pytest.mark.slow
def test_alert_rules_and_dashboard_name_only_metrics_the_daemon_exports(
    live_scrape: tuple[str, str],
) -> None:
    """Every metric an alert rule or a dashboard query reads is in a live daemon's scrape."""
    exported = exported_names(live_scrape[1])
    assert set(METRIC_NAMES) <= exported
    for what, exprs in (("rule", rules_expressions()), ("dashboard", dashboard_expressions())):
        for title, expr in exprs.items():
            names = promql_metric_names(expr)
            assert names, f"{what} {title}: no metric found in {expr!r}"
            assert names <= exported, f"{what} {title}: not exported: {names - exported}"


def test_the_rules_file_has_the_promised_alerts_with_summaries() -> None:
    """Alerts for a source without success, a held run, a failed run and a failed job."""
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    by_name = {rule["alert"]: rule for rule in rules}
    assert {
        "RostersyncSourceNotSyncing",
        "RostersyncRunHeld",
        "RostersyncRunFailed",
        "RostersyncResyncJobFailed",
    } <= set(by_name)
    for rule in rules:
        assert rule["labels"]["severity"] and rule["annotations"]["summary"], rule["alert"]
    assert (
        "rostersync_source_schedule_period_seconds" in by_name["RostersyncSourceNotSyncing"]["expr"]
    )
    assert "rostersync_sync_held_runs" in by_name["RostersyncRunHeld"]["expr"]


def test_the_dashboard_covers_runs_durations_queue_http_and_held_runs() -> None:
    """The Grafana dashboard has a panel for each of the things an operator watches."""
    names = set().union(*(promql_metric_names(e) for e in dashboard_expressions().values()))
    for name in (
        "rostersync_sync_runs_total",
        "rostersync_sync_duration_seconds_bucket",
        "rostersync_resync_queue_jobs",
        "rostersync_http_responses_total",
        "rostersync_sync_held_runs",
    ):
        assert name in names, name


def test_promql_names_leave_out_functions_labels_and_ranges() -> None:
    """The name extractor the two tests above rely on."""
    expr = (
        'histogram_quantile(0.95, sum by (le, source) (rate(x_bucket{job=~"$job"}[$__rate_interval])))'
        " > on (instance) group_left () (time() - y) unless z offset 5m or 2e3 * w"
    )
    assert promql_metric_names(expr) == {"x_bucket", "y", "z", "w"}


def _run(conn: Any, source: str, status: str, *, dry_run: bool = False) -> None:
    conn.execute(
        insert(sync_run).values(
            source=source,
            mode="full",
            status=status,
            dry_run=dry_run,
            counts={},
            fetched={},
            warnings=[],
        )
    )


def test_held_runs_count_until_a_later_real_run_succeeds(sqlite_store: Store) -> None:
    """A held run counts until a later real run of its source succeeds; held dry runs never."""
    with sqlite_store.write() as conn:
        _run(conn, "a", "held")
        _run(conn, "a", "held", dry_run=True)
        _run(conn, "b", "held")
        _run(conn, "b", "succeeded", dry_run=True)  # a dry run overtakes nothing
        _run(conn, "c", "held")
        _run(conn, "c", "succeeded_with_errors")
        _run(conn, "c", "held")
    with sqlite_store.read() as conn:
        state = read_store_state(conn, ["a", "b", "c", "d"])
    assert state.held == {"a": 1, "b": 1, "c": 1, "d": 0}


def test_the_store_state_has_live_queue_states_and_every_last_success(
    sqlite_store: Store,
) -> None:
    """Finished jobs are not queue depth; every source's last success is read, CLI runs too."""
    when = utcnow() - timedelta(minutes=5)
    with sqlite_store.write() as conn:
        conn.execute(insert(source_state).values(source="a", last_counts={}, last_success_at=when))
        conn.execute(insert(source_state).values(source="b", last_counts={}))
    with sqlite_store.read() as conn:
        state = read_store_state(conn, [], {"a": Schedule(interval=timedelta(hours=6))})
    assert state.last_success == {"a": pytest.approx(when.timestamp())}
    assert state.queue == {"queued": 0, "running": 0}
    assert state.schedule_period == {"a": 6 * 3600}


def test_a_weekday_cron_allows_the_weekend_gap() -> None:
    """A cron schedule's period is the longest gap between its next runs."""
    # Friday to Monday (an hour either way if a clock change falls in between).
    assert abs(schedule_period(Schedule(cron="0 2 * * 1-5")) - 3 * 86400) <= 3600
    assert schedule_period(Schedule(cron="*/15 * * * *")) == 900
    assert schedule_period(Schedule(interval=timedelta(hours=6))) == 6 * 3600


def test_the_store_collector_exports_what_it_read() -> None:
    """Each field of the store state becomes its series; a failing read drops them, not the scrape."""
    state = StoreState({"queued": 3, "running": 1}, {"a": 1700000000.0}, {"a": 2}, {"a": 60.0})
    text = Metrics(lambda: state).render().decode()
    assert 'rostersync_resync_queue_jobs{state="queued"} 3.0' in text
    assert 'rostersync_sync_last_success_timestamp_seconds{source="a"} 1.7e+09' in text
    assert 'rostersync_sync_held_runs{source="a"} 2.0' in text
    assert 'rostersync_source_schedule_period_seconds{source="a"} 60.0' in text

    def broken() -> StoreState:
        raise RuntimeError("database is down")

    text = Metrics(broken).render().decode()
    assert "rostersync_resync_queue_jobs" not in text and "rostersync_info{" in text


def test_the_info_metric_names_the_daemon_without_taking_prometheus_instance_label() -> None:
    """`instance` is the label Prometheus gives every scraped series (the target); the
    daemon's own id goes in `instance_id`."""
    text = Metrics(instance="host-a:42").render().decode()
    [line] = [x for x in text.splitlines() if x.startswith("rostersync_info{")]
    assert 'instance_id="host-a:42"' in line
    assert "instance=" not in line.replace("instance_id=", "")


def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    """`promtool check rules` passes, and the alerts fire (and stay quiet) as
    tests/daemon/alert_rules_test.yml expects: a stale and a never-synced source, a held run
    until it is approved, a job failed for good."""
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (apt install prometheus); the names test still runs")
    for args in (
        ["check", "rules", str(RULES)],
        ["test", "rules", str(Path(__file__).with_name("alert_rules_test.yml"))],
    ):
        done = subprocess.run(
            [tool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_metric_is_documented() -> None:
    """docs/operations.md lists each metric an operator's dashboards and alerts rely on."""
    doc = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    assert [name for name in METRIC_NAMES if f"`{name}`" not in doc] == []


def test_registering_the_database_series_reads_nothing_until_a_scrape() -> None:
    """The daemon builds its metrics before its schedules: registering the series read from
    the database must not read it (it logged metrics_store_read_failed at every start)."""
    calls: list[int] = []

    def read() -> StoreState:
        calls.append(1)
        return StoreState(queue={"queued": 2})

    metrics = Metrics(read)
    assert calls == []
    text = metrics.render().decode()
    assert calls == [1]
    assert 'rostersync_resync_queue_jobs{state="queued"} 2.0' in text


def test_a_daemon_starts_without_a_metrics_warning(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from rostersync.config.loader import load_settings
    from rostersync.daemon.service import Daemon
    from tests.daemon.conftest import base_config, write_config

    config = write_config(
        tmp_path / "rostersync.yaml", base_config(f"sqlite:///{tmp_path / 'rs.db'}")
    )
    settings = load_settings(config)
    store = Store(settings.database)
    store.ensure_schema()
    with capture_logs() as logs:
        daemon = Daemon(settings, store, config_file=config)
    assert daemon.metrics.render()
    assert [e for e in logs if e["event"] == "metrics_store_read_failed"] == []
    store.dispose()


def test_a_metrics_port_another_process_holds_stops_the_start_saying_what_to_do(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """`metrics.listen` on a port another process listens on: the daemon exits 1 and its
    `metrics_listen_failed` line says what to do, not only errno 98."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = base_config(sqlite_url(tmp_path), metrics={"listen": f"127.0.0.1:{port}"})
        d = daemons(write_config(tmp_path / "rostersync.yaml", cfg), None)
        assert d.wait_exit(30) == 1
    failed = [e for e in d.events() if e["event"] == "metrics_listen_failed"]
    assert [e["hint"] for e in failed] == [
        "another process listens there (a second daemon on this host?): stop it, or give this "
        "daemon another metrics.listen"
    ]

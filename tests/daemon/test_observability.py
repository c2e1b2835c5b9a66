"""Metrics, health and logs of real processes: Prometheus names, /healthz, no secret in any output."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from rostersync.daemon.metrics import METRIC_NAMES
from rostersync.source.testdata import small_roster
from tests.daemon.conftest import (
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

pytestmark = pytest.mark.slow

CLIENT_SECRET = "cs-7f3a9d2e41b8c6f0-super-secret"
SMTP_PASSWORD = "smtp-pw-5e8d1c2b9a7f"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback test server
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metrics_and_healthz_are_served_with_every_metric_name(
    tmp_path: Path, notify_socket: NotifySocket, daemons: Callable[..., DaemonProcess]
) -> None:
    """/metrics lists runs, last success, queue depth, job and HTTP durations, HTTP statuses; /healthz says ok."""
    port = free_port()
    with FakeOneRoster(small_roster(), version="1.2", client_secret=CLIENT_SECRET) as srv:
        cfg = base_config(sqlite_url(tmp_path), metrics={"listen": f"127.0.0.1:{port}"})
        cfg["sources"] = {"district": srv.source_config(schedule={"interval": "1h", "jitter": 0})}
        config = write_config(tmp_path / "rostersync.yaml", cfg)
        d = daemons(config, notify_socket)
        notify_socket.wait_for("READY", "1")
        d.wait_event("scheduled_sync_done", source="district")

        def scraped() -> str | None:
            status, body = _get(f"http://127.0.0.1:{port}/metrics")
            text = body.decode()
            return text if status == 200 and "rostersync_resync_jobs_total{" in text else None

        text = wait_until(scraped, 10, "resync jobs in /metrics")
        for name in METRIC_NAMES:
            assert f"# TYPE {name.removesuffix('_total')}" in text, name
        assert 'rostersync_sync_runs_total{source="district",status="succeeded"} 1.0' in text
        assert 'rostersync_http_responses_total{host="127.0.0.1",status="200"}' in text
        assert (
            'rostersync_http_request_duration_seconds_count{host="127.0.0.1",method="GET"}' in text
        )
        assert 'rostersync_resync_queue_jobs{state="queued"}' in text
        assert 'rostersync_resync_queue_jobs{state="succeeded"}' not in text  # a counter's job

        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        health = json.loads(body)
        assert status == 200
        assert health["status"] == "ok" and health["scheduler"] and health["database"]
        assert health["sources"]["district"]["status"] == "succeeded"
        assert _get(f"http://127.0.0.1:{port}/nope")[0] == 404

        d.signal(signal.SIGTERM)
        assert d.wait_exit(10) == 0
        assert CLIENT_SECRET not in d.log_text()


def test_no_secret_reaches_the_output_of_a_full_sync(tmp_path: Path) -> None:
    """A debug-level sync with an OAuth2 client secret, bearer tokens and an SMTP password never prints any of them."""
    with FakeOneRoster(small_roster(), version="1.2", client_secret=CLIENT_SECRET) as srv:
        cfg = base_config(sqlite_url(tmp_path))
        cfg["logging"] = {"level": "debug", "format": "json"}
        cfg["smtp"] = {
            "host": "127.0.0.1",
            "port": 2525,
            "from": "rs@example.org",
            "username": "rs",
            "password": SMTP_PASSWORD,
        }
        cfg["sources"] = {
            "district": srv.source_config(),
            # A wrong secret for the same client: the 401 path and its error message.
            "broken": srv.source_config(
                auth={**srv.auth_config(), "client_secret": CLIENT_SECRET + "-wrong"}
            ),
        }
        config = write_config(tmp_path / "rostersync.yaml", cfg)
        done = cli(config, "sync", "--json")
        with srv._lock:
            tokens = list(srv._tokens)
    assert done.returncode == 1  # the broken source failed
    runs = {r["source"]: r for r in json.loads(done.stdout)["runs"]}
    assert runs["district"]["status"] == "succeeded"
    assert runs["broken"]["status"] == "failed"
    assert tokens, "the fake server issued no token: the sync did not authenticate"
    output = done.stdout + done.stderr
    for secret in (CLIENT_SECRET, SMTP_PASSWORD, *tokens):
        assert secret not in output
    assert "sync_started" in done.stderr  # the logs were there to leak from

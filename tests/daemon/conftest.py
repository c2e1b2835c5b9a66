"""Real daemon processes for the daemon tests: configs in tmp_path, a test NOTIFY_SOCKET, and
helpers that wait with a deadline (every wait is bounded; every process is killed in the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rostersync.store.db import Store
from tests.conftest import PG_BASE, postgres_unavailable

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "config" / "sample-district"
SAMPLE_TEACHERS = 43  # eligible teachers with an email in the bundled sample district


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def base_config(database: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "organization": "Springfield Public Schools",
        "database": database,
        "roles": ["Teacher"],
        "sites": ["North High", "South Middle", "East Elementary"],
        "provisioning": {"default_role": "Teacher", "default_site": "North High"},
        "resync": {"workers": 2, "lease": "3s", "backoff": "1s", "max_attempts": 3},
        "logging": {"level": "info", "format": "json"},
        "sources": {
            "sample": {
                "type": "oneroster_csv",
                "path": str(SAMPLE),
                "schedule": {"interval": "2s", "jitter": 0},
            }
        },
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data.decode())

    def fields(self) -> list[dict[str, str]]:
        with self._lock:
            msgs = list(self.messages)
        return [dict(line.split("=", 1) for line in m.splitlines() if "=" in line) for m in msgs]

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = 15.0, after: int = 0
    ) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            for f in self.fields()[after:]:
                if key in f and (value is None or f[key] == value):
                    return f
            return None

        result: dict[str, str] = wait_until(
            found, timeout, f"{key}={value or '*'} on NOTIFY_SOCKET"
        )
        return result

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=2)


class DaemonProcess:
    """``python -m rostersync --config CONFIG run`` with stderr captured to a file."""

    def __init__(
        self,
        config: Path,
        notify: NotifySocket | None,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.stderr_path = config.with_name(f"daemon-{uuid.uuid4().hex[:6]}.log")
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        if notify is not None:
            full_env["NOTIFY_SOCKET"] = str(notify.path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rostersync", "--config", str(config), "run", *extra],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=full_env,
            cwd=REPO,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_event(self, event: str, timeout: float = 15.0, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for e in self.events():
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                    return e
            if self.proc.poll() is not None:
                pytest.fail(
                    f"daemon exited ({self.proc.returncode}) before {event!r}:\n{self.log_text()[-3000:]}"
                )
            return None

        result: dict[str, Any] = wait_until(found, timeout, f"log event {event!r} {match or ''}")
        return result

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon did not exit within {timeout}s:\n{self.log_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
        self._stderr.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    # AF_UNIX paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    short = Path("/tmp") / f"rs-notify-{uuid.uuid4().hex[:10]}.sock"
    ns = NotifySocket(short)
    yield ns
    ns.close()
    with contextlib.suppress(FileNotFoundError):
        short.unlink()


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons; all of them are killed when the test ends, whatever happened."""
    started: list[DaemonProcess] = []

    def start(
        config: Path, notify: NotifySocket | None = None, *extra: str, **kw: Any
    ) -> DaemonProcess:
        d = DaemonProcess(config, notify, *extra, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def cli(config: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rostersync", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A database URL on a fresh PostgreSQL schema (dropped afterwards); skips without a server."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    import psycopg

    schema = f"rs_{uuid.uuid4().hex[:12]}"
    dsn = PG_BASE.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    """A store on ``pg_url``, disposed before the schema is dropped."""
    store = Store(pg_url)
    yield store
    store.dispose()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'rostersync.db'}"


def open_store(url: str) -> Store:
    return Store(url)

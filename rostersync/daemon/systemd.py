"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET`` per message.

systemd (``Type=notify``) learns readiness (``READY=1``), a one-line status (``STATUS=``),
reloads (``RELOADING=1``), shutdown (``STOPPING=1``) and watchdog keep-alives (``WATCHDOG=1``)
this way. Outside systemd ``$NOTIFY_SOCKET`` is unset and every call is a no-op, so the daemon
never needs to know how it was started.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """Sends sd_notify messages; silent when there is no ``$NOTIFY_SOCKET``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is the abstract namespace: the leading NUL is how the kernel spells it.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines as one message; False if it could not be delivered."""
        if not self.address:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError:
            # systemd gone or the socket full: the daemon's work matters more than telling it.
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *(_status(status) if status else ()))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (253+) match READY=1 to this reload; older ones ignore it.
        return self.send(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _status(text: str) -> tuple[str]:
    # STATUS is one line; a newline would start a bogus field.
    return ("STATUS=" + " ".join(text.split()),)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between keep-alives (half of ``WATCHDOG_USEC``), None without a watchdog."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # the watchdog is meant for another process (e.g. our parent)
    return int(usec) / 1_000_000 / 2

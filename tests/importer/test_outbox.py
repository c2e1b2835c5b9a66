"""The outbox mailer against a real SMTP server (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import text
from structlog.testing import capture_logs

from rostersync.config.models import Settings, SmtpSettings
from rostersync.importer import run_import, send_outbox
from rostersync.store.db import Store
from tests.importer.conftest import sheet


class Recorder:
    """Accepts mail, except that it answers the first `fail_first` DATA commands with `code`."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.fail_first = 0
        self.code = "451 4.3.0 try again later"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.fail_first > 0:
            self.fail_first -= 1
            return self.code
        self.messages.append(envelope)
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp_server() -> Iterator[tuple[Recorder, int]]:
    handler = Recorder()
    port = _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def _smtp(port: int, **extra: Any) -> SmtpSettings:
    return SmtpSettings.model_validate(
        {"host": "127.0.0.1", "port": port, "from": "rostersync@example.org", **extra}
    )


def _queue(store: Store, settings: Settings, *emails: str) -> None:
    rows = "".join(f"{e},Name {i},TRUE\n" for i, e in enumerate(emails))
    run_import(store, settings, sheet("Email,Display Name,SendVerification\n" + rows))


def _outbox(store: Store) -> list[tuple[Any, ...]]:
    with store.read() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text(
                    "SELECT to_addr, state, attempts, last_error, sent_at FROM outbox_email ORDER BY id"
                )
            )
        ]


def test_queued_verification_is_sent_and_recorded(
    store: Store, settings: Settings, smtp_server: tuple[Recorder, int]
) -> None:
    """Each queued verification goes out once, addressed to the user, and is recorded sent."""
    handler, port = smtp_server
    _queue(store, settings, "ada@example.org", "bob@example.org")
    result = send_outbox(store, _smtp(port))
    assert (result.sent, result.failed, result.deferred) == (2, 0, 0)
    assert sorted(m.rcpt_tos[0] for m in handler.messages) == ["ada@example.org", "bob@example.org"]
    body = handler.messages[0].content.decode()
    assert "Subject: Verify your Springfield Public Schools console account" in body
    rows = _outbox(store)
    assert [(r[1], r[2]) for r in rows] == [("sent", 1), ("sent", 1)]
    assert all(r[4] is not None for r in rows)
    assert send_outbox(store, _smtp(port)).sent == 0  # nothing is sent twice


def test_a_transient_failure_is_retried_at_once(
    sqlite_store: Store, settings: Settings, smtp_server: tuple[Recorder, int]
) -> None:
    """A 451 reply is retried within the same call and the message is sent on the second try."""
    handler, port = smtp_server
    handler.fail_first = 1
    _queue(sqlite_store, settings, "ada@example.org")
    result = send_outbox(sqlite_store, _smtp(port), retry_delay=0)
    assert result.sent == 1
    assert len(handler.messages) == 1
    assert _outbox(sqlite_store)[0][1:3] == ("sent", 2)


def test_a_deferred_message_is_sent_by_a_later_call(
    sqlite_store: Store, settings: Settings, smtp_server: tuple[Recorder, int]
) -> None:
    """With no retry left in a call, the message stays queued with its error; the next call sends it."""
    handler, port = smtp_server
    handler.fail_first = 1
    _queue(sqlite_store, settings, "ada@example.org")
    first = send_outbox(sqlite_store, _smtp(port), tries_per_call=1)
    assert (first.sent, first.deferred) == (0, 1)
    _to, state, attempts, error, _sent = _outbox(sqlite_store)[0]
    assert (state, attempts) == ("queued", 1) and "451" in error
    assert send_outbox(sqlite_store, _smtp(port), tries_per_call=1).sent == 1
    assert _outbox(sqlite_store)[0][1:3] == ("sent", 2)


def test_a_permanent_failure_is_not_retried(
    sqlite_store: Store, settings: Settings, smtp_server: tuple[Recorder, int]
) -> None:
    """A 5xx reply marks the message failed at once, with the server's reason."""
    handler, port = smtp_server
    handler.fail_first = 5
    handler.code = "550 5.1.1 mailbox unavailable"
    _queue(sqlite_store, settings, "ada@example.org")
    result = send_outbox(sqlite_store, _smtp(port), retry_delay=0)
    assert (result.sent, result.failed) == (0, 1)
    _to, state, attempts, error, _sent = _outbox(sqlite_store)[0]
    assert (state, attempts) == ("failed", 1) and "550" in error


def test_an_unreachable_server_gives_up_after_max_attempts(
    sqlite_store: Store, settings: Settings
) -> None:
    """Connection refused is transient until max_attempts, then the message is failed."""
    _queue(sqlite_store, settings, "ada@example.org")
    smtp = _smtp(_free_port())
    assert send_outbox(sqlite_store, smtp, retry_delay=0, max_attempts=3).deferred == 1
    assert send_outbox(sqlite_store, smtp, retry_delay=0, max_attempts=3).failed == 1
    assert _outbox(sqlite_store)[0][1:3] == ("failed", 3)


def test_the_smtp_password_never_reaches_logs_or_errors(
    sqlite_store: Store, settings: Settings, smtp_server: tuple[Recorder, int]
) -> None:
    """A failed login (the server offers no AUTH) is logged and recorded without the password."""
    _handler, port = smtp_server
    _queue(sqlite_store, settings, "ada@example.org")
    smtp = _smtp(port, username="mailer", password="s3cret-passw0rd")
    with capture_logs() as logs:
        result = send_outbox(sqlite_store, smtp, retry_delay=0, tries_per_call=1)
    assert result.sent == 0 and logs
    assert "s3cret-passw0rd" not in repr(logs)
    assert "s3cret-passw0rd" not in repr(_outbox(sqlite_store)) + repr(result.errors)

"""The verification-email outbox: queued inside the import's transaction, sent later over SMTP.

Queuing in the same transaction as the user means a rolled-back import queues nothing, and the
``UNIQUE(user_id, kind)`` constraint means no user is ever queued a second verification.

:func:`send_outbox` is what the daemon calls periodically (and ``rostersync outbox send``).
It never holds a database transaction open across the network: it reads due messages, claims
each one with a compare-and-set on ``attempts`` (so two daemons never both send it), sends,
and records the outcome. Transient SMTP failures (connection trouble, 4xx replies) are retried
a few times at once and then on later calls until ``max_attempts``; permanent ones (5xx)
mark the message ``failed`` at once.
"""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import structlog
from sqlalchemy import Connection, text, update

from rostersync.config.models import SmtpSettings
from rostersync.logs import scrub
from rostersync.store.db import Store, dialect_insert, utcnow
from rostersync.store.tables import outbox_email

VERIFICATION = "verification"

SmtpFactory = Callable[..., smtplib.SMTP]


def verification_message(email: str, display_name: str, organization: str) -> tuple[str, str]:
    subject = f"Verify your {organization} console account"
    body = (
        f"Hello {display_name},\n\n"
        f"An account for {email} was created on the {organization} console.\n"
        "Sign in with this email address to verify it and set your password.\n\n"
        "If you did not expect this message, you can ignore it.\n"
    )
    return subject, body


def queue_verification(
    conn: Connection, user_id: int, email: str, display_name: str, organization: str
) -> bool:
    """Queue one verification email for this user; False if one was ever queued before."""
    subject, body = verification_message(email, display_name, organization)
    stmt = (
        dialect_insert(conn.dialect.name)(outbox_email)
        .values(
            user_id=user_id,
            kind=VERIFICATION,
            to_addr=email,
            subject=subject,
            body=body,
            state="queued",
            attempts=0,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["user_id", "kind"])
    )
    return bool(conn.execute(stmt).rowcount)


@dataclass
class SendResult:
    sent: int = 0
    failed: int = 0  # given up for good in this call
    deferred: int = 0  # still queued, to be retried by a later call
    errors: list[str] = field(default_factory=list)


class _Transient(Exception):
    pass


class _Permanent(Exception):
    pass


def _classify(exc: Exception) -> Exception:
    """Sort an SMTP failure: 5xx replies will not get better by retrying; everything else might."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _msg in exc.recipients.values()]
        msg = f"recipient refused ({', '.join(str(c) for c in codes)})"
        return _Permanent(msg) if all(c >= 500 for c in codes) else _Transient(msg)
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return _Permanent(f"SMTP authentication failed ({exc.smtp_code})")
    if isinstance(exc, smtplib.SMTPResponseException):
        detail = (
            exc.smtp_error.decode("utf-8", "replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        msg = f"SMTP {exc.smtp_code}: {detail}"
        return _Permanent(msg) if exc.smtp_code >= 500 else _Transient(msg)
    return _Transient(f"{type(exc).__name__}: {exc}")


class _Connection:
    """One SMTP session, opened on first use and reopened after a failure."""

    def __init__(self, smtp: SmtpSettings, factory: SmtpFactory, timeout: float) -> None:
        self.smtp = smtp
        self.factory = factory
        self.timeout = timeout
        self.client: smtplib.SMTP | None = None

    def _open(self) -> smtplib.SMTP:
        client = self.factory(self.smtp.host, self.smtp.port, timeout=self.timeout)
        try:
            client.ehlo()
            if self.smtp.starttls:
                client.starttls(context=ssl.create_default_context())
                client.ehlo()
            if self.smtp.username:
                password = self.smtp.password.get_secret_value() if self.smtp.password else ""
                client.login(self.smtp.username, password)
        except BaseException:
            self._close(client)
            raise
        return client

    @staticmethod
    def _close(client: smtplib.SMTP) -> None:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()

    def send(self, message: EmailMessage) -> None:
        if self.client is None:
            self.client = self._open()
        try:
            self.client.send_message(message)
        except (smtplib.SMTPServerDisconnected, OSError):
            self.reset()
            raise
        except smtplib.SMTPException:
            # The session may be mid-transaction; RSET keeps it usable for the next message.
            try:
                self.client.rset()
            except (smtplib.SMTPException, OSError):
                self.reset()
            raise

    def reset(self) -> None:
        if self.client is not None:
            self._close(self.client)
            self.client = None


def send_outbox(
    store: Store,
    smtp: SmtpSettings,
    *,
    limit: int = 200,
    max_attempts: int = 5,
    tries_per_call: int = 2,
    retry_delay: float = 1.0,
    timeout: float = 30.0,
    smtp_factory: SmtpFactory = smtplib.SMTP,
) -> SendResult:
    """Send queued emails; record each one ``sent`` or (after ``max_attempts``) ``failed``."""
    log = structlog.get_logger().bind(smtp_host=smtp.host, smtp_port=smtp.port)
    result = SendResult()
    with store.read() as conn:
        due = conn.execute(
            text(
                "SELECT id, to_addr, subject, body, attempts FROM outbox_email "
                "WHERE state = 'queued' ORDER BY id LIMIT :n"
            ),
            {"n": limit},
        ).all()
    session = _Connection(smtp, smtp_factory, timeout)
    try:
        for msg_id, to_addr, subject, body, attempts in due:
            message = EmailMessage()
            message["From"] = smtp.from_
            message["To"] = to_addr
            message["Subject"] = subject
            message.set_content(body)
            error: Exception | None = None
            for try_no in range(tries_per_call):
                if not _claim(store, msg_id, attempts):
                    error = None
                    break  # another instance took it
                attempts += 1
                try:
                    session.send(message)
                except Exception as exc:
                    error = _classify(exc)
                    log.warning(
                        "outbox_send_failed",
                        email_id=msg_id,
                        attempt=attempts,
                        error=scrub(str(error)),
                    )
                    if isinstance(error, _Permanent) or attempts >= max_attempts:
                        break
                    if try_no + 1 < tries_per_call:
                        time.sleep(retry_delay)
                    continue
                _record(store, msg_id, "sent", None)
                result.sent += 1
                log.info("outbox_sent", email_id=msg_id, attempt=attempts)
                error = None
                break
            if error is None:
                continue
            reason = scrub(str(error))[:2000]
            result.errors.append(f"{to_addr}: {reason}")
            if isinstance(error, _Permanent) or attempts >= max_attempts:
                _record(store, msg_id, "failed", reason)
                result.failed += 1
            else:
                _record(store, msg_id, "queued", reason)
                result.deferred += 1
    finally:
        session.reset()
    return result


def _claim(store: Store, msg_id: int, seen_attempts: int) -> bool:
    with store.write() as conn:
        res = conn.execute(
            text(
                "UPDATE outbox_email SET attempts = attempts + 1 "
                "WHERE id = :id AND state = 'queued' AND attempts = :a"
            ),
            {"id": msg_id, "a": seen_attempts},
        )
        return bool(res.rowcount)


def _record(store: Store, msg_id: int, state: str, error: str | None) -> None:
    values: dict[str, Any] = {"state": state, "last_error": error}
    if state == "sent":
        values["sent_at"] = utcnow()
    with store.write() as conn:
        conn.execute(update(outbox_email).where(outbox_email.c.id == msg_id).values(**values))

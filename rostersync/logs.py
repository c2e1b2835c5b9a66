"""Logging: structlog, JSON lines for journald and shippers, console output on a TTY.

When stderr is the journal (``JOURNAL_STREAM`` names its device and inode, as systemd.exec(5)
documents), every line starts with its syslog priority (``<3>`` error, ``<4>`` warning, ``<6>``
info, ``<7>`` debug), which journald strips and stores, so ``journalctl -p warning`` filters;
the JSON keeps its ``level`` too. A command's own messages to whoever runs it
(:func:`notice`) are plain text on a terminal and JSON log lines elsewhere, so that a pipe
reads nothing but JSON.

One processor, :func:`redact`, runs on every event: values under secret-looking keys are
replaced, and bearer tokens, Authorization headers, OAuth signatures and PEM private keys
are cut out of any string. Secrets known at run time (from the config) are registered with
:func:`register_secret` and scrubbed wherever they appear.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from pydantic import SecretStr

REDACTED = "[redacted]"
_SECRET_KEY = re.compile(
    r"(secret|password|passwd|token|authorization|private_key|api_key|assertion|signature|credential)",
    re.I,
)
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {REDACTED}"),
    (re.compile(r"(?i)(authorization\s*[:=]\s*)\S+"), rf"\1{REDACTED}"),
    (
        re.compile(
            r"(?i)\b(oauth_signature|client_secret|access_token|refresh_token|password|assertion)"
            r"=(\"[^\"]*\"|[^&\s\"',]+)"
        ),
        rf"\1={REDACTED}",
    ),
    (
        re.compile(
            r"(?i)(\"(?:access_token|client_secret|password|private_key|token)\"\s*:\s*\")[^\"]*"
        ),
        rf"\1{REDACTED}",
    ),
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S
        ),
        REDACTED,
    ),
    # The password of a URL's ``user:password@`` (a database URL, a base URL with credentials).
    (re.compile(r"(://[^/:@\s]*):[^/@\s]*@"), r"\1:***@"),
]
_KNOWN: set[str] = set()


def secret_key(name: str) -> bool:
    """Whether a key's name says its value is a secret (``client_secret``, ``password``,
    ``token``, ...): such values are redacted from logs and never shown in messages."""
    return _SECRET_KEY.search(name) is not None


def register_secret(value: str | SecretStr | None) -> None:
    """Scrub this exact value from every log line from now on (min. 6 chars to avoid noise)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value and len(value) >= 6:
        _KNOWN.add(value)


def register_secrets_in(obj: Any) -> None:
    """Walk a pydantic model (the settings) and register every SecretStr in it."""
    if isinstance(obj, SecretStr):
        register_secret(obj)
    elif hasattr(obj, "__pydantic_fields__"):
        for name in type(obj).__pydantic_fields__:
            register_secrets_in(getattr(obj, name, None))
    elif isinstance(obj, dict):
        for v in obj.values():
            register_secrets_in(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            register_secrets_in(v)


def scrub(text: str) -> str:
    for secret in _KNOWN:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {
            k: (REDACTED if _SECRET_KEY.search(str(k)) else _clean(v)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, BaseException):
        return scrub(f"{type(value).__name__}: {value}")
    return value


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key == "exc_info":
            continue  # rendered (and scrubbed) later by format_exc_info + _scrub_rendered
        if key != "event" and _SECRET_KEY.search(key):
            event[key] = REDACTED
        else:
            event[key] = _clean(event[key])
    return event


def _scrub_rendered(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Tracebacks are rendered late (format_exc_info): scrub them too.
    if "exception" in event and isinstance(event["exception"], str):
        event["exception"] = scrub(event["exception"])
    return event


#: syslog priorities (RFC 5424) of structlog's level names, for the journal's line prefix.
SYSLOG_PRIORITY = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
_json_output = False


def is_journal(stream: TextIO | None = None) -> bool:
    """Is ``stream`` (stderr by default) connected to the journal? systemd sets
    ``JOURNAL_STREAM=DEVICE:INODE`` for the stream it connected; a child whose stderr was
    redirected inherits the variable, but its stream no longer matches."""
    device, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # no real file behind it (tests, pipes gone)
        return False


def priority_prefix(level: str) -> str:
    """``<N>`` for a level name (info for one it does not know)."""
    return f"<{SYSLOG_PRIORITY.get(level.lower(), 6)}>"


def _with_priority(render: Any) -> Any:
    """Wrap a renderer so each output line starts with the event's syslog priority."""

    def rendered(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        prefix = priority_prefix(str(event.get("level", name)))
        text = str(render(logger, name, event))
        return "\n".join(prefix + line for line in text.split("\n"))

    return rendered


class LogStream:
    """The stream log lines go to, which cannot make logging fail: a reader of stderr that
    went away (a closed pipe), a terminal hung up or a full disk lose the lines, not the
    program. Every log call would otherwise raise in whatever was logging, the daemon's stop
    handler among them, which then never stopped it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False  # the reader is gone for good: no more writes

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
                self.broken = True
            except OSError:
                pass  # this line is lost; the next may go through (a disk freed)
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                self.broken = True
            except OSError:
                pass

    def isatty(self) -> bool:
        try:
            return not self.broken and self.stream.isatty()
        except (OSError, ValueError):
            return False


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog once per process. ``fmt``: auto (JSON unless stderr is a TTY)."""
    global _json_output
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any
    if use_json:
        processors += [structlog.processors.format_exc_info, _scrub_rendered]
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    processors.append(_with_priority(renderer) if is_journal(out) else renderer)
    _json_output = use_json
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=LogStream(out)),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def renders_json() -> bool:
    """Do log lines go out as JSON (as configured last)?"""
    return structlog.is_configured() and _json_output


def stderr_line(text: str, level: str = "error") -> str:
    """A plain line for stderr, with its syslog priority when stderr is the journal."""
    return priority_prefix(level) + text if is_journal() else text


def notice(event: str, message: str, level: str = "info", **fields: Any) -> None:
    """A command's message to the person running it: ``rostersync: message`` on a terminal
    (or with console logs), else a JSON log line with ``event`` and ``message``. It is the
    command's output, not chatter, so ``logging.level`` does not hold it back."""
    if not renders_json() or sys.stderr.isatty():
        print(stderr_line(f"rostersync: {message}", level), file=sys.stderr, flush=True)
        return
    unfiltered = structlog.wrap_logger(
        None, wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET)
    )
    unfiltered.log(getattr(logging, level.upper()), event, message=message, **fields)


class _ToStructlog(logging.Handler):
    """Hands stdlib log records (APScheduler, asyncio) to structlog, so stderr stays one
    format and the redaction processor sees them too."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            structlog.get_logger().log(record.levelno, message, **fields)
        except Exception:  # logging must never take the process down
            self.handleError(record)


def forward_stdlib(*names: str, level: int = logging.WARNING) -> None:
    """Route these stdlib loggers through structlog (at ``level`` and above)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _ToStructlog) for h in logger.handlers):
            logger.addHandler(_ToStructlog())
        logger.setLevel(level)
        logger.propagate = False

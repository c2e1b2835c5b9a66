"""The ``type: google_classroom`` source keys, and the service-account key they point at.

The service account's JSON key is read and checked when the config is validated, so a wrong
path or a truncated key is a ``config check`` error rather than a failed run at 2 a.m. Error
messages name the key (``service_account_file``, ``private_key``), never its contents.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rostersync.config.source import SourceConfig
from rostersync.config.types import (
    ConfigPath,
    Duration,
    StrictModel,
    config_dir,
    exactly_one_of,
    quoted,
)
from rostersync.source.retry import RetrySettings

CourseState = Literal["ACTIVE", "ARCHIVED", "PROVISIONED", "DECLINED", "SUSPENDED"]

DEFAULT_API_BASE_URL = "https://classroom.googleapis.com"

#: The classroom.v1 discovery document sets no upper bound on ``pageSize`` ("the server may
#: return fewer"); Google's servers cap it themselves and we follow ``nextPageToken`` anyway.
#: 1000 keeps a typo (100000) from being sent as-is.
MAX_PAGE_SIZE = 1000

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_REQUIRED_KEYS = ("client_email", "private_key", "token_uri")


@dataclass(frozen=True, slots=True)
class ServiceAccountKey:
    """The parts of a Google service-account JSON key the JWT bearer grant needs."""

    client_email: str
    token_uri: str
    private_key: SecretStr = field(repr=False)
    client_id: str | None = None  # what the admin enters under domain-wide delegation
    private_key_id: str | None = None


def parse_service_account(text: str, origin: str, *, check_key: bool = True) -> ServiceAccountKey:
    """Parse and check a service-account key; ``origin`` names the config key in errors.

    ``check_key=False`` skips RSA's slow consistency check, for a key already checked once.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # exc.msg/lineno/colno describe the position only; the document is never echoed.
        raise ValueError(
            f"{origin} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{origin} must be a JSON object (a service-account key)")
    kind = data.get("type")
    if kind is not None and kind != "service_account":
        raise ValueError(
            f"{origin} holds a {str(kind)[:40]!r} credential; "
            "a service-account key (type service_account) is needed"
        )
    missing = [k for k in _REQUIRED_KEYS if not isinstance(data.get(k), str) or not data[k]]
    if missing:
        raise ValueError(f"{origin} is missing {', '.join(missing)}")
    # Here, not at the top: loading the plug-in (every command does) needs no cryptography.
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(
            data["private_key"].encode(),
            password=None,
            unsafe_skip_rsa_key_validation=not check_key,
        )
    except (ValueError, TypeError):
        # The library's message may quote the PEM; ours names the key only.
        raise ValueError(f"{origin}: private_key is not a PEM-encoded private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{origin}: private_key must be an RSA key (Google signs with RS256)")
    client_id = data.get("client_id")
    key_id = data.get("private_key_id")
    return ServiceAccountKey(
        client_email=data["client_email"],
        token_uri=data["token_uri"],
        private_key=SecretStr(data["private_key"]),
        client_id=str(client_id) if client_id else None,
        private_key_id=str(key_id) if key_id else None,
    )


def _read_key_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(
            f"cannot read service_account_file {path}: {exc.strerror or type(exc).__name__}"
        ) from None


def _active_only() -> list[CourseState]:
    return ["ACTIVE"]


class QuotaSettings(StrictModel):
    """Client-side limits; Google's defaults are 3,000 queries/min per project, 1,200 per user."""

    per_minute: int = Field(default=3000, ge=1, description="API calls per minute (project)")
    per_user_per_minute: int = Field(
        default=1200, ge=1, description="API calls per minute as the delegated admin"
    )


class GoogleClassroomSourceConfig(SourceConfig):
    """A Google Workspace domain's Classroom courses, read as a delegated admin."""

    # A model-level error would otherwise print its whole input, service-account JSON included.
    model_config = ConfigDict(
        hide_input_in_errors=True,
        json_schema_extra=exactly_one_of("service_account_file", "service_account_json"),
    )

    type: Literal["google_classroom"]
    service_account_file: ConfigPath | None = Field(
        default=None, description="the service account's JSON key file (give this or _json)"
    )
    service_account_json: SecretStr | None = Field(
        default=None, description="the JSON key itself, e.g. ${GOOGLE_SA_JSON}"
    )
    delegated_admin: str = Field(description="the Workspace admin the service account acts as")
    course_states: list[CourseState] = Field(
        default_factory=_active_only,
        min_length=1,
        description="courses to read; always sent, since Google's default has changed before",
    )
    page_size: int = Field(default=100, ge=1, le=MAX_PAGE_SIZE)
    max_concurrency: int = Field(default=4, ge=1, le=64, description="API calls in flight")
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    api_base_url: str = DEFAULT_API_BASE_URL
    token_url: str | None = Field(
        default=None, description="default: the key's token_uri (Google's token endpoint)"
    )
    timeout: Duration = Field(default=timedelta(seconds=30), description="per HTTP request")
    retry: RetrySettings = Field(default_factory=RetrySettings)

    _service_account: ServiceAccountKey | None = PrivateAttr(default=None)

    @field_validator("service_account_file", mode="before")
    @classmethod
    def _credentials_directory(cls, value: Any, info: ValidationInfo) -> Any:
        """A bare name may be a systemd ``LoadCredential=`` file, as for every ``x_file`` key."""
        if value in (None, ""):
            return None
        original = Path(str(value)).expanduser()
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if original.is_absolute() or not creds or (config_dir(info) / original).exists():
            return value
        candidate = Path(creds) / original
        return candidate if candidate.exists() else value

    @field_validator("service_account_file")
    @classmethod
    def _key_file_readable(cls, value: Path | None) -> Path | None:
        # Checked here too (not only below) so the error carries this key's YAML path.
        if value is not None:
            parse_service_account(_read_key_file(value), "service_account_file")
        return value

    @field_validator("service_account_json")
    @classmethod
    def _key_json_valid(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_service_account(value.get_secret_value(), "service_account_json")
        return value

    @field_validator("delegated_admin")
    @classmethod
    def _email(cls, value: str) -> str:
        value = value.strip()
        if not _EMAIL.match(value):
            raise ValueError(f"{quoted(value)} is not an email address")
        return value

    @field_validator("course_states")
    @classmethod
    def _unique_states(cls, value: list[CourseState]) -> list[CourseState]:
        return list(dict.fromkeys(value))

    @field_validator("api_base_url", "token_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"{quoted(value)} is not an http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _load_service_account(self) -> GoogleClassroomSourceConfig:
        if (self.service_account_file is None) == (self.service_account_json is None):
            raise ValueError("give exactly one of service_account_file or service_account_json")
        if self.service_account_file is not None:
            text = _read_key_file(self.service_account_file)
            origin = "service_account_file"
        else:
            assert self.service_account_json is not None
            text = self.service_account_json.get_secret_value()
            origin = "service_account_json"
        # The field validator above has checked this key fully already.
        self._service_account = parse_service_account(text, origin, check_key=False)
        return self

    @property
    def service_account(self) -> ServiceAccountKey:
        assert self._service_account is not None, "validated configs always carry the key"
        return self._service_account

    @property
    def effective_token_url(self) -> str:
        return self.token_url or self.service_account.token_uri

    def http_client_options(self) -> dict[str, Any]:
        return {"timeout": self.timeout.total_seconds()}

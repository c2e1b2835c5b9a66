"""The settings model: every top-level key of rostersync.yaml (see CONTRACT.md)."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rostersync.config.source import SourceConfig
from rostersync.config.types import (
    AlsoAccepts,
    Duration,
    Secret,
    SecretFile,
    StrictModel,
    quoted,
    resolve_secret,
    secret_pair_schema,
)
from rostersync.emails import email_problem, normalize_email

Permission = Literal["import_users"]


class RoleSpec(StrictModel):
    name: str = Field(min_length=1, max_length=256)
    permissions: list[Permission] = Field(default_factory=list)
    scope: Literal["organization", "site"] = "organization"


class Provisioning(StrictModel):
    auto_create_users: bool = True
    default_role: str = Field(description="must be one of `roles`")
    default_site: str | None = Field(default=None, description="must be one of `sites`")
    site_map: dict[str, str] = Field(
        default_factory=dict, description="school sourcedId or school name -> site"
    )
    on_teacher_removed: Literal["archive", "keep"] = "archive"
    teacher_roles: list[str] = Field(
        default_factory=lambda: ["teacher"],
        min_length=1,
        description="person roles that count as teachers (OneRoster 1.2: any of roles[])",
    )
    email_domains: list[str] | None = Field(
        default=None,
        description="optional allow-list: teachers whose email is in another domain are rejected",
    )

    @field_validator("teacher_roles")
    @classmethod
    def _role_names(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for role in v:
            name = role.strip().lower()
            if not name or "," in name:
                raise ValueError(
                    f"teacher role {quoted(role)} must be a non-empty name without commas"
                )
            if name not in out:
                out.append(name)
        return out

    @field_validator("email_domains")
    @classmethod
    def _domains(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("list at least one domain, or leave email_domains out to allow any")
        out: list[str] = []
        for domain in v:
            name = normalize_email(domain).lstrip("@")
            if email_problem(f"x@{name}") is not None:
                raise ValueError(f"{quoted(domain)} is not a mail domain (e.g. springfield.k12.us)")
            if name not in out:
                out.append(name)
        return out


class Safety(StrictModel):
    max_removals: int = Field(default=500, ge=0)
    max_removal_percent: float = Field(default=20.0, ge=0, le=100)
    min_source_ratio: float = Field(default=0.5, ge=0, le=1)
    hold_on_repeats: bool = Field(
        default=True,
        description="hold a full run of a source read at offsets (OneRoster REST) that got a "
        "sourcedId twice and would remove records of that kind: they may only have been skipped",
    )


class ResyncSettings(StrictModel):
    workers: int = Field(default=4, ge=1, le=64)
    max_attempts: int = Field(default=5, ge=1, le=100)
    batch_size: int = Field(default=200, ge=1, le=5000, description="jobs leased per batch")
    lease: Duration = Field(default=timedelta(minutes=5), description="how long a lease lasts")
    backoff: Duration = Field(default=timedelta(seconds=30), description="first retry delay")


class LeaseSettings(StrictModel):
    expire_after: Duration = Field(
        default=timedelta(minutes=2),
        description="a source lease held by a process on another host, or one that cannot be "
        "checked, expires this long after its holder's last heartbeat (it beats every quarter "
        "of it); a dead process on this host loses its leases at once",
    )

    @field_validator("expire_after")
    @classmethod
    def _long_enough(cls, v: timedelta) -> timedelta:
        if v < timedelta(seconds=1):
            raise ValueError("must be at least 1s")
        return v


class ImportSettings(StrictModel):
    max_rows: int = Field(default=2000, ge=1)


class SmtpSettings(StrictModel):
    model_config = ConfigDict(json_schema_extra=secret_pair_schema("password", required=False))

    host: str
    port: int = Field(default=25, ge=1, le=65535)
    starttls: bool = False
    username: str | None = None
    password: Secret | None = None
    password_file: SecretFile | None = None
    from_: str = Field(alias="from")

    @model_validator(mode="before")
    @classmethod
    def _secret(cls, data: Any, info: ValidationInfo) -> Any:
        return resolve_secret(data, "password", info, required=False)


class MetricsSettings(StrictModel):
    listen: str = Field(default="127.0.0.1:9464", description="host:port for /metrics and /healthz")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{quoted(v)} is not host:port")
        return v


class LoggingSettings(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(StrictModel):
    organization: str = Field(min_length=1)
    database: str = Field(
        default="sqlite:///rostersync.db",
        description="sqlite:///PATH (relative to the config folder) or postgresql+psycopg://...",
    )
    license_limit: int | None = Field(default=None, ge=0)
    roles: list[
        Annotated[
            RoleSpec,
            AlsoAccepts({"type": "string", "minLength": 1, "maxLength": 256, "title": "role name"}),
        ]
    ] = Field(min_length=1, description="a role name, or {name, permissions, scope}")
    sites: list[Annotated[str, Field(json_schema_extra={"maxLength": 50, "pattern": r"\S"})]] = (
        Field(default_factory=list)
    )
    provisioning: Provisioning
    safety: Safety = Field(default_factory=Safety)
    resync: ResyncSettings = Field(default_factory=ResyncSettings)
    leases: LeaseSettings = Field(default_factory=LeaseSettings)
    import_: ImportSettings = Field(default_factory=ImportSettings, alias="import")
    smtp: SmtpSettings | None = None
    metrics: MetricsSettings | None = None
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    sources: dict[str, SourceConfig] = Field(default_factory=dict)

    @field_validator("roles", mode="before")
    @classmethod
    def _role_strings(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": r} if isinstance(r, str) else r for r in v]
        return v

    @field_validator("sites")
    @classmethod
    def _site_names(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s.strip() or len(s) > 50:
                raise ValueError(f"site name {quoted(s)} must be 1-50 characters")
        return v

    @property
    def role_names(self) -> list[str]:
        return [r.name for r in self.roles]

    @property
    def database_dialect(self) -> str:
        """``sqlite`` or ``postgresql`` (the URL's scheme without its driver), read without
        importing SQLAlchemy; anything else is the store's to reject."""
        return self.database.partition(":")[0].partition("+")[0].lower()

    def provisioning_fingerprint(self) -> str:
        """A short digest of the settings that decide who gets a user and how (provisioning
        and the license limit); a change means past decisions may no longer hold."""
        decided_by = {
            "provisioning": self.provisioning.model_dump(mode="json"),
            "license_limit": self.license_limit,
        }
        text = json.dumps(decided_by, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def safety_for(self, source: str) -> Safety:
        """The top-level safety block with the source's own overrides applied."""
        override = self.sources[source].safety if source in self.sources else None
        if override is None:
            return self.safety
        changes = {k: v for k, v in override.model_dump().items() if v is not None}
        return self.safety.model_copy(update=changes)

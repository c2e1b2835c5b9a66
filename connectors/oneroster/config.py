"""The `type: oneroster` source keys.

``version`` defaults from the base path (``.../v1p2`` means 1.2, anything else 1.1), so a
ClassLink URL pasted from the district's server record needs no extra key. Secrets accept the
``x`` / ``x_file`` pair; they are :class:`~pydantic.SecretStr` so a dumped config or a
validation error never shows them.
"""

from __future__ import annotations

import os
import ssl
import threading
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rostersync.config.source import ScopedSourceConfig
from rostersync.config.types import (
    AlsoAccepts,
    ConfigPath,
    Duration,
    Secret,
    SecretFile,
    StrictModel,
    checking_files,
    quoted,
    resolve_secret,
    secret_pair_schema,
)
from rostersync.source.retry import RetrySettings

#: The OAuth2 scopes each version's rostering service documents (read-only).
DEFAULT_SCOPES = {
    "1.1": "https://purl.imsglobal.org/spec/or/v1p1/scope/roster.readonly",
    "1.2": "https://purl.imsglobal.org/spec/or/v1p2/scope/roster-core.readonly",
}


class OAuth1Auth(StrictModel):
    """OAuth 1.0a request signing, HMAC-SHA256 (ClassLink Roster Server's direct access)."""

    model_config = ConfigDict(json_schema_extra=secret_pair_schema("client_secret"))

    type: Literal["oauth1"]
    client_id: str = Field(min_length=1)
    client_secret: Secret
    client_secret_file: SecretFile | None = Field(
        default=None, description="a file holding the secret"
    )

    @model_validator(mode="before")
    @classmethod
    def _secret(cls, data: Any, info: ValidationInfo) -> Any:
        return resolve_secret(data, "client_secret", info)


class OAuth2Auth(StrictModel):
    """OAuth2 client credentials (OneRoster 1.2; many 1.1 servers too)."""

    model_config = ConfigDict(json_schema_extra=secret_pair_schema("client_secret"))

    type: Literal["oauth2"]
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: Secret
    client_secret_file: SecretFile | None = Field(
        default=None, description="a file holding the secret"
    )
    scope: str | None = Field(
        default=None, description="requested scope; default: the version's roster read-only scope"
    )

    @model_validator(mode="before")
    @classmethod
    def _secret(cls, data: Any, info: ValidationInfo) -> Any:
        return resolve_secret(data, "client_secret", info)

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _check_http_url(value)


class BearerAuth(StrictModel):
    """A static bearer token (ClassLink's OAuth2 proxy)."""

    model_config = ConfigDict(json_schema_extra=secret_pair_schema("token"))

    type: Literal["bearer"]
    token: Secret
    token_file: SecretFile | None = Field(default=None, description="a file holding the token")

    @model_validator(mode="before")
    @classmethod
    def _secret(cls, data: Any, info: ValidationInfo) -> Any:
        return resolve_secret(data, "token", info)


AuthConfig = Annotated[OAuth1Auth | OAuth2Auth | BearerAuth, Field(discriminator="type")]


def _check_http_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{quoted(value)} is not an http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError("the URL must not carry a query string or fragment")
    return value.strip().rstrip("/")


#: TLS contexts being built ahead of their HTTP client, by CA bundle (None: the default
#: store), each taken by the next http_client_options. Loading a CA store is most of making
#: a client and releases the interpreter lock, so `sync` builds it while it imports.
_TLS_AHEAD: dict[str | None, Future[ssl.SSLContext]] = {}


def _tls_context(bundle: str | None) -> ssl.SSLContext:
    """The context the HTTP client verifies servers with: httpx's own for ``verify=True``
    (its CA store, or $SSL_CERT_FILE / $SSL_CERT_DIR), or the configured bundle's."""
    if bundle is not None:
        return ssl.create_default_context(cafile=bundle)
    import httpx

    return httpx.create_ssl_context()


class OneRosterSourceConfig(ScopedSourceConfig):
    """A OneRoster 1.1/1.2 REST provider (ClassLink Roster Server and others)."""

    type: Literal["oneroster"]
    base_url: str = Field(
        description="the rostering base, e.g. https://x-v2.rosterserver.com/ims/oneroster/v1p1"
    )
    # YAML reads an unquoted 1.2 as a number; _version_text accepts it, so the schema does too.
    version: Annotated[Literal["1.1", "1.2"], AlsoAccepts({"enum": [1.1, 1.2]})] = Field(
        default="1.1", description="OneRoster version; default from base_url (v1p2 means 1.2)"
    )
    auth: AuthConfig
    page_size: int = Field(default=1000, ge=1, le=10000, description="records per page (limit)")
    max_concurrency: int = Field(default=4, ge=1, le=64, description="requests in flight at once")
    timeout: Duration = Field(default=timedelta(seconds=30), description="per-request timeout")
    verify_tls: bool = True
    ca_bundle: ConfigPath | None = Field(default=None, description="PEM file of trusted CAs")
    retry: RetrySettings = Field(default_factory=RetrySettings)
    decode_workers: int | None = Field(
        default=None,
        ge=0,
        le=32,
        description="processes that request, parse and normalize a large collection's pages "
        "beside the sync process; 0 does it all in the sync process; default: one per CPU "
        "core, at most 4; when the server's pages take 40 ms or more to come, at least "
        "max_concurrency (at most 8): each has one request in flight",
    )
    delta_overlap: Duration = Field(
        default=timedelta(minutes=5),
        description="a delta run asks for changes since the high-water mark minus this",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_version(cls, data: Any) -> Any:
        # The path names the version on every conforming server, so an explicit key is only
        # needed for odd deployments; an explicit key always wins.
        if isinstance(data, dict) and data.get("version") in (None, "") and data.get("base_url"):
            path = urlsplit(str(data["base_url"])).path.lower()
            data = {**data, "version": "1.2" if "v1p2" in path else "1.1"}
        return data

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # YAML reads `version: 1.2` as a float.
        return str(value) if isinstance(value, float | int) else value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return _check_http_url(value)

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle_loads(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Loaded as the run will load it: `config check` reports a wrong path (checking_files).
        if value is not None and checking_files(info):
            try:
                ssl.create_default_context(cafile=str(value))
            except ssl.SSLError:
                raise ValueError(f"{value} holds no PEM certificates") from None
            except OSError as exc:
                raise ValueError(f"cannot read {value}: {exc.strerror or exc}") from None
        return value

    @property
    def scope(self) -> str | None:
        if isinstance(self.auth, OAuth2Auth):
            return self.auth.scope or DEFAULT_SCOPES[self.version]
        return None

    def prepare_http(self) -> None:
        """Start building this source's TLS context in a thread (see _TLS_AHEAD)."""
        if not self.verify_tls:
            return
        bundle = None if self.ca_bundle is None else str(self.ca_bundle)
        if bundle in _TLS_AHEAD:
            return
        # Imported here, in the calling thread: the builder then imports nothing, and cannot
        # wait on a module this thread is importing.
        import certifi  # noqa: F401  (httpx's default CA store)
        import httpx  # noqa: F401

        ahead: Future[ssl.SSLContext] = Future()

        def build() -> None:
            try:
                ahead.set_result(_tls_context(bundle))
            except BaseException as exc:  # handed to http_client_options, which raises it
                ahead.set_exception(exc)

        _TLS_AHEAD[bundle] = ahead
        threading.Thread(target=build, name="rostersync-tls", daemon=True).start()

    def prepare_workers(self, store_dialect: str | None = None) -> None:
        """Start the decode workers' fork server (connectors.oneroster.forkserver), with the
        store's driver the workers read fingerprints with, unless the workers are off or the
        machine has one core, where its imports would only take the sync process's turn."""
        if self.decode_workers == 0 or (os.cpu_count() or 1) < 2:
            return
        from connectors.oneroster import forkserver

        forkserver.start_ahead(
            (forkserver.DECODE, forkserver.REQUESTS, *forkserver.store_driver(store_dialect))
        )

    def http_client_options(self) -> dict[str, Any]:
        import httpx  # here: loading the config (every command does) needs no HTTP client

        verify: bool | ssl.SSLContext = self.verify_tls
        if self.verify_tls:
            bundle = None if self.ca_bundle is None else str(self.ca_bundle)
            ahead = _TLS_AHEAD.pop(bundle, None)
            if ahead is not None:
                verify = ahead.result()
            elif bundle is not None:
                # httpx 0.28 deprecates a path in `verify`; an SSLContext is the supported form.
                verify = _tls_context(bundle)
        seconds = self.timeout.total_seconds()
        return {
            "timeout": httpx.Timeout(seconds),
            "verify": verify,
            # Keep one warm connection per concurrent request; the default pool may be smaller.
            "limits": httpx.Limits(
                max_connections=max(100, self.max_concurrency),
                max_keepalive_connections=max(20, self.max_concurrency),
            ),
        }

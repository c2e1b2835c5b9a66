"""Service-account access with domain-wide delegation: the OAuth 2.0 JWT bearer grant.

:class:`ServiceAccountAuth` is an ``httpx.Auth``: before an API request it makes sure it holds
an access token (signing a fresh RS256 assertion and posting it to the token endpoint through
the same client when needed), then adds ``Authorization: Bearer``. Tokens are cached and
renewed five minutes before they expire; a lock makes concurrent requests share one renewal.

Signing uses joserfc (Authlib's own JOSE successor; ``authlib.jose`` now warns it is
deprecated), so no RSA is written by hand here.

Failures at the token endpoint are sorted like API failures: 429/5xx retriable; a refused
grant (``invalid_grant``, ``unauthorized_client``, 400/401/403) fatal, with a message saying
what an admin should check. Messages never include the key, the assertion or a token.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc import jwt
from joserfc.jwk import RSAKey

from connectors.google_classroom.api import retry_after
from connectors.google_classroom.config import ServiceAccountKey
from rostersync.errors import FatalSourceError, RetriableSourceError

#: Read-only, and only what the connector reads: course lists, rosters, and members' emails.
SCOPES = (
    "https://www.googleapis.com/auth/classroom.courses.readonly",
    "https://www.googleapis.com/auth/classroom.rosters.readonly",
    "https://www.googleapis.com/auth/classroom.profile.emails",
)
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Google refuses assertions valid for longer than an hour.
ASSERTION_LIFETIME = 3600
REFRESH_MARGIN = 300.0

_FATAL_GRANT_ERRORS = {"invalid_grant", "unauthorized_client", "invalid_client", "access_denied"}


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str
    expires_at: float  # on the auth's clock
    refresh_at: float

    def __repr__(self) -> str:  # a token in a traceback is a token in a log
        return f"AccessToken(expires_at={self.expires_at})"


def delegation_hint(key: ServiceAccountKey, subject: str) -> str:
    """What an admin should check when Google refuses the service account."""
    client = f"client id {key.client_id}" if key.client_id else f"{key.client_email}"
    return (
        "Check in the Google Admin console (Security > API controls > Domain-wide delegation) "
        f"that {client} is authorised for the scopes {', '.join(SCOPES)}; that delegated_admin "
        f"{subject} is an existing admin account in the domain; and that the service-account "
        "key is current (not deleted or rotated)."
    )


class ServiceAccountAuth(httpx.Auth):
    """Bearer tokens for ``key`` acting as ``subject`` (the delegated admin)."""

    def __init__(
        self,
        *,
        source: str,
        key: ServiceAccountKey,
        subject: str,
        token_url: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._key = key
        self._subject = subject
        self._token_url = token_url
        self._clock = clock
        # The config loader has checked this key fully; skip RSA's slow check the second time.
        private = load_pem_private_key(
            key.private_key.get_secret_value().encode(),
            password=None,
            unsafe_skip_rsa_key_validation=True,
        )
        if not isinstance(private, rsa.RSAPrivateKey):
            raise TypeError("the service-account key must be an RSA key")
        self._signing_key = RSAKey(private, None)
        self._token: AccessToken | None = None
        self._lock = asyncio.Lock()
        self.hint = delegation_hint(key, subject)
        #: Token-endpoint requests made (each one is a new assertion).
        self.token_requests = 0

    # -- the flow ------------------------------------------------------------------------

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        raise RuntimeError("ServiceAccountAuth needs an httpx.AsyncClient")
        yield request  # pragma: no cover - makes this a generator, as httpx expects

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        async with self._lock:
            fresh = self._token is None or self._clock() >= self._token.refresh_at
            if fresh:
                self._token = await self._accept((yield self.token_request()))
            token = self._token
            assert token is not None
        request.headers["Authorization"] = f"Bearer {token.value}"
        response = yield request
        if response.status_code != 401 or fresh:
            return
        # A cached token can be revoked early (key rotated, delegation edited): renew once,
        # and let a second 401 reach the caller, who stops the run.
        async with self._lock:
            if self._token is token:
                self._token = await self._accept((yield self.token_request()))
            token = self._token
            assert token is not None
        request.headers["Authorization"] = f"Bearer {token.value}"
        yield request

    # -- pieces --------------------------------------------------------------------------

    def token_request(self) -> httpx.Request:
        now = int(self._clock())
        claims = {
            "iss": self._key.client_email,
            "sub": self._subject,
            "aud": self._token_url,
            "scope": " ".join(SCOPES),
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        header = {"alg": "RS256", "typ": "JWT"}
        if self._key.private_key_id:
            header["kid"] = self._key.private_key_id
        assertion = jwt.encode(header, claims, self._signing_key, algorithms=["RS256"])
        self.token_requests += 1
        return httpx.Request(
            "POST",
            self._token_url,
            data={"grant_type": JWT_BEARER_GRANT, "assertion": assertion},
            headers={"Accept": "application/json"},
        )

    async def _accept(self, response: httpx.Response) -> AccessToken:
        # httpx reads bodies for us only in its default flows; ours overrides them.
        await response.aread()
        code = response.status_code
        error, description = _oauth_error(response)
        where = f"token endpoint -> {code}" + (f" {error}" if error else "")
        if description:
            where = f"{where} ({description})"
        if code == 429 or code >= 500:
            raise RetriableSourceError(self._source, where, retry_after=retry_after(response))
        if code in (400, 401, 403) or error in _FATAL_GRANT_ERRORS:
            raise FatalSourceError(
                self._source, f"Google refused the service account: {where}. {self.hint}"
            )
        if code != 200:
            raise FatalSourceError(self._source, where)
        try:
            body = response.json()
        except (ValueError, RecursionError):  # as api.json_body
            raise FatalSourceError(self._source, "token endpoint did not return JSON") from None
        value = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise FatalSourceError(self._source, "token endpoint returned no access_token")
        lifetime = body.get("expires_in", ASSERTION_LIFETIME)
        lifetime = float(lifetime) if isinstance(lifetime, int | float) else ASSERTION_LIFETIME
        now = self._clock()
        # Renew REFRESH_MARGIN early, or halfway through a token shorter than twice that.
        margin = min(REFRESH_MARGIN, lifetime / 2)
        return AccessToken(value, expires_at=now + lifetime, refresh_at=now + lifetime - margin)


def _oauth_error(response: httpx.Response) -> tuple[str, str]:
    """``(error, error_description)`` of an OAuth error body, trimmed; never the request."""
    try:
        body = json.loads(response.content or b"null")
    except (ValueError, RecursionError):  # as api.json_body
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    error = body.get("error")
    description = body.get("error_description")
    if isinstance(error, dict):  # some Google endpoints answer in the API error shape
        description = error.get("message")
        error = error.get("status")
    return (
        error[:60] if isinstance(error, str) else "",
        description[:200] if isinstance(description, str) else "",
    )

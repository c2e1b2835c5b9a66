"""`httpx.Auth` classes for the three ways OneRoster providers authenticate.

* :class:`OAuth1Signer`: OAuth 1.0a request signing with HMAC-SHA256, as ClassLink Roster
  Server wants for direct access. Authlib signs (it puts the query parameters in the signature
  base string, which ClassLink checks); Authlib ships HMAC-SHA1 only, so HMAC-SHA256 is added
  on a private subclass rather than through ``ClientAuth.register_signature_method``, which
  would change Authlib's registry for every other user in the process.
* :class:`OAuth2ClientCredentials`: the client-credentials grant (OneRoster 1.2, and many 1.1
  servers). The token is fetched through the same client the data requests use (the auth flow
  yields the token request), cached until shortly before it expires, and fetched again once
  when a data request answers 401 (tokens are revoked early in practice). Concurrent requests
  share one token fetch.
* :class:`BearerToken`: a static token (ClassLink's OAuth2 proxy).

Errors name the source and the token endpoint's path, never a secret or a token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

import httpx
from authlib.oauth1 import SIGNATURE_TYPE_HEADER, ClientAuth
from authlib.oauth1.rfc5849.signature import generate_signature_base_string
from authlib.oauth1.rfc5849.util import escape
from authlib.oauth2.auth import ClientAuth as OAuth2ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_token_request

from connectors.oneroster.errors import raise_for_status, token_for
from rostersync.errors import FatalSourceError

SIGNATURE_HMAC_SHA256 = "HMAC-SHA256"


def hmac_sha256_signature(base_string: str, client_secret: str, token_secret: str = "") -> str:
    """RFC 5849 section 3.4.2 with SHA-256 in place of SHA-1 (key = secret&token_secret)."""
    key = f"{escape(client_secret)}&{escape(token_secret)}"
    digest = hmac.new(key.encode(), base_string.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def _sign_hmac_sha256(client: Any, request: Any) -> str:
    base_string = generate_signature_base_string(request)
    return hmac_sha256_signature(base_string, client.client_secret or "", client.token_secret or "")


class _ClientAuth(ClientAuth):  # type: ignore[misc]
    SIGNATURE_METHODS = {**ClientAuth.SIGNATURE_METHODS, SIGNATURE_HMAC_SHA256: _sign_hmac_sha256}

    def sign(self, method: str, uri: str, headers: Any, body: Any) -> Any:
        """Authlib's signing of a request without a body, with a nonce from ``secrets``:
        Authlib draws each of its 30 characters from a new ``SystemRandom`` (about a
        millisecond a request). Requests with a body go through Authlib unchanged."""
        if body:
            return super().sign(method, uri, headers, body)
        headers = dict(headers or {})
        params = self.get_oauth_params(secrets.token_urlsafe(24), str(int(time.time())))
        rendered = self._render(uri, headers, b"", params)
        params.append(("oauth_signature", self.get_oauth_signature(method, *rendered)))
        return self._render(uri, headers, b"", params)


class OAuth1Signer(httpx.Auth):
    """Adds an ``Authorization: OAuth ...`` header signed with HMAC-SHA256."""

    def __init__(self, client_id: str, client_secret: str) -> None:
        self._client = _ClientAuth(
            client_id,
            client_secret,
            signature_method=SIGNATURE_HMAC_SHA256,
            signature_type=SIGNATURE_TYPE_HEADER,
        )

    def authorization(self, method: str, url: str) -> str:
        """The ``Authorization`` value for a request without a body to exactly this URL."""
        # Signing an empty body keeps oauth_body_hash out, as the servers expect. No Host
        # header is passed: the base string then takes the URL's host, which is the Host
        # the request carries.
        _, headers, _ = self._client.sign(method, url, {}, b"")
        return str(headers["Authorization"])

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.authorization(request.method, str(request.url))
        yield request


class BearerToken(httpx.Auth):
    """A static bearer token."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    @property
    def header(self) -> str:
        """The ``Authorization`` value (for the decode workers' own requests)."""
        return self._header

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


class OAuth2ClientCredentials(httpx.Auth):
    """Client-credentials grant with a shared, cached token (see the module docstring)."""

    def __init__(
        self,
        source: str,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._token_url = token_url
        self._token_path = httpx.URL(token_url).path
        self._client = OAuth2ClientAuth(client_id, client_secret, "client_secret_basic")
        self._scope = scope
        self._clock = clock
        self._token: str | None = None
        self._expires_at: float | None = None
        self._lock: asyncio.Lock | None = None
        #: How many tokens were fetched (tests and metrics read it).
        self.tokens_fetched = 0

    def current_token(self) -> str | None:
        """The cached token while it is good, else None (nothing is fetched): what the decode
        workers' own requests carry."""
        return self._valid_token()

    def _valid_token(self) -> str | None:
        if self._token is None:
            return None
        if self._expires_at is not None and self._clock() >= self._expires_at:
            return None
        return self._token

    def _token_request(self) -> httpx.Request:
        extra = {"scope": self._scope} if self._scope else {}
        body = prepare_token_request("client_credentials", **extra)
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        _, headers, body = self._client.prepare("POST", self._token_url, headers, body)
        return httpx.Request("POST", self._token_url, headers=headers, content=body.encode())

    def _store(self, response: httpx.Response, page: httpx.Request) -> str:
        where = token_for(self._token_path, page)
        if response.status_code in (400, 401, 403):
            raise FatalSourceError(
                self._source,
                f"the token endpoint refused the client credentials (HTTP {response.status_code} "
                f"from {where}); check client_id and client_secret",
            )
        raise_for_status(self._source, response, where)
        try:
            data = response.json()
            token = data["access_token"]
        # RecursionError: JSON nested deeper than the stdlib parser goes.
        except (ValueError, KeyError, TypeError, RecursionError):
            raise FatalSourceError(
                self._source, f"the token endpoint answered without an access_token ({where})"
            ) from None
        if not isinstance(token, str) or not token:
            raise FatalSourceError(
                self._source, f"the token endpoint sent an empty token ({where})"
            )
        expires_in = data.get("expires_in")
        self._token = token
        self._expires_at = None
        if isinstance(expires_in, int | float | str) and str(expires_in).strip():
            try:
                seconds = float(expires_in)
            except ValueError:
                seconds = None
            if seconds is not None:
                # Renew a little early so a token never expires in flight.
                self._expires_at = self._clock() + seconds - min(60.0, seconds / 10)
        self.tokens_fetched += 1
        return token

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        token = self._valid_token()
        if token is None:
            # One fetch for every request that finds the cache empty at the same moment.
            async with self._lock:
                token = self._valid_token()
                if token is None:
                    answer = yield self._token_request()
                    await answer.aread()
                    token = self._store(answer, request)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        async with self._lock:
            # Another request may already have replaced the rejected token.
            fresh = self._valid_token()
            if fresh is None or fresh == token:
                self._token = None
                answer = yield self._token_request()
                await answer.aread()
                fresh = self._store(answer, request)
        request.headers["Authorization"] = f"Bearer {fresh}"
        yield request

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("OAuth2ClientCredentials works with httpx.AsyncClient only")

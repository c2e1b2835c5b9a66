"""Pages a decode worker requests itself: the fast path of a large collection's fetch.

With the requests in the sync process, its interpreter spent about as long on HTTP (httpx,
httpcore, anyio) as a whole no-op run spent on everything else, and the two cores went to
taking turns rather than to the download (tests/benchmarks/README.md). So, once a collection
is known to be large, each of its remaining pages is one call of :func:`fetch_page` in the
decode pool: the worker sends the request with a synchronous client of its own, built with
the source's timeout and TLS settings (and, for OAuth 1.0a, its own signer), and returns the
page already decoded into staging rows, with the headers paging needs.

This is one attempt and nothing more. Anything but a 200 with a well-formed page (an HTTP
error, a refused or timed-out connection, a token the server no longer accepts, a page that
does not decode) comes back as :attr:`DirectAnswer.problem`, and the connector sends the same
request again the careful way: through the sync process's client, with the retry policy,
``Retry-After``, the token refresh and the errors that name the request. Nothing here logs,
raises to the caller or names a secret.

The request goes through the standard library's ``http.client``, one keep-alive connection
per origin, with the headers, signature and TLS verification of the sync process's httpx
client (gzip asked for and undone here): per page of 1,000 enrollments httpx's client spent
about three times its CPU, and the workers' CPU is the full run's bottleneck
(tests/benchmarks/README.md). With a proxy set in the environment, which httpx honours and
this path would not, the worker sends it through an httpx client of its own instead.

The workers of a pool started for such fetches import it once, in their forkserver (through
connectors.oneroster.preload); the sync process imports it for the request and answer types.
The TLS context is built here again from the settings, as
``OneRosterSourceConfig.http_client_options`` builds it: an ``ssl.SSLContext`` does not
cross a process boundary (httpx's default one is built once in the forkserver, before the
workers are forked from it).
"""

from __future__ import annotations

import gzip
import http.client
import os
import select
import socket
import ssl
import zlib
from dataclasses import dataclass, field

import httpx

from connectors.oneroster.auth import OAuth1Signer
from connectors.oneroster.decode import DecodedPage, DecodeError, decode_known
from rostersync.source.rows import KnownSpec


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """How a worker builds its client: the settings of the source's own client."""

    timeout: float
    verify_tls: bool
    ca_bundle: str | None
    #: (client_id, client_secret) to sign each request with OAuth 1.0a; None for a token
    oauth1: tuple[str, str] | None = field(default=None, repr=False)
    #: send through an httpx client, as the sync process's goes (a proxy is configured)
    via_httpx: bool = False


#: The proxy variables httpx's clients honour (``trust_env``), in either case.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def proxy_configured() -> bool:
    """Whether this process's environment names a proxy the sync process's client may use."""
    return any(os.environ.get(name) or os.environ.get(name.upper()) for name in PROXY_VARIABLES)


@dataclass(frozen=True, slots=True)
class DirectRequest:
    client: ClientSpec
    url: str  # base_url + the collection's path
    params: tuple[tuple[str, str], ...]
    #: Accept, and Authorization for a bearer or OAuth2 token (never shown)
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    collection: str  # the envelope key
    #: a full run's mirror fingerprints, to leave out the records it holds as they are
    known: KnownSpec | None = None


@dataclass(frozen=True, slots=True)
class DirectAnswer:
    status: int  # 0 when no answer came
    total: str | None  # X-Total-Count
    link: str | None  # Link
    page: DecodedPage | None  # None: not usable, see problem
    problem: str | None = None


#: One client per settings, per worker, kept for the worker's life (its connections too).
_clients: dict[ClientSpec, httpx.Client] = {}
#: One connection per settings and origin (scheme, host, port), per worker, kept alive.
_connections: dict[tuple[ClientSpec, str, str, int], http.client.HTTPConnection] = {}
_signers: dict[tuple[str, str], OAuth1Signer] = {}
#: The name the sync process's client sends: the workers' requests are the same client's.
USER_AGENT = f"python-httpx/{httpx.__version__}"
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: httpx's default TLS context (``verify=True``), when the fork server built it for every
#: worker (connectors.oneroster.preload); else each worker's client builds its own.
_default_tls: ssl.SSLContext | None = None


def share_default_tls() -> None:
    """Build httpx's default TLS context now, for the clients of every worker forked from
    this process. If it cannot be built, each client tries again, and fails as it would."""
    global _default_tls
    try:
        _default_tls = httpx.create_ssl_context()
    except Exception:  # e.g. $SSL_CERT_FILE names no file: the worker's client says so
        _default_tls = None


def _tls_context(spec: ClientSpec) -> ssl.SSLContext:
    """The verification the settings ask for, as the sync process's client verifies."""
    if not spec.verify_tls:
        return httpx.create_ssl_context(verify=False)
    if spec.ca_bundle is not None:
        return ssl.create_default_context(cafile=spec.ca_bundle)
    return _default_tls if _default_tls is not None else httpx.create_ssl_context()


def _client(spec: ClientSpec) -> httpx.Client:
    client = _clients.get(spec)
    if client is None:
        auth = OAuth1Signer(*spec.oauth1) if spec.oauth1 is not None else None
        client = httpx.Client(
            timeout=httpx.Timeout(spec.timeout), verify=_tls_context(spec), auth=auth
        )
        _clients[spec] = client
    return client


def _closed_while_idle(sock: socket.socket) -> bool:
    """An idle keep-alive connection with something to read has been closed by the server
    (or holds what no request asked for): it must not carry the next request."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _connection(spec: ClientSpec, url: httpx.URL) -> http.client.HTTPConnection:
    port = url.port or _DEFAULT_PORTS[url.scheme]
    host = url.raw_host.decode("ascii")
    key = (spec, url.scheme, host, port)
    conn = _connections.get(key)
    if conn is None:
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=spec.timeout, context=_tls_context(spec)
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=spec.timeout)
        _connections[key] = conn
    elif conn.sock is not None and _closed_while_idle(conn.sock):
        conn.close()  # the next request opens it again
    return conn


def _content(body: bytes, encoding: str | None) -> bytes:
    coding = (encoding or "identity").strip().lower()
    if coding in ("identity", ""):
        return body
    if coding != "gzip":
        raise DecodeError(f"a body in {coding[:40]!r}, which was not asked for")
    try:
        return gzip.decompress(body)  # every member: a gzip body may hold several
    except (OSError, EOFError, zlib.error) as exc:
        raise DecodeError(f"a gzip body that does not decompress ({exc})") from None


def _fetch_stdlib(request: DirectRequest) -> DirectAnswer:
    spec = request.client
    conn: http.client.HTTPConnection | None = None
    try:
        url = httpx.URL(request.url, params=request.params)
        headers = {"User-Agent": USER_AGENT, **dict(request.headers), "Accept-Encoding": "gzip"}
        if spec.oauth1 is not None:
            signer = _signers.get(spec.oauth1)
            if signer is None:
                signer = _signers[spec.oauth1] = OAuth1Signer(*spec.oauth1)
            headers["Authorization"] = signer.authorization("GET", str(url))
        conn = _connection(spec, url)
        conn.request("GET", url.raw_path.decode("ascii"), headers=headers)
        response = conn.getresponse()
        body = response.read()
    except Exception as exc:  # any failure: the sync process asks again and reports it
        if conn is not None:
            conn.close()
        return DirectAnswer(0, None, None, None, f"no answer ({type(exc).__name__})")
    total, link = response.getheader("X-Total-Count"), response.getheader("Link")
    if response.status != 200:
        return DirectAnswer(response.status, total, link, None, f"HTTP {response.status}")
    try:
        content = _content(body, response.getheader("Content-Encoding"))
        page = decode_known(request.collection, content, request.known)
    except DecodeError as exc:
        return DirectAnswer(200, total, link, None, f"unexpected answer: {exc}")
    return DirectAnswer(200, total, link, page)


def fetch_page(request: DirectRequest) -> DirectAnswer:
    """One GET, decoded into staging rows; any failure is an answer, never an exception."""
    try:
        if not request.client.via_httpx:
            return _fetch_stdlib(request)
        return _fetch_httpx(request)
    except Exception as exc:  # a bug here: the sync process asks again, and names the page
        return DirectAnswer(0, None, None, None, f"failed ({type(exc).__name__})")


def _fetch_httpx(request: DirectRequest) -> DirectAnswer:
    try:
        response = _client(request.client).get(
            request.url, params=request.params, headers=dict(request.headers)
        )
    except Exception as exc:  # any failure: the sync process asks again and reports it
        return DirectAnswer(0, None, None, None, f"no answer ({type(exc).__name__})")
    headers = response.headers
    total, link = headers.get("X-Total-Count"), headers.get("Link")
    if response.status_code != 200:
        return DirectAnswer(response.status_code, total, link, None, f"HTTP {response.status_code}")
    try:
        page = decode_known(request.collection, response.content, request.known)
    except DecodeError as exc:
        return DirectAnswer(200, total, link, None, f"unexpected answer: {exc}")
    return DirectAnswer(200, total, link, page)

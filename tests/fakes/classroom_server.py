"""A fake Google Classroom (and its OAuth token endpoint) on a real loopback HTTP server.

It serves a :class:`~rostersync.source.records.MemoryRoster` the way Classroom would: classes become
courses (``id`` = sourced_id, ``name`` = title, ``courseState`` ACTIVE, or ARCHIVED for a
``tobedeleted`` class, or whatever ``course_states`` says), teacher and student enrollments
become the course rosters, persons become profiles (``id`` = sourced_id, ``emailAddress`` =
email). Lists page with ``nextPageToken``.

The token endpoint checks what Google checks for the JWT bearer grant: the RS256 signature
against the test key, ``iss``, ``aud``, ``sub`` (the one admin allowed to be impersonated) and
the three read-only scopes; API calls need a bearer token it issued.

Faults are switched on per test: :meth:`FakeClassroom.fail_quota` (429 RESOURCE_EXHAUSTED),
:meth:`FakeClassroom.fail_server` (500/503), :meth:`FakeClassroom.fail_token` (token endpoint
errors), :attr:`FakeClassroom.forbidden_courses` (403 on a course's rosters),
:attr:`FakeClassroom.omit_emails`, :meth:`FakeClassroom.revoke_tokens` (401 until renewed),
``server_quota_per_minute`` (Google's own 429s, for benchmarks).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from rostersync.source.records import STUDENT, TEACHER, MemoryRoster, RosterPerson

REQUIRED_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/classroom.courses.readonly",
        "https://www.googleapis.com/auth/classroom.rosters.readonly",
        "https://www.googleapis.com/auth/classroom.profile.emails",
    }
)
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_ROSTER_PAGE = 30  # what Classroom uses when pageSize is 0 or missing


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    endpoint: str  # "token", "courses", "teachers", "students", "other"


class FakeClassroom:
    """Context manager: start on enter, stop on exit. Thread-safe counters."""

    def __init__(
        self,
        roster: MemoryRoster,
        *,
        public_key_pem: str | bytes,
        client_email: str,
        allowed_sub: str,
        token_expires_in: int = 3600,
        course_states: dict[str, str] | None = None,
        omit_emails: bool = False,
        latency: float = 0.0,
        server_quota_per_minute: int | None = None,
    ) -> None:
        self.roster = roster
        self.public_key = RSAKey.import_key(public_key_pem)
        self.client_email = client_email
        self.allowed_sub = allowed_sub
        self.token_expires_in = token_expires_in
        #: Per-course state override (course id -> ACTIVE/ARCHIVED/...).
        self.course_states = dict(course_states or {})
        #: Leave profile.emailAddress out, as Google does without classroom.profile.emails.
        self.omit_emails = omit_emails
        #: Course ids whose teachers/students answer 403 PERMISSION_DENIED.
        self.forbidden_courses: set[str] = set()
        #: Seconds each API call takes (to make concurrency observable).
        self.latency = latency
        #: Answer 429 once more than this many API calls arrive in 60 s (None: no limit).
        self.server_quota_per_minute = server_quota_per_minute
        #: Calls per endpoint: "token", "courses", "teachers", "students", "other".
        self.calls: Counter[str] = Counter()
        self.requests: list[RecordedRequest] = []
        #: Most API calls seen in flight at once.
        self.max_in_flight = 0
        self.issued_tokens: list[str] = []
        self.token_claims: list[dict[str, Any]] = []
        self._valid_tokens: dict[str, float] = {}
        self._quota_faults = 0
        self._quota_retry_after: float | None = None
        self._server_faults: deque[int] = deque()
        self._token_faults: deque[int] = deque()
        self._recent: deque[float] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> FakeClassroom:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits for the loop to notice, once per test.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-classroom",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        assert self._server is not None, "use FakeClassroom as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def api_base_url(self) -> str:
        return self.base_url

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    # -- fault switches ------------------------------------------------------------------

    def fail_quota(self, times: int, *, retry_after: float | None = None) -> None:
        """The next ``times`` API calls answer 429 RESOURCE_EXHAUSTED."""
        with self._lock:
            self._quota_faults += times
            self._quota_retry_after = retry_after

    def fail_server(self, times: int, status: int = 503) -> None:
        """The next ``times`` API calls answer ``status`` (a 5xx)."""
        with self._lock:
            self._server_faults.extend([status] * times)

    def fail_token(self, times: int, status: int = 503) -> None:
        """The next ``times`` token requests answer ``status``."""
        with self._lock:
            self._token_faults.extend([status] * times)

    def revoke_tokens(self) -> None:
        """Every token issued so far stops working (API answers 401)."""
        with self._lock:
            self._valid_tokens.clear()

    def api_calls(self) -> int:
        with self._lock:
            return sum(n for k, n in self.calls.items() if k != "token")

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    # -- the token endpoint --------------------------------------------------------------

    def _token(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            fault = self._token_faults.popleft() if self._token_faults else None
        if fault is not None:
            return fault, {"error": "internal_failure", "error_description": "Backend Error"}
        if form.get("grant_type") != [JWT_BEARER_GRANT]:
            return 400, {"error": "unsupported_grant_type"}
        assertion = (form.get("assertion") or [""])[0]
        try:
            token = jwt.decode(assertion, self.public_key, algorithms=["RS256"])
        except (JoseError, ValueError):
            return 400, _grant_error("invalid_grant", "Invalid JWT Signature.")
        claims = dict(token.claims)
        iat, exp = claims.get("iat"), claims.get("exp")
        scopes = set(str(claims.get("scope", "")).split())
        if token.header.get("alg") != "RS256":
            return 400, _grant_error("invalid_grant", "Invalid JWT algorithm.")
        if claims.get("iss") != self.client_email:
            return 401, _grant_error("invalid_client", "The OAuth client was not found.")
        if claims.get("aud") != self.token_url:
            return 400, _grant_error("invalid_grant", _SHORT_LIVED)
        # Lifetime only, not against wall time: tests drive the client's clock by hand.
        if not isinstance(iat, int) or not isinstance(exp, int) or not 0 < exp - iat <= 3600:
            return 400, _grant_error("invalid_grant", _SHORT_LIVED)
        if claims.get("sub") != self.allowed_sub:
            return 400, _grant_error("invalid_grant", "Invalid email or User ID")
        if not scopes >= REQUIRED_SCOPES:
            return 401, _grant_error(
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, "
                "or client not authorized for any of the scopes requested.",
            )
        value = "ya29.fake-" + secrets.token_urlsafe(24)
        with self._lock:
            self._valid_tokens[value] = time.monotonic() + self.token_expires_in
            self.issued_tokens.append(value)
            self.token_claims.append(claims)
        return 200, {
            "access_token": value,
            "expires_in": self.token_expires_in,
            "token_type": "Bearer",
        }

    # -- the API -------------------------------------------------------------------------

    def _authorised(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self._lock:
            expires = self._valid_tokens.get(header[len("Bearer ") :])
        return expires is not None and expires > time.monotonic()

    def _fault(self) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        with self._lock:
            now = time.monotonic()
            if self.server_quota_per_minute is not None:
                while self._recent and self._recent[0] <= now - 60:
                    self._recent.popleft()
                if len(self._recent) >= self.server_quota_per_minute:
                    return _quota_error(None)
                self._recent.append(now)
            if self._quota_faults:
                self._quota_faults -= 1
                return _quota_error(self._quota_retry_after)
            if self._server_faults:
                status = self._server_faults.popleft()
                return (
                    status,
                    _error(status, "The service is currently unavailable.", "UNAVAILABLE"),
                    {},
                )
        return None

    def _api(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if parts == ["v1", "courses"]:
            return self._list_courses(query)
        if (
            len(parts) == 4
            and parts[:2] == ["v1", "courses"]
            and parts[3] in ("teachers", "students")
        ):
            course_id, which = parts[2], parts[3]
            if not any(c.sourced_id == course_id for c in self.roster.classes):
                return 404, _error(404, "Requested entity was not found.", "NOT_FOUND")
            if course_id in self.forbidden_courses:
                return 403, _error(403, "The caller does not have permission", "PERMISSION_DENIED")
            return self._list_roster(course_id, TEACHER if which == "teachers" else STUDENT, query)
        return 404, _error(404, "Method not found.", "NOT_FOUND")

    def _course_state(self, class_id: str) -> str:
        if class_id in self.course_states:
            return self.course_states[class_id]
        cls = next(c for c in self.roster.classes if c.sourced_id == class_id)
        return "ACTIVE" if cls.status == "active" else "ARCHIVED"

    def _list_courses(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        # Google's own default is every state but SUSPENDED; the connector must never rely on it.
        states = set(query.get("courseStates") or ["ACTIVE", "ARCHIVED", "PROVISIONED", "DECLINED"])
        classes = [c for c in self.roster.classes if self._course_state(c.sourced_id) in states]
        if "teacherId" in query:
            person = self._person(query["teacherId"][0])
            if person is None:
                return 404, _error(404, "Requested entity was not found.", "NOT_FOUND")
            taught = {
                e.class_id
                for e in self.roster.enrollments
                if e.user_id == person.sourced_id and e.role == TEACHER
            }
            classes = [c for c in classes if c.sourced_id in taught]
        courses = []
        for c in classes:
            owner = next(
                (
                    e.user_id
                    for e in self.roster.enrollments
                    if e.class_id == c.sourced_id and e.role == TEACHER and e.primary
                ),
                None,
            )
            course: dict[str, Any] = {
                "id": c.sourced_id,
                "name": c.title,
                "courseState": self._course_state(c.sourced_id),
            }
            if owner:
                course["ownerId"] = owner
            courses.append(course)
        return _page("courses", courses, query, default_size=100)

    def _person(self, id_or_email: str) -> RosterPerson | None:
        wanted = id_or_email.lower()
        return next(
            (
                p
                for p in self.roster.persons
                if p.sourced_id == id_or_email or (p.email or "").lower() == wanted
            ),
            None,
        )

    def _list_roster(
        self, course_id: str, role: str, query: dict[str, list[str]]
    ) -> tuple[int, dict[str, Any]]:
        members = []
        for e in self.roster.enrollments:
            if e.class_id != course_id or e.role != role:
                continue
            person = self._person(e.user_id)
            profile: dict[str, Any] = {"id": e.user_id}
            if person is not None:
                profile["name"] = {
                    "givenName": person.given_name,
                    "familyName": person.family_name,
                    "fullName": person.display_name,
                }
                if person.email and not self.omit_emails:
                    profile["emailAddress"] = person.email
            members.append({"courseId": course_id, "userId": e.user_id, "profile": profile})
        key = "teachers" if role == TEACHER else "students"
        return _page(key, members, query, default_size=DEFAULT_ROSTER_PAGE)

    # -- request plumbing (called from handler threads) ----------------------------------

    def record(self, method: str, path: str, query: dict[str, list[str]]) -> str:
        parts = path.strip("/").split("/")
        if path == "/token":
            endpoint = "token"
        elif parts == ["v1", "courses"]:
            endpoint = "courses"
        elif len(parts) == 4 and parts[3] in ("teachers", "students"):
            endpoint = parts[3]
        else:
            endpoint = "other"
        with self._lock:
            self.calls[endpoint] += 1
            self.requests.append(RecordedRequest(method, path, query, endpoint))
        return endpoint

    def enter_api(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def leave_api(self) -> None:
        with self._lock:
            self._in_flight -= 1


_SHORT_LIVED = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
)


def _grant_error(error: str, description: str) -> dict[str, Any]:
    return {"error": error, "error_description": description}


def _error(code: int, message: str, status: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


def _quota_error(retry_after: float | None) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    body = _error(
        429,
        "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute per user'.",
        "RESOURCE_EXHAUSTED",
    )
    return 429, body, headers


def _page(
    key: str, items: list[dict[str, Any]], query: dict[str, list[str]], *, default_size: int
) -> tuple[int, dict[str, Any]]:
    try:
        size = int((query.get("pageSize") or ["0"])[0]) or default_size
        token = (query.get("pageToken") or [""])[0]
        start = int(base64.urlsafe_b64decode(token.encode()).decode().split(":")[1]) if token else 0
    except (ValueError, IndexError):
        return 400, _error(400, "Invalid page token or size.", "INVALID_ARGUMENT")
    body: dict[str, Any] = {}
    chunk = items[start : start + size]
    if chunk:  # Classroom leaves an empty list out entirely
        body[key] = chunk
    if start + size < len(items):
        body["nextPageToken"] = base64.urlsafe_b64encode(f"{key}:{start + size}".encode()).decode()
    return 200, body


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeClassroom
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx pools connections
    # Headers and body go out in two writes; without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold each response ~40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: pytest output is for failures

    def _send(
        self, status: int, body: dict[str, Any], headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        fake = self.server_fake
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        fake.record("POST", url.path, {})
        if url.path != "/token":
            self._send(404, _error(404, "Not found.", "NOT_FOUND"))
            return
        status, body = fake._token(form)
        self._send(status, body, [("Cache-Control", "no-store")])

    def do_GET(self) -> None:
        fake = self.server_fake
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        fake.record("GET", url.path, query)
        fake.enter_api()
        try:
            if fake.latency:
                time.sleep(fake.latency)
            if not fake._authorised(self.headers.get("Authorization")):
                self._send(
                    401,
                    _error(
                        401, "Request had invalid authentication credentials.", "UNAUTHENTICATED"
                    ),
                    [("WWW-Authenticate", 'Bearer realm="https://accounts.google.com/"')],
                )
                return
            fault = fake._fault()
            if fault is not None:
                status, body, headers = fault
                self._send(status, body, headers.items())
                return
            status, body = fake._api(url.path, query)
            self._send(status, body)
        finally:
            fake.leave_api()


def private_pem(key: rsa.RSAPrivateKey) -> str:
    """A private key as the PKCS#8 PEM a service-account JSON file carries."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def generate_keypair() -> tuple[str, str]:
    """(private PEM, public PEM) for a test service account; slow, so fixtures cache it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem(key), public.decode()


def generate_private_pem() -> str:
    return private_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))

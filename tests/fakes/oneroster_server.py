"""A fake OneRoster 1.1/1.2 REST server on 127.0.0.1, for tests, e2e runs and benchmarks.

A real HTTP server (stdlib ``ThreadingHTTPServer``, HTTP/1.1 keep-alive) in a background thread,
serving a :class:`~rostersync.source.testing.MemoryRoster`::

    with FakeOneRoster(small_roster(), version="1.1") as srv:
        config = {"base_url": srv.base_url, "auth": srv.auth_config(), ...}

or in its own process (the benchmark)::

    python -m tests.fakes.oneroster_server --port 0 --version 1.2 --students 200000 ...

which prints one JSON line ``{"base_url": ..., "token_url": ..., ...}`` once it listens.

What it does, like the real ones:

* 1.1 under ``/ims/oneroster/v1p1``, OAuth 1.0a HMAC-SHA256 checked independently of the client
  (the base string is rebuilt here with the stdlib; query parameters are part of it); 1.2 under
  ``/ims/oneroster/rostering/v1p2`` with an OAuth2 client-credentials endpoint ``/token`` and a
  bearer check. Either version can be given either auth (``auth=``), or a static bearer token.
* ``/orgs``, ``/users``, ``/teachers``, ``/students``, ``/classes``, ``/enrollments``,
  ``/{collection}/{id}``, ``/teachers/{id}/classes``, ``/classes/{id}/students``,
  ``limit``/``offset``, ``X-Total-Count``, ``Link`` (first/prev/next/last),
  ``filter=dateLastModified>'...'`` (or ``>=``); 400 on any other filter.
* Records carry ``href``s on another host (``https://elsewhere.invalid``), as ClassLink's can.
* Pages are built from JSON bytes encoded once per record, so a million records serve quickly.

Tests change the roster between runs (``srv.roster = ...``, :meth:`FakeOneRoster.update`,
:meth:`~FakeOneRoster.delete`, :meth:`~FakeOneRoster.remove`, :meth:`~FakeOneRoster.add`,
:meth:`~FakeOneRoster.add_raw`), switch on server quirks (:class:`Quirks`) and faults
(:class:`Faults`: N x 429 with ``Retry-After``, N x 500, N x 404, dropped connections, slow
answers, the same page for every offset, "down after K requests"), and read ``srv.requests``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import random
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit
from urllib.request import parse_http_list, parse_keqv_list

from rostersync.source.records import (
    STUDENT,
    TEACHER,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
)
from rostersync.source.testing import MemoryRoster

BASE_PATHS = {"1.1": "/ims/oneroster/v1p1", "1.2": "/ims/oneroster/rostering/v1p2"}
HREF_HOST = "https://elsewhere.invalid"
#: dateLastModified of records that have none.
DEFAULT_MODIFIED = datetime(2025, 1, 1, tzinfo=UTC)

Version = Literal["1.1", "1.2"]
AuthMode = Literal["oauth1", "oauth2", "bearer", "none"]
Record = RosterOrg | RosterPerson | RosterClass | RosterEnrollment | dict[str, Any]

#: entity name or collection name -> collection name
COLLECTION = {
    "org": "orgs",
    "orgs": "orgs",
    "user": "users",
    "users": "users",
    "person": "users",
    "class": "classes",
    "classes": "classes",
    "enrollment": "enrollments",
    "enrollments": "enrollments",
}
SINGULAR = {"orgs": "org", "users": "user", "classes": "class", "enrollments": "enrollment"}
_FILTER = re.compile(r"^\s*dateLastModified\s*(>=|>)\s*'([^']+)'\s*$")


@dataclass
class Faults:
    """Failures to inject into data requests (not ``/token``); counters count down."""

    rate_limit: int = 0  # the next N requests answer 429
    retry_after: str | None = "0"  # their Retry-After: seconds or an HTTP date; None omits it
    server_error: int = 0  # the next N requests answer 500
    not_found: int = 0  # the next N requests answer 404 (a client error: not retried)
    drop: int = 0  # the next N requests: the socket is closed without an answer
    delay: float = 0.0  # seconds to wait before each answer
    down_after: int | None = None  # after K requests, every connection is dropped
    only: str | None = None  # apply the faults above only to paths containing this
    from_offset: int = 0  # ... and only to pages at this offset or later


@dataclass
class Quirks:
    """Ways real servers differ; the defaults are a well-behaved server."""

    total_count: bool = True  # send X-Total-Count
    link_header: bool = True  # send Link
    link_host: str | None = None  # put this scheme://host in Link URLs (default: ours)
    max_limit: int = 10000  # cap `limit` silently, as some servers do
    filters: Literal["supported", "reject", "ignore"] = "supported"
    teachers_in_class_students: bool = False  # /classes/{id}/students lists teachers too
    same_page: bool = False  # ignore `offset`: every request gets the first page
    #: pages at these offsets lose their last record after the limit is applied (a server
    #: that filters records out of a page, so a short page is not the collection's end)
    short_pages: tuple[int, ...] = ()


@dataclass
class RecordedRequest:
    """One request as it arrived; ``status`` is filled in once it is answered."""

    method: str
    path: str  # the URL path, without the query
    params: dict[str, str]
    headers: dict[str, str]
    status: int | None = None  # None while in flight, 0 when the connection was dropped

    @property
    def endpoint(self) -> str:
        """The path below the version's base path (``/users``), or the path itself."""
        for base in BASE_PATHS.values():
            if self.path.startswith(base + "/"):
                return self.path[len(base) :]
        return self.path


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


_DROP = None  # a handler answer meaning: close the socket without a word


def _stamp(value: datetime | None) -> str:
    when = (value or DEFAULT_MODIFIED).astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _ref(kind: str, sourced_id: str) -> dict[str, str]:
    return {"href": f"{HREF_HOST}/{kind}s/{sourced_id}", "sourcedId": sourced_id, "type": kind}


def _bool(value: bool) -> str:
    return "true" if value else "false"


def encode_record(record: Record, version: Version, schools: dict[str, str]) -> dict[str, Any]:
    """The OneRoster JSON object for a record (raw dicts are served as given)."""
    if isinstance(record, dict):
        return record
    base: dict[str, Any] = {
        "sourcedId": record.sourced_id,
        "status": record.status,
        "dateLastModified": _stamp(record.date_last_modified),
        "metadata": {},
    }
    if isinstance(record, RosterOrg):
        base.update(name=record.name, type=record.type, identifier=record.identifier or "")
        if record.parent_id:
            base["parent"] = _ref("org", record.parent_id)
        base["children"] = []
    elif isinstance(record, RosterPerson):
        base.update(
            username=record.username or "",
            userIds=[],
            enabledUser=_bool(record.enabled),
            givenName=record.given_name,
            familyName=record.family_name,
            middleName="",
            identifier="",
            email=record.email or "",
            sms="",
            phone="",
            agents=[],
        )
        if version == "1.1":
            base["role"] = record.role
            base["orgs"] = [_ref("org", o) for o in record.org_ids]
        else:
            base["roles"] = [
                {"roleType": "primary" if n == 0 else "secondary", "role": record.role}
                | {"org": _ref("org", o)}
                for n, o in enumerate(record.org_ids)
            ] or [{"roleType": "primary", "role": record.role}]
            if record.org_ids:
                base["primaryOrg"] = _ref("org", record.org_ids[0])
    elif isinstance(record, RosterClass):
        base.update(
            title=record.title,
            classCode=record.class_code or "",
            classType="scheduled",
            location="",
            grades=[],
            subjects=[],
            course=_ref("course", f"crs-{record.sourced_id}"),
            terms=[],
        )
        if record.school_id:
            base["school"] = _ref("org", record.school_id)
    else:
        base.update(
            user=_ref("user", record.user_id),
            **{"class": _ref("class", record.class_id)},
            role=record.role,
            primary=_bool(record.primary),
            beginDate="2025-08-15",
            endDate="2026-06-15",
        )
        if school := schools.get(record.class_id):
            base["school"] = _ref("org", school)
    return base


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _parse_modified(obj: dict[str, Any]) -> datetime | None:
    value = obj.get("dateLastModified")
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class _Table:
    """One collection: records, their JSON bytes and dates, by position."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.blobs: list[bytes] = []
        self.modified: list[datetime | None] = []
        self.index: dict[str, int] = {}

    def put(self, record: Record, blob: bytes) -> None:
        sourced_id = _record_id(record)
        modified = (
            _parse_modified(record) if isinstance(record, dict) else record.date_last_modified
        )
        at = self.index.get(sourced_id) if sourced_id is not None else None
        if at is None:
            if sourced_id is not None:
                self.index[sourced_id] = len(self.records)
            self.records.append(record)
            self.blobs.append(blob)
            self.modified.append(modified or DEFAULT_MODIFIED)
        else:
            self.records[at] = record
            self.blobs[at] = blob
            self.modified[at] = modified or DEFAULT_MODIFIED

    def remove(self, sourced_id: str) -> None:
        at = self.index.pop(sourced_id)
        del self.records[at], self.blobs[at], self.modified[at]
        self.index = {k: (v - 1 if v > at else v) for k, v in self.index.items()}


def _record_id(record: Record) -> str | None:
    if isinstance(record, dict):
        value = record.get("sourcedId")
        return value if isinstance(value, str) else None
    return record.sourced_id


def _percent(text: str) -> str:
    """RFC 5849 section 3.6 percent-encoding (unreserved characters stay)."""
    return quote(text, safe="-._~")


def oauth1_base_string(method: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """RFC 5849 section 3.4.1, written out here so the client's signing is checked independently."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    netloc = host if parts.port in (None, default) else f"{host}:{parts.port}"
    base_uri = f"{parts.scheme.lower()}://{netloc.lower()}{parts.path or '/'}"
    pairs = sorted(
        (_percent(k), _percent(v)) for k, v in params if k not in ("oauth_signature", "realm")
    )
    normalized = "&".join(f"{k}={v}" for k, v in pairs)
    return "&".join((_percent(method.upper()), _percent(base_uri), _percent(normalized)))


def oauth1_hmac_sha256(base_string: str, client_secret: str) -> str:
    key = f"{_percent(client_secret)}&".encode()
    return base64.b64encode(hmac.new(key, base_string.encode(), hashlib.sha256).digest()).decode()


def _imsx(status: int, description: str, code: str = "failure") -> _Reply:
    body = {"imsx_codeMajor": code, "imsx_severity": "error", "imsx_description": description}
    return _Reply(status, _dumps(body), {"Content-Type": "application/json"})


class FakeOneRoster:
    """The fake server; see the module docstring. Start it with ``with`` or :meth:`start`."""

    def __init__(
        self,
        roster: MemoryRoster | None = None,
        *,
        version: Version = "1.1",
        auth: AuthMode | None = None,
        client_id: str = "fake-client",
        client_secret: str = "fake-secret",  # noqa: S107 - a test fake's well-known secret
        bearer_token: str = "fake-static-token",  # noqa: S107
        token_ttl: float = 3600.0,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        quirks: Quirks | None = None,
        record_requests: bool = True,
    ) -> None:
        self.version: Version = version
        self.auth: AuthMode = auth or ("oauth1" if version == "1.1" else "oauth2")
        self.client_id = client_id
        self.client_secret = client_secret
        self.bearer_token = bearer_token
        self.token_ttl = token_ttl
        self.faults = faults or Faults()
        self.quirks = quirks or Quirks()
        self.record_requests = record_requests
        self.requests: list[RecordedRequest] = []
        self.tokens_issued = 0
        self._tokens: dict[str, float] = {}
        self._lock = threading.RLock()
        self._tables: dict[str, _Table] = {}
        self._filtered: dict[tuple[str, str, datetime], list[int]] = {}
        self._relations: tuple[dict[str, list[str]], dict[str, list[str]]] | None = None
        self._role_positions: dict[str, list[int]] = {}
        self._schools: dict[str, str] = {}
        self._data_requests = 0
        self._last_stamp = DEFAULT_MODIFIED
        self._host, self._port = host, port
        self._server: _HTTPServer | None = None
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None
        self.roster = roster if roster is not None else MemoryRoster()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeOneRoster:
        server = _HTTPServer((self._host, self._port), _Handler, self)
        self._server = server
        self._bound_port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.stopping.set()
        server.close_connections()
        server.server_close()  # joins the handler threads
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FakeOneRoster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("the fake server has not been started")
        return self._bound_port

    @property
    def origin(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + BASE_PATHS[self.version]

    @property
    def token_url(self) -> str:
        return self.origin + "/token"

    def auth_config(self) -> dict[str, str]:
        """The source's ``auth`` block that this server accepts."""
        if self.auth == "oauth1":
            return {
                "type": "oauth1",
                "client_id": self.client_id,
                "client_secret": self.client_secret,
            }
        if self.auth == "oauth2":
            return {
                "type": "oauth2",
                "token_url": self.token_url,
                "client_id": self.client_id,
                "client_secret": self.client_secret,
            }
        return {"type": "bearer", "token": self.bearer_token}

    def source_config(self, **overrides: Any) -> dict[str, Any]:
        """A complete ``type: oneroster`` source block for this server."""
        return {
            "type": "oneroster",
            "base_url": self.base_url,
            "auth": self.auth_config(),
        } | overrides

    # -- the data ------------------------------------------------------------------------------

    @property
    def roster(self) -> MemoryRoster:
        """The records served now (raw records added with :meth:`add_raw` are left out)."""
        with self._lock:
            out = MemoryRoster()
            lists: dict[str, list[Any]] = {
                "orgs": out.orgs,
                "users": out.persons,
                "classes": out.classes,
                "enrollments": out.enrollments,
            }
            for name, table in self._tables.items():
                lists[name].extend(r for r in table.records if not isinstance(r, dict))
            return out

    @roster.setter
    def roster(self, roster: MemoryRoster) -> None:
        with self._lock:
            self._schools = {c.sourced_id: c.school_id for c in roster.classes if c.school_id}
            self._tables = {name: _Table() for name in SINGULAR}
            groups: list[tuple[str, Sequence[Record]]] = [
                ("orgs", roster.orgs),
                ("users", roster.persons),
                ("classes", roster.classes),
                ("enrollments", roster.enrollments),
            ]
            for name, records in groups:
                table = self._tables[name]
                for record in records:
                    table.put(record, self._encode(record))
                    if not isinstance(record, dict) and record.date_last_modified:
                        self._last_stamp = max(self._last_stamp, record.date_last_modified)
            self._changed()

    def _encode(self, record: Record) -> bytes:
        return _dumps(encode_record(record, self.version, self._schools))

    def _changed(self) -> None:
        self._filtered.clear()
        self._relations = None
        self._role_positions.clear()

    def next_stamp(self) -> datetime:
        """A dateLastModified later than every one served so far (and not before now)."""
        with self._lock:
            stamp = max(datetime.now(UTC), self._last_stamp + timedelta(milliseconds=1))
            stamp = stamp.replace(microsecond=stamp.microsecond // 1000 * 1000)
            if stamp <= self._last_stamp:
                stamp = self._last_stamp + timedelta(milliseconds=1)
            self._last_stamp = stamp
            return stamp

    def _spread_stamps(
        self, counts: Sequence[int], spread: float, rng: random.Random
    ) -> list[list[datetime]]:
        """Dates for ``counts`` changes (a list of that many per count), each later than every
        date served so far and none after now (unless that one is: then a millisecond after
        it), at random in the ``spread`` seconds before now, all drawn from the one window
        (two changes may share a date, as they do on a real server); all :meth:`next_stamp`'s
        one when ``spread`` is 0."""
        if spread <= 0:
            stamp = self.next_stamp()
            return [[stamp] * n for n in counts]
        with self._lock:
            low = max(datetime.now(UTC) - timedelta(seconds=spread), self._last_stamp)
            low = low.replace(microsecond=low.microsecond // 1000 * 1000)  # as served
            high = max(datetime.now(UTC), low + timedelta(milliseconds=1))
            width = (high - low).total_seconds() * 1000  # in milliseconds, past ``low``
            out = [
                [
                    low + timedelta(milliseconds=1 + int(rng.random() * (width - 1)))
                    for _ in range(n)
                ]
                for n in counts
            ]
            self._last_stamp = max([self._last_stamp, *(s for each in out for s in each)])
            return out

    def _find(self, entity: str, sourced_id: str) -> tuple[_Table, int]:
        table = self._tables[COLLECTION[entity]]
        if sourced_id not in table.index:
            raise KeyError(f"no {entity} {sourced_id!r}")
        return table, table.index[sourced_id]

    def add(self, record: RosterOrg | RosterPerson | RosterClass | RosterEnrollment) -> None:
        """Serve a new (or replace an existing) record, stamped now unless it has a date."""
        with self._lock:
            if record.date_last_modified is None:
                record = replace(record, date_last_modified=self.next_stamp())
            if isinstance(record, RosterClass) and record.school_id:
                self._schools[record.sourced_id] = record.school_id
            self._tables[COLLECTION[record.entity]].put(record, self._encode(record))
            self._changed()

    def add_raw(self, collection: str, obj: dict[str, Any]) -> None:
        """Serve a JSON object exactly as given (e.g. one that breaks the schema)."""
        with self._lock:
            self._tables[COLLECTION[collection]].put(obj, _dumps(obj))
            self._changed()

    def update(self, entity: str, sourced_id: str, **changes: Any) -> None:
        """Change a record's fields and stamp it with a new dateLastModified."""
        with self._lock:
            table, at = self._find(entity, sourced_id)
            record = table.records[at]
            if isinstance(record, dict):
                raise TypeError("raw records cannot be updated; add_raw a new one")
            changes.setdefault("date_last_modified", self.next_stamp())
            updated = replace(record, **changes)
            table.put(updated, self._encode(updated))
            self._changed()

    def delete(self, entity: str, sourced_id: str) -> None:
        """Mark a record ``tobedeleted`` (what a delta feed shows), with a new date."""
        self.update(entity, sourced_id, status="tobedeleted")

    def remove(self, entity: str, sourced_id: str) -> None:
        """Stop serving a record at all (what a full run must sweep)."""
        with self._lock:
            self._find(entity, sourced_id)
            self._tables[COLLECTION[entity]].remove(sourced_id)
            self._changed()

    def mutate_fraction(
        self, fraction: float, seed: int = 0, spread: float = 0.0
    ) -> dict[str, int]:
        """Change about ``fraction`` of the users, classes and enrollments (the 1% benchmark).

        Users get a new family name, classes a new title, enrollments turn ``tobedeleted``.
        ``spread``: each change is dated at a random moment of the ``spread`` seconds before
        now (after every date served so far), as a day's changes are when the nightly run
        reads them; 0 dates them all now.
        """
        rng = random.Random(seed)
        counts: dict[str, int] = {}
        with self._lock:
            names = ("users", "classes", "enrollments")
            picks = []
            for name in names:
                table = self._tables[name]
                candidates = [i for i, r in enumerate(table.records) if not isinstance(r, dict)]
                picks.append(rng.sample(candidates, round(len(candidates) * fraction)))
            dates = self._spread_stamps([len(p) for p in picks], spread, rng)
            for name, chosen, stamps in zip(names, picks, dates, strict=True):
                table = self._tables[name]
                for at, stamp in zip(chosen, stamps, strict=True):
                    record = table.records[at]
                    if isinstance(record, RosterPerson):
                        new: Record = replace(
                            record, family_name=record.family_name + "-x", date_last_modified=stamp
                        )
                    elif isinstance(record, RosterClass):
                        new = replace(
                            record, title=record.title + " (moved)", date_last_modified=stamp
                        )
                    elif isinstance(record, RosterEnrollment):
                        new = replace(record, status="tobedeleted", date_last_modified=stamp)
                    else:
                        continue
                    table.records[at] = new
                    table.blobs[at] = self._encode(new)
                    table.modified[at] = stamp
                counts[name] = len(chosen)
            self._changed()
        return counts

    def revoke_tokens(self) -> None:
        """Forget every OAuth2 token issued, as a server restart or a revocation would."""
        with self._lock:
            self._tokens.clear()

    def data_requests(self) -> list[RecordedRequest]:
        """Recorded requests below the base path (not /token)."""
        with self._lock:
            return [r for r in self.requests if r.path.startswith(BASE_PATHS[self.version])]

    # -- request handling ----------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> _Reply | None:
        url = urlsplit(target)
        path = url.path
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if path.startswith("/_admin/"):
            return self._admin(method, path, params, body)
        seen = RecordedRequest(method, path, params, dict(headers))
        if self.record_requests:
            with self._lock:
                self.requests.append(seen)
        if path == "/token":
            reply: _Reply | None = self._token(method, headers, body)
        else:
            reply = self._data(method, path, params, headers)
        seen.status = reply.status if reply else 0
        return reply

    def _fault(self, path: str, params: dict[str, str]) -> _Reply | Literal[False] | None:
        """The injected fault for this request, or False when none applies."""
        f = self.faults
        with self._lock:
            self._data_requests += 1
            if f.down_after is not None and self._data_requests > f.down_after:
                return _DROP
            if not self._targeted(path, params):
                return False
            if f.drop > 0:
                f.drop -= 1
                return _DROP
            if f.rate_limit > 0:
                f.rate_limit -= 1
                reply = _imsx(429, "server busy, try again later")
                if f.retry_after is not None:
                    reply.headers["Retry-After"] = f.retry_after
                return reply
            if f.server_error > 0:
                f.server_error -= 1
                return _imsx(500, "internal error (injected)")
            if f.not_found > 0:
                f.not_found -= 1
                return _imsx(404, "not found (injected)")
        return False

    def _targeted(self, path: str, params: dict[str, str]) -> bool:
        """Whether the faults apply to this request (``only`` and ``from_offset``)."""
        f = self.faults
        if f.only is not None and f.only not in path:
            return False
        return not f.from_offset or int(params.get("offset") or 0) >= f.from_offset

    def _data(
        self, method: str, path: str, params: dict[str, str], headers: dict[str, str]
    ) -> _Reply | None:
        base = BASE_PATHS[self.version]
        if not path.startswith(base + "/"):
            return _imsx(404, f"no such path {path}", "failure")
        fault = self._fault(path, params)
        if fault is not False:
            return fault
        if self.faults.delay and self._targeted(path, params):
            server = self._server
            if server is not None:
                server.stopping.wait(self.faults.delay)
        denied = self._check_auth(method, path, params, headers)
        if denied is not None:
            return denied
        if method != "GET":
            return _imsx(405, f"{method} is not supported")
        parts = path[len(base) + 1 :].split("/")
        with self._lock:
            return self._route(path, parts, params)

    def _route(self, path: str, parts: list[str], params: dict[str, str]) -> _Reply:
        if len(parts) == 1 and parts[0] in SINGULAR:
            return self._page(path, parts[0], parts[0], params, None, filterable=True)
        if len(parts) == 1 and parts[0] in ("teachers", "students"):
            role = TEACHER if parts[0] == "teachers" else STUDENT
            return self._page(path, "users", "users", params, self._by_role(role), filterable=True)
        if len(parts) == 2 and parts[0] in (*SINGULAR, "teachers", "students"):
            name = COLLECTION.get(parts[0], "users")
            table = self._tables[name]
            at = table.index.get(parts[1])
            if at is None:
                return _imsx(404, f"no {SINGULAR[name]} {parts[1]!r}", "failure")
            key = SINGULAR[name].encode()
            body = b'{"' + key + b'":' + table.blobs[at] + b"}"
            return _Reply(200, body, {"Content-Type": "application/json"})
        if len(parts) == 3 and parts[0] == "teachers" and parts[2] == "classes":
            classes_of, _ = self._relation_maps()
            if parts[1] not in self._tables["users"].index:
                return _imsx(404, f"no teacher {parts[1]!r}")
            index = self._tables["classes"].index
            positions = [index[c] for c in classes_of.get(parts[1], []) if c in index]
            return self._page(path, "classes", "classes", params, positions, filterable=False)
        if len(parts) == 3 and parts[0] == "classes" and parts[2] == "students":
            _, members_of = self._relation_maps()
            if parts[1] not in self._tables["classes"].index:
                return _imsx(404, f"no class {parts[1]!r}")
            index = self._tables["users"].index
            positions = [index[u] for u in members_of.get(parts[1], []) if u in index]
            return self._page(path, "users", "users", params, positions, filterable=False)
        return _imsx(404, f"no such endpoint {path}")

    def _by_role(self, role: str) -> list[int]:
        if role not in self._role_positions:
            self._role_positions[role] = [
                i
                for i, r in enumerate(self._tables["users"].records)
                if isinstance(r, RosterPerson) and r.role == role
            ]
        return self._role_positions[role]

    def _relation_maps(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """teacher -> class ids, and class -> the ids its students answer lists."""
        if self._relations is None:
            classes_of: dict[str, list[str]] = {}
            members_of: dict[str, list[str]] = {}
            for e in self._tables["enrollments"].records:
                if not isinstance(e, RosterEnrollment) or e.status != "active":
                    continue
                if e.role == TEACHER:
                    classes_of.setdefault(e.user_id, []).append(e.class_id)
                    if self.quirks.teachers_in_class_students:
                        members_of.setdefault(e.class_id, []).append(e.user_id)
                elif e.role == STUDENT:
                    members_of.setdefault(e.class_id, []).append(e.user_id)
            self._relations = (classes_of, members_of)
        return self._relations

    def _positions(self, name: str, params: dict[str, str]) -> list[int] | range | _Reply:
        table = self._tables[name]
        text = params.get("filter")
        if text is None or self.quirks.filters == "ignore":
            return range(len(table.blobs))
        match = _FILTER.match(text)
        if self.quirks.filters == "reject" or match is None:
            return _imsx(400, f"unsupported filter {text!r}", "failure")
        try:
            since = datetime.fromisoformat(match.group(2))
        except ValueError:
            return _imsx(400, f"bad date in filter {text!r}")
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
        key = (name, match.group(1), since)
        if key not in self._filtered:
            inclusive = match.group(1) == ">="
            self._filtered[key] = [
                i
                for i, m in enumerate(table.modified)
                if m is not None and (m > since or (inclusive and m == since))
            ]
        return self._filtered[key]

    def _page(
        self,
        path: str,
        name: str,
        key: str,
        params: dict[str, str],
        positions: list[int] | None,
        *,
        filterable: bool,
    ) -> _Reply:
        try:
            limit = int(params.get("limit", "100"))
            offset = int(params.get("offset", "0"))
        except ValueError:
            return _imsx(400, "limit and offset must be integers")
        if limit < 1 or offset < 0:
            return _imsx(400, "limit must be positive and offset not negative")
        limit = min(limit, self.quirks.max_limit)
        table = self._tables[name]
        chosen: list[int] | range
        if positions is None or filterable:
            found = self._positions(name, params) if filterable else range(len(table.blobs))
            if isinstance(found, _Reply):
                return found
            chosen = found
            if positions is not None:
                allowed = set(positions)
                chosen = [i for i in found if i in allowed]
        else:
            chosen = positions
        total = len(chosen)
        start = 0 if self.quirks.same_page else offset
        window = chosen[start : start + limit]
        if offset in self.quirks.short_pages and len(window) > 1:
            window = window[:-1]
        if isinstance(window, range) and window.step == 1:
            items = table.blobs[window.start : window.stop]
        else:
            items = [table.blobs[i] for i in window]
        body = b'{"' + key.encode() + b'":[' + b",".join(items) + b"]}"
        headers = {"Content-Type": "application/json"}
        if self.quirks.total_count:
            headers["X-Total-Count"] = str(total)
        if self.quirks.link_header:
            headers["Link"] = self._links(path, params, offset, limit, total)
        return _Reply(200, body, headers)

    def _links(self, path: str, params: dict[str, str], offset: int, limit: int, total: int) -> str:
        origin = self.quirks.link_host or self.origin

        def url(at: int) -> str:
            query = {**params, "limit": str(limit), "offset": str(at)}
            return f"<{origin}{path}?{urlencode(query)}>"

        last = max(0, (total - 1) // limit * limit)
        links = [f'{url(0)}; rel="first"', f'{url(last)}; rel="last"']
        if offset + limit < total:
            links.append(f'{url(offset + limit)}; rel="next"')
        if offset > 0:
            links.append(f'{url(max(0, offset - limit))}; rel="prev"')
        return ", ".join(links)

    # -- auth ----------------------------------------------------------------------------------

    def _check_auth(
        self, method: str, path: str, params: dict[str, str], headers: dict[str, str]
    ) -> _Reply | None:
        header = headers.get("authorization", "")
        if self.auth == "none":
            return None
        if self.auth == "oauth1":
            problem = self._check_oauth1(method, path, params, headers, header)
        else:
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if self.auth == "bearer":
                ok = bool(token) and hmac.compare_digest(token, self.bearer_token)
            else:
                with self._lock:
                    expires = self._tokens.get(token)
                ok = expires is not None and expires > time.monotonic()
            problem = None if ok else "missing, unknown or expired bearer token"
        if problem is None:
            return None
        reply = _imsx(401, problem, "failure")
        reply.headers["WWW-Authenticate"] = "OAuth" if self.auth == "oauth1" else "Bearer"
        return reply

    def _check_oauth1(
        self,
        method: str,
        path: str,
        params: dict[str, str],
        headers: dict[str, str],
        header: str,
    ) -> str | None:
        if not header.lower().startswith("oauth "):
            return "no OAuth Authorization header"
        try:
            oauth = {k: unquote(v) for k, v in parse_keqv_list(parse_http_list(header[6:])).items()}
        except ValueError:
            return "malformed OAuth header"
        if oauth.get("oauth_consumer_key") != self.client_id:
            return "unknown consumer key"
        if oauth.get("oauth_signature_method") != "HMAC-SHA256":
            return f"signature method {oauth.get('oauth_signature_method')!r} is not HMAC-SHA256"
        try:
            if abs(time.time() - int(oauth.get("oauth_timestamp", ""))) > 600:
                return "timestamp too far from now"
        except ValueError:
            return "bad timestamp"
        if not oauth.get("oauth_nonce"):
            return "no nonce"
        host = headers.get("host", f"{self._host}:{self.port}")
        all_params = [*params.items(), *((k, v) for k, v in oauth.items() if k != "realm")]
        expected = oauth1_hmac_sha256(
            oauth1_base_string(method, f"http://{host}{path}", all_params), self.client_secret
        )
        if not hmac.compare_digest(expected, oauth.get("oauth_signature", "")):
            return "invalid signature"
        return None

    def _token(self, method: str, headers: dict[str, str], body: bytes) -> _Reply:
        if method != "POST":
            return _Reply(405, _dumps({"error": "invalid_request"}))
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        client_id, secret = form.get("client_id"), form.get("client_secret")
        header = headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:].strip()).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            client_id, _, secret = decoded.partition(":")
        json_headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        if client_id != self.client_id or not hmac.compare_digest(secret or "", self.client_secret):
            return _Reply(401, _dumps({"error": "invalid_client"}), json_headers)
        if form.get("grant_type") != "client_credentials":
            return _Reply(400, _dumps({"error": "unsupported_grant_type"}), json_headers)
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_ttl
            self.tokens_issued += 1
        answer = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int(self.token_ttl),
            "scope": form.get("scope", ""),
        }
        return _Reply(200, _dumps(answer), json_headers)

    # -- remote control (for a server in another process) --------------------------------------

    def _admin(self, method: str, path: str, params: dict[str, str], body: bytes) -> _Reply:
        if path == "/_admin/stats":
            with self._lock:
                stats = {
                    "data_requests": self._data_requests,
                    "tokens_issued": self.tokens_issued,
                    "records": {n: len(t.blobs) for n, t in self._tables.items()},
                }
            return _Reply(200, _dumps(stats), {"Content-Type": "application/json"})
        if path == "/_admin/mutate" and method == "POST":
            counts = self.mutate_fraction(
                float(params.get("fraction", "0.01")),
                int(params.get("seed", "0")),
                float(params.get("spread", "0")),
            )
            return _Reply(200, _dumps(counts), {"Content-Type": "application/json"})
        if path == "/_admin/faults" and method == "POST":
            wanted = json.loads(body or b"{}")
            names = {f.name for f in fields(Faults)}
            with self._lock:
                self.faults = Faults(**{k: v for k, v in wanted.items() if k in names})
                self._data_requests = 0
            return _Reply(200, b"{}", {"Content-Type": "application/json"})
        return _Reply(404, b"{}", {"Content-Type": "application/json"})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins handler threads: nothing outlives stop()
    block_on_close = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], app: FakeOneRoster
    ) -> None:
        self.app = app
        self.stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake handlers idling on keep-alive connections so their threads can end."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (timeout tests, dropped connections) is not a server bug.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    timeout = 30  # an idle keep-alive connection is closed after this
    # Headers and body go out in separate writes; with Nagle on, each answer would stall on
    # the client's delayed ACK (~40 ms on Linux).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read srv.requests instead of a log on stderr

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.server.app.handle(self.command, self.path, headers, body)
        if reply is None:
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    do_GET = _serve
    do_POST = _serve


def main(argv: Sequence[str] | None = None, *, ready: Callable[[str], None] | None = None) -> int:
    """Serve a generated district until interrupted (the benchmark runs this in a process)."""
    from rostersync.sampledata import DistrictSpec, generate_district

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--version", choices=["1.1", "1.2"], default="1.1")
    parser.add_argument("--auth", choices=["oauth1", "oauth2", "bearer", "none"], default=None)
    parser.add_argument("--client-id", default="fake-client")
    parser.add_argument("--client-secret", default="fake-secret")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--schools", type=int, default=3)
    parser.add_argument("--teachers", type=int, default=40)
    parser.add_argument("--students", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--students-per-class", type=int, default=25)
    parser.add_argument("--no-edge-cases", action="store_true")
    args = parser.parse_args(argv)
    spec = DistrictSpec(
        seed=args.seed,
        schools=args.schools,
        teachers=args.teachers,
        students=args.students,
        classes=args.classes,
        students_per_class=args.students_per_class,
        edge_cases=not args.no_edge_cases,
    )
    started = time.monotonic()
    srv = FakeOneRoster(
        generate_district(spec),
        version=args.version,
        auth=args.auth,
        client_id=args.client_id,
        client_secret=args.client_secret,
        host=args.host,
        port=args.port,
        record_requests=False,
    )
    with srv:
        line = json.dumps(
            {
                "base_url": srv.base_url,
                "token_url": srv.token_url,
                "auth": srv.auth_config(),
                "records": {n: len(t.blobs) for n, t in srv._tables.items()},
                "load_seconds": round(time.monotonic() - started, 2),
            }
        )
        (ready or print)(line)
        sys.stdout.flush()
        stop = threading.Event()
        # SIGTERM (the benchmark stopping us) ends the process as cleanly as Ctrl-C.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

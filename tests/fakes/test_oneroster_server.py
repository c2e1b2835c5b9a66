"""The fake OneRoster server itself: auth checks, paging headers, filters, relations, faults."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from connectors.oneroster.auth import OAuth1Signer
from rostersync.source.records import RosterClass, RosterEnrollment, RosterPerson
from rostersync.source.testdata import small_roster
from tests.fakes.oneroster_server import DEFAULT_MODIFIED, FakeOneRoster, Faults, Quirks

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def v11() -> Iterator[FakeOneRoster]:
    with FakeOneRoster(small_roster(), version="1.1") as srv:
        yield srv


def signed(srv: FakeOneRoster, secret: str | None = None) -> httpx.Client:
    return httpx.Client(
        base_url=srv.base_url, auth=OAuth1Signer(srv.client_id, secret or srv.client_secret)
    )


def ids(response: httpx.Response, key: str = "users") -> list[str]:
    return [r["sourcedId"] for r in response.json()[key]]


# -- auth ------------------------------------------------------------------------------------


def test_oauth1_valid_signature_passes_and_bad_ones_get_401(v11: FakeOneRoster) -> None:
    """A correctly signed request is served; a wrong secret or no signature answers 401."""
    with signed(v11) as good, signed(v11, "not-the-secret") as bad:
        assert good.get("/users", params={"limit": 2}).status_code == 200
        refused = bad.get("/users")
    assert refused.status_code == 401
    assert refused.json()["imsx_codeMajor"] == "failure"
    assert httpx.get(v11.base_url + "/users").status_code == 401


def test_oauth1_signature_covers_the_query_string(v11: FakeOneRoster) -> None:
    """A signature made for one query is refused on another: the query is in the base string."""
    request = httpx.Request("GET", v11.base_url + "/users?limit=1")
    flow = OAuth1Signer(v11.client_id, v11.client_secret).auth_flow(request)
    header = next(flow).headers["Authorization"]
    with httpx.Client() as client:
        same = client.get(v11.base_url + "/users?limit=1", headers={"Authorization": header})
        other = client.get(v11.base_url + "/users?limit=5", headers={"Authorization": header})
    assert same.status_code == 200
    assert other.status_code == 401


def test_oauth2_token_endpoint_and_bearer_check() -> None:
    """/token issues tokens for the right client only; data requests need a live token."""
    with FakeOneRoster(small_roster(), version="1.2") as srv, httpx.Client() as client:
        assert (
            client.post(srv.token_url, data={"grant_type": "client_credentials"}).status_code == 401
        )
        wrong = client.post(
            srv.token_url, data={"grant_type": "client_credentials"}, auth=(srv.client_id, "x")
        )
        assert wrong.status_code == 401
        answer = client.post(
            srv.token_url,
            data={"grant_type": "client_credentials"},
            auth=(srv.client_id, srv.client_secret),
        )
        token = answer.json()["access_token"]
        assert answer.json()["expires_in"] == 3600
        ok = client.get(srv.base_url + "/users", headers={"Authorization": f"Bearer {token}"})
        bogus = client.get(srv.base_url + "/users", headers={"Authorization": "Bearer nope"})
        srv.revoke_tokens()
        revoked = client.get(srv.base_url + "/users", headers={"Authorization": f"Bearer {token}"})
    assert (ok.status_code, bogus.status_code, revoked.status_code) == (200, 401, 401)
    assert srv.tokens_issued == 1
    assert all("roles" in u and "role" not in u for u in ok.json()["users"])


# -- paging and filters ----------------------------------------------------------------------


def test_paging_headers(v11: FakeOneRoster) -> None:
    """limit/offset pages carry X-Total-Count and Link first/last/next/prev."""
    with signed(v11) as client:
        page = client.get("/users", params={"limit": 3, "offset": 3})
        last = client.get("/users", params={"limit": 3, "offset": 6})
    assert ids(page) == ["t-1", "t-2", "t-3", "s-1", "s-2", "s-3", "s-4", "s-5"][3:6]
    assert page.headers["X-Total-Count"] == "8"
    assert set(page.links) == {"first", "last", "next", "prev"}
    assert "offset=6" in page.links["next"]["url"]
    assert page.links["next"]["url"].startswith(v11.origin)
    assert "next" not in last.links and len(ids(last)) == 2


def test_quirks_cap_limit_and_drop_headers() -> None:
    """max_limit caps pages silently; headers can be switched off; same_page ignores offset."""
    quirks = Quirks(max_limit=2, total_count=False, link_header=False, same_page=True)
    with FakeOneRoster(small_roster(), quirks=quirks) as srv, signed(srv) as client:
        first = client.get("/users", params={"limit": 100, "offset": 0})
        second = client.get("/users", params={"limit": 100, "offset": 2})
    assert ids(first) == ids(second) == ["t-1", "t-2"]
    assert "X-Total-Count" not in first.headers and "Link" not in first.headers


def test_date_filter_and_unsupported_filters(v11: FakeOneRoster) -> None:
    """dateLastModified> returns what changed; other filters answer 400."""
    v11.update("user", "s-2", given_name="Changed")
    since = "dateLastModified>'" + DEFAULT_MODIFIED.strftime("%Y-%m-%dT%H:%M:%SZ") + "'"
    with signed(v11) as client:
        changed = client.get("/users", params={"filter": since})
        other = client.get("/users", params={"filter": "givenName='Ada'"})
    assert ids(changed) == ["s-2"]
    assert changed.headers["X-Total-Count"] == "1"
    assert other.status_code == 400


@pytest.mark.parametrize(("mode", "status", "count"), [("reject", 400, None), ("ignore", 200, 8)])
def test_filter_quirks(mode: str, status: int, count: int | None) -> None:
    """A server can refuse every filter (400) or ignore filters (everything)."""
    with FakeOneRoster(small_roster(), quirks=Quirks(filters=mode)) as srv, signed(srv) as c:  # type: ignore[arg-type]
        answer = c.get("/users", params={"filter": "dateLastModified>'2030-01-01T00:00:00Z'"})
    assert answer.status_code == status
    if count is not None:
        assert len(ids(answer)) == count


# -- relations, single records, mutations ----------------------------------------------------


def test_relation_and_single_record_endpoints(v11: FakeOneRoster) -> None:
    """Teacher classes, class students (teachers only with the quirk) and /users/{id}."""
    with signed(v11) as client:
        classes = client.get("/teachers/t-1/classes")
        students = client.get("/classes/c-2/students")
        one = client.get("/users/t-1")
        missing = client.get("/users/nobody")
        teachers = client.get("/teachers")
    assert ids(classes, "classes") == ["c-1", "c-2"]
    assert ids(students) == ["s-3", "s-4", "s-5"]
    assert one.json()["user"]["email"] == "ada@example.org"
    assert missing.status_code == 404
    assert ids(teachers) == ["t-1", "t-2", "t-3"]
    v11.quirks.teachers_in_class_students = True
    v11.update("user", "s-3")  # any change rebuilds the relation maps
    with signed(v11) as client:
        mixed = client.get("/classes/c-2/students")
    assert set(ids(mixed)) == {"t-1", "t-2", "s-3", "s-4", "s-5"}


def test_mutations_are_served_with_new_dates(v11: FakeOneRoster) -> None:
    """update/delete stamp a newer date; remove drops the record; add serves a new one."""
    v11.update("class", "c-1", title="Algebra II")
    v11.delete("user", "s-5")
    v11.remove("enrollment", "e-s1c1")
    with signed(v11) as client:
        klass = client.get("/classes/c-1").json()["class"]
        gone = client.get("/users/s-5").json()["user"]
        enrollments = client.get("/enrollments", params={"limit": 100})
    assert klass["title"] == "Algebra II"
    assert klass["dateLastModified"] > "2025-01-01T00:00:00.000Z"
    assert gone["status"] == "tobedeleted"
    assert "e-s1c1" not in ids(enrollments, "enrollments")
    assert enrollments.headers["X-Total-Count"] == "9"
    assert [p.sourced_id for p in v11.roster.persons if p.status == "tobedeleted"] == ["s-5"]


def test_mutate_fraction_changes_that_share(v11: FakeOneRoster) -> None:
    """mutate_fraction changes about that share of users, classes and enrollments."""
    counts = v11.mutate_fraction(0.5, seed=3)
    assert counts == {"users": 4, "classes": 2, "enrollments": 5}
    removed = [e for e in v11.roster.enrollments if e.status == "tobedeleted"]
    assert len(removed) == 5


def test_mutate_fraction_spreads_its_dates_over_the_time_before_now(v11: FakeOneRoster) -> None:
    """With ``spread`` the changes are dated over the seconds before now, each later than
    every date served before and none in the future, as a day's changes are; a later change
    is dated after all of them."""
    from datetime import UTC, datetime

    def stamps() -> dict[str, datetime]:
        roster = v11.roster
        records: list[RosterPerson | RosterClass | RosterEnrollment]
        records = [*roster.persons, *roster.classes, *roster.enrollments]
        return {
            r.sourced_id: r.date_last_modified for r in records if r.date_last_modified is not None
        }

    before = stamps()
    newest = v11._last_stamp  # the latest date served so far
    v11.mutate_fraction(0.5, seed=3, spread=3600)
    after = stamps()
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    assert len(changed) == 11
    assert all(newest < v <= datetime.now(UTC) for v in changed.values())
    assert len(set(changed.values())) > 1  # not one moment for all
    # Every kind over the whole window, not only the first one drawn.
    an_hour_ago = datetime.now(UTC).timestamp() - 3600
    for prefix in ("t-", "s-", "c-", "e-"):
        kind = [v.timestamp() for k, v in changed.items() if k.startswith(prefix)]
        assert not kind or min(kind) < an_hour_ago + 3000, prefix
    assert all(v.microsecond % 1000 == 0 for v in changed.values())  # as served, to the ms
    v11.mutate_fraction(0.5, seed=4)
    later = {k: v for k, v in stamps().items() if after.get(k) != v}
    assert later and min(later.values()) > max(changed.values())


# -- faults ----------------------------------------------------------------------------------


def test_rate_limit_with_retry_after_counts_down(v11: FakeOneRoster) -> None:
    """N x 429 with Retry-After, then normal answers."""
    v11.faults = Faults(rate_limit=2, retry_after="7")
    with signed(v11) as client:
        answers = [client.get("/orgs") for _ in range(3)]
    assert [a.status_code for a in answers] == [429, 429, 200]
    assert answers[0].headers["Retry-After"] == "7"


def test_server_errors_only_on_matching_paths(v11: FakeOneRoster) -> None:
    """`only` limits faults to paths containing it."""
    v11.faults = Faults(server_error=1, only="/classes")
    with signed(v11) as client:
        users = client.get("/users")
        classes = [client.get("/classes").status_code for _ in range(2)]
    assert users.status_code == 200
    assert classes == [500, 200]


def test_dropped_connections_and_down_after(v11: FakeOneRoster) -> None:
    """A dropped connection gives no answer at all; after K requests the server is 'down'."""
    v11.faults = Faults(drop=1)
    with signed(v11) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/orgs")
        assert client.get("/orgs").status_code == 200
    v11.faults = Faults(down_after=0)
    with signed(v11) as client, pytest.raises(httpx.RemoteProtocolError):
        client.get("/orgs")
    assert [r.status for r in v11.data_requests()] == [0, 200, 0]


def test_slow_answers(v11: FakeOneRoster) -> None:
    """delay holds each answer back."""
    v11.faults = Faults(delay=0.2)
    with signed(v11) as client:
        started = time.monotonic()
        answer = client.get("/orgs")
    assert answer.status_code == 200
    assert time.monotonic() - started >= 0.2


def test_not_found_and_delay_apply_from_the_offset_on(v11: FakeOneRoster) -> None:
    """`not_found` answers 404; like every fault, the delay too spares pages before
    `from_offset` and paths without `only`."""
    v11.faults = Faults(not_found=2, delay=0.3, only="/users", from_offset=4)
    with signed(v11) as client:
        started = time.monotonic()
        first = client.get("/users", params={"offset": 0, "limit": 4})
        orgs = client.get("/orgs", params={"offset": 4})
        quick = time.monotonic() - started
        later = [client.get("/users", params={"offset": 4, "limit": 4}) for _ in range(3)]
    assert (first.status_code, orgs.status_code) == (200, 200)
    assert quick < 0.3
    assert [a.status_code for a in later] == [404, 404, 200]
    assert later[0].json()["imsx_codeMajor"] == "failure"
    assert [r.status for r in v11.data_requests()] == [200, 200, 404, 404, 200]


def test_admin_endpoints_control_a_server_in_another_process(v11: FakeOneRoster) -> None:
    """/_admin/faults, /_admin/mutate and /_admin/stats drive a server over HTTP."""
    with httpx.Client(base_url=v11.origin) as admin, signed(v11) as client:
        assert admin.post("/_admin/faults", json={"server_error": 1}).status_code == 200
        assert client.get("/orgs").status_code == 500
        assert admin.post("/_admin/mutate", params={"fraction": 1}).json()["classes"] == 3
        stats = admin.get("/_admin/stats").json()
    assert stats["records"] == {"orgs": 3, "users": 8, "classes": 3, "enrollments": 10}
    assert stats["data_requests"] == 1


@pytest.mark.slow
def test_runs_as_a_separate_process() -> None:
    """`python -m tests.fakes.oneroster_server` serves a generated district and prints its URL."""
    sizes = ["--schools", "1", "--teachers", "3", "--students", "30", "--classes", "3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.oneroster_server", "--port", "0", *sizes],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        auth = OAuth1Signer(info["auth"]["client_id"], info["auth"]["client_secret"])
        with httpx.Client(auth=auth) as client:
            users = client.get(info["base_url"] + "/users", params={"limit": 1})
        assert users.status_code == 200
        assert int(users.headers["X-Total-Count"]) == info["records"]["users"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0

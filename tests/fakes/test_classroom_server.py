"""The fake Classroom itself: it must refuse what Google refuses, or the connector's tests
prove nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import RSAKey

from rostersync.source.testdata import small_roster
from tests.fakes.classroom_server import JWT_BEARER_GRANT, REQUIRED_SCOPES, FakeClassroom

ISSUER = "sa@project.iam.gserviceaccount.com"
ADMIN = "admin@example.org"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def fake(key: rsa.RSAPrivateKey) -> Iterator[FakeClassroom]:
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with FakeClassroom(
        small_roster(), public_key_pem=public, client_email=ISSUER, allowed_sub=ADMIN
    ) as server:
        yield server


def assertion(fake: FakeClassroom, key: rsa.RSAPrivateKey, **changes: object) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "sub": ADMIN,
        "aud": fake.token_url,
        "scope": " ".join(sorted(REQUIRED_SCOPES)),
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(changes)
    return jwt.encode({"alg": "RS256"}, claims, RSAKey(key, None))


def get_token(http: httpx.Client, fake: FakeClassroom, grant: str) -> httpx.Response:
    return http.post(fake.token_url, data={"grant_type": JWT_BEARER_GRANT, "assertion": grant})


def test_token_endpoint_issues_a_bearer_for_a_valid_assertion(
    fake: FakeClassroom, key: rsa.RSAPrivateKey
) -> None:
    """A correctly signed assertion for the allowed admin gets a token that opens the API."""
    with httpx.Client() as http:
        answer = get_token(http, fake, assertion(fake, key))
        assert answer.status_code == 200
        token = answer.json()["access_token"]
        courses = http.get(
            f"{fake.api_base_url}/v1/courses",
            params={"courseStates": "ACTIVE"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert courses.status_code == 200
    assert {c["id"] for c in courses.json()["courses"]} == {"c-1", "c-2", "c-3"}


@pytest.mark.parametrize(
    ("changes", "status", "error"),
    [
        ({"sub": "someone@example.org"}, 400, "invalid_grant"),
        ({"aud": "https://elsewhere/token"}, 400, "invalid_grant"),
        ({"exp": int(time.time()) + 7200}, 400, "invalid_grant"),
        ({"iss": "other@project.iam.gserviceaccount.com"}, 401, "invalid_client"),
        (
            {"scope": "https://www.googleapis.com/auth/classroom.courses.readonly"},
            401,
            "unauthorized_client",
        ),
    ],
)
def test_token_endpoint_refuses_what_google_refuses(
    fake: FakeClassroom,
    key: rsa.RSAPrivateKey,
    changes: dict[str, object],
    status: int,
    error: str,
) -> None:
    """A wrong subject, audience, lifetime, issuer or missing scope is refused."""
    with httpx.Client() as http:
        answer = get_token(http, fake, assertion(fake, key, **changes))
    assert (answer.status_code, answer.json()["error"]) == (status, error)
    assert fake.issued_tokens == []


def test_token_endpoint_checks_the_signature(fake: FakeClassroom) -> None:
    """An assertion signed by another key is an invalid_grant."""
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with httpx.Client() as http:
        answer = get_token(http, fake, assertion(fake, stranger))
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "invalid_grant",
        "error_description": "Invalid JWT Signature.",
    }


def test_api_needs_a_bearer_token(fake: FakeClassroom) -> None:
    """Without a token it issued, the API answers 401 UNAUTHENTICATED."""
    with httpx.Client() as http:
        answer = http.get(f"{fake.api_base_url}/v1/courses", headers={"Authorization": "Bearer x"})
    assert answer.status_code == 401
    assert answer.json()["error"]["status"] == "UNAUTHENTICATED"


def test_rosters_page_with_next_page_token(fake: FakeClassroom, key: rsa.RSAPrivateKey) -> None:
    """A roster larger than pageSize comes in pages chained by nextPageToken."""
    with httpx.Client() as http:
        token = get_token(http, fake, assertion(fake, key)).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        url = f"{fake.api_base_url}/v1/courses/c-1/students"
        first = http.get(url, params={"pageSize": 2}, headers=auth).json()
        second = http.get(
            url, params={"pageSize": 2, "pageToken": first["nextPageToken"]}, headers=auth
        ).json()
    ids = [s["userId"] for s in first["students"] + second["students"]]
    assert ids == ["s-1", "s-2", "s-3"]
    assert "nextPageToken" not in second
    assert first["students"][0]["profile"]["emailAddress"] == "s1@example.org"


def test_faults_are_served_in_order_then_stop(fake: FakeClassroom, key: rsa.RSAPrivateKey) -> None:
    """fail_quota and fail_server answer the next calls, then the API recovers."""
    fake.fail_quota(1, retry_after=2)
    fake.fail_server(1, 500)
    with httpx.Client() as http:
        token = get_token(http, fake, assertion(fake, key)).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        url = f"{fake.api_base_url}/v1/courses"
        answers = [http.get(url, headers=auth) for _ in range(3)]
    assert [a.status_code for a in answers] == [429, 500, 200]
    assert answers[0].json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert answers[0].headers["Retry-After"] == "2"
    assert fake.api_calls() == 3

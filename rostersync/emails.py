"""Email addresses as identities: one normalization and one validator for sync and import.

An address becomes a username only through here. :func:`normalize_email` folds Unicode
compatibility forms first (NFKC: the Kelvin sign ``K`` becomes ``K``, full-width letters
become ASCII), then strips and lower-cases, so two spellings that render alike are one
string everywhere. :func:`email_problem` then accepts only a plain ASCII ``local@domain``
that a console can mail: anything else (``N/A``, ``none``, a Cyrillic look-alike) is not an
address and never becomes an account.

This module imports nothing heavy: the CLI and the importer call it on every row.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

MAX_EMAIL = 256

# A pragmatic address check (no DNS, no quoted local parts): what a console can mail.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
_EMAIL = re.compile(rf"^{_LOCAL}@{_DOMAIN}$")
# Invisible characters spreadsheets and web forms leave around values; str.strip() keeps them.
_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060"


def normalize_email(value: str | None) -> str:
    """The canonical form of an address as given: NFKC, trimmed, lower-case ("" for none)."""
    if not value:
        return ""
    folded = unicodedata.normalize("NFKC", value)
    return folded.strip().strip(_INVISIBLE).strip().lower()


def email_problem(email: str) -> str | None:
    """Why an already normalized address is unusable as an identity, or None."""
    if not email:
        return "no email address"
    if len(email) > MAX_EMAIL:
        return f"email is longer than {MAX_EMAIL} characters"
    if not _EMAIL.match(email):
        return f"{email!r} is not a valid email address"
    return None


def email_domain(email: str) -> str:
    return email.rpartition("@")[2]


def identity_problem(email: str, allowed_domains: Iterable[str] | None) -> str | None:
    """Why a normalized address cannot be a user's identity here: invalid, or outside the
    allowed domains. None when it can."""
    return email_problem(email) or domain_problem(email, allowed_domains)


def domain_problem(email: str, allowed: Iterable[str] | None) -> str | None:
    """Why a valid address is outside the allow-list (``provisioning.email_domains``, already
    normalized), or None.

    No allow-list (None) allows every domain. Domains match exactly: a subdomain is another
    domain (``hs.example.org`` must be listed on its own), as directories such as Google
    Workspace treat them."""
    if allowed is None:
        return None
    domains = sorted(allowed)
    if email_domain(email) in domains:
        return None
    return f"{email!r} is outside provisioning.email_domains ({', '.join(domains)})"

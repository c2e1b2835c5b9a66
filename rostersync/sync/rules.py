"""Pure rules: who gets an account, who is archived, whether a run must be held.

No I/O here: functions take frozen values and return a plan, so the rules are tested
directly and the apply step only carries plans out.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field

from rostersync.config.models import Provisioning, Safety
from rostersync.emails import MAX_EMAIL, domain_problem, email_problem, normalize_email

#: The rejection of a candidate who has no address at all.
NO_EMAIL = "no email: teaches classes with students but has no email address"
#: How every rejection by the provisioning rules begins (the rest are the source's own).
EMAIL_REJECTIONS = ("no email:", "invalid email:", "email outside the allowed domains:")


@dataclass(frozen=True, slots=True)
class Teacher:
    """A candidate of this source: an active, enabled person of a teacher role who teaches at
    least one populated, active class. Eligible once their email is a valid identity."""

    sourced_id: str
    email: str | None  # as the source sent it
    display_name: str
    username: str | None
    school_ids: tuple[str, ...]
    school_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LinkedUser:
    """A directory user already linked to a person of this source."""

    user_id: int
    external_id: str
    email: str
    status: str
    created_by: str | None
    archived_by_sync: bool
    linked_elsewhere_active: bool  # also linked to an active person in another source


@dataclass(frozen=True, slots=True)
class ExistingUser:
    user_id: int
    email: str
    status: str


@dataclass(frozen=True, slots=True)
class NewUser:
    email: str
    display_name: str
    role: str
    sites: tuple[str, ...]
    identities: tuple[tuple[str, str | None], ...]  # (sourced_id, username)


@dataclass(frozen=True, slots=True)
class Link:
    user_id: int
    sourced_id: str
    username: str | None
    email: str = ""  # the teacher's, normalized: the user's too
    display_name: str = ""


@dataclass
class ProvisionPlan:
    create: list[NewUser] = field(default_factory=list)
    link: list[Link] = field(default_factory=list)
    restore: list[int] = field(default_factory=list)
    archive: list[int] = field(default_factory=list)
    skipped_license: list[str] = field(default_factory=list)  # emails
    #: candidates whose email cannot be an identity: (sourced id, reason)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    not_created: list[str] = field(default_factory=list)  # auto-create off: emails
    #: emails several eligible persons of this run share: email -> those teachers
    shared: dict[str, list[Teacher]] = field(default_factory=dict)
    # Users whose groups must be rebuilt because of provisioning (new, linked, restored, archived).
    touched_users: set[int] = field(default_factory=set)


def sites_for(teacher: Teacher, prov: Provisioning) -> tuple[str, ...]:
    """The site_map sites of the teacher's schools (by sourcedId, then name), else the default."""
    mapped: list[str] = []
    for key in (*teacher.school_ids, *teacher.school_names):
        site = prov.site_map.get(key)
        if site and site not in mapped:
            mapped.append(site)
    if mapped:
        return tuple(mapped)
    return (prov.default_site,) if prov.default_site else ()


def same_name(a: str, b: str) -> bool:
    """Whether two persons' names are one name: compared NFKC, case-folded, spaces collapsed."""

    def norm(name: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", name).casefold().split())

    return norm(a) == norm(b)


#: How a rejection for an email claimed under another name begins.
NAME_CONFLICT = "email shared under another name"


def name_conflict(t: Teacher, claimants: Mapping[str, str], email: str) -> str | None:
    """Why ``t`` may not take the account of ``email``: other persons claim it under another
    name (``claimants``: sourced id -> name, ``t`` among them)."""
    others = sorted(
        (sid, name)
        for sid, name in claimants.items()
        if sid != t.sourced_id and not same_name(name, t.display_name)
    )
    if not others:
        return None
    named = ", ".join(f"{sid} ({name or 'no name'})" for sid, name in others[:5])
    more = f" and {len(others) - 5} more" if len(others) > 5 else ""
    return (
        f"{NAME_CONFLICT}: {email} is also the email of {named}{more}; an account is never "
        "shared by different names, so none is given until the source tells them apart"
    )


def email_rejection(raw: str | None, prov: Provisioning) -> str | None:
    """Why a candidate's email (as the source sent it) cannot be their identity, or None."""
    email = normalize_email(raw)
    if not email:
        return NO_EMAIL
    if len(email) > MAX_EMAIL:
        return f"invalid email: longer than {MAX_EMAIL} characters"
    if email_problem(email) is not None:
        return f"invalid email: {raw!r} is not an email address"
    problem = domain_problem(email, prov.email_domains)
    if problem is not None:
        return f"email outside the allowed domains: {problem}"
    return None


def plan_provisioning(
    source: str,
    candidates: Sequence[Teacher],
    linked: Mapping[str, LinkedUser],
    existing_by_email: Mapping[str, ExistingUser],
    *,
    prov: Provisioning,
    active_users: int,
    license_limit: int | None,
    teaching_elsewhere: Set[int] = frozenset(),
    claims: Mapping[str, Mapping[str, str]] | None = None,
) -> ProvisionPlan:
    """Decide creations, links, restorations and archivals for one source.

    ``candidates`` are the source's teachers by role and classes (see :class:`Teacher`);
    ``linked`` maps this source's person ids to their linked users; ``existing_by_email``
    holds directory users (normalized email) that eligible teachers might be linked to.
    ``teaching_elsewhere``: users with a candidate person of this source among those not
    decided here (a delta run decides for some persons only, and an account may belong to
    several persons of the source: one per school).

    An account shared by several persons is archived only when none of them is a candidate
    any more, and restored once when they come back.

    A candidate whose email is not a valid identity (missing, not an address, outside
    ``email_domains``) is rejected: no account is created, linked or restored for them. It is
    never archived for that either: an account belongs to its person, and a blanked or
    mistyped address in the source must not take it away.

    Persons sharing an email share its account only under one name (:func:`same_name`): a
    candidate not linked yet whose email another person of the source claims under another
    name (another candidate, or a person linked to the account of that email; ``claims``:
    normalized email -> {sourced id: name} of those beyond ``candidates``) is rejected, and
    two teachers are never merged by a placeholder address or a look-alike.
    """
    plan = ProvisionPlan()
    created_by = f"source:{source}"
    headroom = None if license_limit is None else max(license_limit - active_users, 0)
    candidate_ids: set[str] = set()
    teaching = set(teaching_elsewhere)  # users with a candidate person: never archived
    pending: dict[str, tuple[Teacher, list[tuple[str, str | None]]]] = {}
    by_email: dict[str, list[Teacher]] = {}
    unusable = {t.sourced_id: email_rejection(t.email, prov) for t in candidates}
    names: dict[str, dict[str, str]] = {e: dict(c) for e, c in (claims or {}).items()}
    for t in candidates:
        if unusable[t.sourced_id] is None:
            names.setdefault(normalize_email(t.email), {})[t.sourced_id] = t.display_name

    for t in sorted(candidates, key=lambda t: t.sourced_id):
        candidate_ids.add(t.sourced_id)
        link = linked.get(t.sourced_id)
        if link is not None:
            teaching.add(link.user_id)  # whatever its email says now
        reason = unusable[t.sourced_id]
        if reason is not None:
            plan.rejected.append((t.sourced_id, reason))
            continue
        email = normalize_email(t.email)
        if link is None and (reason := name_conflict(t, names[email], email)) is not None:
            plan.rejected.append((t.sourced_id, reason))
            continue
        by_email.setdefault(email, []).append(t)
        if link is not None:
            if link.status == "archived" and link.archived_by_sync:
                if link.user_id in plan.restore or link.email in plan.skipped_license:
                    continue  # another person of this account decided it already
                if headroom is not None and headroom <= 0:
                    plan.skipped_license.append(link.email)
                    continue
                if headroom is not None:
                    headroom -= 1
                plan.restore.append(link.user_id)
                plan.touched_users.add(link.user_id)
            continue
        user = existing_by_email.get(email)
        if user is not None:
            plan.link.append(Link(user.user_id, t.sourced_id, t.username, email, t.display_name))
            plan.touched_users.add(user.user_id)
            continue
        if email in pending:
            # Several person records with one email (a teacher with one record per school):
            # one account, all of them linked; the run report names them (plan.shared).
            pending[email][1].append((t.sourced_id, t.username))
            continue
        pending[email] = (t, [(t.sourced_id, t.username)])
    plan.shared = {email: ts for email, ts in by_email.items() if len(ts) > 1}

    for email, (t, identities) in pending.items():
        if not prov.auto_create_users:
            plan.not_created.append(email)
            continue
        if headroom is not None:
            if headroom <= 0:
                plan.skipped_license.append(email)
                continue
            headroom -= 1
        plan.create.append(
            NewUser(
                email=email,
                display_name=t.display_name or email,
                role=prov.default_role,
                sites=sites_for(t, prov),
                identities=tuple(identities),
            )
        )

    if prov.on_teacher_removed == "archive":
        for ext_id, link in sorted(linked.items()):
            if (
                ext_id not in candidate_ids
                and link.status == "active"
                and link.created_by == created_by
                and not link.linked_elsewhere_active
                and link.user_id not in plan.touched_users
                and link.user_id not in teaching
            ):
                plan.archive.append(link.user_id)
    # An archived user's groups go away; a user no longer eligible loses groups either way.
    plan.touched_users.update(plan.archive)
    plan.archive = sorted(set(plan.archive))
    return plan


@dataclass(frozen=True, slots=True)
class SafetyVerdict:
    hold: bool
    reasons: tuple[str, ...] = ()


def check_safety(
    *,
    safety: Safety,
    users_archived: int,
    groups_removed: int,
    managed_users: int,
    managed_groups: int,
    fetched: Mapping[str, int] | None,
    last_fetched: Mapping[str, int] | None,
    emails_lost: int = 0,
    emails_before: int = 0,
    min_removals_for_percent: int = 10,
) -> SafetyVerdict:
    """Hold a run that removes too much or that saw a shrunken (or empty) source.

    The percentage rule only applies once a run removes at least ``min_removals_for_percent``
    objects, so a five-teacher school losing one teacher is not held for "20 %".
    """
    reasons: list[str] = []
    removals = users_archived + groups_removed
    if removals > safety.max_removals:
        reasons.append(
            f"{removals} removals ({users_archived} users archived, {groups_removed} groups "
            f"removed) exceed safety.max_removals={safety.max_removals}"
        )
    elif removals >= min_removals_for_percent:
        for what, n, base in (
            ("users archived", users_archived, managed_users),
            ("groups removed", groups_removed, managed_groups),
        ):
            if base and n * 100.0 / base > safety.max_removal_percent:
                reasons.append(
                    f"{n} of {base} {what} ({n * 100.0 / base:.1f}%) exceed "
                    f"safety.max_removal_percent={safety.max_removal_percent:g}"
                )
    if (
        emails_lost >= min_removals_for_percent
        and emails_before
        and emails_lost * 100.0 / emails_before > safety.max_removal_percent
    ):
        reasons.append(
            f"{emails_lost} of {emails_before} people would lose their email address "
            f"({emails_lost * 100.0 / emails_before:.1f}% > safety.max_removal_percent="
            f"{safety.max_removal_percent:g}): is the source still sending emails "
            "(for Google Classroom, the classroom.profile.emails scope)?"
        )
    if fetched is not None and last_fetched:
        for kind in ("persons", "classes", "enrollments"):
            before = last_fetched.get(kind, 0)
            now = fetched.get(kind, 0)
            if before > 0 and now < safety.min_source_ratio * before:
                what = "an empty pull" if now == 0 else "a shrunken source"
                reasons.append(
                    f"{what}: {now} {kind} against {before} in the last successful run "
                    f"(below safety.min_source_ratio={safety.min_source_ratio:g})"
                )
    return SafetyVerdict(bool(reasons), tuple(reasons))


def chunks(items: Iterable[str] | Sequence[int], size: int = 500) -> Iterable[list[object]]:
    batch: list[object] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch

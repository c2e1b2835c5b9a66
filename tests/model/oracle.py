"""The oracle: rostersync's rules as plain Python over plain values.

It is written from the README's rules and issue 16's, not from the engine: it imports no rule
code (``rostersync.sync.rules``, ``rostersync.emails``, SQL), only the record types the
connectors yield. Each sync is one application of the rules to the state at the start of the
run; a delta run must end where deciding for everyone would (the README's "nobody else's
outcome can have changed", checked rather than assumed).

State: a mirror per source (what the engine believes the roster is), the directory (users by
email, identities), each source's high-water mark and last full counts, and the runs. Groups
are not state: after the resync queue drains they are a function of the mirror and the
directory (:func:`groups`).

Where the rules leave a choice open, the reading taken here is named in a comment with
"Reading:"; the model's README lists them.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from rostersync.source.records import (
    AcademicSession,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    RosterRecord,
    TeacherRoster,
)

SOURCE = "mem"

# -- email addresses --------------------------------------------------------------------------

MAX_EMAIL = 256
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}\.)+[A-Za-z]{{2,63}}$")
# Zero-width characters and the byte-order mark that exports leave around values.
_EDGE_JUNK = "\ufeff\u200b\u200c\u200d\u2060"


def norm_email(value: str | None) -> str:
    """NFKC, trimmed (whitespace and zero-width characters at the edges), lower-case."""
    if not value:
        return ""
    folded = unicodedata.normalize("NFKC", value)
    return folded.strip().strip(_EDGE_JUNK).strip().lower()


def email_problem(email: str, domains: Iterable[str] = ()) -> str | None:
    """Why a normalized address cannot be an identity (None when it can)."""
    if not email:
        return "no email"
    if len(email) > MAX_EMAIL:
        return "too long"
    if not _ADDRESS.match(email):
        return "invalid"
    allowed = {norm_email(d).lstrip("@") for d in domains if d.strip()}
    if allowed and email.rpartition("@")[2] not in allowed:
        return "outside email_domains"
    return None


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What the rules read from rostersync.yaml. ``as_yaml`` gives the engine the same."""

    auto_create_users: bool = True
    default_role: str = "Teacher"
    default_site: str | None = "North High"
    site_map: tuple[tuple[str, str], ...] = ()
    on_teacher_removed: str = "archive"
    license_limit: int | None = None
    max_removals: int = 500
    max_removal_percent: float = 20.0
    min_source_ratio: float = 0.5
    teacher_roles: tuple[str, ...] = ("teacher",)
    email_domains: tuple[str, ...] = ()
    #: the source's `schools: {include, exclude}` (sourcedIds or names)
    schools_include: tuple[str, ...] = ()
    schools_exclude: tuple[str, ...] = ()
    #: the source's `terms: {mode: current (True) | all, grace_days}`
    terms_current: bool = False
    grace_days: int = 14

    @property
    def scope_key(self) -> tuple[Any, ...]:
        """What decides the scope: a change makes the next delta run a full one (every
        setting counts once anything is scoped; nothing scoped is one key)."""
        if not self.scoped:
            return ()
        return self.schools_include, self.schools_exclude, self.terms_current, self.grace_days

    @property
    def provisioning_key(self) -> tuple[Any, ...]:
        """The settings that decide who gets a user and how (``provisioning`` and
        ``license_limit``): a change since the last applied run makes a run count the
        removals waiting jobs carry out as its own."""
        return (
            self.auto_create_users,
            self.default_role,
            self.default_site,
            self.site_map,
            self.on_teacher_removed,
            self.teacher_roles,
            self.email_domains,
            self.license_limit,
        )

    @property
    def scoped(self) -> bool:
        return bool(self.schools_include or self.schools_exclude or self.terms_current)

    def as_yaml(self, *, new_keys: bool) -> dict[str, Any]:
        """The config file's dict. ``new_keys``: the engine knows teacher_roles and
        email_domains (issue 16); without them only their defaults can be modelled."""
        prov: dict[str, Any] = {
            "auto_create_users": self.auto_create_users,
            "default_role": self.default_role,
            "site_map": dict(self.site_map),
            "on_teacher_removed": self.on_teacher_removed,
        }
        if self.default_site is not None:
            prov["default_site"] = self.default_site
        if new_keys:
            prov["teacher_roles"] = list(self.teacher_roles)
            if self.email_domains:
                prov["email_domains"] = list(self.email_domains)
        out: dict[str, Any] = {
            "organization": "Model School District",
            "database": "sqlite:///unused.db",
            "roles": [
                "Teacher",
                {"name": "Organization Admin", "permissions": ["import_users"]},
                "Coach",
            ],
            "sites": ["North High", "South Middle"],
            "provisioning": prov,
            "safety": {
                "max_removals": self.max_removals,
                "max_removal_percent": self.max_removal_percent,
                "min_source_ratio": self.min_source_ratio,
            },
        }
        if self.license_limit is not None:
            out["license_limit"] = self.license_limit
        return out


# -- state ------------------------------------------------------------------------------------

KINDS = ("org", "person", "class", "enrollment")

#: A connector's rejection entity names, as the README's connectors report them.
ENTITY_KIND = {
    "user": "person",
    "person": "person",
    "class": "class",
    "course": "class",
    "enrollment": "enrollment",
    "org": "org",
    "school": "org",
}


@dataclass
class Mirror:
    """One source's records as the last applied runs left them, by kind and sourced id."""

    org: dict[str, RosterOrg] = field(default_factory=dict)
    person: dict[str, RosterPerson] = field(default_factory=dict)
    klass: dict[str, RosterClass] = field(default_factory=dict)
    enrollment: dict[str, RosterEnrollment] = field(default_factory=dict)

    def table(self, kind: str) -> dict[str, Any]:
        tables: dict[str, dict[str, Any]] = {
            "org": self.org,
            "person": self.person,
            "class": self.klass,
            "enrollment": self.enrollment,
        }
        return tables[kind]

    def copy(self) -> Mirror:
        return Mirror(dict(self.org), dict(self.person), dict(self.klass), dict(self.enrollment))


@dataclass(frozen=True)
class User:
    email: str
    display_name: str
    roles: tuple[str, ...]
    sites: tuple[str, ...]
    status: str  # active | archived
    created_by: str  # "source:NAME" | "import"
    archived_by_sync: bool = False


@dataclass
class Directory:
    users: dict[str, User] = field(default_factory=dict)  # by (normalized) email
    identities: dict[tuple[str, str], str] = field(
        default_factory=dict
    )  # (source, person) -> email

    def copy(self) -> Directory:
        return Directory(dict(self.users), dict(self.identities))

    def persons_of(self, email: str, source: str | None = None) -> set[tuple[str, str]]:
        return {
            key
            for key, owner in self.identities.items()
            if owner == email and (source is None or key[0] == source)
        }

    def active_count(self) -> int:
        return sum(1 for u in self.users.values() if u.status == "active")


@dataclass
class SourceState:
    """What a source's last applied (not dry, not held) runs leave for the next ones."""

    high_water_mark: datetime | None = None
    #: fetched persons/classes/enrollments of the last successful full run
    last_full_counts: dict[str, int] | None = None
    #: of those, the ones in scope by school, and the scope they were judged by
    last_kept_counts: dict[str, int] | None = None
    last_scope: tuple[Any, ...] = ()
    #: Config.provisioning_key of the last applied run
    provisioning_key: tuple[Any, ...] | None = None


@dataclass
class Run:
    """A run as the oracle knows it: enough to decide approvals."""

    id: int
    source: str
    mode: str
    dry_run: bool
    status: str
    records: tuple[RosterRecord, ...] = ()  # what it fetched (kept for a held run's approval)
    #: what scoping made of ``records`` (what an approval applies), when the source is scoped
    cut: ScopeCut | None = None


# -- the rules over a mirror ------------------------------------------------------------------


def person_roles(p: RosterPerson) -> set[str]:
    """Every role a person carries, lower-cased (OneRoster 1.2 sends several)."""
    return {r.strip().lower() for r in (p.role, *p.other_roles) if r and r.strip()}


def teaching_person(p: RosterPerson | None, teacher_roles: Sequence[str]) -> bool:
    """Active, enabled, and of a teacher role: who can teach a class."""
    wanted = {r.strip().lower() for r in teacher_roles}
    return p is not None and p.status == "active" and p.enabled and bool(person_roles(p) & wanted)


def populated(m: Mirror, class_id: str) -> bool:
    """Active, with an active student enrollment of an active person."""
    c = m.klass.get(class_id)
    if c is None or c.status != "active":
        return False
    for e in m.enrollment.values():
        if e.class_id == class_id and e.role == "student" and e.status == "active":
            p = m.person.get(e.user_id)
            if p is not None and p.status == "active":
                return True
    return False


def taught_classes(m: Mirror, person_id: str, teacher_roles: Sequence[str]) -> set[str]:
    """Populated classes this person teaches (active teacher enrollment, teaching person)."""
    if not teaching_person(m.person.get(person_id), teacher_roles):
        return set()
    return {
        e.class_id
        for e in m.enrollment.values()
        if e.user_id == person_id
        and e.role == "teacher"
        and e.status == "active"
        and populated(m, e.class_id)
    }


def candidates(m: Mirror, teacher_roles: Sequence[str]) -> set[str]:
    """Persons that teach at least one populated class: who should have an account."""
    return {pid for pid in m.person if taught_classes(m, pid, teacher_roles)}


@dataclass(frozen=True)
class Member:
    sourced_id: str
    email: str | None
    name: str


@dataclass(frozen=True)
class Group:
    source: str
    external_id: str
    name: str
    #: every owner: the class's teachers and the owners added by import
    owners: tuple[str, ...]
    members: tuple[Member, ...]
    #: the owners an import added (docs/import.md, "Owners added by import"): no resync
    #: takes them away, and the group stays while one is left
    imports: tuple[str, ...] = ()


@dataclass(frozen=True)
class Imported:
    """The owners an import gave a group (emails), and the name the group has (kept up to
    date after each operation): the one it keeps once its class has left the mirror."""

    owners: tuple[str, ...]
    name: str


def member_of(p: RosterPerson) -> Member:
    # The email as stored (trimmed when mirrored), lower-cased and trimmed of spaces; the
    # name as "given family" trimmed of spaces, as SQL's TRIM does.
    stored = p.email.strip() if p.email else ""
    email = stored.strip(" ").lower() or None
    return Member(p.sourced_id, email, f"{p.given_name} {p.family_name}".strip(" "))


def groups(
    mirrors: Mapping[str, Mirror],
    d: Directory,
    teacher_roles: Sequence[str],
    imported: Mapping[tuple[str, str], Imported] | None = None,
) -> dict[tuple[str, str], Group]:
    """The groups the directory must hold once the resync queue is drained: each populated
    class's group that its teachers own (:func:`roster_groups`), and each group an import
    gave an owner (``imported``), which stays when no teacher owns it any more.

    A group an import owner keeps is still its class's group (docs/import.md, "Owners added
    by import": "whenever the mirror's class changes, by a sync or by a live resync's
    answer, ... the group takes the class's title and its active students"; README: the
    group "goes on following its class"): its name is its class's title while the class is
    in the mirror, else the name it had (``Imported.name``); its members are its class's active students, also when the class
    lost every teacher or student or left the source. Reading: its owners are its teachers
    (when its class is populated) and its import owners whatever their status (resyncs
    "never remove an import owner"; an archived import owner is not released as an archived
    teacher is). Reading: its members are its class's active student enrollments of active
    persons whatever the class's own status (a class turned tobedeleted keeps them; the
    engine's member reads, ``rostersync/resync/members.py``, do not look at it)."""
    out = roster_groups(mirrors, d, teacher_roles)
    for key, kept in (imported or {}).items():
        src, cid = key
        m = mirrors.get(src, Mirror())
        g = out.get(key)
        if g is not None:
            owners = tuple(sorted(set(g.owners) | set(kept.owners)))
            out[key] = replace(g, owners=owners, imports=kept.owners)
            continue
        c = m.klass.get(cid)
        name = c.title if c is not None else kept.name
        out[key] = Group(src, cid, name, kept.owners, class_members(m, cid), kept.owners)
    return out


def follow_kept(
    built: Mapping[GroupKey, Group], fresh: Mapping[GroupKey, Group], source: str
) -> dict[GroupKey, Group]:
    """``built`` with the groups of ``source`` that import owners alone keep given their
    classes' titles and students from ``fresh`` (the mirror's): what the operation that
    changed the mirror does to them, since no teacher's resync reads them."""
    return {
        key: replace(g, name=fresh[key].name, members=fresh[key].members)
        if key[0] == source and g.imports and set(g.owners) <= set(g.imports) and key in fresh
        else g
        for key, g in built.items()
    }


def roster_groups(
    mirrors: Mapping[str, Mirror], d: Directory, teacher_roles: Sequence[str]
) -> dict[tuple[str, str], Group]:
    """The groups of populated classes, owned by their teachers (no import owner)."""
    out: dict[tuple[str, str], Group] = {}
    for source, m in mirrors.items():
        for cid, c in m.klass.items():
            if not populated(m, cid):
                continue
            owners: set[str] = set()
            members: dict[str, Member] = {}
            for e in m.enrollment.values():
                if e.class_id != cid or e.status != "active":
                    continue
                p = m.person.get(e.user_id)
                if e.role == "teacher" and teaching_person(p, teacher_roles):
                    email = d.identities.get((source, e.user_id))
                    if email is not None and d.users[email].status == "active":
                        owners.add(email)
                elif e.role == "student" and p is not None and p.status == "active":
                    members[p.sourced_id] = member_of(p)
            if owners:
                out[(source, cid)] = Group(
                    source,
                    cid,
                    c.title,
                    tuple(sorted(owners)),
                    tuple(sorted(members.values(), key=lambda x: x.sourced_id)),
                )
    return out


def class_members(m: Mirror, class_id: str) -> tuple[Member, ...]:
    """The members the mirror gives a class's group: its active student enrollments' active
    persons, by sourced id."""
    members: dict[str, Member] = {}
    for e in m.enrollment.values():
        if e.class_id == class_id and e.status == "active" and e.role == "student":
            p = m.person.get(e.user_id)
            if p is not None and p.status == "active":
                members[p.sourced_id] = member_of(p)
    return tuple(sorted(members.values(), key=lambda x: x.sourced_id))


def _name_key(name: str) -> str:
    """A name as two persons' names are compared: NFKC, case-folded, spaces collapsed."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def display_name(p: RosterPerson) -> str:
    return " ".join(x for x in (p.given_name, p.family_name) if x).strip()


def sites_for(p: RosterPerson, m: Mirror, config: Config) -> tuple[str, ...]:
    """The site_map sites of the person's schools (sourcedId first, then name), else the
    default site."""
    site_map = dict(config.site_map)
    names = [m.org[o].name for o in p.org_ids if o in m.org]
    mapped: list[str] = []
    for key in (*p.org_ids, *names):
        site = site_map.get(key)
        if site and site not in mapped:
            mapped.append(site)
    if mapped:
        return tuple(mapped)
    return (config.default_site,) if config.default_site else ()


# -- one run --------------------------------------------------------------------------------


@dataclass
class Decision:
    """What a run would do, decided at its start: its report, and the state it leaves."""

    mode: str
    fetched: dict[str, int]
    #: records left out of scope, by kind (persons, classes, enrollments)
    ignored: dict[str, int]
    newest: datetime | None
    counts: dict[str, int]
    #: connector rejections (entity, sourced id, reason)
    connector_rejects: list[tuple[str, str | None, str]]
    #: candidates with an unusable email: sourced id -> (value as sent, normalized, problem)
    email_rejects: dict[str, tuple[str, str, str]]
    hold_reasons: list[str]
    #: normalized emails shared by several eligible persons, with their sourced ids
    shared_emails: dict[str, list[str]]
    #: who was not created (auto-create off) and who had no license seat: email -> persons
    not_created: dict[str, list[str]]
    skipped: dict[str, list[str]]
    #: persons the run fetched that are new to the mirror or differ from it
    changed_persons: set[str]
    mirror: Mirror
    directory: Directory
    #: groups this run leaves without an owner whose removal an earlier run decided (every
    #: owner archived): not counted against the limits
    decided_earlier: int = 0
    #: counting those would have held the run
    spared: bool = False
    #: groups of the source that no teacher owns after this run but that an import owner
    #: keeps: no removal, not counted against the limits
    kept_by_import: int = 0
    #: counting those would have held the run
    import_spared: bool = False

    @property
    def held(self) -> bool:
        return bool(self.hold_reasons)

    @property
    def status(self) -> str:
        if self.held:
            return "held"
        return "succeeded_with_errors" if self.counts["records_rejected"] else "succeeded"


def merge_mirror(
    m0: Mirror, records: Sequence[RosterRecord], *, full: bool
) -> tuple[Mirror, list[Rejected]]:
    """The mirror after a run: a full run replaces the source's records with what it fetched
    (a record rejected with a sourced id keeps its old row; a rejected class also keeps its
    enrollments and their people); a delta run upserts what it fetched."""
    m1 = m0.copy() if not full else Mirror()
    rejects = [r for r in records if isinstance(r, Rejected)]
    for r in records:
        if isinstance(r, RosterOrg):
            m1.org[r.sourced_id] = r
        elif isinstance(r, RosterPerson):
            m1.person[r.sourced_id] = r
        elif isinstance(r, RosterClass):
            m1.klass[r.sourced_id] = r
        elif isinstance(r, RosterEnrollment):
            m1.enrollment[r.sourced_id] = r
    if full:
        kept: dict[str, set[str]] = {k: set() for k in KINDS}
        for r in rejects:
            kind = ENTITY_KIND.get(r.entity)
            if kind and r.sourced_id is not None:
                kept[kind].add(r.sourced_id)
        kept["person"] |= {e.user_id for e in m0.enrollment.values() if e.class_id in kept["class"]}
        kept["enrollment"] |= {
            sid for sid, e in m0.enrollment.items() if e.class_id in kept["class"]
        }
        for kind in KINDS:
            old, new = m0.table(kind), m1.table(kind)
            for sid in kept[kind]:
                if sid in old and sid not in new:
                    new[sid] = old[sid]
    return m1, rejects


# -- school scoping ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScopeCut:
    """A run's fetch after the `schools` settings: what goes on to the merge, what the source
    sent, and how many of each kind were left out."""

    records: tuple[RosterRecord, ...]
    sent: dict[str, int]
    ignored: dict[str, int]
    #: what the source sent (the high-water mark is its newest date)
    sent_records: tuple[RosterRecord, ...] = ()
    #: classes of the schools in scope none of whose terms runs
    out_of_term: int = 0


def _selected(entries: Sequence[str], orgs: Mapping[str, RosterOrg]) -> set[str]:
    """The orgs the entries name (sourcedId first, else exact name), and the orgs under them."""
    found: set[str] = set()
    for entry in entries:
        if entry in orgs:
            found.add(entry)
        else:
            found |= {oid for oid, o in orgs.items() if o.name == entry}
    todo = list(found)
    while todo:
        parent = todo.pop()
        for oid, o in orgs.items():
            if o.parent_id == parent and oid not in found:
                found.add(oid)
                todo.append(oid)
    return found


def term_runs(session: AcademicSession, today: date, grace_days: int) -> bool:
    grace = timedelta(days=grace_days)
    return session.start_date - grace <= today <= session.end_date + grace


def scope_records(
    records: Sequence[RosterRecord],
    m0: Mirror,
    config: Config,
    *,
    full: bool,
    sessions: Sequence[AcademicSession] = (),
    today: date | None = None,
) -> ScopeCut:
    """Leave out what the docs' "Terms and schools" rules put out of scope. Reading: out of
    scope by school is as not sent, and a delta run sends the records the mirror holds as
    tobedeleted; a class out of term comes as tobedeleted, its enrollments as they are."""
    sent = _counts(records)
    orgs = {**m0.org, **{r.sourced_id: r for r in records if isinstance(r, RosterOrg)}}
    included = _selected(config.schools_include, orgs) if config.schools_include else None
    excluded = _selected(config.schools_exclude, orgs)

    def in_scope(org_id: str) -> bool:
        return org_id not in excluded and (included is None or org_id in included)

    fetched_classes = {r.sourced_id: r for r in records if isinstance(r, RosterClass)}
    out_classes = {
        cid for cid, c in fetched_classes.items() if c.school_id and not in_scope(c.school_id)
    }
    kept_classes = set(fetched_classes) - out_classes
    term_out: set[str] = set()
    if config.terms_current:
        assert today is not None
        known = {s.sourced_id: s for s in sessions}
        for cid in kept_classes:
            terms = fetched_classes[cid].term_ids
            if (
                terms
                and all(t in known for t in terms)
                and not any(term_runs(known[t], today, config.grace_days) for t in terms)
            ):
                term_out.add(cid)
    if not full:
        kept_classes |= set(m0.klass) - set(fetched_classes)
    enrollments = [r for r in records if isinstance(r, RosterEnrollment)]
    out_enrollments = {e.sourced_id for e in enrollments if e.class_id not in kept_classes}
    enrolled = {
        e.user_id
        for e in enrollments
        if e.status == "active" and e.sourced_id not in out_enrollments
    }
    if not full:
        enrolled |= {
            e.user_id
            for e in m0.enrollment.values()
            if e.status == "active" and e.class_id in kept_classes
        }
    out_persons: set[str] = set()
    for r in records:
        if isinstance(r, RosterPerson) and r.sourced_id not in enrolled:
            schools = [o for o in r.org_ids if o and (o not in orgs or orgs[o].type == "school")]
            if schools and not any(in_scope(o) for o in schools):
                out_persons.add(r.sourced_id)
    kept: list[RosterRecord] = []
    for r in records:
        if isinstance(r, RosterClass):
            out, held = r.sourced_id in out_classes, r.sourced_id in m0.klass
        elif isinstance(r, RosterEnrollment):
            out, held = r.sourced_id in out_enrollments, r.sourced_id in m0.enrollment
        elif isinstance(r, RosterPerson):
            out, held = r.sourced_id in out_persons, r.sourced_id in m0.person
        else:
            kept.append(r)
            continue
        if isinstance(r, RosterClass) and r.sourced_id in term_out:
            kept.append(replace(r, status="tobedeleted"))
        elif not out:
            kept.append(r)
        elif not full and held:
            kept.append(replace(r, status="tobedeleted"))
    ignored = {
        "persons": len(out_persons),
        "classes": len(out_classes),
        "enrollments": len(out_enrollments),
    }
    return ScopeCut(tuple(kept), sent, ignored, tuple(records), len(term_out))


#: The model's source pages like a OneRoster server (harness.FeedConnector.pages_may_shift).
PAGES_SHIFT = True


def _repeat_reasons(sent: Sequence[RosterRecord], m0: Mirror, m1: Mirror) -> list[str]:
    """README, "a record received twice": a full run of a source that pages by offset and sent
    a sourcedId of a kind more than once is held if it would remove records of that kind."""
    out = []
    for kind, cls in (
        ("org", RosterOrg),
        ("person", RosterPerson),
        ("class", RosterClass),
        ("enrollment", RosterEnrollment),
    ):
        ids = [r.sourced_id for r in sent if isinstance(r, cls)]
        if len(ids) > len(set(ids)) and set(m0.table(kind)) - set(m1.table(kind)):
            out.append(f"repeats {kind}")
    return out


def _copies(records: Sequence[RosterRecord]) -> dict[str, int]:
    """Records beyond the first of each sourcedId, by kind (rejected records are not kept)."""
    sent = Counter(
        (name, r.sourced_id) for r in records for name, cls in _KINDS if isinstance(r, cls)
    )
    out: Counter[str] = Counter()
    for (name, _), n in sent.items():
        out[name] += n - 1
    return dict(out)


_KINDS = (
    ("orgs", RosterOrg),
    ("persons", RosterPerson),
    ("classes", RosterClass),
    ("enrollments", RosterEnrollment),
)


def _counts(records: Sequence[RosterRecord]) -> dict[str, int]:
    return {
        "orgs": sum(isinstance(r, RosterOrg) for r in records),
        "persons": sum(isinstance(r, RosterPerson) for r in records),
        "classes": sum(isinstance(r, RosterClass) for r in records),
        "enrollments": sum(isinstance(r, RosterEnrollment) for r in records),
    }


def _stored_email(p: RosterPerson) -> str:
    return p.email.strip() if p.email else ""


def decide(
    *,
    config: Config,
    source: str,
    mode: str,
    records: Sequence[RosterRecord],
    mirrors: Mapping[str, Mirror],
    directory: Directory,
    state: SourceState | None,
    approval: bool,
    group_roles: Sequence[str],
    cut: ScopeCut | None = None,
    built: Mapping[tuple[str, str], Group] | None = None,
    waiting: bool = False,
    imported: Mapping[tuple[str, str], Imported] | None = None,
) -> Decision:
    """Apply the rules to what a run fetched, against the state at the run's start.
    ``group_roles``: the teacher roles the groups were last built with (the config may have
    changed since: the groups change with the next applied run). ``built``: the groups the
    directory holds when they are not what the mirror says (after a live resync, or while an
    earlier run's resync jobs wait). ``waiting``: an earlier run's resync jobs wait (its
    drain was cut short): ``built`` differs from what the mirror says by what they do.
    ``imported``: the owners imports added, by group (they keep their groups)."""
    full = mode == "full"
    m0 = mirrors.get(source, Mirror())
    if cut is None:
        records = [fitting(r) for r in records]
        fetched = _counts(records)
        ignored = dict.fromkeys(("persons", "classes", "enrollments"), 0)
    else:
        records, fetched, ignored = list(cut.records), cut.sent, cut.ignored
    # Reading: the safety check on a shrunken source counts each record once, however many
    # times the source sent it (README, "a record received twice").
    copies = _copies(cut.sent_records if cut is not None else records)
    fetched = {k: n - copies.get(k, 0) for k, n in fetched.items()}
    dated = [
        r.date_last_modified
        for r in (cut.sent_records if cut is not None else records)
        if not isinstance(r, Rejected) and r.date_last_modified is not None
    ]
    # Dates after the run began are left out (docs/sources.md, "Full and delta runs").
    began = datetime.now(UTC)
    newest = max((d for d in dated if d <= began), default=None)
    m1, rejects = merge_mirror(m0, records, full=full)

    # People the run would take the email address from (the source stops sending them).
    staged_people = {r.sourced_id: r for r in records if isinstance(r, RosterPerson)}
    emails_lost = sum(
        1
        for sid, p in staged_people.items()
        if sid in m0.person and _stored_email(m0.person[sid]) and not _stored_email(p)
    )
    emails_before = sum(1 for p in m0.person.values() if _stored_email(p))

    roles = config.teacher_roles
    cands = candidates(m1, roles)
    email_rejects: dict[str, tuple[str, str, str]] = {}
    eligible: list[tuple[str, str]] = []  # (sourced id, normalized email)
    for sid in sorted(cands):
        raw = m1.person[sid].email or ""
        email = norm_email(raw)
        problem = email_problem(email, config.email_domains)
        if problem is None:
            eligible.append((sid, email))
        else:
            email_rejects[sid] = (raw.strip(), email, problem)

    d0 = directory
    d1 = directory.copy()
    counts = dict.fromkeys(
        (
            "users_created",
            "users_linked",
            "users_archived",
            "users_restored",
            "users_skipped_license",
            "users_not_created",
        ),
        0,
    )
    headroom = (
        None if config.license_limit is None else max(config.license_limit - d0.active_count(), 0)
    )
    restored: set[str] = set()
    linked_users: set[str] = set()
    skipped: dict[str, list[str]] = {}
    pending: dict[str, list[str]] = {}  # new email -> its persons, first one first
    by_email: dict[str, list[str]] = {}
    # Reading: persons share an account only under one name. Who claims an address: the
    # eligible persons with it, and the persons of this source its account already has.
    claims: dict[str, dict[str, str]] = {}
    for sid, email in eligible:
        claims.setdefault(email, {})[sid] = display_name(m1.person[sid])
    for email, named in claims.items():
        for _src, pid in d0.persons_of(email, source):
            if pid in m1.person:
                named.setdefault(pid, display_name(m1.person[pid]))
    for sid, email in eligible:
        owner = d0.identities.get((source, sid))
        mine = _name_key(display_name(m1.person[sid]))
        if owner is None and any(
            _name_key(name) != mine for pid, name in claims[email].items() if pid != sid
        ):
            raw = (m1.person[sid].email or "").strip()
            email_rejects[sid] = (raw, email, "email shared under another name")
            continue
        by_email.setdefault(email, []).append(sid)
        if owner is not None:
            user = d0.users[owner]
            if user.status == "archived" and user.archived_by_sync and owner not in restored:
                # Reading: a user is restored (and counted, and takes a seat) once, however
                # many of its persons come back in the run.
                if headroom is not None and headroom <= 0:
                    skipped.setdefault(owner, []).append(sid)
                    continue
                if headroom is not None:
                    headroom -= 1
                restored.add(owner)
                d1.users[owner] = replace(user, status="active", archived_by_sync=False)
            continue
        if email in d0.users:
            d1.identities[(source, sid)] = email
            linked_users.add(email)
            continue
        pending.setdefault(email, []).append(sid)
    # Reading: restorations take license seats before creations (existing accounts first),
    # then new accounts in the order of their first sourced id.
    created: set[str] = set()
    not_created: dict[str, list[str]] = {}
    for email, sids in pending.items():
        if not config.auto_create_users:
            not_created[email] = sids
            continue
        if headroom is not None:
            if headroom <= 0:
                skipped[email] = sids
                continue
            headroom -= 1
        first = m1.person[sids[0]]
        d1.users[email] = User(
            email=email,
            display_name=(display_name(first) or email)[:256],
            roles=(config.default_role,),
            sites=sites_for(first, m1, config),
            status="active",
            created_by=f"source:{source}",
        )
        for sid in sids:
            d1.identities[(source, sid)] = email
        created.add(email)

    archived: set[str] = set()
    if config.on_teacher_removed == "archive":
        for email, user in d0.users.items():
            if user.status != "active" or user.created_by != f"source:{source}":
                continue
            theirs = d1.persons_of(email, source)
            if not theirs:
                continue
            # Reading: a user stays while any of its persons of this source is a candidate
            # (a teacher with one record per school who leaves one school keeps the account).
            if any(pid in cands for _s, pid in theirs):
                continue
            if _active_elsewhere(email, source, mirrors, d1):
                continue
            archived.add(email)
            d1.users[email] = replace(user, status="archived", archived_by_sync=True)

    counts.update(
        users_created=len(created),
        users_linked=len(linked_users),
        users_archived=len(archived),
        users_restored=len(restored),
        users_skipped_license=len(skipped),
        users_not_created=len(not_created),
        records_rejected=len(rejects) + len(email_rejects),
    )
    after = {**mirrors, source: m1}
    g0 = dict(built) if built is not None else groups(mirrors, d0, group_roles, imported)
    g1 = groups(after, d1, roles, imported)
    mine0 = {k for k in g0 if k[0] == source}
    # The limits count what the run itself removes (README: "A run is held when ..."): a
    # group an admin gave an owner by import keeps that owner when its teachers go, stays,
    # and is no removal. These are the groups its teachers would no longer own.
    kept = (mine0 & set(g1)) - set(roster_groups(after, d1, roles))
    # The limits count what the run itself removes: a group whose removal an earlier run
    # decided goes whatever this run does (README: "A run is held when ..."): it has owners,
    # every one archived (a job of one of them is still queued, or the run queues their
    # resyncs again); or jobs wait and the mirror as the run found it gives the group no
    # owner (the waiting jobs remove it), unless the provisioning settings changed since.
    settings_changed = state is not None and state.provisioning_key != config.provisioning_key
    pending_removal = (
        set(g0) - set(groups(mirrors, d0, roles, imported))
        if waiting and not settings_changed
        else set()
    )
    decided = {
        k
        for k in mine0 - set(g1)
        if g0[k].owners
        and (
            k in pending_removal
            or all(d0.users[o].status != "active" for o in g0[k].owners if o in d0.users)
        )
    }
    removed = len(mine0 - set(g1) - decided)
    counts["groups_removed"] = removed
    counts["groups_created"] = len({k for k in g1 if k[0] == source} - mine0)

    reasons: list[str] = []
    spared = False
    # Reading: with the scope of the last full run, records in scope are compared with
    # records in scope; after a change of scope, what the source sent with what it sent.
    kinds = ("persons", "classes", "enrollments")
    ratio_before = state.last_full_counts if state else None
    ratio_now = {k: fetched[k] for k in kinds}
    if state is not None and state.last_scope == config.scope_key and state.last_kept_counts:
        ratio_before = state.last_kept_counts
        ratio_now = {k: fetched[k] - ignored[k] for k in kinds}
    if not approval:
        managed_users = sum(
            1
            for u in d0.users.values()
            if u.status == "active" and u.created_by == f"source:{source}"
        )

        def judge(removals: int) -> list[str]:
            return safety_reasons(
                config,
                archived=len(archived),
                removed=removals,
                managed_users=managed_users,
                managed_groups=len(mine0),
                emails_lost=emails_lost,
                emails_before=emails_before,
                fetched=ratio_now if full else None,
                last=ratio_before,
            )

        reasons += judge(removed)
        if full and PAGES_SHIFT:
            reasons += _repeat_reasons(cut.sent_records if cut is not None else records, m0, m1)
        # Counted, the earlier run's removals would have held this one (the bug b9da827
        # fixed): the model counts how often its steps reach that.
        spared = bool(decided) and not reasons and bool(judge(removed + len(decided)))
        # Counted, the groups import owners keep would have held it (the bug fd97904 fixed).
        import_spared = bool(kept) and not reasons and bool(judge(removed + len(kept)))
    else:
        import_spared = False
    shared = {e: sids for e, sids in by_email.items() if len(sids) > 1}
    counts.update({f"{k}_ignored": n for k, n in ignored.items()})
    counts["classes_out_of_term"] = cut.out_of_term if cut is not None else 0
    return Decision(
        mode=mode,
        fetched=fetched,
        ignored=ignored,
        newest=newest,
        counts=counts,
        connector_rejects=[(r.entity, r.sourced_id, r.reason) for r in rejects],
        email_rejects=email_rejects,
        hold_reasons=reasons,
        shared_emails=shared,
        not_created=not_created,
        skipped=skipped,
        changed_persons={
            sid
            for sid, p in staged_people.items()
            if sid not in m0.person or _undated(m0.person[sid]) != _undated(p)
        },
        mirror=m1,
        directory=d1,
        decided_earlier=len(decided),
        spared=spared,
        kept_by_import=len(kept),
        import_spared=import_spared,
    )


@dataclass(frozen=True)
class Dangling:
    """Enrollments of the mirror after a run naming a person or class it does not hold, per
    kind named (``person``, ``class``): ``must`` be reported (new to the mirror, or left
    behind by the removal of what they name) and ``may`` be (any such enrollment: one the
    run changed is reported again)."""

    must: dict[str, set[str]]
    may: dict[str, set[str]]


def dangling(m0: Mirror, m1: Mirror) -> Dangling:
    """What a run that takes mirror ``m0`` to ``m1`` says of enrollments naming a person or
    class the source has not sent (README: "An enrollment that names ...")."""
    must: dict[str, set[str]] = {"person": set(), "class": set()}
    may: dict[str, set[str]] = {"person": set(), "class": set()}
    for sid, e in m1.enrollment.items():
        for kind, ref, held, before in (
            ("person", e.user_id, m1.person, m0.person),
            ("class", e.class_id, m1.klass, m0.klass),
        ):
            if ref in held:
                continue
            may[kind].add(sid)
            if sid not in m0.enrollment or ref in before:
                must[kind].add(sid)
    return Dangling(must, may)


def fitting(r: RosterRecord) -> RosterRecord:
    """A person whose email is longer than the store's column (256 characters, as stored:
    trimmed) is a rejected record, as if the connector had refused it."""
    if isinstance(r, RosterPerson) and len(_stored_email(r)) > MAX_EMAIL:
        return Rejected("user", r.sourced_id, f"email is longer than {MAX_EMAIL} characters")
    return r


def _undated(p: RosterPerson) -> RosterPerson:
    return replace(p, date_last_modified=None)


def _active_elsewhere(email: str, source: str, mirrors: Mapping[str, Mirror], d: Directory) -> bool:
    """Linked to an active person of another source."""
    for other, pid in d.persons_of(email):
        if other == source:
            continue
        p = mirrors.get(other, Mirror()).person.get(pid)
        if p is not None and p.status == "active":
            return True
    return False


def safety_reasons(
    config: Config,
    *,
    archived: int,
    removed: int,
    managed_users: int,
    managed_groups: int,
    emails_lost: int,
    emails_before: int,
    fetched: Mapping[str, int] | None,
    last: Mapping[str, int] | None,
) -> list[str]:
    """Why a run must be held (empty: it may apply)."""
    out: list[str] = []
    removals = archived + removed
    pct = config.max_removal_percent
    if removals > config.max_removals:
        out.append("max_removals")
    elif removals >= 10:
        if managed_users and archived * 100.0 / managed_users > pct:
            out.append("max_removal_percent users")
        if managed_groups and removed * 100.0 / managed_groups > pct:
            out.append("max_removal_percent groups")
    if emails_lost >= 10 and emails_before and emails_lost * 100.0 / emails_before > pct:
        out.append("emails lost")
    if fetched is not None and last:
        for kind in ("persons", "classes", "enrollments"):
            before = last.get(kind, 0)
            if before > 0 and fetched.get(kind, 0) < config.min_source_ratio * before:
                out.append(f"min_source_ratio {kind}")
    return out


# -- live resync ------------------------------------------------------------------------------

GroupKey = tuple[str, str]


def live_answer_in_scope(m: Mirror, answer: TeacherRoster) -> TeacherRoster:
    """A scoped source's live answer keeps the classes the mirror holds active (a live read
    knows neither the schools' names nor the terms; the last sync judged them), their
    enrollments, and the students of those."""
    held = {c.sourced_id for c in answer.classes if _held_active(m, c.sourced_id)}
    enrollments = [e for e in answer.enrollments if e.class_id in held]
    members = {e.user_id for e in enrollments}
    return TeacherRoster(
        teacher=answer.teacher,
        classes=[c for c in answer.classes if c.sourced_id in held],
        enrollments=enrollments,
        persons=[p for p in answer.persons if p.sourced_id in members],
        rejected=answer.rejected,
    )


def _held_active(m: Mirror, class_id: str) -> bool:
    c = m.klass.get(class_id)
    return c is not None and c.status == "active"


def live_apply(m: Mirror, teacher_id: str, answer: TeacherRoster) -> Mirror:
    """The mirror after a teacher's live answer is written into it (``resync --live``).

    The answer's people and classes replace theirs. Enrollments are matched on (class,
    person, role), as live answers may carry ids the bulk feed does not know. Reading: an
    enrollment the answer has but not active is one it does not have. So, for the classes of
    the answer: the rows of a key the answer has are all made active when none is (a source
    may enroll a student twice; one active row is enough); every active student row whose
    key it has not is tobedeleted; each key new to those classes is added (the answer's last
    enrollment of that key), over any row of its id. The teacher's own teacher rows of the
    classes they no longer teach (no active teacher enrollment in the answer) are
    tobedeleted. Co-teachers' rows stay: a live answer need not list them.

    A record the answer rejects is not taken for gone (docs/sources.md), as a run keeps a
    rejected record's rows: the teacher keeps a rejected class, a rejected person keeps their
    enrollments. When a rejection names no id, nothing of its kind goes. A rejected
    enrollment may be any row of the class and the person it names (a part it does not name
    may be any): such a row is not taken for gone, nor a class the teacher no longer teaches
    that it may be the teacher's row of. One that names neither may be any row, so then no
    enrollment goes at all (no student, nor the teacher's own teacher row, of any class)."""
    out = m.copy()
    for p in [*answer.persons, *([answer.teacher] if answer.teacher is not None else [])]:
        # A person whose email does not fit the column is rejected, and keeps its row.
        if isinstance(fitting(p), RosterPerson):
            out.person[p.sourced_id] = p
    for c in answer.classes:
        out.klass[c.sourced_id] = c
    unread = _unread(answer.rejected)
    classes = {c.sourced_id for c in answer.classes}
    live = {
        (e.class_id, e.user_id, e.role): e
        for e in answer.enrollments
        if e.class_id in classes and e.status == "active"
    }
    enrolled = {  # the keys of the answer's classes with an active row in the mirror
        (e.class_id, e.user_id, e.role)
        for e in m.enrollment.values()
        if e.class_id in classes and e.status == "active"
    }
    droppable = not unread.keeps("enrollment")  # an enrollment may go at all
    held: set[tuple[str, str, str]] = set()
    for sid, e in m.enrollment.items():
        key = (e.class_id, e.user_id, e.role)
        own = e.role == "teacher" and e.user_id == teacher_id
        status = e.status
        if e.class_id in classes:
            held.add(key)
            if key in live and key not in enrolled:
                status = "active"
            elif (
                key not in live
                and (own or e.role == "student")
                and droppable
                and not unread.keeps("person", e.user_id)
                and not unread.may_be(e.class_id, e.user_id)
            ):
                status = "tobedeleted"
        elif (
            own
            and droppable
            and not unread.keeps("class", e.class_id)
            and not unread.may_be(e.class_id, teacher_id)
        ):
            status = "tobedeleted"  # a class the teacher no longer teaches
        if status != e.status:
            out.enrollment[sid] = replace(e, status=status)
    for key, e in live.items():
        if key not in held:
            out.enrollment[e.sourced_id] = e
    return out


@dataclass(frozen=True)
class _Unread:
    """What a live answer's rejections say it could not read: the ids named, by kind, the
    kinds of which some rejection named none (an enrollment: naming neither its class nor its
    person), and the (class, person) each other rejected enrollment names, None for a part
    it does not."""

    ids: frozenset[tuple[str, str]]
    unnamed: frozenset[str]
    enrollments: frozenset[tuple[str | None, str | None]] = frozenset()

    def keeps(self, kind: str, sid: str | None = None) -> bool:
        """Whether the answer may lack a record of this kind (and id) for a rejection: one
        it lacks is then not gone."""
        return kind in self.unnamed or (sid is not None and (kind, sid) in self.ids)

    def may_be(self, class_id: str, user_id: str) -> bool:
        """Whether a rejected enrollment naming a class or a person may be this (class,
        person) row: each part it names is the row's."""
        return any(c in (None, class_id) and u in (None, user_id) for c, u in self.enrollments)


def _unread(rejected: Iterable[Rejected]) -> _Unread:
    ids: set[tuple[str, str]] = set()
    unnamed: set[str] = set()
    enrollments: set[tuple[str | None, str | None]] = set()
    for r in rejected:
        kind = ENTITY_KIND.get(r.entity)
        if kind is None:
            continue
        if kind == "enrollment":
            # Its id is the connector's (OneRoster's live ones are not the feed's): only the
            # class and person it names say which rows it may be.
            if r.class_id is None and r.user_id is None:
                unnamed.add(kind)
            else:
                enrollments.add((r.class_id, r.user_id))
        elif r.sourced_id is None:
            unnamed.add(kind)
        else:
            ids.add((kind, r.sourced_id))
    return _Unread(frozenset(ids), frozenset(unnamed), frozenset(enrollments))


def rebuild(
    built: Mapping[GroupKey, Group],
    fresh: Mapping[GroupKey, Group],
    users: Iterable[str],
    roster: Mapping[GroupKey, Group] | None = None,
) -> dict[GroupKey, Group]:
    """The groups after a resync of ``users`` (emails) re-reads everything: each group one of
    them wants (``roster``: the populated classes' groups, whose owners are every active user
    that teaches the class; by default ``fresh``) becomes what the mirror says (``fresh``,
    import owners included); each other group they own as its teachers loses them as owners,
    and goes when no owner is left. An owner an import added is never taken away, and a
    group left to its import owners takes its class's title and students from ``fresh``
    (docs/import.md). Every other group stays as it was."""
    batch = set(users)
    out = dict(built)
    wanted = {k for k, g in (fresh if roster is None else roster).items() if batch & set(g.owners)}
    for key, g in built.items():
        if key in wanted or not batch & (set(g.owners) - set(g.imports)):
            continue
        rest = tuple(o for o in g.owners if o not in batch or o in g.imports)
        if rest and set(rest) <= set(g.imports) and key in fresh:
            # Left to its import owners: the resync that releases its last teacher gives it
            # its class's title and students (docs/import.md, "Owners added by import").
            out[key] = replace(g, owners=rest, name=fresh[key].name, members=fresh[key].members)
        elif rest:
            out[key] = replace(g, owners=rest)
        else:
            del out[key]
    out.update({key: fresh[key] for key in wanted})
    return out


# -- the whole system -------------------------------------------------------------------------


class Oracle:
    """The state the rules say the system is in, moved by the same operations as the engine."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mirrors: dict[str, Mirror] = {}
        self.directory = Directory()
        self.states: dict[str, SourceState] = {}
        self.runs: dict[int, Run] = {}
        #: the teacher roles the groups were last built with: a config edit changes them at
        #: the next applied run (which resyncs every linked user) or resync of everyone
        self.group_roles = config.teacher_roles
        #: the groups the directory holds while they are not what the mirror says: a live
        #: resync rebuilds its teachers' groups only, from a mirror it changed for others
        #: too. The next applied full run, or a resync of everyone, makes them so again.
        self.built: dict[GroupKey, Group] | None = None
        #: a live resync changed the mirror since the last applied full run. Only a full run
        #: promises to replace what it wrote: a delta run neither sees what the source
        #: dropped nor decides for the teachers the live answer made (no longer) candidates.
        self.live_pending = False
        #: the users (emails) whose resync jobs a run queued and that have not run yet (its
        #: drain was cut short), or None when the queue is drained. While it is not None,
        #: ``built`` holds the groups as they are: what they were before that run, less what
        #: the batches that ran since changed (see :meth:`commit` and :meth:`batch_done`).
        #: Of the jobs queued, these are the ones the rules name (the users a run created,
        #: linked, archived or restored); the engine also queues the teachers of the classes
        #: whose content changed.
        self.queued: set[str] | None = None
        #: groups whose members the run whose drain was cut may have updated itself (only its
        #: students changed): the members the mirror says, which the directory may hold
        #: instead of ``built``'s (the machine takes whichever the engine holds)
        self.loose: dict[GroupKey, tuple[Member, ...]] = {}
        #: the owners imports added (their ``Groups`` column), by group: resyncs never take
        #: them away, so the group stays (docs/import.md, "Owners added by import")
        self.imported: dict[GroupKey, Imported] = {}

    # -- reads --

    def groups(self) -> dict[tuple[str, str], Group]:
        if self.built is not None:
            return dict(self.built)
        return self.fresh(self.group_roles)

    def fresh(self, roles: Sequence[str] | None = None) -> dict[GroupKey, Group]:
        """The groups as the mirror says, under these teacher roles (default: the config's),
        with the owners imports added."""
        roles = self.config.teacher_roles if roles is None else roles
        return groups(self.mirrors, self.directory, roles, self.imported)

    def roster(self) -> dict[GroupKey, Group]:
        """The populated classes' groups as their teachers own them (the groups a resync of
        their users wants), under the config's teacher roles."""
        return roster_groups(self.mirrors, self.directory, self.config.teacher_roles)

    def mode_for(self, source: str, requested: str) -> str:
        """A delta run needs an earlier applied full run (its high-water mark)."""
        state = self.states.get(source)
        # Reading: the mirror holds what the last full run's scope kept; after a change of
        # scope only a full run re-judges it.
        if (
            requested == "delta"
            and state is not None
            and state.high_water_mark is not None
            and state.last_scope == self.config.scope_key
        ):
            return "delta"
        return "full"

    def fetch(
        self, source: str, mode: str, feed: Sequence[RosterRecord]
    ) -> tuple[RosterRecord, ...]:
        """What a run of this mode fetches from the feed: all of it, or (delta) what changed
        after the high-water mark, plus every rejection."""
        if mode == "full":
            return tuple(feed)
        hwm = self.states[source].high_water_mark
        assert hwm is not None
        return tuple(
            r
            for r in feed
            if isinstance(r, Rejected)
            or (r.date_last_modified is not None and r.date_last_modified > hwm)
        )

    def cut(
        self,
        source: str,
        mode: str,
        records: Sequence[RosterRecord],
        sessions: Sequence[AcademicSession],
        today: date,
    ) -> ScopeCut | None:
        """What the scope makes of a run's fetch, right after it (None: nothing scoped)."""
        if not self.config.scoped:
            return None
        m0 = self.mirrors.get(source, Mirror())
        fitted = [fitting(r) for r in records]
        return scope_records(
            fitted, m0, self.config, full=mode == "full", sessions=sessions, today=today
        )

    def decide(
        self,
        source: str,
        mode: str,
        records: Sequence[RosterRecord],
        *,
        approval: bool = False,
        cut: ScopeCut | None = None,
    ) -> Decision:
        return decide(
            cut=cut,
            config=self.config,
            source=source,
            mode=mode,
            records=records,
            mirrors=self.mirrors,
            directory=self.directory,
            state=self.states.get(source),
            approval=approval,
            group_roles=self.group_roles,
            built=self.built,
            waiting=self.queued is not None,
            imported=self.imported,
        )

    def provisioned(self, decision: Decision) -> set[str]:
        """The users (emails) a run's decision creates, links, archives or restores: the
        rules queue a resync of each."""
        d0, d1 = self.directory, decision.directory
        return {e for e, u in d1.users.items() if d0.users.get(e) != u} | {
            e for key, e in d1.identities.items() if d0.identities.get(key) != e
        }

    def leftover(self, source: str) -> set[str]:
        """Archived users (emails) who still own a group of the source and have no resync
        job waiting: the job that was to release them failed for good. Every run queues
        them again, with a warning in its report, and its drain removes them from those
        groups (README: "A run is held when ...")."""
        d = self.directory
        owners = {
            o
            for (src, _c), g in self.groups().items()
            if src == source
            for o in g.owners
            if o not in g.imports  # an import owner is no teacher to release
        }
        return {o for o in owners if d.users[o].status != "active"} - (self.queued or set())

    def approval_refusal(self, run_id: int) -> str | None:
        """Why approving this run must be refused, or None."""
        run = self.runs.get(run_id)
        if run is None:
            return "no such run"
        if run.dry_run:
            return "a dry run"
        if run.status != "held":
            return f"{run.status}, not held"
        for other in self.runs.values():
            if (
                other.source == run.source
                and other.id > run_id
                and not other.dry_run
                and other.status in ("succeeded", "succeeded_with_errors")
            ):
                return f"out of date: run {other.id} succeeded since"
        return None

    # -- writes --

    def record(self, run: Run) -> None:
        self.runs[run.id] = run

    def commit(self, source: str, decision: Decision, *, cut: bool = False) -> None:
        """A run applied: its mirror and directory become the state. ``cut``: its drain was
        cut short, none of its resync jobs has run: the groups stay as they were (but for
        the members of classes whose students alone changed, which the sync updates
        itself: :attr:`loose`), and the users it provisioned wait in the queue."""
        before = self.groups()
        touched = self.provisioned(decision)
        self.mirrors[source] = decision.mirror
        self.directory = decision.directory
        self.group_roles = self.config.teacher_roles
        # An applied run resyncs whoever its changes (and a teacher_roles edit) concern, and
        # the archived users still owning groups (:meth:`leftover`); after a live resync it is
        # a full one (live_pending), which re-reads every row the live resync wrote: the
        # groups are what the mirror says again.
        self.built = None
        if decision.mode == "full":
            self.live_pending = False
        state = self.states.setdefault(source, SourceState())
        if decision.newest is not None and (
            state.high_water_mark is None or decision.newest > state.high_water_mark
        ):
            state.high_water_mark = decision.newest
        if decision.mode == "full":
            kinds = ("persons", "classes", "enrollments")
            state.last_full_counts = {k: decision.fetched[k] for k in kinds}
            state.last_kept_counts = {k: decision.fetched[k] - decision.ignored[k] for k in kinds}
            state.last_scope = self.config.scope_key
        state.provisioning_key = self.config.provisioning_key
        if cut:
            m = self.mirrors[source]
            # The sync itself gives the groups that import owners alone keep their classes'
            # titles and students: no teacher's job does.
            before = follow_kept(before, self.fresh(), source)
            self.built = before
            self.queued = (self.queued or set()) | touched
            self.loose = {
                key: class_members(m, key[1])
                for key, g in before.items()
                if key[0] == source
                and populated(m, key[1])
                and class_members(m, key[1]) != g.members
            }
        self._remember_names()

    def batch_done(self, users: Iterable[str]) -> None:
        """Some batches of the queued jobs ran, those of these users (emails): their groups
        are what the mirror says (owners made exact, members re-read where a sync marked
        them, which is every change since the groups were built), and the groups they no
        longer want let go of them."""
        assert self.built is not None and self.queued is not None
        done = set(users)
        self.built = rebuild(self.built, self.fresh(), done, self.roster())
        self.queued -= done
        self._remember_names()

    def jobs_failed(self) -> None:
        """The queued jobs that have not run (see :meth:`batch_done`) failed for good: they
        changed nothing, so their users' groups stay as ``built`` holds them, and no job
        waits any longer. An archived user among them still owns her groups: the next run
        queues her again (:meth:`leftover`)."""
        assert self.built is not None and self.queued is not None
        self.queued = None
        self.loose = {}
        if self.built == self.fresh(self.group_roles):
            self.built = None
        self._remember_names()

    def drained(self) -> None:
        """Every queued job ran: the groups are what the mirror says again."""
        if self.queued is not None:
            self.built = None
            self.queued = None
            self.loose = {}
        self._remember_names()

    def resync(self, users: Iterable[str], built: Mapping[GroupKey, Group] | None = None) -> None:
        """A resync that re-reads everything (manual or live) of these users (emails).
        ``built``: the groups before it, when the mirror changed since (a live resync)."""
        roles = self.config.teacher_roles
        fresh = self.fresh(roles)
        self.built = rebuild(self.groups() if built is None else built, fresh, users, self.roster())
        # Reading: once every group is what the mirror says under the current roles, the
        # groups are a function of the state again.
        if self.built == fresh:
            self.built = None
            self.group_roles = roles
        self._remember_names()

    def live_resync(
        self, source: str, users: Iterable[str], answers: Sequence[tuple[str, TeacherRoster]]
    ) -> None:
        """A live resync of these users: each of their persons' live answer (``answers``,
        by person sourced id, in the order they are written) goes into the mirror, then the
        users' groups are rebuilt, and the groups that import owners alone keep follow their
        classes as the answers changed them (docs/import.md, "Owners added by import")."""
        built = self.groups()
        m = before = self.mirrors.get(source, Mirror())
        for pid, answer in answers:
            if self.config.scoped:
                answer = live_answer_in_scope(m, answer)
            m = live_apply(m, pid, answer)
        self.mirrors[source] = m
        self.live_pending = self.live_pending or m != before
        # Reading: every such group is its class's as the mirror stood, so following them
        # all is following those whose class the answers changed.
        self.resync(users, follow_kept(built, self.fresh(), source))

    def _remember_names(self) -> None:
        """Each group an import gave owners remembers the name it has now: the name it keeps
        once its class leaves the mirror (docs/import.md: the name it had, which is not the
        class's last title there when the group was behind the mirror, as a teacher's group
        is after another teacher's live resync)."""
        held = self.groups()
        for key, kept in self.imported.items():
            if key in held and held[key].name != kept.name:
                self.imported[key] = replace(kept, name=held[key].name)

    def import_rows(
        self, rows: Sequence[tuple[str, ...]], names: Mapping[GroupKey, str] | None = None
    ) -> list[str]:
        """An import of rows of (email cell, display name cell[, groups cell]): each row's
        status, and the new users in the directory (``created_by`` import, default role and
        site). The groups a row names (docs/import.md, "Columns", "Statuses" and "Owners
        added by import") make its user an owner of each, added by import; a group the user
        owns already is nothing to add. The names are matched against the groups the
        directory holds when the import starts (``names``: the groups' names to take instead
        of the oracle's, by key)."""
        seen: set[str] = set()
        headroom = (
            None
            if self.config.license_limit is None
            else max(self.config.license_limit - self.directory.active_count(), 0)
        )
        held = self.groups()
        out: list[str] = []
        for cells in rows:
            cell, name, wanted = (*cells, "", "")[:3]
            if not any(c.strip() for c in cells):
                continue  # a row of empty cells is no row (spreadsheets leave them)
            email = norm_email(cell)
            if email_problem(email) is not None:
                out.append("Invalid email")
                continue
            if email in seen:
                out.append("Duplicate row")
                continue
            seen.add(email)
            # Checks in the docs' order: ... duplicate, roles, sites, groups, ..., license.
            problem, keys = group_cell(
                wanted, {k: g.name for k, g in held.items()} if names is None else names
            )
            if problem is not None:
                out.append(problem)
                continue
            if email in self.directory.users:
                # Reading: a group the user owns already (as its teacher, or by an earlier
                # import) is nothing to add, and a teacher's ownership stays a teacher's (lost
                # when they stop teaching): the docs do not say; the importer reads every
                # owner row of the user (rostersync/importer/plan.py, _update).
                new = [k for k in keys if email not in held[k].owners]
                out.append("Updated" if new else "Already Exists")
            else:
                if headroom is not None:
                    if headroom <= 0:
                        out.append("License limit reached")
                        continue
                    headroom -= 1
                site = self.config.default_site
                self.directory.users[email] = User(
                    email=email,
                    display_name=name.strip() or "Console User",
                    roles=(self.config.default_role,),
                    sites=(site,) if site else (),
                    status="active",
                    created_by="import",
                )
                new = keys
                out.append("Success")
            for key in new:
                self._add_import_owner(key, email, held[key].name)
        return out

    def _add_import_owner(self, key: GroupKey, email: str, name: str) -> None:
        """An import made ``email`` an owner of the group: for good (docs/import.md)."""
        kept = self.imported.get(key, Imported((), name))
        self.imported[key] = replace(kept, owners=tuple(sorted({*kept.owners, email})))
        if self.built is not None:
            g = self.built[key]
            self.built[key] = replace(
                g,
                owners=tuple(sorted({*g.owners, email})),
                imports=tuple(sorted({*g.imports, email})),
            )


def _loose(name: str) -> str:
    return " ".join(name.split()).casefold()


def group_cell(cell: str, names: Mapping[GroupKey, str]) -> tuple[str | None, list[GroupKey]]:
    """An import row's ``Groups`` cell, against the directory's groups (their names, by key):
    the row's status when it cannot be used, else the groups it names (docs/import.md).
    Names are separated by ``,`` or ``;``, each trimmed, a name given twice counted once;
    ``none`` alone is no group. A name must match exactly one group's; several matching it
    is ``Failed`` ("a group name that matches several groups"). Reading: none matching it
    while several differ from it only in case or spacing is ``Failed`` too (the "Ambiguous
    ... detected" rule, which has no status of its own for groups: rostersync/importer/
    plan.py, ``_groups``); otherwise ``Group not found``."""
    parts: list[str] = []
    for part in re.split("[,;]", cell):
        part = part.strip()
        if part and part not in parts:
            parts.append(part)
    if len(parts) == 1 and parts[0].casefold() == "none":
        parts = []
    keys: list[GroupKey] = []
    for part in parts:
        exact = [k for k, n in names.items() if n == part]
        if len(exact) == 1:
            keys.append(exact[0])
            continue
        if len(exact) > 1:
            return "Failed", []
        loose = {n for n in names.values() if _loose(n) == _loose(part)}
        return ("Failed" if len(loose) > 1 else "Group not found"), []
    return None, keys

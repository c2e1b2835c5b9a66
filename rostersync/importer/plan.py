"""The import rules, as pure functions: parsed rows + a directory snapshot -> per-row outcomes.

No I/O here. :func:`plan_import` decides every row's status, message and the change to make;
:mod:`rostersync.importer.apply` loads the snapshot and carries the changes out. A dry run and
a real import call the same function, so they agree row by row.

Visibility (who may do what):

* the operator (no ``--as``) and an admin whose role has ``import_users`` with scope
  ``organization`` see every role, site and group and may manage every user;
* an admin whose role has ``import_users`` with scope ``site`` sees only their own sites, the
  roles that are not organization-wide admin roles, and the groups owned by someone at one of
  their sites; they may manage only users of their sites, and an Overwrite replaces only the
  roles and sites they can see (the others are kept);
* anyone else gets ``No Access`` on every row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from rostersync.importer.rows import DEFAULT_DISPLAY_NAME, RowInput
from rostersync.importer.statuses import Status

IMPORT_PERMISSION = "import_users"
_REPLACEABLE = ("name", "roles", "sites", "status", "delegated")


@dataclass(frozen=True, slots=True)
class RoleInfo:
    name: str
    scope: str = "organization"
    permissions: tuple[str, ...] = ()

    @property
    def org_admin(self) -> bool:
        return bool(self.permissions) and self.scope == "organization"


@dataclass(frozen=True, slots=True)
class GroupInfo:
    id: int
    name: str
    source: str
    owner_sites: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class UserInfo:
    id: int
    email: str
    display_name: str
    status: str
    delegated: bool = False
    roles: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    groups: frozenset[int] = frozenset()
    identities: frozenset[tuple[str, str]] = frozenset()  # (source, external_id)


@dataclass(frozen=True, slots=True)
class Directory:
    """What the rules need to know of the directory (only the users the file names)."""

    roles: tuple[RoleInfo, ...]
    sites: tuple[str, ...]
    groups: tuple[GroupInfo, ...] = ()
    users: Mapping[str, UserInfo] = field(default_factory=dict)
    active_users: int = 0
    # (source, external_id) -> user id, for the identities the file names
    identity_owner: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # (source, lower-cased username) -> the person's sourced id in that source's mirror
    person_by_username: Mapping[tuple[str, str], str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who imports. The operator (no ``--as``) acts with organization scope."""

    email: str | None
    can_import: bool = True
    scope: str = "organization"
    sites: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        return self.email or "operator"


OPERATOR = Actor(None)


def actor_for(
    email: str, roles: Iterable[RoleInfo], sites: Iterable[str], *, active: bool
) -> Actor:
    """An admin's powers from their roles: organization scope wins over site scope."""
    importing = [r for r in roles if IMPORT_PERMISSION in r.permissions]
    if not active or not importing:
        return Actor(email, can_import=False)
    scope = "organization" if any(r.scope == "organization" for r in importing) else "site"
    return Actor(email, can_import=True, scope=scope, sites=frozenset(sites))


@dataclass(frozen=True, slots=True)
class Policy:
    license_limit: int | None = None
    default_role: str | None = None
    default_site: str | None = None
    google_sources: tuple[str, ...] = ()  # configured google_classroom sources, for DataSync


@dataclass(frozen=True, slots=True)
class Change:
    """What to write for one row. ``None`` fields stay as they are."""

    email: str
    user_id: int | None = None  # None: create
    display_name: str | None = None
    status: str | None = None
    delegated: bool | None = None
    roles: tuple[str, ...] | None = None  # the user's complete role set
    sites: tuple[str, ...] | None = None  # the user's complete site set
    add_groups: tuple[int, ...] = ()
    add_identities: tuple[tuple[str, str, str], ...] = ()  # (source, external_id, username)
    send_verification: bool = False
    live_resync: tuple[str, ...] = ()  # google_classroom sources to refresh from

    @property
    def create(self) -> bool:
        return self.user_id is None


@dataclass(frozen=True, slots=True)
class RowOutcome:
    row: int
    email: str
    status: Status
    message: str
    change: Change | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "row": self.row,
            "email": self.email,
            "status": str(self.status),
            "message": self.message,
        }


class _Reject(Exception):
    def __init__(self, status: Status, message: str) -> None:
        self.status = status
        self.message = message


def _loose(name: str) -> str:
    return " ".join(name.split()).casefold()


def resolve_name(name: str, visible: Sequence[str], what: str) -> tuple[str, int]:
    """Match ``name`` exactly among visible names; returns (name, index in ``visible``).

    Raises ("not found" | "ambiguous", message) via :class:`LookupError` args. Only an exact
    match counts; when several visible names match loosely (case, spacing) the name is
    ambiguous, and a single loose match is offered as a hint.
    """
    exact = [i for i, v in enumerate(visible) if v == name]
    if len(exact) == 1:
        return name, exact[0]
    if len(exact) > 1:
        raise LookupError("ambiguous", f"{what} name {name!r} matches {len(exact)} {what}s")
    loose = sorted({visible[i] for i, v in enumerate(visible) if _loose(v) == _loose(name)})
    if len(loose) > 1:
        options = ", ".join(repr(v) for v in loose)
        raise LookupError("ambiguous", f"{what} name {name!r} could be any of {options}")
    hint = f" (did you mean {loose[0]!r}?)" if loose else ""
    raise LookupError("missing", f"{what} {name!r} does not exist or is not visible to you{hint}")


class _Planner:
    def __init__(self, directory: Directory, actor: Actor, policy: Policy) -> None:
        self.d = directory
        self.actor = actor
        self.policy = policy
        site_scoped = actor.scope == "site"
        self.visible_roles = tuple(
            r.name for r in directory.roles if not (site_scoped and r.org_admin)
        )
        self.visible_sites = tuple(
            s for s in directory.sites if not site_scoped or s in actor.sites
        )
        self.visible_groups = tuple(
            g for g in directory.groups if not site_scoped or g.owner_sites & actor.sites
        )
        self.headroom = (
            None
            if policy.license_limit is None
            else max(policy.license_limit - directory.active_users, 0)
        )
        self.seen: dict[str, int] = {}
        self.claimed: dict[tuple[str, str], str] = {}  # identities claimed earlier in the file

    # -- lookups ---------------------------------------------------------------------------

    def _roles(self, names: Sequence[str]) -> tuple[str, ...]:
        return _resolve_all(
            names, self.visible_roles, "role", Status.ROLE_AMBIGUOUS, Status.ROLE_NOT_FOUND
        )

    def _sites(self, names: Sequence[str]) -> tuple[str, ...]:
        return _resolve_all(
            names, self.visible_sites, "site", Status.SITE_AMBIGUOUS, Status.SITE_NOT_FOUND
        )

    def _groups(self, names: Sequence[str]) -> tuple[GroupInfo, ...]:
        names_visible = [g.name for g in self.visible_groups]
        out: list[GroupInfo] = []
        for name in names:
            try:
                out.append(self.visible_groups[resolve_name(name, names_visible, "group")[1]])
            except LookupError as exc:
                kind, msg = exc.args
                # The contract has no "ambiguous group" status: Failed, saying why.
                raise _Reject(
                    Status.FAILED if kind == "ambiguous" else Status.GROUP_NOT_FOUND, msg
                ) from None
        return tuple(out)

    def _identities(self, row: RowInput, user: UserInfo | None) -> tuple[tuple[str, str, str], ...]:
        out = []
        for source, username in row.source_usernames:
            # A username known in the source's roster links the real person (their classes
            # then become groups); otherwise it is kept as a plain username.
            ext = (
                self.d.person_by_username.get((source, username.lower())) or f"username:{username}"
            )
            owner = self.d.identity_owner.get((source, ext))
            if owner is not None and (user is None or owner != user.id):
                raise _Reject(
                    Status.FAILED, f"{source}:{username} is already linked to another user"
                )
            earlier = self.claimed.get((source, ext))
            if earlier is not None and earlier != row.email:
                raise _Reject(Status.FAILED, f"{source}:{username} is also given for {earlier}")
            if user is None or (source, ext) not in user.identities:
                out.append((source, ext, username))
        return tuple(out)

    def _take_license(self) -> None:
        if self.headroom is None:
            return
        if self.headroom <= 0:
            raise _Reject(
                Status.LICENSE_LIMIT,
                f"the license allows {self.policy.license_limit} active users; "
                f"{self.d.active_users} are in use",
            )
        self.headroom -= 1

    # -- rows -------------------------------------------------------------------------------

    def plan(self, row: RowInput) -> RowOutcome:
        if not self.actor.can_import:
            return RowOutcome(
                row.row,
                row.email,
                Status.NO_ACCESS,
                f"{self.actor.label} has no role with the {IMPORT_PERMISSION} permission",
            )
        if row.problem is not None:
            return RowOutcome(row.row, row.email, row.problem[0], row.problem[1])
        first = self.seen.get(row.email)
        if first is not None:
            return RowOutcome(
                row.row, row.email, Status.DUPLICATE_ROW, f"same email as row {first}; row skipped"
            )
        self.seen[row.email] = row.row
        try:
            user = self.d.users.get(row.email)
            outcome = self._create(row) if user is None else self._update(row, user)
        except _Reject as rej:
            return RowOutcome(row.row, row.email, rej.status, rej.message)
        if outcome.change is not None:
            for source, ext, _username in outcome.change.add_identities:
                self.claimed[(source, ext)] = row.email
        return outcome

    def _delegate(self, row: RowInput, roles: tuple[str, ...], notes: list[str]) -> tuple[str, ...]:
        if row.delegated and len(roles) > 1:
            dropped = ", ".join(repr(r) for r in roles[1:])
            notes.append(f"Delegated: kept only the first role {roles[0]!r} (dropped {dropped})")
            return roles[:1]
        return roles

    def _extras(
        self, row: RowInput, notes: list[str], *, new: bool
    ) -> tuple[bool, tuple[str, ...]]:
        verify = False
        if row.send_verification:
            if new:
                verify = True
                notes.append("verification email queued")
            else:
                notes.append("verification email not sent: the user already exists")
        live: tuple[str, ...] = ()
        if row.data_sync:
            if self.policy.google_sources:
                live = self.policy.google_sources
                names = ", ".join(repr(s) for s in live)
                notes.append(f"live group resync queued from Google Classroom source {names}")
            else:
                notes.append("DataSync: no Google Classroom source is configured; nothing queued")
        return verify, live

    def _create(self, row: RowInput) -> RowOutcome:
        notes: list[str] = []
        wanted_roles = row.roles or (
            (self.policy.default_role,) if self.policy.default_role else ()
        )
        roles = self._delegate(row, self._roles(wanted_roles), notes)
        if row.sites:
            sites = self._sites(row.sites)
        elif self.actor.scope == "site":
            if self.policy.default_site in self.actor.sites:
                sites = (self.policy.default_site,)
            elif len(self.actor.sites) == 1:
                sites = tuple(self.actor.sites)
            else:
                raise _Reject(Status.SITE_NOT_FOUND, "no Site given: name one of your sites")
        else:
            sites = self._sites((self.policy.default_site,)) if self.policy.default_site else ()
        groups = self._groups(row.groups)
        identities = self._identities(row, None)
        status = row.status or "active"
        if status == "active":
            self._take_license()
        verify, live = self._extras(row, notes, new=True)
        change = Change(
            email=row.email,
            display_name=row.display_name or DEFAULT_DISPLAY_NAME,
            status=status,
            delegated=row.delegated,
            roles=roles,
            sites=sites,
            add_groups=tuple(g.id for g in groups),
            add_identities=identities,
            send_verification=verify,
            live_resync=live,
        )
        what = "created" + (" (archived)" if status == "archived" else "")
        return RowOutcome(row.row, row.email, Status.SUCCESS, "; ".join([what, *notes]), change)

    def _update(self, row: RowInput, user: UserInfo) -> RowOutcome:
        if self.actor.scope == "site" and not set(user.sites) & self.actor.sites:
            raise _Reject(Status.NO_ACCESS, f"{user.email} is not a user of any of your sites")
        notes: list[str] = []
        changed: list[str] = []
        roles = self._roles(row.roles)
        sites = self._sites(row.sites)
        groups = [g for g in self._groups(row.groups) if g.id not in user.groups]
        identities = self._identities(row, user)
        new_name = new_status = new_delegated = None
        new_roles: tuple[str, ...] | None = None
        new_sites: tuple[str, ...] | None = None
        if row.overwrite:
            if row.display_name and row.display_name != user.display_name:
                new_name = row.display_name
                changed.append("name")
            if roles:
                kept = tuple(r for r in user.roles if r not in self.visible_roles)
                final = self._delegate(row, (*kept, *roles) if not row.delegated else roles, notes)
                if set(final) != set(user.roles):
                    new_roles = final
                    changed.append("roles")
            if sites:
                kept = tuple(s for s in user.sites if s not in self.visible_sites)
                final_sites = (*kept, *sites)
                if set(final_sites) != set(user.sites):
                    new_sites = final_sites
                    changed.append("sites")
            if row.status and row.status != user.status:
                if row.status == "active":
                    self._take_license()
                new_status = row.status
                changed.append("status")
            if row.delegated != user.delegated:
                new_delegated = row.delegated
                changed.append("delegated")
        elif self._would_overwrite(row, user, roles, sites):
            notes.append("Overwrite is FALSE: name, roles, sites and status left as they are")
        if groups:
            changed.append("added to " + ", ".join(repr(g.name) for g in groups))
        if identities:
            changed.append("linked " + ", ".join(f"{s}:{u}" for s, _e, u in identities))
        _verify, live = self._extras(row, notes, new=False)
        change = Change(
            email=row.email,
            user_id=user.id,
            display_name=new_name,
            status=new_status,
            delegated=new_delegated,
            roles=new_roles,
            sites=new_sites,
            add_groups=tuple(g.id for g in groups),
            add_identities=identities,
            live_resync=live,
        )
        if changed:
            fields = [c for c in changed if c in _REPLACEABLE]
            others = [c for c in changed if c not in _REPLACEABLE]
            parts = ([", ".join(fields) + " replaced"] if fields else []) + others + notes
            return RowOutcome(row.row, row.email, Status.UPDATED, "; ".join(parts), change)
        message = "; ".join(["already exists; nothing to change", *notes])
        keep = change if live else None  # a live resync is queued even when nothing changed
        return RowOutcome(row.row, row.email, Status.ALREADY_EXISTS, message, keep)

    @staticmethod
    def _would_overwrite(
        row: RowInput, user: UserInfo, roles: tuple[str, ...], sites: tuple[str, ...]
    ) -> bool:
        return bool(
            (row.display_name and row.display_name != user.display_name)
            or (roles and not set(roles) <= set(user.roles))
            or (sites and not set(sites) <= set(user.sites))
            or (row.status and row.status != user.status)
        )


def plan_import(
    rows: Sequence[RowInput], directory: Directory, actor: Actor, policy: Policy
) -> list[RowOutcome]:
    """Every row's outcome, in file order. Rows are independent, except that the license
    headroom, duplicate emails and claimed identities carry from earlier rows to later ones."""
    planner = _Planner(directory, actor, policy)
    return [planner.plan(row) for row in rows]


def _resolve_all(
    names: Sequence[str], visible: Sequence[str], kind: str, ambiguous: Status, not_found: Status
) -> tuple[str, ...]:
    """Each name resolved against what the importer may see, or the row's rejection."""
    out = []
    for name in names:
        try:
            out.append(resolve_name(name, visible, kind)[0])
        except LookupError as exc:
            reason, msg = exc.args
            raise _Reject(ambiguous if reason == "ambiguous" else not_found, msg) from None
    return tuple(out)

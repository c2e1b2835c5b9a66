"""Every table, as SQLModel classes. Alembic migrations in ``rostersync/store/migrations`` create them.

Three families:

* directory: ``role``, ``site``, ``user`` (+ ``user_role``, ``user_site``, ``user_identity``),
  ``groups`` (+ ``group_owner``, ``group_member``). The table is ``groups``, plural, because
  GROUP is an SQL keyword and the set-based SQL in this package is easier to read unquoted.
* mirror: ``roster_*`` keyed by ``(source, sourced_id)``, each with a ``row_hash`` of its content
  so a run finds what changed with one join; ``staging_*`` twins keyed by ``(run_id, sourced_id)``
  (on SQLite the key is an index the apply builds: see ``sync.staging``).
* operations: ``sync_run`` (+ ``run_rejection``, ``run_change``), ``resync_job``, ``import_run``/``import_row``,
  ``outbox_email``, ``source_state``, ``source_lease``, ``instance``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, UniqueConstraint, false, text
from sqlmodel import Field, SQLModel


def _ts() -> Any:
    # sa_type, not sa_column: a Column object cannot be shared by the mirror/staging twins.
    return Field(default=None, sa_type=DateTime(timezone=True))


# -- directory ----------------------------------------------------------------------------


class Role(SQLModel, table=True):
    __tablename__ = "role"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=256, unique=True)
    scope: str = Field(default="organization", max_length=20)
    permissions: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class Site(SQLModel, table=True):
    __tablename__ = "site"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=50, unique=True)


class User(SQLModel, table=True):
    __tablename__ = "user"
    id: int | None = Field(default=None, primary_key=True)
    # Always stored lower-cased: case-insensitive uniqueness without functional indexes.
    email: str = Field(max_length=256, unique=True)
    display_name: str = Field(default="Console User", max_length=256)
    status: str = Field(default="active", max_length=10, index=True)
    # "source:NAME" when rostersync created the user from a roster, "import" for bulk import,
    # "teachers-import:NAME" for the manual import; only "source:" users are ever archived.
    created_by: str | None = Field(default=None, max_length=128)
    archived_by_sync: bool = Field(default=False)
    delegated: bool = Field(default=False)
    created_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()


class UserRole(SQLModel, table=True):
    __tablename__ = "user_role"
    user_id: int = Field(foreign_key="user.id", primary_key=True, ondelete="CASCADE")
    role_id: int = Field(foreign_key="role.id", primary_key=True, ondelete="CASCADE")


class UserSite(SQLModel, table=True):
    __tablename__ = "user_site"
    user_id: int = Field(foreign_key="user.id", primary_key=True, ondelete="CASCADE")
    site_id: int = Field(foreign_key="site.id", primary_key=True, ondelete="CASCADE")


class UserIdentity(SQLModel, table=True):
    """Links a console user to a person in a roster source (or a source username)."""

    __tablename__ = "user_identity"
    __table_args__ = (UniqueConstraint("source", "external_id", name="uq_identity_source_ext"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True, ondelete="CASCADE")
    source: str = Field(max_length=64)
    external_id: str = Field(max_length=256)
    username: str | None = Field(default=None, max_length=256)


class Group(SQLModel, table=True):
    __tablename__ = "groups"
    __table_args__ = (UniqueConstraint("source", "external_id", name="uq_group_source_ext"),)
    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=64)
    external_id: str = Field(max_length=256)
    name: str = Field(max_length=512)
    created_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()


class GroupOwner(SQLModel, table=True):
    __tablename__ = "group_owner"
    group_id: int = Field(foreign_key="groups.id", primary_key=True, ondelete="CASCADE")
    user_id: int = Field(foreign_key="user.id", primary_key=True, index=True, ondelete="CASCADE")
    # "roster": from the class's teachers, managed by resyncs; "import": added by an admin
    # (the import's Groups column), which resyncs never take away.
    origin: str = Field(
        default="roster", max_length=10, sa_column_kwargs={"server_default": "roster"}
    )


class GroupMember(SQLModel, table=True):
    __tablename__ = "group_member"
    group_id: int = Field(foreign_key="groups.id", primary_key=True, ondelete="CASCADE")
    sourced_id: str = Field(primary_key=True, max_length=256)
    email: str | None = Field(default=None, max_length=256)
    name: str = Field(default="", max_length=512)


# -- mirror and staging ---------------------------------------------------------------------


class _OrgCols(SQLModel):
    sourced_id: str = Field(primary_key=True, max_length=256)
    name: str = Field(default="", max_length=512)
    type: str = Field(default="school", max_length=40)
    identifier: str | None = Field(default=None, max_length=256)
    parent_id: str | None = Field(default=None, max_length=256)
    status: str = Field(default="active", max_length=12)
    date_last_modified: datetime | None = _ts()
    row_hash: str = Field(max_length=16)


class _PersonCols(SQLModel):
    sourced_id: str = Field(primary_key=True, max_length=256)
    role: str = Field(max_length=40)  # the primary role
    # every role, lower-cased and comma-joined (OneRoster 1.2 roles[]): see records.person_roles
    roles: str = Field(default="", max_length=512)
    given_name: str = Field(default="", max_length=256)
    family_name: str = Field(default="", max_length=256)
    email: str | None = Field(default=None, max_length=256)
    username: str | None = Field(default=None, max_length=256)
    enabled: bool = True
    org_ids: str = Field(default="", max_length=2048)  # comma-joined sourcedIds
    status: str = Field(default="active", max_length=12)
    date_last_modified: datetime | None = _ts()
    row_hash: str = Field(max_length=16)


class _ClassCols(SQLModel):
    sourced_id: str = Field(primary_key=True, max_length=256)
    title: str = Field(default="", max_length=512)
    class_code: str | None = Field(default=None, max_length=256)
    school_id: str | None = Field(default=None, max_length=256)
    status: str = Field(default="active", max_length=12)
    date_last_modified: datetime | None = _ts()
    row_hash: str = Field(max_length=16)


class _EnrollmentCols(SQLModel):
    sourced_id: str = Field(primary_key=True, max_length=256)
    class_id: str = Field(max_length=256)
    user_id: str = Field(max_length=256)
    role: str = Field(max_length=40)
    status: str = Field(default="active", max_length=12)
    primary: bool = False
    date_last_modified: datetime | None = _ts()
    row_hash: str = Field(max_length=16)


class RosterOrgRow(_OrgCols, table=True):
    __tablename__ = "roster_org"
    source: str = Field(primary_key=True, max_length=64)


class RosterPersonRow(_PersonCols, table=True):
    __tablename__ = "roster_person"
    __table_args__ = (Index("ix_roster_person_email", "source", "email"),)
    source: str = Field(primary_key=True, max_length=64)


class RosterClassRow(_ClassCols, table=True):
    __tablename__ = "roster_class"
    source: str = Field(primary_key=True, max_length=64)


class RosterEnrollmentRow(_EnrollmentCols, table=True):
    __tablename__ = "roster_enrollment"
    __table_args__ = (
        Index("ix_roster_enr_class", "source", "class_id", "role", "user_id"),
        Index("ix_roster_enr_user", "source", "user_id", "role"),
    )
    source: str = Field(primary_key=True, max_length=64)


class StagingOrg(_OrgCols, table=True):
    __tablename__ = "staging_org"
    run_id: int = Field(primary_key=True)


class StagingPerson(_PersonCols, table=True):
    __tablename__ = "staging_person"
    run_id: int = Field(primary_key=True)


class StagingClass(_ClassCols, table=True):
    __tablename__ = "staging_class"
    run_id: int = Field(primary_key=True)


class StagingEnrollment(_EnrollmentCols, table=True):
    __tablename__ = "staging_enrollment"
    run_id: int = Field(primary_key=True)


# -- operations -------------------------------------------------------------------------------


class SyncRun(SQLModel, table=True):
    __tablename__ = "sync_run"
    __table_args__ = (Index("ix_sync_run_source_status", "source", "status"),)
    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=64)
    mode: str = Field(max_length=10)  # what ran: full | delta
    requested_mode: str = Field(default="full", max_length=10)
    trigger: str = Field(default="cli", max_length=20)  # cli | schedule | startup | approval
    status: str = Field(default="running", max_length=24)
    dry_run: bool = False
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    counts: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    fetched: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error: str | None = Field(default=None, max_length=4000)
    hold_reason: str | None = Field(default=None, max_length=2000)
    warnings: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    high_water_mark: datetime | None = _ts()
    approved_at: datetime | None = _ts()


class RunChange(SQLModel, table=True):
    """The exact change set of a held run, or of a dry run asked for it (``--changes``):
    what applying it would do to users and groups. Kept until a later real run of the
    source succeeds (an approval included), after which it no longer describes anything."""

    __tablename__ = "run_change"
    run_id: int = Field(foreign_key="sync_run.id", primary_key=True, ondelete="CASCADE")
    users: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    groups: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    notes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    #: whether each group's added and removed owners and members are listed (not just counted)
    members_listed: bool = True


class RunRejection(SQLModel, table=True):
    __tablename__ = "run_rejection"
    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="sync_run.id", index=True, ondelete="CASCADE")
    entity: str = Field(max_length=20)
    sourced_id: str | None = Field(default=None, max_length=256)
    reason: str = Field(max_length=1000)
    location: str | None = Field(default=None, max_length=512)


class ResyncJob(SQLModel, table=True):
    __tablename__ = "resync_job"
    __table_args__ = (
        Index("ix_resync_job_lease", "state", "run_after"),
        # At most one queued job per user: the queue deduplicates at the database.
        Index(
            "uq_resync_job_queued_user",
            "user_id",
            unique=True,
            sqlite_where=text("state = 'queued'"),
            postgresql_where=text("state = 'queued'"),
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True, ondelete="CASCADE")
    state: str = Field(default="queued", max_length=10)  # queued | running | succeeded | failed
    live: bool = False
    # Re-read every member of the user's groups (manual, import and live resyncs); a sync's
    # job reads only what its run marked.
    refresh: bool = False
    attempts: int = 0
    reason: str = Field(default="", max_length=200)
    last_error: str | None = Field(default=None, max_length=4000)
    run_id: int | None = Field(default=None, index=True)
    run_after: datetime | None = _ts()
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_expires: datetime | None = _ts()
    created_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    result: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ImportRun(SQLModel, table=True):
    __tablename__ = "import_run"
    id: int | None = Field(default=None, primary_key=True)
    file_name: str = Field(max_length=1024)
    actor: str | None = Field(default=None, max_length=256)
    dry_run: bool = False
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    counts: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ImportRow(SQLModel, table=True):
    __tablename__ = "import_row"
    import_id: int = Field(foreign_key="import_run.id", primary_key=True, ondelete="CASCADE")
    row: int = Field(primary_key=True)
    email: str | None = Field(default=None, max_length=512)
    status: str = Field(max_length=40)
    message: str = Field(default="", max_length=2000)


class OutboxEmail(SQLModel, table=True):
    __tablename__ = "outbox_email"
    # One verification email per user, ever: re-imports cannot send a second one.
    __table_args__ = (UniqueConstraint("user_id", "kind", name="uq_outbox_user_kind"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE")
    kind: str = Field(max_length=40)
    to_addr: str = Field(max_length=256)
    subject: str = Field(max_length=512)
    body: str = Field(default="", max_length=20000)
    state: str = Field(default="queued", max_length=10)  # queued | sent | failed
    attempts: int = 0
    last_error: str | None = Field(default=None, max_length=2000)
    created_at: datetime | None = _ts()
    sent_at: datetime | None = _ts()


class DirtyClass(SQLModel, table=True):
    """A class whose group members must be re-read at the next resync of its teachers
    (marked by the sync that changed it, cleared by the resync that refreshed it)."""

    __tablename__ = "dirty_class"
    source: str = Field(primary_key=True, max_length=64)
    class_id: str = Field(primary_key=True, max_length=256)


class DirtyMember(SQLModel, table=True):
    """One member of a class's group to re-read at the next resync of its teachers: the
    enrollment between them or the person changed (cleared by the resync that re-read it)."""

    __tablename__ = "dirty_member"
    source: str = Field(primary_key=True, max_length=64)
    class_id: str = Field(primary_key=True, max_length=256)
    person_id: str = Field(primary_key=True, max_length=256)


class SourceState(SQLModel, table=True):
    __tablename__ = "source_state"
    source: str = Field(primary_key=True, max_length=64)
    high_water_mark: datetime | None = _ts()
    last_full_at: datetime | None = _ts()
    last_success_at: datetime | None = _ts()
    last_run_id: int | None = None
    # Fingerprint of the provisioning settings the last successful run decided with: a delta
    # run that finds them changed re-decides every teacher, not just the ones it touched.
    decided_with: str | None = Field(default=None, max_length=64)
    # A teacher was skipped for want of a license seat: once seats are free, the next run
    # (delta or not) decides for every teacher, not only those its changes touched.
    license_waiting: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    # Record counts of the last successful full pull, for the min_source_ratio check.
    last_counts: dict[str, int] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )


class SourceLease(SQLModel, table=True):
    """Who is syncing a source right now (several instances share one database)."""

    __tablename__ = "source_lease"
    source: str = Field(primary_key=True, max_length=64)
    owner: str = Field(max_length=128)
    expires_at: datetime | None = _ts()


class Instance(SQLModel, table=True):
    """A process that takes leases (a daemon, or a command that syncs or processes jobs), so
    that others can tell whether it still runs (see ``rostersync.daemon.recovery``)."""

    __tablename__ = "instance"
    id: str = Field(primary_key=True, max_length=128)  # the owner named in leases
    kind: str = Field(max_length=20)  # daemon | command | engine
    host: str = Field(max_length=255)
    pid: int
    # Its start time in clock ticks after boot, and the boot and pid namespace that pid and
    # time belong to: a pid reused by another process, or counted again after a reboot or in
    # another container, is not taken for this one. NULL where /proc cannot tell.
    pid_started: int | None = Field(default=None, sa_type=BigInteger)
    pid_scope: str | None = Field(default=None, max_length=128)
    started_at: datetime | None = _ts()
    heartbeat_at: datetime | None = _ts()


metadata = SQLModel.metadata

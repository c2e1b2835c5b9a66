"""Every table, as SQLAlchemy Core ``Table`` objects on :data:`metadata`. Alembic migrations in
``rostersync/store/migrations`` create them.

Core tables, not SQLModel classes: the code only uses them in SQL statements, and building the
classes' pydantic models and ORM mappings cost every process about 0.45 s of CPU at start-up.
``String(N)`` is ``VARCHAR(N)``, as the migrations' ``AutoString(length=N)``; the Python-side
defaults are those the SQLModel fields had (some inserts leave those columns out).

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

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Computed,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.sql.schema import SchemaItem

metadata = MetaData()

#: The dialect of an index or constraint only one dialect's databases have (declared with
#: ``ddl_if``, which Alembic does not read): ``{item: dialect}``. See :func:`_keyed`.
DIALECT_OF: dict[SchemaItem, str] = {}


def _id() -> Column[int]:
    return Column("id", Integer, primary_key=True)


def _ts(name: str) -> Column[Any]:
    return Column(name, DateTime(timezone=True))


def _cascade(name: str, target: str, **kw: Any) -> Column[int]:
    """An integer column referencing ``target`` (``table.id``), deleted with it."""
    return Column(name, Integer, ForeignKey(target, ondelete="CASCADE"), nullable=False, **kw)


# -- directory ----------------------------------------------------------------------------

role = Table(
    "role",
    metadata,
    _id(),
    Column("name", String(256), nullable=False, unique=True),
    Column("scope", String(20), nullable=False, default="organization"),
    Column("permissions", JSON, nullable=False),
)

site = Table(
    "site",
    metadata,
    _id(),
    Column("name", String(50), nullable=False, unique=True),
)

user = Table(
    "user",
    metadata,
    _id(),
    # Always stored lower-cased: case-insensitive uniqueness without functional indexes.
    Column("email", String(256), nullable=False, unique=True),
    Column("display_name", String(256), nullable=False, default="Console User"),
    Column("status", String(10), nullable=False, default="active", index=True),
    # "source:NAME" when rostersync created the user from a roster, "import" for bulk import,
    # "teachers-import:NAME" for the manual import; only "source:" users are ever archived.
    Column("created_by", String(128)),
    Column("archived_by_sync", Boolean, nullable=False, default=False),
    Column("delegated", Boolean, nullable=False, default=False),
    _ts("created_at"),
    _ts("updated_at"),
)

user_role = Table(
    "user_role",
    metadata,
    _cascade("user_id", "user.id", primary_key=True),
    _cascade("role_id", "role.id", primary_key=True),
)

user_site = Table(
    "user_site",
    metadata,
    _cascade("user_id", "user.id", primary_key=True),
    _cascade("site_id", "site.id", primary_key=True),
)

# Links a console user to a person in a roster source (or a source username).
user_identity = Table(
    "user_identity",
    metadata,
    _id(),
    _cascade("user_id", "user.id", index=True),
    Column("source", String(64), nullable=False),
    Column("external_id", String(256), nullable=False),
    Column("username", String(256)),
    UniqueConstraint("source", "external_id", name="uq_identity_source_ext"),
)

groups = Table(
    "groups",
    metadata,
    _id(),
    Column("source", String(64), nullable=False),
    Column("external_id", String(256), nullable=False),
    Column("name", String(512), nullable=False),
    _ts("created_at"),
    _ts("updated_at"),
    UniqueConstraint("source", "external_id", name="uq_group_source_ext"),
)

group_owner = Table(
    "group_owner",
    metadata,
    _cascade("group_id", "groups.id", primary_key=True),
    _cascade("user_id", "user.id", primary_key=True, index=True),
    # "roster": from the class's teachers, managed by resyncs; "import": added by an admin
    # (the import's Groups column), which resyncs never take away.
    Column("origin", String(10), nullable=False, default="roster", server_default="roster"),
)

#: group_member's reference to its group, SQLite's alone (migration 0020): on PostgreSQL a
#: trigger checked it row by row, half of a first load's member fill, while the one place
#: that removes groups (resync.groups) removes their members first, in its transaction.
_MEMBER_OF = ForeignKeyConstraint(["group_id"], ["groups.id"], ondelete="CASCADE").ddl_if(
    dialect="sqlite"
)
DIALECT_OF[_MEMBER_OF] = "sqlite"

group_member = Table(
    "group_member",
    metadata,
    Column("group_id", Integer, nullable=False, primary_key=True),
    Column("sourced_id", String(256), primary_key=True),
    Column("email", String(256)),
    Column("name", String(512), nullable=False, default=""),
    _MEMBER_OF,
)


# -- mirror and staging ---------------------------------------------------------------------
# The roster_* and staging_* twins share their columns; each call makes fresh Column objects
# (a Column belongs to one table). The key's second column, source or run_id, comes last.


def _row_hash() -> Column[str]:
    return Column("row_hash", String(16), nullable=False)


def _fp() -> Column[int]:
    """The fingerprint of the record as the source sent it (its bytes), where a connector
    gives one: a full run skips a record whose fingerprint its mirror row holds without
    normalizing it (rostersync.sync.known). NULL: unknown, the row is compared by its hash."""
    return Column("fp", BigInteger)


def _org_cols() -> list[Column[Any]]:
    return [
        Column("sourced_id", String(256), primary_key=True),
        Column("name", String(512), nullable=False, default=""),
        Column("type", String(40), nullable=False, default="school"),
        Column("identifier", String(256)),
        Column("parent_id", String(256)),
        Column("status", String(12), nullable=False, default="active"),
        _ts("date_last_modified"),
        _row_hash(),
        _fp(),
    ]


def _person_cols() -> list[Column[Any]]:
    return [
        Column("sourced_id", String(256), primary_key=True),
        Column("role", String(40), nullable=False),  # the primary role
        # every role, lower-cased and comma-joined (OneRoster 1.2 roles[]): see records.person_roles
        Column("roles", String(512), nullable=False, default=""),
        Column("given_name", String(256), nullable=False, default=""),
        Column("family_name", String(256), nullable=False, default=""),
        Column("email", String(256)),
        Column("username", String(256)),
        Column("enabled", Boolean, nullable=False, default=True),
        Column("org_ids", String(2048), nullable=False, default=""),  # comma-joined sourcedIds
        Column("status", String(12), nullable=False, default="active"),
        _ts("date_last_modified"),
        _row_hash(),
        _fp(),
    ]


def _class_cols() -> list[Column[Any]]:
    return [
        Column("sourced_id", String(256), primary_key=True),
        Column("title", String(512), nullable=False, default=""),
        Column("class_code", String(256)),
        Column("school_id", String(256)),
        Column("status", String(12), nullable=False, default="active"),
        _ts("date_last_modified"),
        _row_hash(),
        _fp(),
    ]


def _enrollment_cols() -> list[Column[Any]]:
    return [
        Column("sourced_id", String(256), primary_key=True),
        Column("class_id", String(256), nullable=False),
        Column("user_id", String(256), nullable=False),
        Column("role", String(40), nullable=False),
        Column("status", String(12), nullable=False, default="active"),
        Column("primary", Boolean, nullable=False, default=False),
        _ts("date_last_modified"),
        _row_hash(),
        _fp(),
    ]


def _source() -> Column[str]:
    return Column("source", String(64), primary_key=True)


def _run_id() -> Column[int]:
    return Column("run_id", Integer, primary_key=True)


def _keyed(name: str, *columns: str) -> tuple[Index, Index]:
    """An index on a mirror table over ``columns`` and the ``source``: SQLite's leads with the
    source, PostgreSQL's ends with it (migration 0019). PostgreSQL's sorts and descents
    compare a key column by column, and a leading text column equal on every row (most
    installations have one source) made its index builds and member reads several times
    slower (tests/benchmarks/README.md); SQLite's member reads, planned without statistics,
    need the source first."""
    sqlite = Index(name, "source", *columns).ddl_if(dialect="sqlite")
    postgresql = Index(name, *columns, "source").ddl_if(dialect="postgresql")
    DIALECT_OF.update({sqlite: "sqlite", postgresql: "postgresql"})
    return sqlite, postgresql


def _fp_index(kind: str) -> tuple[Index, Index]:
    """A full run reads a source's fingerprints, with their ids, from this index alone: the
    table's rows are several times wider (rostersync.sync.known)."""
    return _keyed(f"ix_roster_{kind}_fp", "fp", "sourced_id")


roster_org = Table("roster_org", metadata, *_org_cols(), _source(), *_fp_index("org"))

#: A person's values as a group member: the email lower-cased and trimmed (NULL when empty),
#: and the name. Stored columns the database computes on every write (migration 0017): a
#: student is a member of several groups, and a first load computed these per membership.
MEMBER_EMAIL_SQL = "NULLIF(LOWER(TRIM(COALESCE(email, ''))), '')"
MEMBER_NAME_SQL = "TRIM(COALESCE(given_name, '') || ' ' || COALESCE(family_name, ''))"
#: The stored columns each generated column is computed from.
GENERATED_FROM: dict[str, tuple[str, ...]] = {
    "member_email": ("email",),
    "member_name": ("given_name", "family_name"),
}

#: SQLite: everything a member read takes from a person, in a narrow index the reads name
#: (``INDEXED BY``: without statistics SQLite's planner takes the key's index and then the
#: row, per member a random visit to a table several times wider). SQLite's only (migration
#: 0018): PostgreSQL's member reads were not measured to gain from it.
PERSON_MEMBER_INDEX = "ix_roster_person_member"


def _sqlite_only(index: Index) -> Index:
    DIALECT_OF[index] = "sqlite"
    return index.ddl_if(dialect="sqlite")


#: Indexes only a SQLite database has (declared with ``ddl_if``).
SQLITE_ONLY_INDEXES = frozenset({PERSON_MEMBER_INDEX})


def indexes_on(table: Table, dialect: str) -> list[Index]:
    """The table's indexes as a database of ``dialect`` has them."""
    return [i for i in table.indexes if DIALECT_OF.get(i, dialect) == dialect]


roster_person = Table(
    "roster_person",
    metadata,
    *_person_cols(),
    _source(),
    Column("member_email", Text, Computed(MEMBER_EMAIL_SQL, persisted=True)),
    Column("member_name", Text, Computed(MEMBER_NAME_SQL, persisted=True)),
    *_keyed("ix_roster_person_email", "email"),
    *_fp_index("person"),
    _sqlite_only(
        Index(PERSON_MEMBER_INDEX, "source", "sourced_id", "status", "member_email", "member_name")
    ),
)

roster_class = Table("roster_class", metadata, *_class_cols(), _source(), *_fp_index("class"))

roster_enrollment = Table(
    "roster_enrollment",
    metadata,
    *_enrollment_cols(),
    _source(),
    *_keyed("ix_roster_enr_class", "class_id", "role", "user_id"),
    *_keyed("ix_roster_enr_user", "user_id", "role"),
    *_fp_index("enrollment"),
)

staging_org = Table("staging_org", metadata, *_org_cols(), _run_id())
staging_person = Table("staging_person", metadata, *_person_cols(), _run_id())
staging_class = Table("staging_class", metadata, *_class_cols(), _run_id())
staging_enrollment = Table("staging_enrollment", metadata, *_enrollment_cols(), _run_id())


# -- operations -------------------------------------------------------------------------------

sync_run = Table(
    "sync_run",
    metadata,
    _id(),
    Column("source", String(64), nullable=False),
    Column("mode", String(10), nullable=False),  # what ran: full | delta
    Column("requested_mode", String(10), nullable=False, default="full"),
    # cli | schedule | startup | approval
    Column("trigger", String(20), nullable=False, default="cli"),
    Column("status", String(24), nullable=False, default="running"),
    Column("dry_run", Boolean, nullable=False, default=False),
    _ts("started_at"),
    _ts("finished_at"),
    Column("counts", JSON, nullable=False),
    Column("fetched", JSON, nullable=False),
    Column("error", String(4000)),
    Column("hold_reason", String(2000)),
    Column("warnings", JSON, nullable=False),
    _ts("high_water_mark"),
    _ts("approved_at"),
    Index("ix_sync_run_source_status", "source", "status"),
)

# The exact change set of a held run, or of a dry run asked for it (``--changes``): what
# applying it would do to users and groups. Kept until a later real run of the source
# succeeds (an approval included), after which it no longer describes anything.
run_change = Table(
    "run_change",
    metadata,
    _cascade("run_id", "sync_run.id", primary_key=True),
    Column("users", JSON, nullable=False),
    Column("groups", JSON, nullable=False),
    Column("notes", JSON, nullable=False),
    # whether each group's added and removed owners and members are listed (not just counted)
    Column("members_listed", Boolean, nullable=False, default=True),
)

run_rejection = Table(
    "run_rejection",
    metadata,
    _id(),
    _cascade("run_id", "sync_run.id", index=True),
    Column("entity", String(20), nullable=False),
    Column("sourced_id", String(256)),
    Column("reason", String(1000), nullable=False),
    Column("location", String(512)),
)

resync_job = Table(
    "resync_job",
    metadata,
    _id(),
    _cascade("user_id", "user.id", index=True),
    # queued | running | succeeded | failed
    Column("state", String(10), nullable=False, default="queued"),
    Column("live", Boolean, nullable=False, default=False),
    # Re-read every member of the user's groups (manual, import and live resyncs); a sync's
    # job reads only what its run marked.
    Column("refresh", Boolean, nullable=False, default=False),
    Column("attempts", Integer, nullable=False, default=0),
    # Leases that ended unfinished, the process dead or the lease run out (migration 0015):
    # such a job is leased alone and fails at MAX_INTERRUPTIONS (rostersync.resync.queue).
    Column("interruptions", Integer, nullable=False, default=0, server_default="0"),
    Column("reason", String(200), nullable=False, default=""),
    Column("last_error", String(4000)),
    Column("run_id", Integer, index=True),
    _ts("run_after"),
    Column("lease_owner", String(128)),
    _ts("lease_expires"),
    _ts("created_at"),
    _ts("finished_at"),
    Column("result", JSON, nullable=False),
    Index("ix_resync_job_lease", "state", "run_after"),
    # At most one queued job per user: the queue deduplicates at the database. Partial on
    # PostgreSQL too, as migration 0001 creates it; ``postgresql_where`` is not declared
    # here because declaring it imports SQLAlchemy's PostgreSQL dialect into every process
    # (a SQLite one too, at start-up), and no code builds this index from the model.
    Index(
        "uq_resync_job_queued_user",
        "user_id",
        unique=True,
        sqlite_where=text("state = 'queued'"),
    ),
)

import_run = Table(
    "import_run",
    metadata,
    _id(),
    Column("file_name", String(1024), nullable=False),
    Column("actor", String(256)),
    Column("dry_run", Boolean, nullable=False, default=False),
    _ts("started_at"),
    _ts("finished_at"),
    Column("counts", JSON, nullable=False),
)

import_row = Table(
    "import_row",
    metadata,
    _cascade("import_id", "import_run.id", primary_key=True),
    Column("row", Integer, primary_key=True),
    Column("email", String(512)),
    Column("status", String(40), nullable=False),
    Column("message", String(2000), nullable=False, default=""),
)

outbox_email = Table(
    "outbox_email",
    metadata,
    _id(),
    _cascade("user_id", "user.id"),
    Column("kind", String(40), nullable=False),
    Column("to_addr", String(256), nullable=False),
    Column("subject", String(512), nullable=False),
    Column("body", String(20000), nullable=False, default=""),
    Column("state", String(10), nullable=False, default="queued"),  # queued | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", String(2000)),
    _ts("created_at"),
    _ts("sent_at"),
    # One verification email per user, ever: re-imports cannot send a second one.
    UniqueConstraint("user_id", "kind", name="uq_outbox_user_kind"),
)

# A class whose group members must be re-read at the next resync of its teachers (marked by
# the sync that changed it, cleared by the resync that refreshed it).
dirty_class = Table(
    "dirty_class",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("class_id", String(256), primary_key=True),
)

# One member of a class's group to re-read at the next resync of its teachers: the enrollment
# between them or the person changed (cleared by the resync that re-read it).
dirty_member = Table(
    "dirty_member",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("class_id", String(256), primary_key=True),
    Column("person_id", String(256), primary_key=True),
)

source_state = Table(
    "source_state",
    metadata,
    Column("source", String(64), primary_key=True),
    _ts("high_water_mark"),
    _ts("last_full_at"),
    _ts("last_success_at"),
    Column("last_run_id", Integer),
    # Fingerprint of the provisioning settings the last successful run decided with: a delta
    # run that finds them changed re-decides every teacher, not just the ones it touched.
    Column("decided_with", String(64)),
    # A teacher was skipped for want of a license seat: once seats are free, the next run
    # (delta or not) decides for every teacher, not only those its changes touched.
    Column("license_waiting", Boolean, nullable=False, default=False, server_default=false()),
    # Record counts of the last successful full pull, for the min_source_ratio check.
    Column("last_counts", JSON, nullable=False),
)

# Who is syncing a source right now (several instances share one database).
source_lease = Table(
    "source_lease",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),
    _ts("expires_at"),
)

# A process that takes leases (a daemon, or a command that syncs or processes jobs), so that
# others can tell whether it still runs (see ``rostersync.daemon.recovery``).
instance = Table(
    "instance",
    metadata,
    Column("id", String(128), primary_key=True),  # the owner named in leases
    Column("kind", String(20), nullable=False),  # daemon | command | engine
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    # Its start time in clock ticks after boot, and the boot and pid namespace that pid and
    # time belong to: a pid reused by another process, or counted again after a reboot or in
    # another container, is not taken for this one. NULL where /proc cannot tell.
    Column("pid_started", BigInteger),
    Column("pid_scope", String(128)),
    _ts("started_at"),
    _ts("heartbeat_at"),
)

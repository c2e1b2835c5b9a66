"""``manifest.csv``: the drop's OneRoster version, and which files are read, bulk or delta.

* ``manifest.csv`` (``propertyName,value``) must exist and be read whole: a row that cannot
  be read, or a property given twice with two values, is fatal (property names match in any
  case). ``oneroster.version`` picks the version: ``1.0`` and ``1.1`` (and ``1.0.x``,
  ``1.1.x``, or no version at all) read OneRoster 1.1 files, ``1.2`` (and ``1.2.x``)
  OneRoster 1.2 files; any other version is refused.
* Each file rostersync reads has a ``file.<name>`` property: ``bulk`` (every record),
  ``delta`` (changed records only) or ``absent`` (not read). A file listed as bulk or delta
  must exist; a file the manifest does not mention is read, as bulk, if present. The files:
  ``orgs``, ``users``, ``classes``, ``enrollments`` and ``academicSessions``, and in 1.2
  ``roles``. Other files (``courses``, ``demographics``, ``userProfiles``, ...) are not read.
* A drop with any file read as ``delta`` is a **delta drop**: it holds changes only (see the
  connector for what that means for a run). So, for a run, is a drop without ``users.csv``,
  ``classes.csv`` or ``enrollments.csv`` (absent, or not there): it says nothing of those.
* Before any row is read, every file's header is checked, and everything wrong with the drop
  (a listed file missing, an unknown ``file.*`` value, a header that cannot be read, each
  missing required column of each file, a column read that a header names twice) is
  reported at once in one error. Problems with ``academicSessions.csv`` are warnings: no
  rule needs it yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from connectors.oneroster_csv.entities import (
    CLASSES,
    COLUMNS_READ,
    ENROLLMENTS,
    MANIFEST,
    ORGS,
    REQUIRED_COLUMNS,
    ROLES,
    SESSIONS,
    USERS,
    V11,
    V12,
    rows,
)
from connectors.oneroster_csv.files import (
    Bundle,
    Row,
    missing_columns,
    read_header,
    repeated_columns,
)
from connectors.oneroster_csv.notes import Notes
from rostersync.errors import FatalSourceError

BULK = "bulk"
DELTA = "delta"

#: The files read, by version, in the order they are read: sessions and roles first (they are
#: kept in memory), and every enrollment after the people and classes it names.
FILES: dict[str, tuple[str, ...]] = {
    V11: (SESSIONS, ORGS, USERS, CLASSES, ENROLLMENTS),
    V12: (SESSIONS, ROLES, ORGS, USERS, CLASSES, ENROLLMENTS),
}


#: The files without which a drop cannot say what is gone: a full run of a drop lacking one
#: would remove every teacher, or every group.
WHOLE = (USERS, CLASSES, ENROLLMENTS)


@dataclass(frozen=True, slots=True)
class Drop:
    """What the manifest says: the version, and each file read with its mode."""

    version: str
    modes: dict[str, str]  # file name -> BULK | DELTA, in reading order

    @property
    def delta_files(self) -> list[str]:
        return [name for name, mode in self.modes.items() if mode == DELTA]

    @property
    def is_delta(self) -> bool:
        return bool(self.delta_files)

    def reads(self, name: str) -> bool:
        return name in self.modes

    @property
    def unread(self) -> list[str]:
        """Of the files a full run needs (users, classes, enrollments), those the drop does
        not read (``absent`` in the manifest, or not in the drop)."""
        return [name for name in WHOLE if name not in self.modes]

    def describe_unread(self) -> str:
        """``"users.csv is absent"``, for messages."""
        names = self.unread
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        return f"{listed} {'is' if len(names) == 1 else 'are'} absent"

    def describe(self) -> str:
        """``"file.users and file.roles are delta"``, for messages."""
        keys = [f"file.{name.removesuffix('.csv')}" for name in self.delta_files]
        if len(keys) == 1:
            return f"{keys[0]} is delta"
        return f"{', '.join(keys[:-1])} and {keys[-1]} are delta"


def _version(value: str) -> str | None:
    if value in ("", "1.0", "1.1") or value.startswith(("1.0.", "1.1.")):
        return V11
    if value == "1.2" or value.startswith("1.2."):
        return V12
    return None


def read_manifest(bundle: Bundle, encoding: str) -> dict[str, str]:
    """The manifest's properties by lower-cased name. It says which files are deltas, so it is
    read whole or not at all: a row that cannot be read, or a property given twice with two
    values, is fatal (a ``file.users,delta,`` row skipped would make a delta file bulk, and a
    full run would remove everyone it leaves out)."""
    if not bundle.has(MANIFEST):
        inner = bundle.inner_zips
        hint = f" (the zip holds {inner[0]}: give the drop's own zip)" if inner else ""
        raise FatalSourceError(bundle.source, f"{bundle.path}: {MANIFEST} not found{hint}")
    props: dict[str, str] = {}
    lines: dict[str, int] = {}
    for row in rows(bundle, MANIFEST, encoding, key="propertyName"):
        if not isinstance(row, Row):
            raise FatalSourceError(
                bundle.source,
                f"{bundle.where(MANIFEST)} {(row.location or '').removeprefix(MANIFEST).strip()}: "
                f"{row.reason} (the manifest must be "
                "read whole: it says which files are bulk, delta or absent)",
            )
        name, value = row.get("propertyName").lower(), row.get("value")
        if name in props and props[name].lower() != value.lower():
            raise FatalSourceError(
                bundle.source,
                f"{bundle.where(MANIFEST)}: lines {lines[name]} and {row.line} give "
                f"{row.get('propertyName')} two values ({props[name]!r}, {value!r})",
            )
        props.setdefault(name, value)
        lines.setdefault(name, row.line)
    return props


def plan(bundle: Bundle, encoding: str, notes: Notes) -> Drop:
    """The drop's plan; raises one FatalSourceError naming every problem found."""
    props = read_manifest(bundle, encoding)
    stated = props.get("oneroster.version", "")
    version = _version(stated)
    if version is None:
        raise FatalSourceError(
            bundle.source,
            f"{bundle.where(MANIFEST)}: oneroster.version {stated!r} is not supported "
            "(OneRoster 1.0, 1.1 and 1.2 CSV are)",
        )
    problems: list[str] = []
    modes: dict[str, str] = {}
    for name in FILES[version]:
        key = f"file.{name.removesuffix('.csv')}"
        mode = props.get(key.lower(), "").lower()
        if mode in (BULK, DELTA):
            if bundle.has(name):
                modes[name] = mode
            else:
                problems.append(f"{bundle.path}: manifest lists {name} as {mode} but it is missing")
        elif mode == "" and bundle.has(name):
            modes[name] = BULK
        elif mode not in ("", "absent"):
            problems.append(f"{bundle.where(MANIFEST)}: {key} has unknown value {mode!r}")
    headers: dict[str, list[str]] = {}
    for name in list(modes):
        problem: str | None = None
        try:
            headers[name] = header = read_header(bundle, name, encoding)
        except FatalSourceError as exc:
            problem = exc.detail
        else:
            missing = missing_columns(header, REQUIRED_COLUMNS[version].get(name, ()))
            repeated = repeated_columns(header, COLUMNS_READ.get(name, ()))
            if missing is not None:
                hint = _hint(bundle, version, name, header, stated)
                problem = f"{bundle.where(name)}: {missing}{hint}"
            elif repeated is not None:
                problem = f"{bundle.where(name)}: {repeated}"
        if problem is None:
            continue
        if name == SESSIONS:  # no rule needs them yet
            notes.add(f"{SESSIONS}: sessions not read", f"{problem}; no academic session is read")
            del modes[name]
        else:
            problems.append(problem)
    if (
        version == V12
        and modes.get(USERS) == BULK
        and ROLES not in modes
        and "role" not in headers.get(USERS, ["role"])
    ):
        problems.append(
            f"{bundle.path}: users.csv is bulk but the drop has no {ROLES}: OneRoster 1.2 "
            "gives users their roles in roles.csv"
        )
    if len(problems) == 1:
        raise FatalSourceError(bundle.source, problems[0])
    if problems:
        raise FatalSourceError(
            bundle.source, f"{len(problems)} problems in the drop: {'; '.join(problems)}"
        )
    return Drop(version, modes)


def _hint(bundle: Bundle, version: str, name: str, header: list[str], stated: str) -> str:
    """Why a 1.2 drop read as 1.1 lacks ``role``: its manifest says otherwise."""
    if version == V11 and name == USERS and "role" not in header and bundle.has(ROLES):
        said = f"says oneroster.version {stated!r}" if stated else "gives no oneroster.version"
        return f" (the drop has {ROLES}, as OneRoster 1.2 drops do, but {MANIFEST} {said})"
    return ""

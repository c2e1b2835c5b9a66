"""``manifest.csv``: which files of the drop are read.

``manifest.csv`` (``propertyName,value``) must exist. ``file.orgs``, ``file.users``,
``file.classes`` and ``file.enrollments`` say ``bulk`` (read it; the file must exist) or
``absent`` (skip it); a file the manifest does not mention is read if present. Any ``file.*``
set to ``delta`` is refused (delta drops are not supported yet), as is an
``oneroster.version`` other than 1.0/1.1 (1.2 moved roles out of ``users.csv``).
"""

from __future__ import annotations

from connectors.oneroster_csv.entities import DATA_FILES, MANIFEST, rows
from connectors.oneroster_csv.files import Bundle, Row
from rostersync.errors import FatalSourceError

_SUPPORTED_VERSIONS = ("1.0", "1.1")


def data_files(bundle: Bundle, encoding: str) -> list[str]:
    """The data files to read, from the manifest; refuses delta drops and 1.2 files."""
    source = bundle.source
    if not bundle.has(MANIFEST):
        raise FatalSourceError(source, f"{bundle.path}: {MANIFEST} not found")
    props: dict[str, str] = {}
    for row in rows(bundle, MANIFEST, encoding):
        if isinstance(row, Row):
            props[row.get("propertyName")] = row.get("value")
    version = props.get("oneroster.version", "")
    if version and version not in _SUPPORTED_VERSIONS:
        raise FatalSourceError(
            source,
            f"{bundle.where(MANIFEST)}: oneroster.version {version!r} is not supported "
            "(OneRoster 1.1 CSV only)",
        )
    for key, value in props.items():
        if key.startswith("file.") and value.lower() == "delta":
            raise FatalSourceError(
                source,
                f"{bundle.where(MANIFEST)}: {key} is delta; delta CSV files are not supported yet",
            )
    files: list[str] = []
    for name in DATA_FILES:
        key = f"file.{name.removesuffix('.csv')}"
        mode = props.get(key, "").lower()
        if mode == "bulk":
            if not bundle.has(name):
                raise FatalSourceError(
                    source, f"{bundle.path}: manifest lists {name} as bulk but it is missing"
                )
            files.append(name)
        elif mode == "" and bundle.has(name):
            files.append(name)
        elif mode not in ("", "absent"):
            raise FatalSourceError(
                source, f"{bundle.where(MANIFEST)}: {key} has unknown value {mode!r}"
            )
    return files

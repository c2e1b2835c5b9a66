"""The files of one drop, in a folder or a zip, read as header and rows with their lines.

* Files are found by name, case-insensitively. In a zip, the drop is the folder of its
  shallowest ``manifest.csv`` (exports often wrap everything in one folder), and every file is
  read from that folder only: a ``users.csv`` of another folder (an older export kept in the
  zip) is never mixed in. A zip with two manifests that shallow holds two drops, and is
  refused.
* Rows are streamed, never loaded whole: bytes are decoded line by line with an incremental
  decoder, so an undecodable byte is reported with the line it sits on, and the csv module sees
  exactly one physical line per string, so ``reader.line_num`` is the physical line number
  (header = line 1). A row's location is the line it *starts* on, even if a quoted field runs
  over several lines.
* Header names are matched exactly as the spec spells them (surrounding spaces and a stray
  BOM ignored); unknown extra columns are ignored. A column that is read and named twice in
  a header is fatal: which of the two holds the value cannot be told.
* A row that cannot be used as read (wrong number of fields, malformed on its own line, a NUL)
  comes back :class:`~rostersync.source.records.Rejected`; a file that cannot be read raises
  :class:`~rostersync.errors.FatalSourceError` naming file and line (see
  :mod:`rostersync.csvrecords`).
"""

from __future__ import annotations

import codecs
import csv
import functools
import zipfile
import zlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rostersync.csvrecords import CsvRecord, CsvUnreadable, one_column_hint, read_records
from rostersync.errors import FatalSourceError
from rostersync.source.records import Rejected

#: The longest physical line read: a row of 128 KiB fields is far shorter.
MAX_LINE_CHARS = 16 * 1024 * 1024
_READ_SIZE = 1024 * 1024


class _LineTooLong(Exception):
    """A physical line grew past MAX_LINE_CHARS."""


class Bundle:
    """The CSV files of one drop, in a folder or a zip, looked up by case-insensitive name."""

    def __init__(self, source: str, path: Path) -> None:
        self.source = source
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._names: dict[str, str] = {}
        #: the zips inside a zip (a drop zipped twice), for the message when no drop is found
        self.inner_zips: list[str] = []
        #: a folder's files as first opened (size, mtime): see check_unchanged
        self._opened: dict[str, tuple[int, int]] = {}
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError as exc:  # a folder above it not searchable, say
            raise FatalSourceError(source, f"{path}: cannot read ({exc.strerror or exc})") from None
        if is_dir:
            try:
                for child in sorted(path.iterdir()):
                    if child.is_file():
                        self._names.setdefault(child.name.lower(), child.name)
            except OSError as exc:  # permissions changed since `config check`, a stale mount
                raise FatalSourceError(
                    source, f"{path}: cannot list the folder ({exc.strerror or exc})"
                ) from None
        elif is_file:
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise FatalSourceError(source, f"{path}: not a readable zip ({exc})") from None
            members = [m for m in self._zip.namelist() if not m.endswith("/")]
            try:
                folder = self._drop_folder(members)
            except FatalSourceError:
                self.close()
                raise
            # Shallowest first, so a root member beats one of the same name in a sub-folder.
            for member in sorted(members, key=lambda m: (m.count("/"), m)):
                parent, _, base = member.rpartition("/")
                if folder is None or parent == folder:
                    self._names.setdefault(base.lower(), member)
            self.inner_zips = [m for m in members if m.lower().endswith(".zip")]
        else:
            raise FatalSourceError(source, f"{path}: no such folder or zip file")

    def _drop_folder(self, members: list[str]) -> str | None:
        """The folder of the zip holding the drop: the shallowest ``manifest.csv``'s ("" for
        the root), so that every file is read from beside it; None when there is no manifest
        (the drop is then refused for that). Two manifests as shallow are two drops."""
        manifests = [m for m in members if m.rpartition("/")[2].lower() == "manifest.csv"]
        if not manifests:
            return None
        depth = min(m.count("/") for m in manifests)
        shallowest = sorted(m for m in manifests if m.count("/") == depth)
        if len(shallowest) > 1:
            listed = ", ".join(shallowest[:5]) + (" ..." if len(shallowest) > 5 else "")
            raise FatalSourceError(
                self.source,
                f"{self.path}: the zip holds {len(shallowest)} drops ({listed}): which one to "
                "read cannot be told; give a zip of one drop",
            )
        return shallowest[0].rpartition("/")[0]

    def has(self, name: str) -> bool:
        return name.lower() in self._names

    def open(self, name: str) -> IO[bytes]:
        actual = self._names[name.lower()]
        try:
            if self._zip is not None:
                return self._zip.open(actual)
            path = self.path / actual
            # Before opening: a change in between is then seen as a change, never missed.
            stat = path.stat()
            self._opened.setdefault(actual, (stat.st_size, stat.st_mtime_ns))
            return open(path, "rb")
        # RuntimeError: an encrypted member; NotImplementedError: a compression zipfile lacks.
        except (OSError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as exc:
            raise FatalSourceError(
                self.source, f"{self.where(name)}: cannot open ({exc})"
            ) from None

    def check_unchanged(self) -> None:
        """Raise FatalSourceError if a file of a folder drop changed since it was first opened:
        an exporter still writing it (an upload in progress) gave rows of two versions, or
        not all of them, and a full run would take the rows it missed for gone. A zip
        rewritten in place fails to read instead."""
        for actual, (size, mtime) in self._opened.items():
            try:
                stat = (self.path / actual).stat()
            except OSError as exc:
                now = f"now unreadable ({exc.strerror or exc})"
            else:
                if (stat.st_size, stat.st_mtime_ns) == (size, mtime):
                    continue
                now = f"{size} bytes when first opened, {stat.st_size} now"
            raise FatalSourceError(
                self.source,
                f"{self.path / actual}: changed while the drop was read ({now}): is an upload "
                "still in progress? Nothing of this read is applied; the next run reads the "
                "drop again",
            )

    def where(self, name: str) -> str:
        return f"{self.path}!{name}" if self._zip is not None else str(self.path / name)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def _text_lines(
    raw: IO[bytes], encoding: str, counter: list[int], used: list[str] | None = None
) -> Iterator[str]:
    """Decode `raw` one physical line per string, counting lines into ``counter[0]`` (and
    putting the encoding it decodes with, see :func:`_encoding_of`, in ``used``).

    Splitting the decoded text (not the bytes) on ``\\n`` keeps multi-byte encodings such as
    UTF-16 right; yielding one physical line per string keeps ``csv.reader.line_num`` equal to
    the physical line number. A file whose first line ends with a lone CR is split on CRs.
    """
    decoder: codecs.IncrementalDecoder | None = None
    pending = ""
    end = ""  # what ends a line: "\n" (LF or CRLF), or "\r" in a file of classic Mac line ends
    # readline with a limit: a line with no end (gigabytes unpacked from a small zip) arrives
    # in pieces, and is refused past MAX_LINE_CHARS instead of filling the memory.
    for chunk in iter(functools.partial(raw.readline, _READ_SIZE), b""):
        if decoder is None:
            encoding = _encoding_of(chunk, encoding)
            if used is not None:
                used[:] = [encoding]
            decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        pending += decoder.decode(chunk)
        if not end and pending:
            # A first line (or first MiB) without an LF but with a CR: "CSV (Macintosh)", as
            # Excel for Mac still saves it, ends every line with a lone CR.
            end = "\r" if "\r" in pending and "\n" not in pending else "\n"
        while end and (cut := pending.find(end)) >= 0:
            line, pending = pending[: cut + 1], pending[cut + 1 :]
            counter[0] += 1
            yield line
        if len(pending) > MAX_LINE_CHARS:
            raise _LineTooLong
    if decoder is not None:
        pending += decoder.decode(b"", final=True)
    if pending:
        counter[0] += 1
        yield pending


_UTF8 = frozenset({"utf-8", "utf-8-sig"})
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _encoding_of(start: bytes, encoding: str) -> str:
    """The encoding a file starting with ``start`` is read in: ``encoding``, but UTF-16 for a
    file that begins with a UTF-16 byte-order mark when ``encoding`` is UTF-8 (the default).
    Such a file ("Unicode text" from a spreadsheet) cannot be UTF-8, whose text never begins
    with those bytes, and the mark says its byte order."""
    if start.startswith(_UTF16_BOMS) and codecs.lookup(encoding).name in _UTF8:
        return "utf-16"
    return encoding


@dataclass(frozen=True, slots=True)
class Row:
    """One CSV record: its values by column, and where it starts."""

    file: str
    line: int
    values: dict[str, str]

    @property
    def location(self) -> str:
        return f"{self.file} line {self.line}"

    def get(self, column: str) -> str:
        return self.values.get(column, "")


def read_header(bundle: Bundle, name: str, encoding: str) -> list[str]:
    """The column names of one file (raises FatalSourceError when it cannot be read)."""
    records = _records(bundle, name, encoding)
    try:
        return next(records, (0, [], None))[1]
    finally:
        records.close()  # the file, now


def read_rows(
    bundle: Bundle,
    name: str,
    encoding: str,
    *,
    entity: str,
    required: Sequence[str] = (),
    columns: Sequence[str] = (),
    key: str = "sourcedId",
) -> Iterator[Row | Rejected]:
    """Stream one file's rows (only ``columns`` are kept); a row that cannot be used as read
    comes back Rejected as ``entity``, with the ``key`` column's value as far as it can be
    read. A header without a ``required`` column is fatal."""
    records = _records(bundle, name, encoding)
    try:
        header = next(records, (0, [], None))[1]
        problem = missing_columns(header, required) or repeated_columns(header, columns)
        if problem:
            raise FatalSourceError(bundle.source, f"{bundle.where(name)}: {problem}")
        # Only the columns we read: stripping the rest would be wasted work per row.
        index = {c: header.index(c) for c in columns if c in header}
        width = len(header)
        for line, fields, problem in records:
            if problem is None and len(fields) == width:
                values = {column: fields[i].strip() for column, i in index.items()}
                yield Row(name, line, values)
            elif problem is not None or fields:  # not a blank line
                i = index.get(key, 0)
                sid = fields[i].strip() if i < len(fields) and fields[i].strip() else None
                reason = problem or f"expected {width} fields, found {len(fields)}"
                yield Rejected(entity, sid, reason, f"{name} line {line}")
    finally:
        records.close()


def best_effort_values(
    bundle: Bundle, name: str, encoding: str, lines: set[int], column: str
) -> dict[int, str]:
    """``column``'s value on each of ``lines``, physical lines the strict reader refused as
    malformed, read leniently (one pass over the file). For naming whom a broken row
    concerns only; a line where even that fails is left out."""
    header = read_header(bundle, name, encoding)
    if column not in header or not lines:
        return {}
    at, found = header.index(column), {}
    for line, fields in best_effort_fields(bundle, name, encoding, lines).items():
        if at < len(fields) and fields[at]:
            found[line] = fields[at]
    return found


def best_effort_fields(
    bundle: Bundle, name: str, encoding: str, lines: set[int]
) -> dict[int, list[str]]:
    """The fields (stripped) of each of ``lines``, physical lines the strict reader refused as
    malformed, read leniently (one pass over the file); a line where even that fails is left
    out. A field may sit in another column than its header says (the row is malformed)."""
    if not lines:
        return {}
    last, found = max(lines), {}
    counter = [0]
    with bundle.open(name) as raw:
        for text in _text_lines(raw, encoding, counter):
            if counter[0] in lines:
                try:
                    fields = next(csv.reader([text], strict=False), [])
                except csv.Error:  # a lone CR, a field over the limit: not even leniently
                    fields = []
                if any(f.strip() for f in fields):
                    found[counter[0]] = [f.strip() for f in fields]
            if counter[0] >= last:
                break
    return found


def missing_columns(header: Sequence[str], required: Sequence[str]) -> str | None:
    """``"missing required columns 'role', 'email'"``, or None when none is missing."""
    missing = [c for c in required if c not in header]
    if not missing:
        return None
    names = ", ".join(repr(c) for c in missing)
    hint = one_column_hint(header, ",")
    return f"missing required column{'s' if len(missing) > 1 else ''} {names}{hint}"


def repeated_columns(header: Sequence[str], columns: Sequence[str]) -> str | None:
    """``"column 'email' is in the header twice (columns 13 and 14)"`` for each of
    ``columns`` (those read) the header names more than once, or None: which of them holds the
    value cannot be told, and the wrong one may be a person's identity."""
    problems = []
    for column in columns:
        at = [i + 1 for i, name in enumerate(header) if name == column]
        if len(at) > 1:
            where = ", ".join(map(str, at[:-1])) + f" and {at[-1]}"
            problems.append(f"{column!r} {len(at)} times (columns {where})")
    if not problems:
        return None
    return f"the header names {'; '.join(problems)}: which one holds the value cannot be told"


def _records(bundle: Bundle, name: str, encoding: str) -> Generator[CsvRecord, None, None]:
    """The header (names cleaned), then each record of the file with its line and problem;
    every way the file can be unreadable becomes a FatalSourceError naming file and line."""
    counter, used = [0], [encoding]
    try:
        with bundle.open(name) as raw:
            records = read_records(_text_lines(raw, encoding, counter, used))
            line, fields, problem = next(records, (0, [], None))
            if problem is not None:
                raise FatalSourceError(
                    bundle.source,
                    f"{bundle.where(name)} line {line}: unreadable header ({problem})",
                )
            # A BOM left by a concatenation or by `encoding: utf-8` is no part of a name.
            yield line, [h.replace("\ufeff", "").strip() for h in fields], None
            yield from records
    except CsvUnreadable as exc:
        raise FatalSourceError(bundle.source, f"{bundle.where(name)} {exc}") from None
    except _LineTooLong:
        raise FatalSourceError(
            bundle.source,
            f"{bundle.where(name)} line {counter[0] + 1}: more than {MAX_LINE_CHARS} characters "
            "without a line break (not a CSV file?)",
        ) from None
    except UnicodeError as exc:  # also UTF-16 without a byte-order mark, not only bad bytes
        reason = exc.reason if isinstance(exc, UnicodeDecodeError) else str(exc)
        hint = ""
        if codecs.lookup(used[0]).name in _UTF8:
            hint = (
                "; a file saved in another encoding needs the source's `encoding` set to it, "
                "such as cp1252 for a spreadsheet saved as CSV on Windows"
            )
        raise FatalSourceError(
            bundle.source,
            f"{bundle.where(name)} line {counter[0] + 1}: cannot decode as {used[0]} "
            f"({reason}){hint}",
        ) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise FatalSourceError(
            bundle.source,
            f"{bundle.where(name)} line {counter[0] + 1}: file is truncated or corrupt ({exc})",
        ) from None

"""Reading an import file into a header and numbered rows: CSV, TSV, XLSX or pasted text.

Spreadsheets are messy in known ways, and each is handled here so the rules never see it:

* Excel's "CSV UTF-8" starts with a byte-order mark; its plain "CSV" in many locales uses
  ``;`` and may be Windows-1252 rather than UTF-8; line ends are CRLF.
* Quoted cells carry commas and line breaks; a row's number is the record's position (what a
  spreadsheet shows), not the physical line, so multi-line cells do not shift later rows.
* Trailing rows of empty cells (``;;;;``) are not rows.
* A record the csv module cannot parse on its own line (text after a closing quote, a cell
  over its 128 KiB limit) fails that row alone, naming the line; its cells, split loosely,
  only name the row (its email). One that hides where the next row starts (a quote left
  open) refuses the file (:mod:`rostersync.csvrecords`).
* A damaged workbook fails inside openpyxl with whatever its parser hit (``ParseError``,
  ``IndexError``, ``TypeError``, ...): each is the same refusal, naming the file.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from rostersync.csvrecords import CsvUnreadable, read_records
from rostersync.importer.errors import ImportRefused

XLSX_MAGIC = b"PK\x03\x04"
#: OLE2 compound files: legacy .xls, and any workbook Excel saved with a password.
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_DELIMITERS = (",", ";", "\t")
# Invisible characters spreadsheets and web forms leave around values; str.strip() keeps them.
_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060"
#: A workbook whose parts unpack to more than this is refused before openpyxl opens it (a
#: zip bomb would otherwise fill the memory); a 2,000-row sheet is about 1 MiB of XML.
MAX_XLSX_UNPACKED = 256 * 1024 * 1024

#: One record as read: its cells, why it cannot be used ("line 7: ...") or None, and the
#: cells of one the csv module refused, split loosely (see RawRow.loose).
_Record = tuple[Sequence[str], str | None, Sequence[str]]


@dataclass(frozen=True, slots=True)
class RawRow:
    """One non-empty data row: its 1-based row number in the file (header = 1) and cells.

    ``problem`` says why the row cannot be used as read (it then fails on its own). ``loose``
    holds the cells of a row the csv module refused, split as well as can be: they only name
    the row in its result (its email), nothing is imported from them."""

    row: int
    values: tuple[str, ...]
    problem: str | None = None
    loose: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Sheet:
    """What was read: the header cells, the data rows, and notes for the admin."""

    name: str
    headers: tuple[str, ...]
    rows: tuple[RawRow, ...]
    warnings: tuple[str, ...] = ()


def clean_cell(value: str) -> str:
    return value.strip().strip(_INVISIBLE).strip()


def _decode(data: bytes, name: str) -> tuple[str, list[str]]:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # Excel's "Unicode Text" export: UTF-16 with a byte-order mark, tab-separated.
        try:
            return data.decode("utf-16"), []
        except UnicodeDecodeError as exc:
            raise ImportRefused(
                f"{name}: starts as UTF-16 but cannot be decoded as it ({exc.reason} at byte "
                f"{exc.start})"
            ) from None
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if any(ord(c) > 0x7F and not _STRAY.match(c) for c in text):
        # UTF-8 with a few stray bytes (cells pasted from elsewhere): read as Windows-1252,
        # every accented name of the file would be garbled. Rows with a stray byte fail alone.
        return text, [f"{name}: not all UTF-8: a row with bytes that are not fails, naming them"]
    # Excel's plain "CSV" export on Windows writes the ANSI code page, not UTF-8.
    try:
        return data.decode("cp1252"), [f"{name}: not UTF-8; read as Windows-1252"]
    except UnicodeDecodeError:
        raise ImportRefused(f"{name}: cannot decode the file (save it as CSV UTF-8)") from None


#: A byte that is not UTF-8, as ``surrogateescape`` decodes it.
_STRAY = re.compile("[\udc80-\udcff]")


def _stray_bytes(cells: Sequence[str], headers: Sequence[str] | None) -> str | None:
    """Why a row with bytes that are not UTF-8 (:func:`_decode`) cannot be used: the first such
    cell's column and bytes."""
    for i, cell in enumerate(cells):
        found = _STRAY.findall(cell)
        if found:
            column = headers[i] if headers is not None and i < len(headers) else f"column {i + 1}"
            stray = " ".join(f"0x{ord(c) - 0xDC00:02x}" for c in found[:3])
            return f"{column}: not UTF-8 (byte {stray}); save the file as CSV UTF-8"
    return None


def _sniff_delimiter(text: str) -> str:
    """The delimiter that splits the header record into the most cells (comma on a tie)."""
    best, best_count = ",", 0
    for delim in _DELIMITERS:
        try:
            first = next(csv.reader(io.StringIO(text), delimiter=delim), [])
        except csv.Error:
            continue
        if len(first) > best_count:
            best, best_count = delim, len(first)
    return best


def _table(records: Iterable[_Record], name: str, max_rows: int) -> Sheet:
    """Header = the first non-empty record; later empty records are skipped, not counted."""
    headers: tuple[str, ...] | None = None
    rows: list[RawRow] = []
    count = 0
    for number, (record, problem, loose) in enumerate(records, start=1):
        cells = _trimmed(tuple(clean_cell(c) for c in record))
        if not cells and problem is None:
            continue
        if headers is None:
            if problem is not None:
                raise ImportRefused(f"{name}: unreadable header row ({problem})")
            headers = cells
            continue
        count += 1
        if count <= max_rows:  # past the limit the file is refused: count, but keep nothing
            rows.append(RawRow(number, cells, problem, tuple(clean_cell(c) for c in loose)))
    if headers is None:
        raise ImportRefused(f"{name}: the file is empty (no header row)")
    if count > max_rows:
        raise ImportRefused(
            f"{name}: {count} rows exceed the limit of {max_rows} (import.max_rows); split the file"
        )
    return Sheet(name=name, headers=headers, rows=tuple(rows))


def _trimmed(cells: tuple[str, ...]) -> tuple[str, ...]:
    """Without trailing empty cells: a stray cell at column XFD must not make 16,384-cell rows."""
    end = len(cells)
    while end and not cells[end - 1]:
        end -= 1
    return cells[:end]


def _csv_records(text: str, delimiter: str) -> Iterator[_Record]:
    """The records of CSV text; one with a byte that is not UTF-8 (text :func:`_decode` read
    as mostly UTF-8) fails, naming its column, and shows U+FFFD in its place."""
    header: Sequence[str] | None = None
    physical: list[str] | None = None  # the text's lines, split only if a record fails
    # newline="": the csv module itself handles CRLF and line breaks inside quotes.
    for line, fields, problem in read_records(io.StringIO(text, newline=""), delimiter=delimiter):
        loose: list[str] = []
        if problem is None and (stray := _stray_bytes(fields, header)) is not None:
            problem = stray
            fields = [_STRAY.sub("\ufffd", f) for f in fields]
        elif problem is not None and not fields:
            # A record the csv module refused sits on one line (csvrecords); split the
            # same way, so that the row's result can show its email.
            physical = physical or io.StringIO(text, newline="").readlines()
            loose = _loose_cells(physical[line - 1], delimiter)
        if header is None and any(map(clean_cell, fields)):
            header = [clean_cell(f) for f in fields]
        yield fields, (f"line {line}: {problem}" if problem else None), loose


def _loose_cells(line: str, delimiter: str) -> list[str]:
    """The cells of one line, quotes dropped and a delimiter inside quotes kept: what the csv
    module makes of a well-formed line, and a fair guess at a malformed one."""
    cells: list[str] = []
    cell: list[str] = []
    quoted = False
    for char in line.rstrip("\r\n"):
        if char == '"':
            quoted = not quoted
        elif char == delimiter and not quoted:
            cells.append("".join(cell))
            cell = []
        else:
            cell.append(char)
    cells.append("".join(cell))
    return cells


def parse_text(text: str, name: str, *, max_rows: int, delimiter: str | None = None) -> Sheet:
    delim = delimiter or _sniff_delimiter(text)
    try:
        return _table(_csv_records(text, delim), name, max_rows)
    except CsvUnreadable as exc:
        raise ImportRefused(f"{name} line {exc.line}: {exc.message}") from None


def _xlsx_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


def _detail(exc: BaseException) -> str:
    """What went wrong, on one short printable line: the file chose the text of some of it."""
    parts: list[str] = []
    cause: BaseException | None = exc
    while cause is not None and len(parts) < 3:
        text = (str(cause).splitlines() or [""])[0]
        # openpyxl wraps a part's error as "Unable to read workbook: could not read X from F."
        if text.startswith("Unable to read workbook: "):
            text = text.removeprefix("Unable to read workbook: ").split(" from ")[0]
        parts.append(f"{type(cause).__name__}: {text}" if text else type(cause).__name__)
        cause = cause.__cause__
    line = "; ".join(parts)
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line if len(line) <= 300 else line[:297] + "..."


def _refused(name: str, detail: str) -> ImportRefused:
    return ImportRefused(f"{name}: not a readable XLSX workbook ({detail})")


def _open_workbook(data: bytes, name: str) -> tuple[Any, list[str]]:
    """The read-only workbook, and the sheet names workbook.xml lists (in order)."""
    from openpyxl.reader.excel import ExcelReader

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
        if unpacked > MAX_XLSX_UNPACKED:
            raise _refused(
                name,
                f"it unpacks to {unpacked // 2**20} MiB, more than the "
                f"{MAX_XLSX_UNPACKED // 2**20} MiB an import workbook may",
            )
        # load_workbook() without its last step: its reader also knows the sheets that
        # workbook.xml lists, and openpyxl silently drops one whose part is missing.
        reader = ExcelReader(io.BytesIO(data), read_only=True, data_only=True)
        reader.read()
        return reader.wb, [sheet.name for sheet in reader.parser.sheets]
    except ImportRefused:
        raise
    except Exception as exc:
        # Whatever openpyxl's parser hits on a damaged part (ParseError, IndexError,
        # TypeError, ...) comes from the file alone: the file is unreadable.
        raise _refused(name, _detail(exc)) from None


def _worksheet(wb: Any, listed: list[str], name: str, sheet: str | None) -> Any:
    charts = {chart.title for chart in wb.chartsheets}
    present = {ws.title: ws for ws in wb.worksheets}
    wanted = sheet if sheet is not None else next((n for n in listed if n not in charts), None)
    if wanted is None:
        raise _refused(name, "the workbook has no worksheet")
    if wanted in present:
        return present[wanted]
    if wanted in charts:
        raise ImportRefused(f"{name}: sheet {wanted!r} is a chart, not a worksheet")
    if wanted in listed:
        raise _refused(name, f"sheet {wanted!r} points to a part that is not in the file")
    raise ImportRefused(f"{name}: no sheet named {sheet!r} (sheets: {', '.join(present)})")


def _xlsx_records(ws: Any, name: str) -> Iterator[_Record]:
    try:
        # Some generators write a wrong <dimension>; read-only mode would trust it and cut rows.
        ws.reset_dimensions()
        for row in ws.iter_rows(min_row=1, values_only=True):
            yield [_xlsx_cell(v) for v in row], None, ()
    except Exception as exc:
        # As in _open_workbook: a damaged sheet part, shared string or cell value.
        raise _refused(name, f"sheet {ws.title!r}: {_detail(exc)}") from None


def parse_xlsx(data: bytes, name: str, *, max_rows: int, sheet: str | None = None) -> Sheet:
    # openpyxl warns about features it drops when it saves (data validation, ...): we never
    # save, and a warning printed with its source line looks like a crash to an admin.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wb, listed = _open_workbook(data, name)
        try:
            ws = _worksheet(wb, listed, name, sheet)
            return _table(_xlsx_records(ws, name), f"{name} [{ws.title}]", max_rows)
        finally:
            wb.close()


def parse_bytes(
    data: bytes, name: str, *, max_rows: int, sheet: str | None = None, kind: str | None = None
) -> Sheet:
    """``kind``: "xlsx", "tsv" or "csv"; None guesses from the content (pasted text, stdin)."""
    if data.startswith(OLE_MAGIC):
        raise ImportRefused(
            f"{name}: a password-protected workbook or an old .xls file, not XLSX or CSV; "
            "save it as .xlsx without a password"
        )
    if kind is None:
        kind = "xlsx" if data.startswith(XLSX_MAGIC) else "csv"
    if kind == "xlsx":
        return parse_xlsx(data, name, max_rows=max_rows, sheet=sheet)
    if sheet is not None:
        raise ImportRefused(f"{name}: --sheet applies to XLSX workbooks only")
    text, warnings = _decode(data, name)
    parsed = parse_text(text, name, max_rows=max_rows, delimiter="\t" if kind == "tsv" else None)
    return Sheet(parsed.name, parsed.headers, parsed.rows, (*warnings, *parsed.warnings))


def kind_for(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        return "xlsx"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".xls":
        raise ImportRefused(f"{path}: the old .xls format is not supported; save as .xlsx or CSV")
    return None  # .csv, .txt, no suffix: sniffed from the content


def read_path(path: str, *, max_rows: int, sheet: str | None = None) -> Sheet:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImportRefused(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return parse_bytes(data, path, max_rows=max_rows, sheet=sheet, kind=kind_for(path))

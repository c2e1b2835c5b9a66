"""Reading an import file into a header and numbered rows: CSV, TSV, XLSX or pasted text.

Spreadsheets are messy in known ways, and each is handled here so the rules never see it:

* Excel's "CSV UTF-8" starts with a byte-order mark; its plain "CSV" in many locales uses
  ``;`` and may be Windows-1252 rather than UTF-8; line ends are CRLF.
* Quoted cells carry commas and line breaks; a row's number is the record's position (what a
  spreadsheet shows), not the physical line, so multi-line cells do not shift later rows.
* Trailing rows of empty cells (``;;;;``) are not rows.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path

from rostersync.importer.errors import ImportRefused

XLSX_MAGIC = b"PK\x03\x04"
_DELIMITERS = (",", ";", "\t")
# Invisible characters spreadsheets and web forms leave around values; str.strip() keeps them.
_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060"


@dataclass(frozen=True, slots=True)
class RawRow:
    """One non-empty data row: its 1-based row number in the file (header = 1) and cells."""

    row: int
    values: tuple[str, ...]


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
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    # Excel's plain "CSV" export on Windows writes the ANSI code page, not UTF-8.
    try:
        return data.decode("cp1252"), [f"{name}: not UTF-8; read as Windows-1252"]
    except UnicodeDecodeError:
        raise ImportRefused(f"{name}: cannot decode the file (save it as CSV UTF-8)") from None


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


def _table(records: Iterable[Sequence[str]], name: str, max_rows: int) -> Sheet:
    """Header = the first non-empty record; later empty records are skipped, not counted."""
    headers: tuple[str, ...] | None = None
    rows: list[RawRow] = []
    for number, record in enumerate(records, start=1):
        cells = tuple(clean_cell(c) for c in record)
        if not any(cells):
            continue
        if headers is None:
            headers = cells
            continue
        rows.append(RawRow(number, cells))
    if headers is None:
        raise ImportRefused(f"{name}: the file is empty (no header row)")
    if len(rows) > max_rows:
        raise ImportRefused(
            f"{name}: {len(rows)} rows exceed the limit of {max_rows} (import.max_rows); "
            "split the file"
        )
    return Sheet(name=name, headers=headers, rows=tuple(rows))


def parse_text(text: str, name: str, *, max_rows: int, delimiter: str | None = None) -> Sheet:
    delim = delimiter or _sniff_delimiter(text)
    try:
        # newline="" semantics: the csv module itself handles CRLF and newlines in quotes.
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delim, strict=False))
    except csv.Error as exc:
        raise ImportRefused(f"{name}: not a readable CSV file ({exc})") from None
    return _table(records, name, max_rows)


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


def parse_xlsx(data: bytes, name: str, *, max_rows: int, sheet: str | None = None) -> Sheet:
    import zipfile

    from openpyxl import load_workbook

    try:
        wb = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except (zipfile.BadZipFile, OSError, KeyError, ValueError) as exc:
        raise ImportRefused(f"{name}: not a readable XLSX workbook ({exc})") from None
    try:
        if sheet is None:
            ws = wb.worksheets[0]
        elif sheet in wb.sheetnames:
            ws = wb[sheet]
        else:
            raise ImportRefused(
                f"{name}: no sheet named {sheet!r} (sheets: {', '.join(wb.sheetnames)})"
            )
        # Some generators write a wrong <dimension>; read-only mode would trust it and cut rows.
        ws.reset_dimensions()
        records = (
            [_xlsx_cell(v) for v in row] for row in ws.iter_rows(min_row=1, values_only=True)
        )
        return _table(records, f"{name} [{ws.title}]", max_rows)
    finally:
        wb.close()


def parse_bytes(
    data: bytes, name: str, *, max_rows: int, sheet: str | None = None, kind: str | None = None
) -> Sheet:
    """``kind``: "xlsx", "tsv" or "csv"; None guesses from the content (pasted text, stdin)."""
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

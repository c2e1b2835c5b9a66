"""The import report: the file's own columns plus ``Status`` and ``Message``, as CSV.

Every cell is neutralised against formula injection (OWASP "CSV injection"): a cell that a
spreadsheet would evaluate (starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return)
gets a leading single quote, so opening the report never runs what an import file carried.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from rostersync.importer.plan import RowOutcome
from rostersync.importer.reader import Sheet

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralize(cell: str) -> str:
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def report_csv(sheet: Sheet, outcomes: Sequence[RowOutcome]) -> str:
    by_row = {o.row: o for o in outcomes}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    width = len(sheet.headers)
    writer.writerow([neutralize(h) for h in (*sheet.headers, "Status", "Message")])
    for raw in sheet.rows:
        cells = list(raw.values[:width]) + [""] * (width - len(raw.values))
        outcome = by_row.get(raw.row)
        status, message = (str(outcome.status), outcome.message) if outcome else ("", "")
        writer.writerow([neutralize(c) for c in (*cells, status, message)])
    return buf.getvalue()


def write_report(path: str, sheet: Sheet, outcomes: Sequence[RowOutcome]) -> None:
    # UTF-8 with a BOM: Excel otherwise reads it as the ANSI code page and garbles names.
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:
        fh.write(report_csv(sheet, outcomes))

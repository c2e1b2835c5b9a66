"""Bulk user import (CSV, TSV, XLSX, pasted text), manual teacher import, and the outbox mailer.

Data flow: :mod:`.reader` (file -> header + numbered rows) -> :mod:`.columns` (which column is
which) -> :mod:`.rows` (cells parsed and checked) -> :mod:`.plan` (pure rules against a
directory snapshot: per-row status, message and change) -> :mod:`.apply` (one transaction;
a dry run rolls it back) -> :mod:`.report` (CSV with Status and Message). See docs/import.md.
"""

from __future__ import annotations

from rostersync.importer.apply import ImportResult, run_import
from rostersync.importer.errors import ImportRefused
from rostersync.importer.outbox import SendResult, send_outbox
from rostersync.importer.reader import Sheet, parse_bytes, read_path
from rostersync.importer.report import neutralize, report_csv, write_report
from rostersync.importer.statuses import COUNT_KEYS, Status
from rostersync.importer.teachers import TeachersResult, candidates, import_teachers
from rostersync.importer.template import TEMPLATE_COLUMNS, template_csv, template_xlsx

__all__ = [
    "COUNT_KEYS",
    "TEMPLATE_COLUMNS",
    "ImportRefused",
    "ImportResult",
    "SendResult",
    "Sheet",
    "Status",
    "TeachersResult",
    "candidates",
    "import_teachers",
    "neutralize",
    "parse_bytes",
    "read_path",
    "report_csv",
    "run_import",
    "send_outbox",
    "template_csv",
    "template_xlsx",
    "write_report",
]

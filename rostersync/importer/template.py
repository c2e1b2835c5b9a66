"""The import template: the header row an admin fills in (CSV), or a workbook with help (XLSX)."""

from __future__ import annotations

import csv
import io

TEMPLATE_COLUMNS = (
    "Email",
    "Display Name",
    "Role",
    "Site",
    "Groups",
    "SendVerification",
    "DataSync",
    "Overwrite",
    "Delegated",
    "Current Status",
    "Source Username(s)",
)

HELP = (
    ("Email", "required; also accepted: Primary Email"),
    ("Display Name", "also DisplayName, Name, or First Name + Last Name; default Console User"),
    ("Role", "existing role names, several separated by ;  (blank: the default role)"),
    ("Site", "existing site names, several separated by ;  (blank: the default site)"),
    ("Groups", "existing group names separated by , or ;  (none = no groups)"),
    ("SendVerification", "TRUE/FALSE: email a verification to a new user"),
    ("DataSync", "TRUE/FALSE: refresh the user's groups live from Google Classroom"),
    ("Overwrite", "TRUE/FALSE: replace name, roles, sites and status of an existing user"),
    ("Delegated", "TRUE/FALSE: a delegated user keeps only the first role"),
    ("Current Status", "Active or Archived (default Active)"),
    ("Source Username(s)", "source:username items separated by ;"),
)

EXAMPLE = (
    "ada@example.org",
    "Ada Lovelace",
    "Teacher",
    "North High",
    "none",
    "TRUE",
    "FALSE",
    "FALSE",
    "FALSE",
    "Active",
    "",
)


def template_csv() -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(TEMPLATE_COLUMNS)
    return buf.getvalue()


def template_xlsx() -> bytes:
    """Sheet 1 holds only the header (it is what gets imported); sheet 2 explains the columns."""
    from openpyxl import Workbook
    from openpyxl.styles import Font

    wb = Workbook()
    ws = wb.active
    ws.title = "Users"
    ws.append(list(TEMPLATE_COLUMNS))
    for cell in ws[1]:
        cell.font = Font(bold=True)
    for i, name in enumerate(TEMPLATE_COLUMNS):
        ws.column_dimensions[chr(ord("A") + i)].width = max(14, len(name) + 4)
    ws.freeze_panes = "A2"
    help_ws = wb.create_sheet("Help")
    help_ws.append(["Column", "Meaning"])
    for row in HELP:
        help_ws.append(list(row))
    help_ws.append([])
    help_ws.append(["Example row"])
    help_ws.append(list(TEMPLATE_COLUMNS))
    help_ws.append(list(EXAMPLE))
    help_ws.column_dimensions["A"].width = 22
    help_ws.column_dimensions["B"].width = 80
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()

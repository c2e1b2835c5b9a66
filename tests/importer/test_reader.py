"""The awkward-file corpus: how files exported by real spreadsheets are read."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from openpyxl import Workbook

from rostersync.importer import ImportRefused, parse_bytes, read_path
from rostersync.importer.columns import match_columns
from rostersync.importer.reader import kind_for
from rostersync.importer.rows import parse_row

FILES = Path(__file__).parent / "files"


def _xlsx(rows: list[list[object]], title: str = "Sheet1", extra: str | None = None) -> bytes:
    wb = Workbook()
    ws = wb.active
    ws.title = title
    for r in rows:
        ws.append(r)
    if extra:
        wb.create_sheet(extra).append(["Email"])
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


def test_excel_csv_with_bom_crlf_and_semicolons() -> None:
    """A BOM, CRLF line ends and `;` delimiters (Excel's European CSV) read as plain columns."""
    sheet = read_path(str(FILES / "excel_semicolon.csv"), max_rows=2000)
    assert sheet.headers == ("Email", "Display Name", "Role", "Site")
    assert [r.values[0] for r in sheet.rows] == ["ada@example.org", "bob@example.org"]
    assert sheet.rows[0].values[1] == "Ada Lovelace"


def test_quoted_commas_and_newlines_keep_row_numbers() -> None:
    """Quoted cells keep commas and line breaks; row numbers count records, not lines."""
    text = 'Email,Display Name\r\na@example.org,"Smith, Jane"\r\nb@example.org,"two\nlines"\r\nc@example.org,C\r\n'
    sheet = parse_bytes(text.encode(), "q.csv", max_rows=10)
    assert [r.row for r in sheet.rows] == [2, 3, 4]
    assert sheet.rows[0].values[1] == "Smith, Jane"
    assert sheet.rows[1].values[1] == "two\nlines"


def test_upper_case_padded_emails_are_normalized() -> None:
    """Emails are trimmed (also of non-breaking and zero-width spaces) and lower-cased."""
    text = "EMAIL\n  Ada.Lovelace@Example.ORG \n\u00a0bob@example.org\u200b\n"
    sheet = parse_bytes(text.encode(), "e.csv", max_rows=10)
    cols = match_columns(sheet.headers, "e.csv")
    emails = [parse_row(r, cols, {}).email for r in sheet.rows]
    assert emails == ["ada.lovelace@example.org", "bob@example.org"]


def test_unicode_names_survive_utf8_and_windows_1252() -> None:
    """UTF-8 names read as is; a Windows-1252 file is decoded too, with a warning."""
    utf8 = parse_bytes("Email,Name\nz@example.org,Zoë Ñúñez 山田\n".encode(), "u.csv", max_rows=10)
    assert utf8.rows[0].values[1] == "Zoë Ñúñez 山田"
    ansi = parse_bytes(
        "Email;Name\r\nz@example.org;Zoë Müller\r\n".encode("cp1252"), "a.csv", max_rows=10
    )
    assert ansi.rows[0].values[1] == "Zoë Müller"
    assert any("Windows-1252" in w for w in ansi.warnings)


def test_empty_trailing_rows_are_ignored() -> None:
    """Rows of empty cells (`;;;`) and blank lines at the end are not rows."""
    text = "Email;Name;Role\r\na@example.org;A;Teacher\r\n;;\r\n;;\r\n\r\n"
    sheet = parse_bytes(text.encode(), "t.csv", max_rows=10)
    assert len(sheet.rows) == 1


def test_missing_required_column_refuses_the_file() -> None:
    """Without an Email (or Primary Email) column the file is refused, naming the column."""
    sheet = parse_bytes(b"Name,Role\nAda,Teacher\n", "nomail.csv", max_rows=10)
    with pytest.raises(
        ImportRefused, match=r"nomail.csv: required column 'Email' or 'Primary Email'"
    ):
        match_columns(sheet.headers, sheet.name)


def test_too_many_rows_refuses_the_file_with_the_count() -> None:
    """2,001 rows against the default limit of 2,000 refuse the whole file, with the count."""
    text = "Email\n" + "".join(f"u{i}@example.org\n" for i in range(2001))
    with pytest.raises(ImportRefused, match=r"2001 rows exceed the limit of 2000"):
        parse_bytes(text.encode(), "big.csv", max_rows=2000)


def test_column_aliases_are_case_and_space_insensitive() -> None:
    """`primary email`, `DISPLAYNAME`, `group(s)`, `Source Username(s)` map to their fields."""
    cols = match_columns(
        [
            "primary email",
            "DISPLAYNAME",
            "group(s)",
            "Source Username(s)",
            "Current  Status",
            "Extra",
        ],
        "x.csv",
    )
    assert set(cols.index) == {"email", "display_name", "groups", "source_usernames", "status"}
    assert cols.unknown == ("Extra",)


def test_two_columns_for_one_field_refuse_the_file() -> None:
    """Email and Primary Email together are ambiguous: refused rather than guessed."""
    with pytest.raises(ImportRefused, match="both give the email"):
        match_columns(["Email", "Primary Email"], "x.csv")


def test_tsv_and_pasted_text_are_detected() -> None:
    """A .tsv file is tab-separated; pasted text (stdin) has its delimiter sniffed."""
    assert kind_for("users.TSV") == "tsv"
    pasted = parse_bytes(b"Email\tRole\na@example.org\tTeacher\n", "<stdin>", max_rows=10)
    assert pasted.headers == ("Email", "Role")


def test_xlsx_first_sheet_or_named_sheet() -> None:
    """XLSX reads the first sheet, or --sheet; booleans and numbers become text."""
    data = _xlsx([["Email", "Overwrite", "Code"], ["a@example.org", True, 7.0]], extra="Other")
    first = parse_bytes(data, "w.xlsx", max_rows=10)
    assert first.rows[0].values == ("a@example.org", "TRUE", "7")
    other = parse_bytes(data, "w.xlsx", max_rows=10, sheet="Other")
    assert other.headers == ("Email",) and other.rows == ()
    with pytest.raises(ImportRefused, match="no sheet named 'Nope'"):
        parse_bytes(data, "w.xlsx", max_rows=10, sheet="Nope")


def test_unreadable_files_are_refused() -> None:
    """A corrupt workbook, an .xls file and a missing path are refused with the file's name."""
    with pytest.raises(ImportRefused, match=r"bad\.xlsx: not a readable XLSX"):
        parse_bytes(b"PK\x03\x04garbage", "bad.xlsx", max_rows=10)
    with pytest.raises(ImportRefused, match=r"old \.xls format"):
        kind_for("legacy.xls")
    with pytest.raises(ImportRefused, match=r"missing\.csv: cannot read"):
        read_path("missing.csv", max_rows=10)

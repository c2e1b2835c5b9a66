"""The awkward-file corpus: how files exported by real spreadsheets are read."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openpyxl import Workbook
from openpyxl.chart import BarChart, Reference

from rostersync.importer import ImportRefused, parse_bytes, read_path, reader
from rostersync.importer.columns import match_columns
from rostersync.importer.reader import kind_for
from rostersync.importer.rows import parse_row
from tests.hostile import (
    HUGE,
    SHEET_XML,
    damaged,
    damaged_parts,
    edit_member,
    hostile_bytes,
    replace_in,
    valid_xlsx,
)

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


def test_a_file_of_one_column_holding_pipes_says_so() -> None:
    """'|' is not a separator the reader tries: the refusal says why the columns are missing."""
    sheet = parse_bytes(b"Email|Name\na@example.org|Ada\n", "pipes.csv", max_rows=10)
    with pytest.raises(ImportRefused) as raised:
        match_columns(sheet.headers, sheet.name)
    assert str(raised.value).endswith(
        "is missing (the header row is one column holding '|': columns are separated by "
        "',', ';' or tabs)"
    )


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


# --- damaged workbooks ---------------------------------------------------------------------


def test_the_valid_workbook_reads() -> None:
    """The workbook the damaged ones are made from reads, shared string included."""
    sheet = parse_bytes(valid_xlsx(), "w.xlsx", max_rows=10)
    assert sheet.rows[0].values == ("a@example.org", "Ada", "7", "TRUE")


DAMAGED: dict[str, tuple[str, Callable[[bytes], bytes | None], str]] = {
    "random bytes in the sheet": (SHEET_XML, lambda b: b[:300] + bytes(range(256)) + b[300:], "sheet 'Sheet1': ParseError: not well-formed"),
    "sheet XML cut short": (SHEET_XML, lambda b: b[: len(b) // 2], "sheet 'Sheet1': ParseError"),
    "garbage styles": ("xl/styles.xml", lambda _: b"\x00garbage<<", "ParseError: not well-formed"),
    "a style attribute of the wrong type": ("xl/styles.xml", lambda b: b.replace(b'numFmtId="0"', b'numFmtId="x"', 1), "TypeError"),
    "shared string index out of range": (SHEET_XML, replace_in('t="s"><v>0</v>', 't="s"><v>99</v>'), "sheet 'Sheet1': IndexError"),
    "shared string index not a number": (SHEET_XML, replace_in('t="s"><v>0</v>', 't="s"><v>x</v>'), "sheet 'Sheet1': ValueError"),
    "no sheets": ("xl/workbook.xml", replace_in('<sheet name="Sheet1" sheetId="1" state="visible" r:id="rId1" />', ""), "the workbook has no worksheet"),
    "a sheet relation pointing nowhere": ("xl/_rels/workbook.xml.rels", replace_in("/xl/worksheets/sheet1.xml", "/xl/worksheets/nope.xml"), "sheet 'Sheet1' points to a part that is not in the file"),
    "a sheet part missing": (SHEET_XML, lambda _: None, "sheet 'Sheet1' points to a part that is not in the file"),
    "an unknown relation id": ("xl/workbook.xml", replace_in('r:id="rId1"', 'r:id="rId77"'), "KeyError: 'rId77'"),
    "no workbook part": ("xl/workbook.xml", lambda _: None, "There is no item named 'xl/workbook.xml'"),
    "a bad number": (SHEET_XML, replace_in("<v>7</v>", "<v>seven</v>"), "could not convert string to float: 'seven'"),
    "a bad boolean": (SHEET_XML, replace_in('t="b"><v>1</v>', 't="b"><v>maybe</v>'), "sheet 'Sheet1': ValueError"),
    "a bad cell reference": (SHEET_XML, replace_in('r="C2"', 'r="2C"'), "sheet 'Sheet1': ValueError"),
    "a column beyond the sheet": (SHEET_XML, replace_in('r="C2"', 'r="ZZZZZ2"'), "'ZZZZZ' is not a valid column name"),
    "a bad row number": (SHEET_XML, replace_in('<row r="2">', '<row r="two">'), "sheet 'Sheet1': ValueError"),
    "a bad date": (SHEET_XML, replace_in('<c r="C2" t="n"><v>7</v>', '<c r="C2" t="d"><v>notadate</v>'), "Invalid datetime value notadate"),
    "an XML entity": (SHEET_XML, lambda b: b'<?xml version="1.0"?><!DOCTYPE w [<!ENTITY a "aaaa">]>' + b.replace(b"<t>Ada</t>", b"<t>&a;</t>"), "EntitiesForbidden"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGED), ids=list(DAMAGED))
def test_damaged_workbook_is_refused_naming_file_and_problem(case: str) -> None:
    """Each kind of damage refuses the whole file on one line naming it and the problem."""
    member, change, detail = DAMAGED[case]
    data = edit_member(valid_xlsx(), member, change)
    with pytest.raises(ImportRefused) as refused:
        parse_bytes(data, "bad.xlsx", max_rows=10)
    message = str(refused.value)
    assert message.startswith("bad.xlsx: not a readable XLSX workbook (") and message.endswith(")")
    assert detail in message and "\n" not in message


def test_workbook_unpacking_past_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A workbook whose parts unpack to more than the limit (a zip bomb) is never parsed."""
    monkeypatch.setattr(reader, "MAX_XLSX_UNPACKED", 2**20)
    data = edit_member(valid_xlsx(), "xl/padding.bin", lambda _: bytes(2**20 + 1))
    with pytest.raises(
        ImportRefused, match=r"big\.xlsx: not a readable XLSX workbook \(it unpacks to 1 MiB"
    ):
        parse_bytes(data, "big.xlsx", max_rows=10)


def test_chart_sheet_is_not_read_as_a_worksheet() -> None:
    """--sheet naming a chart sheet is refused; without --sheet the first worksheet is read."""
    wb = Workbook()
    wb.active.append(["Email"])
    wb.active.append(["a@example.org"])
    chart = BarChart()
    chart.add_data(Reference(wb.active, min_col=1, min_row=2, max_row=2))
    wb.create_chartsheet("Chart", 0).add_chart(chart)
    buf = io.BytesIO()
    wb.save(buf)
    assert parse_bytes(buf.getvalue(), "c.xlsx", max_rows=10).headers == ("Email",)
    with pytest.raises(ImportRefused, match=r"c\.xlsx: sheet 'Chart' is a chart, not a worksheet"):
        parse_bytes(buf.getvalue(), "c.xlsx", max_rows=10, sheet="Chart")


def test_a_far_away_empty_cell_does_not_widen_rows() -> None:
    """A blank cell at column XFD is not 16,384 cells per row."""
    data = edit_member(
        valid_xlsx(),
        SHEET_XML,
        replace_in(
            "</row></sheetData>",
            '<c r="XFD2" t="inlineStr"><is><t> </t></is></c></row></sheetData>',
        ),
    )
    sheet = parse_bytes(data, "w.xlsx", max_rows=10)
    assert sheet.rows[0].values == ("a@example.org", "Ada", "7", "TRUE")


@settings(max_examples=200, deadline=None)
@given(
    data=st.one_of(
        damaged(valid_xlsx()),
        damaged_parts(valid_xlsx()),
        hostile_bytes.map(lambda b: b"PK\x03\x04" + b),
    )
)
def test_fuzzed_workbook_reads_or_is_refused(data: bytes) -> None:
    """Flipped bytes, cuts and damaged parts of a valid workbook, or random bytes: the reader
    returns a sheet or refuses the file, never anything else."""
    try:
        parse_bytes(data, "fuzz.xlsx", max_rows=10)
    except ImportRefused as exc:
        assert str(exc).startswith("fuzz.xlsx") and "\n" not in str(exc)


# --- hostile CSV ---------------------------------------------------------------------------


def test_huge_cell_fails_its_row_only() -> None:
    """A quoted cell over 128 KiB fails its own row, naming the line; the file is read."""
    text = f'Email,Name\na@example.org,A\nb@example.org,"{"x" * 200_000}"\nc@example.org,C\n'
    sheet = parse_bytes(text.encode(), "h.csv", max_rows=10)
    assert [(r.row, r.problem) for r in sheet.rows] == [
        (2, None),
        (3, "line 3: a field is longer than 131072 characters"),
        (4, None),
    ]


def test_a_row_the_csv_module_refuses_keeps_its_cells_split_loosely_for_display() -> None:
    """Such a row's values stay empty (nothing in it is trusted), but its cells split as well
    as can be let the result name the row by its email."""
    text = 'Email;Name\r\na@example.org;A\r\nb@example.org;"Jo"hn;x\r\n"c@example.org";"Ab;"c""\r\n'
    sheet = parse_bytes(text.encode(), "l.csv", max_rows=10)
    assert [(r.values, r.loose) for r in sheet.rows] == [
        (("a@example.org", "A"), ()),
        ((), ("b@example.org", "John", "x")),
        ((), ("c@example.org", "Ab;c")),
    ]


def test_stray_quote_fails_its_row_naming_the_line() -> None:
    """Text after a closing quote fails that row (it used to be read as if unquoted), with its
    physical line, which a quoted line break above puts past its row number."""
    text = 'Email,Name\na@example.org,"two\nlines"\nb@example.org,"Jo"hn\nc@example.org,C\n'
    sheet = parse_bytes(text.encode(), "q.csv", max_rows=10)
    [bad] = [r for r in sheet.rows if r.problem]
    assert bad.row == 3 and bad.values == ()
    assert bad.problem is not None and bad.problem.startswith("line 4: malformed CSV")
    assert [r.values[0] for r in sheet.rows if not r.problem] == ["a@example.org", "c@example.org"]


def test_stray_quote_in_header_refuses_the_file() -> None:
    """A header the csv module cannot read refuses the file, naming line 1."""
    with pytest.raises(
        ImportRefused, match=r"h\.csv: unreadable header row \(line 1: malformed CSV"
    ):
        parse_bytes(b'"Email"x,Name\na@example.org,A\n', "h.csv", max_rows=10)


def test_quote_left_open_refuses_the_file_at_its_line() -> None:
    """A quote never closed would swallow the rows after it: the file is refused at its line."""
    with pytest.raises(ImportRefused, match=r"o\.csv line 3: unterminated quoted field"):
        parse_bytes(
            b'Email,Name\na@example.org,A\nb@example.org,"B\nc@example.org,C\n',
            "o.csv",
            max_rows=10,
        )


def test_nul_in_a_cell_fails_its_row() -> None:
    """A NUL character fails its row; the row keeps its cells for the report."""
    sheet = parse_bytes(b"Email,Name\na@example.org,A\x00\n", "n.csv", max_rows=10)
    assert sheet.rows[0].problem == "line 2: a field contains a NUL character"
    assert sheet.rows[0].values == ("a@example.org", "A\x00")


@settings(max_examples=200, deadline=None)
@given(body=hostile_bytes, kind=st.sampled_from([None, "csv", "tsv"]))
def test_hostile_csv_reads_or_is_refused(body: bytes, kind: str | None) -> None:
    """Quotes, NULs, lone CRs, BOMs, huge fields, invalid UTF-8: a sheet or a refusal naming
    the file, never another exception; a failed row's problem names a line of the file."""
    try:
        sheet = parse_bytes(b"Email,Name\n" + body, "fuzz.csv", max_rows=50, kind=kind)
    except ImportRefused as exc:
        assert str(exc).startswith("fuzz.csv")
        return
    for row in sheet.rows:
        assert row.problem is None or re.fullmatch(r"line \d+: .+", row.problem)


_BROKEN_CELLS = {
    "huge quoted cell": '"' + HUGE + '"',
    "text after a closing quote": '"Jo"hn',
    "NUL": "Jo\x00hn",
}


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=12),
    data=st.data(),
    breakage=st.sampled_from(sorted(_BROKEN_CELLS)),
)
def test_one_broken_row_fails_alone(count: int, data: st.DataObject, breakage: str) -> None:
    """One broken row anywhere in a CSV file is the only row with a problem, at its line."""
    rows = [f"u{i}@example.org,Name {i}" for i in range(count)]
    bad = data.draw(st.integers(min_value=0, max_value=count - 1))
    rows[bad] = f"u{bad}@example.org,{_BROKEN_CELLS[breakage]}"
    sheet = parse_bytes(("Email,Name\n" + "\n".join(rows) + "\n").encode(), "b.csv", max_rows=50)
    assert [
        (r.row, (r.problem or "")[: len(f"line {bad + 2}:")]) for r in sheet.rows if r.problem
    ] == [(bad + 2, f"line {bad + 2}:")]
    assert len(sheet.rows) == count


def test_a_utf8_file_with_a_stray_byte_keeps_its_names_and_fails_that_row_alone() -> None:
    """A file that is UTF-8 but for a stray byte (a cell pasted from a Windows-1252 file) is not
    read as Windows-1252, which would garble every other accented name: the row with the stray
    byte fails, naming its line, column and byte, and shows U+FFFD in its place."""
    body = "Email,Name\nz@example.org,Zoë 山田\n".encode() + b"m@example.org,Bad \xff\xfe byte\n"
    sheet = parse_bytes(body, "mixed.csv", max_rows=10)
    assert [r.values for r in sheet.rows] == [
        ("z@example.org", "Zoë 山田"),
        ("m@example.org", "Bad \ufffd\ufffd byte"),
    ]
    assert [r.problem for r in sheet.rows] == [
        None,
        "line 3: Name: not UTF-8 (byte 0xff 0xfe); save the file as CSV UTF-8",
    ]
    assert sheet.warnings == (
        "mixed.csv: not all UTF-8: a row with bytes that are not fails, naming them",
    )


def test_a_stray_byte_in_the_header_refuses_the_file() -> None:
    """Which column is which cannot be trusted: the file is refused at the header's line."""
    with pytest.raises(ImportRefused, match=r"unreadable header row \(line 1: column 2: not UTF-8"):
        parse_bytes(b"Email,N\xe4me\nz@example.org,Zo\xc3\xab\n", "h.csv", max_rows=10)

"""Hostile input files: CSV text built from the pieces that break parsers (quotes, NULs, lone
CRs, BOMs, fields over the csv module's limit, invalid UTF-8), a valid XLSX workbook to damage
by hand, and hypothesis strategies that damage files (bytes flipped, cut short)."""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Callable

from hypothesis import strategies as st
from openpyxl import Workbook

#: Longer than the csv module's default field limit (131,072 characters).
HUGE = "x" * 140_000

_PIECES = st.sampled_from(
    ['"', '""', ",", ";", "\t", "\n", "\r", "\r\n", "\x00", "\ufeff", " ", "é", "u-1", HUGE]
)

#: Text made mostly of the characters CSV parsers trip on.
hostile_text = st.lists(_PIECES | st.text(max_size=12), max_size=40).map("".join)

#: The same as bytes, some with bytes that are not UTF-8, and plain random bytes.
hostile_bytes = st.one_of(
    hostile_text.map(str.encode),
    st.tuples(hostile_text, st.binary(min_size=1, max_size=6), hostile_text).map(
        lambda parts: parts[0].encode() + b"\xff" + parts[1] + parts[2].encode()
    ),
    st.binary(max_size=300),
)


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes changed, a slice removed, or cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["flip", "cut", "drop"]))
        if not out:
            break
        at = draw(st.integers(min_value=0, max_value=len(out) - 1))
        if kind == "flip":
            out[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif kind == "cut":
            del out[at:]
        else:
            del out[at : at + draw(st.integers(min_value=1, max_value=64))]
    return bytes(out)


# --- workbooks ---------------------------------------------------------------------------

SHEET_XML = "xl/worksheets/sheet1.xml"
_MAIN = "http://schemas.openxmlformats.org"


def replace_in(old: str, new: str) -> Callable[[bytes], bytes]:
    """An edit of a zip member: the first ``old`` becomes ``new`` (which must be there)."""

    def edit(part: bytes) -> bytes:
        assert old.encode() in part, old
        return part.replace(old.encode(), new.encode(), 1)

    return edit


def edit_member(data: bytes, member: str, change: Callable[[bytes], bytes | None]) -> bytes:
    """``data`` re-zipped with ``member`` changed (None: removed; a new name: added)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        names = src.namelist()
        for name in [*names, *([member] if member not in names else [])]:
            part = src.read(name) if name in names else b""
            new = change(part) if name == member else part
            if new is not None:
                dst.writestr(name, new)
    return out.getvalue()


@functools.cache
def valid_xlsx() -> bytes:
    """A valid workbook, sheet "Sheet1": Email, Display Name, Code, Flag and one row whose
    email comes from sharedStrings.xml (openpyxl itself writes inline strings)."""
    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(["Email", "Display Name", "Code", "Flag"])
    ws.append(["a@example.org", "Ada", 7, True])
    buf = io.BytesIO()
    wb.save(buf)
    data = edit_member(
        buf.getvalue(),
        SHEET_XML,
        replace_in(
            '<c r="A2" t="inlineStr"><is><t>a@example.org</t></is></c>',
            '<c r="A2" t="s"><v>0</v></c>',
        ),
    )
    data = edit_member(
        data,
        "xl/_rels/workbook.xml.rels",
        replace_in(
            "</Relationships>",
            f'<Relationship Type="{_MAIN}/officeDocument/2006/relationships/sharedStrings" '
            'Target="sharedStrings.xml" Id="rId9" /></Relationships>',
        ),
    )
    data = edit_member(
        data,
        "[Content_Types].xml",
        replace_in(
            "</Types>",
            '<Override PartName="/xl/sharedStrings.xml" ContentType="application/'
            'vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/></Types>',
        ),
    )
    strings = f'<sst xmlns="{_MAIN}/spreadsheetml/2006/main"><si><t>a@example.org</t></si></sst>'
    return edit_member(data, "xl/sharedStrings.xml", lambda _: strings.encode())


def damaged_parts(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` (a zip) with one of its members damaged inside; the zip itself stays valid."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        parts = {name: zf.read(name) for name in zf.namelist()}
    return st.sampled_from(sorted(parts)).flatmap(
        lambda name: damaged(parts[name]).map(lambda part: edit_member(data, name, lambda _: part))
    )

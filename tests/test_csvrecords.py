"""CSV records with their lines: one bad record costs its row, unless it hides where the
next record starts."""

from __future__ import annotations

import re

import pytest

from rostersync.csvrecords import CsvRecord, CsvUnreadable, read_records
from tests.hostile import HUGE


def records(text: str) -> list[CsvRecord]:
    """Split on LF only, as the OneRoster connector does (the importer also splits on CR)."""
    return list(read_records(line for line in re.split("(?<=\n)", text) if line))


def test_records_carry_the_line_they_start_on() -> None:
    """A quoted line break makes a record span lines; the next one starts after it."""
    assert records('a,b\n"x\ny",z\n\nc,d\n') == [
        (1, ["a", "b"], None),
        (2, ["x\ny", "z"], None),
        (4, [], None),
        (5, ["c", "d"], None),
    ]


def test_a_record_broken_on_its_own_line_is_reported_alone() -> None:
    """Text after a closing quote, a huge field, a CR in an unquoted field: that record only."""
    got = records(f'a\n"ab"c,d\n"{HUGE}",e\nf\rg\nh\n')
    assert [(line, problem is None) for line, _fields, problem in got] == [
        (1, True),
        (2, False),
        (3, False),
        (4, False),
        (5, True),
    ]
    assert got[1][2] is not None and got[1][2].startswith("malformed CSV: ',' expected after")
    assert got[2][2] == "a field is longer than 131072 characters"
    assert got[3][2] == "a carriage return (CR) inside an unquoted field"
    assert got[4][1] == ["h"]


def test_nul_is_reported_with_the_fields() -> None:
    """A NUL anywhere in a record (even on its second line) flags that record only."""
    assert records('a\n"b\n\x00",c\nd\n') == [
        (1, ["a"], None),
        (2, ["b\n\x00", "c"], "a field contains a NUL character"),
        (4, ["d"], None),
    ]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('a\n"never closed\nb\n', 2, "unterminated quoted field"),
        ('a\n"opened\nb\nc,"d"e\n', 2, "in a quoted field that runs over lines 2-4"),
        (f'a\n"{HUGE}\nmore"\n', 2, "a quoted field on this line runs on past its end"),
        ('a\n"ab"c,"x\ny"\n', 2, "a quoted field on this line runs on past its end"),
    ],
    ids=["open at the end", "closed by a later quote", "huge and open", "broken and open"],
)
def test_broken_quoting_that_hides_the_next_record_is_unreadable(
    text: str, line: int, words: str
) -> None:
    """Where the next record starts is unknown: the reader stops at the broken record's line."""
    with pytest.raises(CsvUnreadable) as broken:
        records(text)
    assert broken.value.line == line and words in broken.value.message

"""CSV records from files made elsewhere, each with the line it starts on.

One bad record costs one row, never the file, unless it hides where the next record starts.

The csv module (strict mode) raises on a malformed record: text after a closing quote, a
field over its size limit, a carriage return inside an unquoted field. It then resumes at the
next physical line, which is the next record when the failed one sat on one line: that record
alone is reported (the third item of its :data:`CsvRecord`). A failed record that spanned several lines had
a quoted field running over line breaks, and the quote that opened it may never have been
meant to (an unterminated quote swallows the rows after it until some later quote "closes"
it). The rows it covered cannot be trusted, so the file is unreadable from there
(:class:`CsvUnreadable`); so is a quote still open at the end of the file.

A NUL character is valid CSV but no roster or import value; PostgreSQL cannot even store it.
Its record comes back with its fields and a problem.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence


class CsvUnreadable(Exception):
    """The record starting on ``line`` broke in a way that hides where the records after it
    begin: the file cannot be read from there. Callers add the file's name."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}")


#: One record: the physical line it starts on (1-based), its fields, and what is wrong with
#: it or None (then the fields are what could be read, possibly none). A plain tuple: one is
#: made per row of a large drop, and a NamedTuple is several times slower to make.
CsvRecord = tuple[int, list[str], str | None]


NUL_PROBLEM = "a field contains a NUL character"


def describe(error: csv.Error) -> str:
    """The csv module's message, said for an admin (its own words kept for searching)."""
    text = str(error)
    if text.startswith("field larger than field limit"):
        return f"a field is longer than {csv.field_size_limit()} characters"
    if text.startswith("new-line character seen in unquoted field"):
        return "a carriage return (CR) inside an unquoted field"
    if "expected after" in text:
        return (
            f"malformed CSV: {text}: text follows the closing quote of a quoted field "
            '(a quote inside one is written twice: "")'
        )
    return f"malformed CSV: {text}"


def read_records(lines: Iterable[str], *, delimiter: str = ",") -> Iterator[CsvRecord]:
    """Each record of ``lines`` (physical lines, line ends kept), blank lines as empty records.

    Raises :class:`CsvUnreadable` where a broken record hides where the next one starts.
    """
    last = ""  # the line the csv reader took last
    nul = False  # whether a line of the current record holds a NUL

    def source() -> Iterator[str]:
        nonlocal last, nul
        for line in lines:
            last = line
            if "\x00" in line:
                nul = True
            yield line

    reader = csv.reader(source(), delimiter=delimiter, strict=True)
    end = 0  # the last line of the previous record
    while True:
        try:
            # A for loop, not next() per record: this runs once per row of a large drop.
            for fields in reader:
                start, end = end + 1, reader.line_num
                if nul:
                    nul = False
                    yield start, fields, NUL_PROBLEM
                else:
                    yield start, fields, None
            return
        except csv.Error as exc:
            start, end = end + 1, reader.line_num
            nul = False
            problem = describe(exc)
            if str(exc).startswith("unexpected end of data"):
                raise CsvUnreadable(
                    start,
                    "unterminated quoted field: a quote opened in the record that starts here "
                    "is never closed",
                ) from None
            if end > start:
                raise CsvUnreadable(
                    start,
                    f"{problem} (on line {end}), in a quoted field that runs over lines "
                    f"{start}-{end}: a quote left open would swallow the rows in between, "
                    "so the file is not read from here",
                ) from None
            if last.count('"') % 2:
                # The csv module dropped the rest of the line, and that rest ends inside
                # quotes: the record goes on past the line, and nobody can say where.
                raise CsvUnreadable(
                    start,
                    f"{problem}, and a quoted field on this line runs on past its end "
                    "(an unterminated quote?), so the file is not read from here",
                ) from None
            yield start, [], problem


#: Separators a spreadsheet may have used instead of the one a reader expects.
_SEPARATORS = {",": "','", ";": "';'", "\t": "tabs", "|": "'|'"}


def one_column_hint(header: Sequence[str], accepted: str) -> str:
    """Why a header row missing its columns may be one column: it holds another separator
    (a spreadsheet saved with ';' or '|'). ``accepted``: the separators the reader splits on.
    Empty when the header has several columns or no such separator."""
    cells = [h for h in header if h.strip()]
    if len(cells) != 1:
        return ""
    for sep, label in _SEPARATORS.items():
        if sep not in accepted and sep in cells[0]:
            names = [_SEPARATORS[a] for a in accepted]
            takes = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            return (
                f" (the header row is one column holding {label}: columns are separated by {takes})"
            )
    return ""

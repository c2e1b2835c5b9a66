"""CSV records from files made elsewhere, each with the line it starts on.

One bad record costs one row, never the file, unless it hides where the next record starts.

The csv module (strict mode) raises on a malformed record: text after a closing quote, a
field over its size limit, a carriage return inside an unquoted field. It then resumes at the
next physical line, which is the next record when the failed one sat on one line: that record
alone is reported (:attr:`CsvRecord.problem`). A failed record that spanned several lines had
a quoted field running over line breaks, and the quote that opened it may never have been
meant to (an unterminated quote swallows the rows after it until some later quote "closes"
it). The rows it covered cannot be trusted, so the file is unreadable from there
(:class:`CsvUnreadable`); so is a quote still open at the end of the file.

A NUL character is valid CSV but no roster or import value; PostgreSQL cannot even store it.
Its record comes back with its fields and a problem.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class CsvUnreadable(Exception):
    """The record starting on ``line`` broke in a way that hides where the records after it
    begin: the file cannot be read from there. Callers add the file's name."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}")


@dataclass(frozen=True, slots=True)
class CsvRecord:
    """One record: the physical line it starts on (1-based), its fields, and what is wrong
    with it (then ``fields`` holds what could be read, possibly nothing)."""

    line: int
    fields: list[str]
    problem: str | None = None


class _Lines:
    """The lines handed to the csv reader, remembering the last one and whether a NUL went by."""

    __slots__ = ("_lines", "last", "nul")

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = iter(lines)
        self.last = ""
        self.nul = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.last = line
        if "\x00" in line:
            self.nul = True
        return line


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
    source = _Lines(lines)
    reader = csv.reader(source, delimiter=delimiter, strict=True)
    end = 0  # the last line of the previous record
    while True:
        start = end + 1
        source.nul = False
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            end = reader.line_num
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
                    f"{start}-{end}: an unterminated quote would hide the rows in between, "
                    "so the file is not read from here",
                ) from None
            if source.last.count('"') % 2:
                # The csv module dropped the rest of the line, and that rest ends inside
                # quotes: the record goes on past the line, and nobody can say where.
                raise CsvUnreadable(
                    start,
                    f"{problem}, and a quoted field on this line runs on past its end "
                    "(an unterminated quote?), so the file is not read from here",
                ) from None
            yield CsvRecord(start, [], problem)
            continue
        end = reader.line_num
        if source.nul:
            yield CsvRecord(start, fields, "a field contains a NUL character")
        else:
            yield CsvRecord(start, fields)

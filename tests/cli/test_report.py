"""How run reports and change sets are shown: text, CSV, durations, rejections (issue 19)."""

from __future__ import annotations

import csv
from pathlib import Path

from rostersync.cli.report import (
    change_set_lines,
    csv_rows,
    duration_text,
    rejections_line,
    write_csv,
)
from rostersync.sync.changes import REASONS, ChangeSet, summary_text
from rostersync.sync.rules import NO_EMAIL


def _change_set() -> ChangeSet:
    users = [
        {
            "action": "archive",
            "email": f"t{n}@example.org",
            "display_name": "=HYPERLINK(1)" if n == 0 else f"T {n}",
            "sourced_id": f"t-{n}",
            "sourced_ids": [f"t-{n}"],
            "reason": REASONS["archive"],
        }
        for n in range(7)
    ]
    groups = [
        {
            "action": "rename",
            "class_sourced_id": "c-1",
            "name": "Algebra II",
            "old_name": "Algebra I",
            "owners_added": 1,
            "owners_removed": 0,
            "members_added": 1,
            "members_removed": 1,
            "members_changed": 0,
            "owners": {"added": ["kat@example.org"], "removed": []},
            "members": {
                "added": [{"sourced_id": "s-5", "email": "s5@example.org", "name": "Stu Five"}],
                "removed": [{"sourced_id": "s-1", "email": None, "name": "Stu One"}],
            },
        }
    ]
    return ChangeSet(9, users, groups, ["a note"], True)


def test_the_text_lists_users_and_groups_and_a_limit_counts_the_rest() -> None:
    """A summary line, one row per user and group; with a limit the rest is counted."""
    lines = change_set_lines(_change_set())
    assert lines[0] == "change set of run 9: users: archive 7; groups: rename 1"
    assert "note: a note" in lines
    assert any(line.startswith("rename  c-1    Algebra II (was Algebra I)") for line in lines)
    short = change_set_lines(_change_set(), limit=5)
    assert "... and 2 more users" in short
    assert sum(line.startswith("archive") for line in short) == 5


def test_members_are_listed_one_a_line() -> None:
    """--members: each owner and member added (+) or removed (-), emails where there are."""
    lines = change_set_lines(_change_set(), members=True)
    assert "  + owner  kat@example.org" in lines
    assert "  + member s-5  s5@example.org  Stu Five" in lines
    assert "  - member s-1  (no email)  Stu One" in lines


def test_the_csv_has_a_row_per_change_and_neutralises_formulas(tmp_path: Path) -> None:
    """One row per user and group (and owner and member with --members); a cell a
    spreadsheet would evaluate is quoted."""
    path = tmp_path / "c.csv"
    assert write_csv(path, [_change_set()], members=True) == 7 + 1 + 1 + 2
    rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    assert [r["kind"] for r in rows].count("member") == 2
    assert rows[0]["display_name"] == "'=HYPERLINK(1)"
    group = next(r for r in rows if r["kind"] == "group")
    assert (group["members_added"], group["members_removed"]) == ("1", "1")
    assert len(list(csv_rows(_change_set()))) == 8


def test_durations_and_rejections_read_plainly() -> None:
    """Durations in s, m or h; rejections split into the connector's and the rules'."""
    assert [duration_text(s) for s in (None, 2.345, 75, 3725)] == ["-", "2.3s", "1m 15s", "1h 02m"]
    line = rejections_line(
        {"records_rejected": 3},
        [{"reason": NO_EMAIL}, {"reason": "users.csv: bad row"}, {"reason": "x"}],
    )
    assert line.startswith("records rejected 3: 2 by the connector")
    assert "1 by the provisioning rules" in line
    assert summary_text({"users": {"create": 0}, "groups": {"remove": 2}}) == (
        "users: no change; groups: remove 2"
    )

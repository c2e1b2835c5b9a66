"""The per-row status vocabulary of `import` and `teachers import` (CONTRACT.md: exact names)."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    SUCCESS = "Success"
    UPDATED = "Updated"
    ALREADY_EXISTS = "Already Exists"
    FAILED = "Failed"
    INVALID_EMAIL = "Invalid email"
    DUPLICATE_ROW = "Duplicate row"
    LICENSE_LIMIT = "License limit reached"
    SITE_NOT_FOUND = "Site not found"
    SITE_AMBIGUOUS = "Ambiguous site name detected"
    ROLE_NOT_FOUND = "Role not found"
    ROLE_AMBIGUOUS = "Ambiguous role name detected"
    GROUP_NOT_FOUND = "Group not found"
    NO_ACCESS = "No Access"

    @property
    def count_key(self) -> str:
        """Which of the contract's four counters this status adds to."""
        if self is Status.SUCCESS:
            return "created"
        if self is Status.UPDATED:
            return "updated"
        if self is Status.ALREADY_EXISTS:
            return "unchanged"
        return "failed"

    @property
    def ok(self) -> bool:
        return self.count_key != "failed"


COUNT_KEYS = ("created", "updated", "unchanged", "failed")


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(COUNT_KEYS, 0)

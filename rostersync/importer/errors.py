"""Why a whole import is refused before any change (the CLI exits 2 with the message)."""

from __future__ import annotations

from rostersync.errors import RostersyncError


class ImportRefused(RostersyncError):
    """The file (or the request) cannot be imported at all: nothing was changed.

    Raised for an unreadable file, a missing required column, too many rows, an unknown
    sheet, or an unknown ``--as`` user. The message names the file, column or count.
    """

"""Fingerprints as the database hands them over, joined with commas.

Not in rostersync.source.rows: a change to that module changes every record's fingerprint
(connectors.oneroster.decode.SEED), and this has nothing to do with how a record becomes a
row. Imports nothing heavy: decode workers load it.
"""

from __future__ import annotations

import msgspec

_INTS = msgspec.json.Decoder(list[int])


def parse_fingerprints(joined: str) -> list[int]:
    """Fingerprints the database joined with commas, as ints. msgspec parses them in C, 2.6
    times as fast as ``map(int, joined.split(","))`` (320,000 in 21 ms against 54 ms): the
    sync process and each decode worker read every fingerprint of the mirror at the start
    of a full run."""
    try:
        return _INTS.decode(f"[{joined}]")
    except msgspec.DecodeError:
        raise ValueError("fingerprints: not a comma-separated list of integers") from None

"""Fingerprints of a source's records as they came, and the set of those the mirror holds.

A full run reads every record, and on a typical night almost every one is byte for byte the
record its mirror row was made from. A connector that fingerprints each record before it
normalizes it (:func:`fingerprint`) can leave those out unnormalized: the fingerprint is stored
with the row (``raw_hash``), and a later run finds it in :class:`KnownHashes`, the mirror's
fingerprints of one kind, sorted, handed to the decode workers as a file (:func:`save`,
:func:`load`) because a process pool cannot send one object to each of its workers.

The fingerprint covers the normalizer's own stamp (see ``connectors.oneroster.normalize``):
a release that normalizes differently recognises nothing and normalizes every record once.
Like :mod:`rostersync.source.rows`, this module imports nothing heavy: the workers load it.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left
from pathlib import Path

import xxhash

#: A fingerprint is a 128-bit integer: stored as 32 hex digits, held as two 64-bit words.
HEX_DIGITS = 32
_LOW = (1 << 64) - 1


def seed_of(stamp: bytes) -> int:
    """The hash seed for a normalizer's ``stamp`` (any bytes naming its version)."""
    return xxhash.xxh3_64_intdigest(stamp)


def fingerprint(seed: int, record: bytes) -> int:
    """The fingerprint of one record's JSON (as serialized from the parsed page: the same
    bytes for the same record, key order included) under the normalizer's ``seed``.

    xxHash's 128-bit XXH3: a few times faster than a cryptographic hash on records of a few
    hundred bytes, and the source is trusted with the records' content anyway."""
    return xxhash.xxh3_128_intdigest(record, seed)


def hex_text(value: int) -> str:
    """A fingerprint as stored (``raw_hash``): 32 lower-case hex digits, which sort as the
    integers do."""
    return f"{value:032x}"


class KnownHashes:
    """The sorted fingerprints of one kind of mirror rows; :meth:`find` gives a fingerprint's
    position, which the run maps back to its mirror row (rostersync.sync.known).

    Two arrays of 64-bit words searched by bisection: 16 bytes a row, where a set of Python
    integers takes ~100 (a million enrollments is 16 MB in each worker, not 100)."""

    __slots__ = ("high", "low")

    def __init__(self, data: bytes) -> None:
        words = array("Q")
        words.frombytes(data[: len(data) - len(data) % 16])
        if sys.byteorder == "little":
            words.byteswap()  # stored big-endian, the order of the hex text it came from
        self.high = words[0::2]
        self.low = words[1::2]

    def __len__(self) -> int:
        return len(self.high)

    def find(self, value: int) -> int:
        """Where ``value`` is among the known fingerprints, or -1."""
        high, low = value >> 64, value & _LOW
        at = bisect_left(self.high, high)
        end = len(self.high)
        while at < end and self.high[at] == high:
            if self.low[at] == low:
                return at
            at += 1
        return -1


def save(path: Path, hexes: str) -> int:
    """Write the concatenated hex fingerprints ``hexes`` (sorted) for :func:`load`; returns how
    many. Raises ValueError if the text is not whole fingerprints of hex digits."""
    if len(hexes) % HEX_DIGITS:
        raise ValueError("not whole fingerprints")
    data = bytes.fromhex(hexes)
    path.write_bytes(data)
    return len(data) // 16


#: Loaded files of this process, by path: a worker decodes pages of several collections in
#: any order, and each page names its kind's file.
_loaded: dict[str, KnownHashes] = {}


def load(path: str) -> KnownHashes:
    """The fingerprints :func:`save` wrote to ``path``, read once per process. A path of
    another run's folder drops those of the earlier runs."""
    known = _loaded.get(path)
    if known is None:
        folder = str(Path(path).parent)
        for old in [p for p in _loaded if str(Path(p).parent) != folder]:
            del _loaded[old]
        known = _loaded[path] = KnownHashes(Path(path).read_bytes())
    return known

"""Hypothesis strategies for hostile input files: CSV text built from the pieces that break
parsers (quotes, NULs, lone CRs, BOMs, fields over the csv module's limit, invalid UTF-8),
and damaged copies of a valid file (bytes flipped, cut short)."""

from __future__ import annotations

from hypothesis import strategies as st

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

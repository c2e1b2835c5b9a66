"""Record fingerprints (connectors.oneroster.decode): a page as rows, each carrying the
fingerprint of its record's bytes; with the mirror's fingerprints, the records it holds are
left out unparsed, marked in the page's order; and a decode worker reads those fingerprints
from the store itself (rostersync.sync.known)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import xxhash
from sqlalchemy import text

from connectors.oneroster import decode
from connectors.oneroster.decode import DecodeError, decode_page, fingerprint, known_fingerprints
from connectors.oneroster.normalize import rows_page
from rostersync.source.rows import KnownSpec, StagedBatch
from rostersync.store.db import Store
from rostersync.sync.known import KnownRows
from tests.connectors.test_oneroster_unit import user


def body(records: list[Any]) -> bytes:
    return json.dumps({"users": records}, separators=(",", ":")).encode()


def raw_parts(records: list[Any]) -> list[bytes]:
    return [json.dumps(r, separators=(",", ":")).encode() for r in records]


def test_every_row_carries_its_records_fingerprint() -> None:
    records = [user(1, role="Teacher"), user(2), user(3, role=None), user(4)]
    out = decode_page("users", body(records), True)
    fps = [fingerprint(p) for p in raw_parts(records)]
    assert isinstance(out.batch, StagedBatch)
    rows = out.batch.rows["person"]
    assert [r[-1] for r in rows] == [fps[0], fps[1], fps[3]]  # user 3 has no role: rejected
    assert list(out.batch.order["person"]) == fps
    assert [r[:-1] for r in rows] == [r[:-1] for r in rows_page("users", records).rows["person"]]
    assert len(set(fps)) == 4 and all(0 <= fp < 1 << 63 for fp in fps)
    assert fingerprint(raw_parts([user(1, role="Teacher")])[0]) == fps[0]  # the bytes alone


def test_records_the_mirror_holds_are_left_out_unparsed() -> None:
    records = [user(1, role="Teacher"), user(2), user(3)]
    fps = [fingerprint(p) for p in raw_parts(records)]
    out = decode_page("users", body(records), True, {fps[0], fps[2]})
    batch = out.batch
    assert isinstance(batch, StagedBatch)
    assert [r[0] for r in batch.rows["person"]] == ["u-002"]
    assert list(batch.order["person"]) == [~fps[0], fps[1], ~fps[2]]
    assert batch.skipped == {"person": 2} and batch.count("person") == 3
    assert out.length == 3 and out.first_id == "u-001"  # read from a record left out
    # the newest date is of the rows decoded: a record left out is the mirror's, whose date a
    # run before this one already counted in the source's high-water mark
    assert batch.newest is not None


def test_a_broken_page_is_refused_whether_or_not_records_are_left_out() -> None:
    good = raw_parts([user(1)])[0]
    for skip in (None, {fingerprint(good)}, {123}):
        with pytest.raises(DecodeError, match="invalid JSON"):
            decode_page("users", b'{"users":[' + good + b',{"a":tru}]}', True, skip)
        with pytest.raises(DecodeError, match="no 'users' list"):
            decode_page("users", b'{"users":5}', True, skip)
        with pytest.raises(DecodeError, match="no 'users' list"):
            decode_page("users", b"[1]", True, skip)
        with pytest.raises(DecodeError, match="no 'users' list"):
            decode_page("users", b'{"orgs":[]}', True, skip)
        assert decode_page("users", b'{"users":null}', True, skip).length == 0
    # nested deeper than any parser goes: refused as the stdlib and orjson refuse it, not a
    # RecursionError out of the split (a failed run's traceback)
    for depth in (1_000, 1_000_000):
        hostile = b'{"users":[' + b"[" * depth + b"]" * depth + b"]}"
        for skip in (None, {fingerprint(good)}):
            with pytest.raises(DecodeError, match="invalid JSON"):
                decode_page("users", hostile, True, skip)
    # bytes no JSON parser takes, inside a record left unparsed by the split: refused when
    # the record is parsed (it is not known)
    with pytest.raises(DecodeError, match="invalid JSON"):
        decode_page("users", b'{"users":[' + good + b',"\xff"]}', True, {fingerprint(good)})


def test_the_seed_is_the_normalizers_code() -> None:
    """A change to the code that turns a record into its row changes every fingerprint, so
    no mirror row the old code made is taken for what the new code makes."""
    assert decode._seed() == decode.SEED
    raw = raw_parts([user(1)])[0]
    assert fingerprint(raw) != xxhash.xxh3_64_intdigest(raw, decode.SEED + 1) >> 1


async def test_a_worker_reads_the_mirrors_fingerprints_from_the_store(store: Store) -> None:
    with store.write() as conn:
        for sid, fp, source in [("a", 5, "district"), ("b", None, "district"), ("c", 7, "other")]:
            conn.execute(
                text(
                    "INSERT INTO roster_person (source, sourced_id, role, roles, given_name, "
                    "family_name, enabled, org_ids, status, row_hash, fp) VALUES (:src, :sid, "
                    "'student', 'student', '', '', true, '', 'active', 'h', :fp)"
                ),
                {"src": source, "sid": sid, "fp": fp},
            )
    spec = KnownRows.spec(store, "district", 1)
    assert spec is not None and spec.dialect == store.engine.url.get_backend_name()
    assert set(known_fingerprints(spec, "person")) == {5}
    assert 5 in known_fingerprints(spec, "person") and 7 not in known_fingerprints(spec, "person")
    assert len(known_fingerprints(spec, "enrollment")) == 0
    assert "secret" not in repr(KnownSpec("postgresql", "postgresql://u:secret@h/db", "s", 1))


def test_a_worker_that_cannot_read_the_store_leaves_nothing_out(tmp_path: Path) -> None:
    for spec in (
        KnownSpec("sqlite", str(tmp_path / "missing.db"), "district", 1),
        KnownSpec("postgresql", "postgresql://nobody@127.0.0.1:1/none", "district", 2),
        KnownSpec("oracle", "x", "district", 3),
    ):
        assert len(known_fingerprints(spec, "person")) == 0
    assert KnownRows.spec(Store("sqlite://"), "district", 1) is None


async def test_a_closed_connector_starts_no_pool_again(info_logged: None) -> None:
    """A fetch abandoned by its caller may still have a page's task running when the
    connector closes: it starts no pool whose processes would outlive the connector (the
    program then waited for them at exit)."""
    from concurrent.futures import BrokenExecutor

    from structlog.testing import capture_logs

    from tests.connectors.test_oneroster_unit import open_connector

    with capture_logs() as logs:
        async with open_connector(decode_workers=1) as c:
            pool = c._start_pool()
            assert c._start_pool() is pool
    started = [e for e in logs if e["event"] == "decode pool started"]
    assert [(e["workers"], e["fastest_page_ms"]) for e in started] == [(1, None)]
    assert c.closed and c._pool is None
    with pytest.raises(BrokenExecutor, match="closed"):
        c._start_pool()
    assert c._pool is None


def test_the_workers_fingerprint_set_answers_as_a_set_does() -> None:
    """8 bytes a fingerprint instead of a Python set's 117: the same answers, sorted input
    or not, at the ends of the range and for what is not a fingerprint."""
    import random

    from connectors.oneroster.decode import Fingerprints

    rng = random.Random(7)
    values = {rng.getrandbits(63) for _ in range(50_000)} | {0, (1 << 63) - 1, 1 << 47}
    probes = [rng.getrandbits(63) for _ in range(20_000)] + [v + 1 for v in list(values)[:500]]
    from array import array

    givens = (sorted(values), list(values), array("q", sorted(values)), array("q", values))
    for given in givens:
        fps = Fingerprints(given)
        assert len(fps) == len(values) and sorted(fps) == sorted(values)
        assert all(v in fps for v in values)
        assert [p in fps for p in probes] == [p in values for p in probes]
        # A page at a time (fingerprints only, as decode_page makes them): the same answers.
        hashes = [p for p in probes if 0 <= p < 1 << 63]
        assert fps.holds(hashes) == [p in values for p in hashes]
        assert all(fps.holds(sorted(values))) and fps.holds([]) == []
    assert -1 not in fps and 1 << 63 not in fps and "5" not in fps
    assert len(Fingerprints()) == 0 and 0 not in Fingerprints()
    assert Fingerprints().holds([0, (1 << 63) - 1]) == [False, False]


def test_fingerprints_joined_by_the_database_parse_as_ints() -> None:
    """The database joins them with commas (group_concat, string_agg); anything else is an
    error, not a wrong number."""
    from rostersync.source.fingerprints import parse_fingerprints

    values = [0, 1, 1 << 47, (1 << 63) - 1]
    assert parse_fingerprints(",".join(map(str, values))) == values
    assert parse_fingerprints("42") == [42]
    for bad in ("1,,2", "1,x", "1;2", "1]", "[1"):
        with pytest.raises(ValueError, match="comma-separated"):
            parse_fingerprints(bad)


def test_the_fingerprint_slices_cover_the_range_once() -> None:
    from itertools import pairwise

    from rostersync.source.rows import FP_LIMIT, FP_SLICES, fp_slices

    slices = fp_slices()
    assert len(slices) == FP_SLICES and slices[0][0] == 0 and slices[-1][1] == FP_LIMIT - 1
    assert all(high + 1 == low for (_, high), (low, _) in pairwise(slices))
    assert FP_LIMIT - 1 < 1 << 63  # a signed 64-bit column holds every bound

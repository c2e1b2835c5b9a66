"""The group rules of a resync batch, tested on plain values (no database)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from rostersync.resync.groupplan import (
    GroupKey,
    MemberKey,
    MemberValues,
    OwnerPair,
    Wanted,
    credit_changes,
    groups_to_create,
    groups_to_refresh,
    groups_to_rename,
    member_changes,
    owner_changes,
    owners_released,
    wanted_groups,
)

MATHS: GroupKey = ("district", "c-1")
ART: GroupKey = ("district", "c-2")
CSV_MATHS: GroupKey = ("csv", "c-1")

keys = st.tuples(st.sampled_from(["district", "csv"]), st.sampled_from(["c-1", "c-2", "c-3"]))
users = st.integers(min_value=1, max_value=6)
group_ids = st.integers(min_value=1, max_value=8)
member_keys = st.tuples(group_ids, st.sampled_from(["s-1", "s-2", "s-3"]))
member_values = st.tuples(
    st.sampled_from([None, "a@x.org", "b@x.org"]), st.sampled_from(["A", "B"])
)
wanted_rows = st.lists(
    st.tuples(users, keys, st.sampled_from(["Maths", "Art"])).map(
        lambda r: (r[0], r[1][0], r[1][1], r[2])
    ),
    max_size=12,
)


def _wanted(**by_key: tuple[str, set[int]]) -> Wanted:
    titles = {_key(k): title for k, (title, _) in by_key.items()}
    return Wanted(titles, {_key(k): frozenset(u) for k, (_, u) in by_key.items()})


def _key(name: str) -> GroupKey:
    return {"maths": MATHS, "art": ART, "csv_maths": CSV_MATHS}[name]


# -- wanted_groups ------------------------------------------------------------------------------


def test_wanted_groups_collect_each_class_once_with_every_teacher_of_the_batch() -> None:
    """A co-taught class is one wanted group, wanted by both of its teachers."""
    wanted = wanted_groups(
        [(1, "district", "c-1", "Maths"), (2, "district", "c-1", "Maths"), (2, *ART, "Art")]
    )
    assert wanted.titles == {MATHS: "Maths", ART: "Art"}
    assert wanted.wanted_by == {MATHS: {1, 2}, ART: {2}}


def test_wanted_groups_keep_the_last_title_read() -> None:
    """A class read twice (two teachers' rows) takes the title of the later row."""
    wanted = wanted_groups([(1, *MATHS, "Maths"), (2, *MATHS, "Maths II")])
    assert wanted.titles == {MATHS: "Maths II"}


def test_no_rows_want_no_groups() -> None:
    """A batch whose users teach nothing wants no group."""
    assert wanted_groups([]) == Wanted()


def test_classes_by_source_are_sorted_per_source() -> None:
    """The SQL reads wanted classes source by source, each source's classes in order."""
    wanted = wanted_groups([(1, "district", "c-9", "X"), (1, *ART, "Art"), (1, *CSV_MATHS, "M")])
    assert wanted.classes_by_source() == {"csv": ["c-1"], "district": ["c-2", "c-9"]}


@given(wanted_rows)
def test_every_row_is_wanted_by_its_user(rows: list[tuple[int, str, str, str]]) -> None:
    """Each (user, class) row makes the class wanted, by that user, and by no one else."""
    wanted = wanted_groups(rows)
    assert set(wanted.titles) == set(wanted.wanted_by) == {(s, c) for _, s, c, _ in rows}
    for key, who in wanted.wanted_by.items():
        assert who == {u for u, s, c, _ in rows if (s, c) == key}


# -- create and rename -------------------------------------------------------------------------


def test_groups_to_create_are_the_wanted_ones_missing_in_key_order() -> None:
    """Only groups that do not exist are created, in (source, class) order."""
    wanted = _wanted(maths=("Maths", {1}), art=("Art", {1}), csv_maths=("Maths", {2}))
    assert groups_to_create(wanted, {ART}) == [CSV_MATHS, MATHS]
    assert groups_to_create(wanted, {ART, MATHS, CSV_MATHS}) == []


def test_groups_to_rename_are_those_whose_class_title_changed() -> None:
    """A group is renamed when its name is not its class's title any more."""
    wanted = _wanted(maths=("Maths II", {1}), art=("Art", {1}))
    assert groups_to_rename(wanted, {MATHS: "Maths", ART: "Art"}) == [MATHS]
    assert groups_to_rename(wanted, {MATHS: "Maths II", ART: "Art"}) == []


# -- refresh -------------------------------------------------------------------------------------


def test_groups_to_refresh_are_dirty_new_or_of_a_full_refresh_user() -> None:
    """Members are compared in full for a dirty class, a new group, or a manual resync's user."""
    wanted = _wanted(maths=("Maths", {1}), art=("Art", {2}), csv_maths=("Maths", {3}))
    assert groups_to_refresh(wanted, dirty=set(), created=set(), refresh_all=set()) == set()
    assert groups_to_refresh(wanted, dirty={ART}, created=set(), refresh_all=set()) == {ART}
    assert groups_to_refresh(wanted, dirty=set(), created={MATHS}, refresh_all=set()) == {MATHS}
    assert groups_to_refresh(wanted, dirty=set(), created=set(), refresh_all={3}) == {CSV_MATHS}


def test_a_dirty_class_nobody_in_the_batch_wants_is_not_refreshed() -> None:
    """Refreshing is for wanted groups only: a dirty mark of another class stays."""
    wanted = _wanted(maths=("Maths", {1}))
    assert groups_to_refresh(wanted, dirty={ART}, created=set(), refresh_all={1}) == {MATHS}


# -- owners ----------------------------------------------------------------------------------------


def test_owner_changes_add_the_missing_and_drop_the_extra() -> None:
    """Owners become exactly those wanted; both lists come sorted."""
    add, drop = owner_changes({(1, 10), (1, 11), (2, 10)}, {(1, 11), (1, 12), (2, 9)})
    assert add == [(1, 10), (2, 10)]
    assert drop == [(1, 12), (2, 9)]


@given(st.sets(st.tuples(group_ids, users)), st.sets(st.tuples(group_ids, users)))
def test_owner_changes_turn_have_into_want(want: set[OwnerPair], have: set[OwnerPair]) -> None:
    """Applying the changes to the owners held gives the owners wanted, with no wasted write."""
    add, drop = owner_changes(want, have)
    assert (have - set(drop)) | set(add) == want
    assert not set(add) & have
    assert set(drop) <= have
    assert add == sorted(add) and drop == sorted(drop)


# -- members ------------------------------------------------------------------------------------


def test_member_changes_sort_members_into_added_gone_and_updated() -> None:
    """A new student is added, a departed one deleted, a renamed one updated."""
    have: dict[MemberKey, MemberValues] = {(1, "s-1"): ("a@x.org", "A"), (1, "s-2"): (None, "B")}
    want: dict[MemberKey, MemberValues] = {(1, "s-1"): ("a@x.org", "A2"), (2, "s-3"): (None, "C")}
    diff = member_changes(want, have)
    assert diff.added == [(2, "s-3")]
    assert diff.gone == [(1, "s-2")]
    assert diff.updated == [(1, "s-1")]
    assert diff.groups == {1, 2}


def test_unchanged_members_change_nothing() -> None:
    """Members held as wanted (same email and name) write nothing and touch no group."""
    members: dict[MemberKey, MemberValues] = {(1, "s-1"): ("a@x.org", "A")}
    diff = member_changes(members, dict(members))
    assert (diff.added, diff.gone, diff.updated, diff.groups) == ([], [], [], set())


@given(
    st.dictionaries(member_keys, member_values, max_size=10),
    st.dictionaries(member_keys, member_values, max_size=10),
)
def test_member_changes_turn_have_into_want(
    want: dict[MemberKey, MemberValues], have: dict[MemberKey, MemberValues]
) -> None:
    """Inserting, deleting and updating as told gives the members wanted; the groups named
    are exactly those whose members differ."""
    diff = member_changes(want, have)
    after = {k: v for k, v in have.items() if k not in diff.gone}
    after.update({k: want[k] for k in (*diff.added, *diff.updated)})
    assert after == want
    assert not set(diff.added) & set(have)
    differing = {g for g in {k[0] for k in (*want, *have)} if _of(want, g) != _of(have, g)}
    assert diff.groups == differing


def _of(members: dict[MemberKey, MemberValues], gid: int) -> dict[MemberKey, MemberValues]:
    return {k: v for k, v in members.items() if k[0] == gid}


# -- release --------------------------------------------------------------------------------------


def test_a_user_lets_go_of_the_group_of_a_class_they_no_longer_teach() -> None:
    """Owning a group one does not want any more releases it; a co-teacher who still wants it
    keeps theirs."""
    wanted = _wanted(maths=("Maths", {2}))
    released = owners_released(wanted, {MATHS: 7, ART: 8}, {7: {1, 2}, 8: {2}})
    assert released == [(7, 1), (8, 2)]


def test_nothing_is_released_while_every_owner_still_wants_the_group() -> None:
    """Groups wanted by all of the batch's owners stay theirs; unowned groups release nothing."""
    wanted = _wanted(maths=("Maths", {1, 2}))
    assert owners_released(wanted, {MATHS: 7, ART: 8}, {7: {1, 2}}) == []


@given(
    wanted_rows,
    st.dictionaries(keys, group_ids, max_size=6),
    st.dictionaries(group_ids, st.sets(users, max_size=3), max_size=6),
)
def test_released_are_exactly_the_owned_unwanted_groups(
    rows: list[tuple[int, str, str, str]],
    ids: dict[GroupKey, int],
    owned: dict[int, set[int]],
) -> None:
    """A (group, user) is released if and only if the user owns it and does not want it."""
    wanted = wanted_groups(rows)
    expected = {
        (gid, uid)
        for key, gid in ids.items()
        for uid in owned.get(gid, set())
        if uid not in wanted.wanted_by.get(key, frozenset())
    }
    released = owners_released(wanted, ids, owned)
    assert set(released) == expected
    assert released == sorted(released)


# -- credit ---------------------------------------------------------------------------------------


def test_a_created_group_is_credited_to_its_lowest_wanting_user() -> None:
    """The lowest id among the batch users who teach the class gets the creation."""
    wanted = _wanted(maths=("Maths", {3, 2}))
    result = credit_changes([1, 2, 3], wanted, {}, {}, created=[MATHS], updated=[], removed=[])
    assert result == {1: Counter(), 2: Counter(groups_created=1), 3: Counter()}


def test_a_removed_group_is_credited_to_its_lowest_former_owner_in_the_batch() -> None:
    """Nobody wants a removed group: its lowest owner of the batch is credited."""
    result = credit_changes(
        [1, 4, 5], Wanted(), {7: {9, 5, 4}}, {7: ART}, created=[], updated=[], removed=[7]
    )
    assert result[4] == Counter(groups_removed=1)
    assert sum(result.values(), Counter()) == Counter(groups_removed=1)


def test_a_group_with_no_batch_user_behind_it_is_credited_to_the_lowest_user() -> None:
    """An update of a group no batch user wants or owns still counts, once, for the batch."""
    result = credit_changes(
        [6, 5], Wanted(), {7: {9}}, {7: ART}, created=[], updated=[7], removed=[]
    )
    assert result == {5: Counter(groups_updated=1), 6: Counter()}


def test_an_empty_batch_gets_no_counts() -> None:
    """No users, no counters."""
    assert credit_changes([], Wanted(), {}, {}, created=[], updated=[], removed=[]) == {}


@given(
    wanted_rows,
    st.lists(users, min_size=1, max_size=4),
    st.dictionaries(group_ids, st.sets(users, max_size=3), max_size=6),
    st.lists(group_ids, unique=True, max_size=6),
    st.lists(group_ids, unique=True, max_size=6),
)
def test_every_change_is_credited_once_to_a_user_of_the_batch(
    rows: list[tuple[int, str, str, str]],
    batch: list[int],
    owned: dict[int, set[int]],
    updated: list[int],
    removed: list[int],
) -> None:
    """The batch's counts add up to its changes, every user has a counter, and a group that
    a batch user wants is credited to one of those who want it."""
    rows = [r for r in rows if r[0] in batch]  # the SQL only reads the batch's users
    wanted = wanted_groups(rows)
    key_of = {gid: ("district", f"c-{gid}") for gid in {*updated, *removed}}
    created = sorted(wanted.titles)
    result = credit_changes(
        batch, wanted, owned, key_of, created=created, updated=updated, removed=removed
    )
    assert set(result) == set(batch)
    total = sum(result.values(), Counter())
    expected = {"groups_created": len(created), "groups_updated": len(updated)}
    assert total == Counter({**expected, "groups_removed": len(removed)})
    for key in created:
        lowest = min(wanted.wanted_by[key])
        assert result[lowest]["groups_created"] >= 1

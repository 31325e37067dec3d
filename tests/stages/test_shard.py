"""Shard K/N: parsing with clear errors, a deterministic disjoint cover of the items, nnU-Net's option pair."""

from __future__ import annotations

import random

import pytest

from pipeline.stages.shard import Shard, owners, shard_from_options


def test_parse_and_str():
    assert Shard.parse("2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    assert Shard.parse(" 0 / 1 ") == Shard(0, 1)


@pytest.mark.parametrize("text, message", [
    ("3/3", r"K must be in 0..2"),
    ("-1/2", r"K must be in 0..1"),
    ("1/0", r"N must be at least 1"),
    ("x", r"expected K/N, e.g. 0/4"),
    ("1/2/3", r"expected K/N"),
    ("", r"expected K/N"),
])
def test_bad_specs(text, message):
    with pytest.raises(ValueError, match=message):
        Shard.parse(text)


def test_select_is_sorted_strided():
    ids = ["c", "a", "e", "b", "d"]
    assert Shard(0, 2).select(ids) == ["a", "c", "e"] and Shard(1, 2).select(ids) == ["b", "d"]
    assert Shard(3, 4).select(ids) == ["d"] and Shard(0, 1).select(ids) == sorted(ids)
    assert Shard(6, 7).select(ids) == []  # more shards than items: the last ones are empty
    pairs = [("b", 1), ("a", 2)]
    assert Shard(0, 2).select(pairs, key=lambda p: p[0]) == [("a", 2)]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 11, 12])
def test_shards_cover_every_item_once_whatever_the_input_order(n):
    ids = [f"case_{i:03d}" for i in range(11)]
    shuffled = random.Random(n).sample(ids, len(ids))
    parts = [Shard(k, n).select(shuffled) for k in range(n)]
    assert sorted(sum(parts, [])) == ids  # disjoint and complete
    assert parts == [Shard(k, n).select(ids) for k in range(n)]  # the listing order does not matter
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(cid in Shard(k, n).select(ids) for cid, k in ((c, s.index) for c, s in owners(ids, n).items()))


def test_shard_from_options():
    assert shard_from_options(None, None, None) is None
    assert shard_from_options("1/3", None, None) == Shard(1, 3)
    assert shard_from_options(None, 1, 3) == Shard(1, 3)
    assert shard_from_options(None, None, 3, parts_alone=True) is None  # merge --num-parts 3
    with pytest.raises(ValueError, match="go together"):
        shard_from_options(None, None, 3)
    with pytest.raises(ValueError, match="go together"):
        shard_from_options(None, 1, None)
    with pytest.raises(ValueError, match="not both"):
        shard_from_options("1/3", 1, 3)
    with pytest.raises(ValueError, match="--num-parts 0: N must be at least 1"):
        shard_from_options(None, 0, 0)
    with pytest.raises(ValueError, match="K must be in 0..2"):
        shard_from_options(None, 3, 3)

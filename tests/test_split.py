"""utils/data/split.py: the seeded split the converters make for datasets without split lists."""
from __future__ import annotations

import pytest

from utils.data.split import check_fractions, seeded_split, split_sizes
from utils.errors import UserError

NAMES = [f"img_{i:03d}" for i in range(40)]


@pytest.mark.parametrize("fractions,problem", [
    ((0.7, 0.2, 0.2), "sum to 1.1, not 1"),
    ((0.5, 0.5), "three fractions"),
    ((1.2, -0.2, 0), "between 0 and 1"),
    ((0, 0, 1), "needs a train or a val split"),
    ((float("nan"), 0.5, 0.5), "between 0 and 1"),
])
def test_bad_fractions_are_user_errors(fractions, problem):
    with pytest.raises(UserError, match=problem):
        check_fractions(fractions)


def test_same_seed_same_split_whatever_the_listing_order():
    first = seeded_split(NAMES, (0.7, 0.15, 0.15), seed=5)
    assert seeded_split(list(reversed(NAMES)), (0.7, 0.15, 0.15), seed=5) == first
    assert seeded_split(NAMES, (0.7, 0.15, 0.15), seed=6) != first
    assert {k: len(v) for k, v in first.items()} == {"train": 28, "val": 6, "test": 6}
    together = first["train"] + first["val"] + first["test"]
    assert sorted(together) == NAMES  # disjoint and complete


def test_zero_fraction_means_no_such_split():
    split = seeded_split(NAMES, (0.8, 0.2, 0), seed=0)
    assert list(split) == ["train", "val"] and len(split["val"]) == 8


def test_small_datasets_still_fill_every_asked_split():
    assert split_sizes(3, (0.7, 0.15, 0.15)) == [1, 1, 1]
    assert split_sizes(5, (0.7, 0.15, 0.15)) == [3, 1, 1]
    assert split_sizes(2, (0.7, 0.15, 0.15)) == [1, 1, 0]  # too few: the test split is not made
    assert list(seeded_split(["a", "b"], (0.7, 0.15, 0.15), seed=0)) == ["train", "val"]
    assert sum(split_sizes(1001, (0.7, 0.15, 0.15))) == 1001

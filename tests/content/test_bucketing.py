"""Bucketing (rules.md, "Bucketing"): a public contract, so every expected value here is computed by hand
or by the formula written out again with mmh3 (factories.independent_bucket), never by the engine."""

from __future__ import annotations

import pytest
from factories import independent_bucket

from content.bucketing import arm_thresholds, bucket, in_rollout, pick_arm, rollout_threshold

# -- bucket(S, U) -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("salt", "unit", "expected"),
    [
        ("new-hero-rules", "u-1", 635),
        ("new-hero-rules", "u-2", 98),
        ("hero-spring", "u-1", 5645),
        ("hero-spring", "a-42", 8994),
        ("f-0", "u-0", 9770),
        ("ü-flag", "user-ß", 7503),  # UTF-8 bytes, not code points or Latin-1
    ],
)
def test_bucket_reproduces_the_test_vectors_of_rules_md(salt: str, unit: str, expected: int) -> None:
    assert bucket(salt, unit) == expected
    assert independent_bucket(salt, unit) == expected


def test_bucket_is_unsigned_and_in_0_to_9999_for_many_units() -> None:
    # given 2,000 units  # when bucketed  # then every bucket is the formula's, in 0..9999
    for i in range(2_000):
        b = bucket("salt", f"u-{i}")
        assert 0 <= b <= 9_999
        assert b == independent_bucket("salt", f"u-{i}")


def test_bucket_joins_salt_and_unit_with_a_slash() -> None:
    # "a/b" + "/" + "c" and "a" + "/" + "b/c" are the same bytes, so the same bucket
    assert bucket("a/b", "c") == bucket("a", "b/c") == independent_bucket("a", "b/c")


# -- rollouts: bucket < round(P * 100) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("percentage", "threshold"),
    [
        (0, 0),
        (100, 10_000),
        (25.5, 2_550),
        (0.01, 1),
        (0.29, 29),  # 0.29 * 100 is 28.999999999999996 in binary floating point
        (33.33, 3_333),
        (99.99, 9_999),
        (50, 5_000),
    ],
)
def test_rollout_threshold_is_round_p_times_100(percentage: float, threshold: int) -> None:
    assert rollout_threshold(percentage) == threshold


def test_rollout_is_on_when_the_bucket_is_one_below_the_threshold_and_off_at_the_threshold() -> None:
    # given u-1, whose bucket for new-hero-rules is 635 (rules.md test vector)
    assert independent_bucket("new-hero-rules", "u-1") == 635
    # when the threshold is 636 (P = 6.36): 635 < 636, on
    assert in_rollout("new-hero-rules", "u-1", 6.36)
    # when the threshold is 635 (P = 6.35): 635 < 635 is false, off
    assert not in_rollout("new-hero-rules", "u-1", 6.35)
    # and far on either side
    assert in_rollout("new-hero-rules", "u-1", 25.5)
    assert not in_rollout("new-hero-rules", "u-1", 6.34)


@pytest.mark.parametrize(
    ("salt", "unit", "bucket_of_unit"),
    [("rollout-edge", "u-17151", 0), ("rollout-edge", "u-2222", 1), ("rollout-edge", "u-372", 9_999)],
)
def test_rollout_boundaries_at_the_extreme_buckets(salt: str, unit: str, bucket_of_unit: int) -> None:
    # given a unit whose bucket was found with the formula written out again
    b = independent_bucket(salt, unit)
    assert b == bucket_of_unit
    # then P = b/100 leaves it out (b < b is false) and P = (b+1)/100 takes it in
    assert not in_rollout(salt, unit, b / 100)
    assert in_rollout(salt, unit, (b + 1) / 100)


def test_a_rollout_of_0_01_percent_takes_only_bucket_0() -> None:
    assert in_rollout("rollout-edge", "u-17151", 0.01)  # bucket 0 < 1
    assert not in_rollout("rollout-edge", "u-2222", 0.01)  # bucket 1 < 1 is false


def test_rollout_0_is_off_and_100_is_on_for_every_unit() -> None:
    assert not in_rollout("rollout-edge", "u-17151", 0)  # even bucket 0: 0 < 0 is false
    assert in_rollout("rollout-edge", "u-372", 100)  # even bucket 9999: 9999 < 10000


@pytest.mark.parametrize(("percentage", "inside"), [(100, True), (99.99, False), (50, False), (0, False)])
def test_a_viewer_without_a_unit_is_inside_only_a_rollout_of_100(percentage: float, inside: bool) -> None:
    assert in_rollout("any-flag", None, percentage) is inside


@pytest.mark.parametrize("percentage", [0, 0.01, 12.34, 25.5, 33.33, 50, 66.67, 99.99, 100])
def test_in_rollout_matches_the_formula_for_10000_generated_units(percentage: float) -> None:
    # given 10,000 units and the threshold worked out by hand as an integer number of hundredths
    hundredths = round(percentage * 100)
    units = [f"unit-{i}" for i in range(10_000)]
    # when each is checked  # then each answer is bucket < threshold, computed independently
    inside = [u for u in units if in_rollout("prop-flag", u, percentage)]
    assert inside == [u for u in units if independent_bucket("prop-flag", u) < hundredths]
    # and the share inside is close to P (a sanity check of uniformity, not the contract)
    assert abs(len(inside) / 100 - percentage) < 2


# -- experiments: the first arm with b < floor(10000 * cum / total) -----------------------------------


@pytest.mark.parametrize(
    ("weights", "thresholds"),
    [
        ([1], [10_000]),
        ([50, 50], [5_000, 10_000]),
        ([1, 2], [3_333, 10_000]),  # floor(10000 / 3) = 3333
        ([2, 1], [6_666, 10_000]),  # floor(20000 / 3) = 6666
        ([1, 1, 1], [3_333, 6_666, 10_000]),
        ([3, 7], [3_000, 10_000]),
        ([1, 1, 1, 1, 1, 1, 1], [1_428, 2_857, 4_285, 5_714, 7_142, 8_571, 10_000]),
    ],
)
def test_arm_thresholds_are_floor_of_10000_times_the_cumulative_share(
    weights: list[int], thresholds: list[int]
) -> None:
    assert arm_thresholds(weights) == thresholds


def test_arm_choice_at_the_boundary_bucket_with_uneven_weights() -> None:
    # given weights 1, 2: thresholds 3333 and 10000
    assert independent_bucket("exp-split", "u-3366") == 3_332
    assert independent_bucket("exp-split", "u-15095") == 3_333
    # then bucket 3332 < 3333 takes the first arm, and bucket 3333 the second
    assert pick_arm("exp-split", "u-3366", [1, 2]) == 0
    assert pick_arm("exp-split", "u-15095", [1, 2]) == 1


def test_arm_choice_at_the_extreme_buckets() -> None:
    assert independent_bucket("exp-split", "u-17241") == 0
    assert independent_bucket("exp-split", "u-3912") == 9_999
    assert pick_arm("exp-split", "u-17241", [1, 1, 1]) == 0
    assert pick_arm("exp-split", "u-3912", [1, 1, 1]) == 2


def test_pick_arm_matches_the_formula_for_10000_generated_units() -> None:
    weights = [1, 2, 3]
    cumulative = [1, 3, 6]
    for i in range(10_000):
        unit = f"unit-{i}"
        b = independent_bucket("exp-prop", unit)
        expected = next(n for n, cum in enumerate(cumulative) if b < 10_000 * cum // 6)
        assert pick_arm("exp-prop", unit, weights) == expected

"""Flags with scheduled ramps (issue 4): the rollout in force at `now` is the last step whose `at`
has come, buckets never move, and a ramp that is not in time order is rejected at its path."""

from __future__ import annotations

from typing import Any

import pytest
from factories import evaluation, independent_bucket, paths_of, snapshot, t, viewer

RAMP: dict[str, Any] = {
    "key": "new-checkout",
    "enabled": True,
    "rollout": 5,
    "steps": [
        {"at": "2026-12-01T09:00:00Z", "rollout": 25},
        {"at": "2026-12-08T09:00:00Z", "rollout": 50},
        {"at": "2026-12-15T09:00:00Z", "rollout": 100},
    ],
}


def rollout_in_force(at: str) -> float:
    return snapshot(flags=[RAMP]).flags["new-checkout"].rollout_at(t(at))


@pytest.mark.parametrize(
    ("at", "rollout"),
    [
        ("2026-11-30T00:00:00+00:00", 5),  # before the first step: the flag's own rollout
        ("2026-12-01T08:59:59.999999+00:00", 5),
        ("2026-12-01T09:00:00+00:00", 25),  # a step takes effect at its instant (at <= now)
        ("2026-12-08T08:59:59+00:00", 25),
        ("2026-12-08T09:00:00+00:00", 50),
        ("2026-12-15T09:00:00+00:00", 100),
        ("2027-06-01T00:00:00+00:00", 100),
    ],
)
def test_the_rollout_in_force_is_the_last_step_that_has_come(at: str, rollout: float) -> None:
    assert rollout_in_force(at) == rollout


def test_a_viewer_in_at_25_percent_stays_in_at_50_percent_over_10000_units() -> None:
    # Given the same snapshot, evaluated on each side of the 50% step
    snap = snapshot(flags=[RAMP])
    at_25, at_50 = t("2026-12-01T09:00:00+00:00"), t("2026-12-08T09:00:00+00:00")
    units = [f"unit-{i}" for i in range(10_000)]

    # When every unit is evaluated at 25% and at 50%
    inside_25 = {u for u in units if evaluation(snap, viewer(at=at_25, user_id=u)).flag("new-checkout").enabled}
    inside_50 = {u for u in units if evaluation(snap, viewer(at=at_50, user_id=u)).flag("new-checkout").enabled}

    # Then buckets are fixed: the 25% are a subset of the 50%, each exactly by the formula
    assert inside_25 <= inside_50
    assert inside_25 == {u for u in units if independent_bucket("new-checkout", u) < 2500}
    assert inside_50 == {u for u in units if independent_bucket("new-checkout", u) < 5000}


def test_the_trace_names_the_rollout_in_force() -> None:
    snap = snapshot(flags=[RAMP])
    unit = next(f"u-{i}" for i in range(1000) if 500 <= independent_bucket("new-checkout", f"u-{i}") < 2500)

    before = evaluation(snap, viewer(at=t("2026-11-30T00:00:00+00:00"), user_id=unit)).flag("new-checkout")
    after = evaluation(snap, viewer(at=t("2026-12-01T09:00:00+00:00"), user_id=unit)).flag("new-checkout")

    assert (before.enabled, before.reason) == (False, "SPLIT")
    assert "(5% rollout)" in before.detail
    assert (after.enabled, after.reason) == (True, "SPLIT")
    assert "(25% rollout)" in after.detail


@pytest.mark.parametrize(
    ("steps", "paths"),
    [
        pytest.param(
            [{"at": "2026-12-08T09:00:00Z", "rollout": 50}, {"at": "2026-12-01T09:00:00Z", "rollout": 25}],
            ["flags[0].steps[1].at"],
            id="unsorted",
        ),
        pytest.param(
            [{"at": "2026-12-01T09:00:00Z", "rollout": 25}, {"at": "2026-12-01T09:00:00Z", "rollout": 50}],
            ["flags[0].steps[1].at"],
            id="same-instant-twice",
        ),
        pytest.param([{"at": "soon", "rollout": 25}], ["flags[0].steps[0].at"], id="bad-instant"),
        pytest.param([{"at": "2026-12-01T09:00:00Z", "rollout": 150}], ["flags[0].steps[0].rollout"], id="over-100"),
        pytest.param([{"at": "2026-12-01T09:00:00Z", "rollout": 2.555}], ["flags[0].steps[0].rollout"], id="decimals"),
        pytest.param([{"at": "2026-12-01T09:00:00Z"}], ["flags[0].steps[0].rollout"], id="no-rollout"),
        pytest.param(
            [{"at": "2026-12-01T09:00:00Z", "rollout": 5, "when": "now"}], ["flags[0].steps[0].when"], id="extra-key"
        ),
        pytest.param({"at": "2026-12-01T09:00:00Z", "rollout": 5}, ["flags[0].steps"], id="not-a-list"),
    ],
)
def test_a_bad_ramp_is_rejected_at_its_path(steps: Any, paths: list[str]) -> None:
    assert paths_of(flags=[{"key": "f", "enabled": True, "steps": steps}]) == paths


def test_a_ramp_in_order_is_valid() -> None:
    assert paths_of(flags=[RAMP]) == []


UNITS_100K = [f"user-{i}" for i in range(100_000)]


@pytest.mark.parametrize("rollout", [1, 5, 25.5, 50, 75.25, 99.99])
def test_over_100000_units_a_rollout_lands_within_half_a_point_and_follows_the_formula(rollout: float) -> None:
    # Given a flag at `rollout` percent and 100,000 units
    snap = snapshot(flags=[{"key": "f-ramp", "enabled": True, "rollout": rollout, "salt": "s-1"}])
    threshold = round(rollout * 100)

    # When each unit is evaluated
    inside = [u for u in UNITS_100K if evaluation(snap, viewer(user_id=u)).flag("f-ramp").enabled]

    # Then every unit is in exactly when the formula says, and the share is within +-0.5 points
    assert set(inside) == {u for u in UNITS_100K if independent_bucket("s-1", u) < threshold}
    assert abs(len(inside) / len(UNITS_100K) * 100 - rollout) <= 0.5


@pytest.mark.parametrize("weights", [[1, 1], [1, 2, 3], [10, 90], [33, 33, 34]])
def test_over_100000_units_an_arm_split_lands_within_half_a_point_and_follows_the_formula(weights: list[int]) -> None:
    # Given an experiment with these weights
    arms = [{"key": f"arm-{i}", "weight": w, "fields": {}} for i, w in enumerate(weights)]
    block = {"key": "b", "type": "hero", "status": "published", "fields": {},
             "variants": [{"key": "x", "experiment": "exp-1", "arms": arms}]}  # fmt: skip
    snap = snapshot(blocks=[block])
    total = sum(weights)
    thresholds = [10_000 * sum(weights[: i + 1]) // total for i in range(len(weights))]

    # When each unit gets its arm
    chosen = {}
    for unit in UNITS_100K:
        resolved = evaluation(snap, viewer(user_id=unit)).block("b")
        assert resolved is not None
        chosen[unit] = resolved.decision.variant

    # Then the arm is the first with bucket < floor(10000 * cumulative / total), computed independently
    for unit, arm in chosen.items():
        b = independent_bucket("exp-1", unit)
        assert arm == f"arm-{next(i for i, limit in enumerate(thresholds) if b < limit)}"
    for i, weight in enumerate(weights):
        share = sum(1 for arm in chosen.values() if arm == f"arm-{i}") / len(UNITS_100K) * 100
        assert abs(share - weight / total * 100) <= 0.5

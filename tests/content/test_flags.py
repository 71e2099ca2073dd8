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

"""Experiments end to end (issue 4): every delivery of an arm records one exposure per viewer per
experiment, and experimentResults counts exposures and conversions per arm."""

from __future__ import annotations

from typing import Any

import mmh3
import pytest
from fixtures_app import RunningApp

from content.experiments import ArmCounts, analyse

BUNDLE: dict[str, Any] = {
    "version": 1,
    "placements": [{"key": "home", "limit": 1}],
    "experiments": [
        {"key": "hero-test", "goal": {"event": "purchase", "where": {"value": {"op": "gte", "value": 10}}}}
    ],
    "blocks": [
        {
            "key": "hero",
            "type": "hero",
            "status": "published",
            "placements": [{"key": "home"}],
            "fields": {"title": "Hello"},
            "variants": [
                {
                    "key": "test",
                    "experiment": "hero-test",
                    "arms": [
                        {"key": "control", "weight": 1, "fields": {}},
                        {"key": "bold", "weight": 1, "fields": {"title": "HELLO"}},
                    ],
                }
            ],
        }
    ],
}
PLACEMENT = 'query ($v: ViewerInput) { placement(key: "home", viewer: $v) { blocks { variant } } }'
RESULTS = """query ($k: String!) { experimentResults(key: $k) {
  exposed sampleRatioMismatch srmPValue
  arms { arm weight exposed converted conversionRate uplift pValue ciLow ciHigh } } }"""
TRACK = "mutation ($e: [EventInput!]!) { track(events: $e) { accepted rejected errors } }"
USERS = [f"u-{i}" for i in range(60)]


def arm_of(unit: str) -> str:
    # rules.md: bucket(experiment key, unit) < floor(10000 * 1/2) -> the first arm
    return "control" if mmh3.hash(f"hero-test/{unit}".encode(), 0, signed=False) % 10000 < 5000 else "bold"


async def setup(app: RunningApp) -> None:
    reply = await app.admin("mutation ($b: JSON!) { importBundle(bundle: $b) { ok errors { path message } } }",
                            {"b": BUNDLE})  # fmt: skip
    assert reply.data["importBundle"]["ok"], reply.body


async def results(app: RunningApp) -> dict[str, Any]:
    reply = await app.admin(RESULTS, {"k": "hero-test"})
    assert reply.errors == [], reply.body
    data: dict[str, Any] = reply.data["experimentResults"]
    return data


async def test_exposures_and_conversions_per_arm(app: RunningApp) -> None:
    # Given 60 viewers who each see the hero twice, and a preview of it that must not count
    await setup(app)
    for user in USERS:
        for _ in range(2):
            reply = await app.graphql(PLACEMENT, {"v": {"userId": user}})
            assert reply.data["placement"]["blocks"][0]["variant"] == arm_of(user)
    await app.graphql(PLACEMENT, {"v": {"userId": "u-preview"}}, key="preview")

    # When every third viewer buys for 25 after exposure, every fifth buys for 5 (not a goal), and one
    # viewer who was never exposed buys too
    app.clock.advance(minutes=5)
    events = [{"type": "purchase", "userId": u, "properties": {"value": 25}} for u in USERS[::3]]
    events += [{"type": "purchase", "userId": u, "properties": {"value": 5}} for u in USERS[1::5]]
    events += [{"type": "purchase", "userId": "u-never", "properties": {"value": 99}}]
    assert (await app.graphql(TRACK, {"e": events})).data["track"]["rejected"] == 0

    # Then each arm counts each exposed viewer once and the goal conversions after exposure
    report = await results(app)
    expected_exposed = {arm: sum(arm_of(u) == arm for u in USERS) for arm in ("control", "bold")}
    expected_converted = {arm: sum(arm_of(u) == arm for u in USERS[::3]) for arm in ("control", "bold")}
    arms = {a["arm"]: a for a in report["arms"]}
    assert report["exposed"] == len(USERS)
    assert {k: a["exposed"] for k, a in arms.items()} == expected_exposed
    assert {k: a["converted"] for k, a in arms.items()} == expected_converted
    # and the statistics are content.experiments' on those counts
    analysis = analyse(
        [ArmCounts(arm, 1, expected_exposed[arm], expected_converted[arm]) for arm in ("control", "bold")]
    )
    assert arms["bold"]["pValue"] == pytest.approx(analysis.arms[1].p_value)
    assert arms["bold"]["ciLow"] == pytest.approx(analysis.arms[1].ci_low)
    assert arms["bold"]["uplift"] == pytest.approx(analysis.arms[1].uplift)
    assert report["srmPValue"] == pytest.approx(analysis.srm_p_value)


async def test_a_purchase_before_the_first_exposure_is_no_conversion(app: RunningApp) -> None:
    await setup(app)
    await app.graphql(TRACK, {"e": [{"type": "purchase", "userId": "u-1", "properties": {"value": 50}}]})
    app.clock.advance(seconds=1)
    await app.graphql(PLACEMENT, {"v": {"userId": "u-1"}})

    arms = {a["arm"]: a for a in (await results(app))["arms"]}

    assert arms[arm_of("u-1")]["exposed"] == 1
    assert arms[arm_of("u-1")]["converted"] == 0


async def test_a_lopsided_split_is_flagged_as_a_sample_ratio_mismatch(app: RunningApp) -> None:
    # Given exposures recorded 400 to 250 for a 50/50 experiment (imported as exposure events)
    await setup(app)
    exposures = [
        {"id": f"exposure:hero-test:x-{i}", "type": "$exposure:hero-test", "userId": f"x-{i}",
         "at": "2026-11-20T11:00:00Z", "properties": {"experiment": "hero-test", "arm": arm, "unit": f"x-{i}"}}
        for i, arm in enumerate(["control"] * 400 + ["bold"] * 250)
    ]  # fmt: skip
    reply = await app.admin("mutation ($b: JSON!) { importBundle(bundle: $b) { ok events } }",
                            {"b": {"version": 1, "events": exposures}})  # fmt: skip
    assert reply.data["importBundle"]["events"] == 650

    # Then chi-square = 2 * 75^2 / 325 = 34.6 (p ~ 4e-9) flags it
    report = await results(app)
    assert report["sampleRatioMismatch"] is True
    assert report["srmPValue"] < 1e-6


async def test_an_unknown_experiment_has_no_results(app: RunningApp) -> None:
    reply = await app.admin(RESULTS, {"k": "nope"})
    assert reply.data == {"experimentResults": None}

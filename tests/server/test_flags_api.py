"""Flags through the admin and delivery APIs (issue 4): ramps take effect at their instants, a kill
switch at once, and bad ramps are rejected at their JSON path with nothing saved."""

from __future__ import annotations

from typing import Any

import mmh3
from fixtures_app import RunningApp

CREATE = """mutation ($i: FlagInput!) { createFlag(input: $i) { ok errors { path message code } } }"""
UPDATE = """mutation ($k: String!, $i: FlagPatch!) { updateFlag(key: $k, input: $i) { ok errors { path message } } }"""
FLAGS = "{ flags { key rollout steps document } }"
VIEWER = "query ($v: ViewerInput!) { viewer(viewer: $v) { flags { key enabled reason } } }"
STEPS: list[dict[str, Any]] = [
    {"at": "2026-11-20T13:00:00Z", "rollout": 50},
    {"at": "2026-11-20T14:00:00Z", "rollout": 100},
]


def bucket(unit: str) -> int:
    return mmh3.hash(f"checkout/{unit}".encode(), 0, signed=False) % 10000


async def flag_for(app: RunningApp, unit: str) -> tuple[bool, str]:
    reply = await app.graphql(VIEWER, {"v": {"userId": unit}})
    value = next(f for f in reply.data["viewer"]["flags"] if f["key"] == "checkout")
    return value["enabled"], value["reason"]


async def test_a_ramp_moves_the_rollout_at_each_step(app: RunningApp) -> None:
    # Given a flag at 10% that ramps to 50% at 13:00 and 100% at 14:00 (the clock is at 12:00)
    reply = await app.admin(CREATE, {"i": {"key": "checkout", "enabled": True, "rollout": 10, "steps": STEPS}})
    assert reply.data["createFlag"]["ok"], reply.body
    unit = next(u for u in (f"u-{i}" for i in range(1000)) if 1000 <= bucket(u) < 5000)  # out at 10%, in at 50%

    # Then it follows the ramp as the clock passes each step
    assert await flag_for(app, unit) == (False, "SPLIT")
    app.clock.advance(hours=1)
    assert await flag_for(app, unit) == (True, "SPLIT")
    app.clock.advance(hours=1)
    assert await flag_for(app, unit) == (True, "STATIC")


async def test_a_kill_switch_takes_effect_on_the_next_query(app: RunningApp) -> None:
    await app.admin(CREATE, {"i": {"key": "checkout", "enabled": True}})
    assert await flag_for(app, "u-1") == (True, "STATIC")

    reply = await app.admin(UPDATE, {"k": "checkout", "i": {"enabled": False}})

    assert reply.data["updateFlag"]["ok"]
    assert await flag_for(app, "u-1") == (False, "DISABLED")


async def test_bad_flags_are_rejected_at_their_paths_and_nothing_is_saved(app: RunningApp) -> None:
    # Given a valid flag
    await app.admin(CREATE, {"i": {"key": "checkout", "enabled": True, "rollout": 10}})
    before = (await app.admin(FLAGS)).data

    # When updates carry an unsorted ramp, a rollout over 100, and a step with three decimals
    unsorted = await app.admin(UPDATE, {"k": "checkout", "i": {"steps": list(reversed(STEPS))}})
    too_big = await app.admin(UPDATE, {"k": "checkout", "i": {"rollout": 100.5}})
    decimals = await app.admin(
        UPDATE, {"k": "checkout", "i": {"steps": [{"at": "2026-12-01T00:00:00Z", "rollout": 12.345}]}}
    )

    # Then each is rejected at its path, and the flag is as it was
    assert [e["path"] for e in unsorted.data["updateFlag"]["errors"]] == ["input.steps[1].at"]
    assert [e["path"] for e in too_big.data["updateFlag"]["errors"]] == ["input.rollout"]
    assert [e["path"] for e in decimals.data["updateFlag"]["errors"]] == ["input.steps[0].rollout"]
    assert (await app.admin(FLAGS)).data == before

"""Several instances on one database: a change made through one is served by the others, over the
Redis bus (PostgreSQL + Redis) or, in the embedded mode, through the version poll of the SQLite file."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from fixtures_app import FakeClock, RunningApp, running_app

from server import migrate
from server.cli import DEMO_BUNDLE

TIMEOUT = 5.0  # generous: the bus delivers in milliseconds, the embedded poll runs every second
TESSERA = Path(sys.executable).with_name("tessera")
VIEWERS = [f"u-{i}" for i in range(40)]

BUNDLE: dict[str, Any] = {
    "version": 1,
    "placements": [{"key": "home", "limit": 5}],
    "flags": [{"key": "new-checkout", "enabled": True, "rollout": 30}],
    "experiments": [{"key": "hero-test"}],
    "blocks": [
        {
            "key": "hero",
            "type": "hero",
            "status": "published",
            "placements": [{"key": "home", "priority": 10}],
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

VIEWER_QUERY = """
query ($viewer: ViewerInput!) {
  viewer(viewer: $viewer) { flags { key enabled variant reason } }
  placement(key: "home", viewer: $viewer) { blocks { key variant fields decision { reason experiment } } }
}
"""


async def served(app: RunningApp, version: int) -> None:
    """Return once ``app`` serves content ``version`` (or later); fail after TIMEOUT."""
    holder = app.services.snapshots
    async with holder.changed:
        await asyncio.wait_for(holder.changed.wait_for(lambda: holder.current.version >= version), TIMEOUT)


async def admin_ok(app: RunningApp, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    reply = await app.admin(query, variables)
    assert (reply.status, reply.errors) == (200, []), reply.body
    [payload] = reply.data.values()
    assert payload["ok"], payload
    return dict(payload)


async def decisions(app: RunningApp) -> dict[str, Any]:
    """What ``app`` decides for every test viewer."""
    answers = {}
    for user_id in VIEWERS:
        reply = await app.graphql(VIEWER_QUERY, {"viewer": {"userId": user_id}})
        assert (reply.status, reply.errors) == (200, []), reply.body
        answers[user_id] = reply.data
    return answers


def flag_of(answer: dict[str, Any]) -> dict[str, Any]:
    [flag] = [f for f in answer["viewer"]["flags"] if f["key"] == "new-checkout"]
    return dict(flag)


@pytest.fixture
async def two_instances(
    postgres_url: str, _empty_postgres: None, redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RunningApp, RunningApp]]:
    # The poll would carry changes too, a second later; turned off, only the bus can.
    monkeypatch.setenv("TESSERA_VERSION_POLL_SECONDS", "3600")
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_app(postgres_url, redis_url=redis_url, redis_prefix=redis_prefix))
        b = await stack.enter_async_context(running_app(postgres_url, redis_url=redis_url, redis_prefix=redis_prefix))
        assert a.services.settings.version_poll_seconds == b.services.settings.version_poll_seconds == 3600
        yield a, b


async def test_changes_made_on_one_instance_are_served_by_the_other(
    two_instances: tuple[RunningApp, RunningApp],
) -> None:
    a, b = two_instances

    # Given a bundle imported through instance A
    result = await admin_ok(
        a, "mutation ($b: JSON!) { importBundle(bundle: $b) { ok version errors { path message } } }", {"b": BUNDLE}
    )
    assert a.services.snapshots.current.version == result["version"] == 1
    await served(b, 1)

    # then both decide alike: the same flag values and the same arms for every viewer.
    on_a, on_b = await decisions(a), await decisions(b)
    assert on_a == on_b
    enabled = {flag_of(answer)["enabled"] for answer in on_b.values()}
    arms = {answer["placement"]["blocks"][0]["variant"] for answer in on_b.values()}
    assert enabled == {True, False}, "a 30% rollout splits 40 viewers"
    assert arms == {"control", "bold"}
    assert {flag_of(answer)["reason"] for answer in on_b.values()} == {"SPLIT"}

    # When the rollout goes to 100% on A, B turns the flag on for everyone.
    await admin_ok(a, 'mutation { updateFlag(key: "new-checkout", input: {rollout: 100}) { ok errors { path } } }')
    await served(b, a.services.snapshots.current.version)
    on_a, on_b = await decisions(a), await decisions(b)
    assert on_a == on_b
    assert {(flag_of(x)["enabled"], flag_of(x)["reason"]) for x in on_b.values()} == {(True, "STATIC")}

    # When the kill switch is thrown on A, B turns it off for everyone.
    await admin_ok(a, 'mutation { updateFlag(key: "new-checkout", input: {enabled: false}) { ok errors { path } } }')
    await served(b, a.services.snapshots.current.version)
    on_a, on_b = await decisions(a), await decisions(b)
    assert on_a == on_b
    assert {(flag_of(x)["enabled"], flag_of(x)["variant"], flag_of(x)["reason"]) for x in on_b.values()} == {
        (False, "off", "DISABLED")
    }

    # When a new block is published on A, B serves it.
    await admin_ok(
        a,
        """mutation { createBlock(input: {key: "promo", type: "banner", placements: [{key: "home", priority: 50}],
                                          fields: {text: "Free shipping"}}) { ok errors { path message } } }""",
    )
    await admin_ok(a, 'mutation { publishBlock(key: "promo") { ok errors { path message } } }')
    await served(b, a.services.snapshots.current.version)
    on_a, on_b = await decisions(a), await decisions(b)
    assert on_a == on_b
    promo = on_b["u-0"]["placement"]["blocks"][0]
    assert (promo["key"], promo["fields"]) == ("promo", {"text": "Free shipping"})
    assert a.services.snapshots.current.version == b.services.snapshots.current.version


async def tessera(*args: str | Path, cwd: Path, **settings: str) -> tuple[int, str]:
    """Run the CLI as a user would, with only the given TESSERA_* settings; (exit code, output)."""
    if not TESSERA.exists():
        pytest.fail(f"the tessera console script is missing at {TESSERA}: install the project (make install)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update({f"TESSERA_{name.upper()}": value for name, value in settings.items()})
    process = await asyncio.create_subprocess_exec(
        TESSERA,
        *map(str, args),
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)  # a bound on a hung process
    assert process.returncode is not None
    return process.returncode, out.decode()


HERO_QUERY = """
query ($viewer: ViewerInput) {
  placement(key: "home-hero", viewer: $viewer) { blocks { key variant decision { rule trace } } }
}
"""
GOLD_MOBILE = {"userId": "u-ada", "device": "MOBILE"}


async def test_a_cli_import_reaches_every_instance_over_redis(
    two_instances: tuple[RunningApp, RunningApp], postgres_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    code, out = await tessera(
        "import", DEMO_BUNDLE, cwd=tmp_path, database_url=postgres_url, redis_url=redis_url, redis_prefix=redis_prefix
    )

    assert code == 0, out
    for app in two_instances:  # their version poll is off: only the CLI's announcement on the bus can tell them
        await served(app, 1)
        reply = await app.graphql(HERO_QUERY, {"viewer": GOLD_MOBILE})
        assert reply.data["placement"]["blocks"][0]["variant"] == "gold-mobile"


async def test_an_embedded_instance_picks_up_a_cli_import_into_its_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'tessera.db'}"
    await migrate.upgrade(url)
    async with running_app(url, clock=FakeClock()) as app:
        assert app.services.snapshots.current.version == 0
        # (Anonymous: a profile looked up now would be remembered as missing for the profile cache TTL.)
        assert (await app.graphql(HERO_QUERY, {"viewer": {"device": "MOBILE"}})).data == {"placement": None}

        code, out = await tessera("import", DEMO_BUNDLE, cwd=tmp_path, database_url=url)

        assert code == 0, out
        await served(app, 1)  # seen by the instance's version poll: there is no bus between processes
        reply = await app.graphql(HERO_QUERY, {"viewer": GOLD_MOBILE})
        assert (reply.status, reply.errors) == (200, [])
        [hero] = reply.data["placement"]["blocks"]
        assert (hero["key"], hero["variant"], hero["decision"]["rule"]) == ("hero-main", "gold-mobile", "gold-mobile")
        assert hero["decision"]["trace"]

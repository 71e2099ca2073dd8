"""The profile store: profiles from the built-in store, cached per instance, coalesced, and dropped
from every instance's cache when they change."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import sqlalchemy as sa
from fixtures_app import RunningApp, running_app
from sqlalchemy.ext.asyncio import AsyncEngine

from server.profiles import PROFILES_CHANNEL

TIMEOUT = 5.0
BUNDLE: dict[str, Any] = {
    "version": 1,
    "segments": [{"key": "gold", "rule": {"trait": "tier", "op": "eq", "value": "gold"}}],
}
SEGMENTS = "query ($v: ViewerInput!) { viewer(viewer: $v) { segments { key } } }"
IMPORT = "mutation ($b: JSON!) { importBundle(bundle: $b) { ok errors { path message } } }"


async def segments_of(app: RunningApp, user_id: str) -> list[str]:
    reply = await app.graphql(SEGMENTS, {"v": {"userId": user_id}})
    assert reply.status == 200, reply.body
    return [s["key"] for s in reply.data["viewer"]["segments"]]


async def import_bundle(app: RunningApp, bundle: dict[str, Any]) -> None:
    reply = await app.admin(IMPORT, {"b": bundle})
    assert reply.data["importBundle"]["ok"], reply.body


async def test_an_imported_profile_is_served_at_once_though_its_absence_was_cached(app: RunningApp) -> None:
    # Given a viewer whose missing profile this instance has just looked up (and cached)
    await import_bundle(app, BUNDLE)
    assert await segments_of(app, "u-new") == []

    # When their profile is imported
    await import_bundle(app, {"version": 1, "profiles": [{"userId": "u-new", "traits": {"tier": "gold"}}]})

    # Then the very next query sees it
    assert await segments_of(app, "u-new") == ["gold"]


async def test_a_profile_change_reaches_the_cache_of_another_instance(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    async with running_app(postgres_url, redis_url=redis_url, redis_prefix=redis_prefix) as a:
        async with running_app(postgres_url, redis_url=redis_url, redis_prefix=redis_prefix) as b:
            # Given B has cached a profile of tier silver
            user = f"u-{secrets.token_hex(4)}"
            await import_bundle(a, {**BUNDLE, "profiles": [{"userId": user, "traits": {"tier": "silver"}}]})
            assert await segments_of(b, user) == []

            # When A imports the same profile as gold, and B's cache drops its copy on the bus message
            invalidated = b.services.profiles.invalidated
            async with b.services.bus.subscribe(PROFILES_CHANNEL) as messages:
                await import_bundle(a, {"version": 1, "profiles": [{"userId": user, "traits": {"tier": "gold"}}]})
                message = await asyncio.wait_for(anext(messages), TIMEOUT)
            assert user in message["userIds"]
            await asyncio.wait_for(invalidated.wait(), TIMEOUT)

            # Then B serves the new traits
            assert await segments_of(b, user) == ["gold"]


async def test_concurrent_reads_of_one_profile_make_one_query(app: RunningApp) -> None:
    # Given a stored profile that is not cached yet, and a counter of SELECTs on profiles
    await import_bundle(app, {**BUNDLE, "profiles": [{"userId": "u-1", "traits": {"tier": "gold"}}]})
    app.services.profiles.invalidate()
    engine: AsyncEngine = app.services.engine
    selects: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "profiles" in statement:
            selects.append(statement)

    sa.event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        # When 50 requests want it at once
        profiles = await asyncio.gather(*(app.services.profiles.get("u-1") for _ in range(50)))
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", count)

    # Then one query served them all
    assert len(selects) == 1
    assert all(p is not None and p.traits == {"tier": "gold"} for p in profiles)

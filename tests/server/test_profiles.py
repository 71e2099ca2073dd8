"""The profile store in the application: profiles from the built-in store or the upstream profile
service, cached per instance, coalesced, dropped from every instance's cache when they change (by an
import or by the invalidation hook), and never the cause of a failed delivery query."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from fixtures_app import RunningApp, running_app
from sqlalchemy.ext.asyncio import AsyncEngine

from server.profiles import PROFILES_CHANNEL
from tests.server.factories import block, bundle, placed, placement, segment, trait, variant
from tests.server.test_profile_store import serve_upstream

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


# -- the upstream profile service, the hook, and failing open -------------------------------------

HOOK = "/hooks/profiles/{}/invalidate"
HERO = bundle(
    placements=[placement("home")],
    segments=[segment("gold", trait("tier", "eq", "gold"))],
    blocks=[block("hero", placements=[placed("home")], variants=[variant("gold-offer", when={"segment": "gold"})])],
)
HOME = 'query ($v: ViewerInput) { placement(key: "home", viewer: $v) { blocks { key variant } } }'


async def hook(app: RunningApp, user_id: str, key: str | None = "admin") -> httpx.Response:
    headers = {"Authorization": f"Bearer {app.keys.get(key, key)}"} if key is not None else {}
    return await app.client.post(HOOK.format(quote(user_id, safe="")), headers=headers)


async def home_blocks(app: RunningApp, user_id: str) -> list[tuple[str, str | None]]:
    reply = await app.graphql(HOME, {"v": {"userId": user_id}})
    assert reply.status == 200, reply.body
    assert reply.errors == [], reply.body
    return [(b["key"], b["variant"]) for b in reply.data["placement"]["blocks"]]


async def test_the_profile_hook_takes_an_admin_key_only(app: RunningApp) -> None:
    # Given a profile this instance has cached
    await import_bundle(app, {**BUNDLE, "profiles": [{"userId": "u/1", "traits": {"tier": "gold"}}]})
    assert await segments_of(app, "u/1") == ["gold"]

    # When the hook is called without a key, with an unknown one, a delivery key, and an admin key
    missing = await hook(app, "u/1", None)
    unknown = await hook(app, "u/1", "nope")
    delivery = await hook(app, "u/1", "delivery")
    invalidated = app.services.profiles.invalidated
    admin = await hook(app, "u/1")

    # Then only the admin key is accepted, and the others get GraphQL-shaped errors
    rejected = ((missing, 401, "UNAUTHENTICATED"), (unknown, 401, "UNAUTHENTICATED"), (delivery, 403, "FORBIDDEN"))
    for response, status, code in rejected:
        assert response.status_code == status, response.text
        assert [e["extensions"]["code"] for e in response.json()["errors"]] == [code]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert (admin.status_code, admin.json()) == (200, {"invalidated": "u/1"})
    assert invalidated.is_set()
    assert (await app.client.get(HOOK.format("u-1"))).status_code == 405


async def test_the_profile_hook_reaches_every_instance(
    postgres_url: str, redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_upstream() as upstream:
        monkeypatch.setenv("TESSERA_PROFILE_URL", upstream.url)
        async with running_app(postgres_url, redis_url=redis_url, redis_prefix=redis_prefix) as a:
            async with running_app(postgres_url, redis_url=redis_url, redis_prefix=redis_prefix) as b:
                # Given a profile of the upstream service that B has cached (and Redis with it)
                user = f"u-{secrets.token_hex(4)}"
                upstream.profiles[user] = {"tier": "silver"}
                await import_bundle(a, BUNDLE)
                assert await segments_of(b, user) == []
                assert await segments_of(a, user) == []  # from Redis: still one upstream call
                assert upstream.calls == [user]

                # When the upstream changes it and calls the hook on A
                upstream.profiles[user] = {"tier": "gold"}
                invalidated = b.services.profiles.invalidated
                response = await hook(a, user)
                await asyncio.wait_for(invalidated.wait(), TIMEOUT)

                # Then both instances serve the new traits, from one new upstream call
                assert response.status_code == 200, response.text
                assert await segments_of(b, user) == ["gold"]
                assert await segments_of(a, user) == ["gold"]
                assert upstream.calls == [user, user]


@pytest.mark.parametrize("trouble", ["down", "failing", "slow"])
async def test_a_troubled_profile_service_never_fails_a_delivery_query(
    db_url: str, monkeypatch: pytest.MonkeyPatch, trouble: str
) -> None:
    async with serve_upstream() as upstream:
        monkeypatch.setenv("TESSERA_PROFILE_URL", upstream.url)
        monkeypatch.setenv("TESSERA_PROFILE_BUDGET_MS", "100")
        async with running_app(db_url) as app:
            # Given a placement whose variant depends on a trait of the upstream's profile
            await import_bundle(app, HERO)
            upstream.profiles.update({"u-gold": {"tier": "gold"}, "u-other": {"tier": "gold"}})
            await app.services.profiles.get("u-gold", wait=True)  # the budget is not under test here
            assert await home_blocks(app, "u-gold") == [("hero", "gold-offer")]

            # When the profile service is down, failing or hanging
            gate = None
            if trouble == "down":
                await upstream.stop()
            elif trouble == "failing":
                upstream.status = 500
            else:
                gate = upstream.hold()
            blocks = await asyncio.wait_for(home_blocks(app, "u-other"), TIMEOUT)

            # Then the placement still answers (a hanging service: when the budget runs out), with
            # the content for a viewer without traits
            assert blocks == [("hero", "default")]
            # and a hanging service's answer, once it comes, is served from then on
            if gate is not None:
                gate.set()
                await asyncio.wait_for(app.services.profiles.drain(), TIMEOUT)
                assert await home_blocks(app, "u-other") == [("hero", "gold-offer")]


async def test_a_batch_of_users_is_prefetched_in_one_query(app: RunningApp) -> None:
    # Given 300 stored profiles, none cached here, and a counter of SELECTs on profiles
    profiles = [{"userId": f"p-{i}", "traits": {"tier": "gold"}} for i in range(300)]
    await import_bundle(app, {**BUNDLE, "profiles": profiles})
    store = app.services.profiles
    store.invalidate()
    engine: AsyncEngine = app.services.engine
    selects: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "profiles" in statement:
            selects.append(statement)

    sa.event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        # When ingestion prefetches the batch's users (and some without a profile), then reads each
        await store.prefetch({f"p-{i}" for i in range(300)} | {"nobody-1", "nobody-2"})
        read = [await store.get(f"p-{i}", wait=True) for i in range(300)]
        nobody = await store.get("nobody-1", wait=True)
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", count)

    # Then one query loaded them all, the absent ones included
    assert len(selects) == 1
    assert all(p is not None and p.traits == {"tier": "gold"} for p in read)
    assert nobody is None

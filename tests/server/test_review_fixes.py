"""Regressions found by review: a key given twice in one bundle, and trimming thousands of expired
events for one viewer in the append script."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from fixtures_app import FakeClock, RunningApp

from server.events import RedisEventStore, Tracked

IMPORT = "mutation ($b: JSON!) { importBundle(bundle: $b) { ok errors { path message } } }"


async def test_a_block_given_twice_in_one_bundle_is_rejected_and_nothing_is_published(app: RunningApp) -> None:
    # Given a bundle whose first copy of block b holds an invalid rule and whose second is a draft
    bundle: dict[str, Any] = {
        "version": 1,
        "blocks": [
            {"key": "b", "type": "hero", "status": "published",
             "variants": [{"key": "v", "when": {"context": "bogus", "op": "eq", "value": 1}}]},
            {"key": "b", "type": "hero", "status": "draft"},
        ],
    }  # fmt: skip

    # When it is imported
    reply = await app.admin(IMPORT, {"b": bundle})

    # Then it is rejected at the duplicate (and at the invalid rule), and nothing exists
    paths = [e["path"] for e in reply.data["importBundle"]["errors"]]
    assert reply.data["importBundle"]["ok"] is False
    assert "blocks[1].key" in paths
    assert (await app.admin("{ blocks { key } }")).data == {"blocks": []}


async def test_a_segment_given_twice_in_one_bundle_is_rejected(app: RunningApp) -> None:
    bundle = {
        "version": 1,
        "segments": [
            {"key": "s", "rule": {"trait": "tier", "op": "equals", "value": "gold"}},
            {"key": "s", "rule": {"trait": "tier", "op": "eq", "value": "gold"}},
        ],
    }
    reply = await app.admin(IMPORT, {"b": bundle})

    assert [e["path"] for e in reply.data["importBundle"]["errors"]] == ["segments[1].key"]
    assert (await app.admin("{ segments { key } }")).data == {"segments": []}


async def test_appending_after_thousands_of_events_expired_keeps_the_new_event(
    redis_url: str, redis_prefix: str
) -> None:
    # Given 9,000 events of one viewer, all older than retention by the time the next one comes
    clock = FakeClock()
    client = aioredis.Redis.from_url(redis_url)
    store = RedisEventStore(client, redis_prefix, retention=timedelta(days=90), clock=clock)
    try:
        old = [Tracked(id=f"old-{i}", type="page_view", at=clock.now, user_id="u-1") for i in range(9000)]
        assert len(await store.append(old)) == 9000
        clock.advance(days=91)

        # When one more event is appended
        new = Tracked(id="new-1", type="page_view", at=clock.now, user_id="u-1")
        stored = await store.append([new])

        # Then it is stored and in the stream, and the expired ones are gone from the viewer's state
        assert [e.id for e in stored] == ["new-1"]
        assert await client.xlen(store.stream) == 9001
        history = await store.history(user_id="u-1", anonymous_id=None, now=clock.now)
        assert [e.id for e in history.of_type("page_view")] == ["new-1"]
        assert await client.hlen(redis_prefix + "ev:u:u-1") == 1
    finally:
        await client.aclose()


async def test_browser_trackers_may_send_to_the_tracking_api_and_only_there(app: RunningApp) -> None:
    origin = {"Origin": "https://shop.example"}
    # A preflight for /v1/batch with Basic auth is allowed
    preflight = await app.client.options(
        "/v1/batch",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", "https://shop.example")
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()

    # The POST itself carries the header; GraphQL answers without CORS headers
    sent = await app.client.post(
        "/v1/track",
        json={"type": "track", "event": "page_view", "anonymousId": "a-1"},
        headers={**origin, "Authorization": f"Bearer {app.keys['ingest']}"},
    )
    assert sent.status_code == 200, sent.text
    assert "access-control-allow-origin" in sent.headers
    graphql = await app.client.post("/graphql", json={"query": "{ __typename }"}, headers=origin)
    assert "access-control-allow-origin" not in graphql.headers

"""The bus of server/bus.py: the in-process one (the embedded default) and Redis pub/sub on the real Redis."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import redis.asyncio as aioredis

from server.bus import InProcessBus, RedisBus

TIMEOUT = 5.0  # generous: a message normally arrives in microseconds (in-process) or milliseconds (Redis)

Messages = AsyncIterator[Mapping[str, Any]]


async def receive(messages: Messages) -> Mapping[str, Any]:
    return await asyncio.wait_for(anext(messages), TIMEOUT)


# --- in-process --------------------------------------------------------------------------------


async def test_in_process_bus_fans_a_message_out_to_every_subscriber_of_its_channel() -> None:
    bus = InProcessBus()
    async with (
        bus.subscribe("content") as first,
        bus.subscribe("content") as second,
        bus.subscribe("content") as third,
        bus.subscribe("profiles") as other_channel,
    ):
        await bus.publish("content", {"version": 7})
        await bus.publish("content", {"version": 8})
        await bus.publish("profiles", {"userId": "u-1"})

        for messages in (first, second, third):
            assert [await receive(messages), await receive(messages)] == [{"version": 7}, {"version": 8}]
        assert await receive(other_channel) == {"userId": "u-1"}


async def test_in_process_bus_unsubscribes_on_exit() -> None:
    bus = InProcessBus()
    async with bus.subscribe("content") as staying:
        async with bus.subscribe("content") as leaving:
            await bus.publish("content", {"version": 1})
            assert await receive(leaving) == {"version": 1}

        await bus.publish("content", {"version": 2})

        assert [await receive(staying), await receive(staying)] == [{"version": 1}, {"version": 2}]
        # What a subscriber that left would have got arrives nowhere. (Nothing will ever come, so
        # the only way to show it is a bounded wait: a short one, since delivery is synchronous.)
        pending = asyncio.ensure_future(anext(leaving))
        done, _ = await asyncio.wait({pending}, timeout=0.1)
        pending.cancel()
        assert not done


async def test_in_process_bus_keeps_a_slow_subscriber_from_blocking_publishers() -> None:
    bus = InProcessBus()
    async with bus.subscribe("content") as slow:
        for version in range(1, 2001):  # more than the subscriber's queue holds
            await bus.publish("content", {"version": version})

        # The oldest messages were dropped; the newest are kept, in order.
        first = await receive(slow)
        assert first["version"] > 1
        rest = [await receive(slow) for _ in range(2000 - first["version"])]
        assert [m["version"] for m in rest] == list(range(first["version"] + 1, 2001))


# --- Redis ---------------------------------------------------------------------------------------


@asynccontextmanager
async def redis_bus(redis_url: str, prefix: str) -> AsyncIterator[RedisBus]:
    """A started RedisBus on a client (a connection pool) of its own, as each instance has."""
    client = aioredis.Redis.from_url(redis_url)
    bus = RedisBus(client, prefix)
    try:
        await bus.start()
        yield bus
    finally:
        await bus.close()
        await client.aclose()


async def test_redis_bus_reaches_subscribers_on_every_instance(redis_url: str, redis_prefix: str) -> None:
    async with AsyncExitStack() as stack:
        one = await stack.enter_async_context(redis_bus(redis_url, redis_prefix))
        two = await stack.enter_async_context(redis_bus(redis_url, redis_prefix))
        on_one = await stack.enter_async_context(one.subscribe("content"))
        also_on_one = await stack.enter_async_context(one.subscribe("content"))
        on_two = await stack.enter_async_context(two.subscribe("content"))
        flags_on_two = await stack.enter_async_context(two.subscribe("flags"))

        await one.publish("content", {"version": 3})
        await two.publish("flags", {"flag": "recs-v2"})
        await two.publish("content", {"version": 4})

        for messages in (on_one, also_on_one, on_two):
            assert [await receive(messages), await receive(messages)] == [{"version": 3}, {"version": 4}]
        assert await receive(flags_on_two) == {"flag": "recs-v2"}


async def test_redis_bus_prefixes_isolate_deployments(redis_url: str, redis_prefix: str) -> None:
    other_prefix = f"{redis_prefix}other-{secrets.token_hex(4)}:"
    async with AsyncExitStack() as stack:
        ours = await stack.enter_async_context(redis_bus(redis_url, redis_prefix))
        theirs = await stack.enter_async_context(redis_bus(redis_url, other_prefix))
        we_hear = await stack.enter_async_context(ours.subscribe("content"))
        they_hear = await stack.enter_async_context(theirs.subscribe("content"))

        await ours.publish("content", {"version": 1, "from": "ours"})
        await theirs.publish("content", {"version": 1, "from": "theirs"})

        # Redis delivers in the order it runs the PUBLISHes: had the other deployment heard ours,
        # it would have come before its own.
        assert await receive(they_hear) == {"version": 1, "from": "theirs"}
        assert await receive(we_hear) == {"version": 1, "from": "ours"}
        await ours.publish("content", {"version": 2, "from": "ours"})
        assert await receive(we_hear) == {"version": 2, "from": "ours"}


async def test_redis_bus_publishes_json_under_its_prefix(redis_url: str, redis_prefix: str) -> None:
    # What other processes (the CLI announcing an import) rely on: the channel name and the payload.
    listener = aioredis.Redis.from_url(redis_url)
    try:
        async with listener.pubsub() as pubsub, redis_bus(redis_url, redis_prefix) as bus:
            await pubsub.subscribe(f"{redis_prefix}bus:content")
            await asyncio.wait_for(pubsub.get_message(timeout=TIMEOUT), TIMEOUT)  # the subscribe confirmation

            await bus.publish("content", {"version": 12})

            message = await asyncio.wait_for(
                pubsub.get_message(ignore_subscribe_messages=True, timeout=TIMEOUT), TIMEOUT
            )
            assert message is not None
            assert message["data"] == b'{"version":12}'
    finally:
        await listener.aclose()

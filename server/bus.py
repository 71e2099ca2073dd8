"""The bus that announces changes to every instance: in-process (the embedded default) or Redis
pub/sub. Subscribers on one instance share one Redis connection; messages fan out locally."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis

log = logging.getLogger(__name__)

_QUEUE_SIZE = 1024


class _FanOut:
    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[Mapping[str, Any]]]] = {}

    def _deliver(self, channel: str, message: Mapping[str, Any]) -> None:
        for queue in self._queues.get(channel, ()):
            if queue.full():  # a stalled subscriber loses its oldest message, never blocks the bus
                queue.get_nowait()
            queue.put_nowait(message)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[Mapping[str, Any]]]:
        queue: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue(_QUEUE_SIZE)
        self._queues.setdefault(channel, set()).add(queue)

        async def messages() -> AsyncIterator[Mapping[str, Any]]:
            while True:
                yield await queue.get()

        try:
            yield messages()
        finally:
            queues = self._queues[channel]
            queues.discard(queue)
            if not queues:
                del self._queues[channel]


class InProcessBus(_FanOut):
    """The embedded bus: messages reach subscribers of this process only."""

    async def publish(self, channel: str, message: Mapping[str, Any]) -> None:
        self._deliver(channel, message)

    async def publish_many(self, channel: str, messages: Sequence[Mapping[str, Any]]) -> None:
        for message in messages:
            self._deliver(channel, message)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisBus(_FanOut):
    """Redis pub/sub under a key prefix. Every instance, this one included, hears each message."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        super().__init__()
        self._client = client
        self._prefix = prefix + "bus:"
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    def key(self, channel: str) -> str:
        """The Redis channel a bus channel is published on (for scripts that publish themselves)."""
        return self._prefix + channel

    async def publish(self, channel: str, message: Mapping[str, Any]) -> None:
        await self._client.publish(self.key(channel), orjson.dumps(message))

    async def publish_many(self, channel: str, messages: Sequence[Mapping[str, Any]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.publish(self._prefix + channel, orjson.dumps(message))
            await pipe.execute()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="redis-bus")
        await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def _listen(self) -> None:
        while True:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.psubscribe(self._prefix + "*")
                    self._ready.set()
                    async for raw in pubsub.listen():
                        if raw.get("type") != "pmessage":
                            continue
                        channel = raw["channel"]
                        channel = channel.decode() if isinstance(channel, bytes) else channel
                        self._deliver(channel[len(self._prefix) :], orjson.loads(raw["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis went away: keep serving, reconnect (the version poll covers the gap)
                log.warning("redis bus disconnected; reconnecting", exc_info=True)
                self._ready.set()
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

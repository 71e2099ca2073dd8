"""Keeps this instance's snapshot current: builds a new one off the request path whenever the
content version moves (announced on the bus, or seen by a cheap poll), and swaps it in atomically.
An instance that cannot reach the database keeps serving its last snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from content.snapshot import EMPTY, BlockSource, Snapshot
from schema.ports import Bus
from server.store import SpaceRepository, StoreState, load_state

log = logging.getLogger(__name__)

CONTENT_CHANNEL = "content"


def build_snapshot(state: StoreState, retention: timedelta) -> Snapshot:
    return Snapshot.build(
        version=state.content_version,
        locales=state.locales,
        placements=state.placements,
        segments=state.segments,
        scores=state.scores,
        flags=state.flags,
        experiments=state.experiments,
        blocks=[
            BlockSource(
                key=b.key,
                locale=b.locale,
                draft=b.draft,
                published=b.published,
                published_version=b.published_version,
                published_at=b.published_at,
            )
            for b in state.blocks
        ],
        retention=retention,
    )


class SnapshotHolder:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        bus: Bus,
        *,
        retention: timedelta,
        poll_seconds: float,
    ) -> None:
        self._sessions = sessions
        self._bus = bus
        self._retention = retention
        self._poll_seconds = poll_seconds
        self._current: Snapshot = EMPTY
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Condition()

    @property
    def current(self) -> Snapshot:
        return self._current

    async def refresh(self) -> Snapshot:
        """Load and build the stored version if it differs from the current one."""
        async with self._lock:
            async with self._sessions() as session:
                version = await SpaceRepository(session).content_version()
                if version == self._current.version and self._current is not EMPTY:
                    return self._current
                state = await load_state(session)
            snapshot = await asyncio.to_thread(build_snapshot, state, self._retention)
            self._current = snapshot
        async with self.changed:
            self.changed.notify_all()
        log.info("serving content version %s", snapshot.version)
        return snapshot

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception:
            log.exception("could not load content at start; serving nothing until the database answers")
        self._tasks = [
            asyncio.create_task(self._follow_bus(), name="snapshot-bus"),
            asyncio.create_task(self._poll(), name="snapshot-poll"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow_bus(self) -> None:
        async with self._bus.subscribe(CONTENT_CHANNEL) as messages:
            async for message in messages:
                if int(message.get("version", 0)) != self._current.version:
                    await self._safe_refresh()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            await self._safe_refresh()

    async def _safe_refresh(self) -> None:
        try:
            await self.refresh()
        except Exception:
            log.warning("content refresh failed; still serving version %s", self._current.version, exc_info=True)

"""The profile store: profiles from the built-in store, behind an in-process LRU with a TTL and
request coalescing, invalidated through the bus. (Issue 3 adds Redis and an upstream service.)"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from schema.ports import Profile
from server.store import ProfileRepository

PROFILES_CHANNEL = "profiles"
# A missing profile is remembered briefly: a profile written by another process (a CLI import in the
# embedded mode, which has no bus) shows up within this many seconds.
NEGATIVE_TTL = 5.0


class ProfileStore:
    """``get(user_id)``: a cached read; ``invalidate(user_id)`` drops one copy (bus handlers call it)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, ttl: float, size: int) -> None:
        self._sessions = sessions
        self._ttl = ttl
        self._size = size
        self._cache: OrderedDict[str, tuple[Profile | None, float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Profile | None]] = {}
        self.invalidated = asyncio.Event()  # set (and replaced) by every invalidation: a wait point

    async def get(self, user_id: str) -> Profile | None:
        hit = self._cache.get(user_id)
        if hit is not None and hit[1] > time.monotonic():
            self._cache.move_to_end(user_id)
            return hit[0]
        pending = self._inflight.get(user_id)
        if pending is not None:  # coalesce: one read for N concurrent requests of the same profile
            return await asyncio.shield(pending)
        future: asyncio.Future[Profile | None] = asyncio.get_running_loop().create_future()
        self._inflight[user_id] = future
        try:
            profile = await self._load(user_id)
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it
            if hit is not None:  # serve the stale copy rather than fail
                return hit[0]
            raise
        finally:
            del self._inflight[user_id]
        future.set_result(profile)
        self._remember(user_id, profile)
        return profile

    async def _load(self, user_id: str) -> Profile | None:
        async with self._sessions() as session:
            row = await ProfileRepository(session).get(user_id)
        if row is None:
            return None
        traits, consent = row
        return Profile(traits=traits, consent=_consents(consent))

    def _remember(self, user_id: str, profile: Profile | None) -> None:
        ttl = self._ttl if profile is not None else min(self._ttl, NEGATIVE_TTL)
        self._cache[user_id] = (profile, time.monotonic() + ttl)
        self._cache.move_to_end(user_id)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)

    def invalidate(self, user_id: str | None = None) -> None:
        if user_id is None:
            self._cache.clear()
        else:
            self._cache.pop(user_id, None)
        self.invalidated.set()
        self.invalidated = asyncio.Event()


def _consents(consent: Mapping[str, Any] | None) -> bool:
    return not (consent is not None and consent.get("personalization") is False)

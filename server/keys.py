"""API keys: made once, shown once, stored only as a SHA-256 hash, and resolved per request from a
small in-process cache so that the delivery path does not wait on the database."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.store import ApiKeyRecord, ApiKeyRepository

log = logging.getLogger(__name__)

SCOPES = ("delivery", "preview", "admin", "ingest")
_NEGATIVE_TTL = 1.0  # an unknown key is looked up again after a second: a key made now works at once


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class NewKey:
    raw: str
    record: ApiKeyRecord


async def create_key(session: AsyncSession, *, scope: str, name: str = "") -> NewKey:
    """Make a key of ``scope``; the raw key is in the result and nowhere else."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")
    raw = f"tess_{scope}_{secrets.token_urlsafe(24)}"
    record = await ApiKeyRepository(session).create(
        name=name, scope=scope, prefix=raw[: len(scope) + 10], key_hash=hash_key(raw)
    )
    return NewKey(raw=raw, record=record)


class KeyResolver:
    """Resolves raw keys to records, caching answers for ``ttl`` seconds (unknown keys for one)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], ttl: float = 30.0) -> None:
        self._sessions = sessions
        self._ttl = ttl
        self._cache: dict[str, tuple[ApiKeyRecord | None, float]] = {}

    async def resolve(self, raw: str) -> ApiKeyRecord | None:
        """The active key record, or None for an unknown or revoked key."""
        digest = hash_key(raw)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            async with self._sessions() as session:
                record = await ApiKeyRepository(session).find_by_hash(digest)
        except Exception:
            if cached is not None:  # the database is down: keep accepting keys we knew
                log.warning("key lookup failed; using the cached answer", exc_info=True)
                return cached[0]
            raise
        if record is not None and record.revoked_at is not None:
            record = None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (record, now + (self._ttl if record is not None else _NEGATIVE_TTL))
        return record

    def forget(self) -> None:
        self._cache.clear()

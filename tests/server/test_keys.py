"""API keys (server/keys.py): stored only as a hash, and resolved from a cache that outlives the database."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from server import migrate, models
from server.db import create_engine, session_factory
from server.keys import SCOPES, KeyResolver, create_key, hash_key
from server.store import ApiKeyRepository

Sessions = async_sessionmaker[AsyncSession]


async def make_key(sessions: Sessions, scope: str = "delivery", name: str = "") -> tuple[str, int]:
    async with sessions() as session, session.begin():
        made = await create_key(session, scope=scope, name=name)
    return made.raw, made.record.id


async def revoke(sessions: Sessions, key_id: int) -> None:
    async with sessions() as session, session.begin():
        assert await ApiKeyRepository(session).revoke(key_id, datetime.now(UTC))


@pytest.mark.parametrize("scope", SCOPES)
async def test_create_key_stores_only_the_hash(session_maker: Sessions, scope: str) -> None:
    raw, key_id = await make_key(session_maker, scope, name="storefront")

    async with session_maker() as session:
        row = (await session.execute(sa.select(models.ApiKey.__table__))).mappings().one()
    assert row["id"] == key_id
    assert row["scope"] == scope
    assert row["name"] == "storefront"
    assert row["hash"] == hashlib.sha256(raw.encode()).hexdigest() == hash_key(raw)
    assert raw.startswith(row["prefix"])
    assert len(row["prefix"]) < len(raw) - 16
    assert not any(raw in str(value) for value in row.values()), "the raw key is stored somewhere"


async def test_create_key_makes_a_different_key_each_time(session_maker: Sessions) -> None:
    first, _ = await make_key(session_maker)
    second, _ = await make_key(session_maker)

    assert first != second
    assert first.startswith("tess_delivery_")
    assert second.startswith("tess_delivery_")


@pytest.mark.parametrize("scope", ["", "root", "Delivery", "delivery "])
async def test_create_key_rejects_unknown_scopes(session_maker: Sessions, scope: str) -> None:
    async with session_maker() as session:
        with pytest.raises(ValueError, match="unknown scope"):
            await create_key(session, scope=scope)
        assert await ApiKeyRepository(session).list() == []


async def test_resolver_answers_with_the_record(session_maker: Sessions) -> None:
    raw, key_id = await make_key(session_maker, "preview", name="staging site")
    resolver = KeyResolver(session_maker)

    record = await resolver.resolve(raw)

    assert record is not None
    assert (record.id, record.scope, record.name, record.revoked_at) == (key_id, "preview", "staging site", None)
    assert await resolver.resolve(raw + "x") is None
    assert await resolver.resolve("") is None


async def test_a_revoked_key_resolves_from_the_cache_until_forgotten(session_maker: Sessions) -> None:
    raw, key_id = await make_key(session_maker)
    resolver = KeyResolver(session_maker, ttl=30.0)
    assert await resolver.resolve(raw) is not None

    await revoke(session_maker, key_id)

    assert await resolver.resolve(raw) is not None  # cached for the TTL, as docs/decisions.md says
    resolver.forget()
    assert await resolver.resolve(raw) is None


async def test_a_revoked_key_stops_resolving_once_its_ttl_is_over(session_maker: Sessions) -> None:
    raw, key_id = await make_key(session_maker)
    resolver = KeyResolver(session_maker, ttl=0.0)  # every answer is stale at once
    assert await resolver.resolve(raw) is not None

    await revoke(session_maker, key_id)

    assert await resolver.resolve(raw) is None


async def test_an_unknown_key_is_looked_up_again(session_maker: Sessions) -> None:
    raw = "tess_delivery_made-after-it-was-first-tried"
    resolver = KeyResolver(session_maker)
    assert await resolver.resolve(raw) is None

    async with session_maker() as session, session.begin():
        await ApiKeyRepository(session).create(name="late", scope="delivery", prefix=raw[:18], key_hash=hash_key(raw))
    resolver.forget()  # what the one-second negative TTL does on its own

    record = await resolver.resolve(raw)
    assert record is not None
    assert record.name == "late"


# --- the database goes away ------------------------------------------------------------------------


@dataclass
class Doomed:
    """A database of its own (not yet migrated) that the test can make disappear."""

    url: str
    disappear: Callable[[AsyncEngine], Awaitable[None]]  # given the engine that the resolver uses


@pytest.fixture(params=["postgres", "sqlite"])
def doomed(request: pytest.FixtureRequest, tmp_path: Path) -> Doomed:
    # A sync fixture: it fetches async fixtures by name, which works only while the loop is idle.
    if request.param == "sqlite":
        directory = tmp_path / "gone"

        async def remove_the_file(engine: AsyncEngine) -> None:
            await engine.dispose()  # an open connection would go on reading the deleted file
            shutil.rmtree(directory)  # with its directory, so SQLite cannot make a new empty one

        return Doomed(f"sqlite+aiosqlite:///{directory / 'tessera.db'}", remove_the_file)

    url: str = request.getfixturevalue("empty_postgres_url")
    neighbour: str = request.getfixturevalue("postgres_url")  # DROP DATABASE runs from another database

    async def drop_the_database(engine: AsyncEngine) -> None:  # FORCE ends its connections
        admin = create_async_engine(neighbour, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            async with admin.connect() as connection:
                await connection.exec_driver_sql(f'DROP DATABASE "{make_url(url).database}" WITH (FORCE)')
        finally:
            await admin.dispose()

    return Doomed(url, drop_the_database)


async def test_known_keys_still_resolve_when_the_database_is_gone(doomed: Doomed) -> None:
    await migrate.upgrade(doomed.url)
    engine = create_engine(doomed.url)
    sessions = session_factory(engine)
    try:
        raw, key_id = await make_key(sessions)
        revoked, revoked_id = await make_key(sessions)
        await revoke(sessions, revoked_id)
        fresh = KeyResolver(sessions, ttl=30.0)  # answers within their TTL
        stale = KeyResolver(sessions, ttl=0.0)  # answers already past it: must fall back to them
        for resolver in (fresh, stale):
            assert await resolver.resolve(raw) is not None
            assert await resolver.resolve(revoked) is None

        await doomed.disappear(engine)
        async with sessions() as session:  # it really is gone
            with pytest.raises(sa.exc.DBAPIError):
                await session.execute(sa.text("SELECT * FROM api_keys"))

        for resolver in (fresh, stale):
            record = await resolver.resolve(raw)
            assert record is not None
            assert record.id == key_id
            assert await resolver.resolve(revoked) is None
        # A key never seen has no cached answer: the failure is not disguised as "unknown key".
        with pytest.raises(sa.exc.DBAPIError):
            await stale.resolve("tess_delivery_never-seen-before")
    finally:
        await engine.dispose()

"""Shared fixtures: the real PostgreSQL and SQLite databases, migrated once per session, and Redis.

PostgreSQL and Redis come from TESSERA_TEST_DATABASE_URL and TESSERA_TEST_REDIS_URL. When one is
down, the tests that need it fail and say how to start it; TESSERA_TEST_SERVICES=optional turns
that into a loud skip, except under CI=true, where a missing service always fails.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import pytest
import redis.asyncio as redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from server import migrate, models
from server.db import create_engine, session_factory

TEST_DATABASE_URL = os.environ.get(
    "TESSERA_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
TEST_REDIS_URL = os.environ.get("TESSERA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CONNECT_TIMEOUT_SECONDS = 5

pytest_plugins = ["fixtures_app"]

START_SERVICES = "start the test services with `docker compose up -d postgres redis`"


def service_unavailable(service: str, url: str, error: BaseException) -> NoReturn:
    """Fail (or, if allowed, skip) the current test because `service` cannot be reached."""
    message = (
        f"{service} is unreachable at {url} ({type(error).__name__}: {error}); {START_SERVICES}, "
        f"or point TESSERA_TEST_DATABASE_URL / TESSERA_TEST_REDIS_URL at running services."
    )
    in_ci = os.environ.get("CI", "").lower() == "true"
    if os.environ.get("TESSERA_TEST_SERVICES", "").lower() == "optional" and not in_ci:
        pytest.skip(f"SKIPPED, {service} IS DOWN (TESSERA_TEST_SERVICES=optional): {message}")
    pytest.fail(message, pytrace=False)


@pytest.fixture(autouse=True)
def _patient_profile_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Applications in tests wait up to 10 s for a profile (the default budget is 50 ms), so that a
    busy machine (CI) cannot turn a slow first read into a missing profile and a flaky test. Tests
    of the budget set their own."""
    monkeypatch.setenv("TESSERA_PROFILE_BUDGET_MS", "10000")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Mark tests by the services they use, so that `-m "not postgres"` selects the others.
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if fixtures & {"postgres_url", "empty_postgres_url"} or params.get("db_url") == "postgres":
            item.add_marker(pytest.mark.postgres)
        if "redis_url" in fixtures:
            item.add_marker(pytest.mark.redis)


# --- PostgreSQL ------------------------------------------------------------------------------


@asynccontextmanager
async def _postgres_database() -> AsyncIterator[str]:
    # CREATE and DROP DATABASE run from the server URL's own database (`test`, or `postgres`).
    server_url = make_url(TEST_DATABASE_URL)
    if not server_url.database:
        server_url = server_url.set(database="postgres")
    shown = server_url.render_as_string(hide_password=True)
    connect_args = {"timeout": CONNECT_TIMEOUT_SECONDS} if server_url.get_driver_name() == "asyncpg" else {}
    admin = create_async_engine(
        server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args=connect_args
    )
    name = f"tessera_test_{secrets.token_hex(6)}"
    try:
        try:
            async with admin.connect() as connection:
                await connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        except (OSError, TimeoutError, sa.exc.DBAPIError) as error:
            service_unavailable("PostgreSQL", shown, error)
        try:
            yield server_url.set(database=name).render_as_string(hide_password=False)
        finally:
            async with admin.connect() as connection:
                await connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.dispose()


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    """A PostgreSQL database of this session's own, migrated to head, dropped at the end."""
    async with _postgres_database() as url:
        await migrate.upgrade(url)
        yield url


@pytest.fixture
async def empty_postgres_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database with nothing in it (not migrated), dropped after the test."""
    async with _postgres_database() as url:
        yield url


# --- SQLite ----------------------------------------------------------------------------------


def _sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
async def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite database file of this session's own, migrated to head."""
    url = _sqlite_url(tmp_path_factory.mktemp("sqlite") / "tessera.db")
    await migrate.upgrade(url)
    return url


@pytest.fixture
def empty_sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file that does not exist yet."""
    return _sqlite_url(tmp_path / "empty.db")


# --- Both databases, empty tables for every test ---------------------------------------------


async def empty_tables(engine: AsyncEngine) -> None:
    """Delete every row of every table and put the space row back as the migration made it."""
    tables = models.Base.metadata.sorted_tables
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # A test that leaked an open transaction makes this fail fast instead of hanging.
            await connection.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
            names = ", ".join(f'"{table.name}"' for table in tables)
            await connection.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        else:
            for table in reversed(tables):  # children before parents
                await connection.execute(sa.delete(table))
        await connection.execute(
            sa.insert(models.Base.metadata.tables["space"]).values(
                **models.INITIAL_SPACE, updated_at=datetime.now(UTC)
            )
        )


@pytest.fixture(scope="session")
async def _postgres_engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def _sqlite_engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(sqlite_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def _empty_postgres(_postgres_engine: AsyncEngine) -> None:
    await empty_tables(_postgres_engine)


@pytest.fixture
async def _empty_sqlite(_sqlite_engine: AsyncEngine) -> None:
    await empty_tables(_sqlite_engine)


@pytest.fixture(params=["postgres", "sqlite"], ids=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The URL of a migrated database, PostgreSQL then SQLite, with empty tables."""
    # Fetched by name so that a SQLite-only run (`-k sqlite`) never touches PostgreSQL. A sync
    # fixture, because async fixtures can only be requested this way while the loop is idle.
    backend: str = request.param
    url: str = request.getfixturevalue(f"{backend}_url")
    request.getfixturevalue(f"_empty_{backend}")
    return url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def session_maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)


# --- Redis -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def redis_url() -> str:
    """The test Redis, checked once per session."""
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        await client.ping()
    except (OSError, redis.RedisError) as error:
        service_unavailable("Redis", make_url(TEST_REDIS_URL).render_as_string(hide_password=True), error)
    finally:
        await client.aclose()
    return TEST_REDIS_URL


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted after the test."""
    prefix = f"tessera-test:{secrets.token_hex(8)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()

"""The migrations in alembic/ build exactly the schema of server/models.py, on PostgreSQL and SQLite."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from server import migrate, models
from server.db import create_engine

CHECKOUT = Path(migrate.__file__).resolve().parent.parent
TABLES = {table.name for table in models.Base.metadata.sorted_tables}


async def schema_differences(url: str) -> list[Any]:
    """What `alembic revision --autogenerate` would put in a new migration."""

    def compare(connection: sa.Connection) -> list[Any]:
        # Server defaults are compared on PostgreSQL only: Alembic's SQLite comparison reports the
        # empty-string default (`DEFAULT ''`) as changed even when it is not.
        postgres = connection.dialect.name == "postgresql"
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": postgres}
        )
        differences: list[Any] = compare_metadata(context, models.Base.metadata)
        return differences

    engine = create_engine(url, for_migrations=True)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(compare)
    finally:
        await engine.dispose()


async def table_names(url: str) -> set[str]:
    engine = create_engine(url, for_migrations=True)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda c: sa.inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def space_row(url: str) -> tuple[Any, ...]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            space = models.Base.metadata.tables["space"]
            result = await connection.execute(
                sa.select(space.c.id, space.c.content_version, space.c.locales, space.c.updated_at)
            )
            id_, version, locales, updated_at = result.one()
            return (id_, version, locales, updated_at.tzinfo)
    finally:
        await engine.dispose()


async def test_upgrade_of_an_empty_postgres_database_matches_the_models(empty_postgres_url: str) -> None:
    await migrate.upgrade(empty_postgres_url)

    assert await schema_differences(empty_postgres_url) == []
    assert await table_names(empty_postgres_url) == TABLES | {"alembic_version"}
    assert await space_row(empty_postgres_url) == (1, 0, {"default": "en-US", "fallbacks": {}}, UTC)


async def test_upgrade_of_an_empty_sqlite_database_matches_the_models(empty_sqlite_url: str) -> None:
    await migrate.upgrade(empty_sqlite_url)

    assert await schema_differences(empty_sqlite_url) == []
    assert await table_names(empty_sqlite_url) == TABLES | {"alembic_version"}
    assert await space_row(empty_sqlite_url) == (1, 0, {"default": "en-US", "fallbacks": {}}, UTC)


async def test_downgrade_to_base_and_back_on_postgres(empty_postgres_url: str) -> None:
    await migrate.upgrade(empty_postgres_url)

    await migrate.downgrade(empty_postgres_url, "base")

    assert await table_names(empty_postgres_url) == {"alembic_version"}
    await migrate.upgrade(empty_postgres_url)
    assert await schema_differences(empty_postgres_url) == []


async def test_downgrade_to_base_and_back_on_sqlite(empty_sqlite_url: str) -> None:
    await migrate.upgrade(empty_sqlite_url)

    await migrate.downgrade(empty_sqlite_url, "base")

    assert await table_names(empty_sqlite_url) == {"alembic_version"}
    await migrate.upgrade(empty_sqlite_url)
    assert await schema_differences(empty_sqlite_url) == []


def alembic_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "TESSERA_DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(CHECKOUT / "alembic.ini"), *args],
        cwd=cwd,
        env=environment | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def sqlite_tables(path: Path) -> set[str]:
    connection = sqlite3.connect(path)
    try:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        connection.close()


def test_the_alembic_command_line_takes_the_url_from_x_url(tmp_path: Path) -> None:
    # From a directory other than the checkout, into a directory that does not exist yet.
    database = tmp_path / "data" / "cli.db"

    done = alembic_cli("-x", f"url=sqlite+aiosqlite:///{database}", "upgrade", "head", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert sqlite_tables(database) == TABLES | {"alembic_version"}


def test_the_alembic_command_line_takes_the_url_from_the_environment(tmp_path: Path) -> None:
    database = tmp_path / "env.db"

    done = alembic_cli("upgrade", "head", cwd=tmp_path, env={"TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{database}"})

    assert done.returncode == 0, done.stderr
    assert sqlite_tables(database) == TABLES | {"alembic_version"}


def test_the_alembic_command_line_defaults_to_tessera_db_in_the_working_directory(tmp_path: Path) -> None:
    done = alembic_cli("upgrade", "head", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert sqlite_tables(tmp_path / "tessera.db") == TABLES | {"alembic_version"}

"""Alembic environment for tessera: async, one history for PostgreSQL and SQLite.

Used by the `alembic` command line and by `server.migrate`; see alembic.ini for where the URL comes from.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection, make_url

from server.db import create_engine
from server.models import Base

DEFAULT_URL = "sqlite+aiosqlite:///tessera.db"

config = context.config

# server.migrate runs inside an application or a test session whose logging is already set up.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("TESSERA_DATABASE_URL")
        or DEFAULT_URL
    )


def configure(**options: Any) -> None:
    sqlite = make_url(database_url()).get_backend_name() == "sqlite"
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: rebuild the table instead (copy, drop, rename).
        render_as_batch=sqlite,
        # server.db makes SQLite emit BEGIN itself, which makes its DDL transactional too:
        # a failed upgrade leaves the database as it was.
        transactional_ddl=True if sqlite else None,
        **options,
    )


def run_migrations_offline() -> None:
    configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_engine(database_url(), for_migrations=True)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())

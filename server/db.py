"""Database engines and sessions: PostgreSQL via asyncpg in production, SQLite via aiosqlite embedded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool


def create_engine(url: str, *, for_migrations: bool = False) -> AsyncEngine:
    """Create the engine for a `postgresql+asyncpg://` or `sqlite+aiosqlite:///` URL.

    `for_migrations` gives an unpooled engine and, on SQLite, leaves foreign keys unenforced:
    batch migrations rebuild tables by copy-and-drop, which would otherwise cascade deletes.
    """
    parsed = make_url(url)
    options: dict[str, Any] = {}
    if for_migrations:
        options["poolclass"] = NullPool
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, **options)
        _configure_sqlite(engine, foreign_keys=not for_migrations)
        return engine
    if not for_migrations:
        options.update(pool_size=10, max_overflow=20, pool_timeout=10, pool_recycle=1800, pool_pre_ping=True)
    if parsed.get_driver_name() == "asyncpg":
        options["connect_args"] = {"server_settings": {"application_name": "tessera"}}
    return create_async_engine(parsed, **options)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (the edge commits, then still reads them)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def _configure_sqlite(engine: AsyncEngine, *, foreign_keys: bool) -> None:
    # The sqlite3 driver's legacy transaction control does not BEGIN before a SELECT or DDL, so
    # the reads of one transaction would not share a snapshot and migrations would not be
    # atomic. SQLAlchemy's documented recipe: turn that off and emit BEGIN ourselves. The price:
    # a transaction that reads, and then writes after another connection has committed, fails
    # at once with "database is locked" rather than waiting; writes that come first wait (5 s).
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: DBAPIConnection, connection_record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            # WAL lets readers run while one writer commits; it is persistent but cheap to repeat.
            cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")

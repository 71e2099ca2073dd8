"""The database schema: SQLAlchemy models for one content space, shared by PostgreSQL and SQLite.

Entity documents are stored whole, as the user gave them, so that export round-trips what was
imported; the few columns next to them are denormalized for listing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

API_KEY_SCOPES: Final = ("delivery", "preview", "admin", "ingest")

# The single `space` row as the initial migration creates it (the migration keeps its own copy).
INITIAL_SPACE: Final[dict[str, Any]] = {
    "id": 1,
    "content_version": 0,
    "locales": {"default": "en-US", "fallbacks": {}},
}


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that only accepts tz-aware datetimes and always returns them in UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: timestamps must be timezone-aware")
        # SQLite stores the wall-clock digits only, so normalize before they are written.
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite: written as UTC by process_bind_param
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# PostgreSQL's `json` rather than `jsonb`: jsonb reorders object keys, which would break the
# promise that export gives back the documents exactly as they were imported. Nothing queries
# inside these documents, so jsonb's operators and indexes buy nothing here.
# none_as_null: a Python None is SQL NULL (e.g. `profiles.consent`), not the JSON literal null.
JSONDocument = sa.JSON(none_as_null=True)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - read once by SQLAlchemy at class creation
        datetime: UTCDateTime(),
        dict[str, Any]: JSONDocument,
    }


def _key() -> Mapped[str]:
    return mapped_column(sa.String(128), primary_key=True)


def _name() -> Mapped[str]:
    return mapped_column(sa.Text, default="", server_default="")


class Space(Base):
    __tablename__ = "space"
    __table_args__ = (sa.CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    content_version: Mapped[int] = mapped_column(sa.BigInteger)
    locales: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime]


class Placement(Base):
    __tablename__ = "placements"

    key: Mapped[str] = _key()
    name: Mapped[str] = _name()
    document: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Segment(Base):
    __tablename__ = "segments"

    key: Mapped[str] = _key()
    name: Mapped[str] = _name()
    priority: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    document: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Score(Base):
    __tablename__ = "scores"

    key: Mapped[str] = _key()
    document: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Flag(Base):
    __tablename__ = "flags"

    key: Mapped[str] = _key()
    name: Mapped[str] = _name()
    enabled: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    document: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Experiment(Base):
    __tablename__ = "experiments"

    key: Mapped[str] = _key()
    name: Mapped[str] = _name()
    document: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Block(Base):
    """One block in one locale: its current draft and pointers into its published versions."""

    __tablename__ = "blocks"
    __table_args__ = (sa.UniqueConstraint("key", "locale"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(128))
    locale: Mapped[str] = mapped_column(sa.String(64))
    type: Mapped[str] = mapped_column(sa.String(128))
    draft: Mapped[dict[str, Any]]
    draft_revision: Mapped[int] = mapped_column(default=1, server_default=sa.text("1"))
    published_version: Mapped[int | None]
    latest_version: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class BlockVersion(Base):
    """An immutable published version of a block."""

    __tablename__ = "block_versions"

    block_id: Mapped[int] = mapped_column(
        sa.ForeignKey("blocks.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    document: Mapped[dict[str, Any]]
    published_at: Mapped[datetime]


class Profile(Base):
    __tablename__ = "profiles"

    user_id: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    traits: Mapped[dict[str, Any]]
    consent: Mapped[dict[str, Any] | None]
    updated_at: Mapped[datetime]


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        sa.Index(None, "user_id", "at"),
        sa.Index(None, "anonymous_id", "at"),
        sa.Index(None, "received_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    type: Mapped[str] = mapped_column(sa.String(128))
    user_id: Mapped[str | None] = mapped_column(sa.String(256))
    anonymous_id: Mapped[str | None] = mapped_column(sa.String(256))
    at: Mapped[datetime]
    properties: Mapped[dict[str, Any]]
    received_at: Mapped[datetime]


class Identity(Base):
    """An anonymous id joined to a user id by identify or alias: its events count for the user."""

    __tablename__ = "identities"
    __table_args__ = (sa.Index(None, "user_id"),)

    anonymous_id: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    user_id: Mapped[str] = mapped_column(sa.String(256))
    created_at: Mapped[datetime]


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        sa.CheckConstraint("scope IN ({})".format(", ".join(f"'{scope}'" for scope in API_KEY_SCOPES)), name="scope"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    scope: Mapped[str] = mapped_column(sa.String(16))
    prefix: Mapped[str] = mapped_column(sa.String(32))
    hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]

"""Repositories: all of tessera's SQL, over an `AsyncSession` that the caller commits.

Documents go in and come out as the plain JSON objects the user gave; records are frozen
dataclasses. Exceptions::

    StoreError
     └── NotFound
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Row
from sqlalchemy.ext.asyncio import AsyncSession

from server import models

CONFIG_KINDS: Final = ("placements", "segments", "scores", "flags", "experiments")

Clock = Callable[[], datetime]
_Row = Row[*tuple[Any, ...]]
_Select = sa.Select[*tuple[Any, ...]]


class StoreError(Exception):
    """Base class of the store's errors."""


class NotFound(StoreError):
    """The entity that an operation needs does not exist."""


@dataclass(frozen=True, slots=True)
class BlockRecord:
    key: str
    locale: str
    draft: dict[str, Any]
    draft_revision: int
    published_version: int | None
    latest_version: int
    published: dict[str, Any] | None
    published_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class BlockVersion:
    key: str
    locale: str
    version: int
    document: dict[str, Any]
    published_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: int
    name: str
    scope: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class StoreState:
    """Everything a snapshot is built from, read in one transaction."""

    content_version: int
    locales: dict[str, Any]
    placements: list[dict[str, Any]]
    segments: list[dict[str, Any]]
    scores: list[dict[str, Any]]
    flags: list[dict[str, Any]]
    experiments: list[dict[str, Any]]
    blocks: list[BlockRecord]


def _table(model: type[models.Base]) -> sa.Table:
    return cast(sa.Table, model.__table__)


_space = _table(models.Space)
_blocks = _table(models.Block)
_block_versions = _table(models.BlockVersion)
_profiles = _table(models.Profile)
_events = _table(models.Event)
_api_keys = _table(models.ApiKey)
_identities = _table(models.Identity)
_EVENT_COLUMNS = (
    _events.c.id,
    _events.c.type,
    _events.c.user_id,
    _events.c.anonymous_id,
    _events.c.at,
    _events.c.properties,
)
_config_tables: Final = {kind: models.Base.metadata.tables[kind] for kind in CONFIG_KINDS}

_SPACE_ID: Final = 1


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Repository:
    def __init__(self, session: AsyncSession, *, clock: Clock = _utcnow) -> None:
        self._session = session
        self._clock = clock

    def _insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        # INSERT ... ON CONFLICT is spelled the same on both, but each dialect has its own construct.
        dialect = self._session.get_bind().dialect.name
        if dialect == "postgresql":
            return postgresql.insert(table)
        if dialect == "sqlite":
            return sqlite.insert(table)
        raise StoreError(f"unsupported database dialect {dialect!r}")


class SpaceRepository(_Repository):
    """The space's single row: its content version and locale settings."""

    async def content_version(self) -> int:
        return int(await self._scalar(_space.c.content_version))

    async def locales(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._scalar(_space.c.locales))

    async def set_locales(self, locales: dict[str, Any]) -> bool:
        """Replace the locale settings; True when they changed."""
        if await self.locales() == locales:
            return False
        await self._session.execute(
            sa.update(_space).where(_space.c.id == _SPACE_ID).values(locales=locales, updated_at=self._clock())
        )
        return True

    async def bump_version(self) -> int:
        """Add one to the content version, atomically, and return the new version."""
        result = await self._session.execute(
            sa.update(_space)
            .where(_space.c.id == _SPACE_ID)
            .values(content_version=_space.c.content_version + 1, updated_at=self._clock())
            .returning(_space.c.content_version)
        )
        return int(result.scalar_one())

    async def _scalar(self, column: sa.Column[Any]) -> Any:
        result = await self._session.execute(sa.select(column).where(_space.c.id == _SPACE_ID))
        return result.scalar_one()


class ConfigRepository(_Repository):
    """Placements, segments, scores, flags and experiments: documents by kind (`CONFIG_KINDS`) and key."""

    async def list(self, kind: str) -> list[dict[str, Any]]:
        table = _config_table(kind)
        result = await self._session.execute(sa.select(table.c.document).order_by(table.c.key))
        return list(result.scalars())

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        table = _config_table(kind)
        result = await self._session.execute(sa.select(table.c.document).where(table.c.key == key))
        return cast(dict[str, Any] | None, result.scalar_one_or_none())

    async def upsert(self, kind: str, document: dict[str, Any]) -> bool:
        """Store `document` under `document["key"]`; False (and no write) when it is already stored."""
        table = _config_table(kind)
        if await self.get(kind, document["key"]) == document:
            return False
        now = self._clock()
        listed = _listed_columns(table, document)
        insert = self._insert(table).values(
            key=document["key"], document=document, created_at=now, updated_at=now, **listed
        )
        await self._session.execute(
            insert.on_conflict_do_update(
                index_elements=[table.c.key],
                set_={"document": insert.excluded.document, "updated_at": now, **listed},
            )
        )
        return True

    async def delete(self, kind: str, key: str) -> bool:
        table = _config_table(kind)
        result = await self._session.execute(sa.delete(table).where(table.c.key == key).returning(table.c.key))
        return result.first() is not None


def _config_table(kind: str) -> sa.Table:
    try:
        return _config_tables[kind]
    except KeyError:
        raise ValueError(f"unknown configuration kind {kind!r}, expected one of {CONFIG_KINDS}") from None


def _listed_columns(table: sa.Table, document: dict[str, Any]) -> dict[str, Any]:
    # The columns kept next to the document so that listings need not parse it.
    columns: dict[str, Any] = {}
    if "name" in table.c:
        columns["name"] = document.get("name") or ""
    if "priority" in table.c:
        columns["priority"] = document.get("priority") or 0
    if "enabled" in table.c:
        columns["enabled"] = bool(document.get("enabled", False))
    return columns


class BlockRepository(_Repository):
    """Blocks by (key, locale): a mutable draft and immutable published versions."""

    async def list(self) -> list[BlockRecord]:
        result = await self._session.execute(_block_records().order_by(_blocks.c.key, _blocks.c.locale))
        return [_block_record(row) for row in result]

    async def get(self, key: str, locale: str) -> BlockRecord | None:
        result = await self._session.execute(_block_records().where(*_block_is(key, locale)))
        row = result.first()
        return None if row is None else _block_record(row)

    async def save_draft(self, document: dict[str, Any]) -> bool:
        """Make `document` the draft of its (key, locale); False (and no write) when it already is."""
        key, locale = document["key"], document["locale"]
        result = await self._session.execute(sa.select(_blocks.c.draft).where(*_block_is(key, locale)))
        if result.scalar_one_or_none() == document:
            return False
        now = self._clock()
        insert = self._insert(_blocks).values(
            key=key,
            locale=locale,
            type=document["type"],
            draft=document,
            draft_revision=1,
            latest_version=0,
            created_at=now,
            updated_at=now,
        )
        # An upsert rather than an UPDATE so that two first saves of one block cannot collide.
        await self._session.execute(
            insert.on_conflict_do_update(
                index_elements=[_blocks.c.key, _blocks.c.locale],
                set_={
                    "type": insert.excluded.type,
                    "draft": insert.excluded.draft,
                    "draft_revision": _blocks.c.draft_revision + 1,
                    "updated_at": now,
                },
            )
        )
        return True

    async def publish(self, key: str, locale: str, at: datetime) -> int:
        """Publish the current draft as a new immutable version and return its number.

        Raises `NotFound` when there is no such block.
        """
        # Claiming the version number and reading the draft in one UPDATE makes concurrent
        # publishes of one block queue on its row instead of racing for the same number.
        result = await self._session.execute(
            sa.update(_blocks)
            .where(*_block_is(key, locale))
            .values(
                latest_version=_blocks.c.latest_version + 1,
                published_version=_blocks.c.latest_version + 1,
                updated_at=at,
            )
            .returning(_blocks.c.id, _blocks.c.latest_version, _blocks.c.draft)
        )
        row = result.first()
        if row is None:
            raise NotFound(f"no block {key!r} in locale {locale!r}")
        await self._session.execute(
            sa.insert(_block_versions).values(
                block_id=row.id, version=row.latest_version, document=row.draft, published_at=at
            )
        )
        return int(row.latest_version)

    async def unpublish(self, key: str, locale: str) -> bool:
        """Take the block off the delivery API; False when it was not published."""
        result = await self._session.execute(
            sa.update(_blocks)
            .where(*_block_is(key, locale), _blocks.c.published_version.is_not(None))
            .values(published_version=None, updated_at=self._clock())
            .returning(_blocks.c.id)
        )
        return result.first() is not None

    async def delete(self, key: str, locale: str) -> bool:
        """Delete the block with all its versions; False when there was no such block."""
        # block_versions go with it: ON DELETE CASCADE (server.db turns foreign keys on in SQLite).
        result = await self._session.execute(sa.delete(_blocks).where(*_block_is(key, locale)).returning(_blocks.c.id))
        return result.first() is not None

    async def versions(self, key: str, locale: str) -> builtins.list[BlockVersion]:
        """Every published version of the block, oldest first."""
        result = await self._session.execute(_block_versions_of(key, locale).order_by(_block_versions.c.version))
        return [_block_version(key, locale, row) for row in result]

    async def version(self, key: str, locale: str, version: int) -> BlockVersion | None:
        result = await self._session.execute(
            _block_versions_of(key, locale).where(_block_versions.c.version == version)
        )
        row = result.first()
        return None if row is None else _block_version(key, locale, row)


def _block_is(key: str, locale: str) -> tuple[sa.ColumnElement[bool], ...]:
    return (_blocks.c.key == key, _blocks.c.locale == locale)


def _block_records() -> _Select:
    # The published document comes with the block in one query: no query per block.
    live = sa.and_(_block_versions.c.block_id == _blocks.c.id, _block_versions.c.version == _blocks.c.published_version)
    return sa.select(
        _blocks.c.key,
        _blocks.c.locale,
        _blocks.c.draft,
        _blocks.c.draft_revision,
        _blocks.c.published_version,
        _blocks.c.latest_version,
        _blocks.c.updated_at,
        _block_versions.c.document.label("published"),
        _block_versions.c.published_at,
    ).select_from(_blocks.outerjoin(_block_versions, live))


def _block_record(row: _Row) -> BlockRecord:
    return BlockRecord(
        key=row.key,
        locale=row.locale,
        draft=row.draft,
        draft_revision=row.draft_revision,
        published_version=row.published_version,
        latest_version=row.latest_version,
        published=row.published,
        published_at=row.published_at,
        updated_at=row.updated_at,
    )


def _block_versions_of(key: str, locale: str) -> _Select:
    return (
        sa.select(_block_versions.c.version, _block_versions.c.document, _block_versions.c.published_at)
        .join(_blocks, _blocks.c.id == _block_versions.c.block_id)
        .where(*_block_is(key, locale))
    )


def _block_version(key: str, locale: str, row: _Row) -> BlockVersion:
    return BlockVersion(
        key=key, locale=locale, version=row.version, document=row.document, published_at=row.published_at
    )


class ProfileRepository(_Repository):
    """Viewer profiles imported in bulk: traits and consent by user id."""

    async def get(self, user_id: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """The profile's (traits, consent), or None when there is no such profile."""
        result = await self._session.execute(
            sa.select(_profiles.c.traits, _profiles.c.consent).where(_profiles.c.user_id == user_id)
        )
        row = result.first()
        return None if row is None else (row.traits, row.consent)

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
        """(traits, consent) of each of these users that has a profile, in one query per 1,000 ids."""
        found: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        ids = list(dict.fromkeys(user_ids))
        for start in range(0, len(ids), 1000):
            result = await self._session.execute(
                sa.select(_profiles.c.user_id, _profiles.c.traits, _profiles.c.consent).where(
                    _profiles.c.user_id.in_(ids[start : start + 1000])
                )
            )
            found.update((row.user_id, (row.traits, row.consent)) for row in result)
        return found

    async def upsert_many(self, profiles: Sequence[dict[str, Any]]) -> int:
        """Write `{"userId", "traits", "consent"?}` objects, replacing traits and consent.

        Returns the number of profiles written; of repeated user ids the last one wins.
        """
        now = self._clock()
        # PostgreSQL refuses to update one row twice in a statement, so repeated ids collapse first.
        rows = {
            profile["userId"]: {
                "user_id": profile["userId"],
                "traits": profile["traits"],
                "consent": profile.get("consent"),
                "updated_at": now,
            }
            for profile in profiles
        }
        if not rows:
            return 0
        insert = self._insert(_profiles)
        statement = insert.on_conflict_do_update(
            index_elements=[_profiles.c.user_id],
            set_={
                "traits": insert.excluded.traits,
                "consent": insert.excluded.consent,
                "updated_at": insert.excluded.updated_at,
            },
        ).returning(_profiles.c.user_id)
        # With RETURNING, SQLAlchemy sends many rows as multi-row INSERTs ("insertmanyvalues"),
        # not one statement per row.
        result = await self._session.execute(statement, list(rows.values()))
        return len(result.all())

    async def count(self) -> int:
        return await _count(self._session, _profiles)

    async def merge_traits(self, user_id: str, traits: dict[str, Any]) -> dict[str, Any]:
        """Set the given traits (identify), keeping the others; creates the profile. Returns them all."""
        current = await self.get(user_id)
        merged = {**(current[0] if current else {}), **traits}
        consent = current[1] if current else None
        await self.upsert_many([{"userId": user_id, "traits": merged, "consent": consent}])
        return merged

    async def delete(self, user_id: str) -> bool:
        result = await self._session.execute(sa.delete(_profiles).where(_profiles.c.user_id == user_id))
        return cast(CursorResult[Any], result).rowcount > 0


class EventRepository(_Repository):
    """Behavioural events, kept once per id."""

    async def insert_many(self, events: Sequence[dict[str, Any]]) -> int:
        return len(await self.insert_new(events))

    async def insert_new(self, events: Sequence[dict[str, Any]]) -> builtins.list[str]:
        """Store `{"id", "type", "userId"?, "anonymousId"?, "at", "properties"}` objects.

        An id that is already stored (or repeated in `events`) keeps its first event. Returns the
        number of events actually inserted.
        """
        now = self._clock()
        rows: dict[str, dict[str, Any]] = {}
        for event in events:
            rows.setdefault(
                event["id"],
                {
                    "id": event["id"],
                    "type": event["type"],
                    "user_id": event.get("userId"),
                    "anonymous_id": event.get("anonymousId"),
                    "at": event["at"],
                    "properties": event.get("properties", {}),
                    "received_at": now,
                },
            )
        if not rows:
            return []
        statement = self._insert(_events).on_conflict_do_nothing(index_elements=[_events.c.id]).returning(_events.c.id)
        result = await self._session.execute(statement, list(rows.values()))
        return [row.id for row in result]

    async def received_since(self, since: datetime, limit: int = 10_000) -> builtins.list[dict[str, Any]]:
        """Events that arrived at or after `since`, by arrival (to follow writes of other processes)."""
        result = await self._session.execute(
            sa.select(*_EVENT_COLUMNS, _events.c.received_at)
            .where(_events.c.received_at >= since)
            .order_by(_events.c.received_at, _events.c.id)
            .limit(limit)
        )
        return [{**_event_document(row), "receivedAt": row.received_at} for row in result]

    async def since(self, since: datetime) -> builtins.list[dict[str, Any]]:
        """Every event that happened after `since` (to rebuild behavioural state), oldest first."""
        result = await self._session.execute(
            sa.select(*_EVENT_COLUMNS)
            .where(_events.c.at > since)
            .order_by(_events.c.at, _events.c.id)
        )
        return [_event_document(row) for row in result]

    async def of_types(
        self,
        types: Sequence[str],
        *,
        user_ids: Sequence[str] | None = None,
        anonymous_ids: Sequence[str] | None = None,
    ) -> builtins.list[dict[str, Any]]:
        """Events of the given types, optionally only of the given viewers; oldest first."""
        if not types:
            return []
        statement = sa.select(*_EVENT_COLUMNS).where(_events.c.type.in_(list(types)))
        if user_ids is not None or anonymous_ids is not None:
            viewers: builtins.list[sa.ColumnElement[bool]] = []
            if user_ids:
                viewers.append(_events.c.user_id.in_(list(user_ids)))
            if anonymous_ids:
                viewers.append(_events.c.anonymous_id.in_(list(anonymous_ids)))
            if not viewers:
                return []
            statement = statement.where(sa.or_(*viewers))
        result = await self._session.execute(statement.order_by(_events.c.at, _events.c.id))
        return [_event_document(row) for row in result]

    async def delete_for(self, *, user_id: str | None, anonymous_ids: Sequence[str]) -> int:
        """Delete a viewer's events (by user id and any of its anonymous ids); returns how many."""
        conditions: builtins.list[sa.ColumnElement[bool]] = (
            [_events.c.anonymous_id.in_(list(anonymous_ids))] if anonymous_ids else []
        )
        if user_id is not None:
            conditions.append(_events.c.user_id == user_id)
        if not conditions:
            return 0
        result = await self._session.execute(sa.delete(_events).where(sa.or_(*conditions)))
        return cast(CursorResult[Any], result).rowcount

    async def for_unit(self, *, user_id: str | None, anonymous_id: str | None, since: datetime) -> list[dict[str, Any]]:
        """The events of a viewer (by user id or by anonymous id) after `since`, oldest first."""
        viewer = [
            column == value
            for column, value in ((_events.c.user_id, user_id), (_events.c.anonymous_id, anonymous_id))
            if value is not None
        ]
        if not viewer:
            return []
        result = await self._session.execute(
            sa.select(*_EVENT_COLUMNS)
            .where(sa.or_(*viewer), _events.c.at > since)
            .order_by(_events.c.at, _events.c.received_at, _events.c.id)
        )
        return [_event_document(row) for row in result]

    async def delete_before(self, at: datetime) -> int:
        """Delete the events that happened before `at` (retention); returns how many went."""
        result = await self._session.execute(sa.delete(_events).where(_events.c.at < at))
        return cast(CursorResult[Any], result).rowcount

    async def count(self) -> int:
        return await _count(self._session, _events)


def _event_document(row: _Row) -> dict[str, Any]:
    document: dict[str, Any] = {"id": row.id, "type": row.type}
    if row.user_id is not None:
        document["userId"] = row.user_id
    if row.anonymous_id is not None:
        document["anonymousId"] = row.anonymous_id
    document["at"] = row.at
    document["properties"] = row.properties
    return document


class IdentityRepository(_Repository):
    """Anonymous ids joined to user ids (identify, alias)."""

    async def link(self, anonymous_id: str, user_id: str) -> bool:
        """Join `anonymous_id` to `user_id`; False when it was joined already (to anyone: first wins)."""
        statement = (
            self._insert(_identities)
            .values(anonymous_id=anonymous_id, user_id=user_id, created_at=self._clock())
            .on_conflict_do_nothing(index_elements=[_identities.c.anonymous_id])
            .returning(_identities.c.anonymous_id)
        )
        return (await self._session.execute(statement)).first() is not None

    async def users_of(self, anonymous_ids: Collection[str]) -> dict[str, str]:
        """The user each of ``anonymous_ids`` is joined to: the joined ones only."""
        ids, found = builtins.list(anonymous_ids), {}
        for start in range(0, len(ids), 500):
            result = await self._session.execute(
                sa.select(_identities.c.anonymous_id, _identities.c.user_id).where(
                    _identities.c.anonymous_id.in_(ids[start : start + 500])
                )
            )
            found.update({row.anonymous_id: row.user_id for row in result})
        return found

    async def anonymous_ids_of(self, user_id: str) -> builtins.list[str]:
        result = await self._session.execute(
            sa.select(_identities.c.anonymous_id)
            .where(_identities.c.user_id == user_id)
            .order_by(_identities.c.anonymous_id)
        )
        return list(result.scalars())

    async def all(self) -> builtins.list[tuple[str, str]]:
        result = await self._session.execute(sa.select(_identities.c.anonymous_id, _identities.c.user_id))
        return [(row.anonymous_id, row.user_id) for row in result]

    async def delete_for(self, *, user_id: str | None, anonymous_id: str | None) -> int:
        conditions = []
        if user_id is not None:
            conditions.append(_identities.c.user_id == user_id)
        if anonymous_id is not None:
            conditions.append(_identities.c.anonymous_id == anonymous_id)
        if not conditions:
            return 0
        result = await self._session.execute(sa.delete(_identities).where(sa.or_(*conditions)))
        return cast(CursorResult[Any], result).rowcount


class ApiKeyRepository(_Repository):
    """API keys, stored by the hash of their secret."""

    async def create(self, *, name: str, scope: str, prefix: str, key_hash: str) -> ApiKeyRecord:
        created_at = self._clock()
        result = await self._session.execute(
            sa.insert(_api_keys)
            .values(name=name, scope=scope, prefix=prefix, hash=key_hash, created_at=created_at)
            .returning(*_api_key_columns)
        )
        return _api_key_record(result.one())

    async def find_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash, revoked or not: the caller decides what a revoked key means."""
        result = await self._session.execute(sa.select(*_api_key_columns).where(_api_keys.c.hash == key_hash))
        row = result.first()
        return None if row is None else _api_key_record(row)

    async def list(self) -> list[ApiKeyRecord]:
        result = await self._session.execute(sa.select(*_api_key_columns).order_by(_api_keys.c.id))
        return [_api_key_record(row) for row in result]

    async def revoke(self, key_id: int, at: datetime) -> bool:
        """Revoke the key; False when there is no such key or it was already revoked."""
        result = await self._session.execute(
            sa.update(_api_keys)
            .where(_api_keys.c.id == key_id, _api_keys.c.revoked_at.is_(None))
            .values(revoked_at=at)
            .returning(_api_keys.c.id)
        )
        return result.first() is not None

    async def touch(self, key_id: int, at: datetime) -> None:
        await self._session.execute(sa.update(_api_keys).where(_api_keys.c.id == key_id).values(last_used_at=at))


_api_key_columns: Final = tuple(
    _api_keys.c[name] for name in ("id", "name", "scope", "prefix", "created_at", "revoked_at", "last_used_at")
)


def _api_key_record(row: _Row) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row.id,
        name=row.name,
        scope=row.scope,
        prefix=row.prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


async def _count(session: AsyncSession, table: sa.Table) -> int:
    result = await session.execute(sa.select(sa.func.count()).select_from(table))
    return int(result.scalar_one())


async def load_state(session: AsyncSession) -> StoreState:
    """Read everything a snapshot is built from: the space, all configuration and all blocks.

    Give it a session of its own: on a session that has not started its transaction yet, the
    reads share one snapshot of the database even on PostgreSQL (REPEATABLE READ), so a publish
    committing meanwhile is either wholly in the state or wholly absent.
    """
    if not session.in_transaction() and session.get_bind().dialect.name == "postgresql":
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    space = (
        await session.execute(sa.select(_space.c.content_version, _space.c.locales).where(_space.c.id == _SPACE_ID))
    ).one()
    configs = ConfigRepository(session)
    return StoreState(
        content_version=space.content_version,
        locales=space.locales,
        placements=await configs.list("placements"),
        segments=await configs.list("segments"),
        scores=await configs.list("scores"),
        flags=await configs.list("flags"),
        experiments=await configs.list("experiments"),
        blocks=await BlockRepository(session).list(),
    )

"""The repositories of server/store.py, on PostgreSQL and on SQLite."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine.interfaces import ExecuteStyle
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from server import models
from server.store import (
    CONFIG_KINDS,
    ApiKeyRepository,
    BlockRepository,
    ConfigRepository,
    EventRepository,
    NotFound,
    ProfileRepository,
    SpaceRepository,
    StoreError,
    load_state,
)

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


class Clock:
    """A clock that only moves when told to."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@pytest.fixture
async def session(session_maker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with session_maker() as session:
        yield session


@pytest.fixture
def clock() -> Clock:
    return Clock()


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Collect the SQL statements sent to the database (not the BEGINs of SQLite).

    A DBAPI executemany() counts once per parameter set: it is one statement per row. (A batch of
    SQLAlchemy's "insertmanyvalues" is reported as executemany too, but it is one statement.)
    """
    sent: list[str] = []

    def record(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if statement.strip().upper() == "BEGIN":
            return
        row_by_row = executemany and context.execute_style is ExecuteStyle.EXECUTEMANY
        sent.extend([statement] * (len(parameters) if row_by_row else 1))

    sa.event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", record)


async def column_values(session: AsyncSession, table: str, *columns: str, **where: Any) -> sa.Row[Any]:
    t = models.Base.metadata.tables[table]
    statement = sa.select(*(t.c[c] for c in columns)).where(*(t.c[k] == v for k, v in where.items()))
    return (await session.execute(statement)).one()


# --- factories -------------------------------------------------------------------------------


def config_document(kind: str, key: str, **fields: Any) -> dict[str, Any]:
    defaults: dict[str, dict[str, Any]] = {
        "placements": {"name": "Home page hero", "limit": 1},
        "segments": {
            "name": "Gold tier",
            "priority": 20,
            "rule": {"trait": "tier", "op": "eq", "value": "gold"},
        },
        "scores": {"events": {"page_view": 1}, "half_life": "7d"},
        "flags": {"name": "New hero", "enabled": True, "rollout": 25.5, "salt": key},
        "experiments": {"name": "Spring hero test", "goal": {"event": "purchase"}},
    }
    return {"key": key, **defaults[kind], **fields}


def block_document(key: str = "hero-main", locale: str = "en-US", **fields: Any) -> dict[str, Any]:
    return {
        "key": key,
        "type": "hero",
        "locale": locale,
        "tags": ["home"],
        "status": "draft",
        "placements": [{"key": "home-hero", "priority": 10}],
        "fields": {"title": "Welcome", "cta": {"label": "Shop now", "href": "/shop"}},
        "variants": [],
        **fields,
    }


def profile(user_id: str, traits: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"userId": user_id, "traits": traits if traits is not None else {"tier": "gold"}, **extra}


def event(
    event_id: str,
    *,
    at: datetime = T0,
    type: str = "product_viewed",
    user_id: str | None = None,
    anonymous_id: str | None = None,
    **properties: Any,
) -> dict[str, Any]:
    document: dict[str, Any] = {"id": event_id, "type": type}
    if user_id is not None:
        document["userId"] = user_id
    if anonymous_id is not None:
        document["anonymousId"] = anonymous_id
    document["at"] = at
    document["properties"] = properties
    return document


# --- space -----------------------------------------------------------------------------------


async def test_a_new_space_is_at_version_zero_with_en_us(session: AsyncSession) -> None:
    space = SpaceRepository(session)

    assert await space.content_version() == 0
    assert await space.locales() == {"default": "en-US", "fallbacks": {}}


async def test_bump_version_returns_each_new_version(session: AsyncSession) -> None:
    space = SpaceRepository(session)

    first, second = await space.bump_version(), await space.bump_version()

    assert (first, second) == (1, 2)
    assert await space.content_version() == 2


async def test_concurrent_bumps_each_get_their_own_version(
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    async def bump() -> int:
        async with session_maker() as session, session.begin():
            return await SpaceRepository(session).bump_version()

    versions = await asyncio.gather(*(bump() for _ in range(8)))

    assert sorted(versions) == list(range(1, 9))


async def test_set_locales_reports_whether_they_changed(session: AsyncSession, clock: Clock) -> None:
    space = SpaceRepository(session, clock=clock)
    locales = {"default": "de-DE", "fallbacks": {"de-AT": "de-DE"}}

    changed = await space.set_locales(locales)
    clock.advance(minutes=1)
    changed_again = await space.set_locales(dict(locales))

    assert (changed, changed_again) == (True, False)
    assert await space.locales() == locales
    assert (await column_values(session, "space", "updated_at", id=1)).updated_at == T0


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CONFIG_KINDS)
async def test_config_documents_round_trip_in_key_order(session: AsyncSession, kind: str) -> None:
    configs = ConfigRepository(session)
    documents = [config_document(kind, key) for key in ("zeta", "alpha", "mid")]

    written = [await configs.upsert(kind, document) for document in documents]

    assert written == [True, True, True]
    assert await configs.list(kind) == sorted(documents, key=lambda d: d["key"])
    assert await configs.get(kind, "alpha") == documents[1]
    assert await configs.get(kind, "missing") is None


async def test_config_documents_keep_their_key_order_and_values(session: AsyncSession) -> None:
    # Export promises the documents back as imported: key order and all.
    configs = ConfigRepository(session)
    document = {
        "salt": "s",
        "key": "flag-1",
        "enabled": True,
        "rollout": 25.5,
        "name": "Ünïcode ✓",
        "audience": None,
        "big": 2**53 + 1,
        "nested": {"z": [1, 2.5, "three", None, False], "a": {}},
    }

    await configs.upsert("flags", document)
    stored = await configs.get("flags", "flag-1")

    assert json.dumps(stored) == json.dumps(document)


async def test_upserting_an_equal_document_writes_nothing(session: AsyncSession, clock: Clock) -> None:
    configs = ConfigRepository(session, clock=clock)
    await configs.upsert("segments", config_document("segments", "gold"))
    clock.advance(minutes=1)

    written = await configs.upsert("segments", config_document("segments", "gold"))

    assert written is False
    assert (await column_values(session, "segments", "updated_at", key="gold")).updated_at == T0


async def test_upserting_a_changed_document_replaces_it_and_its_listed_columns(
    session: AsyncSession, clock: Clock
) -> None:
    configs = ConfigRepository(session, clock=clock)
    await configs.upsert("flags", config_document("flags", "new-hero", name="Old", enabled=True))
    later = clock.advance(minutes=1)
    changed = config_document("flags", "new-hero", name="New", enabled=False)

    written = await configs.upsert("flags", changed)

    assert written is True
    assert await configs.get("flags", "new-hero") == changed
    row = await column_values(session, "flags", "name", "enabled", "created_at", "updated_at", key="new-hero")
    assert tuple(row) == ("New", False, T0, later)


async def test_listed_columns_default_when_the_document_lacks_them(session: AsyncSession) -> None:
    configs = ConfigRepository(session)

    await configs.upsert("segments", {"key": "plain", "rule": {"trait": "x", "op": "exists"}})
    await configs.upsert("flags", {"key": "bare"})

    assert tuple(await column_values(session, "segments", "name", "priority", key="plain")) == ("", 0)
    assert tuple(await column_values(session, "flags", "name", "enabled", key="bare")) == ("", False)


async def test_config_kinds_are_separate(session: AsyncSession) -> None:
    configs = ConfigRepository(session)

    await configs.upsert("segments", config_document("segments", "gold"))

    assert await configs.get("flags", "gold") is None
    assert await configs.list("placements") == []


async def test_delete_config_reports_whether_it_existed(session: AsyncSession) -> None:
    configs = ConfigRepository(session)
    await configs.upsert("placements", config_document("placements", "home-hero"))

    deleted, deleted_again = (
        await configs.delete("placements", "home-hero"),
        await configs.delete("placements", "home-hero"),
    )

    assert (deleted, deleted_again) == (True, False)
    assert await configs.get("placements", "home-hero") is None


async def test_an_unknown_config_kind_is_refused(session: AsyncSession) -> None:
    with pytest.raises(ValueError, match="unknown configuration kind 'blocks'"):
        await ConfigRepository(session).list("blocks")


# --- blocks ----------------------------------------------------------------------------------


async def test_a_new_draft_is_revision_one_and_unpublished(session: AsyncSession, clock: Clock) -> None:
    blocks = BlockRepository(session, clock=clock)
    draft = block_document()

    saved = await blocks.save_draft(draft)
    record = await blocks.get("hero-main", "en-US")

    assert saved is True
    assert record is not None
    assert (record.key, record.locale, record.draft, record.draft_revision) == (
        "hero-main",
        "en-US",
        draft,
        1,
    )
    assert (record.published_version, record.latest_version, record.published, record.published_at) == (
        None,
        0,
        None,
        None,
    )
    assert record.updated_at == T0


async def test_saving_an_equal_draft_writes_nothing(session: AsyncSession, clock: Clock) -> None:
    blocks = BlockRepository(session, clock=clock)
    await blocks.save_draft(block_document())
    clock.advance(minutes=1)

    saved = await blocks.save_draft(block_document())

    record = await blocks.get("hero-main", "en-US")
    assert saved is False
    assert record is not None
    assert (record.draft_revision, record.updated_at) == (1, T0)


async def test_saving_a_changed_draft_bumps_its_revision(session: AsyncSession, clock: Clock) -> None:
    blocks = BlockRepository(session, clock=clock)
    await blocks.save_draft(block_document())
    later = clock.advance(minutes=1)
    changed = block_document(type="banner", fields={"title": "Hello"})

    saved = await blocks.save_draft(changed)

    record = await blocks.get("hero-main", "en-US")
    assert saved is True
    assert record is not None
    assert (record.draft, record.draft_revision, record.updated_at) == (changed, 2, later)
    assert (await column_values(session, "blocks", "type", key="hero-main")).type == "banner"


async def test_publish_makes_the_draft_the_live_version(session: AsyncSession) -> None:
    blocks = BlockRepository(session)
    draft = block_document(status="published")
    await blocks.save_draft(draft)

    version = await blocks.publish("hero-main", "en-US", T0)

    record = await blocks.get("hero-main", "en-US")
    assert version == 1
    assert record is not None
    assert (record.published_version, record.latest_version) == (1, 1)
    assert (record.published, record.published_at) == (draft, T0)


async def test_every_publish_is_a_new_immutable_version(session: AsyncSession) -> None:
    blocks = BlockRepository(session)
    first, second = block_document(fields={"title": "One"}), block_document(fields={"title": "Two"})
    await blocks.save_draft(first)
    await blocks.publish("hero-main", "en-US", T0)
    await blocks.save_draft(second)

    version = await blocks.publish("hero-main", "en-US", T0 + timedelta(hours=1))

    record = await blocks.get("hero-main", "en-US")
    assert version == 2
    assert record is not None
    assert record.published == second
    history = await blocks.versions("hero-main", "en-US")
    assert [(v.version, v.document, v.published_at) for v in history] == [
        (1, first, T0),
        (2, second, T0 + timedelta(hours=1)),
    ]
    one = await blocks.version("hero-main", "en-US", 1)
    assert one is not None
    assert (one.key, one.locale, one.version, one.document) == ("hero-main", "en-US", 1, first)
    assert await blocks.version("hero-main", "en-US", 3) is None


async def test_publish_times_come_back_in_utc(session: AsyncSession) -> None:
    blocks = BlockRepository(session)
    await blocks.save_draft(block_document())
    at = datetime(2026, 11, 20, 12, 0, tzinfo=timezone(timedelta(hours=2)))

    await blocks.publish("hero-main", "en-US", at)

    record = await blocks.get("hero-main", "en-US")
    assert record is not None
    assert record.published_at == at
    assert record.published_at is not None
    assert record.published_at.tzinfo == UTC


async def test_publishing_a_missing_block_raises_not_found(session: AsyncSession) -> None:
    with pytest.raises(NotFound, match="no block 'nope' in locale 'en-US'") as raised:
        await BlockRepository(session).publish("nope", "en-US", T0)

    assert isinstance(raised.value, StoreError)


async def test_unpublish_takes_the_block_off_and_keeps_its_versions(session: AsyncSession) -> None:
    blocks = BlockRepository(session)
    await blocks.save_draft(block_document())
    await blocks.publish("hero-main", "en-US", T0)

    unpublished, unpublished_again = (
        await blocks.unpublish("hero-main", "en-US"),
        await blocks.unpublish("hero-main", "en-US"),
    )
    republished = await blocks.publish("hero-main", "en-US", T0)

    assert (unpublished, unpublished_again, republished) == (True, False, 2)
    assert [v.version for v in await blocks.versions("hero-main", "en-US")] == [1, 2]
    assert await blocks.unpublish("missing", "en-US") is False


async def test_unpublished_block_has_no_live_document(session: AsyncSession) -> None:
    blocks = BlockRepository(session)
    await blocks.save_draft(block_document())
    await blocks.publish("hero-main", "en-US", T0)

    await blocks.unpublish("hero-main", "en-US")

    record = await blocks.get("hero-main", "en-US")
    assert record is not None
    assert (record.published_version, record.latest_version, record.published, record.published_at) == (
        None,
        1,
        None,
        None,
    )


async def test_delete_removes_the_block_and_its_versions(session: AsyncSession) -> None:
    blocks = BlockRepository(session)
    await blocks.save_draft(block_document())
    await blocks.save_draft(block_document(locale="de-DE"))
    await blocks.publish("hero-main", "en-US", T0)
    await blocks.publish("hero-main", "de-DE", T0)

    deleted, deleted_again = (
        await blocks.delete("hero-main", "en-US"),
        await blocks.delete("hero-main", "en-US"),
    )

    assert (deleted, deleted_again) == (True, False)
    assert await blocks.get("hero-main", "en-US") is None
    assert await blocks.versions("hero-main", "en-US") == []
    remaining = await session.execute(sa.select(sa.func.count()).select_from(models.BlockVersion))
    assert remaining.scalar_one() == 1  # the de-DE version, cascaded rows gone


async def test_blocks_are_listed_by_key_then_locale(session: AsyncSession) -> None:
    blocks = BlockRepository(session)
    for key, locale in [("b", "en-US"), ("a", "en-US"), ("b", "de-DE")]:
        await blocks.save_draft(block_document(key, locale))
    await blocks.publish("b", "de-DE", T0)

    listed = await blocks.list()

    assert [(r.key, r.locale, r.published_version) for r in listed] == [
        ("a", "en-US", None),
        ("b", "de-DE", 1),
        ("b", "en-US", None),
    ]


# --- profiles --------------------------------------------------------------------------------


async def test_a_missing_profile_is_none(session: AsyncSession) -> None:
    assert await ProfileRepository(session).get("u-1") is None


async def test_upsert_many_writes_and_replaces_profiles(session: AsyncSession) -> None:
    profiles = ProfileRepository(session)
    await profiles.upsert_many(
        [profile("u-1", {"tier": "gold", "name": "Ada"}, consent={"personalization": True}), profile("u-2")]
    )

    written = await profiles.upsert_many([profile("u-1", {"tier": "silver"}), profile("u-3")])

    assert written == 2
    assert await profiles.get("u-1") == ({"tier": "silver"}, None)
    assert await profiles.get("u-2") == ({"tier": "gold"}, None)
    assert await profiles.count() == 3


async def test_upsert_many_keeps_the_last_of_repeated_user_ids(session: AsyncSession) -> None:
    profiles = ProfileRepository(session)

    written = await profiles.upsert_many(
        [profile("u-1", {"n": 1}), profile("u-1", {"n": 2}, consent={"personalization": False})]
    )

    assert written == 1
    assert await profiles.get("u-1") == ({"n": 2}, {"personalization": False})


async def test_upsert_many_of_nothing_writes_nothing(session: AsyncSession) -> None:
    assert await ProfileRepository(session).upsert_many([]) == 0


async def test_a_thousand_profiles_are_one_statement(session: AsyncSession, engine: AsyncEngine) -> None:
    profiles = ProfileRepository(session)
    await profiles.upsert_many([profile(f"u-{i}") for i in range(0, 1000, 2)])

    with statements(engine) as sent:
        written = await profiles.upsert_many([profile(f"u-{i}", {"i": i}) for i in range(1000)])

    assert written == 1000
    assert len(sent) == 1
    assert await profiles.count() == 1000
    assert await profiles.get("u-998") == ({"i": 998}, None)


# --- events ----------------------------------------------------------------------------------


async def test_insert_many_keeps_the_first_event_of_an_id(session: AsyncSession) -> None:
    events = EventRepository(session)
    await events.insert_many([event("e-1", user_id="u-1", sku="first")])

    inserted = await events.insert_many(
        [
            event("e-1", user_id="u-1", sku="again"),
            event("e-2", user_id="u-1", sku="second"),
            event("e-2", user_id="u-1", sku="repeated"),
        ]
    )

    assert inserted == 1
    assert await events.count() == 2
    stored = await events.for_unit(user_id="u-1", anonymous_id=None, since=T0 - timedelta(days=1))
    assert [e["properties"]["sku"] for e in sorted(stored, key=lambda e: e["id"])] == ["first", "second"]


async def test_for_unit_gives_a_viewers_events_after_since_oldest_first(session: AsyncSession) -> None:
    events = EventRepository(session)
    mine = [
        event("e-3", at=T0 + timedelta(minutes=3), user_id="u-1"),
        event("e-1", at=T0 + timedelta(minutes=1), anonymous_id="a-1", sku="A1"),
        event("e-2", at=T0 + timedelta(minutes=2), user_id="u-1", anonymous_id="a-1"),
    ]
    others = [
        event("e-0", at=T0, user_id="u-1"),  # not after `since`
        event("e-4", at=T0 + timedelta(minutes=4), user_id="u-2"),
        event("e-5", at=T0 + timedelta(minutes=5), anonymous_id="a-2"),
    ]
    await events.insert_many(mine + others)

    found = await events.for_unit(user_id="u-1", anonymous_id="a-1", since=T0)

    assert found == sorted(mine, key=lambda e: e["at"])
    assert all(e["at"].tzinfo == UTC for e in found)


async def test_for_unit_by_one_identity_only(session: AsyncSession) -> None:
    events = EventRepository(session)
    await events.insert_many(
        [
            event("e-1", user_id="u-1"),
            event("e-2", anonymous_id="a-1"),
            event("e-3", user_id="u-1", anonymous_id="a-1"),
        ]
    )
    since = T0 - timedelta(seconds=1)

    by_user = await events.for_unit(user_id="u-1", anonymous_id=None, since=since)
    by_anonymous = await events.for_unit(user_id=None, anonymous_id="a-1", since=since)
    by_nobody = await events.for_unit(user_id=None, anonymous_id=None, since=since)

    assert sorted(e["id"] for e in by_user) == ["e-1", "e-3"]
    assert sorted(e["id"] for e in by_anonymous) == ["e-2", "e-3"]
    assert by_nobody == []


async def test_a_thousand_events_are_one_statement(session: AsyncSession, engine: AsyncEngine) -> None:
    events = EventRepository(session)
    batch = [event(f"e-{i}", at=T0 + timedelta(seconds=i), user_id=f"u-{i % 10}", n=i) for i in range(1000)]

    with statements(engine) as sent:
        inserted = await events.insert_many(batch)

    assert inserted == 1000
    assert len(sent) == 1
    assert await events.count() == 1000


async def test_delete_before_drops_older_events(session: AsyncSession) -> None:
    events = EventRepository(session)
    await events.insert_many([event(f"e-{i}", at=T0 + timedelta(days=i), user_id="u-1") for i in range(5)])

    deleted = await events.delete_before(T0 + timedelta(days=2))

    assert deleted == 2
    assert await events.count() == 3


async def test_naive_timestamps_are_refused(session: AsyncSession) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        await EventRepository(session).insert_many([event("e-1", at=datetime(2026, 1, 1), user_id="u-1")])


# --- API keys --------------------------------------------------------------------------------


async def test_a_created_key_is_found_by_its_hash(session: AsyncSession, clock: Clock) -> None:
    keys = ApiKeyRepository(session, clock=clock)

    created = await keys.create(name="CI", scope="admin", prefix="tess_admin_x", key_hash="a" * 64)

    assert (created.name, created.scope, created.prefix, created.created_at) == (
        "CI",
        "admin",
        "tess_admin_x",
        T0,
    )
    assert (created.revoked_at, created.last_used_at) == (None, None)
    assert await keys.find_by_hash("a" * 64) == created
    assert await keys.find_by_hash("b" * 64) is None


async def test_keys_are_listed_in_creation_order(session: AsyncSession) -> None:
    keys = ApiKeyRepository(session)
    for i, scope in enumerate(["delivery", "preview", "ingest"]):
        await keys.create(name=f"k{i}", scope=scope, prefix=f"p{i}", key_hash=str(i) * 64)

    assert [k.name for k in await keys.list()] == ["k0", "k1", "k2"]


async def test_revoke_marks_the_key_once(session: AsyncSession) -> None:
    keys = ApiKeyRepository(session)
    created = await keys.create(name="", scope="delivery", prefix="p", key_hash="a" * 64)

    revoked, revoked_again = await keys.revoke(created.id, T0), await keys.revoke(created.id, T0)

    assert (revoked, revoked_again) == (True, False)
    found = await keys.find_by_hash("a" * 64)
    assert found is not None
    assert found.revoked_at == T0
    assert await keys.revoke(created.id + 1, T0) is False


async def test_touch_records_the_last_use(session: AsyncSession) -> None:
    keys = ApiKeyRepository(session)
    created = await keys.create(name="", scope="delivery", prefix="p", key_hash="a" * 64)

    await keys.touch(created.id, T0 + timedelta(hours=1))

    found = await keys.find_by_hash("a" * 64)
    assert found is not None
    assert found.last_used_at == T0 + timedelta(hours=1)


async def test_an_unknown_scope_is_refused_by_the_database(session: AsyncSession) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        await ApiKeyRepository(session).create(name="", scope="root", prefix="p", key_hash="a" * 64)


async def test_a_hash_is_unique(session: AsyncSession) -> None:
    keys = ApiKeyRepository(session)
    await keys.create(name="", scope="delivery", prefix="p", key_hash="a" * 64)

    with pytest.raises(sa.exc.IntegrityError):
        await keys.create(name="", scope="admin", prefix="p", key_hash="a" * 64)


# --- transactions and the snapshot state -----------------------------------------------------


async def test_repositories_leave_the_commit_to_the_caller(
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    async with session_maker() as session:
        await ConfigRepository(session).upsert("segments", config_document("segments", "gold"))
        await BlockRepository(session).save_draft(block_document())
        await SpaceRepository(session).bump_version()
        await session.rollback()

    async with session_maker() as session:
        assert await ConfigRepository(session).list("segments") == []
        assert await BlockRepository(session).list() == []
        assert await SpaceRepository(session).content_version() == 0


async def test_committed_writes_are_seen_by_other_sessions(
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    async with session_maker() as session, session.begin():
        await ConfigRepository(session).upsert("segments", config_document("segments", "gold"))

    async with session_maker() as session:
        assert await ConfigRepository(session).get("segments", "gold") == config_document("segments", "gold")


async def test_load_state_of_an_empty_space(session: AsyncSession) -> None:
    state = await load_state(session)

    assert (state.content_version, state.locales) == (0, {"default": "en-US", "fallbacks": {}})
    assert (state.placements, state.segments, state.scores, state.flags, state.experiments, state.blocks) == (
        [],
        [],
        [],
        [],
        [],
        [],
    )


async def test_load_state_reads_everything_in_a_fixed_number_of_queries(
    session_maker: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> None:
    async with session_maker() as session, session.begin():
        configs, blocks = ConfigRepository(session), BlockRepository(session)
        for kind in CONFIG_KINDS:
            await configs.upsert(kind, config_document(kind, f"{kind}-1"))
        for i in range(20):
            await blocks.save_draft(block_document(f"block-{i:02}"))
            if i % 2 == 0:
                await blocks.publish(f"block-{i:02}", "en-US", T0)
        await SpaceRepository(session).bump_version()

    with statements(engine) as sent:
        async with session_maker() as session:
            state = await load_state(session)

    assert len([s for s in sent if s.lstrip().upper().startswith("SELECT")]) == 7
    assert state.content_version == 1
    assert state.segments == [config_document("segments", "segments-1")]
    assert state.experiments == [config_document("experiments", "experiments-1")]
    assert [b.key for b in state.blocks] == [f"block-{i:02}" for i in range(20)]
    assert [b.published for b in state.blocks[:2]] == [block_document("block-00"), None]

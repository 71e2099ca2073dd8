"""Events of issue 3 (server/events.py and the ``track`` mutation): checked at the edge, each invalid
event rejected with its path while the valid ones are accepted; duplicates by id counted once (the
first one received kept); durable and readable by the very next query (read-your-writes); and events
imported through ``importBundle`` or ``tessera import --events`` counting exactly like tracked ones.
End to end in both modes (embedded SQLite; PostgreSQL with Redis), plus the edge checks as plain
functions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis.asyncio as aioredis
from fixtures_app import T0, FakeClock

from content.errors import Problem
from server.db import create_engine, session_factory
from server.events import LocalEventStore, RedisEventStore, Tracked, check_tracked
from server.ingest import Ingestor, IngestResult
from server.settings import Limits
from tests.server.factories import block, bundle, given, import_bundle, placed, placement
from tests.server.test_worker import MODES, SCORES, SEGMENTS, Backend, Live, change, choose_backend, event, live_app

LIMITS = Limits(retention=timedelta(days=90))
RULES = bundle(
    segments=SEGMENTS,
    scores=SCORES,
    placements=[placement("home-hero")],
    blocks=[block("shoe-deals", placements=[placed("home-hero")], audience={"segment": "shoe-browser"})],
)
PLACEMENT = """
query Placement($viewer: ViewerInput) { placement(key: "home-hero", viewer: $viewer) { blocks { key } } }
"""


@pytest.fixture(params=MODES)
def backend(request: pytest.FixtureRequest) -> Backend:
    return choose_backend(request)


@pytest.fixture
async def live(backend: Backend) -> AsyncIterator[Live]:
    async with live_app(backend, document=RULES) as running:
        yield running


def shoe_view(user: str | None = None, **fields: Any) -> dict[str, Any]:
    return event("product_viewed", user, category="shoes", **fields)


def check(raw: object, *, now: datetime = T0, strict: bool = False) -> Tracked | list[str]:
    checked = check_tracked(raw, "events[0]", now=now, limits=LIMITS, require_id_and_time=strict)
    return [str(p) for p in checked] if isinstance(checked, list) else checked


# -- the edge: check_tracked ---------------------------------------------------------------------------


def test_an_event_without_id_or_time_gets_both() -> None:
    checked = check({"type": "page_view", "anonymousId": "a-1", "id": ""})

    assert isinstance(checked, Tracked)
    assert checked.id.startswith("tess-")
    assert (checked.at, checked.user_id, checked.anonymous_id, checked.properties) == (T0, None, "a-1", {})


def test_numeric_ids_are_strings_and_an_empty_id_is_no_id() -> None:
    checked = check({"type": "page_view", "userId": 42, "anonymousId": "", "id": 7})

    assert isinstance(checked, Tracked)
    assert (checked.id, checked.user_id, checked.anonymous_id, checked.unit) == ("7", "42", None, "u:42")


@pytest.fixture
def berlin_local_time() -> Iterator[None]:
    """The process's local time zone is Europe/Berlin (an instant must not depend on it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", "Europe/Berlin")
        time.tzset()
        yield
    time.tzset()


@pytest.mark.usefixtures("berlin_local_time")
@pytest.mark.parametrize(
    "at",
    [
        pytest.param("2026-11-20T11:00:00", id="string"),
        pytest.param(datetime(2026, 11, 20, 11, 0), id="naive-datetime"),  # what GraphQL's DateTime gives
        pytest.param(datetime(2026, 11, 20, 12, 0, tzinfo=timezone(timedelta(hours=1))), id="offset-datetime"),
    ],
)
def test_a_time_without_an_offset_is_utc(at: object) -> None:
    checked = check({"type": "page_view", "userId": "u-1", "at": at})

    assert isinstance(checked, Tracked)
    assert checked.at == T0 - timedelta(hours=1)
    assert checked.at.utcoffset() == timedelta(0)


def test_times_are_bounded_by_the_clock_skew_and_the_retention_period() -> None:
    ahead, old = T0 + timedelta(minutes=10), T0 - timedelta(days=90)
    assert isinstance(check({"type": "x", "userId": "u", "at": ahead.isoformat()}), Tracked)
    assert isinstance(check({"type": "x", "userId": "u", "at": (old + timedelta(microseconds=1)).isoformat()}), Tracked)

    too_far = (ahead + timedelta(microseconds=1)).isoformat()
    assert check({"type": "x", "userId": "u", "at": too_far}) == [
        f"events[0].at: {too_far} is more than 0:10:00 ahead of the server clock"
    ]
    assert check({"type": "x", "userId": "u", "at": old.isoformat()}) == [
        f"events[0].at: {old.isoformat()} is older than the retention period (90 days)"
    ]
    assert check({"type": "x", "userId": "u", "at": "yesterday"}) == [
        "events[0].at: must be an ISO 8601 date-time, not 'yesterday'"
    ]


def test_every_problem_of_an_event_is_reported_with_its_path() -> None:
    problems = check({"type": "", "userId": ["u"], "colour": "red", "properties": [1]})

    assert problems == [
        "events[0].colour: unexpected key 'colour'",
        "events[0].type: an event needs a non-empty type",
        "events[0].userId: must be a string, not list",
        "events[0].properties: must be a JSON object, not list",
    ]
    assert check("page_view") == ["events[0]: an event must be a JSON object, not string"]
    assert check({"type": "page_view"}) == ["events[0].userId: an event needs a userId or an anonymousId"]


def test_an_event_is_at_most_32_kb() -> None:
    problems = check({"type": "page_view", "userId": "u-1", "properties": {"blob": "x" * 32 * 1024}})

    assert isinstance(problems, list)
    assert len(problems) == 1
    assert problems[0].startswith("events[0]: is ")
    assert problems[0].endswith("bytes; an event may have at most 32768")


def test_imported_events_need_an_id_and_a_time() -> None:
    assert check({"type": "page_view", "userId": "u-1"}, strict=True) == [
        "events[0].id: an event needs a non-empty id",
        "events[0].at: an event needs 'at' (an ISO 8601 date-time)",
    ]


# -- track: validation, duplicates, read-your-writes ---------------------------------------------------


async def test_invalid_events_are_rejected_with_their_paths_and_the_valid_ones_accepted(live: Live) -> None:
    result = await live.send(
        shoe_view("u-1"),
        {"type": "product_viewed"},  # nobody
        shoe_view("u-1", at=T0 + timedelta(hours=1)),  # too far ahead
        {"type": "", "userId": "u-1"},
        shoe_view("u-1"),
        shoe_view("u-1", id="x" * 300),
        shoe_view("u-1"),
    )

    assert result == {
        "accepted": 3,
        "rejected": 4,
        "errors": [
            "events[1].userId: an event needs a userId or an anonymousId",
            "events[2].at: 2026-11-20 13:00:00+00:00 is more than 0:10:00 ahead of the server clock",
            "events[3].type: an event needs a non-empty type",
            "events[5].id: is longer than 256 characters",
        ],
    }
    assert len(await live.stored(user_id="u-1")) == 3
    assert await live.segments(userId="u-1") == ["shoe-browser"]


async def test_a_query_right_after_track_reflects_the_events(live: Live) -> None:
    # Given a viewer one shoe view short of the segment
    await live.send(shoe_view("u-1"), shoe_view("u-1"))
    assert await live.segments(userId="u-1") == []

    # When the third is tracked, and nothing else has happened yet (no worker has run in the Redis mode)
    await live.track(shoe_view("u-1"))

    # Then the next query of that viewer sees it: segments and the blocks they select
    assert await live.segments(userId="u-1") == ["shoe-browser"]
    reply = await live.running.graphql(PLACEMENT, {"viewer": {"userId": "u-1"}})
    assert reply.data == {"placement": {"blocks": [{"key": "shoe-deals"}]}}
    # ... and other viewers do not
    reply = await live.running.graphql(PLACEMENT, {"viewer": {"userId": "u-2"}})
    assert reply.data == {"placement": {"blocks": []}}


async def test_an_event_id_sent_twice_in_one_batch_counts_once(live: Live) -> None:
    result = await live.send(shoe_view("u-1", id="e-1"), shoe_view("u-1", id="e-1"), shoe_view("u-1", id="e-2"))

    assert result == {"accepted": 3, "rejected": 0, "errors": []}
    assert sorted(await live.stored(user_id="u-1")) == ["e-1", "e-2"]
    assert await live.state(["product_viewed"], user_id="u-1") == ["e-1", "e-2"]
    assert await live.segments(userId="u-1") == []
    assert await live.announced() == []


async def test_an_event_id_sent_again_in_a_later_batch_counts_once(live: Live) -> None:
    await live.send(shoe_view("u-1", id="e-1"), shoe_view("u-1", id="e-2"))
    live.clock.advance(seconds=5)
    result = await live.send(shoe_view("u-1", id="e-2"))  # a tracker's retry

    assert result == {"accepted": 1, "rejected": 0, "errors": []}
    assert sorted(await live.stored(user_id="u-1")) == ["e-1", "e-2"]
    assert await live.segments(userId="u-1") == []
    assert await live.announced() == []
    # ... however it is sent, even for another viewer
    await live.send(shoe_view("u-2", id="e-1"))
    assert await live.stored(user_id="u-2") == []


async def test_of_events_sharing_an_id_the_first_one_received_is_kept(live: Live) -> None:
    await live.send(shoe_view("u-1"), shoe_view("u-1"))
    await live.send(
        event("product_viewed", "u-1", id="e-1", category="hats"),
        event("product_viewed", "u-1", id="e-1", category="shoes"),
    )
    await live.send(event("product_viewed", "u-1", id="e-1", category="shoes"))

    # e-1 is a hat view: the shoe views stay two
    assert await live.segments(userId="u-1") == []
    history = await live.services.events.history(user_id="u-1", anonymous_id=None, now=T0)
    (kept,) = [e for e in history.of_type("product_viewed") if e.id == "e-1"]
    assert kept.properties == {"category": "hats"}


# -- imported events count exactly like tracked ones ---------------------------------------------------


def bundle_event(ident: str, user: str, at: datetime, **properties: Any) -> dict[str, Any]:
    return {"id": ident, "type": "product_viewed", "userId": user, "at": at.isoformat(), "properties": properties}


async def test_events_imported_through_import_bundle_count_like_tracked_ones(live: Live) -> None:
    # Given two shoe views imported with a bundle (and one without an id, rejected)
    imported = bundle(
        events=[
            bundle_event("e-1", "u-1", T0 - timedelta(minutes=2), category="shoes"),
            bundle_event("e-2", "u-1", T0 - timedelta(minutes=1), category="shoes"),
            {"type": "product_viewed", "userId": "u-1", "at": T0.isoformat()},
        ]
    )
    result = await import_bundle(live.running, imported)
    await live.process()
    assert result["events"] == 2
    assert [r["path"] for r in result["rejected"]] == ["events[2].id"]
    assert sorted(await live.stored(user_id="u-1")) == ["e-1", "e-2"]
    assert await live.segments(userId="u-1") == []

    # When a tracker sends one of them again, and then a new one
    await live.send(shoe_view("u-1", id="e-2"))
    assert await live.segments(userId="u-1") == []
    await live.send(shoe_view("u-1", id="e-3"))

    # Then three views count, the imported ones slide out of the window like tracked ones
    assert await live.segments(userId="u-1") == ["shoe-browser"]
    await live.at(T0 + timedelta(minutes=8))
    assert await live.announced() == [
        change("u:u-1", T0, entered=["shoe-browser"]),
        change("u:u-1", T0 + timedelta(minutes=8), left=["shoe-browser"]),
    ]
    # and importing the bundle again adds nothing
    assert (await import_bundle(live.running, imported))["events"] == 0


async def test_imported_events_are_evaluated_on_arrival(live: Live) -> None:
    views = [bundle_event(f"e-{i}", "u-1", T0 - timedelta(minutes=i), category="shoes") for i in range(3)]
    await given(live.running, bundle(events=views))
    await live.process()

    assert await live.announced() == [change("u:u-1", T0, entered=["shoe-browser"])]
    # the oldest (T0 - 2m) leaves the window at T0 + 8m
    assert await live.at(T0 + timedelta(minutes=8) - timedelta(microseconds=1)) == []
    await live.at(T0 + timedelta(minutes=8))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=8), left=["shoe-browser"])]


async def test_events_imported_by_another_process_count_like_tracked_ones(live: Live) -> None:
    """``tessera import --events``: the CLI writes to the database (embedded) or the stream (Redis)
    and the server picks them up."""
    services = live.services
    store: LocalEventStore | RedisEventStore
    if services.redis is not None:
        store = RedisEventStore(services.redis, live.backend.redis_prefix, retention=LIMITS.retention, clock=live.clock)
    else:
        store = LocalEventStore(services.sessions, retention=LIMITS.retention, clock=live.clock, keep_state=False)

    async def consents(user_id: str) -> bool:
        return True

    cli = Ingestor(store, services.sessions, limits=LIMITS, clock=live.clock, consents=consents)
    await live.send(shoe_view("u-1", id="e-1"))
    records = [(f"events[{i}]", bundle_event(f"e-{i}", "u-1", T0, category="shoes")) for i in range(4)]
    result = await cli.track(records, strict=True)
    assert (result.stored, result.duplicates, result.rejected) == (3, 1, [])

    # the server follows the events table (embedded) or its worker consumes the stream (Redis)
    if isinstance(services.events, LocalEventStore):
        await services.events.follow()
    await live.process()

    assert await live.segments(userId="u-1") == ["shoe-browser"]
    assert await live.announced() == [change("u:u-1", T0, entered=["shoe-browser"])]
    assert sorted(await live.stored(user_id="u-1")) == ["e-0", "e-1", "e-2", "e-3"]


def test_rejected_counts_events_not_problems() -> None:
    problems = [Problem("events[1].type", "x"), Problem("events[1].userId", "y"), Problem("events[4]", "z")]
    assert IngestResult(rejected=problems).rejected_count == 2


# -- the stores themselves ------------------------------------------------------------------------------


@pytest.mark.usefixtures("_empty_sqlite")
async def test_the_embedded_state_outlives_a_question_about_a_later_instant(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    try:
        store = LocalEventStore(session_factory(engine), retention=LIMITS.retention, clock=FakeClock())
        await store.append([Tracked(id="e-1", type="purchase", at=T0, user_id="u-1")])

        # a renderer asks about a send time past the retention period (nothing counts then) ...
        await store.history(user_id="u-1", anonymous_id=None, now=T0 + timedelta(days=91))

        # ... and the event is still there for the present
        history = await store.history(user_id="u-1", anonymous_id=None, now=T0)
        assert [e.id for e in history.of_type("purchase")] == ["e-1"]
    finally:
        await engine.dispose()


@pytest.mark.redis
async def test_the_redis_state_is_trimmed_to_the_retention_period_as_it_goes(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    clock = FakeClock()
    try:
        store = RedisEventStore(client, redis_prefix, retention=LIMITS.retention, clock=clock)
        await store.append([Tracked(id="e-1", type="purchase", at=T0, user_id="u-1")])
        clock.advance(days=90)
        await store.append([Tracked(id="e-2", type="purchase", at=clock(), user_id="u-1")])

        assert await client.zrange(redis_prefix + "evt:u:u-1", 0, -1) == [b"e-2"]
        assert await client.hkeys(redis_prefix + "ev:u:u-1") == [b"e-2"]
        ttl = await client.pttl(redis_prefix + "evt:u:u-1")
        assert 0 < ttl <= LIMITS.retention.total_seconds() * 1000
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_joins_and_joined_histories_expire_with_the_retention_period(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    retention_ms = LIMITS.retention.total_seconds() * 1000
    try:
        store = RedisEventStore(client, redis_prefix, retention=LIMITS.retention, clock=FakeClock())
        await store.append([Tracked(id="e-1", type="view", at=T0, anonymous_id="a-1")])
        await store.link("a-1", "u-1")  # identify: the device's history becomes the user's
        await store.append([Tracked(id="e-2", type="view", at=T0, user_id="u-2", anonymous_id="a-2")])  # both ids

        for key in ("alias:a-1", "ev:u:u-1", "evt:u:u-1", "alias:a-2", "ev:u:u-2", "evt:u:u-2"):
            ttl = await client.pttl(redis_prefix + key)
            assert 0 < ttl <= retention_ms, key

        # a joined device still in use keeps its join alive
        await client.pexpire(redis_prefix + "alias:a-1", 1000)
        await store.append([Tracked(id="e-3", type="view", at=T0, anonymous_id="a-1")])
        assert await client.pttl(redis_prefix + "alias:a-1") > 1000
        assert await store.users_of(["a-1", "a-9"]) == {"a-1": "u-1"}
    finally:
        await client.aclose()

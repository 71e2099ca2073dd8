"""The evaluator's state (server/worker.py): memberships swapped a batch at a time, the flip
schedule set a batch at a time, and histories read a batch at a time (server/events.py). Each runs
against both implementations with the same expectations: in-process (the embedded default) and the
real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from server.bus import InProcessBus, RedisBus
from server.events import RedisEventStore, Tracked
from server.worker import (
    SEGMENTS_CHANNEL,
    Change,
    LocalMemberships,
    LocalSchedule,
    Memberships,
    RedisMemberships,
    RedisSchedule,
    Swapped,
)

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
KINDS = ["local", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> tuple[str, str]:
    """("local", "") or ("redis", this test's key prefix), fetched by name so that a local-only run
    never touches Redis."""
    if request.param == "local":
        return "local", ""
    return "redis", request.getfixturevalue("redis_prefix")


@pytest.fixture
async def redis_or_none(kind: tuple[str, str], request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis | None]:
    if kind[0] == "local":
        yield None
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield client
    await client.aclose()


@pytest.fixture
def memberships(kind: tuple[str, str], redis_or_none: aioredis.Redis | None) -> Memberships:
    return LocalMemberships() if redis_or_none is None else RedisMemberships(redis_or_none, kind[1])


@pytest.fixture
def schedule(kind: tuple[str, str], redis_or_none: aioredis.Redis | None) -> LocalSchedule | RedisSchedule:
    return LocalSchedule() if redis_or_none is None else RedisSchedule(redis_or_none, kind[1])


def swapped(entered: set[str] | None = None, left: set[str] | None = None) -> Swapped:
    return Swapped(frozenset(entered or ()), frozenset(left or ()))


# -- memberships ------------------------------------------------------------------------------------


async def test_a_swap_reports_what_entered_and_what_left_within_its_scope(memberships: Memberships) -> None:
    assert await memberships.swap([("u:1", ["a", "b", "c"], ["a", "b"])], at=T0) == [swapped({"a", "b"})]

    # Only "b" and "c" were evaluated: "a" stays whatever it is.
    assert await memberships.swap([("u:1", ["b", "c"], ["c"])], at=T0) == [swapped({"c"}, {"b"})]
    assert await memberships.get("u:1") == {"a", "c"}


async def test_a_swap_of_every_segment_leaves_whatever_is_not_a_member(memberships: Memberships) -> None:
    await memberships.swap([("u:1", ["a", "b", "gone"], ["a", "b", "gone"])], at=T0)

    # None: every segment was evaluated; "gone" (deleted since, say) is left too.
    assert await memberships.swap([("u:1", None, ["a", "z"])], at=T0) == [swapped({"z"}, {"b", "gone"})]
    assert await memberships.get("u:1") == {"a", "z"}


async def test_an_unchanged_membership_reports_nothing(memberships: Memberships) -> None:
    await memberships.swap([("u:1", None, ["a"])], at=T0)

    assert await memberships.swap([("u:1", None, ["a"]), ("a:x", ["a"], [])], at=T0) == [swapped(), swapped()]


async def test_a_batch_swaps_each_unit_and_answers_in_order(memberships: Memberships) -> None:
    updates: list[tuple[str, list[str] | None, list[str]]] = [
        (f"u:{i}", ["even", "odd"], ["even" if i % 2 == 0 else "odd"])
        for i in range(450)  # > one script call
    ]

    results = await memberships.swap(updates, at=T0)

    assert results == [swapped({"even" if i % 2 == 0 else "odd"}) for i in range(450)]
    assert await memberships.get("u:449") == {"odd"}


async def test_a_unit_in_many_segments_swaps_them_all(memberships: Memberships) -> None:
    keys = [f"s{i}" for i in range(1200)]  # past the chunks the Redis script writes in

    assert await memberships.swap([("u:1", keys, keys)], at=T0) == [swapped(set(keys))]
    assert await memberships.swap([("u:1", keys, keys[:100])], at=T0) == [swapped(left=set(keys[100:]))]
    assert await memberships.get("u:1") == set(keys[:100])


async def test_two_evaluators_swapping_the_same_change_announce_it_once(memberships: Memberships) -> None:
    # Two workers that evaluated one viewer at the same moment: only one of them reports the change.
    results = await asyncio.gather(*(memberships.swap([("u:1", ["vip"], ["vip"])], at=T0) for _ in range(20)))

    reported = [r[0] for r in results]
    assert (reported.count(swapped({"vip"})), reported.count(swapped())) == (1, 19)


async def test_forgetting_units_drops_their_memberships(memberships: Memberships) -> None:
    await memberships.swap([("u:1", None, ["a"]), ("a:x", None, ["b"]), ("u:2", None, ["c"])], at=T0)

    await memberships.forget(["u:1", "a:x"])

    assert (await memberships.get("u:1"), await memberships.get("a:x"), await memberships.get("u:2")) == (
        set(),
        set(),
        {"c"},
    )
    assert await memberships.swap([("u:1", None, ["a"])], at=T0) == [swapped({"a"})]  # announced again


@pytest.mark.redis
async def test_a_redis_swap_announces_its_changes_itself_in_the_evaluators_words(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    bus = RedisBus(client, redis_prefix)
    await bus.start()
    memberships = RedisMemberships(client, redis_prefix, announce_to=bus.key(SEGMENTS_CHANNEL))
    units = ['u:ü"ser/1', "a:42", "u:quiet"]
    try:
        async with bus.subscribe(SEGMENTS_CHANNEL) as messages:
            await memberships.swap([("u:quiet", None, [])], at=T0)  # no change: no message
            await memberships.swap([(units[0], None, ["b", "a"]), (units[1], None, ["x"])], at=T0)
            await memberships.swap([(units[0], ["a", "b"], [])], at=T0 + timedelta(seconds=1))

            heard = [await asyncio.wait_for(anext(messages), 5) for _ in range(3)]
    finally:
        await bus.close()

    expected = [
        Change(units[0], 'ü"ser/1', None, ("b", "a"), (), T0),  # entered in the order evaluated (priority)
        Change(units[1], None, "42", ("x",), (), T0),
        Change(units[0], 'ü"ser/1', None, (), ("a", "b"), T0 + timedelta(seconds=1)),
    ]
    assert heard == [change.message() for change in expected]


# -- the flip schedule ------------------------------------------------------------------------------


async def test_the_schedule_is_set_a_batch_at_a_time(schedule: LocalSchedule | RedisSchedule) -> None:
    await schedule.set({"u:1": T0 + timedelta(seconds=2), "u:2": T0 + timedelta(seconds=1), "u:3": T0})
    await schedule.set({"u:3": None, "u:1": T0 + timedelta(microseconds=1)})  # u:3 has none now; u:1 moved

    assert await schedule.next_due() == T0 + timedelta(microseconds=1)
    assert await schedule.due(T0) == []
    assert await schedule.due(T0 + timedelta(seconds=1)) == ["u:1", "u:2"]
    assert await schedule.next_due() is None


async def test_setting_a_flip_wakes_the_loop_and_clearing_one_does_not(schedule: LocalSchedule | RedisSchedule) -> None:
    await schedule.set({"u:1": None})
    assert not schedule.changed.is_set()

    await schedule.set({"u:1": T0})
    assert schedule.changed.is_set()


# -- histories and the bus, a batch at a time ---------------------------------------------------------


@pytest.mark.redis
async def test_histories_are_read_at_once_and_name_the_unit_owning_them(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    store = RedisEventStore(client, redis_prefix, retention=timedelta(days=90), clock=lambda: T0)
    await store.append(
        [
            Tracked(id="e1", type="view", at=T0 - timedelta(minutes=3), anonymous_id="anon-1"),
            Tracked(id="e2", type="view", at=T0 - timedelta(minutes=2), user_id="u-1", anonymous_id="anon-1"),
            Tracked(id="e3", type="buy", at=T0 - timedelta(minutes=1), anonymous_id="anon-2"),
        ]
    )

    loaded = await store.histories([("u-1", None), (None, "anon-1"), (None, "anon-2"), (None, "nobody")], now=T0)

    assert [unit for unit, _ in loaded] == ["u:u-1", "u:u-1", "a:anon-2", "a:nobody"]
    ids = [[e.id for e in history.of_type("view")] for _, history in loaded]
    assert ids == [["e1", "e2"], ["e1", "e2"], [], []]  # anon-1's history is u-1's now, under either id
    assert [e.id for e in loaded[2][1].of_type("buy")] == ["e3"]


async def test_the_in_process_bus_publishes_a_batch_in_order() -> None:
    bus = InProcessBus()
    async with bus.subscribe("segments") as messages:
        await bus.publish_many("segments", [{"n": i} for i in range(3)])

        assert [await asyncio.wait_for(anext(messages), 5) for _ in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]


@pytest.mark.redis
async def test_the_redis_bus_publishes_a_batch_in_order(client: aioredis.Redis, redis_prefix: str) -> None:
    bus = RedisBus(client, redis_prefix)
    await bus.start()
    try:
        async with bus.subscribe("segments") as messages:
            await bus.publish_many("segments", [{"n": i} for i in range(300)])

            heard = [await asyncio.wait_for(anext(messages), 5) for _ in range(300)]
            assert heard == [{"n": i} for i in range(300)]
    finally:
        await bus.close()

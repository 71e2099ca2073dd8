"""The segment evaluator of issue 3 (server/worker.py), end to end: events sent through GraphQL
``track``, memberships read back through ``viewer { segments }`` and heard on the ``segments`` bus,
time driven by the injected clock and ``Evaluator.run_due`` (what the background loop runs). Every
behavioural clause of rules.md (event counts in sliding windows, abandonment, scores, retention) runs
in both modes: embedded (SQLite, the evaluator in-process) and Redis (PostgreSQL and Redis, a
:class:`StreamWorker` driven step by step). Then the stream worker's promise: a worker that dies
mid-batch, or a server that restarts, loses nothing.

The small harness at the top (:class:`Live`) is shared with test_events.py and test_identity.py.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from fixtures_app import T0, FakeClock, RunningApp, running_app
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.app import Services
from server.db import create_engine, session_factory
from server.events import Tracked
from server.store import EventRepository
from server.worker import GROUP, SEGMENTS_CHANNEL, Change, Evaluator, StreamWorker
from tests.server.factories import bundle, given, segment

# -- the harness ------------------------------------------------------------------------------------

TRACK = """
mutation Track($events: [EventInput!]!) { track(events: $events) { accepted rejected errors } }
"""
VIEWER = "query Viewer($viewer: ViewerInput!) { viewer(viewer: $viewer) { segments { key } } }"
TICK = timedelta(microseconds=1)
WAIT = 5.0  # seconds: only ever reached when a test fails

MODES = [
    pytest.param("embedded", id="embedded-sqlite"),
    pytest.param("redis", id="redis-postgres", marks=[pytest.mark.postgres, pytest.mark.redis]),
]


@dataclass(frozen=True)
class Backend:
    """Where a test's application keeps its data: the embedded mode, or PostgreSQL with Redis."""

    mode: str
    database_url: str
    redis_url: str | None = None
    redis_prefix: str = "tessera:"

    @property
    def redis(self) -> bool:
        return self.mode == "redis"


def choose_backend(request: pytest.FixtureRequest) -> Backend:
    """For a fixture parametrized with MODES: the backend, its tables emptied (fetched by name, so
    that an embedded-only run never touches PostgreSQL or Redis)."""
    if request.param == "embedded":
        url: str = request.getfixturevalue("sqlite_url")
        request.getfixturevalue("_empty_sqlite")
        return Backend("embedded", url)
    url = request.getfixturevalue("postgres_url")
    request.getfixturevalue("_empty_postgres")
    return Backend("redis", url, request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix"))


class Announcements:
    """What the evaluator announced on the ``segments`` channel, read up to a marker this test
    publishes after the fact: a publish that returned before the marker is heard before it (one
    Redis server orders them), so an empty answer means "nothing announced", with no sleeping."""

    def __init__(self, services: Services, messages: AsyncIterator[Mapping[str, Any]]) -> None:
        self._services = services
        self._messages = messages

    async def take(self) -> list[dict[str, Any]]:
        marker = secrets.token_hex(4)
        await self._services.bus.publish(SEGMENTS_CHANNEL, {"marker": marker})
        heard: list[dict[str, Any]] = []
        while True:
            message = await asyncio.wait_for(anext(self._messages), WAIT)
            if message.get("marker") == marker:
                return heard
            if "marker" not in message:
                heard.append(dict(message))


@dataclass
class Live:
    """A running application and the means to drive it: track, let the worker consume (Redis mode),
    move the clock and run the due flips, ask for segments, hear announcements."""

    running: RunningApp
    backend: Backend
    announcements: Announcements
    worker: StreamWorker | None  # the Redis mode's worker, stepped by the test

    @property
    def services(self) -> Services:
        return self.running.services

    @property
    def clock(self) -> FakeClock:
        return self.running.clock

    async def track(self, *events: Mapping[str, Any]) -> dict[str, Any]:
        """``track`` through GraphQL; its TrackResult. The worker has not consumed them yet."""
        reply = await self.running.graphql(TRACK, {"events": list(events)})
        assert reply.status == 200, reply.body
        assert reply.errors == [], reply.errors
        result: dict[str, Any] = reply.data["track"]
        return result

    async def process(self) -> int:
        """Let the worker consume everything appended to the stream (the Redis mode; the embedded
        evaluator ran inside ``track``). Returns how many events it processed."""
        if self.worker is None:
            return 0
        total = 0
        while processed := await self.worker.step(block_ms=1):
            total += processed
        return total

    async def send(self, *events: Mapping[str, Any]) -> dict[str, Any]:
        """Track and process: what a deployment's track and worker do together."""
        result = await self.track(*events)
        await self.process()
        return result

    async def at(self, instant: datetime) -> list[Change]:
        """Move the clock to ``instant`` and run the flips due then (what the background loop does)."""
        self.clock.now = instant
        # asyncio.timeout, not wait_for: run_due must take the due flips before this task yields, or
        # the embedded mode's background loop (which wakes when a flip falls due) may take them first.
        async with asyncio.timeout(WAIT):
            return await self.services.evaluator.run_due()

    async def segments(self, **viewer: Any) -> list[str]:
        variables = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in viewer.items()}
        reply = await self.running.graphql(VIEWER, {"viewer": variables})
        assert reply.errors == [], reply.errors
        return [s["key"] for s in reply.data["viewer"]["segments"]]

    async def announced(self) -> list[dict[str, Any]]:
        """The announcements since the last call, in order."""
        return await self.announcements.take()

    async def stored(self, *, user_id: str | None = None, anonymous_id: str | None = None) -> list[str]:
        """The ids of the viewer's events in the database (the system of record)."""
        async with self.services.sessions() as session:
            rows = await EventRepository(session).for_unit(
                user_id=user_id, anonymous_id=anonymous_id, since=T0 - timedelta(days=400)
            )
        return [row["id"] for row in rows]

    async def state(
        self, types: Sequence[str], *, user_id: str | None = None, anonymous_id: str | None = None
    ) -> list[str]:
        """The ids of the viewer's events of ``types`` in the behavioural state (Redis or in-process)."""
        history = await self.services.events.history(user_id=user_id, anonymous_id=anonymous_id, now=self.clock())
        return sorted(e.id for t in types for e in history.of_type(t))


@asynccontextmanager
async def live_app(
    backend: Backend, *, clock: FakeClock | None = None, document: Mapping[str, Any] | None = None
) -> AsyncIterator[Live]:
    """The application on ``backend``, holding ``document`` (a bundle) when given."""
    async with running_app(
        backend.database_url, redis_url=backend.redis_url, redis_prefix=backend.redis_prefix, clock=clock
    ) as running:
        services = running.services
        worker = None
        if backend.redis:
            assert services.redis is not None
            assert services.stream_worker is None  # the test steps the worker itself
            worker = StreamWorker(
                services.redis,
                backend.redis_prefix,
                evaluator=services.evaluator,
                sessions=services.sessions,
                clock=running.clock,
                consumer="test-worker",
            )
            await worker.ensure_group()
        async with services.bus.subscribe(SEGMENTS_CHANNEL) as messages:
            live = Live(running, backend, Announcements(services, messages), worker)
            if document is not None:
                await given(running, document)
            yield live


# -- data -------------------------------------------------------------------------------------------

SEGMENTS = [
    segment(
        "shoe-browser",
        {"event": "product_viewed", "where": {"category": "shoes"}, "within": "10m", "count": {"gte": 3}},
        priority=30,
    ),
    segment(
        "big-spender",
        {"event": "purchase", "where": {"total": {"op": "gte", "value": 100}}, "within": "7d", "count": {"gte": 2}},
        priority=25,
    ),
    segment(
        "cart-abandoner",
        {"event": "add_to_cart", "not_followed_by": "checkout", "for": "15m", "within": "24h"},
        priority=20,
    ),
    segment("engaged", {"score": "engagement", "op": "gte", "value": 4}, priority=10),
    segment("purchaser", {"event": "purchase"}),
    segment("at-risk", {"all": [{"event": "purchase"}, {"not": {"event": "purchase", "within": "30d"}}]}),
    segment("stalled-checkout", {"event": "checkout_started", "not_followed_by": "purchase", "for": "1d"}),
]
SCORES = [{"key": "engagement", "events": {"page_view": 1, "video_played": 3}, "half_life": "1h"}]
RULES = bundle(segments=SEGMENTS, scores=SCORES)


def event(
    type_: str,
    user: str | None = None,
    *,
    anon: str | None = None,
    at: datetime | None = None,
    id: str | None = None,
    **properties: Any,
) -> dict[str, Any]:
    """A tracked event as the GraphQL ``EventInput`` takes it."""
    doc: dict[str, Any] = {"type": type_}
    for name, value in (("id", id), ("userId", user), ("anonymousId", anon)):
        if value is not None:
            doc[name] = value
    if at is not None:
        doc["at"] = at.isoformat()
    if properties:
        doc["properties"] = properties
    return doc


def change(unit: str, at: datetime, *, entered: Sequence[str] = (), left: Sequence[str] = ()) -> dict[str, Any]:
    """An announcement as the ``segments`` channel carries it."""
    kind, _, ident = unit.partition(":")
    return {
        "unit": unit,
        "userId": ident if kind == "u" else None,
        "anonymousId": ident if kind == "a" else None,
        "entered": list(entered),
        "left": list(left),
        "at": at.isoformat(),
    }


@pytest.fixture(params=MODES)
def backend(request: pytest.FixtureRequest) -> Backend:
    return choose_backend(request)


@pytest.fixture
async def live(backend: Backend) -> AsyncIterator[Live]:
    async with live_app(backend, document=RULES) as running:
        yield running


# -- event counts in sliding windows ------------------------------------------------------------------


async def test_a_count_enters_on_the_event_that_makes_it_and_leaves_exactly_when_the_window_passes(live: Live) -> None:
    # Given two shoe views and a hat view (the where filter leaves it out)
    await live.send(event("product_viewed", "u-1", category="shoes"))
    live.clock.advance(minutes=1)
    await live.send(event("product_viewed", "u-1", category="shoes"), event("product_viewed", "u-1", category="hats"))
    assert await live.segments(userId="u-1") == []
    assert await live.announced() == []

    # When the third shoe view arrives, the viewer enters at once
    live.clock.advance(minutes=1)
    await live.send(event("product_viewed", "u-1", category="shoes"))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=2), entered=["shoe-browser"])]
    assert await live.segments(userId="u-1") == ["shoe-browser"]

    # Then the first view counts until just before T0 + 10m (now - within < t is strict) ...
    assert await live.at(T0 + timedelta(minutes=10) - TICK) == []
    assert await live.announced() == []
    assert await live.segments(userId="u-1") == ["shoe-browser"]
    # ... and the viewer leaves at that very instant, announced by the flip, not by a next event
    flips = await live.at(T0 + timedelta(minutes=10))
    assert [(c.unit, c.entered, c.left) for c in flips] == [("u:u-1", (), ("shoe-browser",))]
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=10), left=["shoe-browser"])]
    assert await live.segments(userId="u-1") == []


async def test_a_fourth_view_does_not_re_enter_a_segment_that_the_window_has_left(live: Live) -> None:
    # Given three shoe views at T0, T0 + 1m and T0 + 2m, and the window sliding past the first
    for minute in range(3):
        live.clock.now = T0 + timedelta(minutes=minute)
        await live.send(event("product_viewed", "u-1", category="shoes"))
    await live.at(T0 + timedelta(minutes=10))
    assert await live.announced() == [
        change("u:u-1", T0 + timedelta(minutes=2), entered=["shoe-browser"]),
        change("u:u-1", T0 + timedelta(minutes=10), left=["shoe-browser"]),
    ]

    # When a fourth view arrives at T0 + 11m, when the second one leaves the window too
    live.clock.now = T0 + timedelta(minutes=11)
    await live.send(event("product_viewed", "u-1", category="shoes"))

    # Then only two views are in (T0 + 1m, T0 + 11m]: the viewer stays out, and nothing is announced
    assert await live.segments(userId="u-1") == []
    assert await live.announced() == []
    # ... nor later, as the remaining views leave the window one by one
    assert await live.at(T0 + timedelta(minutes=21)) == []
    assert await live.announced() == []


async def test_a_fourth_view_inside_the_window_does_re_enter(live: Live) -> None:
    for minute in range(3):
        live.clock.now = T0 + timedelta(minutes=minute)
        await live.send(event("product_viewed", "u-1", category="shoes"))
    await live.at(T0 + timedelta(minutes=10))
    await live.announced()

    # (T0 + 30s, T0 + 10m30s] still holds the views of T0 + 1m and T0 + 2m
    live.clock.now = T0 + timedelta(minutes=10, seconds=30)
    await live.send(event("product_viewed", "u-1", category="shoes"))

    assert await live.announced() == [change("u:u-1", live.clock(), entered=["shoe-browser"])]
    assert await live.segments(userId="u-1") == ["shoe-browser"]
    # and it leaves when the view of T0 + 1m does
    await live.at(T0 + timedelta(minutes=11))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=11), left=["shoe-browser"])]


async def test_an_event_counts_from_its_own_instant_not_from_its_arrival(live: Live) -> None:
    # Given two shoe views now and one stamped 30 seconds ahead (a tracker's clock running fast)
    await live.send(
        event("product_viewed", "u-1", category="shoes"),
        event("product_viewed", "u-1", category="shoes"),
        event("product_viewed", "u-1", category="shoes", at=T0 + timedelta(seconds=30)),
    )
    # Then it does not count yet (t <= now) ...
    assert await live.segments(userId="u-1") == []
    assert await live.at(T0 + timedelta(seconds=30) - TICK) == []
    assert await live.announced() == []
    # ... and counts from exactly its instant, announced then
    await live.at(T0 + timedelta(seconds=30))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(seconds=30), entered=["shoe-browser"])]
    assert await live.segments(userId="u-1") == ["shoe-browser"]


async def test_where_filters_with_operators_select_the_events_counted(live: Live) -> None:
    await live.send(
        event("purchase", "u-1", total=99.99),
        event("purchase", "u-1", total="250"),  # a string is not a number: not counted
        event("purchase", "u-1"),  # no total: not counted
        event("purchase", "u-1", total=100),
    )
    assert await live.segments(userId="u-1") == ["purchaser"]

    live.clock.advance(days=1)
    await live.send(event("purchase", "u-1", total=100.0))

    assert await live.segments(userId="u-1") == ["big-spender", "purchaser"]
    assert await live.announced() == [
        change("u:u-1", T0, entered=["purchaser"]),
        change("u:u-1", T0 + timedelta(days=1), entered=["big-spender"]),
    ]
    # the purchase of 100 at T0 leaves the 7-day window at T0 + 7d exactly
    assert await live.at(T0 + timedelta(days=7) - TICK) == []
    await live.at(T0 + timedelta(days=7))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(days=7), left=["big-spender"])]


# -- abandonment ---------------------------------------------------------------------------------------


async def test_an_abandoned_cart_turns_true_exactly_15_minutes_after_the_add_to_cart(live: Live) -> None:
    await live.send(event("add_to_cart", "u-1", sku="A1"))
    assert await live.segments(userId="u-1") == []

    # Not one microsecond early ...
    assert await live.at(T0 + timedelta(minutes=15) - TICK) == []
    assert await live.announced() == []
    assert await live.segments(userId="u-1") == []

    # ... but at that instant, announced by the flip
    flips = await live.at(T0 + timedelta(minutes=15))
    assert [(c.unit, c.entered, c.left) for c in flips] == [("u:u-1", ("cart-abandoner",), ())]
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=15), entered=["cart-abandoner"])]
    assert await live.segments(userId="u-1") == ["cart-abandoner"]

    # and it holds while the add-to-cart is within the last 24 hours: (now - 24h < t_A) is strict
    assert await live.at(T0 + timedelta(hours=24) - TICK) == []
    await live.at(T0 + timedelta(hours=24))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(hours=24), left=["cart-abandoner"])]


async def test_adding_to_the_cart_again_restarts_the_15_minutes(live: Live) -> None:
    await live.send(event("add_to_cart", "u-1", sku="A1"))
    live.clock.advance(minutes=10)
    await live.send(event("add_to_cart", "u-1", sku="B2"))

    assert await live.at(T0 + timedelta(minutes=15)) == []
    assert await live.at(T0 + timedelta(minutes=25) - TICK) == []
    assert await live.announced() == []

    await live.at(T0 + timedelta(minutes=25))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=25), entered=["cart-abandoner"])]


async def test_a_checkout_ends_the_abandonment_before_and_after_it_turns_true(live: Live) -> None:
    # Before: a checkout within the 15 minutes means the cart is never abandoned
    await live.send(event("add_to_cart", "u-1"))
    live.clock.advance(minutes=5)
    await live.send(event("checkout", "u-1"))
    assert await live.at(T0 + timedelta(minutes=15)) == []
    assert await live.segments(userId="u-1") == []

    # After: a checkout makes an abandoner leave at once, on the event
    live.clock.now = T0 + timedelta(hours=1)
    await live.send(event("add_to_cart", "u-2"))
    await live.at(T0 + timedelta(hours=1, minutes=15))
    live.clock.advance(minutes=5)
    await live.send(event("checkout", "u-2"))

    assert await live.announced() == [
        change("u:u-2", T0 + timedelta(hours=1, minutes=15), entered=["cart-abandoner"]),
        change("u:u-2", T0 + timedelta(hours=1, minutes=20), left=["cart-abandoner"]),
    ]
    assert await live.segments(userId="u-2") == []


async def test_a_checkout_at_exactly_the_add_to_cart_instant_does_not_end_it(live: Live) -> None:
    await live.send(event("add_to_cart", "u-1", at=T0), event("checkout", "u-1", at=T0))

    await live.at(T0 + timedelta(minutes=15))

    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=15), entered=["cart-abandoner"])]
    assert await live.segments(userId="u-1") == ["cart-abandoner"]


# -- scores ----------------------------------------------------------------------------------------------


def score_leaves_at(weights: Sequence[float], threshold: float, half_life: float) -> timedelta:
    """The first microsecond after T0 at which ``round(sum(w * 2 ** (-t / half_life)), 6)`` of events
    at T0 drops below ``threshold``: rules.md's formula, computed here again by bisection."""

    def rounded(us: int) -> float:
        total = 0.0
        for weight in weights:
            total += weight * 2 ** (-(us / 1_000_000) / half_life)
        return round(total, 6)

    low, high = 0, int(half_life * 10 * 1_000_000)  # rounded(low) >= threshold > rounded(high)
    while high - low > 1:
        middle = (low + high) // 2
        if rounded(middle) >= threshold:
            low = middle
        else:
            high = middle
    return timedelta(microseconds=high)


async def test_a_score_decays_and_its_segment_is_left_at_the_exact_microsecond(live: Live) -> None:
    # Given two page views (2 points): not engaged; then a video (3 points): 5 >= 4
    await live.send(event("page_view", "u-1"), event("page_view", "u-1"))
    assert await live.segments(userId="u-1") == []
    await live.send(event("video_played", "u-1"))
    assert await live.announced() == [change("u:u-1", T0, entered=["engaged"])]

    # When the score decays (half-life 1h) below 4 after rounding to 6 places, at
    # 3600 * log2(5 / 3.9999995) seconds, a microsecond that is not a whole millisecond
    leaves = T0 + score_leaves_at([1, 1, 3], 4, 3600)
    assert (leaves - T0).microseconds % 1000 != 0
    # the request path agrees at any instant
    assert await live.segments(userId="u-1", at=leaves - TICK) == ["engaged"]
    assert await live.segments(userId="u-1", at=leaves) == []

    # Then the flip comes at that microsecond: not a microsecond (nor the millisecond) before
    assert await live.at(leaves.replace(microsecond=leaves.microsecond // 1000 * 1000)) == []
    assert await live.at(leaves - TICK) == []
    assert await live.announced() == []
    await live.at(leaves)
    assert await live.announced() == [change("u:u-1", leaves, left=["engaged"])]


async def test_a_new_event_lifts_a_decayed_score_again(live: Live) -> None:
    await live.send(event("video_played", "u-1"), event("page_view", "u-1"), event("page_view", "u-1"))
    await live.at(T0 + timedelta(hours=1))  # 5 -> 2.5
    live.clock.advance(seconds=1)
    await live.send(event("video_played", "u-1"))  # 2.5 * 2 ** (-1 / 3600) + 3 > 4

    assert await live.announced() == [
        change("u:u-1", T0, entered=["engaged"]),
        change("u:u-1", T0 + timedelta(hours=1), left=["engaged"]),
        change("u:u-1", T0 + timedelta(hours=1, seconds=1), entered=["engaged"]),
    ]


# -- retention and inactivity ------------------------------------------------------------------------


async def test_inactivity_turns_true_exactly_30_days_after_the_last_purchase(live: Live) -> None:
    await live.send(event("purchase", "u-1", total=20))
    live.clock.advance(days=3)
    await live.send(event("purchase", "u-1", total=20))

    assert await live.at(T0 + timedelta(days=33) - TICK) == []
    await live.at(T0 + timedelta(days=33))

    assert await live.announced() == [
        change("u:u-1", T0, entered=["purchaser"]),
        change("u:u-1", T0 + timedelta(days=33), entered=["at-risk"]),
    ]
    assert await live.segments(userId="u-1") == ["at-risk", "purchaser"]


async def test_retention_caps_counts_and_abandonment_alike(live: Live) -> None:
    # Given, 90 days ago plus an hour or two, a purchase and a checkout started after it (which
    # the purchase does not end): all still within the retention period of 90 days
    retention = timedelta(days=90)
    await live.send(
        event("purchase", "u-1", at=T0 - retention + timedelta(hours=1)),
        event("checkout_started", "u-1", at=T0 - retention + timedelta(hours=2)),
    )
    assert await live.segments(userId="u-1") == ["at-risk", "purchaser", "stalled-checkout"]

    # When each passes the retention period, it counts no more: exactly then
    assert await live.at(T0 + timedelta(hours=1) - TICK) == []
    await live.at(T0 + timedelta(hours=1))
    assert await live.segments(userId="u-1") == ["stalled-checkout"]
    assert await live.at(T0 + timedelta(hours=2) - TICK) == []
    await live.at(T0 + timedelta(hours=2))
    assert await live.segments(userId="u-1") == []
    assert await live.announced() == [
        change("u:u-1", T0, entered=["at-risk", "purchaser", "stalled-checkout"]),
        change("u:u-1", T0 + timedelta(hours=1), left=["at-risk", "purchaser"]),
        change("u:u-1", T0 + timedelta(hours=2), left=["stalled-checkout"]),
    ]


async def test_an_event_older_than_retention_is_rejected(live: Live) -> None:
    too_old = T0 - timedelta(days=90)
    result = await live.send(event("purchase", "u-1", at=too_old), event("purchase", "u-1"))

    assert (result["accepted"], result["rejected"]) == (1, 1)
    (error,) = result["errors"]
    assert error.startswith("events[0].at: ")
    assert error.endswith("is older than the retention period (90 days)")
    assert len(await live.stored(user_id="u-1")) == 1


async def test_asking_about_a_later_instant_forgets_nothing(live: Live) -> None:
    # Given a purchase now
    await live.send(event("purchase", "u-1"))
    # When a renderer asks about the viewer at a send time past the retention period
    assert await live.segments(userId="u-1", at=T0 + timedelta(days=91)) == []
    # Then the viewer's history is intact for the present
    assert await live.segments(userId="u-1") == ["purchaser"]
    assert await live.segments(userId="u-1", at=T0 + timedelta(days=1)) == ["purchaser"]


# -- the stream worker: nothing acknowledged is lost ------------------------------------------------

REDIS_ONLY = [pytest.param("redis", id="redis-postgres", marks=[pytest.mark.postgres, pytest.mark.redis])]


def other_worker(
    live: Live,
    consumer: str,
    *,
    evaluator: Evaluator | None = None,
    claim_idle_ms: int = 0,
    batch: int = 500,
    sessions: async_sessionmaker[AsyncSession] | None = None,
) -> StreamWorker:
    assert live.services.redis is not None
    return StreamWorker(
        live.services.redis,
        live.backend.redis_prefix,
        evaluator=evaluator or live.services.evaluator,
        sessions=sessions or live.services.sessions,
        clock=live.clock,
        consumer=consumer,
        claim_idle_ms=claim_idle_ms,
        batch=batch,
    )


async def pending(client: aioredis.Redis, stream: str) -> int:
    summary: Any = await client.xpending(stream, GROUP)
    return int(summary["pending"])


def three_shoe_views(user: str) -> list[dict[str, Any]]:
    return [event("product_viewed", user, id=f"{user}-view-{i}", category="shoes") for i in range(3)]


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_events_read_by_a_worker_that_dies_before_acknowledging_are_claimed_by_another(live: Live) -> None:
    # Given three events tracked, and a worker that read them (XREADGROUP) and died
    await live.track(*three_shoe_views("u-1"))
    client = live.services.redis
    assert client is not None
    assert live.worker is not None
    read: Any = await client.xreadgroup(GROUP, "dead", {live.worker.stream: ">"}, count=100)
    assert len(read[0][1]) == 3
    assert await live.stored(user_id="u-1") == []
    assert await live.process() == 0  # they are not new: no other worker reads them again

    # When another worker claims what was left pending
    assert await other_worker(live, "rescuer").claim() == 3

    # Then every event is in the database, the change is announced, nothing is pending
    assert sorted(await live.stored(user_id="u-1")) == ["u-1-view-0", "u-1-view-1", "u-1-view-2"]
    assert await live.announced() == [change("u:u-1", T0, entered=["shoe-browser"])]
    assert await pending(client, live.worker.stream) == 0


class _Stalling:
    """An evaluator that never finishes: the worker holding it is cancelled mid-batch."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()

    async def on_events(self, events: Sequence[Tracked]) -> list[Change]:
        self.reached.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_a_worker_cancelled_mid_batch_loses_nothing_and_stores_nothing_twice(live: Live) -> None:
    # Given a worker cancelled after it stored a batch but before it evaluated and acknowledged it
    await live.track(*three_shoe_views("u-1"))
    stalling = _Stalling()
    doomed = asyncio.create_task(other_worker(live, "doomed", evaluator=cast(Evaluator, stalling)).step(block_ms=1))
    await asyncio.wait_for(stalling.reached.wait(), WAIT)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert live.services.redis is not None
    assert live.worker is not None
    assert await pending(live.services.redis, live.worker.stream) == 3
    assert await live.announced() == []

    # When another worker claims the batch
    assert await other_worker(live, "rescuer").claim() == 3

    # Then the change is announced once and every event is stored once
    assert await live.announced() == [change("u:u-1", T0, entered=["shoe-browser"])]
    assert sorted(await live.stored(user_id="u-1")) == ["u-1-view-0", "u-1-view-1", "u-1-view-2"]
    assert await pending(live.services.redis, live.worker.stream) == 0


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_a_batch_the_database_refused_outright_is_announced_once_when_retried(live: Live) -> None:
    # Given a worker whose database does not answer (nothing listens where it points)
    await live.track(*three_shoe_views("u-1"))
    nowhere = create_engine("postgresql+asyncpg://postgres@127.0.0.1:9/nowhere")
    try:
        broken = other_worker(live, "broken", sessions=session_factory(nowhere))
        with pytest.raises(ExceptionGroup):  # the write failed; the evaluation beside it was cancelled
            await broken.step(block_ms=1)
    finally:
        await nowhere.dispose()

    # When a worker with a working database retries the batch, then the change is announced once
    await assert_retried_once(live)


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_a_batch_whose_write_failed_after_its_announcement_is_not_announced_again(live: Live) -> None:
    # Given a worker whose database write waits (the events table locked) while the evaluation beside
    # it announces the change, and then fails (a constraint no row meets, added meanwhile)
    await live.track(*three_shoe_views("u-1"))
    engine = live.services.engine
    announced = asyncio.Event()

    async def hear_first(messages: AsyncIterator[Mapping[str, Any]]) -> None:
        await anext(messages)
        announced.set()

    try:
        async with live.services.bus.subscribe(SEGMENTS_CHANNEL) as messages:
            listener = asyncio.create_task(hear_first(messages))
            async with engine.begin() as blocker:
                await blocker.execute(sa.text("LOCK TABLE events IN ACCESS EXCLUSIVE MODE"))
                step = asyncio.create_task(other_worker(live, "broken").step(block_ms=1))
                await asyncio.wait_for(announced.wait(), WAIT)
                await blocker.execute(sa.text("ALTER TABLE events ADD CONSTRAINT refuse_all CHECK (false) NOT VALID"))
            with pytest.raises(ExceptionGroup):
                await asyncio.wait_for(step, WAIT)
            listener.cancel()
    finally:
        async with engine.begin() as connection:
            await connection.execute(sa.text("ALTER TABLE events DROP CONSTRAINT IF EXISTS refuse_all"))

    # When a worker with a working database retries the batch, then the change was announced once
    await assert_retried_once(live)


async def assert_retried_once(live: Live) -> None:
    """The batch is pending; a worker with a working database takes it over, and the change is
    announced exactly once in all, and every event stored."""
    assert live.services.redis is not None
    assert live.worker is not None
    assert await pending(live.services.redis, live.worker.stream) == 3

    assert await other_worker(live, "rescuer").claim() == 3

    assert await live.announced() == [change("u:u-1", T0, entered=["shoe-browser"])]
    assert sorted(await live.stored(user_id="u-1")) == ["u-1-view-0", "u-1-view-1", "u-1-view-2"]
    assert await pending(live.services.redis, live.worker.stream) == 0


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_workers_share_the_stream_and_each_event_is_processed_once(live: Live) -> None:
    await live.track(*three_shoe_views("u-1"), *three_shoe_views("u-2"))
    first, second = other_worker(live, "first", batch=4), other_worker(live, "second", batch=4)

    assert await first.step(block_ms=1) == 4
    assert await second.step(block_ms=1) == 2
    assert await first.step(block_ms=1) == 0

    announced = await live.announced()
    assert sorted(m["unit"] for m in announced) == ["u:u-1", "u:u-2"]
    assert len(await live.stored(user_id="u-1")) == len(await live.stored(user_id="u-2")) == 3


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_pending_events_survive_a_worker_and_server_restart(backend: Backend) -> None:
    clock = FakeClock()
    # Given a server whose only worker read a batch and went down with the server
    async with live_app(backend, clock=clock, document=RULES) as before:
        await before.track(*three_shoe_views("u-1"), event("add_to_cart", "u-1"))
        assert before.services.redis is not None
        assert before.worker is not None
        await before.services.redis.xreadgroup(GROUP, "gone", {before.worker.stream: ">"}, count=100)
        segments_before = await before.segments(userId="u-1")
    assert segments_before == ["shoe-browser"]

    # When the server starts again and a worker claims what was pending
    async with live_app(backend, clock=clock) as after:
        assert await after.segments(userId="u-1") == segments_before
        assert await other_worker(after, "restarted").claim() == 4

        # Then every event is stored, the change announced, and the abandonment flips on time
        assert len(await after.stored(user_id="u-1")) == 4
        assert await after.announced() == [change("u:u-1", T0, entered=["shoe-browser"])]
        await after.at(T0 + timedelta(minutes=10))
        await after.at(T0 + timedelta(minutes=15))
        assert await after.announced() == [
            change("u:u-1", T0 + timedelta(minutes=10), left=["shoe-browser"]),
            change("u:u-1", T0 + timedelta(minutes=15), entered=["cart-abandoner"]),
        ]


EMBEDDED_ONLY = [pytest.param("embedded", id="embedded-sqlite")]


@pytest.mark.parametrize("backend", EMBEDDED_ONLY, indirect=True)
async def test_the_embedded_server_restarting_loses_nothing(backend: Backend) -> None:
    clock = FakeClock()
    # Given an embedded server with a viewer's history (part of it anonymous, then joined by identify;
    # a pending abandonment among it), closed
    async with live_app(backend, clock=clock, document=RULES) as before:
        anonymous_view = event("product_viewed", anon="a-1", category="shoes")
        await before.send(anonymous_view, anonymous_view)  # (two events: each gets its own id)
        await before.services.ingest.identify(user_id="u-1", anonymous_id="a-1")
        await before.send(
            event("product_viewed", "u-1", category="shoes"),
            event("add_to_cart", "u-1"),
            event("purchase", "u-1", total=500),
        )
        segments_before = await before.segments(userId="u-1")
    assert segments_before == ["shoe-browser", "purchaser"]

    # When a new one starts on the same database
    clock.advance(minutes=1)
    async with live_app(backend, clock=clock) as after:
        # Then the viewer's segments are the same, and the flips still come at their instants
        assert await after.segments(userId="u-1") == segments_before
        await after.at(T0 + timedelta(minutes=10))
        await after.at(T0 + timedelta(minutes=15))
        assert await after.announced() == [
            change("u:u-1", T0 + timedelta(minutes=10), left=["shoe-browser"]),
            change("u:u-1", T0 + timedelta(minutes=15), entered=["cart-abandoner"]),
        ]
        assert await after.segments(userId="u-1") == ["cart-abandoner", "purchaser"]


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_trimming_drops_acknowledged_entries_and_keeps_pending_ones(live: Live) -> None:
    # Given six events: three processed and acknowledged, then three read by a worker that died
    client = live.services.redis
    assert client is not None
    assert live.worker is not None
    await live.track(*three_shoe_views("u-1"))
    assert await live.process() == 3
    await live.track(*three_shoe_views("u-2"))
    read: Any = await client.xreadgroup(GROUP, "dead", {live.worker.stream: ">"}, count=100)
    assert len(read[0][1]) == 3
    assert await client.xlen(live.worker.stream) == 6

    # When the stream is trimmed
    removed = await live.worker.trim()

    # Then the acknowledged entries are gone and the pending ones are kept, still claimable
    assert removed == 3
    assert await client.xlen(live.worker.stream) == 3
    assert await other_worker(live, "rescuer").claim() == 3
    assert sorted(await live.stored(user_id="u-2")) == ["u-2-view-0", "u-2-view-1", "u-2-view-2"]

    # And once everything is acknowledged, a trim keeps at most the last delivered entry
    await live.worker.trim()
    assert await client.xlen(live.worker.stream) <= 1

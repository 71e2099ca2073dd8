"""The profile store in front of an upstream profile service and the built-in store: coalescing,
warm hits, negative caching, stale-while-revalidate, the latency budget, the circuit breaker, the
Redis layer shared by instances, and invalidation. The upstream is a real HTTP server on loopback
that a test makes slow, failing or down; Redis and the databases are the real ones. Time is an
injected clock: no test sleeps."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from fixtures_app import Served, serve
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from schema.ports import Profile
from server.profiles import DatabaseSource, HttpSource, ProfileStore, Source
from server.store import ProfileRepository

TIMEOUT = 5.0
TTL, STALE = 30.0, 300.0


# -- the upstream profile service, for real, on loopback ----------------------------------------


@dataclass
class Upstream:
    """A profile service on 127.0.0.1: ``GET /profiles/{userId}`` answers ``profiles[userId]`` (404 when
    absent). ``status`` makes every answer that status; ``gate``, while not set, holds every request
    after it has read its answer; ``stop()`` takes it down (connections are refused)."""

    port: int
    profiles: dict[str, Any] = field(default_factory=dict)
    status: int | None = None
    body: bytes | None = None  # when set, answered as is (with status 200)
    gate: asyncio.Event | None = None
    calls: list[str] = field(default_factory=list)
    raw_paths: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    _arrival: asyncio.Event = field(default_factory=asyncio.Event)
    _served: Served | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/profiles/{{userId}}"

    def hold(self) -> asyncio.Event:
        """Make requests wait until the returned event is set."""
        self.gate = asyncio.Event()
        return self.gate

    async def called(self, times: int) -> None:
        """Wait until the upstream has received ``times`` requests."""
        async with asyncio.timeout(TIMEOUT):
            while len(self.calls) < times:
                await self._arrival.wait()

    async def _answer(self, request: Request) -> Response:
        user_id = request.path_params["user_id"]
        self.calls.append(user_id)
        self.raw_paths.append(request.scope["raw_path"])
        self.headers.append(dict(request.headers))
        self._arrival.set()
        self._arrival = asyncio.Event()
        # The answer is decided on arrival, so that a held request answers what was true when it came.
        status, body, found = self.status, self.body, self.profiles.get(user_id)
        if self.gate is not None:
            await self.gate.wait()
        if status is not None:
            return JSONResponse({"error": "unavailable"}, status)
        if body is not None:
            return Response(body, 200, media_type="application/json")
        return JSONResponse({"error": "not found"}, 404) if found is None else JSONResponse(found)

    async def start(self) -> None:
        app = Starlette(routes=[Route("/profiles/{user_id:path}", self._answer)])
        self._served = serve(app, self.port, name="upstream")  # the same port again after a stop
        self.port = self._served.port

    async def stop(self) -> None:
        """Down: the listening socket is closed and every connection to it is refused."""
        if self.gate is not None:
            self.gate.set()
        if self._served is not None:
            async with asyncio.timeout(TIMEOUT):
                await self._served.stop()
            self._served = None


@asynccontextmanager
async def serve_upstream() -> AsyncIterator[Upstream]:
    upstream = Upstream(port=0)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


@dataclass
class MonotonicClock:
    """The store's clock in tests: seconds that move only when a test moves them."""

    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with serve_upstream() as running:
        yield running


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> MonotonicClock:
    return MonotonicClock()


StoreFactory = Callable[..., ProfileStore]


@pytest.fixture
async def make_store(
    clock: MonotonicClock, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[StoreFactory]:
    """Stores over the upstream (or ``source``), closed after the test. No budget unless given.
    Failures of the upstream or of Redis are warnings; an error logged by the store is a bug."""
    made: list[ProfileStore] = []

    def make(source: Source | None = None, **options: Any) -> ProfileStore:
        settings: dict[str, Any] = {
            "ttl": TTL,
            "stale": STALE,
            "budget": None,
            "timeout": TIMEOUT,
            "breaker_failures": 3,
            "breaker_reset": 30.0,
            "clock": clock,
            **options,
        }
        store = ProfileStore(source or HttpSource(upstream.url), **settings)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()
    records = [*caplog.get_records("call"), *caplog.records]  # the test's, and the closing's
    errors = [r for r in records if r.name == "server.profiles" and r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def traits(tier: str) -> dict[str, Any]:
    return {"tier": tier, "plan": "pro"}


def traits_of(profile: Profile | None) -> Mapping[str, Any] | None:
    return None if profile is None else profile.traits


# -- the upstream's JSON ---------------------------------------------------------------------------


async def test_the_upstream_json_maps_to_traits_and_consent_and_the_id_is_url_encoded(
    upstream: Upstream, make_store: StoreFactory
) -> None:
    # Given an upstream that nests traits and consent, and wants an API key
    upstream.profiles["ada/lovelace 1"] = {
        "data": {"traits": traits("gold"), "consent": {"personalization": False}},
    }
    upstream.profiles["bob"] = {"data": {"traits": traits("silver")}}
    source = HttpSource(
        upstream.url,
        auth_header="X-Api-Key: s3cret",
        traits_path="data.traits",
        consent_path="data.consent.personalization",
    )
    store = make_store(source)

    # When both profiles are read
    ada = await store.get("ada/lovelace 1")
    bob = await store.get("bob")

    # Then the traits come from the path, consent is false only where it says so
    assert ada == Profile(traits=traits("gold"), consent=False)
    assert bob == Profile(traits=traits("silver"), consent=True)
    # and the id went into the URL encoded, with the header
    assert upstream.raw_paths[0] == b"/profiles/ada%2Flovelace%201"
    assert all(headers["x-api-key"] == "s3cret" for headers in upstream.headers)


# -- coalescing and hits ---------------------------------------------------------------------------


async def test_a_hundred_concurrent_gets_make_one_upstream_call(upstream: Upstream, make_store: StoreFactory) -> None:
    # Given a profile nobody has read yet, behind a slow upstream
    upstream.profiles["u-1"] = traits("gold")
    store = make_store()
    gate = upstream.hold()

    # When 100 requests want it at once
    gets = asyncio.gather(*(store.get("u-1") for _ in range(100)))
    await upstream.called(1)
    gate.set()
    profiles = await asyncio.wait_for(gets, TIMEOUT)

    # Then one upstream call served them all
    assert upstream.calls == ["u-1"]
    assert all(p == Profile(traits=traits("gold"), consent=True) for p in profiles)
    assert (store.stats.misses, store.stats.coalesced, store.stats.upstream_calls) == (100, 99, 1)


async def test_warm_reads_never_call_the_upstream(upstream: Upstream, make_store: StoreFactory) -> None:
    # Given a profile read once
    upstream.profiles["u-1"] = traits("gold")
    store = make_store()
    await store.get("u-1")

    # When it is read 1,000 times more, within its TTL
    for _ in range(1000):
        assert await store.get("u-1") is not None

    # Then the upstream was called once, and every later read was an in-process hit
    assert len(upstream.calls) == 1
    assert store.stats.local_hits == 1000
    assert store.stats.hit_ratio == pytest.approx(1000 / 1001)


async def test_a_missing_profile_is_cached_negatively_for_a_short_while(
    upstream: Upstream, make_store: StoreFactory, clock: MonotonicClock
) -> None:
    # Given a viewer the upstream does not know (404), looked up once
    store = make_store()
    assert await store.get("u-new") is None

    # When it is looked up again within the negative TTL, then once the profile exists and 5 s passed
    assert await store.get("u-new") is None
    upstream.profiles["u-new"] = traits("gold")
    clock.advance(4.9)
    assert await store.get("u-new") is None
    clock.advance(0.2)
    found = await store.get("u-new")

    # Then the 404 was remembered for 5 s (one call), and then the profile was found
    assert traits_of(found) == traits("gold")
    assert upstream.calls == ["u-new", "u-new"]


@pytest.mark.parametrize("failure", ["500", "503", "not json", "traits not an object", "timeout", "down"])
async def test_a_failing_upstream_answers_no_profile_and_nothing_is_cached(
    upstream: Upstream, make_store: StoreFactory, failure: str
) -> None:
    # Given an upstream that fails in one way
    upstream.profiles["u-1"] = traits("gold")
    store = make_store(HttpSource(upstream.url, timeout=0.2 if failure == "timeout" else TIMEOUT))
    if failure in ("500", "503"):
        upstream.status = int(failure)
    elif failure == "not json":
        upstream.body = b"<html>oops</html>"
    elif failure == "traits not an object":
        upstream.body = b'["gold"]'
    elif failure == "timeout":
        upstream.hold()  # released by stop()
    else:
        await upstream.stop()

    # When the profile is read
    profile = await asyncio.wait_for(store.get("u-1"), TIMEOUT)

    # Then the request gets no profile rather than an error, and the failure is counted, not cached
    assert profile is None
    assert (store.stats.upstream_calls, store.stats.upstream_failures) == (1, 1)
    if failure != "down":
        if upstream.gate is not None:
            upstream.gate.set()
        upstream.status = upstream.body = upstream.gate = None
        again = await asyncio.wait_for(store.get("u-1"), TIMEOUT)
        assert traits_of(again) == traits("gold")
        assert store.stats.upstream_calls == 2


# -- stale-while-revalidate and the budget -------------------------------------------------------


async def test_a_stale_profile_is_served_at_once_and_refreshed_once_in_the_background(
    upstream: Upstream, make_store: StoreFactory, clock: MonotonicClock
) -> None:
    # Given a profile read once, now past its TTL, and an upstream that has changed it and is slow
    upstream.profiles["u-1"] = traits("silver")
    store = make_store()
    await store.get("u-1")
    clock.advance(TTL + 1)
    upstream.profiles["u-1"] = traits("gold")
    gate = upstream.hold()

    # When ten requests read it (the store has no budget: a request that waited would hang)
    served = [await asyncio.wait_for(store.get("u-1"), TIMEOUT) for _ in range(10)]

    # Then each got the stale copy at once, and one refresh went upstream
    assert all(traits_of(p) == traits("silver") for p in served)
    await upstream.called(2)
    assert (store.stats.stale_served, store.stats.refreshes) == (10, 1)

    # and once the refresh lands, the fresh profile is served from the cache
    gate.set()
    await asyncio.wait_for(store.drain(), TIMEOUT)
    fresh = await store.get("u-1")
    assert traits_of(fresh) == traits("gold")
    assert len(upstream.calls) == 2
    assert store.stats.local_hits == 1


async def test_past_the_stale_window_the_copy_is_gone(
    upstream: Upstream, make_store: StoreFactory, clock: MonotonicClock
) -> None:
    # Given a profile read once, and an upstream that then goes down
    upstream.profiles["u-1"] = traits("gold")
    store = make_store()
    await store.get("u-1")
    await upstream.stop()

    # When it is read within the stale window, and after it
    clock.advance(TTL + STALE - 1)
    within = await store.get("u-1")
    await asyncio.wait_for(store.drain(), TIMEOUT)
    clock.advance(2)
    after = await store.get("u-1")

    # Then the stale copy is served, and then no longer
    assert traits_of(within) == traits("gold")
    assert after is None


async def test_a_slow_upstream_does_not_hold_a_request_past_the_budget(
    upstream: Upstream, make_store: StoreFactory
) -> None:
    # Given a profile nobody has read, behind an upstream that hangs, and a budget of 50 ms
    upstream.profiles["u-1"] = traits("gold")
    store = make_store(budget=0.05)
    gate = upstream.hold()

    # When two requests read it
    started = time.perf_counter()
    first, second = await asyncio.gather(store.get("u-1"), store.get("u-1"))
    waited = time.perf_counter() - started

    # Then they answer "no profile" when the budget runs out, not when the upstream answers
    assert (first, second) == (None, None)
    assert waited < 1.0  # the budget (50 ms), with room for a busy machine; the upstream never answered
    assert store.stats.budget_timeouts == 2
    # and the one fetch goes on in the background and fills the cache
    gate.set()
    await asyncio.wait_for(store.drain(), TIMEOUT)
    later = await store.get("u-1")
    assert traits_of(later) == traits("gold")
    assert upstream.calls == ["u-1"]
    assert store.stats.local_hits == 1


async def test_a_caller_off_the_request_path_can_wait_past_the_budget(
    upstream: Upstream, make_store: StoreFactory
) -> None:
    # Given a profile behind an upstream that hangs, and a budget of 50 ms
    upstream.profiles["u-1"] = traits("gold")
    store = make_store(budget=0.05)
    gate = upstream.hold()

    # When a consent check (say) reads it with wait=True, and a request reads it as usual
    patient = asyncio.ensure_future(store.get("u-1", wait=True))
    hurried = await store.get("u-1")
    assert not patient.done()
    gate.set()

    # Then the request got no profile at the budget, the patient caller the profile, from one call
    assert hurried is None
    assert traits_of(await asyncio.wait_for(patient, TIMEOUT)) == traits("gold")
    assert upstream.calls == ["u-1"]


async def test_with_a_stale_copy_a_slow_upstream_costs_a_request_nothing(
    upstream: Upstream, make_store: StoreFactory, clock: MonotonicClock
) -> None:
    # Given a stale profile, an upstream that hangs, and a budget
    upstream.profiles["u-1"] = traits("gold")
    store = make_store(budget=0.05)
    await store.get("u-1")
    clock.advance(TTL + 1)
    gate = upstream.hold()

    # When it is read
    profile = await store.get("u-1")

    # Then the stale copy is served without waiting for the budget
    assert traits_of(profile) == traits("gold")
    assert store.stats.budget_timeouts == 0
    gate.set()


# -- the breaker -----------------------------------------------------------------------------------


async def test_the_breaker_opens_after_consecutive_failures_and_a_trial_closes_it(
    upstream: Upstream, make_store: StoreFactory, clock: MonotonicClock
) -> None:
    # Given an upstream answering 500, and a breaker that opens after 3 failures for 30 s
    store = make_store(breaker_failures=3, breaker_reset=30.0)
    upstream.status = 500
    for n in range(3):
        assert await store.get(f"u-{n}") is None
    assert store.stats.breaker == "open"

    # When the upstream recovers, requests come while the breaker is open
    upstream.status = None
    upstream.profiles.update({f"u-{n}": traits("gold") for n in range(10)})
    for n in range(3, 8):
        assert await store.get(f"u-{n}") is None
    clock.advance(29.9)
    assert await store.get("u-8") is None

    # Then none of them reached the upstream
    assert len(upstream.calls) == 3
    assert store.stats.breaker_rejections == 6

    # When the reset time has passed, two requests come at once
    clock.advance(0.1)
    assert store.stats.breaker == "half-open"
    gate = upstream.hold()
    trial = asyncio.ensure_future(store.get("u-8"))
    await upstream.called(4)
    rejected = await store.get("u-9")  # the trial is in flight: no second call
    gate.set()
    found = await asyncio.wait_for(trial, TIMEOUT)

    # Then one trial call went through, and its success closed the breaker
    assert rejected is None
    assert traits_of(found) == traits("gold")
    assert store.stats.breaker == "closed"
    assert await store.get("u-9") is not None
    assert upstream.calls[3:] == ["u-8", "u-9"]
    assert store.stats.breaker_openings == 1


async def test_a_failed_trial_opens_the_breaker_again(
    upstream: Upstream, make_store: StoreFactory, clock: MonotonicClock
) -> None:
    # Given an open breaker
    store = make_store(breaker_failures=2, breaker_reset=30.0)
    upstream.status = 500
    for n in range(2):
        await store.get(f"u-{n}")
    clock.advance(30)

    # When the trial fails too
    assert await store.get("u-2") is None

    # Then the breaker is open for another 30 s, and then tries again
    assert store.stats.breaker == "open"
    clock.advance(29)
    assert await store.get("u-3") is None
    assert len(upstream.calls) == 3
    clock.advance(1)
    upstream.status = None
    upstream.profiles["u-4"] = traits("gold")
    assert await store.get("u-4") is not None
    assert len(upstream.calls) == 4
    assert store.stats.breaker_openings == 2


async def test_stale_copies_are_served_while_the_upstream_fails_and_the_breaker_is_open(
    upstream: Upstream, make_store: StoreFactory, clock: MonotonicClock
) -> None:
    # Given a cached profile, past its TTL, and an upstream that now fails
    upstream.profiles["u-1"] = traits("gold")
    store = make_store(breaker_failures=3)
    await store.get("u-1")
    clock.advance(TTL + 1)
    upstream.status = 500

    # When it is read 40 times, two reads a second
    served = []
    for _ in range(40):
        served.append(await store.get("u-1"))
        await asyncio.wait_for(store.drain(), TIMEOUT)
        clock.advance(0.5)

    # Then every read got the stale copy at once. A failed refresh was retried a second later, not
    # on the next read; three failed, and then the open breaker kept the rest away from the upstream
    assert all(traits_of(p) == traits("gold") for p in served)
    assert len(upstream.calls) == 1 + 3
    assert store.stats.refreshes == 20  # one a second, for 20 s
    assert store.stats.breaker_rejections == 17
    assert store.stats.breaker == "open"
    assert store.stats.stale_served == 40


# -- Redis, shared by instances --------------------------------------------------------------------


async def test_a_second_instance_reads_the_first_ones_fetch_from_redis(
    upstream: Upstream, make_store: StoreFactory, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # Given two instances sharing Redis, and a profile and a missing one that A has read
    upstream.profiles["u-1"] = traits("gold")
    a = make_store(redis=redis_client, prefix=redis_prefix)
    b = make_store(redis=redis_client, prefix=redis_prefix)
    assert await a.get("u-1") is not None
    assert await a.get("u-missing") is None
    await a.drain()  # the Redis writes follow the answers

    # When B reads both
    found = await b.get("u-1")
    missing = await b.get("u-missing")

    # Then B got them from Redis, without calling the upstream
    assert found == Profile(traits=traits("gold"), consent=True)
    assert missing is None
    assert upstream.calls == ["u-1", "u-missing"]
    assert (b.stats.redis_hits, b.stats.upstream_calls) == (2, 0)
    # and Redis keeps them for ttl + stale, the missing one for the negative TTL only
    assert 0 < await redis_client.pttl(f"{redis_prefix}profile:u-1") <= (TTL + STALE) * 1000
    assert 0 < await redis_client.pttl(f"{redis_prefix}profile:u-missing") <= 5000


async def test_an_aged_redis_copy_is_served_stale_and_refreshed(
    upstream: Upstream, make_store: StoreFactory, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # Given a profile that A fetched long enough ago to be stale (its Redis copy has less than
    # `stale` seconds left), changed upstream since, and an upstream that is slow
    upstream.profiles["u-1"] = traits("silver")
    a = make_store(redis=redis_client, prefix=redis_prefix)
    await a.get("u-1")
    await a.drain()
    key = f"{redis_prefix}profile:u-1"
    await redis_client.pexpire(key, int((STALE - 10) * 1000))
    upstream.profiles["u-1"] = traits("gold")
    gate = upstream.hold()

    # When instance B reads it
    b = make_store(redis=redis_client, prefix=redis_prefix, budget=5.0)
    stale = await asyncio.wait_for(b.get("u-1"), TIMEOUT)

    # Then B serves the stale copy without waiting for the upstream, and refreshes it behind
    assert traits_of(stale) == traits("silver")
    assert b.stats.redis_stale == 1
    assert b.stats.budget_timeouts == 0
    gate.set()
    await asyncio.wait_for(b.drain(), TIMEOUT)
    fresh = await b.get("u-1")
    assert traits_of(fresh) == traits("gold")
    assert len(upstream.calls) == 2
    assert await redis_client.pttl(key) > STALE * 1000  # fresh in Redis again, for every instance


async def test_an_unreadable_redis_copy_is_loaded_anew(
    upstream: Upstream, make_store: StoreFactory, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # Given a Redis copy that this version did not write
    upstream.profiles["u-1"] = traits("gold")
    key = f"{redis_prefix}profile:u-1"
    await redis_client.set(key, b"not json", px=60_000)
    store = make_store(redis=redis_client, prefix=redis_prefix)

    # When the profile is read
    profile = await store.get("u-1")
    await store.drain()

    # Then it comes from the upstream, and replaces the Redis copy
    assert traits_of(profile) == traits("gold")
    assert upstream.calls == ["u-1"]
    assert orjson.loads(await redis_client.get(key)) == {"traits": traits("gold"), "consent": True}


async def test_invalidation_drops_the_local_copy_and_the_redis_copy(
    upstream: Upstream, make_store: StoreFactory, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # Given a profile cached by A, in process and in Redis, that then changes upstream
    upstream.profiles["u-1"] = traits("silver")
    a = make_store(redis=redis_client, prefix=redis_prefix)
    b = make_store(redis=redis_client, prefix=redis_prefix)
    await a.get("u-1")
    await a.drain()
    upstream.profiles["u-1"] = traits("gold")

    # When A invalidates it, locally and in Redis
    invalidated = a.invalidated
    a.invalidate("u-1")
    await a.invalidate_shared(["u-1"])

    # Then A's waiters hear of it, the Redis copy is gone, and both instances read the new profile
    assert invalidated.is_set()
    assert await redis_client.exists(f"{redis_prefix}profile:u-1") == 0
    for store in (a, b):
        profile = await store.get("u-1")
        assert traits_of(profile) == traits("gold")
    assert len(upstream.calls) == 2  # A's new fetch; B read it from Redis


async def test_a_load_in_flight_during_an_invalidation_does_not_cache_what_it_read(
    upstream: Upstream, make_store: StoreFactory, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # Given a read of a profile in flight at a slow upstream, which has answered the old traits
    upstream.profiles["u-1"] = traits("silver")
    store = make_store(redis=redis_client, prefix=redis_prefix)
    gate = upstream.hold()
    before = asyncio.ensure_future(store.get("u-1"))
    await upstream.called(1)

    # When the profile changes and is invalidated, and is read again
    upstream.profiles["u-1"] = traits("gold")
    store.invalidate("u-1")
    after = asyncio.ensure_future(store.get("u-1"))
    await upstream.called(2)  # a new read, not joined to the old one
    gate.set()
    old, new = await asyncio.wait_for(asyncio.gather(before, after), TIMEOUT)
    await asyncio.wait_for(store.drain(), TIMEOUT)

    # Then the old answer went to the request that asked before, but into no cache
    assert traits_of(old) == traits("silver")
    assert traits_of(new) == traits("gold")
    cached = await store.get("u-1")
    assert traits_of(cached) == traits("gold")
    assert store.stats.local_hits == 1
    other = make_store(redis=redis_client, prefix=redis_prefix)
    shared = await other.get("u-1")
    assert traits_of(shared) == traits("gold")


async def test_when_every_layer_fails_a_read_answers_no_profile(upstream: Upstream, make_store: StoreFactory) -> None:
    # Given Redis that refuses connections and an upstream that is down
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    dead_redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{dead_port}")
    store = make_store(redis=dead_redis, prefix="tessera-test:dead:")
    await upstream.stop()

    # When two profiles are read
    try:
        first = await asyncio.wait_for(store.get("u-1"), TIMEOUT)
        second = await asyncio.wait_for(store.get("u-2"), TIMEOUT)
    finally:
        await dead_redis.aclose()

    # Then the answers are "no profile", the failures are counted, and after Redis failed once the
    # store went straight to the source (it does not pay Redis's timeout on every load)
    assert first is second is None
    assert store.stats.redis_errors == 1
    assert store.stats.upstream_failures == 2


# -- the built-in store ------------------------------------------------------------------------------


async def test_the_built_in_store_behind_redis(
    session_maker: async_sessionmaker[AsyncSession],
    make_store: StoreFactory,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    # Given profiles in the database, one without consent to personalization
    async with session_maker() as session, session.begin():
        await ProfileRepository(session).upsert_many(
            [
                {"userId": "u-1", "traits": traits("gold")},
                {"userId": "u-2", "traits": traits("silver"), "consent": {"personalization": False}},
            ]
        )
    a = make_store(DatabaseSource(session_maker), redis=redis_client, prefix=redis_prefix)
    b = make_store(DatabaseSource(session_maker), redis=redis_client, prefix=redis_prefix)

    # When A reads them from the database, then B
    read_by_a = [await a.get(user) for user in ("u-1", "u-2", "u-3")]
    await a.drain()
    read_by_b = [await b.get(user) for user in ("u-1", "u-2", "u-3")]

    # Then both see the same profiles, B only through Redis
    expected = [Profile(traits("gold"), True), Profile(traits("silver"), False), None]
    assert read_by_a == read_by_b == expected
    assert (a.stats.upstream_calls, b.stats.upstream_calls, b.stats.redis_hits) == (3, 0, 3)


async def test_closing_the_store_stops_its_loads(upstream: Upstream, make_store: StoreFactory) -> None:
    # Given a read in flight at an upstream that hangs
    upstream.profiles["u-1"] = traits("gold")
    store = make_store()
    upstream.hold()
    read = asyncio.ensure_future(store.get("u-1"))
    await upstream.called(1)

    # When the store closes (the app shuts down)
    await asyncio.wait_for(store.close(), TIMEOUT)

    # Then the read answers "no profile" rather than hanging or raising
    assert await asyncio.wait_for(read, TIMEOUT) is None

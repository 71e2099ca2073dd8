"""The composition root: the one place that wires concrete adapters (store, bus, caches, keys)
into the GraphQL schemas, and the lifespan that opens and closes every resource in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute

from schema import admin as admin_schema
from schema import delivery as delivery_schema
from schema.http import TesseraGraphQL
from schema.ports import Principal
from server.admin import Admin
from server.bus import InProcessBus, RedisBus
from server.db import create_engine, session_factory
from server.events import LocalEventStore, RedisEventStore
from server.experiments import ExperimentResults, ExposureRecorder
from server.hooks import profile_invalidation_hook
from server.ingest import Ingestor
from server.keys import KeyResolver
from server.profiles import PROFILES_CHANNEL, ProfileStore
from server.requests import RequestInference
from server.settings import Clock, Settings, system_clock
from server.snapshots import CONTENT_CHANNEL, SnapshotHolder
from server.tracking import TrackingCORS, tracking_routes
from server.worker import (
    SEGMENTS_CHANNEL,
    Evaluator,
    LocalMemberships,
    LocalSchedule,
    RedisMemberships,
    RedisSchedule,
    StreamWorker,
)

log = logging.getLogger(__name__)


class KeyAuthenticator:
    def __init__(self, keys: KeyResolver) -> None:
        self._keys = keys

    async def authenticate(self, raw_key: str) -> Principal | None:
        record = await self._keys.resolve(raw_key)
        return Principal(scope=record.scope, key_id=record.id) if record else None


@dataclass
class Services:
    """Everything the lifespan opens, in the order it opens them."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: aioredis.Redis | None
    bus: InProcessBus | RedisBus
    snapshots: SnapshotHolder
    profiles: ProfileStore
    keys: KeyResolver
    admin: Admin
    events: RedisEventStore | LocalEventStore
    ingest: Ingestor
    evaluator: Evaluator
    stream_worker: StreamWorker | None
    exposures: ExposureRecorder


def build_services(settings: Settings, clock: Clock = system_clock) -> Services:
    engine = create_engine(settings.database_url)
    sessions = session_factory(engine)
    client = aioredis.Redis.from_url(settings.redis_url) if settings.redis_url else None
    bus: InProcessBus | RedisBus = RedisBus(client, settings.redis_prefix) if client else InProcessBus()
    snapshots = SnapshotHolder(sessions, bus, retention=settings.retention, poll_seconds=settings.version_poll_seconds)

    profiles = ProfileStore.from_settings(settings, sessions, client)

    async def announce(version: int) -> None:
        # The change is committed: a failure to announce it must not make the write look failed.
        # The other instances' version poll and this one's catch up within a second.
        try:
            await snapshots.refresh()  # this instance serves the change before the write returns
            await bus.publish(CONTENT_CHANNEL, {"version": version})
        except Exception:
            log.warning("could not announce content version %s; the version poll will", version, exc_info=True)

    async def profiles_changed(user_ids: list[str]) -> None:
        for user_id in user_ids:  # this instance at once (read-your-writes), the others by the bus
            profiles.invalidate(user_id)
        try:
            await profiles.invalidate_shared(user_ids)  # before the bus: the others re-read from Redis
            await bus.publish(PROFILES_CHANNEL, {"userIds": user_ids})
        except Exception:  # the cached copies expire on their own (TTL)
            log.warning("could not announce %d changed profiles", len(user_ids), exc_info=True)

    async def consents(user_id: str) -> bool:
        profile = await profiles.get(user_id, wait=True)  # off the request path: know, do not guess
        return profile is None or profile.consent

    events: RedisEventStore | LocalEventStore
    memberships: RedisMemberships | LocalMemberships
    schedule: RedisSchedule | LocalSchedule
    if client is not None:
        events = RedisEventStore(client, settings.redis_prefix, retention=settings.retention, clock=clock)
        assert isinstance(bus, RedisBus)
        memberships = RedisMemberships(client, settings.redis_prefix, announce_to=bus.key(SEGMENTS_CHANNEL))
        schedule = RedisSchedule(client, settings.redis_prefix)
    else:
        events, memberships, schedule = (
            LocalEventStore(sessions, retention=settings.retention, clock=clock),
            LocalMemberships(),
            LocalSchedule(),
        )
    ingest = Ingestor(
        events,
        sessions,
        limits=settings.limits,
        clock=clock,
        consents=consents,
        profiles_changed=profiles_changed,
        prefetch=profiles.prefetch,
    )
    evaluator = Evaluator(
        snapshots=snapshots,
        profiles=profiles,
        events=events,
        memberships=memberships,
        schedule=schedule,
        bus=bus,
        clock=clock,
        prefetch=profiles.prefetch,
    )
    ingest.identity_listeners.append(evaluator.on_identity)
    ingest.forget_listeners.append(evaluator.on_forget)
    stream_worker = None
    if isinstance(events, LocalEventStore):
        events.appended.append(evaluator.on_events)
    elif settings.run_worker and client is not None:
        stream_worker = StreamWorker(
            client,
            settings.redis_prefix,
            evaluator=evaluator,
            sessions=sessions,
            clock=clock,
            claim_idle_ms=settings.worker_claim_idle_ms,
        )
    return Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        redis=client,
        bus=bus,
        snapshots=snapshots,
        profiles=profiles,
        keys=KeyResolver(sessions, ttl=settings.key_cache_ttl_seconds),
        admin=Admin(
            sessions,
            clock=clock,
            announce=announce,
            profiles_changed=profiles_changed,
            ingest=ingest,
            experiments=ExperimentResults(sessions, snapshots),
        ),
        exposures=ExposureRecorder(events, clock),
        events=events,
        ingest=ingest,
        evaluator=evaluator,
        stream_worker=stream_worker,
    )


async def _follow_profiles(services: Services) -> None:
    async with services.bus.subscribe(PROFILES_CHANNEL) as messages:
        async for message in messages:
            for user_id in message.get("userIds") or ():
                services.profiles.invalidate(user_id)


def create_app(settings: Settings | None = None, *, clock: Clock = system_clock) -> Starlette:
    """The ASGI application. ``clock`` is injectable so that tests drive time."""
    settings = settings or Settings()
    services = build_services(settings, clock)
    inference = RequestInference(
        country_headers=settings.country_headers,
        region_headers=settings.region_headers,
        city_headers=settings.city_headers,
    )
    common = {
        "authenticator": KeyAuthenticator(services.keys),
        "snapshots": services.snapshots,
        "inference": inference,
        "profiles": services.profiles,
        "history": services.events,
        "clock": clock,
        "graphiql": settings.graphiql,
        "max_body_bytes": settings.max_body_bytes,
    }
    delivery = TesseraGraphQL(
        delivery_schema.schema,
        scopes=frozenset({"delivery", "preview", "ingest"}),
        ingest=services.ingest,
        exposures=services.exposures,
        **common,  # type: ignore[arg-type]
    )
    admin = TesseraGraphQL(
        admin_schema.schema,
        scopes=frozenset({"admin"}),
        admin=services.admin,
        **common,  # type: ignore[arg-type]
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.bus.start()
        await services.snapshots.start()
        tasks = [asyncio.create_task(_follow_profiles(services), name="profile-invalidation")]
        if isinstance(services.events, LocalEventStore):
            await services.events.load()
            tasks.append(
                asyncio.create_task(
                    services.events.run_follower(settings.events_follow_seconds), name="events-follower"
                )
            )
        if services.stream_worker is not None:
            await services.stream_worker.ensure_group()
            tasks.append(asyncio.create_task(services.stream_worker.run(), name="event-worker"))
        if settings.run_worker:
            tasks.append(asyncio.create_task(services.evaluator.run_flips(), name="time-flips"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await services.profiles.close()  # its loads in flight, and the profile service's httpx client
            await services.snapshots.close()
            await services.bus.close()
            if services.redis is not None:
                await services.redis.aclose()
            await services.engine.dispose()

    async def health(request: Request) -> Response:
        checks: dict[str, object] = {"contentVersion": services.snapshots.current.version}
        status = 200
        try:
            async with services.sessions() as session:
                await session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # report, do not raise: a health check answers
            checks["database"] = f"unreachable: {type(exc).__name__}"
            status = 503
        if services.redis is not None:
            try:
                await services.redis.ping()
                checks["redis"] = "ok"
            except Exception as exc:
                checks["redis"] = f"unreachable: {type(exc).__name__}"
                status = 503
        return JSONResponse(checks, status)

    async def home(request: Request) -> Response:
        return RedirectResponse("/graphql")

    app = Starlette(
        routes=[
            Route("/", home),
            Route("/healthz", health),
            Route("/graphql", delivery),
            WebSocketRoute("/graphql", delivery),
            Route("/admin/graphql", admin),
            profile_invalidation_hook(KeyAuthenticator(services.keys), services.profiles, services.bus),
            *tracking_routes(KeyAuthenticator(services.keys), services.ingest, clock=clock),
        ],
        middleware=[Middleware(TrackingCORS, origins=settings.tracking_cors_origins)],
        lifespan=lifespan,
    )
    app.state.services = services
    return app

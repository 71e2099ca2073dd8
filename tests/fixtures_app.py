"""Fixtures that run the whole application in-process: the real app over the real databases (and,
when asked, the real Redis), with an injected clock and a key of every scope."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from server.app import Services, create_app
from server.keys import create_key
from server.settings import Settings

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # a Friday


@dataclass
class FakeClock:
    """The app's clock in tests: time moves only when a test moves it."""

    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Any:
        return self.body.get("data")

    @property
    def errors(self) -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = self.body.get("errors") or []
        return errors

    def codes(self) -> list[str | None]:
        return [e.get("extensions", {}).get("code") for e in self.errors]


@dataclass
class RunningApp:
    app: Starlette
    services: Services
    client: httpx.AsyncClient
    clock: FakeClock
    keys: dict[str, str]

    async def graphql(
        self,
        query: str,
        variables: Mapping[str, Any] | None = None,
        *,
        key: str | None = "delivery",
        path: str = "/graphql",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """POST a GraphQL request; ``key`` is a scope of the fixture's keys, a raw key, or None."""
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {self.keys.get(key, key)}"
        body: dict[str, Any] = {"query": query}
        if variables is not None:
            body["variables"] = variables
        response = await self.client.post(path, json=body, headers=sent)
        return Reply(response.status_code, response.json(), response.headers)

    async def admin(self, query: str, variables: Mapping[str, Any] | None = None) -> Reply:
        return await self.graphql(query, variables, key="admin", path="/admin/graphql")


def by_key(bundle: Mapping[str, Any]) -> dict[str, Any]:
    """A bundle's configuration entity by entity: lists as dicts by key, blocks by (key, locale)."""
    view: dict[str, Any] = {"locales": bundle.get("locales")}
    for kind in ("placements", "segments", "scores", "flags", "experiments"):
        view[kind] = {doc["key"]: doc for doc in bundle.get(kind) or ()}
    default = (bundle.get("locales") or {}).get("default", "en-US")
    view["blocks"] = {(doc["key"], doc.get("locale", default)): doc for doc in bundle.get("blocks") or ()}
    return view


@dataclass
class Served:
    """An ASGI app served by uvicorn on 127.0.0.1 in the test's event loop."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Down: the listening socket is closed and connections to it are refused (callers bound
        the wait with asyncio.timeout when they need to)."""
        if not self.task.done():
            self.server.should_exit = True
            await self.task


def serve(app: Any, port: int = 0, *, name: str = "uvicorn") -> Served:
    """Serve ``app`` (its lifespan is the caller's) on a loopback port. The socket listens before
    uvicorn runs, so a client may connect at once (the kernel queues it): nothing to wait for. It is
    made with IPPROTO_TCP, as asyncio sets TCP_NODELAY only then; without it every response waits
    ~40 ms for the client's delayed ACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(256)
    config = uvicorn.Config(
        app, log_level="warning", log_config=None, lifespan="off", ws="none", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=name)
    return Served(server=server, task=task, port=int(sock.getsockname()[1]))


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """``serve(app)`` for the length of a ``with``; yields the base URL."""
    live = serve(app)
    try:
        yield live.url
    finally:
        async with asyncio.timeout(10):
            await live.stop()


@asynccontextmanager
async def running_app(
    database_url: str, *, redis_url: str | None = None, redis_prefix: str = "tessera:", clock: FakeClock | None = None
) -> AsyncIterator[RunningApp]:
    clock = clock or FakeClock()
    settings = Settings(database_url=database_url, redis_url=redis_url, redis_prefix=redis_prefix)
    app = create_app(settings, clock=clock)
    services: Services = app.state.services
    async with app.router.lifespan_context(app):
        keys = {}
        async with services.sessions() as session, session.begin():
            for scope in ("delivery", "preview", "admin", "ingest"):
                keys[scope] = (await create_key(session, scope=scope, name=f"test-{scope}")).raw
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tessera.test") as client:
            yield RunningApp(app=app, services=services, client=client, clock=clock, keys=keys)


@pytest.fixture
async def app(db_url: str) -> AsyncIterator[RunningApp]:
    """The embedded application (in-process cache and bus) on PostgreSQL, then on SQLite."""
    async with running_app(db_url) as running:
        yield running

"""Fixtures that run the whole application in-process: the real app over the real databases (and,
when asked, the real Redis), with an injected clock and a key of every scope."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
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

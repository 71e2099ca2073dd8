"""The ports the GraphQL layer needs, as protocols. ``server`` provides the adapters; nothing here
knows about SQL, Redis or HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from content.behaviour import History
from content.decide import Resolved
from content.errors import Problem
from content.experiments import Analysis
from content.snapshot import Snapshot
from content.viewer import Viewer


class Bus(Protocol):
    """Announces changes to every instance: ``content`` (a new version), ``profiles``, ``flags``..."""

    async def publish(self, channel: str, message: Mapping[str, Any]) -> None: ...

    async def publish_many(self, channel: str, messages: Sequence[Mapping[str, Any]]) -> None:
        """Publish ``messages`` in order, at once (one round trip for a batch)."""
        ...

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[Mapping[str, Any]]]: ...


class SnapshotSource(Protocol):
    """The current compiled content version. Reading it never waits on I/O."""

    @property
    def current(self) -> Snapshot: ...


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the request itself says about the viewer (User-Agent, trusted CDN geo headers)."""

    device: str | None = None
    country: str | None = None
    region: str | None = None
    city: str | None = None


class Inference(Protocol):
    def infer(self, headers: Mapping[str, str]) -> RequestContext: ...


@dataclass(frozen=True, slots=True)
class Profile:
    traits: Mapping[str, Any]
    consent: bool  # consent.personalization; a viewer with no profile consents (rules.md)


class ProfileSource(Protocol):
    async def get(self, user_id: str, *, wait: bool = False) -> Profile | None:
        """The viewer's profile. The request path waits at most its latency budget (then: stale, or
        None); ``wait=True`` (off the request path) waits for the source."""
        ...


class HistorySource(Protocol):
    async def history(self, *, user_id: str | None, anonymous_id: str | None, now: datetime) -> History: ...


class ExposureSink(Protocol):
    async def record(self, viewer: Viewer, delivered: Iterable[Resolved]) -> None:
        """Record the experiment arms among ``delivered`` as exposures of ``viewer``."""
        ...


@dataclass(frozen=True, slots=True)
class ExperimentReport:
    key: str
    goal: tuple[Mapping[str, Any], ...]
    analysis: Analysis


class TrackReport(Protocol):
    """What became of a batch of events."""

    @property
    def accepted(self) -> int: ...

    @property
    def rejected(self) -> list[Problem]: ...

    @property
    def rejected_count(self) -> int: ...


class Ingest(Protocol):
    async def track(self, records: Sequence[tuple[str, Any]], *, strict: bool = False) -> TrackReport:
        """Check and store (path, event) records; invalid ones are reported, the others accepted."""
        ...


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the scope of their API key."""

    scope: str  # delivery | preview | admin | ingest
    key_id: int | None = None

    @property
    def preview(self) -> bool:
        return self.scope == "preview"


@dataclass(slots=True)
class ImportReport:
    dry_run: bool
    version: int
    created: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)
    unchanged: dict[str, int] = field(default_factory=dict)
    profiles: int = 0
    events: int = 0
    rejected: list[Problem] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BlockState:
    """A block in the admin view: its draft and what is live."""

    key: str
    locale: str
    draft: Mapping[str, Any]
    published_version: int | None
    latest_version: int
    published_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class BlockVersionState:
    key: str
    locale: str
    version: int
    document: Mapping[str, Any]
    published_at: datetime


class AdminService(Protocol):
    """Management of a space's configuration. Every write is validated as a whole configuration
    and raises ``content.errors.InvalidContent`` with every problem; nothing is half-written."""

    async def entities(self, kind: str) -> list[Mapping[str, Any]]: ...

    async def entity(self, kind: str, key: str) -> Mapping[str, Any] | None: ...

    async def save(self, kind: str, document: Mapping[str, Any], *, mode: str) -> Mapping[str, Any]: ...

    async def delete(self, kind: str, key: str) -> bool: ...

    async def blocks(self) -> list[BlockState]: ...

    async def block(self, key: str, locale: str | None) -> BlockState | None: ...

    async def save_block(self, document: Mapping[str, Any], *, mode: str) -> BlockState: ...

    async def delete_block(self, key: str, locale: str | None) -> bool: ...

    async def publish_block(self, key: str, locale: str | None) -> BlockVersionState: ...

    async def unpublish_block(self, key: str, locale: str | None) -> bool: ...

    async def block_versions(self, key: str, locale: str | None) -> list[BlockVersionState]: ...

    async def import_bundle(self, bundle: Any, *, dry_run: bool = False) -> ImportReport: ...

    async def export_bundle(self) -> dict[str, Any]: ...

    async def locales(self) -> Mapping[str, Any]: ...

    async def set_locales(self, locales: Any) -> Mapping[str, Any]: ...

    async def experiment_results(self, key: str) -> ExperimentReport | None:
        """Exposures, conversions and statistics per arm; None for an unknown experiment."""
        ...

    async def delete_viewer_data(self, *, user_id: str | None, anonymous_id: str | None) -> Mapping[str, int]:
        """Remove a viewer's profile, events, identities, state, memberships and cached copies."""
        ...


class NotFoundError(Exception):
    """The thing named does not exist (``what`` says which)."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"{what} not found")


class ConflictError(Exception):
    """Creating something that exists already."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"{what} already exists")


__all__ = [
    "AdminService",
    "BlockState",
    "BlockVersionState",
    "Bus",
    "ConflictError",
    "ExperimentReport",
    "ExposureSink",
    "HistorySource",
    "ImportReport",
    "Inference",
    "Ingest",
    "NotFoundError",
    "Principal",
    "Profile",
    "ProfileSource",
    "RequestContext",
    "SnapshotSource",
    "TrackReport",
]

"""Ingestion: what ``track`` (GraphQL), the Segment-compatible HTTP API and imports call. Checks
every event (the invalid ones are reported, the valid ones in the same batch accepted), drops the
events of viewers who withheld consent, and appends the rest durably before answering. Identify and
alias join identities and update profiles; deletion removes a viewer everywhere."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from content.errors import Problem
from server.events import EventStore, Tracked, check_tracked
from server.settings import Clock, Limits
from server.store import EventRepository, IdentityRepository, ProfileRepository

log = logging.getLogger(__name__)

UNJOINED_REMEMBERED = 200_000
Listener = Callable[[str | None, str | None], Awaitable[None]]


@dataclass(slots=True)
class IngestResult:
    accepted: int = 0  # valid events: stored, duplicates, and those withheld for consent
    stored: int = 0
    duplicates: int = 0
    withheld: int = 0  # of viewers who withheld consent: accepted, never stored
    rejected: list[Problem] = field(default_factory=list)
    events: list[Tracked] = field(default_factory=list)  # the stored ones

    @property
    def rejected_count(self) -> int:
        return len({p.path.split(".")[0] for p in self.rejected})


@dataclass(frozen=True, slots=True)
class Removed:
    profiles: int
    events: int
    state_events: int
    identities: int


class Ingestor:
    def __init__(
        self,
        store: EventStore,
        sessions: async_sessionmaker[AsyncSession],
        *,
        limits: Limits,
        clock: Clock,
        consents: Callable[[str], Awaitable[bool]],
        profiles_changed: Callable[[list[str]], Awaitable[None]] | None = None,
        prefetch: Callable[[set[str]], Awaitable[None]] | None = None,
    ) -> None:
        """``consents(user_id)`` answers whether a user consents to personalisation;
        ``prefetch(user_ids)``, when given, warms what it reads for a whole batch at once."""
        self._store = store
        self._sessions = sessions
        self.limits = limits
        self._clock = clock
        self._consents = consents
        self._profiles_changed = profiles_changed
        self._prefetch = prefetch
        # Anonymous ids the database had no join for: not asked again (a join made later is in the
        # behavioural state, which is asked first). Bounded; forgetting one costs one query.
        self._unjoined: OrderedDict[str, None] = OrderedDict()
        self.identity_listeners: list[Listener] = []  # the evaluator: a viewer's traits or identity changed
        self.forget_listeners: list[Listener] = []

    async def track(
        self, records: Sequence[tuple[str, Any]], *, strict: bool = False, measured: bool = False
    ) -> IngestResult:
        """Check and store (path, event) records. ``strict`` (imports) requires ids and times;
        ``measured``: the caller held each record to the size limit already."""
        result = IngestResult()
        now = self._clock()
        valid: list[Tracked] = []
        for path, raw in records:
            checked = check_tracked(
                raw, path, now=now, limits=self.limits, require_id_and_time=strict, measured=measured
            )
            if isinstance(checked, list):
                result.rejected.extend(checked)
            else:
                valid.append(checked)
        result.accepted = len(valid)
        # An event with only an anonymous id joined to a user is that user's (it is filed under them),
        # so their consent decides whether it is stored.
        linked = await self._joined({e.anonymous_id for e in valid if not e.user_id and e.anonymous_id})
        owners = [e.user_id or linked.get(e.anonymous_id or "") for e in valid]
        users = {user_id for user_id in owners if user_id}
        if users and self._prefetch is not None:
            await self._prefetch(users)
        consenting = []
        verdicts: dict[str, bool] = {}
        for event, user_id in zip(valid, owners, strict=True):
            if user_id:
                if user_id not in verdicts:
                    verdicts[user_id] = await self._consents(user_id)
                if not verdicts[user_id]:
                    result.withheld += 1
                    continue
            consenting.append(event)
        stored = await self._store.append(consenting) if consenting else []
        result.stored = len(stored)
        result.duplicates = len(consenting) - len(stored)
        result.events = stored
        return result

    async def _joined(self, anonymous_ids: set[str]) -> dict[str, str]:
        """The users these anonymous ids are joined to: from the behavioural state, else from the
        database (which keeps every join: the state's expire, and a process that keeps no state
        knows none). A join found only in the database is restored to the state."""
        linked = await self._store.users_of(anonymous_ids)
        unknown = [i for i in anonymous_ids if i not in linked and i not in self._unjoined]
        if not unknown:
            return linked
        async with self._sessions() as session:
            found = await IdentityRepository(session).users_of(unknown)
        for anonymous_id, user_id in found.items():
            await self._store.link(anonymous_id, user_id)
        for anonymous_id in unknown:
            if anonymous_id not in found:
                self._unjoined[anonymous_id] = None
        while len(self._unjoined) > UNJOINED_REMEMBERED:
            self._unjoined.popitem(last=False)
        return {**linked, **found}

    async def identify(
        self,
        *,
        user_id: str,
        anonymous_id: str | None = None,
        traits: Mapping[str, Any] | None = None,
        consent: Mapping[str, Any] | None = None,
    ) -> None:
        """Merge ``traits`` into the user's profile, set consent when given, and join the anonymous
        history to the user's."""
        async with self._sessions() as session, session.begin():
            profiles = ProfileRepository(session, clock=self._clock)
            if traits or consent is not None:
                current = await profiles.get(user_id)
                merged = {**(current[0] if current else {}), **(traits or {})}
                stored_consent = dict(consent) if consent is not None else (current[1] if current else None)
                await profiles.upsert_many([{"userId": user_id, "traits": merged, "consent": stored_consent}])
            if anonymous_id:
                await IdentityRepository(session, clock=self._clock).link(anonymous_id, user_id)
        if anonymous_id:
            await self._store.link(anonymous_id, user_id)
        if (traits or consent is not None) and self._profiles_changed is not None:
            await self._profiles_changed([user_id])
        for listener in self.identity_listeners:
            await listener(user_id, anonymous_id)

    async def alias(self, *, previous_id: str, user_id: str) -> None:
        """Join ``previous_id`` (an anonymous id) to ``user_id``."""
        await self.identify(user_id=user_id, anonymous_id=previous_id)

    async def forget(self, *, user_id: str | None, anonymous_id: str | None) -> Removed:
        """Delete a viewer's profile, events, identities and behavioural state."""
        async with self._sessions() as session, session.begin():
            identities = IdentityRepository(session, clock=self._clock)
            anonymous_ids = [anonymous_id] if anonymous_id else []
            if user_id:
                anonymous_ids += await identities.anonymous_ids_of(user_id)
            profiles = int(await ProfileRepository(session).delete(user_id)) if user_id else 0
            events = await EventRepository(session).delete_for(user_id=user_id, anonymous_ids=anonymous_ids)
            links = await identities.delete_for(user_id=user_id, anonymous_id=anonymous_id)
        state_events = await self._store.forget(user_id=user_id, anonymous_id=None)
        for anon in dict.fromkeys(anonymous_ids):
            state_events += await self._store.forget(user_id=None, anonymous_id=anon)
        if user_id and self._profiles_changed is not None:
            await self._profiles_changed([user_id])
        for listener in self.forget_listeners:
            await listener(user_id, anonymous_id)
        return Removed(profiles=profiles, events=events, state_events=state_events, identities=links)

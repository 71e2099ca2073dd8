"""The segment evaluator: follows events (the Redis stream with a consumer group, or the embedded
queue), re-evaluates only the segments that depend on each event's type, announces membership
changes on the bus, and schedules every viewer's next time-driven flip (an abandonment turning true
15 minutes after the last add-to-cart, a window sliding past an event) for the instant it happens.

Redis layout, under the configured prefix: ``mem:<unit>`` (a set of segment keys: the membership
last announced) and ``flips`` (a sorted set, unit -> instant in microseconds of its next possible flip)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from content.decide import Evaluation
from content.viewer import make_viewer
from schema.ports import Bus, ProfileSource, SnapshotSource
from server.events import EventStore, Tracked, ids_of_unit, unit_of
from server.settings import Clock
from server.store import EventRepository, IdentityRepository

log = logging.getLogger(__name__)

SEGMENTS_CHANNEL = "segments"
EVALUATIONS_AT_ONCE = 16  # viewers of one batch evaluated concurrently
GROUP = "evaluators"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(at: datetime) -> int:
    """``at`` in whole microseconds since the epoch (exact in a sorted set's double: < 2 ** 53)."""
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------------------------
# Memberships and the flip schedule


class Memberships(Protocol):
    async def get(self, unit: str) -> set[str]: ...

    async def update(self, unit: str, entered: Iterable[str], left: Iterable[str]) -> None: ...

    async def forget(self, unit: str) -> None: ...


class FlipSchedule(Protocol):
    async def set(self, unit: str, at: datetime | None) -> None: ...

    async def due(self, now: datetime, limit: int = 500) -> list[str]:
        """Take (remove and return) the units whose flip instant is at or before ``now``."""
        ...

    async def next_due(self) -> datetime | None: ...


class LocalMemberships:
    def __init__(self) -> None:
        self._members: dict[str, set[str]] = {}

    async def get(self, unit: str) -> set[str]:
        return set(self._members.get(unit, ()))

    async def update(self, unit: str, entered: Iterable[str], left: Iterable[str]) -> None:
        members = self._members.setdefault(unit, set())
        members.update(entered)
        members.difference_update(left)

    async def forget(self, unit: str) -> None:
        self._members.pop(unit, None)


class LocalSchedule:
    """A heap of (instant, unit); a unit's latest instant wins (older entries are skipped)."""

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, str]] = []
        self._at: dict[str, datetime] = {}
        self.changed = asyncio.Event()

    async def set(self, unit: str, at: datetime | None) -> None:
        if at is None:
            self._at.pop(unit, None)
            return
        self._at[unit] = at
        heapq.heappush(self._heap, (at, unit))
        self.changed.set()

    async def due(self, now: datetime, limit: int = 500) -> list[str]:
        units: list[str] = []
        while self._heap and self._heap[0][0] <= now and len(units) < limit:
            at, unit = heapq.heappop(self._heap)
            if self._at.get(unit) == at:
                del self._at[unit]
                units.append(unit)
        return units

    async def next_due(self) -> datetime | None:
        while self._heap and self._at.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None


class RedisMemberships:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix + "mem:"

    async def get(self, unit: str) -> set[str]:
        members = await self._client.smembers(self._prefix + unit)
        return {_text(m) for m in members}

    async def update(self, unit: str, entered: Iterable[str], left: Iterable[str]) -> None:
        entered, left = list(entered), list(left)
        async with self._client.pipeline(transaction=True) as pipe:
            if entered:
                pipe.sadd(self._prefix + unit, *entered)
            if left:
                pipe.srem(self._prefix + unit, *left)
            await pipe.execute()

    async def forget(self, unit: str) -> None:
        await self._client.delete(self._prefix + unit)


_TAKE_DUE = """
local units = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #units > 0 then redis.call('ZREM', KEYS[1], unpack(units)) end
return units
"""


class RedisSchedule:
    """The flip schedule in a sorted set shared by every worker: taking due units is atomic, so
    each flip is evaluated by one worker."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._client = client
        self._key = prefix + "flips"
        self._take = client.register_script(_TAKE_DUE)
        self.changed = asyncio.Event()

    async def set(self, unit: str, at: datetime | None) -> None:
        if at is None:
            await self._client.zrem(self._key, unit)
        else:
            await self._client.zadd(self._key, {unit: _us(at)})
            self.changed.set()

    async def due(self, now: datetime, limit: int = 500) -> list[str]:
        units = await self._take(keys=[self._key], args=[_us(now), limit])
        return [_text(u) for u in units]

    async def next_due(self) -> datetime | None:
        first: Any = await self._client.zrange(self._key, 0, 0, withscores=True)
        return _EPOCH + timedelta(microseconds=int(first[0][1])) if first else None


# --------------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True, slots=True)
class Change:
    unit: str
    user_id: str | None
    anonymous_id: str | None
    entered: tuple[str, ...]
    left: tuple[str, ...]
    at: datetime

    def message(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "userId": self.user_id,
            "anonymousId": self.anonymous_id,
            "entered": list(self.entered),
            "left": list(self.left),
            "at": self.at.isoformat(),
        }


class Evaluator:
    """Re-evaluates a viewer's segments and announces what changed."""

    JOINS_REMEMBERED = 100_000

    def __init__(
        self,
        *,
        snapshots: SnapshotSource,
        profiles: ProfileSource,
        events: EventStore,
        memberships: Memberships,
        schedule: FlipSchedule,
        bus: Bus,
        clock: Clock,
        prefetch: Callable[[set[str]], Awaitable[None]] | None = None,
    ) -> None:
        """``prefetch(user_ids)``, when given, loads the profiles of a batch's users at once."""
        self._snapshots = snapshots
        self._profiles = profiles
        self._prefetch = prefetch
        self._events = events
        self._memberships = memberships
        self.schedule = schedule
        self._bus = bus
        self._clock = clock
        # (anonymousId, userId) pairs of events already seen carrying both ids. The first such event
        # may have joined the anonymous history to the user's, which can move any of their segments,
        # not only those of its type; later ones cannot. Forgetting a pair costs one full evaluation.
        self._joins: OrderedDict[tuple[str, str], None] = OrderedDict()

    def _first_join(self, anonymous_id: str, user_id: str) -> bool:
        pair = (anonymous_id, user_id)
        if pair in self._joins:
            self._joins.move_to_end(pair)
            return False
        self._joins[pair] = None
        if len(self._joins) > self.JOINS_REMEMBERED:
            self._joins.popitem(last=False)
        return True

    async def on_events(self, events: Sequence[Tracked]) -> list[Change]:
        """Re-evaluate, for each viewer in ``events``, the segments their event types can change."""
        types_of: dict[tuple[str | None, str | None], set[str]] = {}
        joined: set[str] = set()  # users whose every segment may have moved
        for event in events:
            types_of.setdefault((event.user_id, event.anonymous_id if not event.user_id else None), set()).add(
                event.type
            )
            if event.user_id and event.anonymous_id:  # it joined the ids: drop what the anonymous id held
                types_of.setdefault((None, event.anonymous_id), set())
                if self._first_join(event.anonymous_id, event.user_id):
                    joined.add(event.user_id)
        by_viewer: dict[tuple[str | None, str | None], set[str]] = {}
        for viewer, types in types_of.items():
            by_viewer.setdefault(await self._owner(*viewer), set()).update(types)
        snapshot = self._snapshots.current
        work: list[tuple[str | None, str | None, set[str] | None]] = []
        for (user_id, anonymous_id), types in by_viewer.items():
            if not types:
                continue
            keys: set[str] | None = None
            if user_id not in joined:
                keys = set()
                for type_ in types:
                    keys.update(snapshot.segments_by_event_type.get(type_, ()))
                if not keys:  # no segment depends on these event types: nothing can have moved
                    continue
            work.append((user_id, anonymous_id, keys))
        if self._prefetch is not None:
            await self._prefetch({user_id for user_id, _, _ in work if user_id})
        limit = asyncio.Semaphore(EVALUATIONS_AT_ONCE)

        async def evaluate(user_id: str | None, anonymous_id: str | None, keys: set[str] | None) -> Change | None:
            async with limit:
                return await self.evaluate(user_id, anonymous_id, keys)

        # Viewers are independent: their Redis round trips overlap.
        results = await asyncio.gather(*(evaluate(*item) for item in work))
        return [change for change in results if change is not None]

    async def _owner(self, user_id: str | None, anonymous_id: str | None) -> tuple[str | None, str | None]:
        """The viewer whose state an event or a flip concerns: an anonymous id joined to a user is that
        user (the store files its events under the user). Memberships and a flip still kept under the
        anonymous id are dropped, or they would be announced again under it."""
        if user_id or not anonymous_id:
            return user_id, anonymous_id
        linked = await self._events.user_of(anonymous_id)
        if linked is None:
            return None, anonymous_id
        await self._memberships.forget(unit_of(None, anonymous_id))
        await self.schedule.set(unit_of(None, anonymous_id), None)
        return linked, None

    async def on_identity(self, user_id: str | None, anonymous_id: str | None) -> None:
        """A viewer's traits or identity changed: every segment may have moved."""
        if anonymous_id and user_id:
            await self._memberships.forget(unit_of(None, anonymous_id))  # its history is the user's now
            await self.schedule.set(unit_of(None, anonymous_id), None)
        await self.evaluate(user_id, anonymous_id if not user_id else None, None)

    async def on_forget(self, user_id: str | None, anonymous_id: str | None) -> None:
        for unit in [unit_of(user_id, None)] * bool(user_id) + [unit_of(None, anonymous_id)] * bool(anonymous_id):
            await self._memberships.forget(unit)
            await self.schedule.set(unit, None)

    async def evaluate(
        self, user_id: str | None, anonymous_id: str | None, keys: Iterable[str] | None
    ) -> Change | None:
        """Evaluate ``keys`` (None: every segment) for the viewer now, announce the difference from
        what was last announced, and schedule the viewer's next time-driven flip."""
        snapshot = self._snapshots.current
        now = self._clock()
        unit = unit_of(user_id, anonymous_id)
        viewer = make_viewer(at=now, user_id=user_id, anonymous_id=anonymous_id)
        traits: Mapping[str, Any] | None = None
        consent = True
        if user_id:
            profile = await self._profiles.get(user_id, wait=True)  # no budget here: judge with the traits
            if profile is not None:
                traits, consent = profile.traits, profile.consent
        history = await self._events.history(user_id=user_id, anonymous_id=anonymous_id, now=now)
        evaluation = Evaluation(snapshot, viewer, traits=traits, history=history, consent=consent)
        wanted = list(snapshot.segment_order) if keys is None else [k for k in snapshot.segment_order if k in keys]
        members = {k for k in wanted if evaluation.segment(k)}
        previous = await self._memberships.get(unit)
        known = previous if keys is None else previous & set(wanted)
        if keys is None:
            known |= previous - set(snapshot.segments)  # segments deleted since: left
        entered = tuple(k for k in wanted if k in members and k not in previous)
        left = tuple(sorted(known - members))
        await self.schedule.set(unit, evaluation.next_change())
        if not entered and not left:
            return None
        await self._memberships.update(unit, entered, left)
        change = Change(unit, user_id, anonymous_id, entered, left, now)
        await self._bus.publish(SEGMENTS_CHANNEL, change.message())
        return change

    async def run_due(self) -> list[Change]:
        """Evaluate every viewer whose next flip is due now."""
        changes = []
        keys = self._snapshots.current.timed_segments
        while units := await self.schedule.due(self._clock()):
            for unit in units:
                user_id, anonymous_id = await self._owner(*ids_of_unit(unit))
                change = await self.evaluate(user_id, anonymous_id, keys)
                if change is not None:
                    changes.append(change)
        return changes

    async def run_flips(self, *, max_wait: float = 1.0) -> None:
        """Evaluate flips as they fall due (each within ``max_wait`` seconds of its instant)."""
        changed: asyncio.Event = getattr(self.schedule, "changed", asyncio.Event())
        while True:
            try:
                await self.run_due()
                next_due = await self.schedule.next_due()
            except Exception:
                log.warning("time-driven flips failed; retrying", exc_info=True)
                next_due = None
            delay = max_wait
            if next_due is not None:
                delay = min(max_wait, max(0.0, (next_due - self._clock()).total_seconds()))
            changed.clear()
            # asyncio.timeout, not wait_for: wait_for(..., 0) can turn a cancellation into a timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await changed.wait()


# --------------------------------------------------------------------------------------------------
# Consuming the Redis stream


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class StreamWorker:
    """One consumer of the event stream in the ``evaluators`` group. Several share the work; the
    pending events of a crashed one are claimed by another after ``claim_idle_ms``. An event is
    acknowledged only after it is in the database and evaluated: nothing is lost."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        *,
        evaluator: Evaluator,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        consumer: str | None = None,
        claim_idle_ms: int = 30_000,
        batch: int = 500,
    ) -> None:
        self._client = client
        self.stream = prefix + "events"
        self._seen = prefix + "seen:"
        self._evaluator = evaluator
        self._sessions = sessions
        self._clock = clock
        self.consumer = consumer or consumer_name()
        self._claim_idle_ms = claim_idle_ms
        self._batch = batch

    async def ensure_group(self) -> None:
        try:
            await self._client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim(self) -> int:
        """Take over events another consumer read but did not acknowledge in time, and process them."""
        reply: Any = await self._client.xautoclaim(
            self.stream, GROUP, self.consumer, min_idle_time=self._claim_idle_ms, start_id="0-0", count=self._batch
        )
        return await self._process(reply[1])

    async def step(self, block_ms: int = 1000) -> int:
        """Read new events (waiting up to ``block_ms``) and process them; returns how many."""
        reply: Any = await self._client.xreadgroup(
            GROUP, self.consumer, {self.stream: ">"}, count=self._batch, block=block_ms
        )
        processed = 0
        for _, entries in reply or ():
            processed += await self._process(entries)
        return processed

    async def _process(self, entries: Sequence[tuple[Any, Mapping[Any, Any]]]) -> int:
        if not entries:
            return 0
        events = await self._not_deleted([Tracked.from_json(fields[b"e"]) for _, fields in entries])
        if events:
            # The database is the system of record: events and identities go there before the ack.
            async with self._sessions() as session, session.begin():
                await EventRepository(session, clock=self._clock).insert_many([e.document() for e in events])
                identities = IdentityRepository(session, clock=self._clock)
                for event in events:
                    if event.user_id and event.anonymous_id:
                        await identities.link(event.anonymous_id, event.user_id)
            await self._evaluator.on_events(events)
        await self._client.xack(self.stream, GROUP, *(entry_id for entry_id, _ in entries))
        return len(entries)

    async def _not_deleted(self, events: list[Tracked]) -> list[Tracked]:
        """Leave out the events whose viewer was deleted while they waited in the stream: deletion
        removes their "seen" marks (server/events.py), and storing them now would bring them back."""
        async with self._client.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.exists(self._seen + event.id)
            marks = await pipe.execute()
        return [event for event, mark in zip(events, marks, strict=True) if mark]

    async def trim(self) -> int:
        """Drop stream entries every consumer has acknowledged (they are in the database now): the
        stream is a buffer, not an archive. Keeps everything from the oldest pending entry on."""
        groups: Any = await self._client.xinfo_groups(self.stream)
        group = next((g for g in groups if _text(g["name"]) == GROUP), None)
        if group is None:
            return 0
        keep_from = _text(group["last-delivered-id"])
        if int(group["pending"]) > 0:
            pending: Any = await self._client.xpending(self.stream, GROUP)
            keep_from = _text(pending["min"])
        if keep_from in ("0-0", "0"):
            return 0
        # MINID keeps entries with an id >= keep_from; the last delivered entry is kept (harmless).
        return int(await self._client.xtrim(self.stream, minid=keep_from, approximate=False))

    async def run(self, *, trim_every: int = 100) -> None:
        await self.ensure_group()
        rounds = 0
        while True:
            try:
                await self.claim()
                await self.step()
                rounds += 1
                if rounds % trim_every == 0:
                    await self.trim()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis or the database is away: the events stay pending, try again
                log.warning("event processing failed; the events stay pending", exc_info=True)
                await asyncio.sleep(1.0)

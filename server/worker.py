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

from content.behaviour import History
from content.decide import Evaluation
from content.viewer import make_viewer
from schema.ports import Bus, ProfileSource, SnapshotSource
from server.events import EventStore, Tracked, ids_of_unit, unit_of
from server.settings import Clock
from server.store import EventRepository, IdentityRepository

log = logging.getLogger(__name__)

SEGMENTS_CHANNEL = "segments"
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
    announces: bool  # swap publishes the changes itself, atomically with them (else the caller does)

    async def swap(
        self, updates: Sequence[tuple[str, Sequence[str] | None, Sequence[str]]], *, at: datetime
    ) -> list[Swapped]:
        """For each (unit, scope, members): make ``members`` the unit's membership within ``scope``
        (None: every segment, so that any other is left) and return what entered and what left,
        each unit atomically (two workers evaluating one viewer never announce one change twice)."""
        ...

    async def get(self, unit: str) -> set[str]: ...

    async def forget(self, units: Iterable[str]) -> None: ...


class FlipSchedule(Protocol):
    async def set(self, instants: Mapping[str, datetime | None]) -> None:
        """Schedule each unit's next flip at its instant (None: it has none)."""
        ...

    async def due(self, now: datetime, limit: int = 500) -> list[str]:
        """Take (remove and return) the units whose flip instant is at or before ``now``."""
        ...

    async def next_due(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class Swapped:
    entered: frozenset[str]
    left: frozenset[str]


class LocalMemberships:
    announces = False

    def __init__(self) -> None:
        self._members: dict[str, set[str]] = {}

    async def swap(
        self, updates: Sequence[tuple[str, Sequence[str] | None, Sequence[str]]], *, at: datetime
    ) -> list[Swapped]:
        out = []
        for unit, scope, members in updates:
            current = self._members.get(unit, set())
            now_in = set(members)
            left = current - now_in if scope is None else (current & set(scope)) - now_in
            out.append(Swapped(frozenset(now_in - current), frozenset(left)))
            updated = (current - left) | now_in
            if updated:
                self._members[unit] = updated
            else:
                self._members.pop(unit, None)
        return out

    async def get(self, unit: str) -> set[str]:
        return set(self._members.get(unit, ()))

    async def forget(self, units: Iterable[str]) -> None:
        for unit in units:
            self._members.pop(unit, None)


class LocalSchedule:
    """A heap of (instant, unit); a unit's latest instant wins (older entries are skipped)."""

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, str]] = []
        self._at: dict[str, datetime] = {}
        self.changed = asyncio.Event()

    async def set(self, instants: Mapping[str, datetime | None]) -> None:
        for unit, at in instants.items():
            if at is None:
                self._at.pop(unit, None)
            else:
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


# ARGV: prefix, the bus channel to announce on ('' for none), the instant of the evaluation, then per
# unit: the unit, the number of scope keys (-1: every segment), the scope keys, the number of members,
# the members. Returns per unit {entered, left}; publishes each change (Change.message's JSON) in the
# same atomic step, so that a change is never recorded without being announced, nor announced twice.
_SWAP = """
local p, channel, at = ARGV[1], ARGV[2], ARGV[3]
local out = {}
local i = 4
local function chunked(command, key, list)
  for j = 1, #list, 500 do redis.call(command, key, unpack(list, j, math.min(j + 499, #list))) end
end
local function strings(list)
  local encoded = {}
  for j = 1, #list do encoded[j] = cjson.encode(list[j]) end
  return '[' .. table.concat(encoded, ',') .. ']'
end
while i <= #ARGV do
  local unit = ARGV[i]
  local key = p .. 'mem:' .. unit
  local nscope = tonumber(ARGV[i + 1])
  i = i + 2
  local scope = {}
  if nscope > 0 then
    for j = i, i + nscope - 1 do scope[ARGV[j]] = true end
    i = i + nscope
  end
  local nmembers = tonumber(ARGV[i])
  i = i + 1
  local members = {}
  for j = i, i + nmembers - 1 do members[ARGV[j]] = true end
  local have = {}
  local entered, left = {}, {}
  for _, m in ipairs(redis.call('SMEMBERS', key)) do
    have[m] = true
    if not members[m] and (nscope < 0 or scope[m]) then left[#left + 1] = m end
  end
  for j = i, i + nmembers - 1 do
    if not have[ARGV[j]] then entered[#entered + 1] = ARGV[j] end
  end
  i = i + nmembers
  table.sort(left)
  if #entered > 0 then chunked('SADD', key, entered) end
  if #left > 0 then chunked('SREM', key, left) end
  if channel ~= '' and (#entered > 0 or #left > 0) then
    local id = cjson.encode(string.sub(unit, 3))
    local user, anon = 'null', 'null'
    if string.sub(unit, 1, 2) == 'u:' then user = id else anon = id end
    redis.call('PUBLISH', channel, '{"unit":' .. cjson.encode(unit) .. ',"userId":' .. user
      .. ',"anonymousId":' .. anon .. ',"entered":' .. strings(entered) .. ',"left":' .. strings(left)
      .. ',"at":' .. cjson.encode(at) .. '}')
  end
  out[#out + 1] = {entered, left}
end
return out
"""


class RedisMemberships:
    """Memberships in Redis sets. Given the bus channel key to announce on (``announce_to``), a swap
    publishes its changes in the same script: nothing can fail between recording and announcing."""

    BATCH = 200  # units per script call

    def __init__(self, client: aioredis.Redis, prefix: str, *, announce_to: str | None = None) -> None:
        self._client = client
        self._prefix = prefix + "mem:"
        self._swap = client.register_script(_SWAP)
        self._root = prefix
        self._channel = announce_to or ""
        self.announces = announce_to is not None

    async def swap(
        self, updates: Sequence[tuple[str, Sequence[str] | None, Sequence[str]]], *, at: datetime
    ) -> list[Swapped]:
        out: list[Swapped] = []
        for start in range(0, len(updates), self.BATCH):
            args: list[Any] = [self._root, self._channel, at.isoformat()]
            for unit, scope, members in updates[start : start + self.BATCH]:
                args += [unit, -1] if scope is None else [unit, len(scope), *scope]
                args += [len(members), *members]
            for entered, left in await self._swap(args=args):
                out.append(Swapped(frozenset(map(_text, entered)), frozenset(map(_text, left))))
        return out

    async def get(self, unit: str) -> set[str]:
        members = await self._client.smembers(self._prefix + unit)
        return {_text(m) for m in members}

    async def forget(self, units: Iterable[str]) -> None:
        keys = [self._prefix + unit for unit in units]
        if keys:
            await self._client.delete(*keys)


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

    async def set(self, instants: Mapping[str, datetime | None]) -> None:
        scheduled = {unit: _us(at) for unit, at in instants.items() if at is not None}
        unscheduled = [unit for unit, at in instants.items() if at is None]
        async with self._client.pipeline(transaction=False) as pipe:
            if scheduled:
                pipe.zadd(self._key, scheduled)
            if unscheduled:
                pipe.zrem(self._key, *unscheduled)
            await pipe.execute()
        if scheduled:
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

    def _known_join(self, anonymous_id: str, user_id: str) -> bool:
        pair = (anonymous_id, user_id)
        if pair in self._joins:
            self._joins.move_to_end(pair)
            return True
        return False

    def _remember_joins(self, pairs: Iterable[tuple[str, str]]) -> None:
        for pair in pairs:
            self._joins[pair] = None
            if len(self._joins) > self.JOINS_REMEMBERED:
                self._joins.popitem(last=False)

    async def on_events(self, events: Sequence[Tracked]) -> list[Change]:
        """Re-evaluate, for each viewer in ``events``, the segments their event types can change."""
        types_of: dict[tuple[str | None, str | None], set[str]] = {}
        joins: dict[tuple[str, str], None] = {}  # first seen here: every segment of the user may have moved
        for event in events:
            types_of.setdefault((event.user_id, event.anonymous_id if not event.user_id else None), set()).add(
                event.type
            )
            if event.user_id and event.anonymous_id and not self._known_join(event.anonymous_id, event.user_id):
                joins[(event.anonymous_id, event.user_id)] = None
        joined = {user_id for _, user_id in joins}
        snapshot = self._snapshots.current
        work: list[tuple[str | None, str | None, frozenset[str] | None]] = []
        for (user_id, anonymous_id), types in types_of.items():
            if user_id in joined:
                work.append((user_id, anonymous_id, None))
                continue
            keys = frozenset(k for type_ in types for k in snapshot.segments_by_event_type.get(type_, ()))
            if keys:  # else no segment depends on these event types: nothing can have moved
                work.append((user_id, anonymous_id, keys))
        # What the joined anonymous ids held is the user's now: drop it, or it would be announced again.
        changes = await self.evaluate_many(work, drop={unit_of(None, anonymous_id) for anonymous_id, _ in joins})
        self._remember_joins(joins)  # only once evaluated: a batch that failed is evaluated whole again
        return changes

    async def on_identity(self, user_id: str | None, anonymous_id: str | None) -> None:
        """A viewer's traits or identity changed: every segment may have moved."""
        drop = {unit_of(None, anonymous_id)} if anonymous_id and user_id else set()  # its history is the user's
        await self.evaluate_many([(user_id, anonymous_id if not user_id else None, None)], drop=drop)

    async def on_forget(self, user_id: str | None, anonymous_id: str | None) -> None:
        units = [unit_of(user_id, None)] * bool(user_id) + [unit_of(None, anonymous_id)] * bool(anonymous_id)
        await self._drop(set(units))

    async def evaluate_many(
        self, work: Sequence[tuple[str | None, str | None, frozenset[str] | None]], *, drop: Iterable[str] = ()
    ) -> list[Change]:
        """Evaluate, for each (userId, anonymousId, keys), ``keys`` (None: every segment) now;
        announce what changed and schedule each viewer's next flip. A batch costs a few round trips
        to the state, not a few per viewer: histories are read at once, memberships swapped at once.

        An anonymous id joined to a user is that user (its events are filed under the user): what
        is still kept under the anonymous id (memberships, a flip) is dropped, or it would be
        announced again under it; so is what the units in ``drop`` hold."""
        if not work:
            await self._drop(set(drop))
            return []
        snapshot = self._snapshots.current
        now = self._clock()
        loaded = await self._events.histories([(u, a) for u, a, _ in work], now=now)
        owners: dict[str, tuple[History, frozenset[str] | None]] = {}
        orphans: set[str] = set(drop)
        for (user_id, anonymous_id, keys), (owner, history) in zip(work, loaded, strict=True):
            if owner != unit_of(user_id, anonymous_id):
                orphans.add(unit_of(user_id, anonymous_id))
            if owner in owners:
                known = owners[owner][1]
                keys = None if keys is None or known is None else keys | known
            owners[owner] = (history, keys)
        orphans -= owners.keys()
        users = {user_id for user_id, _ in map(ids_of_unit, owners) if user_id}
        if self._prefetch is not None and users:
            await self._prefetch(users)
        updates: list[tuple[str, Sequence[str] | None, Sequence[str]]] = []
        flips: dict[str, datetime | None] = dict.fromkeys(orphans)
        for owner, (history, keys) in owners.items():
            user_id, anonymous_id = ids_of_unit(owner)
            traits: Mapping[str, Any] | None = None
            consent = True
            if user_id:
                profile = await self._profiles.get(user_id, wait=True)  # no budget here: judge with the traits
                if profile is not None:
                    traits, consent = profile.traits, profile.consent
            viewer = make_viewer(at=now, user_id=user_id, anonymous_id=anonymous_id)
            evaluation = Evaluation(snapshot, viewer, traits=traits, history=history, consent=consent)
            wanted = snapshot.segment_order if keys is None else [k for k in snapshot.segment_order if k in keys]
            updates.append((owner, None if keys is None else wanted, [k for k in wanted if evaluation.segment(k)]))
            flips[owner] = evaluation.next_change()
        if orphans:
            await self._memberships.forget(orphans)
        await self.schedule.set(flips)  # the orphans' flips are None
        swapped = await self._memberships.swap(updates, at=now)
        rank = {key: i for i, key in enumerate(snapshot.segment_order)}
        changes = [
            Change(
                unit,
                *ids_of_unit(unit),
                tuple(sorted(result.entered, key=lambda k: rank.get(k, len(rank)))),
                tuple(sorted(result.left)),
                now,
            )
            for (unit, _, _), result in zip(updates, swapped, strict=True)
            if result.entered or result.left
        ]
        if changes and not self._memberships.announces:
            await self._bus.publish_many(SEGMENTS_CHANNEL, [change.message() for change in changes])
        return changes

    async def _drop(self, units: set[str]) -> None:
        if units:
            await self._memberships.forget(units)
            await self.schedule.set(dict.fromkeys(units))

    async def run_due(self) -> list[Change]:
        """Evaluate every viewer whose next flip is due now."""
        changes = []
        keys = frozenset(self._snapshots.current.timed_segments)
        while units := await self.schedule.due(self._clock()):
            changes += await self.evaluate_many([(*ids_of_unit(unit), keys) for unit in units])
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


# ARGV: the "seen" prefix, then event ids. Returns 1 for each id still marked seen, else 0.
_MARKED = """
local out = {}
for i = 2, #ARGV do out[#out + 1] = redis.call('EXISTS', ARGV[1] .. ARGV[i]) end
return out
"""


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
        self._marked = client.register_script(_MARKED)
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
            # Storing and evaluating are independent (the evaluator reads the state in Redis): overlap.
            async with asyncio.TaskGroup() as group:
                group.create_task(self._store(events))
                group.create_task(self._evaluator.on_events(events))
        await self._client.xack(self.stream, GROUP, *(entry_id for entry_id, _ in entries))
        return len(entries)

    async def _store(self, events: Sequence[Tracked]) -> None:
        async with self._sessions() as session, session.begin():
            await EventRepository(session, clock=self._clock).insert_many([e.document() for e in events])
            identities = IdentityRepository(session, clock=self._clock)
            for event in events:
                if event.user_id and event.anonymous_id:
                    await identities.link(event.anonymous_id, event.user_id)

    async def _not_deleted(self, events: list[Tracked]) -> list[Tracked]:
        """Leave out the events whose viewer was deleted while they waited in the stream: deletion
        removes their "seen" marks (server/events.py), and storing them now would bring them back."""
        marks = await self._marked(args=[self._seen, *(event.id for event in events)])
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

"""Events: checked at the edge, appended durably before the call returns (a Redis stream, or the
database in the embedded mode), applied to the viewer's behavioural state at once (so that the next
query reads its own writes), and read back as a :class:`~content.behaviour.History` on the
delivery path. Identity (identify, alias) joins an anonymous history to a user's.

Redis layout, under the configured prefix::

    seen:<id>          an event id already accepted (expires with retention): duplicates are dropped
    ev:<unit>          hash, event id -> event JSON             (unit: u:<userId> or a:<anonymousId>)
    evt:<unit>         sorted set, event id -> time (ms)
    alias:<anonId>     the userId an anonymous id was joined to
    events             the stream the evaluator consumes (field e: event JSON, unit: its unit)
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from content.behaviour import EMPTY_HISTORY, Event, EventLog, History
from content.errors import Problem
from content.rules import describe, parse_instant
from server.settings import Clock, Limits
from server.store import EventRepository, IdentityRepository

log = logging.getLogger(__name__)

MAX_ID = 256
MAX_TYPE = 128


@dataclass(frozen=True, slots=True)
class Tracked:
    """An accepted event, normalised: it has an id and an instant."""

    id: str
    type: str
    at: datetime
    user_id: str | None = None
    anonymous_id: str | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return unit_of(self.user_id, self.anonymous_id)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"id": self.id, "type": self.type, "at": _ms(self.at), "p": self.properties}
        if self.user_id:
            doc["u"] = self.user_id
        if self.anonymous_id:
            doc["a"] = self.anonymous_id
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Tracked:
        doc = orjson.loads(raw)
        return cls(
            id=doc["id"],
            type=doc["type"],
            at=datetime.fromtimestamp(doc["at"] / 1000, UTC),
            user_id=doc.get("u"),
            anonymous_id=doc.get("a"),
            properties=doc.get("p") or {},
        )

    def event(self) -> Event:
        return Event(id=self.id, type=self.type, at=self.at, properties=self.properties)

    def document(self) -> dict[str, Any]:
        """The row the event store's repository writes."""
        return {
            "id": self.id,
            "type": self.type,
            "userId": self.user_id,
            "anonymousId": self.anonymous_id,
            "at": self.at,
            "properties": dict(self.properties),
        }


def unit_of(user_id: str | None, anonymous_id: str | None) -> str:
    """The key of a viewer's behavioural state: their user id, else their anonymous id."""
    return f"u:{user_id}" if user_id else f"a:{anonymous_id}"


def ids_of_unit(unit: str) -> tuple[str | None, str | None]:
    """(userId, anonymousId) of a unit key."""
    kind, _, value = unit.partition(":")
    return (value, None) if kind == "u" else (None, value)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------------------------
# Checking events at the edge


def check_tracked(
    raw: object,
    path: str,
    *,
    now: datetime,
    limits: Limits,
    require_id_and_time: bool = False,
    measured: bool = False,
) -> Tracked | list[Problem]:
    """A tracked event from its JSON form (``id``, ``type``, ``userId``, ``anonymousId``, ``at``,
    ``properties``), or every problem with it. Missing ids and times are filled in. ``measured``:
    the caller has held the event to the size limit already (the tracking API measures messages)."""
    if not isinstance(raw, Mapping):
        return [Problem(path, f"an event must be a JSON object, not {describe(raw)}")]
    problems: list[Problem] = []
    if not measured:
        size = len(orjson.dumps(raw, default=str))
        if size > limits.max_event_bytes:
            problems.append(Problem(path, f"is {size} bytes; an event may have at most {limits.max_event_bytes}"))
    allowed = ("id", "type", "userId", "anonymousId", "at", "properties")
    problems.extend(Problem(f"{path}.{k}", f"unexpected key '{k}'") for k in raw if k not in allowed)
    type_ = raw.get("type")
    if not isinstance(type_, str) or not type_:
        problems.append(Problem(f"{path}.type", "an event needs a non-empty type"))
    elif len(type_) > MAX_TYPE:
        problems.append(Problem(f"{path}.type", f"is longer than {MAX_TYPE} characters"))
    ids: dict[str, str | None] = {}
    for key in ("id", "userId", "anonymousId"):
        value = raw.get(key)
        if value is None or value == "":
            ids[key] = None
        elif not isinstance(value, str | int) or isinstance(value, bool):
            problems.append(Problem(f"{path}.{key}", f"must be a string, not {describe(value)}"))
        elif len(str(value)) > MAX_ID:
            problems.append(Problem(f"{path}.{key}", f"is longer than {MAX_ID} characters"))
        else:
            ids[key] = str(value)
    if not ids.get("userId") and not ids.get("anonymousId") and not any(p.path.endswith("Id") for p in problems):
        problems.append(Problem(f"{path}.userId", "an event needs a userId or an anonymousId"))
    if require_id_and_time and not ids.get("id") and not any(p.path == f"{path}.id" for p in problems):
        problems.append(Problem(f"{path}.id", "an event needs a non-empty id"))
    at: datetime | None = now
    raw_at = raw.get("at")
    if raw_at is None:
        if require_id_and_time:
            problems.append(Problem(f"{path}.at", "an event needs 'at' (an ISO 8601 date-time)"))
    else:
        if isinstance(raw_at, datetime):  # a date-time without an offset is UTC, not the host's local time
            at = raw_at.replace(tzinfo=UTC) if raw_at.tzinfo is None else raw_at.astimezone(UTC)
        else:
            at = parse_instant(raw_at)
        if at is None:
            problems.append(Problem(f"{path}.at", f"must be an ISO 8601 date-time, not {raw_at!r}"))
        elif at > now + limits.max_future:
            ahead = f"is more than {limits.max_future} ahead of the server clock"
            problems.append(Problem(f"{path}.at", f"{raw_at} {ahead}"))
        elif at <= now - limits.retention:
            older = f"is older than the retention period ({limits.retention.days} days)"
            problems.append(Problem(f"{path}.at", f"{raw_at} {older}"))
    properties = raw.get("properties")
    if properties is not None and not isinstance(properties, Mapping):
        problems.append(Problem(f"{path}.properties", f"must be a JSON object, not {describe(properties)}"))
    if problems:
        return problems
    assert isinstance(type_, str)
    assert at is not None
    return Tracked(
        id=ids.get("id") or f"tess-{uuid.uuid4()}",
        type=type_,
        at=at,
        user_id=ids.get("userId"),
        anonymous_id=ids.get("anonymousId"),
        properties=dict(properties or {}),
    )


# --------------------------------------------------------------------------------------------------
# Where events live


class EventStore(Protocol):
    async def append(self, events: Sequence[Tracked]) -> list[Tracked]:
        """Store events durably and apply them to the state; returns the new ones (not duplicates)."""
        ...

    async def history(self, *, user_id: str | None, anonymous_id: str | None, now: datetime) -> History: ...

    async def histories(
        self, viewers: Sequence[tuple[str | None, str | None]], *, now: datetime
    ) -> list[tuple[str, History]]:
        """For each (userId, anonymousId), the unit that owns its events (an anonymous id joined to a
        user is that user) and its history, at once (the evaluator reads a whole batch this way)."""
        ...

    async def link(self, anonymous_id: str, user_id: str) -> bool:
        """Join an anonymous history to a user's; False when it was joined already."""
        ...

    async def users_of(self, anonymous_ids: Collection[str]) -> dict[str, str]:
        """The user id each anonymous id was joined to (its events are that user's): the joined ones."""
        ...

    async def forget(self, *, user_id: str | None, anonymous_id: str | None) -> int:
        """Remove a viewer's behavioural state (not the database rows); returns events removed."""
        ...


def _history(raw_events: Sequence[bytes | str | None]) -> History:
    events = []
    for raw in raw_events:
        if raw is not None:
            doc = orjson.loads(raw)
            at = datetime.fromtimestamp(doc["at"] / 1000, UTC)
            events.append(Event(id=doc["id"], type=doc["type"], at=at, properties=doc.get("p") or {}))
    return EventLog(events) if events else EMPTY_HISTORY


# Appends, deduplicated by id, atomically: the stream entry, the per-viewer state and the "seen" mark
# are written together or not at all. ARGV: prefix, retention ms, now ms, then each event's JSON
# (Tracked.to_json: its id, u, a and at are read here). An event with both ids joins the anonymous
# history to the user's.
_APPEND = """
local p, ret, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local function merge(aid, uid)
  local from, to = 'a:' .. aid, 'u:' .. uid
  if redis.call('SET', p .. 'alias:' .. aid, uid, 'NX', 'PX', ret) == false then
    redis.call('PEXPIRE', p .. 'alias:' .. aid, ret)
    return
  end
  local entries = redis.call('HGETALL', p .. 'ev:' .. from)
  for i = 1, #entries, 2 do redis.call('HSETNX', p .. 'ev:' .. to, entries[i], entries[i + 1]) end
  local times = redis.call('ZRANGE', p .. 'evt:' .. from, 0, -1, 'WITHSCORES')
  for i = 1, #times, 2 do redis.call('ZADD', p .. 'evt:' .. to, times[i + 1], times[i]) end
  redis.call('DEL', p .. 'ev:' .. from, p .. 'evt:' .. from)
  redis.call('PEXPIRE', p .. 'ev:' .. to, ret)
  redis.call('PEXPIRE', p .. 'evt:' .. to, ret)
end
local new = {}
for i = 4, #ARGV do
  local json = ARGV[i]
  local doc = cjson.decode(json)
  local id, uid, aid, at = doc['id'], doc['u'] or '', doc['a'] or '', string.format('%.0f', doc['at'])
  if redis.call('SET', p .. 'seen:' .. id, '1', 'NX', 'PX', ret) then
    local unit
    if uid ~= '' then
      unit = 'u:' .. uid
      if aid ~= '' then merge(aid, uid) end
    else
      local linked = redis.call('GET', p .. 'alias:' .. aid)
      if linked then
        unit = 'u:' .. linked
        redis.call('PEXPIRE', p .. 'alias:' .. aid, ret)  -- a join lasts while the device is in use
      else unit = 'a:' .. aid end
    end
    local ev, evt = p .. 'ev:' .. unit, p .. 'evt:' .. unit
    redis.call('HSET', ev, id, json)
    redis.call('ZADD', evt, at, id)
    redis.call('XADD', p .. 'events', '*', 'e', json, 'unit', unit)
    new[#new + 1] = id
    -- Trim what left retention, after the event is safe in the stream, in chunks (unpack has a limit).
    local old = redis.call('ZRANGEBYSCORE', evt, '-inf', now - ret)
    for i = 1, #old, 500 do
      redis.call('HDEL', ev, unpack(old, i, math.min(i + 499, #old)))
    end
    if #old > 0 then redis.call('ZREMRANGEBYSCORE', evt, '-inf', now - ret) end
    redis.call('PEXPIRE', ev, ret)
    redis.call('PEXPIRE', evt, ret)
  end
end
return new
"""

# ARGV: prefix, cutoff ms (exclusive), then a userId and an anonymousId per viewer. Returns, per
# viewer, {the unit owning its events, {their JSONs}}.
_HISTORIES = """
local p, cutoff = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 2 do
  local uid, aid = ARGV[i], ARGV[i + 1]
  local unit
  if uid ~= '' then unit = 'u:' .. uid
  else
    local linked = redis.call('GET', p .. 'alias:' .. aid)
    if linked then unit = 'u:' .. linked else unit = 'a:' .. aid end
  end
  local ids = redis.call('ZRANGEBYSCORE', p .. 'evt:' .. unit, '(' .. cutoff, '+inf')
  local events = {}
  for j = 1, #ids, 500 do
    local chunk = redis.call('HMGET', p .. 'ev:' .. unit, unpack(ids, j, math.min(j + 499, #ids)))
    for k = 1, #chunk do events[#events + 1] = chunk[k] end
  end
  out[#out + 1] = {unit, events}
end
return out
"""

# ARGV: prefix, anonymousId, userId, retention ms. Joins (idempotently); returns 1 when newly joined.
# The join, like the histories, expires a retention period after it was last used.
_LINK = """
local p, aid, uid, ret = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('SET', p .. 'alias:' .. aid, uid, 'NX', 'PX', ret) == false then
  redis.call('PEXPIRE', p .. 'alias:' .. aid, ret)
  return 0
end
local from, to = 'a:' .. aid, 'u:' .. uid
local entries = redis.call('HGETALL', p .. 'ev:' .. from)
for i = 1, #entries, 2 do redis.call('HSETNX', p .. 'ev:' .. to, entries[i], entries[i + 1]) end
local times = redis.call('ZRANGE', p .. 'evt:' .. from, 0, -1, 'WITHSCORES')
for i = 1, #times, 2 do redis.call('ZADD', p .. 'evt:' .. to, times[i + 1], times[i]) end
redis.call('DEL', p .. 'ev:' .. from, p .. 'evt:' .. from)
if #times > 0 then
  redis.call('PEXPIRE', p .. 'ev:' .. to, ret)
  redis.call('PEXPIRE', p .. 'evt:' .. to, ret)
end
return 1
"""


class RedisEventStore:
    """Events in Redis: a stream for the evaluator, per-viewer state for the delivery path."""

    APPEND_BATCH = 500

    def __init__(self, client: aioredis.Redis, prefix: str, *, retention: timedelta, clock: Clock) -> None:
        self._client = client
        self._prefix = prefix
        self._retention_ms = int(retention.total_seconds() * 1000)
        self._clock = clock
        self._append = client.register_script(_APPEND)
        self._read = client.register_script(_HISTORIES)
        self._link = client.register_script(_LINK)

    @property
    def stream(self) -> str:
        return self._prefix + "events"

    async def append(self, events: Sequence[Tracked]) -> list[Tracked]:
        new: list[Tracked] = []
        now_ms = _ms(self._clock())
        for start in range(0, len(events), self.APPEND_BATCH):
            batch = events[start : start + self.APPEND_BATCH]
            args: list[Any] = [self._prefix, self._retention_ms, now_ms]
            args.extend(event.to_json() for event in batch)
            accepted = {_text(i) for i in await self._append(args=args)}
            new.extend(e for e in batch if e.id in accepted)
        return new

    async def history(self, *, user_id: str | None, anonymous_id: str | None, now: datetime) -> History:
        if not user_id and not anonymous_id:
            return EMPTY_HISTORY
        return (await self.histories([(user_id, anonymous_id)], now=now))[0][1]

    async def histories(
        self, viewers: Sequence[tuple[str | None, str | None]], *, now: datetime
    ) -> list[tuple[str, History]]:
        out: list[tuple[str, History]] = []
        cutoff = _ms(now) - self._retention_ms
        for start in range(0, len(viewers), self.APPEND_BATCH):
            args: list[Any] = [self._prefix, cutoff]
            for user_id, anonymous_id in viewers[start : start + self.APPEND_BATCH]:
                args += [user_id or "", anonymous_id or ""]
            out.extend((_text(unit), _history(raw)) for unit, raw in await self._read(args=args))
        return out

    async def link(self, anonymous_id: str, user_id: str) -> bool:
        return bool(await self._link(args=[self._prefix, anonymous_id, user_id, self._retention_ms]))

    async def users_of(self, anonymous_ids: Collection[str]) -> dict[str, str]:
        ids = list(anonymous_ids)
        if not ids:
            return {}
        linked = await self._client.mget([self._prefix + "alias:" + i for i in ids])
        return {i: _text(user) for i, user in zip(ids, linked, strict=True) if user is not None}

    async def forget(self, *, user_id: str | None, anonymous_id: str | None) -> int:
        units = []
        if user_id:
            units.append(unit_of(user_id, None))
        if anonymous_id:
            units.append(unit_of(None, anonymous_id))
        removed = 0
        for unit in units:
            ids = await self._client.zrange(self._prefix + "evt:" + unit, 0, -1)
            removed += len(ids)
            if ids:
                await self._client.delete(*(self._prefix + "seen:" + _text(i) for i in ids))
            await self._client.delete(self._prefix + "ev:" + unit, self._prefix + "evt:" + unit)
        if anonymous_id:
            await self._client.delete(self._prefix + "alias:" + anonymous_id)
        return removed


class LocalEventStore:
    """The embedded mode: events in the database, behavioural state in this process. Events written
    by another process (``tessera import --events``) are picked up by :meth:`follow`."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        retention: timedelta,
        clock: Clock,
        keep_state: bool = True,
    ) -> None:
        """``keep_state=False`` only writes to the database (the CLI: the server keeps the state)."""
        self._sessions = sessions
        self._keep_state = keep_state
        self._retention = retention
        self._clock = clock
        self._events: dict[str, dict[str, Tracked]] = {}  # unit -> id -> event
        self._logs: dict[str, EventLog] = {}  # unit -> history (rebuilt when the unit changes)
        self._aliases: dict[str, str] = {}  # anonymous id -> user id
        self._seen: set[str] = set()
        self._watermark: datetime | None = None
        self.appended: list[Callable[[list[Tracked]], Awaitable[object]]] = []  # listeners (the evaluator)

    async def load(self) -> None:
        """Rebuild the state from the database (at start)."""
        now = self._clock()
        async with self._sessions() as session:
            rows = await EventRepository(session).since(now - self._retention)
            links = await IdentityRepository(session).all()
        for anonymous_id, user_id in links:
            self._aliases[anonymous_id] = user_id
        applied = self._apply([_from_row(row) for row in rows])
        self._watermark = now
        # The evaluator's memberships and flip schedule live in this process too: without this, the
        # flips that were pending when the server stopped (a cart about to be abandoned) never come.
        await self._notify(applied)

    def _unit(self, event: Tracked) -> str:
        if event.user_id:
            return unit_of(event.user_id, None)
        linked = self._aliases.get(event.anonymous_id or "")
        return unit_of(linked, None) if linked else unit_of(None, event.anonymous_id)

    def _apply(self, events: Sequence[Tracked]) -> list[Tracked]:
        if not self._keep_state:
            return list(events)
        applied = []
        for event in events:
            if event.id in self._seen:
                continue
            self._seen.add(event.id)
            if event.user_id and event.anonymous_id and event.anonymous_id not in self._aliases:
                self._merge(event.anonymous_id, event.user_id)
            unit = self._unit(event)
            self._events.setdefault(unit, {})[event.id] = event
            self._logs.pop(unit, None)
            applied.append(event)
        return applied

    def _merge(self, anonymous_id: str, user_id: str) -> None:
        self._aliases[anonymous_id] = user_id
        moved = self._events.pop(unit_of(None, anonymous_id), {})
        self._logs.pop(unit_of(None, anonymous_id), None)
        target = self._events.setdefault(unit_of(user_id, None), {})
        for event_id, event in moved.items():
            target.setdefault(event_id, event)
        self._logs.pop(unit_of(user_id, None), None)

    async def append(self, events: Sequence[Tracked]) -> list[Tracked]:
        async with self._sessions() as session, session.begin():
            new_ids = set(await EventRepository(session, clock=self._clock).insert_new([e.document() for e in events]))
            for event in events:
                if event.id in new_ids and event.user_id and event.anonymous_id:
                    await IdentityRepository(session, clock=self._clock).link(event.anonymous_id, event.user_id)
        first: dict[str, Tracked] = {}  # of events sharing an id, the first one received is kept
        for event in events:
            if event.id in new_ids:
                first.setdefault(event.id, event)
        new = self._apply(list(first.values()))
        await self._notify(new)
        return new

    async def _notify(self, events: list[Tracked]) -> None:
        if events:
            for listener in self.appended:
                await listener(events)

    async def history(self, *, user_id: str | None, anonymous_id: str | None, now: datetime) -> History:
        if not user_id and not anonymous_id:
            return EMPTY_HISTORY
        unit = self._unit(Tracked(id="", type="", at=now, user_id=user_id, anonymous_id=anonymous_id))
        log_ = self._logs.get(unit)
        if log_ is None:
            events = self._events.get(unit)
            if not events:
                return EMPTY_HISTORY
            # Trimmed as it goes, by the server's clock: ``now`` is the viewer's ``at``, which may be far
            # ahead (an email rendered for a later send time) and must not delete events for good.
            cutoff = self._clock() - self._retention
            for event_id in [i for i, e in events.items() if e.at <= cutoff]:
                del events[event_id]
            log_ = EventLog(e.event() for e in events.values())
            self._logs[unit] = log_
        return log_

    async def histories(
        self, viewers: Sequence[tuple[str | None, str | None]], *, now: datetime
    ) -> list[tuple[str, History]]:
        out = []
        for user_id, anonymous_id in viewers:
            unit = self._unit(Tracked(id="", type="", at=now, user_id=user_id, anonymous_id=anonymous_id))
            out.append((unit, await self.history(user_id=user_id, anonymous_id=anonymous_id, now=now)))
        return out

    async def link(self, anonymous_id: str, user_id: str) -> bool:
        async with self._sessions() as session, session.begin():
            joined = await IdentityRepository(session, clock=self._clock).link(anonymous_id, user_id)
        if anonymous_id not in self._aliases:
            self._merge(anonymous_id, user_id)
        return joined

    async def users_of(self, anonymous_ids: Collection[str]) -> dict[str, str]:
        return {i: self._aliases[i] for i in anonymous_ids if i in self._aliases}

    async def forget(self, *, user_id: str | None, anonymous_id: str | None) -> int:
        removed = 0
        for unit in [unit_of(user_id, None)] * bool(user_id) + [unit_of(None, anonymous_id)] * bool(anonymous_id):
            events = self._events.pop(unit, {})
            removed += len(events)
            self._seen.difference_update(events)  # as in Redis: the same ids sent again are new events
            self._logs.pop(unit, None)
        if anonymous_id:
            self._aliases.pop(anonymous_id, None)
        if user_id:
            for anon in [a for a, u in self._aliases.items() if u == user_id]:
                del self._aliases[anon]
        return removed

    async def follow(self) -> None:
        """Apply events that other processes wrote to the database since the last look."""
        if self._watermark is None:
            return
        # Overlap by a few seconds: rows may commit out of arrival order; ids already seen are skipped.
        since = self._watermark - timedelta(seconds=5)
        async with self._sessions() as session:
            rows = await EventRepository(session).received_since(since)
            links = await IdentityRepository(session).all()
        for anonymous_id, user_id in links:
            if anonymous_id not in self._aliases:
                self._merge(anonymous_id, user_id)
        if rows:
            self._watermark = max(self._watermark, max(row["receivedAt"] for row in rows))
        await self._notify(self._apply([_from_row(row) for row in rows]))

    async def run_follower(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.follow()
            except Exception:
                log.warning("could not read new events from the database", exc_info=True)


def _from_row(row: Mapping[str, Any]) -> Tracked:
    return Tracked(
        id=row["id"],
        type=row["type"],
        at=row["at"],
        user_id=row.get("userId"),
        anonymous_id=row.get("anonymousId"),
        properties=row.get("properties") or {},
    )

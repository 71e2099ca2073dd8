"""The profile store: a viewer's profile from the built-in store or an upstream profile service, behind
an in-process LRU and then Redis, with request coalescing, negative caching, stale-while-revalidate,
a latency budget and a circuit breaker. It never fails a request: when every layer fails it logs and
answers "no profile" (fail open to content).

Exceptions::

    ProfileError            a profile could not be had
     ├── SourceError        the source failed: a 5xx or other unexpected status, a timeout, a
     │                      connection error, a body that does not map to traits
     └── BreakerOpen        the source was not called: its circuit breaker is open

Redis layout, under the configured prefix::

    profile:<userId>    JSON {"traits": {...}, "consent": bool}, or null for "no such profile";
                        it expires after ttl + stale seconds (a missing profile: the negative TTL),
                        so its remaining time tells every instance how old it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import orjson
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from schema.ports import Profile
from server.settings import Settings
from server.store import ProfileRepository

log = logging.getLogger(__name__)

PROFILES_CHANNEL = "profiles"
# A missing profile is remembered briefly: a profile written by another process (a CLI import in the
# embedded mode, which has no bus) shows up within this many seconds.
NEGATIVE_TTL = 5.0
_DELETE_BATCH = 1000
# After Redis fails, the store goes straight to the source for this long rather than pay Redis's
# timeout on every load.
REDIS_BACKOFF = 5.0
# A stale copy whose refresh failed is served without a new attempt for this long: while the source
# is down (or its breaker open) a hot profile does not send every request after it.
REFRESH_RETRY = 1.0


class ProfileError(Exception):
    """A profile could not be had."""


class SourceError(ProfileError):
    """The source failed (not: the profile does not exist)."""


class BreakerOpen(ProfileError):
    """The source was not called: too many consecutive failures."""


# --------------------------------------------------------------------------------------------------
# Sources


class Source(Protocol):
    """Where profiles come from. ``get`` answers None for "no such profile" and raises on failure."""

    async def get(self, user_id: str) -> Profile | None: ...

    async def aclose(self) -> None: ...


class DatabaseSource:
    """The built-in store (PostgreSQL or SQLite): profiles written by imports, identify and the admin API."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def get(self, user_id: str) -> Profile | None:
        async with self._sessions() as session:
            row = await ProfileRepository(session).get(user_id)
        return None if row is None else _profile(*row)

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, Profile]:
        """The profiles of these users that exist, in one query per 1,000 ids."""
        async with self._sessions() as session:
            rows = await ProfileRepository(session).get_many(user_ids)
        return {user_id: _profile(*row) for user_id, row in rows.items()}

    async def aclose(self) -> None:
        return None


def _profile(traits: dict[str, Any], consent: dict[str, Any] | None) -> Profile:
    return Profile(traits=traits, consent=not (consent is not None and consent.get("personalization") is False))


class HttpSource:
    """An upstream profile service: GET ``url`` with ``{userId}`` replaced by the URL-encoded user id.

    200 is a profile: its traits are the object at ``traits_path`` (a dot path; "" is the whole
    body), its consent the boolean at ``consent_path`` (false means no personalization; absent means
    consent). 404 is "no such profile". Anything else, a timeout or a connection error is a failure.
    ``auth_header`` is sent with every request, written ``"Name: value"``. At most
    ``max_connections`` calls are in flight; the others queue here, in order.
    """

    def __init__(
        self,
        url: str,
        *,
        auth_header: str | None = None,
        timeout: float = 2.0,
        traits_path: str = "",
        consent_path: str | None = None,
        max_connections: int = 10,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if "{userId}" not in url:
            raise ValueError(f"the profile URL {url!r} has no {{userId}} placeholder")
        self._url = url
        self._headers: dict[str, str] = {}
        if auth_header:
            name, colon, value = auth_header.partition(":")
            if not colon or not name.strip():
                raise ValueError("the profile auth header must be written 'Name: value'")
            self._headers[name.strip()] = value.strip()
        self._timeout = timeout
        self._traits_path = [part for part in traits_path.split(".") if part]
        self._consent_path = [part for part in (consent_path or "").split(".") if part]
        self._owns_client = client is None
        # httpcore's pool does work in proportion to its connections times the requests queued in
        # it on every change (encode/httpx#3215): a hundred calls let into it at once are slower
        # in total than ten at a time. So calls queue on this semaphore instead, and every one that
        # passes finds a connection kept alive for it (no new TCP or TLS handshake per miss).
        self._slots = asyncio.Semaphore(max_connections)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = client or httpx.AsyncClient(limits=limits)

    def url_of(self, user_id: str) -> str:
        return self._url.replace("{userId}", quote(user_id, safe=""))

    async def get(self, user_id: str) -> Profile | None:
        try:
            async with self._slots:
                response = await self._client.get(self.url_of(user_id), headers=self._headers, timeout=self._timeout)
        except httpx.HTTPError as exc:  # timeouts, refused connections, broken responses
            raise SourceError(f"the profile service did not answer: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise SourceError(f"the profile service answered HTTP {response.status_code}")
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise SourceError("the profile service answered with a body that is not JSON") from exc
        traits = _at_path(body, self._traits_path)
        if traits is None:  # a profile with no traits yet
            traits = {}
        if not isinstance(traits, dict):
            where = ".".join(self._traits_path) or "the body"
            raise SourceError(f"the profile service's traits ({where}) are not a JSON object")
        consent = _at_path(body, self._consent_path) if self._consent_path else None
        return Profile(traits=traits, consent=consent is not False)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _at_path(value: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


# --------------------------------------------------------------------------------------------------
# The breaker


class Breaker:
    """Closed, calls go through. After ``failures`` consecutive failures it opens: no calls for
    ``reset`` seconds. Then it is half-open: one trial call, which closes it or opens it again."""

    def __init__(self, failures: int, reset: float, clock: Callable[[], float]) -> None:
        self._threshold = max(1, failures)
        self._reset = reset
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None
        self.trial = False  # a half-open trial call is in flight
        self.openings = 0

    @property
    def state(self) -> str:
        if self._open_until is None:
            return "closed"
        return "half-open" if self.trial or self._clock() >= self._open_until else "open"

    def allow(self) -> bool:
        """May a call go through now? (Half-open: yes for exactly one caller.)"""
        if self._open_until is None:
            return True
        if self.trial or self._clock() < self._open_until:
            return False
        self.trial = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._open_until = None
        self.trial = False

    def failed(self) -> None:
        self._failures += 1
        if self.trial or self._failures >= self._threshold:
            if self._open_until is None or self.trial:
                self.openings += 1
                log.warning("profile source: %d consecutive failures; breaker open", self._failures)
            self._open_until = self._clock() + self._reset
            self.trial = False

    def abandoned(self) -> None:
        """A call that was let through ended without an answer (cancelled): let another try."""
        self.trial = False


# --------------------------------------------------------------------------------------------------
# The store


@dataclass(slots=True)
class ProfileStats:
    """What the store did, counted since it was made. Every ``get`` is exactly one of a local hit, a
    stale copy served, or a miss (which joined a load in flight, or started one)."""

    requests: int = 0
    local_hits: int = 0  # a fresh in-process copy
    stale_served: int = 0  # a stale in-process copy served at once, refreshed behind it
    misses: int = 0  # no usable in-process copy: waited for Redis or the source
    coalesced: int = 0  # misses that joined a load already in flight instead of starting one
    redis_hits: int = 0  # loads answered from Redis (fresh or stale)
    redis_stale: int = 0  # of those, answered with a stale copy, then refreshed from the source
    redis_errors: int = 0
    upstream_calls: int = 0  # calls made to the source (the database, or the profile service)
    upstream_failures: int = 0
    refreshes: int = 0  # background refreshes started for stale copies
    budget_timeouts: int = 0  # requests answered without a profile because the budget ran out
    breaker_rejections: int = 0  # source calls not made because the breaker was open
    breaker_openings: int = 0
    breaker: str = "closed"  # closed | open | half-open

    @property
    def hit_ratio(self) -> float:
        """Requests answered from the in-process copy, fresh or stale."""
        return (self.local_hits + self.stale_served) / self.requests if self.requests else 0.0


@dataclass(slots=True)
class _Entry:
    profile: Profile | None
    fresh_until: float
    stale_until: float
    refresh_after: float = float("-inf")


class ProfileStore:
    """``get(user_id)``: a cached read that never raises and never waits past the budget.

    ``invalidate(user_id)`` drops this instance's copy (bus handlers call it), and
    ``invalidate_shared(user_ids)`` the Redis copies. ``clock`` is a monotonic clock in seconds
    (injectable, so that tests drive TTLs and the breaker); ``budget`` is in seconds, None for none.
    """

    def __init__(
        self,
        source: Source,
        *,
        redis: aioredis.Redis | None = None,
        prefix: str = "tessera:",
        ttl: float = 30.0,
        stale: float = 300.0,
        negative_ttl: float = NEGATIVE_TTL,
        size: int = 100_000,
        budget: float | None = 0.05,
        timeout: float = 2.0,
        redis_timeout: float = 0.25,
        breaker_failures: int = 5,
        breaker_reset: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._redis = redis
        self._prefix = prefix + "profile:"
        self._ttl = ttl
        self._stale = stale
        self._negative_ttl = min(ttl, negative_ttl)
        self._size = size
        self._budget = budget
        self._timeout = timeout
        self._redis_timeout = redis_timeout
        self._clock = clock
        self._breaker = Breaker(breaker_failures, breaker_reset, clock)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # One load per profile in flight; everyone who wants that profile waits on its answer.
        self._loading: dict[str, asyncio.Future[Profile | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._redis_down_until = float("-inf")
        self._stats = ProfileStats()
        self.invalidated = asyncio.Event()  # set (and replaced) by every invalidation: a wait point

    @classmethod
    def from_settings(
        cls, settings: Settings, sessions: async_sessionmaker[AsyncSession], redis: aioredis.Redis | None
    ) -> ProfileStore:
        """The upstream service when ``profile_url`` is set, else the built-in store; Redis when there is one."""
        source: Source
        if settings.profile_url:
            source = HttpSource(
                settings.profile_url,
                auth_header=settings.profile_auth_header,
                timeout=settings.profile_timeout_seconds,
                traits_path=settings.profile_traits_path,
                consent_path=settings.profile_consent_path,
            )
        else:
            source = DatabaseSource(sessions)
        return cls(
            source,
            redis=redis,
            prefix=settings.redis_prefix,
            ttl=settings.profile_cache_ttl_seconds,
            stale=settings.profile_stale_seconds,
            size=settings.profile_cache_size,
            budget=settings.profile_budget_ms / 1000 if settings.profile_budget_ms > 0 else None,
            timeout=settings.profile_timeout_seconds,
            breaker_failures=settings.profile_breaker_failures,
            breaker_reset=settings.profile_breaker_reset_seconds,
        )

    @property
    def stats(self) -> ProfileStats:
        """The counters, with the breaker's state as of now."""
        self._stats.breaker = self._breaker.state
        self._stats.breaker_openings = self._breaker.openings
        return self._stats

    async def get(self, user_id: str, *, wait: bool = False) -> Profile | None:
        """The profile of ``user_id``; None when there is none, or none to be had within the budget.

        ``wait=True`` lifts the budget (not the source's timeout), for callers off the request path
        that must not mistake "not yet" for "no profile", such as a consent check."""
        stats = self._stats
        stats.requests += 1
        entry = self._entries.get(user_id)
        if entry is not None:
            now = self._clock()
            if now < entry.fresh_until:
                self._entries.move_to_end(user_id)
                stats.local_hits += 1
                return entry.profile
            if now < entry.stale_until:
                self._entries.move_to_end(user_id)
                stats.stale_served += 1
                if now >= entry.refresh_after and user_id not in self._loading:
                    stats.refreshes += 1
                    self._start(user_id)
                return entry.profile
            del self._entries[user_id]
        stats.misses += 1
        answer = self._loading.get(user_id)
        if answer is None:
            answer = self._start(user_id)
        else:
            stats.coalesced += 1
        if not answer.done():
            if self._budget is None or wait:
                return await asyncio.shield(answer)
            await asyncio.wait((answer,), timeout=self._budget)
            if not answer.done():  # the load goes on in the background and fills the caches
                stats.budget_timeouts += 1
                log.debug("no profile within the %.0f ms budget", self._budget * 1000)
                return None
        return answer.result()

    def invalidate(self, user_id: str | None = None) -> None:
        """Drop this instance's copy of a profile (of every profile when None), and forget any load of
        it in flight, so that the next read goes to Redis or the source."""
        if user_id is None:
            self._entries.clear()
            self._loading.clear()
        else:
            self._entries.pop(user_id, None)
            self._loading.pop(user_id, None)
        self.invalidated.set()
        self.invalidated = asyncio.Event()

    async def invalidate_shared(self, user_ids: Iterable[str]) -> None:
        """Delete the Redis copies of these profiles (nothing to do without Redis). Raises if Redis fails."""
        if self._redis is None:
            return
        keys = [self._prefix + user_id for user_id in user_ids]
        for start in range(0, len(keys), _DELETE_BATCH):
            await self._redis.unlink(*keys[start : start + _DELETE_BATCH])

    async def prefetch(self, user_ids: Iterable[str]) -> None:
        """Load the profiles not cached here in one call to the source, when it can (the built-in
        store can): ingestion asks for the consent of every user of a batch. Off the request path;
        a failure leaves the per-profile reads to do their usual work."""
        get_many = getattr(self._source, "get_many", None)
        if get_many is None:
            return
        now = self._clock()
        missing = []
        for user_id in dict.fromkeys(user_ids):
            entry = self._entries.get(user_id)
            if (entry is None or now >= entry.fresh_until) and user_id not in self._loading:
                missing.append(user_id)
        if not missing or not self._breaker.allow():
            return
        self._stats.upstream_calls += 1
        try:
            async with asyncio.timeout(self._timeout):
                found: dict[str, Profile] = await get_many(missing)
        except Exception:
            self._stats.upstream_failures += 1
            self._breaker.failed()
            log.warning("profile source failed to load %d profiles at once", len(missing), exc_info=True)
            return
        self._breaker.succeeded()
        now = self._clock()
        for user_id in missing:
            if user_id not in self._loading:  # a load that started meanwhile knows better
                self._remember(user_id, self._entry(found.get(user_id), now))

    async def drain(self) -> None:
        """Wait until no load or refresh is in flight (for tests and benchmarks)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop the loads in flight and close the source (the Redis client belongs to the caller)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._source.aclose()

    # -- loading -------------------------------------------------------------------------------

    def _start(self, user_id: str) -> asyncio.Future[Profile | None]:
        answer: asyncio.Future[Profile | None] = asyncio.get_running_loop().create_future()
        self._loading[user_id] = answer
        task = asyncio.create_task(self._load(user_id, answer), name="profile-load")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return answer

    async def _load(self, user_id: str, answer: asyncio.Future[Profile | None]) -> None:
        """Redis, then the source; answers as soon as there is something to serve, then goes on to
        refresh a stale copy. It writes to the caches only while it is still *the* load of this
        profile: an invalidation in the meantime makes what it read suspect."""
        try:
            if self._redis is not None and self._clock() >= self._redis_down_until:
                shared = await self._read_shared(user_id)
                if shared is not None:
                    self._stats.redis_hits += 1
                    if self._loading.get(user_id) is answer:
                        self._remember(user_id, shared)
                    if not answer.done():
                        answer.set_result(shared.profile)
                    if self._clock() < shared.fresh_until:
                        return
                    self._stats.redis_stale += 1
            try:
                profile = await self._call_source(user_id)
            except ProfileError:  # logged where it happened; a stale copy, or none, is served
                stale = self._entries.get(user_id)
                if stale is not None and self._loading.get(user_id) is answer:
                    stale.refresh_after = self._clock() + REFRESH_RETRY
                return
            if not answer.done():
                answer.set_result(profile)
            if self._loading.get(user_id) is answer:
                self._remember(user_id, self._entry(profile, self._clock()))
                if self._redis is not None:
                    await self._write_shared(user_id, profile)
        except Exception:  # a bug, not an outage: still no reason to fail a request
            log.exception("profile load failed")
        finally:
            if self._loading.get(user_id) is answer:
                del self._loading[user_id]
            if not answer.done():  # failed, or cancelled: no profile (a stale copy was served already)
                answer.set_result(None)

    async def _call_source(self, user_id: str) -> Profile | None:
        breaker = self._breaker
        if not breaker.allow():
            self._stats.breaker_rejections += 1
            raise BreakerOpen("the profile source's breaker is open")
        trial = breaker.trial
        self._stats.upstream_calls += 1
        try:
            async with asyncio.timeout(self._timeout):
                profile = await self._source.get(user_id)
        except asyncio.CancelledError:
            if trial:
                breaker.abandoned()
            raise
        except Exception as exc:
            self._stats.upstream_failures += 1
            breaker.failed()
            if isinstance(exc, SourceError):
                log.warning("profile source failed: %s", exc)
                raise
            if isinstance(exc, TimeoutError):
                log.warning("profile source did not answer within %.1f s", self._timeout)
            else:
                log.warning("profile source failed", exc_info=True)
            raise SourceError(f"the profile source failed: {type(exc).__name__}") from exc
        breaker.succeeded()
        return profile

    # -- the caches ----------------------------------------------------------------------------

    def _entry(self, profile: Profile | None, now: float) -> _Entry:
        if profile is None:
            return _Entry(None, now + self._negative_ttl, now + self._negative_ttl)
        return _Entry(profile, now + self._ttl, now + self._ttl + self._stale)

    def _remember(self, user_id: str, entry: _Entry) -> None:
        self._entries[user_id] = entry
        self._entries.move_to_end(user_id)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    async def _read_shared(self, user_id: str) -> _Entry | None:
        """The Redis copy, aged by its remaining time to live; None when there is none or Redis fails."""
        assert self._redis is not None
        key = self._prefix + user_id
        try:
            async with asyncio.timeout(self._redis_timeout):
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.get(key)
                    pipe.pttl(key)
                    raw, pttl = await pipe.execute()
        except Exception:
            self._redis_failed("read")
            return None
        self._redis_recovered()
        if raw is None or pttl <= 0:
            return None
        try:
            doc = orjson.loads(raw)
            profile = None if doc is None else Profile(traits=doc["traits"], consent=doc["consent"] is not False)
        except (orjson.JSONDecodeError, TypeError, KeyError):  # not written by this version: load it anew
            log.warning("profile cache: unreadable Redis copy of a profile; loading it anew")
            return None
        now, remaining = self._clock(), pttl / 1000
        if profile is None:
            return _Entry(None, now + remaining, now + remaining)
        return _Entry(profile, now + max(0.0, remaining - self._stale), now + remaining)

    async def _write_shared(self, user_id: str, profile: Profile | None) -> None:
        assert self._redis is not None
        seconds = self._negative_ttl if profile is None else self._ttl + self._stale
        if seconds <= 0 or self._clock() < self._redis_down_until:
            return
        doc = orjson.dumps(None if profile is None else {"traits": profile.traits, "consent": profile.consent})
        try:
            async with asyncio.timeout(self._redis_timeout):
                await self._redis.set(self._prefix + user_id, doc, px=max(1, int(seconds * 1000)))
        except Exception:
            self._redis_failed("write")
            return
        self._redis_recovered()

    def _redis_failed(self, what: str) -> None:
        self._stats.redis_errors += 1
        if self._redis_down_until == float("-inf"):  # say it once per outage, not once per load
            log.warning("profile cache: Redis %s failed; using the source alone for a while", what, exc_info=True)
        self._redis_down_until = self._clock() + REDIS_BACKOFF

    def _redis_recovered(self) -> None:
        if self._redis_down_until != float("-inf"):
            self._redis_down_until = float("-inf")
            log.info("profile cache: Redis answers again")

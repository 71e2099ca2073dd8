"""Configuration, read from the environment (``TESSERA_*``) with pydantic-settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_DATABASE_URL = "sqlite+aiosqlite:///tessera.db"

# Country headers set by common CDNs. Trust only the ones your edge sets and strips from clients.
DEFAULT_COUNTRY_HEADERS = ("cf-ipcountry", "cloudfront-viewer-country", "x-vercel-ip-country", "fastly-geo-country")
DEFAULT_REGION_HEADERS = ("cloudfront-viewer-country-region", "x-vercel-ip-country-region", "cf-region-code")
DEFAULT_CITY_HEADERS = ("cloudfront-viewer-city", "x-vercel-ip-city", "cf-ipcity")

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class Limits:
    """What an event may be: its size, a batch's size, and how far its time may be from now."""

    retention: timedelta
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_future: timedelta = timedelta(minutes=10)


def system_clock() -> datetime:
    return datetime.now(UTC)


class Settings(BaseSettings):
    """Every setting has a working default: with none set, Tessera is the embedded single process."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", extra="ignore")

    database_url: str = EMBEDDED_DATABASE_URL
    redis_url: str | None = None
    redis_prefix: str = "tessera:"
    host: str = "127.0.0.1"
    port: int = 8000
    # Request headers trusted to carry the viewer's country / region / city, lower-case, in order.
    country_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_COUNTRY_HEADERS))
    region_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_REGION_HEADERS))
    city_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_CITY_HEADERS))
    retention_days: int = 90
    # How often each instance checks the content version in the database, as a safety net under
    # the bus (and the only signal between processes in the embedded mode).
    version_poll_seconds: float = 1.0
    # Profiles: the built-in store, or an upstream profile service when profile_url is set.
    profile_url: str | None = None  # a template such as https://cdp.example/profiles/{userId}
    profile_auth_header: str | None = None  # "Authorization: Bearer s3cret"
    profile_timeout_seconds: float = 2.0
    profile_traits_path: str = ""  # dot path to the traits object in the upstream's JSON; "" = the body
    profile_consent_path: str | None = None  # dot path to the personalization consent boolean, if any
    profile_cache_ttl_seconds: float = 30.0  # fresh for this long
    profile_stale_seconds: float = 300.0  # then served stale (and refreshed) for this long
    profile_cache_size: int = 100_000
    profile_budget_ms: float = 50.0  # the request path waits no longer for a profile
    profile_breaker_failures: int = 5  # consecutive upstream failures that open the breaker
    profile_breaker_reset_seconds: float = 30.0
    # Events
    # Origins whose pages may send events to /v1/* from a browser (CORS); ["*"] for any site.
    tracking_cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    event_max_bytes: int = 32 * 1024
    batch_max_bytes: int = 500 * 1024
    event_max_future_seconds: float = 600.0  # timestamps further ahead than this are rejected
    worker_claim_idle_ms: int = 30_000  # a crashed worker's pending events are claimed after this
    # Run the segment evaluator inside `tessera serve`. Default: yes in the embedded mode; with Redis,
    # run `tessera worker` processes instead (or set this to true).
    worker: bool | None = None
    events_follow_seconds: float = 1.0  # embedded mode: how often events written by other processes are read

    @property
    def run_worker(self) -> bool:
        return self.embedded if self.worker is None else self.worker

    @property
    def limits(self) -> Limits:
        return Limits(
            retention=self.retention,
            max_event_bytes=self.event_max_bytes,
            max_batch_bytes=self.batch_max_bytes,
            max_future=timedelta(seconds=self.event_max_future_seconds),
        )

    key_cache_ttl_seconds: float = 30.0
    max_body_bytes: int = 1_000_000
    graphiql: bool = True

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.retention_days)

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

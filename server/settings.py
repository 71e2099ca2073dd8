"""Configuration, read from the environment (``TESSERA_*``) with pydantic-settings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_DATABASE_URL = "sqlite+aiosqlite:///tessera.db"

# Country headers set by common CDNs. Trust only the ones your edge sets and strips from clients.
DEFAULT_COUNTRY_HEADERS = ("cf-ipcountry", "cloudfront-viewer-country", "x-vercel-ip-country", "fastly-geo-country")
DEFAULT_REGION_HEADERS = ("cloudfront-viewer-country-region", "x-vercel-ip-country-region", "cf-region-code")
DEFAULT_CITY_HEADERS = ("cloudfront-viewer-city", "x-vercel-ip-city", "cf-ipcity")

Clock = Callable[[], datetime]


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
    profile_cache_ttl_seconds: float = 30.0
    profile_cache_size: int = 100_000
    key_cache_ttl_seconds: float = 30.0
    max_body_bytes: int = 1_000_000
    graphiql: bool = True

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.retention_days)

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

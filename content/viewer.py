"""The viewer: who is looking (ids, traits), and where, when and how (the request context)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from content.errors import InvalidViewer

DEVICES = ("DESKTOP", "MOBILE", "TABLET", "BOT", "OTHER")
CHANNELS = ("WEB", "APP", "EMAIL", "PUSH")


@dataclass(frozen=True, slots=True)
class Viewer:
    """A normalised viewer. Build it with :func:`make_viewer`, which checks and fills the fields."""

    at: datetime
    user_id: str | None = None
    anonymous_id: str | None = None
    device: str | None = None
    channel: str | None = None
    country: str | None = None
    region: str | None = None
    city: str | None = None
    locale: str | None = None
    timezone: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    # Derived from ``at`` and ``timezone`` once, so that rules read them without converting.
    local_hour: int = 0
    local_weekday: int = 1
    local_time: str = "00:00"

    def unit(self, stickiness: str | None = None) -> str | None:
        """The bucketing unit: userId else anonymousId, or only anonymousId for that stickiness."""
        if stickiness == "anonymousId":
            return self.anonymous_id
        return self.user_id or self.anonymous_id

    def anonymised(self) -> Viewer:
        """The same request without identity (a viewer who withheld consent, rules.md)."""
        return replace(self, user_id=None, anonymous_id=None)


# Files a host's zoneinfo directory may hold besides IANA zones: the host's own zone (which would
# make answers depend on the machine), and the POSIX and leap-second ("right/") variants.
_NOT_IANA_NAMES = frozenset({"localtime", "posixrules"})
_NOT_IANA_PREFIXES = ("posix/", "right/")


def _zone(name: str) -> ZoneInfo:
    problem = InvalidViewer("viewer.timezone", f"'{name}' is not an IANA time zone")
    if name in _NOT_IANA_NAMES or name.startswith(_NOT_IANA_PREFIXES):
        raise problem
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise problem from exc


def make_viewer(
    *,
    at: datetime,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    device: str | None = None,
    channel: str | None = None,
    country: str | None = None,
    region: str | None = None,
    city: str | None = None,
    locale: str | None = None,
    timezone: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Viewer:
    """Normalise viewer input at the edge: empty ids are no id, country codes are upper-cased, a
    date-time without an offset is UTC, and the time zone must be an IANA zone."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    at = at.astimezone(UTC)
    if device is not None and device not in DEVICES:
        raise InvalidViewer("viewer.device", f"'{device}' is not one of {', '.join(DEVICES)}")
    if channel is not None and channel not in CHANNELS:
        raise InvalidViewer("viewer.channel", f"'{channel}' is not one of {', '.join(CHANNELS)}")
    if attributes is not None and not isinstance(attributes, Mapping):
        raise InvalidViewer("viewer.attributes", "must be a JSON object")
    timezone = timezone or None
    local = at.astimezone(_zone(timezone)) if timezone else at
    return Viewer(
        at=at,
        user_id=user_id or None,
        anonymous_id=anonymous_id or None,
        device=device,
        channel=channel,
        country=country.upper() if country else None,
        region=region or None,
        city=city or None,
        locale=locale or None,
        timezone=timezone,
        attributes=attributes or {},
        local_hour=local.hour,
        local_weekday=local.isoweekday(),
        local_time=f"{local.hour:02d}:{local.minute:02d}",
    )

"""What a request says about its viewer when the query does not: the device from the User-Agent
(ua-parser) and the location from CDN headers that this deployment trusts."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

from ua_parser import parse as parse_user_agent

from schema.ports import RequestContext

_MOBILE_OS = frozenset(
    {"iOS", "Android", "Windows Phone", "BlackBerry OS", "Symbian OS", "Firefox OS", "KaiOS", "Tizen", "webOS"}
)
_DESKTOP_OS = frozenset(
    {"Windows", "Mac OS X", "Linux", "Ubuntu", "Fedora", "Debian", "Chrome OS", "FreeBSD", "OpenBSD", "NetBSD"}
)
_TV = re.compile(r"Smart-?TV|SMART-TV|\bTV\b|BRAVIA|\bAFT[A-Z]|GoogleTV|AppleTV|\bRoku|CrKey|Web0S|NetCast|HbbTV")
_TABLET_FAMILIES = frozenset({"iPad", "Kindle", "Kindle Fire", "Nexus 7", "Nexus 9", "Nexus 10", "Surface"})


@lru_cache(maxsize=8192)
def device_of(user_agent: str) -> str | None:
    """DESKTOP, MOBILE, TABLET, BOT or OTHER for a User-Agent; None when there is none."""
    if not user_agent:
        return None
    result = parse_user_agent(user_agent)
    device = result.device
    os_family = result.os.family if result.os else None
    if device is not None and device.family == "Spider":
        return "BOT"
    if _TV.search(user_agent):  # TVs and streaming sticks: before the Android-tablet guess below
        return "OTHER"
    if device is not None and (
        device.family in _TABLET_FAMILIES or "tablet" in (device.brand or "").lower() or "Tablet" in device.family
    ):
        return "TABLET"
    if os_family == "Android" and "Mobile" not in user_agent:  # Android tablets drop the "Mobile" token
        return "TABLET"
    if os_family in _MOBILE_OS or (result.user_agent is not None and "Mobile" in result.user_agent.family):
        return "MOBILE"
    if os_family in _DESKTOP_OS:
        return "DESKTOP"
    return "OTHER"


class RequestInference:
    """Reads the trusted headers, in the configured order; the first non-empty one wins."""

    def __init__(
        self, *, country_headers: Sequence[str], region_headers: Sequence[str], city_headers: Sequence[str]
    ) -> None:
        self._country = tuple(h.lower() for h in country_headers)
        self._region = tuple(h.lower() for h in region_headers)
        self._city = tuple(h.lower() for h in city_headers)

    def infer(self, headers: Mapping[str, str]) -> RequestContext:
        country = _first(headers, self._country)
        country = country.upper() if country else None
        if country in ("XX", "T1"):  # Cloudflare's "unknown" and "Tor", in whatever case they come
            country = None
        return RequestContext(
            device=device_of(headers.get("user-agent", "")),
            country=country,
            region=_first(headers, self._region),
            city=_first(headers, self._city),
        )


def _first(headers: Mapping[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        value = (headers.get(name) or "").strip()
        if value:  # a blank header is absent: the next trusted one may still answer
            return value
    return None

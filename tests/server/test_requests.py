"""What a request says about its viewer: server/requests.py over real User-Agent strings and CDN headers."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from schema.ports import RequestContext
from server.requests import RequestInference, device_of
from server.settings import DEFAULT_CITY_HEADERS, DEFAULT_COUNTRY_HEADERS, DEFAULT_REGION_HEADERS

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1"
)
CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)

USER_AGENTS = [
    # Smart TVs and streaming sticks are neither phones nor tablets, whatever their OS
    pytest.param(
        "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/4.0 "
        "Chrome/76.0.3809.146 TV Safari/537.36",
        "OTHER",
        id="samsung-tizen-tv",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 9; BRAVIA 4K GB ATV3 Build/PTT1.190515.001.S52) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/89.0.4389.105 Mobile Safari/537.36",
        "OTHER",
        id="sony-android-tv",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 9; AFTMM Build/PS7233; wv) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Version/4.0 Chrome/70.0.3538.110 Mobile Safari/537.36",
        "OTHER",
        id="fire-tv-stick",
    ),
    pytest.param(IPHONE, "MOBILE", id="iphone-safari"),
    pytest.param(
        "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 "
        "Mobile/15E148 Safari/604.1",
        "TABLET",
        id="ipad-safari",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.6367.82 "
        "Mobile Safari/537.36",
        "MOBILE",
        id="android-phone-chrome",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 13; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/23.0 "
        "Chrome/115.0.0.0 Mobile Safari/537.36",
        "MOBILE",
        id="android-phone-samsung-internet",
    ),
    pytest.param(
        "Mozilla/5.0 (Android 13; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0",
        "MOBILE",
        id="android-phone-firefox",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
        "Safari/537.36",
        "TABLET",
        id="android-tablet-galaxy-tab",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 7.0; Nexus 9 Build/NRD90R) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/60.0.3112.107 Safari/537.36",
        "TABLET",
        id="android-tablet-nexus-9",
    ),
    pytest.param(
        "Mozilla/5.0 (Android 13; Tablet; rv:125.0) Gecko/125.0 Firefox/125.0",
        "TABLET",
        id="android-tablet-firefox",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 9; KFMAWI) AppleWebKit/537.36 (KHTML, like Gecko) Silk/124.1.1 "
        "like Chrome/124.0.6367.82 Safari/537.36",
        "TABLET",
        id="kindle-fire-silk",
    ),
    pytest.param(CHROME_WINDOWS, "DESKTOP", id="windows-chrome"),
    pytest.param(
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
        "Safari/537.36 Edg/124.0.2478.51",
        "DESKTOP",
        id="windows-edge",
    ),
    pytest.param(
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 "
        "Safari/605.1.15",
        "DESKTOP",
        id="macos-safari",
    ),
    pytest.param(
        "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0", "DESKTOP", id="linux-firefox"
    ),
    pytest.param(
        "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0", "DESKTOP", id="ubuntu-firefox"
    ),
    pytest.param(
        "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
        "Safari/537.36",
        "DESKTOP",
        id="chromebook",
    ),
    pytest.param("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "BOT", id="googlebot"),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.6367.82 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "BOT",
        id="googlebot-smartphone",
    ),
    pytest.param("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", "BOT", id="bingbot"),
    pytest.param("curl/8.5.0", "OTHER", id="curl"),
    pytest.param("python-requests/2.31.0", "OTHER", id="python-requests"),
    pytest.param("", None, id="empty"),
]


@pytest.mark.parametrize(("user_agent", "device"), USER_AGENTS)
def test_device_of_a_real_user_agent(user_agent: str, device: str | None) -> None:
    assert device_of(user_agent) == device


def default_inference() -> RequestInference:
    return RequestInference(
        country_headers=DEFAULT_COUNTRY_HEADERS,
        region_headers=DEFAULT_REGION_HEADERS,
        city_headers=DEFAULT_CITY_HEADERS,
    )


def infer(inference: RequestInference, headers: dict[str, str]) -> RequestContext:
    # Starlette's Headers, as the app passes them: names match whatever their case on the wire.
    return inference.infer(Headers(headers=headers))


def test_a_request_without_headers_says_nothing() -> None:
    assert infer(default_inference(), {}) == RequestContext()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            {"User-Agent": IPHONE, "CF-IPCountry": "DE", "CF-Region-Code": "BE", "CF-IPCity": "Berlin"},
            RequestContext(device="MOBILE", country="DE", region="BE", city="Berlin"),
            id="cloudflare",
        ),
        pytest.param(
            {
                "User-Agent": CHROME_WINDOWS,
                "CloudFront-Viewer-Country": "US",
                "CloudFront-Viewer-Country-Region": "CA",
                "CloudFront-Viewer-City": "San Francisco",
            },
            RequestContext(device="DESKTOP", country="US", region="CA", city="San Francisco"),
            id="cloudfront",
        ),
        pytest.param(
            {"X-Vercel-IP-Country": "jp", "X-Vercel-IP-Country-Region": "13", "X-Vercel-IP-City": "Tokyo"},
            RequestContext(country="JP", region="13", city="Tokyo"),
            id="vercel-lower-case-country",
        ),
        pytest.param({"Fastly-Geo-Country": " nl "}, RequestContext(country="NL"), id="fastly-padded"),
        pytest.param({"CF-IPCountry": "XX"}, RequestContext(), id="cloudflare-unknown"),
        pytest.param({"CF-IPCountry": "xx"}, RequestContext(), id="cloudflare-unknown-lower-case"),
        pytest.param({"CF-IPCountry": "T1"}, RequestContext(), id="cloudflare-tor"),
        pytest.param(
            {"CF-IPCountry": "FR", "CloudFront-Viewer-Country": "US"},
            RequestContext(country="FR"),
            id="first-default-header-wins",
        ),
        pytest.param(
            {"CF-IPCountry": "  ", "CloudFront-Viewer-Country": "US"},
            RequestContext(country="US"),
            id="blank-header-is-absent",
        ),
        pytest.param({"X-Country": "DE", "X-Region": "BY"}, RequestContext(), id="untrusted-headers-ignored"),
    ],
)
def test_default_trusted_headers(headers: dict[str, str], expected: RequestContext) -> None:
    assert infer(default_inference(), headers) == expected


def custom_inference() -> RequestInference:
    # Configured as operators write it: mixed case, in the order they trust their edges.
    return RequestInference(
        country_headers=["X-Edge-Country", "CloudFront-Viewer-Country"],
        region_headers=["X-Edge-Region"],
        city_headers=[],
    )


def test_custom_configuration_ignores_headers_it_does_not_trust() -> None:
    headers = {"CF-IPCountry": "DE", "CF-Region-Code": "BE", "CF-IPCity": "Berlin", "X-Vercel-IP-Country": "FR"}

    assert infer(custom_inference(), headers) == RequestContext()


def test_custom_configuration_respects_its_order() -> None:
    both = {"CloudFront-Viewer-Country": "US", "X-Edge-Country": "at", "X-Edge-Region": "9"}
    only_second = {"CloudFront-Viewer-Country": "US", "X-Edge-Region": "9"}

    assert infer(custom_inference(), both) == RequestContext(country="AT", region="9")
    assert infer(custom_inference(), only_second) == RequestContext(country="US", region="9")


def test_custom_configuration_still_maps_unknown_to_none_and_reads_the_user_agent() -> None:
    headers = {"X-Edge-Country": "xx", "CloudFront-Viewer-Country": "US", "User-Agent": IPHONE}

    # "XX" is an answer (the edge does not know), not a blank: the next header is not consulted.
    assert infer(custom_inference(), headers) == RequestContext(device="MOBILE")

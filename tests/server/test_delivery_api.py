"""The delivery API (``/graphql``) of issue 2 over HTTP, on PostgreSQL and on SQLite: what each viewer
sees and why, what is inferred from the request, drafts and locales, paging, keys and scopes, GraphQL
over HTTP, and that an admin change shows in the very next query."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from fixtures_app import Reply, RunningApp

from server.keys import create_key, hash_key
from server.store import ApiKeyRepository
from tests.server.factories import (
    block,
    bucket,
    bundle,
    context,
    demo_bundle,
    expected_arm,
    experiment_variant,
    flag,
    given,
    mutate,
    placed,
    placement,
    segment,
    trait,
    variant,
)

BLOCK = "key type tags locale fields variant version publishedAt decision { variant reason rule flag experiment trace }"
PLACEMENT = f"""
query Placement($key: String!, $viewer: ViewerInput, $limit: Int) {{
  placement(key: $key, viewer: $viewer, limit: $limit) {{ key blocks {{ {BLOCK} }} }}
}}
"""
BLOCK_QUERY = f"""
query Block($key: String!, $viewer: ViewerInput) {{ block(key: $key, viewer: $viewer) {{ {BLOCK} }} }}
"""
BLOCKS = """
query Blocks($tags: [String!], $match: TagMatch, $type: String, $viewer: ViewerInput, $first: Int, $after: String) {
  blocks(tags: $tags, match: $match, type: $type, viewer: $viewer, first: $first, after: $after) {
    edges { cursor node { key variant } }
    pageInfo { hasNextPage endCursor }
  }
}
"""
VIEWER = """
query Viewer($viewer: ViewerInput!) {
  viewer(viewer: $viewer) { userId anonymousId segments { key name } flags { key enabled variant reason } }
}
"""

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.0 Mobile/15E148 Safari/604.1"
)
IPAD = (
    "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.0 Mobile/15E148 Safari/604.1"
)
DESKTOP_CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


# -- calls ----------------------------------------------------------------------------------------


async def query_placement(
    app: RunningApp,
    key: str,
    viewer: Mapping[str, Any] | None = None,
    *,
    limit: int | None = None,
    scope: str = "delivery",
    headers: Mapping[str, str] | None = None,
) -> Reply:
    variables: dict[str, Any] = {"key": key, "viewer": viewer, "limit": limit}
    return await app.graphql(PLACEMENT, variables, key=scope, headers=headers)


async def placement_blocks(app: RunningApp, key: str, viewer: Mapping[str, Any] | None = None, **kw: Any) -> list[Any]:
    """The blocks of a placement that must exist, checked to have come back without errors."""
    blocks: list[Any] = ok(await query_placement(app, key, viewer, **kw))["placement"]["blocks"]
    return blocks


async def query_block(
    app: RunningApp,
    key: str,
    viewer: Mapping[str, Any] | None = None,
    *,
    scope: str = "delivery",
    headers: Mapping[str, str] | None = None,
) -> Any:
    """``block(key)`` as the viewer sees it (None when not eligible), checked for errors."""
    return ok(await app.graphql(BLOCK_QUERY, {"key": key, "viewer": viewer}, key=scope, headers=headers))["block"]


async def variant_of(app: RunningApp, key: str, viewer: Mapping[str, Any] | None = None, **kw: Any) -> str | None:
    found = await query_block(app, key, viewer, **kw)
    return None if found is None else str(found["variant"])


async def query_blocks(app: RunningApp, scope: str = "delivery", **arguments: Any) -> Reply:
    return await app.graphql(BLOCKS, arguments, key=scope)


async def keys_of_blocks(app: RunningApp, scope: str = "delivery", **arguments: Any) -> list[str]:
    return [edge["node"]["key"] for edge in ok(await query_blocks(app, scope, **arguments))["blocks"]["edges"]]


async def viewer_state(app: RunningApp, viewer: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = ok(await app.graphql(VIEWER, {"viewer": viewer}))["viewer"]
    return state


def steps(trace: Sequence[str]) -> list[str]:
    """The trace without its block line and without the reasons: ``variant vip: skipped``."""
    return [line.split(",")[0] for line in trace[1:]]


def ok(reply: Reply) -> Any:
    """The data of a reply that must have succeeded."""
    assert reply.status == 200, reply.body
    assert reply.errors == [], reply.body
    return reply.data


def assert_request_error(reply: Reply, status: int, code: str) -> None:
    """A GraphQL-shaped JSON error body with ``code``, answered with ``status``."""
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.errors, reply.body
    assert all(isinstance(error["message"], str) and error["message"] for error in reply.errors)
    assert set(reply.codes()) == {code}, reply.body


# -- what each viewer sees, and why ----------------------------------------------------------------


async def test_the_demo_home_hero_differs_for_a_gold_mobile_user_and_an_anonymous_desktop_one(
    app: RunningApp,
) -> None:
    # given the demo shop, where Ada is gold tier
    await given(app, demo_bundle())

    # when each of them asks for the home hero
    (gold,) = await placement_blocks(app, "home-hero", {"userId": "u-ada", "device": "MOBILE"})
    (anonymous,) = await placement_blocks(app, "home-hero", {"anonymousId": "a-1", "device": "DESKTOP"})

    # then Ada gets the gold offer (merged over the default fields) and the visitor the default
    assert gold["key"] == anonymous["key"] == "hero-main"
    assert gold["variant"] == "gold-mobile"
    assert gold["fields"]["title"] == "Your gold offer"
    assert gold["fields"]["cta"] == {"label": "Shop now", "href": "/shop"}
    assert gold["version"] == 1
    assert gold["publishedAt"] is not None
    decision = gold["decision"]
    assert (decision["variant"], decision["reason"], decision["rule"], decision["flag"], decision["experiment"]) == (
        "gold-mobile",
        "RULE_MATCH",
        "gold-mobile",
        "new-hero-rules",
        None,
    )
    assert "hero-main" in decision["trace"][0]
    assert steps(decision["trace"]) == ["variant gold-mobile: taken"]

    assert anonymous["variant"] == "default"
    assert anonymous["fields"]["title"] == "Welcome to the shop"
    decision = anonymous["decision"]
    assert (decision["variant"], decision["reason"], decision["rule"], decision["flag"], decision["experiment"]) == (
        "default",
        "DEFAULT",
        None,
        None,
        None,
    )
    assert steps(decision["trace"]) == [
        "variant gold-mobile: skipped",
        "variant vip: skipped",
        "variant cart-reminder: skipped",
        "no variant taken: default fields",
    ]
    assert "flag new-hero-rules is off" in decision["trace"][1]


async def test_experiment_arms_follow_the_bucketing_formula(app: RunningApp) -> None:
    # given a block whose only variant is a 1:3 experiment, and one sticky to the anonymous id
    weights = {"control": 1, "bold": 3}
    sticky_weights = {"calm": 60, "loud": 40}
    await given(
        app,
        bundle(
            blocks=[
                block("promo", variants=[experiment_variant("test", "promo-test", weights)]),
                block(
                    "sticky",
                    variants=[
                        experiment_variant("test", "hero-spring", sticky_weights, stickiness="anonymousId")
                    ],
                ),
            ]
        ),
    )

    units = [f"u-{n}" for n in range(1, 9)]
    assert {expected_arm("promo-test", unit, weights) for unit in units} == set(weights), "units on both arms"
    for unit in units:
        # when the viewer asks for the block
        found = await query_block(app, "promo", {"userId": unit, "anonymousId": "a-1"})

        # then its arm is the one the formula gives, with its fields, and the decision says so
        arm = expected_arm("promo-test", unit, weights)
        assert found["variant"] == arm
        assert found["fields"] == {"title": arm}
        decision = found["decision"]
        assert (decision["reason"], decision["rule"], decision["experiment"], decision["flag"]) == (
            "EXPERIMENT",
            "test",
            "promo-test",
            None,
        )
        assert f"bucket {bucket('promo-test', unit)} <" in decision["trace"][-1]
        assert decision["trace"][-1].endswith(f"-> arm {arm}")

    # and with anonymousId stickiness the anonymous id decides (rules.md's vectors: 5645 and 8994)
    assert expected_arm("hero-spring", "u-1", sticky_weights) == "calm"
    assert expected_arm("hero-spring", "a-42", sticky_weights) == "loud"
    assert await variant_of(app, "sticky", {"userId": "u-1", "anonymousId": "a-42"}) == "loud"
    assert await variant_of(app, "sticky", {"userId": "u-1"}) == "default"  # no unit: the variant is skipped

    # and a viewer with no unit at all gets no arm
    nobody = await query_block(app, "promo", {})
    assert nobody["variant"] == "default"
    assert nobody["decision"]["reason"] == "DEFAULT"
    assert "no unit" in nobody["decision"]["trace"][1]


async def test_a_partial_rollout_turns_a_flag_on_by_bucket(app: RunningApp) -> None:
    # given a 25.5% rollout with its own salt, gating the first variant
    await given(
        app,
        bundle(
            flags=[flag("split", rollout=25.5, salt="split-salt")],
            blocks=[block("hero", variants=[variant("beta", flag="split")])],
        ),
    )
    units = [f"u-{n}" for n in range(12)]
    expected = {unit: bucket("split-salt", unit) < 2550 for unit in units}
    assert set(expected.values()) == {True, False}, "the units should land on both sides"

    for unit in units:
        # when the viewer asks for its flags and for the block
        state = await viewer_state(app, {"userId": unit})
        found = await query_block(app, "hero", {"userId": unit})

        # then both follow bucket(salt, unit) < round(25.5 * 100)
        assert state["flags"] == [
            {
                "key": "split",
                "enabled": expected[unit],
                "variant": "on" if expected[unit] else "off",
                "reason": "SPLIT",
            }
        ]
        assert found["variant"] == ("beta" if expected[unit] else "default")
        if expected[unit]:
            assert found["decision"]["flag"] == "split"
        else:
            assert "flag split is off" in found["decision"]["trace"][1]


async def test_variants_are_tried_in_order_and_their_fields_merge_shallowly(app: RunningApp) -> None:
    # given a block whose first variant is for gold members and whose second is for everyone
    default_fields = {"title": "Hello", "cta": {"label": "Shop", "href": "/shop"}, "image": "/a.jpg"}
    await given(
        app,
        bundle(
            segments=[segment("gold", trait("tier", "eq", "gold"))],
            blocks=[
                block(
                    "hero",
                    fields=default_fields,
                    variants=[
                        variant("gold", when={"segment": "gold"}, fields={"cta": {"label": "Gold"}}),
                        variant("everyone", fields={"title": "Hi"}),
                    ],
                )
            ],
            profiles=[{"userId": "u-gold", "traits": {"tier": "gold"}}],
        ),
    )

    # when a gold member and someone else look
    gold = await query_block(app, "hero", {"userId": "u-gold"})
    other = await query_block(app, "hero", {"userId": "u-other"})

    # then the first variant taken wins, and a variant's key replaces the default's whole value
    assert gold["variant"] == "gold"
    assert gold["fields"] == {"title": "Hello", "cta": {"label": "Gold"}, "image": "/a.jpg"}
    assert steps(gold["decision"]["trace"]) == ["variant gold: taken"]
    assert other["variant"] == "everyone"
    assert other["fields"] == {**default_fields, "title": "Hi"}
    assert (other["decision"]["reason"], other["decision"]["rule"]) == ("RULE_MATCH", "everyone")
    assert steps(other["decision"]["trace"]) == ["variant gold: skipped", "variant everyone: taken"]


async def test_viewer_lists_segments_by_priority_and_every_flag(app: RunningApp) -> None:
    # given the demo shop
    await given(app, demo_bundle())

    # when Ada, Cleo (who withheld consent) and an anonymous visitor ask who they are
    ada = await viewer_state(app, {"userId": "u-ada"})
    cleo = await viewer_state(app, {"userId": "u-cleo"})
    visitor = await viewer_state(app, {"anonymousId": "a-7"})

    # then Ada's segments come by priority, and each flag says why
    assert (ada["userId"], ada["anonymousId"]) == ("u-ada", None)
    assert [s["key"] for s in ada["segments"]] == ["vip", "gold", "subscriber"]
    assert ada["segments"][1] == {"key": "gold", "name": "Gold tier"}
    recs_on = bucket("recs-v2", "u-ada") < 5000
    assert ada["flags"] == [
        {"key": "new-hero-rules", "enabled": True, "variant": "on", "reason": "TARGETING_MATCH"},
        {"key": "recs-v2", "enabled": recs_on, "variant": "on" if recs_on else "off", "reason": "SPLIT"},
    ]
    # and Cleo, platinum but without consent, is evaluated as an anonymous viewer
    assert cleo["segments"] == []
    assert [(f["key"], f["enabled"], f["reason"]) for f in cleo["flags"]] == [
        ("new-hero-rules", False, "DEFAULT"),
        ("recs-v2", False, "SPLIT"),
    ]
    assert visitor["segments"] == []
    assert visitor["anonymousId"] == "a-7"


async def test_a_placement_orders_by_priority_then_key_and_takes_its_limit(app: RunningApp) -> None:
    # given a placement with blocks of different priorities, one not for this viewer, and one elsewhere
    await given(
        app,
        bundle(
            placements=[placement("side"), placement("top", limit=2), placement("many")],
            blocks=[
                block("a", placements=[placed("side", 5), placed("top", 1)]),
                block("b", placements=[placed("side", 50), placed("top", 3)]),
                block("c", placements=[placed("side", 50), placed("top", 2)]),
                block("d", placements=[placed("side")]),
                block("e", placements=[placed("side", 99)], audience=context("country", "eq", "FR")),
                *(block(f"m-{n:02d}", placements=[placed("many")]) for n in range(12)),
            ],
        ),
    )
    viewer = {"country": "DE"}

    # then blocks come by priority (higher first), then key, without the ineligible one
    assert [b["key"] for b in await placement_blocks(app, "side", viewer)] == ["b", "c", "a", "d"]
    # and the placement's own limit applies, else 10, unless the query gives one
    assert [b["key"] for b in await placement_blocks(app, "top", viewer)] == ["b", "c"]
    assert [b["key"] for b in await placement_blocks(app, "many", viewer)] == [f"m-{n:02d}" for n in range(10)]
    assert [b["key"] for b in await placement_blocks(app, "side", viewer, limit=1)] == ["b"]
    assert [b["key"] for b in await placement_blocks(app, "top", viewer, limit=3)] == ["b", "c", "a"]
    assert await placement_blocks(app, "side", viewer, limit=0) == []
    # and the French viewer sees the block meant for them first
    assert [b["key"] for b in await placement_blocks(app, "side", {"country": "FR"}, limit=2)] == ["e", "b"]


async def test_an_ineligible_block_is_null(app: RunningApp) -> None:
    # given a block for France only, and one behind a flag that is off
    await given(
        app,
        bundle(
            flags=[flag("off", enabled=False)],
            blocks=[
                block("french", audience=context("country", "eq", "FR")),
                block("flagged", flag="off"),
            ],
        ),
    )

    # then block() answers null, without an error, to the viewers it is not for
    assert await query_block(app, "french", {"country": "DE"}) is None
    assert (await query_block(app, "french", {"country": "FR"}))["key"] == "french"
    assert await query_block(app, "flagged", {"userId": "u-1"}) is None
    assert await query_block(app, "no-such-block") is None


async def test_an_unknown_placement_is_null_without_an_error(app: RunningApp) -> None:
    await given(app, demo_bundle())

    reply = await query_placement(app, "no-such-placement")

    assert reply.status == 200
    assert reply.body == {"data": {"placement": None}}


async def test_a_negative_limit_is_a_bad_user_input(app: RunningApp) -> None:
    await given(app, demo_bundle())

    reply = await query_placement(app, "home-hero", limit=-1)

    assert_request_error(reply, 400, "BAD_USER_INPUT")
    assert reply.errors[0]["extensions"]["argumentPath"] == "limit"


# -- what is inferred from the request ------------------------------------------------------------

DEVICES = ("MOBILE", "TABLET", "DESKTOP", "BOT")
COUNTRIES = ("DE", "AT", "US")


def device_and_country_bundle() -> dict[str, Any]:
    """A block whose variant names the viewer's device, and one whose variant names the country."""
    return bundle(
        blocks=[
            block("by-device", variants=[variant(d.lower(), when=context("device", "eq", d)) for d in DEVICES]),
            block("by-country", variants=[variant(c.lower(), when=context("country", "eq", c)) for c in COUNTRIES]),
        ]
    )


async def test_the_device_is_inferred_from_the_user_agent(app: RunningApp) -> None:
    await given(app, device_and_country_bundle())

    for user_agent, device in ((IPHONE, "mobile"), (IPAD, "tablet"), (DESKTOP_CHROME, "desktop"), (GOOGLEBOT, "bot")):
        # when the viewer says nothing about its device
        seen = await variant_of(app, "by-device", {"userId": "u-1"}, headers={"User-Agent": user_agent})

        # then the User-Agent decides
        assert seen == device, user_agent


async def test_the_country_is_inferred_from_trusted_cdn_headers(app: RunningApp) -> None:
    await given(app, device_and_country_bundle())

    # then a CDN's country header (any case) is the viewer's country, in the configured order
    assert await variant_of(app, "by-country", headers={"CF-IPCountry": "de"}) == "de"
    assert await variant_of(app, "by-country", headers={"CloudFront-Viewer-Country": "at"}) == "at"
    both = {"CF-IPCountry": "US", "CloudFront-Viewer-Country": "AT"}
    assert await variant_of(app, "by-country", headers=both) == "us"
    # and without one the country is unknown
    assert await variant_of(app, "by-country") == "default"


async def test_viewer_arguments_win_over_what_the_request_says(app: RunningApp) -> None:
    await given(app, device_and_country_bundle())
    headers = {"User-Agent": IPHONE, "CF-IPCountry": "DE"}

    # when the query names a device and a (lower-case) country
    device = await variant_of(app, "by-device", {"device": "DESKTOP"}, headers=headers)
    country = await variant_of(app, "by-country", {"country": "us"}, headers=headers)

    # then they win over the headers, and the country is upper-cased
    assert (device, country) == ("desktop", "us")


async def test_now_is_the_injected_clock_and_schedules_open_and_close_with_it(app: RunningApp) -> None:
    # given the demo's winter sale, scheduled from 2026-12-20 until 2027-01-07, and the clock at 2026-11-20
    await given(app, demo_bundle())
    assert await query_block(app, "winter-sale") is None

    # when the clock reaches the start of the sale
    app.clock.advance(days=29, hours=12)

    # then the sale shows, first in its placement
    assert (await query_block(app, "winter-sale"))["key"] == "winter-sale"
    assert (await placement_blocks(app, "product-page"))[0]["key"] == "winter-sale"

    # and at its end it is gone again
    app.clock.advance(days=18)
    assert await query_block(app, "winter-sale") is None


async def test_an_at_without_an_offset_is_utc(app: RunningApp) -> None:
    await given(app, demo_bundle())

    assert (await query_block(app, "winter-sale", {"at": "2026-12-20T00:00:00"}))["key"] == "winter-sale"
    assert await query_block(app, "winter-sale", {"at": "2026-12-19T23:59:59"}) is None
    assert await query_block(app, "winter-sale", {"at": "2026-12-20T00:30:00+01:00"}) is None  # 23:30 UTC
    assert (await query_block(app, "winter-sale", {"at": "2026-12-20T00:30:00-01:00"}))["key"] == "winter-sale"


async def test_local_hours_are_those_of_the_viewers_time_zone(app: RunningApp) -> None:
    # given the demo's newsletter card, whose evening variant is for 18:00-23:59 local time; 12:00 UTC now
    await given(app, demo_bundle())

    assert await variant_of(app, "newsletter-signup") == "default"
    assert await variant_of(app, "newsletter-signup", {"timezone": "Asia/Tokyo"}) == "evening"  # 21:00
    assert await variant_of(app, "newsletter-signup", {"timezone": "America/New_York"}) == "default"  # 07:00


async def test_a_time_zone_that_is_not_iana_is_a_bad_user_input(app: RunningApp) -> None:
    await given(app, demo_bundle())
    viewer = {"userId": "u-ada", "timezone": "Mars/Olympus_Mons"}

    for reply in (
        await query_placement(app, "home-hero", viewer),
        await app.graphql(BLOCK_QUERY, {"key": "hero-main", "viewer": viewer}),
        await app.graphql(VIEWER, {"viewer": viewer}),
    ):
        assert_request_error(reply, 400, "BAD_USER_INPUT")
        (error,) = reply.errors
        assert error["extensions"]["argumentPath"] == "viewer.timezone"
        assert error["message"].startswith("viewer.timezone:")


# -- drafts and locales ---------------------------------------------------------------------------


async def test_a_preview_key_sees_drafts_and_a_delivery_key_does_not(app: RunningApp) -> None:
    # given the demo, whose home hero has a draft teaser of higher priority
    await given(app, demo_bundle())

    delivered = await placement_blocks(app, "home-hero")
    previewed = await placement_blocks(app, "home-hero", scope="preview")

    assert [b["key"] for b in delivered] == ["hero-main"]
    assert [b["key"] for b in previewed] == ["spring-teaser"]
    assert (previewed[0]["version"], previewed[0]["publishedAt"]) == (0, None)
    assert await query_block(app, "spring-teaser") is None
    assert (await query_block(app, "spring-teaser", scope="preview"))["fields"]["title"] == "Spring is coming"


async def test_a_preview_key_sees_the_draft_edit_of_a_published_block(app: RunningApp) -> None:
    # given the published hero, edited but not published again
    await given(app, demo_bundle())
    edited = await mutate(
        app,
        "mutation($f: JSON) { updateBlock(key: \"hero-main\", input: {fields: $f}) { ok errors { path message } } }",
        {"f": {"title": "Draft title"}},
    )
    assert edited["ok"], edited

    # then delivery still serves version 1, and preview the draft
    delivered = await query_block(app, "hero-main")
    previewed = await query_block(app, "hero-main", scope="preview")
    assert (delivered["fields"]["title"], delivered["version"]) == ("Welcome to the shop", 1)
    assert (previewed["fields"], previewed["version"]) == ({"title": "Draft title"}, 0)


async def test_locales_fall_back_along_the_chain_then_to_the_default(app: RunningApp) -> None:
    # given the demo's hero in en-US and de-DE, and fallbacks de-AT -> de-DE -> en-US
    await given(app, demo_bundle())

    austrian = await query_block(app, "hero-main", {"locale": "de-AT"})
    german = await query_block(app, "hero-main", {"locale": "de-DE"})
    french = await query_block(app, "hero-main", {"locale": "fr-FR"})

    assert (austrian["locale"], austrian["fields"]["title"]) == ("de-DE", "Willkommen im Shop")
    assert "falling back from de-AT" in austrian["decision"]["trace"][0]
    assert german["locale"] == "de-DE"
    assert french["locale"] == "en-US"
    assert (await query_block(app, "hero-main"))["locale"] == "en-US"


async def test_a_locale_that_is_only_a_draft_falls_back_for_delivery(app: RunningApp) -> None:
    # given a de-AT hero that is only a draft
    await given(app, demo_bundle())
    created = await mutate(
        app,
        """mutation($f: JSON) { createBlock(input: {key: "hero-main", type: "hero", locale: "de-AT", fields: $f}) {
             ok errors { path message } } }""",
        {"f": {"title": "Servus"}},
    )
    assert created["ok"], created

    # then delivery falls back to de-DE and preview shows the draft
    delivered = await query_block(app, "hero-main", {"locale": "de-AT"})
    previewed = await query_block(app, "hero-main", {"locale": "de-AT"}, scope="preview")
    assert (delivered["locale"], delivered["fields"]["title"]) == ("de-DE", "Willkommen im Shop")
    assert (previewed["locale"], previewed["fields"]["title"]) == ("de-AT", "Servus")


# -- blocks(): filters and pages ------------------------------------------------------------------


async def test_blocks_filter_by_tags_any_or_all_and_by_type(app: RunningApp) -> None:
    # given blocks with tags and types, one not for this viewer and one a draft
    await given(
        app,
        bundle(
            blocks=[
                block("a", tags=["x", "y"]),
                block("b", tags=["x"], type="banner"),
                block("c", tags=["y"]),
                block("d", tags=["x", "y"], type="banner"),
                block("e", tags=["z"]),
                block("f", tags=["x"], audience=context("country", "eq", "FR")),
                block("g", tags=["x"], status="draft"),
            ]
        ),
    )
    viewer = {"country": "DE"}

    assert await keys_of_blocks(app, viewer=viewer) == ["a", "b", "c", "d", "e"]
    assert await keys_of_blocks(app, tags=["x"], viewer=viewer) == ["a", "b", "d"]
    assert await keys_of_blocks(app, tags=["x", "y"], viewer=viewer) == ["a", "b", "c", "d"]
    assert await keys_of_blocks(app, tags=["x", "y"], match="ALL", viewer=viewer) == ["a", "d"]
    assert await keys_of_blocks(app, tags=["x", "y"], match="ANY", viewer=viewer) == ["a", "b", "c", "d"]
    assert await keys_of_blocks(app, type="hero", viewer=viewer) == ["a", "c", "e"]
    assert await keys_of_blocks(app, tags=["x", "y"], match="ALL", type="banner", viewer=viewer) == ["d"]
    assert await keys_of_blocks(app, tags=["nothing"], viewer=viewer) == []
    assert await keys_of_blocks(app, tags=["x"], viewer={"country": "FR"}) == ["a", "b", "d", "f"]
    assert await keys_of_blocks(app, "preview", tags=["x"], viewer=viewer) == ["a", "b", "d", "g"]


async def test_blocks_pages_walk_every_block_once(app: RunningApp) -> None:
    # given seven blocks
    keys = [f"p-{n}" for n in range(7)]
    await given(app, bundle(blocks=[block(k) for k in keys]))

    # when a client walks them two at a time
    seen: list[str] = []
    pages: list[bool] = []
    after: str | None = None
    while True:
        connection = ok(await query_blocks(app, first=2, after=after))["blocks"]
        edges = connection["edges"]
        seen.extend(edge["node"]["key"] for edge in edges)
        pages.append(connection["pageInfo"]["hasNextPage"])
        assert connection["pageInfo"]["endCursor"] == edges[-1]["cursor"]
        for edge in edges:
            assert edge["node"]["key"] not in edge["cursor"]  # opaque
        if not connection["pageInfo"]["hasNextPage"]:
            break
        after = connection["pageInfo"]["endCursor"]

    # then every block comes once, in order, with no gap
    assert seen == keys
    assert pages == [True, True, True, False]
    # and a page that holds the rest exactly has no next page
    whole = (await query_blocks(app, first=7)).data["blocks"]
    assert (len(whole["edges"]), whole["pageInfo"]["hasNextPage"]) == (7, False)
    assert (await query_blocks(app, first=6)).data["blocks"]["pageInfo"]["hasNextPage"] is True
    # and an empty page has no cursor
    empty = (await query_blocks(app, first=0)).data["blocks"]
    assert empty == {"edges": [], "pageInfo": {"hasNextPage": True, "endCursor": None}}


@pytest.mark.parametrize(
    ("arguments", "path"),
    [
        ({"after": "not-a-cursor"}, "after"),
        ({"after": base64.urlsafe_b64encode(b"page:3").decode()}, "after"),
        ({"first": -1}, "first"),
        ({"first": 101}, "first"),
    ],
    ids=["garbage-cursor", "foreign-cursor", "first-negative", "first-too-large"],
)
async def test_bad_paging_arguments_are_bad_user_input(app: RunningApp, arguments: dict[str, Any], path: str) -> None:
    await given(app, bundle(blocks=[block("a")]))

    reply = await query_blocks(app, **arguments)

    assert_request_error(reply, 400, "BAD_USER_INPUT")
    assert reply.errors[0]["extensions"]["argumentPath"] == path


# -- keys and scopes ------------------------------------------------------------------------------

SMALL_QUERY = '{ placement(key: "home-hero") { key } }'


async def test_a_request_without_a_key_is_unauthenticated(app: RunningApp) -> None:
    reply = await app.graphql(SMALL_QUERY, key=None)

    assert_request_error(reply, 401, "UNAUTHENTICATED")
    assert reply.headers["www-authenticate"].startswith("Bearer")
    assert "data" not in reply.body


async def test_an_unknown_key_is_unauthenticated(app: RunningApp) -> None:
    for raw in ("tess_delivery_no-such-key", "not even a key"):
        reply = await app.graphql(SMALL_QUERY, key=raw)

        assert_request_error(reply, 401, "UNAUTHENTICATED")
        assert "www-authenticate" in reply.headers


async def test_a_revoked_key_is_unauthenticated(app: RunningApp) -> None:
    # given a delivery key that works
    await given(app, demo_bundle())
    assert (await app.graphql(SMALL_QUERY)).status == 200

    # when it is revoked (and the key cache expires)
    async with app.services.sessions() as session, session.begin():
        repo = ApiKeyRepository(session)
        record = await repo.find_by_hash(hash_key(app.keys["delivery"]))
        assert record is not None
        assert await repo.revoke(record.id, app.clock())
    app.services.keys.forget()

    # then it is refused
    assert_request_error(await app.graphql(SMALL_QUERY), 401, "UNAUTHENTICATED")


async def test_a_key_created_while_the_server_runs_works_at_once(app: RunningApp) -> None:
    await given(app, demo_bundle())

    async with app.services.sessions() as session, session.begin():
        new = await create_key(session, scope="preview", name="made-while-running")
    reply = await app.graphql(SMALL_QUERY, key=new.raw)

    assert reply.status == 200, reply.body
    assert reply.data == {"placement": {"key": "home-hero"}}


async def test_keys_of_the_wrong_scope_are_forbidden(app: RunningApp) -> None:
    # an admin key on the delivery endpoint, a delivery key on the admin endpoint
    assert_request_error(await app.graphql(SMALL_QUERY, key="admin"), 403, "FORBIDDEN")
    assert_request_error(await app.graphql("{ placements { key } }", path="/admin/graphql"), 403, "FORBIDDEN")


async def test_an_ingest_key_may_not_read_content(app: RunningApp) -> None:
    await given(app, demo_bundle())

    reply = await app.graphql(SMALL_QUERY, key="ingest")

    assert_request_error(reply, 403, "FORBIDDEN")
    assert reply.data == {"placement": None}


# -- GraphQL over HTTP ----------------------------------------------------------------------------


async def test_a_query_can_be_sent_with_get(app: RunningApp) -> None:
    await given(app, demo_bundle())

    response = await app.client.get(
        "/graphql",
        params={"query": SMALL_QUERY},
        headers={"Authorization": f"Bearer {app.keys['delivery']}"},
    )

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"data": {"placement": {"key": "home-hero"}}}


MALFORMED = [
    pytest.param("POST", {"content": b'{"query": "{ __typename }"', "ctype": "application/json"}, 400, "BAD_REQUEST",
                 id="invalid-json"),
    pytest.param("POST", {"content": b"{ __typename }", "ctype": "text/plain"}, 400, "BAD_REQUEST",
                 id="unsupported-content-type"),
    pytest.param("POST", {"json": {"variables": {}}}, 400, "BAD_REQUEST", id="no-query"),
    pytest.param("PUT", {"json": {"query": "{ __typename }"}}, 405, "BAD_REQUEST", id="put"),
    pytest.param("POST", {"json": {"query": "{ __typename }", "padding": "x" * 1_000_001}}, 413, "BAD_REQUEST",
                 id="too-large"),
    pytest.param("POST", {"json": {"query": '{ placement(key: "home-hero" { key } }'}}, 400, "GRAPHQL_PARSE_FAILED",
                 id="syntax-error"),
    pytest.param("POST", {"json": {"query": "{ placement(key: \"home-hero\") { nope } }"}}, 400,
                 "GRAPHQL_VALIDATION_FAILED", id="unknown-field"),
    pytest.param("POST", {"json": {"query": "{ placement(key: 1) { key } }"}}, 400, "GRAPHQL_VALIDATION_FAILED",
                 id="wrong-argument-type"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "request_body", "status", "code"), MALFORMED)
async def test_a_malformed_request_gets_a_graphql_shaped_json_error(
    app: RunningApp, method: str, request_body: dict[str, Any], status: int, code: str
) -> None:
    headers = {"Authorization": f"Bearer {app.keys['delivery']}"}
    if "ctype" in request_body:
        headers["Content-Type"] = request_body.pop("ctype")

    response = await app.client.request(method, "/graphql", headers=headers, **request_body)

    reply = Reply(response.status_code, response.json(), response.headers)
    assert_request_error(reply, status, code)
    assert reply.data is None


# -- events --------------------------------------------------------------------------


async def test_track_takes_delivery_and_ingest_keys(app: RunningApp) -> None:
    mutation = 'mutation { track(events: [{type: "page_view", userId: "u-1"}]) { accepted rejected errors } }'

    for scope in ("delivery", "ingest"):
        reply = await app.graphql(mutation, key=scope)

        assert reply.status == 200
        assert reply.data == {"track": {"accepted": 1, "rejected": 0, "errors": []}}

    forbidden = await app.graphql(mutation, key="preview")
    assert (forbidden.status, forbidden.codes()) == (403, ["FORBIDDEN"])


async def websocket(app: RunningApp, messages: Sequence[Mapping[str, Any]], *, key: str | None) -> list[Any]:
    """One graphql-transport-ws conversation, in-process: connect, send ``messages``, and collect what
    the server sends until every subscription completed or the server closed the socket."""
    inbox = [{"type": "websocket.receive", "text": json.dumps(m)} for m in messages]
    waiting = {m["id"] for m in messages if m.get("type") == "subscribe"}
    finished = asyncio.Event()
    sent: list[Any] = []
    connected = False

    async def receive() -> dict[str, Any]:
        nonlocal connected
        if not connected:
            connected = True
            return {"type": "websocket.connect"}
        if inbox:
            return inbox.pop(0)
        await finished.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.close":
            sent.append({"close": message["code"]})
            finished.set()
        elif message["type"] == "websocket.send":
            frame = json.loads(message.get("text") or message["bytes"])
            sent.append(frame)
            if frame.get("type") in ("complete", "error"):
                waiting.discard(frame["id"])
                if not waiting:
                    finished.set()

    headers = [(b"host", b"tessera.test"), (b"sec-websocket-protocol", b"graphql-transport-ws")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {app.keys[key]}".encode()))
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": "/graphql",
        "raw_path": b"/graphql",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "subprotocols": ["graphql-transport-ws"],
        "client": ("127.0.0.1", 50000),
        "server": ("tessera.test", 80),
        "state": {},
    }
    await asyncio.wait_for(app.app(scope, receive, send), timeout=5)
    return sent


async def test_subscriptions_answer_not_implemented(app: RunningApp) -> None:
    await given(app, demo_bundle())
    subscriptions = {
        "1": 'subscription { placement(key: "home-hero") { key } }',
        "2": 'subscription { block(key: "hero-main") { key } }',
        "3": 'subscription { viewer(viewer: {userId: "u-ada"}) { userId } }',
    }
    messages = [{"type": "connection_init"}] + [
        {"id": id_, "type": "subscribe", "payload": {"query": query}} for id_, query in subscriptions.items()
    ]

    frames = await websocket(app, messages, key="delivery")

    assert frames[0] == {"type": "connection_ack"}
    codes: dict[str, list[str]] = {}
    for frame in frames[1:]:
        if frame["type"] == "next":
            codes.setdefault(frame["id"], []).extend(e["extensions"]["code"] for e in frame["payload"]["errors"])
        elif frame["type"] == "error":
            codes.setdefault(frame["id"], []).extend(e["extensions"]["code"] for e in frame["payload"])
    assert codes == {id_: ["NOT_IMPLEMENTED"] for id_ in subscriptions}


async def test_a_subscription_without_a_key_or_with_the_wrong_one_is_closed(app: RunningApp) -> None:
    assert await websocket(app, [{"type": "connection_init"}], key=None) == [{"close": 4401}]
    assert await websocket(app, [{"type": "connection_init"}], key="admin") == [{"close": 4403}]


async def test_a_subscription_over_plain_http_is_a_bad_request(app: RunningApp) -> None:
    reply = await app.graphql('subscription { block(key: "hero-main") { key } }')

    assert_request_error(reply, 400, "BAD_REQUEST")
    assert "WebSocket" in reply.errors[0]["message"]


# -- read consistency -----------------------------------------------------------------------------


async def test_a_publish_shows_in_the_very_next_query(app: RunningApp) -> None:
    # given a new block saved as a draft in the home hero
    await given(app, demo_bundle())
    created = await mutate(
        app,
        """mutation {
             createBlock(input: {key: "hero-new", type: "hero", placements: [{key: "home-hero", priority: 50}]}) {
               ok errors { path message } } }""",
    )
    assert created["ok"], created
    assert [b["key"] for b in await placement_blocks(app, "home-hero")] == ["hero-main"]

    # when it is published
    published = await mutate(app, 'mutation { publishBlock(key: "hero-new") { ok result { version } } }')
    assert published == {"ok": True, "result": {"version": 1}}

    # then the next query serves it
    assert [b["key"] for b in await placement_blocks(app, "home-hero")] == ["hero-new"]


async def test_a_rollout_change_and_a_kill_switch_show_in_the_very_next_query(app: RunningApp) -> None:
    # given a variant behind a flag at 0%, and a block behind the same flag
    await given(
        app,
        bundle(
            flags=[flag("beta", rollout=0)],
            blocks=[block("hero", variants=[variant("beta", flag="beta")]), block("gated", flag="beta")],
        ),
    )
    viewer = {"userId": "u-1"}
    assert await variant_of(app, "hero", viewer) == "default"
    assert await query_block(app, "gated", viewer) is None

    # when the rollout goes to 100%
    changed = await mutate(app, 'mutation { updateFlag(key: "beta", input: {rollout: 100}) { ok } }')
    assert changed == {"ok": True}

    # then the next query has the flag on
    assert await variant_of(app, "hero", viewer) == "beta"
    assert (await query_block(app, "gated", viewer))["key"] == "gated"

    # when the flag is switched off
    killed = await mutate(app, 'mutation { updateFlag(key: "beta", input: {enabled: false}) { ok } }')
    assert killed == {"ok": True}

    # then the next query has it off, and says why
    assert await variant_of(app, "hero", viewer) == "default"
    assert await query_block(app, "gated", viewer) is None
    assert (await viewer_state(app, viewer))["flags"] == [
        {"key": "beta", "enabled": False, "variant": "off", "reason": "DISABLED"}
    ]

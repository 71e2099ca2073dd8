"""Choosing what a viewer sees (rules.md "Choosing what a viewer sees", "Bucketing", Fine print; bundle.md):
eligibility, variants, experiment arms, placements, block lists, decisions and traces, flags, consent and
segment order. Buckets are the test vectors of rules.md or were found with factories.independent_bucket."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from factories import (
    NOW,
    block,
    draft_only,
    evaluation,
    event,
    example_snapshot,
    independent_bucket,
    published,
    snapshot,
    t,
    viewer,
)

from content.decide import DEFAULT, DISABLED, ERROR, EXPERIMENT, RULE_MATCH, SPLIT, STATIC, TARGETING_MATCH
from content.snapshot import Snapshot

LOCALES = {"default": "en-US", "fallbacks": {"de-AT": "de-DE", "de-DE": "en-US"}}
GOLD = {"key": "gold", "rule": {"trait": "tier", "op": "eq", "value": "gold"}}
MOBILE = {"context": "device", "op": "eq", "value": "MOBILE"}


def title(snap: Snapshot, key: str = "b", *, preview: bool = False, **viewer_kwargs: Any) -> str | None:
    """The title the viewer sees in block ``key``, or None when the block is not eligible."""
    at = viewer_kwargs.pop("at", NOW)
    traits = viewer_kwargs.pop("traits", None)
    resolved = evaluation(snap, viewer(at, **viewer_kwargs), traits=traits).block(key, preview=preview)
    return None if resolved is None else resolved.fields["title"]


# ==================================================================================================
# Eligibility: published or preview


def test_a_draft_is_not_delivered_but_a_preview_sees_it() -> None:
    snap = snapshot(blocks=[draft_only(block("b", fields={"title": "draft"}))])
    assert title(snap) is None
    resolved = evaluation(snap).block("b", preview=True)
    assert resolved is not None
    assert resolved.fields == {"title": "draft"}
    assert resolved.block.version == 0


def test_delivery_sees_the_published_version_and_preview_the_draft() -> None:
    live = block("b", fields={"title": "live"})
    snap = snapshot(blocks=[published(live, version=3, draft=block("b", fields={"title": "next"}))])
    delivered = evaluation(snap).block("b")
    assert delivered is not None
    assert (delivered.fields["title"], delivered.block.version) == ("live", 3)
    assert title(snap, preview=True) == "next"


def test_an_unchanged_published_block_is_the_same_in_preview() -> None:
    snap = snapshot(blocks=[published(block("b", fields={"title": "live"}), version=2)])
    previewed = evaluation(snap).block("b", preview=True)
    assert previewed is not None
    assert (previewed.fields["title"], previewed.block.version) == ("live", 2)


def test_an_unknown_block_is_null() -> None:
    assert evaluation(snapshot(blocks=[block("b")])).block("nope") is None


# ==================================================================================================
# Eligibility: schedule.from <= now < schedule.until


@pytest.mark.parametrize(
    ("at", "shown"),
    [
        ("2025-12-31T23:59:59+00:00", False),
        ("2026-01-01T00:00:00+00:00", True),  # from is inclusive
        ("2026-01-15T00:00:00+00:00", True),
        ("2026-01-31T23:59:59+00:00", True),
        ("2026-02-01T00:00:00+00:00", False),  # until is exclusive
        ("2026-01-31T23:30:00-01:00", False),  # = 2026-02-01T00:30Z
    ],
)
def test_schedule_boundaries(at: str, shown: bool) -> None:
    schedule = {"from": "2026-01-01T00:00:00Z", "until": "2026-02-01T01:00:00+01:00"}  # until = 00:00Z
    snap = snapshot(blocks=[block("b", schedule=schedule)])
    assert (title(snap, at=t(at)) == "b") is shown


@pytest.mark.parametrize(
    ("schedule", "at", "shown"),
    [
        ({"from": "2026-01-01T00:00:00Z"}, "2100-01-01T00:00:00+00:00", True),
        ({"from": "2026-01-01T00:00:00Z", "until": None}, "2025-12-31T23:59:59+00:00", False),
        ({"until": "2026-01-01T00:00:00Z"}, "2000-01-01T00:00:00+00:00", True),
        ({"until": "2026-01-01T00:00:00Z"}, "2026-01-01T00:00:00+00:00", False),
        ({"from": None, "until": None}, "2026-01-01T00:00:00+00:00", True),
        ({"from": "2026-01-01T00:00:00"}, "2026-01-01T00:00:00+00:00", True),  # no offset: UTC
        ({"from": "2026-01-01T00:00:00"}, "2025-12-31T23:59:59+00:00", False),
    ],
)
def test_each_schedule_bound_is_optional(schedule: dict[str, Any], at: str, shown: bool) -> None:
    snap = snapshot(blocks=[block("b", schedule=schedule)])
    assert (title(snap, at=t(at)) == "b") is shown


# ==================================================================================================
# Eligibility: locale, fallbacks and drafts


def localised() -> Snapshot:
    return snapshot(
        locales=LOCALES,
        blocks=[
            block("b", locale="en-US", fields={"title": "en"}),
            block("b", locale="de-DE", fields={"title": "de"}),
            block("only-at", locale="de-AT", fields={"title": "at"}),
        ],
    )


@pytest.mark.parametrize(
    ("locale", "expected"),
    [("de-DE", "de"), ("de-AT", "de"), ("en-US", "en"), ("fr-FR", "en"), (None, "en"), ("", "en")],
)
def test_a_block_is_looked_up_in_the_viewer_locale_then_its_fallbacks_then_the_default(
    locale: str | None, expected: str
) -> None:
    assert title(localised(), locale=locale) == expected


@pytest.mark.parametrize(
    ("locale", "expected"), [("de-AT", "at"), ("de-DE", None), ("en-US", None), (None, None)]
)
def test_a_block_only_in_one_locale_is_seen_only_from_that_locale(
    locale: str | None, expected: str | None
) -> None:
    assert title(localised(), "only-at", locale=locale) == expected


def test_a_draft_in_the_viewer_locale_falls_back_for_delivery_but_not_for_preview() -> None:
    # given a published en-US block and a German version that is only a draft
    snap = snapshot(
        locales=LOCALES,
        blocks=[
            block("b", locale="en-US", fields={"title": "en"}),
            draft_only(block("b", locale="de-DE", fields={"title": "de"})),
        ],
    )
    # then a de-AT viewer gets en-US from delivery (de-AT -> de-DE: a draft -> en-US) and the draft in preview
    assert title(snap, locale="de-AT") == "en"
    assert title(snap, locale="de-DE") == "en"
    assert title(snap, locale="de-AT", preview=True) == "de"


def test_a_block_without_a_locale_is_in_the_default_locale() -> None:
    snap = snapshot(locales={"default": "de-DE"}, blocks=[block("b", fields={"title": "ohne"})])
    assert title(snap, locale="de-DE") == "ohne"
    assert title(snap, locale="fr-FR") == "ohne"
    assert title(snap) == "ohne"
    resolved = evaluation(snap).block("b")
    assert resolved is not None
    assert resolved.block.locale == "de-DE"


def test_the_trace_says_when_a_block_falls_back_from_the_viewer_locale() -> None:
    resolved = evaluation(localised(), viewer(locale="de-AT")).block("b")
    assert resolved is not None
    assert resolved.block.locale == "de-DE"
    assert "falling back from de-AT" in resolved.decision.trace[0]


def test_the_version_in_the_viewer_locale_decides_even_when_it_is_not_eligible() -> None:
    # Lookup picks the first *published* version along the chain (rules.md, "Locale and drafts");
    # only publication makes it fall back. A German version scheduled for later hides the block
    # from German viewers rather than showing them the English one meanwhile.
    snap = snapshot(
        locales=LOCALES,
        blocks=[
            block("b", locale="en-US", fields={"title": "en"}),
            block("b", locale="de-DE", fields={"title": "de"}, schedule={"from": "2027-01-01T00:00:00Z"}),
        ],
    )
    assert title(snap, locale="de-DE") is None
    assert title(snap, locale="de-DE", at=t("2027-01-01T00:00:00+00:00")) == "de"
    assert title(snap, locale="en-US") == "en"


# ==================================================================================================
# Eligibility: the block's flag and audience


def test_a_block_behind_a_disabled_flag_is_not_eligible() -> None:
    for flag, shown in [
        ({"key": "beta"}, False),
        ({"key": "beta", "enabled": False}, False),
        ({"key": "beta", "enabled": True}, True),
    ]:
        snap = snapshot(flags=[flag], blocks=[block("b", flag="beta")])
        assert (title(snap) == "b") is shown


def test_a_block_behind_a_rollout_follows_the_viewer_bucket() -> None:
    # bucket("new-hero-rules", "u-1") = 635 (rules.md): in a 6.36% rollout (635 < 636), out of 6.35%
    assert independent_bucket("new-hero-rules", "u-1") == 635
    for rollout, shown in [(6.36, True), (6.35, False)]:
        flag = {"key": "new-hero-rules", "enabled": True, "rollout": rollout}
        snap = snapshot(flags=[flag], blocks=[block("b", flag="new-hero-rules")])
        assert (title(snap, user_id="u-1") == "b") is shown


def test_a_block_behind_a_flag_with_an_audience() -> None:
    flag = {"key": "gold-only", "enabled": True, "audience": {"segment": "gold"}}
    snap = snapshot(segments=[GOLD], flags=[flag], blocks=[block("b", flag="gold-only")])
    assert title(snap, user_id="u-1", traits={"tier": "gold"}) == "b"
    assert title(snap, user_id="u-1", traits={"tier": "silver"}) is None


@pytest.mark.parametrize(
    ("audience", "viewer_kwargs", "shown"),
    [
        (MOBILE, {"device": "MOBILE"}, True),
        (MOBILE, {"device": "DESKTOP"}, False),
        (MOBILE, {}, False),
        ({"segment": "gold"}, {"traits": {"tier": "gold"}}, True),
        ({"segment": "gold"}, {"traits": {"tier": "silver"}}, False),
        ({"all": [{"segment": "gold"}, MOBILE]}, {"traits": {"tier": "gold"}, "device": "MOBILE"}, True),
        ({"all": [{"segment": "gold"}, MOBILE]}, {"traits": {"tier": "gold"}, "device": "TABLET"}, False),
        ({"trait": "age", "op": "gte", "value": 18}, {"traits": {"age": 18}}, True),
        ({"trait": "age", "op": "gte", "value": 18}, {"traits": {"age": "18"}}, False),
        (None, {}, True),
    ],
)
def test_a_block_audience_must_be_true(audience: Any, viewer_kwargs: dict[str, Any], shown: bool) -> None:
    snap = snapshot(segments=[GOLD], blocks=[block("b", audience=audience)])
    assert (title(snap, **viewer_kwargs) == "b") is shown


# ==================================================================================================
# Variants: order, flags, conditions, defaults and the shallow merge


def test_variants_are_tried_in_order_and_the_first_taken_wins() -> None:
    doc = block(
        "b",
        variants=[
            {"key": "mobile", "when": MOBILE, "fields": {"title": "mobile"}},
            {"key": "anyone", "fields": {"title": "anyone"}},  # neither flag nor when: always taken
            {"key": "never", "fields": {"title": "never"}},
        ],
    )
    snap = snapshot(blocks=[doc])
    assert title(snap, device="MOBILE") == "mobile"
    assert title(snap, device="DESKTOP") == "anyone"
    assert title(snap) == "anyone"


def test_a_variant_needs_its_flag_on_and_its_rule_true() -> None:
    doc = block(
        "b",
        variants=[
            {"key": "both", "flag": "beta", "when": MOBILE, "fields": {"title": "both"}},
            {"key": "flag-only", "flag": "beta", "fields": {"title": "flag-only"}},
        ],
    )
    on = snapshot(flags=[{"key": "beta", "enabled": True}], blocks=[doc])
    off = snapshot(flags=[{"key": "beta", "enabled": False}], blocks=[doc])
    assert title(on, device="MOBILE") == "both"
    assert title(on, device="DESKTOP") == "flag-only"
    assert title(off, device="MOBILE") == "b"  # both skipped: the default fields
    # and the decision names the variant's flag
    resolved = evaluation(on, viewer(device="DESKTOP")).block("b")
    assert resolved is not None
    decision = resolved.decision
    assert (decision.variant, decision.reason, decision.rule, decision.flag) == (
        "flag-only",
        RULE_MATCH,
        "flag-only",
        "beta",
    )
    assert decision.trace[1:] == (
        "variant both: skipped, its rule is false",
        "variant flag-only: taken, it has no condition and flag beta is on",
    )


def test_without_a_variant_taken_the_block_shows_its_default_fields() -> None:
    snap = snapshot(
        blocks=[block("b", fields={"title": "default", "cta": "go"}, variants=[{"key": "m", "when": MOBILE}])]
    )
    resolved = evaluation(snap).block("b")
    assert resolved is not None
    assert resolved.fields == {"title": "default", "cta": "go"}
    decision = resolved.decision
    assert (decision.variant, decision.reason, decision.rule, decision.flag, decision.experiment) == (
        "default",
        DEFAULT,
        None,
        None,
        None,
    )


def test_variant_fields_are_merged_shallowly_over_the_defaults() -> None:
    defaults = {"title": "Welcome", "cta": {"label": "Shop now", "href": "/shop"}, "badge": "new"}
    doc = block("b", fields=defaults, variants=[{"key": "v", "fields": {"cta": {"label": "Go"}, "extra": 1}}])
    resolved = evaluation(snapshot(blocks=[doc])).block("b")
    assert resolved is not None
    # a key of the variant replaces the same key of the default, whole: cta loses its href
    assert resolved.fields == {"title": "Welcome", "cta": {"label": "Go"}, "badge": "new", "extra": 1}


def test_a_variant_without_fields_shows_the_defaults_under_its_own_name() -> None:
    resolved = evaluation(snapshot(blocks=[block("b", variants=[{"key": "plain"}])])).block("b")
    assert resolved is not None
    assert resolved.fields == {"title": "b"}
    assert (resolved.decision.variant, resolved.decision.reason) == ("plain", RULE_MATCH)


# ==================================================================================================
# Experiments: the first arm with bucket < floor(10000 * cumulative / total)


def split_block(**variant: Any) -> dict[str, Any]:
    return block(
        "b",
        fields={"title": "default", "cta": "buy"},
        variants=[
            {
                "key": "test",
                "experiment": "exp-split",
                "arms": [
                    {"key": "control", "weight": 1, "fields": {}},
                    {"key": "bold", "weight": 2, "fields": {"title": "bold"}},
                ],
                **variant,
            },
            {"key": "fallback", "fields": {"title": "fallback"}},
        ],
    )


@pytest.mark.parametrize(
    ("unit", "bucket", "arm", "fields"),
    [
        ("u-17241", 0, "control", {"title": "default", "cta": "buy"}),
        ("u-3366", 3_332, "control", {"title": "default", "cta": "buy"}),  # 3332 < 3333
        ("u-15095", 3_333, "bold", {"title": "bold", "cta": "buy"}),  # the first bucket of the second arm
        ("u-3912", 9_999, "bold", {"title": "bold", "cta": "buy"}),
    ],
)
def test_an_experiment_picks_the_arm_by_the_exact_formula(
    unit: str, bucket: int, arm: str, fields: dict[str, Any]
) -> None:
    # given weights 1 and 2: thresholds floor(10000/3) = 3333 and 10000
    assert independent_bucket("exp-split", unit) == bucket
    resolved = evaluation(snapshot(blocks=[split_block()]), viewer(user_id=unit)).block("b")
    assert resolved is not None
    # then the arm's fields are merged over the block's defaults
    assert resolved.fields == fields
    decision = resolved.decision
    assert (decision.variant, decision.reason, decision.rule, decision.flag, decision.experiment) == (
        arm,
        EXPERIMENT,
        "test",
        None,
        "exp-split",
    )


def test_a_listed_experiment_buckets_by_its_key_too() -> None:
    snap = snapshot(experiments=[{"key": "exp-split", "goal": {"event": "purchase"}}], blocks=[split_block()])
    resolved = evaluation(snap, viewer(user_id="u-15095")).block("b")
    assert resolved is not None
    assert resolved.decision.variant == "bold"


def test_a_viewer_without_a_unit_skips_the_experiment_variant() -> None:
    resolved = evaluation(snapshot(blocks=[split_block()]), viewer()).block("b")
    assert resolved is not None
    assert resolved.fields["title"] == "fallback"
    assert resolved.decision.rule == "fallback"
    assert resolved.decision.reason == RULE_MATCH
    assert "no unit" in resolved.decision.trace[1]
    assert "exp-split" in resolved.decision.trace[1]


def test_the_anonymous_id_is_the_unit_when_there_is_no_user_id() -> None:
    # bucket("hero-spring", "a-42") = 8994 (rules.md): with 50/50 arms (5000, 10000) it is the second arm
    doc = block(
        "b",
        variants=[
            {
                "key": "t",
                "experiment": "hero-spring",
                "arms": [{"key": "control", "weight": 50}, {"key": "bold", "weight": 50}],
            }
        ],
    )
    resolved = evaluation(snapshot(blocks=[doc]), viewer(anonymous_id="a-42")).block("b")
    assert resolved is not None
    assert resolved.decision.variant == "bold"


@pytest.mark.parametrize(
    ("stickiness", "arm"), [(None, "control"), ("userId", "control"), ("anonymousId", "bold")]
)
def test_experiment_stickiness(stickiness: str | None, arm: str) -> None:
    # given weights 7, 3 (thresholds 7000, 10000), u-1 in bucket 5645 and a-42 in bucket 8994 (rules.md)
    variant: dict[str, Any] = {
        "key": "t",
        "experiment": "hero-spring",
        "arms": [{"key": "control", "weight": 7}, {"key": "bold", "weight": 3}],
    }
    if stickiness:
        variant["stickiness"] = stickiness
    snap = snapshot(blocks=[block("b", variants=[variant])])
    resolved = evaluation(snap, viewer(user_id="u-1", anonymous_id="a-42")).block("b")
    assert resolved is not None
    # then by default the unit is u-1 (control); with anonymousId stickiness it is a-42 (bold)
    assert resolved.decision.variant == arm


def test_anonymous_id_stickiness_without_an_anonymous_id_skips_the_experiment() -> None:
    snap = snapshot(blocks=[split_block(stickiness="anonymousId")])
    resolved = evaluation(snap, viewer(user_id="u-15095")).block("b")
    assert resolved is not None
    assert resolved.decision.rule == "fallback"


def test_an_experiment_variant_also_needs_its_flag_and_rule() -> None:
    snap = snapshot(flags=[{"key": "beta", "enabled": True}], blocks=[split_block(flag="beta", when=MOBILE)])
    mobile = evaluation(snap, viewer(user_id="u-15095", device="MOBILE")).block("b")
    desktop = evaluation(snap, viewer(user_id="u-15095", device="DESKTOP")).block("b")
    assert mobile is not None
    assert desktop is not None
    assert (mobile.decision.variant, mobile.decision.flag, mobile.decision.reason) == (
        "bold",
        "beta",
        EXPERIMENT,
    )
    assert desktop.decision.variant == "fallback"


# ==================================================================================================
# Decision and trace


def test_the_trace_lists_each_variant_tried_and_why() -> None:
    doc = block(
        "b",
        variants=[
            {"key": "flagged", "flag": "beta", "fields": {"title": "flagged"}},
            {"key": "mobile", "when": MOBILE, "fields": {"title": "mobile"}},
            {
                "key": "test",
                "experiment": "exp-split",
                "arms": [{"key": "control", "weight": 1}, {"key": "bold", "weight": 2}],
            },
            {"key": "evening", "when": {"context": "local_hour", "op": "gte", "value": 18}},
            {"key": "never-tried"},
        ],
    )
    snap = snapshot(flags=[{"key": "beta", "enabled": False}], blocks=[doc])
    resolved = evaluation(snap, viewer(t("2026-11-20T19:00:00+00:00"), device="DESKTOP")).block("b")
    assert resolved is not None
    trace = resolved.decision.trace
    # a line for the block, then one per variant tried, in order, up to the one taken
    assert trace[0].startswith("block b (en-US, v1)")
    assert [line.split(":")[0] for line in trace[1:]] == [
        "variant flagged",
        "variant mobile",
        "variant test",
        "variant evening",
    ]
    assert "flag beta is off" in trace[1]
    assert "rule is false" in trace[2]
    assert "no unit" in trace[3]
    assert "taken" in trace[4]
    assert (resolved.decision.variant, resolved.decision.reason, resolved.decision.rule) == (
        "evening",
        RULE_MATCH,
        "evening",
    )


def test_the_trace_of_an_experiment_names_the_bucket_and_the_arm() -> None:
    resolved = evaluation(snapshot(blocks=[split_block()]), viewer(user_id="u-15095")).block("b")
    assert resolved is not None
    assert resolved.decision.trace[1:] == (
        "variant test: taken, it has no condition; experiment exp-split: bucket 3333 < 10000 -> arm bold",
    )


def test_the_trace_of_a_default_decision_ends_with_the_default() -> None:
    snap = snapshot(blocks=[block("b", variants=[{"key": "m", "when": MOBILE}])])
    resolved = evaluation(snap).block("b")
    assert resolved is not None
    assert resolved.decision.trace[1:] == (
        "variant m: skipped, its rule is false",
        "no variant taken: default fields",
    )


# ==================================================================================================
# The example of bundle.md, end to end

EVENING = t("2026-11-20T19:00:00+00:00")


@pytest.mark.parametrize(
    ("viewer_kwargs", "traits", "variant", "reason", "rule", "title_"),
    [
        # u-1 is gold, on mobile, and in the 25.5% rollout (bucket 635 < 2550)
        (
            {"user_id": "u-1", "device": "MOBILE"},
            {"tier": "gold"},
            "gold-mobile",
            RULE_MATCH,
            "gold-mobile",
            "Your gold offer",
        ),
        # u-2 too (bucket 98)
        (
            {"user_id": "u-2", "device": "MOBILE"},
            {"tier": "gold"},
            "gold-mobile",
            RULE_MATCH,
            "gold-mobile",
            "Your gold offer",
        ),
        # u-3 is gold on mobile but outside the rollout (bucket 3194 >= 2550): hero-spring bucket 1721 < 5000
        (
            {"user_id": "u-3", "device": "MOBILE"},
            {"tier": "gold"},
            "control",
            EXPERIMENT,
            "spring-test",
            "Welcome",
        ),
        # on desktop u-1 falls to the experiment: hero-spring bucket 5645 >= 5000, arm bold
        (
            {"user_id": "u-1", "device": "DESKTOP"},
            {"tier": "gold"},
            "bold",
            EXPERIMENT,
            "spring-test",
            "Spring is here",
        ),
        # an anonymous a-42 is not gold (flag audience false) and lands in bucket 8994: bold
        (
            {"anonymous_id": "a-42", "device": "MOBILE"},
            None,
            "bold",
            EXPERIMENT,
            "spring-test",
            "Spring is here",
        ),
        # without any id the experiment is skipped; at 12:00 UTC it is not evening: the default
        ({"device": "DESKTOP"}, None, "default", DEFAULT, None, "Welcome"),
        # and at 19:00 UTC the evening variant is taken
        ({"device": "DESKTOP", "at": EVENING}, None, "evening", RULE_MATCH, "evening", "Good evening"),
        # 19:00 UTC is 20:00 in Berlin but 14:00 in New York
        (
            {"device": "DESKTOP", "at": EVENING, "timezone": "America/New_York"},
            None,
            "default",
            DEFAULT,
            None,
            "Welcome",
        ),
    ],
)
def test_the_example_bundle(
    viewer_kwargs: dict[str, Any], traits: Any, variant: str, reason: str, rule: str | None, title_: str
) -> None:
    assert independent_bucket("new-hero-rules", "u-3") == 3_194
    assert independent_bucket("hero-spring", "u-3") == 1_721
    at = viewer_kwargs.pop("at", NOW)
    ev = evaluation(example_snapshot(), viewer(at, **viewer_kwargs), traits=traits)
    [resolved] = ev.placement("home-hero") or []
    assert (resolved.decision.variant, resolved.decision.reason, resolved.decision.rule) == (
        variant,
        reason,
        rule,
    )
    assert resolved.fields["title"] == title_
    assert resolved.fields["cta"] == {"label": "Shop now", "href": "/shop"}  # never replaced by a variant


def test_the_example_block_is_scheduled_from_2026() -> None:
    ev = evaluation(example_snapshot(), viewer(t("2025-12-31T23:59:59+00:00"), user_id="u-1"))
    assert ev.placement("home-hero") == []
    assert ev.block("hero-main") is None


# ==================================================================================================
# Placements: eligible blocks by priority (descending) then key, the first `limit`


def placed(key: str, priority: int | None, **doc: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"key": "home"} if priority is None else {"key": "home", "priority": priority}
    return block(key, placements=[entry], **doc)


def placement_snapshot(limit: int | None = None) -> Snapshot:
    placement: dict[str, Any] = {"key": "home"} if limit is None else {"key": "home", "limit": limit}
    return snapshot(
        placements=[placement, {"key": "footer"}],
        blocks=[
            placed("c", 10),
            placed("a", 10),
            placed("b", 20),
            placed("d", None),  # no priority: 0
            placed("e", 10, audience=MOBILE),  # not eligible on desktop
            placed("f", -1),
            block("g", placements=[{"key": "footer", "priority": 99}]),  # another placement
            block("h"),  # in no placement
        ],
    )


def keys_in(
    snap: Snapshot, placement: str = "home", limit: int | None = None, **viewer_kwargs: Any
) -> list[str] | None:
    resolved = evaluation(snap, viewer(**viewer_kwargs)).placement(placement, limit=limit)
    return None if resolved is None else [r.block.key for r in resolved]


def test_a_placement_orders_eligible_blocks_by_priority_then_key() -> None:
    snap = placement_snapshot()
    assert keys_in(snap, device="DESKTOP") == ["b", "a", "c", "d", "f"]
    assert keys_in(snap, device="MOBILE") == ["b", "a", "c", "e", "d", "f"]
    assert keys_in(snap, "footer") == ["g"]


def test_a_placement_shows_the_first_limit_eligible_blocks() -> None:
    # given the placement's own limit of 3
    snap = placement_snapshot(limit=3)
    assert keys_in(snap, device="DESKTOP") == ["b", "a", "c"]
    # and the ineligible block does not take a place: on mobile e is eligible and is 4th
    assert keys_in(snap, device="MOBILE") == ["b", "a", "c"]
    # a limit given by the caller replaces the placement's
    assert keys_in(snap, limit=1, device="DESKTOP") == ["b"]
    assert keys_in(snap, limit=5, device="DESKTOP") == ["b", "a", "c", "d", "f"]


def test_a_placement_without_a_limit_shows_10() -> None:
    blocks = [placed(f"b{i:02d}", 0) for i in range(12)]
    snap = snapshot(placements=[{"key": "home"}], blocks=blocks)
    assert keys_in(snap) == [f"b{i:02d}" for i in range(10)]


def test_an_unknown_placement_is_null_and_an_empty_one_is_empty() -> None:
    snap = placement_snapshot()
    assert keys_in(snap, "nope") is None
    assert keys_in(snapshot(placements=[{"key": "home"}])) == []


def test_a_placement_uses_the_block_version_of_the_viewer_locale() -> None:
    # given the German version of x not placed in home, and the English one placed
    snap = snapshot(
        locales=LOCALES,
        placements=[{"key": "home"}],
        blocks=[
            placed("x", 5, locale="en-US", fields={"title": "en"}),
            block("x", locale="de-DE", fields={"title": "de"}),
            placed("y", 1, locale="de-DE", fields={"title": "y-de"}),
        ],
    )
    assert keys_in(snap, locale="en-US") == ["x"]
    assert keys_in(snap, locale="de-AT") == ["y"]


def test_a_placement_decides_each_block() -> None:
    snap = snapshot(
        placements=[{"key": "home"}],
        blocks=[placed("a", 1, variants=[{"key": "m", "when": MOBILE, "fields": {"title": "m"}}])],
    )
    [resolved] = evaluation(snap, viewer(device="MOBILE")).placement("home") or []
    assert (resolved.fields["title"], resolved.decision.variant) == ("m", "m")


def test_a_draft_is_placed_only_in_preview() -> None:
    snap = snapshot(placements=[{"key": "home"}], blocks=[placed("a", 1), draft_only(placed("b", 2))])
    ev = evaluation(snap)
    assert [r.block.key for r in ev.placement("home") or []] == ["a"]
    assert [r.block.key for r in ev.placement("home", preview=True) or []] == ["b", "a"]


# ==================================================================================================
# blocks(): tags (any or all), type, pagination by key


def listing() -> Snapshot:
    return snapshot(
        blocks=[
            block("a", tags=["home", "promo"]),
            block("b", type="banner", tags=["home"]),
            block("c", tags=["promo"]),
            block("d"),
            block("e", tags=["home", "promo"], audience=MOBILE),
            draft_only(block("f", tags=["home"])),
        ]
    )


@pytest.mark.parametrize(
    ("kwargs", "keys"),
    [
        ({}, ["a", "b", "c", "d"]),
        ({"tags": ["home", "promo"]}, ["a", "b", "c"]),  # any
        ({"tags": ["home", "promo"], "match_all": True}, ["a"]),
        ({"tags": ["home"]}, ["a", "b"]),
        ({"tags": ["nope"]}, []),
        ({"tags": ["home", "nope"], "match_all": True}, []),
        ({"type_": "hero"}, ["a", "c", "d"]),
        ({"type_": "banner"}, ["b"]),
        ({"type_": "hero", "tags": ["home"]}, ["a"]),
        ({"type_": "video"}, []),
        ({"preview": True, "tags": ["home"]}, ["a", "b", "f"]),
    ],
)
def test_blocks_filters_by_tags_and_type(kwargs: dict[str, Any], keys: list[str]) -> None:
    page = evaluation(listing(), viewer(device="DESKTOP")).blocks(**kwargs)
    assert [r.block.key for r in page.items] == keys
    assert page.has_next is False


@pytest.mark.parametrize(
    ("first", "after", "keys", "has_next"),
    [
        (2, None, ["a", "b"], True),
        (2, "b", ["c", "d"], False),  # e is not eligible on desktop: nothing after d
        (2, "a", ["b", "c"], True),
        (4, None, ["a", "b", "c", "d"], False),
        (3, None, ["a", "b", "c"], True),
        (10, "d", [], False),
        (1, "bb", ["c"], True),  # after is a key, not necessarily one that exists
    ],
)
def test_blocks_paginates_by_key(first: int, after: str | None, keys: list[str], has_next: bool) -> None:
    page = evaluation(listing(), viewer(device="DESKTOP")).blocks(first=first, after=after)
    assert ([r.block.key for r in page.items], page.has_next) == (keys, has_next)


def test_blocks_includes_eligible_blocks_only() -> None:
    page = evaluation(listing(), viewer(device="MOBILE")).blocks(tags=["promo"], match_all=True)
    assert [r.block.key for r in page.items] == ["a", "c", "e"]


# ==================================================================================================
# Flags: values and reasons


def flag_value(
    flags: list[dict[str, Any]],
    key: str,
    *,
    segments: Sequence[dict[str, Any]] = (),
    traits: Any = None,
    **viewer_kwargs: Any,
) -> tuple[bool, str]:
    snap = snapshot(segments=segments, flags=flags)
    value = evaluation(snap, viewer(**viewer_kwargs), traits=traits).flag(key)
    return value.enabled, value.reason


def test_an_enabled_flag_without_audience_or_rollout_is_static() -> None:
    assert flag_value([{"key": "f", "enabled": True}], "f") == (True, STATIC)
    assert flag_value([{"key": "f", "enabled": True, "rollout": 100}], "f") == (True, STATIC)
    assert flag_value([{"key": "f", "enabled": True, "rollout": None}], "f") == (True, STATIC)  # null is absent


@pytest.mark.parametrize(
    "flag", [{"key": "f"}, {"key": "f", "enabled": False, "rollout": 100}, {"key": "f", "audience": MOBILE}]
)
def test_a_flag_that_is_not_enabled_is_disabled(flag: dict[str, Any]) -> None:
    assert flag_value([flag], "f", user_id="u-1", device="MOBILE") == (False, DISABLED)


def test_a_flag_with_an_audience() -> None:
    flag = {"key": "f", "enabled": True, "audience": {"segment": "gold"}}
    assert flag_value([flag], "f", segments=[GOLD], traits={"tier": "gold"}) == (True, TARGETING_MATCH)
    assert flag_value([flag], "f", segments=[GOLD], traits={"tier": "silver"}) == (False, DEFAULT)


def test_flag_audiences_may_use_context_conditions() -> None:
    flag = {"key": "f", "enabled": True, "audience": MOBILE}
    assert flag_value([flag], "f", device="MOBILE") == (True, TARGETING_MATCH)
    assert flag_value([flag], "f", device="DESKTOP") == (False, DEFAULT)


@pytest.mark.parametrize(
    ("flag", "unit", "expected"),
    [
        # bucket("new-hero-rules", "u-1") = 635; the salt defaults to the key
        ({"key": "new-hero-rules", "rollout": 6.36}, "u-1", (True, SPLIT)),
        ({"key": "new-hero-rules", "rollout": 6.35}, "u-1", (False, SPLIT)),
        ({"key": "new-hero-rules", "rollout": 6.36, "salt": ""}, "u-1", (True, SPLIT)),  # empty salt: the key
        ({"key": "new-hero-rules", "rollout": 25.5}, "u-2", (True, SPLIT)),  # 98 < 2550
        ({"key": "new-hero-rules", "rollout": 0.98}, "u-2", (False, SPLIT)),  # 98 < 98 is false
        ({"key": "new-hero-rules", "rollout": 0.99}, "u-2", (True, SPLIT)),
        # a salt replaces the key: bucket("hero-spring", "u-1") = 5645
        ({"key": "other", "salt": "hero-spring", "rollout": 56.46}, "u-1", (True, SPLIT)),
        ({"key": "other", "salt": "hero-spring", "rollout": 56.45}, "u-1", (False, SPLIT)),
        # bucket("f-0", "u-0") = 9770
        ({"key": "f-0", "rollout": 97.71}, "u-0", (True, SPLIT)),
        ({"key": "f-0", "rollout": 97.7}, "u-0", (False, SPLIT)),
        ({"key": "f-0", "rollout": 0}, "u-0", (False, SPLIT)),
        ({"key": "f-0", "rollout": 100}, "u-0", (True, STATIC)),
    ],
)
def test_a_rollout_is_on_when_bucket_is_below_round_p_times_100(
    flag: dict[str, Any], unit: str, expected: tuple[bool, str]
) -> None:
    assert flag_value([{**flag, "enabled": True}], flag["key"], user_id=unit) == expected


def test_a_rollout_after_a_matching_audience_is_a_split() -> None:
    flag = {"key": "new-hero-rules", "enabled": True, "rollout": 25.5, "audience": {"segment": "gold"}}
    gold = {"tier": "gold"}
    assert flag_value([flag], flag["key"], segments=[GOLD], traits=gold, user_id="u-1") == (True, SPLIT)
    assert flag_value([flag], flag["key"], segments=[GOLD], traits=gold, user_id="u-3") == (False, SPLIT)
    assert flag_value([flag], flag["key"], segments=[GOLD], traits={}, user_id="u-1") == (False, DEFAULT)


@pytest.mark.parametrize(
    ("rollout", "expected"), [(100, (True, STATIC)), (99.99, (False, SPLIT)), (50, (False, SPLIT))]
)
def test_a_viewer_without_a_unit_is_inside_only_a_rollout_of_100(
    rollout: float, expected: tuple[bool, str]
) -> None:
    assert flag_value([{"key": "f", "enabled": True, "rollout": rollout}], "f") == expected


@pytest.mark.parametrize(
    ("stickiness", "viewer_kwargs", "enabled"),
    [
        # salt hero-spring, 70%: threshold 7000; u-1 is in bucket 5645, a-42 in 8994
        (None, {"user_id": "u-1", "anonymous_id": "a-42"}, True),
        ("userId", {"user_id": "u-1", "anonymous_id": "a-42"}, True),
        ("anonymousId", {"user_id": "u-1", "anonymous_id": "a-42"}, False),
        ("anonymousId", {"user_id": "u-1"}, False),  # no anonymous id: no unit
        (None, {"anonymous_id": "a-42"}, False),
        (None, {"user_id": "", "anonymous_id": "a-42"}, False),  # an empty id is no id
    ],
)
def test_flag_stickiness(stickiness: str | None, viewer_kwargs: dict[str, Any], enabled: bool) -> None:
    flag: dict[str, Any] = {"key": "f", "enabled": True, "rollout": 70, "salt": "hero-spring"}
    if stickiness:
        flag["stickiness"] = stickiness
    assert flag_value([flag], "f", **viewer_kwargs) == (enabled, SPLIT)


def test_an_unknown_flag_is_off_with_an_error_reason() -> None:
    assert flag_value([], "nope") == (False, ERROR)


def test_flags_are_listed_by_key() -> None:
    snap = snapshot(
        flags=[{"key": "zeta", "enabled": True}, {"key": "alpha"}, {"key": "mid", "enabled": True}]
    )
    assert [(f.key, f.enabled, f.variant) for f in evaluation(snap).flags()] == [
        ("alpha", False, "off"),
        ("mid", True, "on"),
        ("zeta", True, "on"),
    ]


# ==================================================================================================
# Consent: false means an anonymous viewer without unit, traits, events or segments


def consent_snapshot() -> Snapshot:
    return snapshot(
        segments=[
            GOLD,
            {"key": "buyer", "rule": {"event": "purchase"}},
            {"key": "everyone", "rule": {"all": []}},
        ],
        flags=[
            {"key": "half", "enabled": True, "rollout": 50},
            {"key": "all", "enabled": True},
            {"key": "mobile", "enabled": True, "audience": MOBILE},
        ],
        blocks=[
            block(
                "b",
                variants=[
                    {"key": "test", "experiment": "exp-split", "arms": [{"key": "control", "weight": 1}]},
                    {"key": "gold", "when": {"segment": "gold"}, "fields": {"title": "gold"}},
                    {"key": "buyer", "when": {"event": "purchase"}, "fields": {"title": "buyer"}},
                    {"key": "tier", "when": {"trait": "tier", "op": "exists"}, "fields": {"title": "tier"}},
                    {"key": "mobile", "when": MOBILE, "fields": {"title": "mobile"}},
                ],
            ),
            block("for-gold", audience={"segment": "gold"}),
            block("for-mobile", audience=MOBILE),
        ],
    )


def test_without_consent_the_viewer_is_anonymous_but_context_still_applies() -> None:
    # given a gold buyer on mobile who withheld consent
    who = viewer(user_id="u-1", anonymous_id="a-42", device="MOBILE")
    ev = evaluation(
        consent_snapshot(),
        who,
        traits={"tier": "gold"},
        events=[event("purchase", NOW - timedelta(days=1))],
        consent=False,
    )
    # then no segments, not even one that everyone is in
    assert ev.segments() == []
    assert not ev.segment("gold")
    assert not ev.segment("buyer")
    assert not ev.segment("everyone")
    # no unit: a partial rollout is off; a full one and a context audience still apply
    assert (ev.flag("half").enabled, ev.flag("half").reason) == (False, SPLIT)
    assert ev.flag("all").enabled
    assert ev.flag("mobile").enabled
    # the experiment is skipped, the segment, event and trait variants are false, the context one is taken
    resolved = ev.block("b")
    assert resolved is not None
    assert resolved.decision.variant == "mobile"
    assert "no unit" in resolved.decision.trace[1]
    assert ev.block("for-gold") is None
    assert ev.block("for-mobile") is not None
    assert (ev.viewer.user_id, ev.viewer.anonymous_id, ev.viewer.device) == (None, None, "MOBILE")


def test_with_consent_the_same_viewer_is_personalised() -> None:
    who = viewer(user_id="u-1", anonymous_id="a-42", device="MOBILE")
    ev = evaluation(
        consent_snapshot(), who, traits={"tier": "gold"}, events=[event("purchase", NOW - timedelta(days=1))]
    )
    assert [s.key for s in ev.segments()] == ["buyer", "everyone", "gold"]
    resolved = ev.block("b")
    assert resolved is not None
    assert resolved.decision.variant == "control"  # a single arm of weight 1 takes every bucket
    assert ev.block("for-gold") is not None


def test_a_viewer_without_a_profile_is_treated_as_consenting() -> None:
    # no traits (no profile) but events and a unit: segments from behaviour still apply
    ev = evaluation(consent_snapshot(), viewer(anonymous_id="a-42"), events=[event("purchase", NOW)])
    assert [s.key for s in ev.segments()] == ["buyer", "everyone"]


# ==================================================================================================
# Segments: membership now, and their order


def test_segments_are_ordered_by_priority_descending_then_key() -> None:
    always = {"all": []}
    snap = snapshot(
        segments=[
            {"key": "b-zero", "rule": always},
            {"key": "a-zero", "rule": always, "priority": 0},
            {"key": "mid", "rule": always, "priority": 20},
            {"key": "top", "rule": always, "priority": 30},
            {"key": "also-top", "rule": always, "priority": 30},
            {"key": "below", "rule": always, "priority": -5},
            {"key": "not-member", "rule": {"any": []}, "priority": 100},
        ]
    )
    assert [s.key for s in evaluation(snap).segments()] == [
        "also-top",
        "top",
        "mid",
        "a-zero",
        "b-zero",
        "below",
    ]
    assert [s.priority for s in evaluation(snap).segments()] == [30, 30, 20, 0, 0, -5]


def test_the_example_segments_in_order() -> None:
    # given u-1, gold, with 3 product views in 10 minutes, an abandoned cart and a purchase 40 days ago
    events = [
        event("product_viewed", NOW - timedelta(minutes=1)),
        event("product_viewed", NOW - timedelta(minutes=2)),
        event("product_viewed", NOW - timedelta(minutes=9)),
        event("add_to_cart", NOW - timedelta(minutes=15)),
        event("purchase", NOW - timedelta(days=40)),
    ]
    ev = evaluation(example_snapshot(), viewer(user_id="u-1"), traits={"tier": "gold"}, events=events)
    # then by priority: high-intent (30), gold (20), then the priority-0 ones by key
    assert [s.key for s in ev.segments()] == ["high-intent", "gold", "at-risk", "cart-abandoner"]


def test_membership_changes_with_time_alone() -> None:
    # the cart abandoned at 11:45 is abandoned at 12:00 exactly, not a second before
    events = [event("add_to_cart", t("2026-11-20T11:45:00+00:00"))]
    before = evaluation(example_snapshot(), viewer(NOW - timedelta(seconds=1), user_id="u-1"), events=events)
    at = evaluation(example_snapshot(), viewer(NOW, user_id="u-1"), events=events)
    assert not before.segment("cart-abandoner")
    assert at.segment("cart-abandoner")


def test_segments_may_refer_to_segments_and_scores() -> None:
    snap = snapshot(
        scores=[{"key": "engagement", "events": {"page_view": 1}, "half_life": "1d"}],
        segments=[
            {
                "key": "vip",
                "rule": {"all": [{"segment": "gold"}, {"score": "engagement", "op": "gte", "value": 1.5}]},
            },
            GOLD,
        ],
    )
    # two page views now: 1 + 1 = 2; one now and one a day ago: 1 + 0.5 = 1.5; one now: 1
    two = [event("page_view", NOW, "p1"), event("page_view", NOW, "p2")]
    one_and_a_half = [event("page_view", NOW, "p1"), event("page_view", NOW - timedelta(days=1), "p2")]
    assert evaluation(snap, traits={"tier": "gold"}, events=two).segment("vip")
    assert evaluation(snap, traits={"tier": "gold"}, events=one_and_a_half).segment("vip")
    assert not evaluation(snap, traits={"tier": "gold"}, events=two[:1]).segment("vip")
    assert not evaluation(snap, traits={"tier": "silver"}, events=two).segment("vip")
    # the same event id twice counts once
    assert not evaluation(snap, traits={"tier": "gold"}, events=[two[0], two[0]]).segment("vip")


def test_an_unknown_segment_has_no_members() -> None:
    assert not evaluation(snapshot(segments=[GOLD]), traits={"tier": "gold"}).segment("nope")


def test_a_snapshot_retention_caps_behaviour() -> None:
    snap = snapshot(segments=[{"key": "buyer", "rule": {"event": "purchase"}}], retention=timedelta(days=30))
    assert evaluation(snap, events=[event("purchase", NOW - timedelta(days=29))]).segment("buyer")
    assert not evaluation(snap, events=[event("purchase", NOW - timedelta(days=31))]).segment("buyer")

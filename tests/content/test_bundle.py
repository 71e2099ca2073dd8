"""Validation of whole configurations (bundle.md; rules.md "Save-time errors"): every error is reported,
each at the JSON path of the offending key, before anything is evaluated."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from factories import NOW, block, evaluation, event, example_bundle, paths_of, problems_of, published, viewer

from content.bundle import CONFIG_KINDS, check_bundle_shape, check_event, check_profile, rollout_problem
from content.snapshot import Snapshot

GOLD = {"key": "gold", "rule": {"trait": "tier", "op": "eq", "value": "gold"}}
HOME = {"key": "home-hero", "limit": 1}
ENGAGEMENT = {"key": "engagement", "events": {"page_view": 1}, "half_life": "7d"}
BETA = {"key": "beta", "enabled": True}


def segment(key: str, rule: Any, **doc: Any) -> dict[str, Any]:
    return {"key": key, "rule": rule, **doc}


def experiment_variant(**overrides: Any) -> dict[str, Any]:
    variant = {
        "key": "test",
        "experiment": "exp",
        "arms": [
            {"key": "control", "weight": 1, "fields": {}},
            {"key": "bold", "weight": 2, "fields": {"t": 1}},
        ],
    }
    return {**variant, **overrides}


# ==================================================================================================
# The example of bundle.md is valid, and every kind of mistake in it is found


def test_the_example_bundle_is_valid() -> None:
    doc = example_bundle()
    assert check_bundle_shape(doc) == []
    kinds = {k: doc[k] for k in ("placements", "segments", "scores", "flags", "experiments", "blocks")}
    assert problems_of(doc["locales"], **kinds) == []


def test_every_error_of_a_bundle_is_listed_with_its_path() -> None:
    # given the example with four mistakes
    doc = example_bundle()
    doc["segments"][0]["rule"] = {"trait": "tier", "op": "equals", "value": "gold"}
    doc["flags"][0]["rollout"] = 25.555
    doc["blocks"][0]["variants"][0]["when"]["all"][1]["context"] = "browser"
    doc["blocks"][0]["placements"][0]["key"] = "home-footer"
    kinds = {k: doc[k] for k in ("placements", "segments", "scores", "flags", "experiments", "blocks")}
    # then all four are reported, each at its path
    problems = problems_of(doc["locales"], **kinds)
    assert sorted(p.path for p in problems) == [
        "blocks[0].placements[0].key",
        "blocks[0].variants[0].when.all[1].context",
        "flags[0].rollout",
        "segments[0].rule.op",
    ]
    [op] = [p for p in problems if p.path == "segments[0].rule.op"]
    assert str(op).startswith("segments[0].rule.op: unknown operator 'equals'")


# ==================================================================================================
# Rules inside documents: operators, forms, context fields, extra keys, value shapes


@pytest.mark.parametrize(
    ("rule", "path"),
    [
        ({"all": [GOLD["rule"], {"trait": "x", "op": "equals", "value": 1}]}, "segments[0].rule.all[1].op"),
        ({"equals": {"tier": "gold"}}, "segments[0].rule"),
        ({"trait": "tier", "op": "eq", "value": "gold", "weight": 2}, "segments[0].rule.weight"),
        ({"trait": "tier", "op": "in", "value": "gold"}, "segments[0].rule.value"),
        ({"trait": "age", "op": "between", "value": [1, 2, 3]}, "segments[0].rule.value"),
        ({"trait": "age", "op": "between", "value": 18}, "segments[0].rule.value"),
        ({"trait": "tier", "op": "not_in", "value": "gold"}, "segments[0].rule.value"),
    ],
)
def test_rule_problems_in_a_segment_are_reported_at_their_path(rule: Any, path: str) -> None:
    assert paths_of(segments=[segment("gold", rule)]) == [path]


def test_a_segment_without_a_rule_is_rejected() -> None:
    assert paths_of(segments=[{"key": "gold"}]) == ["segments[0].rule"]


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (block("b", audience={"context": "browser", "op": "eq", "value": "x"}), "blocks[0].audience.context"),
        (
            block(
                "b",
                variants=[{"key": "v", "when": {"any": [{"context": "device", "op": "is", "value": "X"}]}}],
            ),
            "blocks[0].variants[0].when.any[0].op",
        ),
        (
            block("b", variants=[{"key": "v", "when": {"all": [{"segment": "gold", "x": 1}]}}]),
            "blocks[0].variants[0].when.all[0].x",
        ),
    ],
)
def test_rule_problems_in_blocks_are_reported_at_their_path(doc: dict[str, Any], path: str) -> None:
    assert paths_of(segments=[GOLD], blocks=[doc]) == [path]


def test_the_path_example_of_rules_md() -> None:
    # given a fifth block whose second variant has an unknown operator in its first condition
    when = {"all": [{"trait": "tier", "op": "equals", "value": "gold"}]}
    fifth = block("e", variants=[{"key": "v"}, {"key": "w", "when": when}])
    blocks = [block("a"), block("b"), block("c"), block("d"), fifth]
    # then the path is the one rules.md gives
    assert paths_of(blocks=blocks) == ["blocks[4].variants[1].when.all[0].op"]


def test_rule_problems_in_flag_audiences_are_reported_at_their_path() -> None:
    flag = {"key": "beta", "audience": {"all": [{"segment": "gold"}, {"trait": "x", "op": "has"}]}}
    assert paths_of(segments=[GOLD], flags=[flag]) == ["flags[0].audience.all[1].op"]


# -- context conditions: targeting yes, segments no --------------------------------------------------


def test_a_context_condition_inside_a_segment_is_rejected() -> None:
    rule = {"all": [{"segment": "gold"}, {"context": "device", "op": "eq", "value": "MOBILE"}]}
    assert paths_of(segments=[GOLD, segment("gold-mobile", rule)]) == ["segments[1].rule.all[1].context"]


def test_a_nested_context_condition_inside_a_segment_is_rejected() -> None:
    rule = {"any": [GOLD["rule"], {"not": {"context": "attributes.utm.source", "op": "exists"}}]}
    assert paths_of(segments=[segment("x", rule)]) == ["segments[0].rule.any[1].not.context"]


def test_context_conditions_are_allowed_in_audiences_variants_and_flag_audiences() -> None:
    mobile = {"context": "device", "op": "eq", "value": "MOBILE"}
    flag = {"key": "beta", "enabled": True, "audience": mobile}
    doc = block("b", audience=mobile, variants=[{"key": "v", "when": mobile, "flag": "beta"}])
    assert paths_of(flags=[flag], blocks=[doc]) == []


# ==================================================================================================
# References: unknown segments, scores, flags and placements; cycles


@pytest.mark.parametrize(
    ("kinds", "path"),
    [
        ({"segments": [segment("vip", {"segment": "gold"})]}, "segments[0].rule.segment"),
        (
            {"segments": [segment("vip", {"score": "loyalty", "op": "gt", "value": 1})]},
            "segments[0].rule.score",
        ),
        ({"flags": [{"key": "f", "audience": {"segment": "gold"}}]}, "flags[0].audience.segment"),
        ({"blocks": [block("b", audience={"not": {"segment": "gold"}})]}, "blocks[0].audience.not.segment"),
        ({"blocks": [block("b", flag="beta")]}, "blocks[0].flag"),
        ({"blocks": [block("b", variants=[{"key": "v", "flag": "beta"}])]}, "blocks[0].variants[0].flag"),
        ({"blocks": [block("b", placements=[{"key": "home-hero"}])]}, "blocks[0].placements[0].key"),
        (
            {"blocks": [block("b", variants=[{"key": "v", "when": {"segment": "gold"}}])]},
            "blocks[0].variants[0].when.segment",
        ),
    ],
)
def test_a_reference_to_an_unknown_key_is_rejected(kinds: dict[str, Any], path: str) -> None:
    assert paths_of(**kinds) == [path]


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (block("b", placements=[{"key": ["home-hero"]}]), "blocks[0].placements[0].key"),
        (block("b", placements=[{"key": {"k": "home-hero"}}]), "blocks[0].placements[0].key"),
        (block("b", placements=[{"priority": 1}]), "blocks[0].placements[0].key"),
        (block("b", flag=["beta"]), "blocks[0].flag"),
        (block("b", flag={"key": "beta"}), "blocks[0].flag"),
        (block("b", variants=[{"key": "v", "flag": ["beta"]}]), "blocks[0].variants[0].flag"),
    ],
)
def test_a_reference_of_the_wrong_type_is_a_problem_not_a_crash(doc: dict[str, Any], path: str) -> None:
    assert paths_of(placements=[HOME], flags=[BETA], blocks=[doc]) == [path]


def test_references_to_known_keys_are_accepted() -> None:
    doc = block(
        "b",
        flag="beta",
        audience={"segment": "gold"},
        placements=[{"key": "home-hero", "priority": 5}],
        variants=[{"key": "v", "flag": "beta", "when": {"score": "engagement", "op": "gt", "value": 1}}],
    )
    assert paths_of(placements=[HOME], segments=[GOLD], scores=[ENGAGEMENT], flags=[BETA], blocks=[doc]) == []


def test_an_experiment_used_in_a_variant_need_not_be_listed() -> None:
    # bundle.md: "an experiment used in a variant but not listed has no goal"
    assert paths_of(blocks=[block("b", variants=[experiment_variant()])]) == []


def test_a_segment_may_refer_to_another_segment_in_any_order() -> None:
    assert paths_of(segments=[segment("vip", {"all": [{"segment": "gold"}]}), GOLD]) == []


@pytest.mark.parametrize(
    ("segments", "members"),
    [
        ([segment("a", {"segment": "a"})], {"segments[0].rule"}),
        (
            [segment("a", {"segment": "b"}), segment("b", {"not": {"segment": "a"}})],
            {"segments[0].rule", "segments[1].rule"},
        ),
        (
            [
                segment("a", {"all": [{"segment": "b"}]}),
                segment("b", {"any": [{"segment": "c"}]}),
                segment("c", {"segment": "a"}),
                segment("d", {"segment": "a"}),  # refers into the cycle, not part of it
            ],
            {"segments[0].rule", "segments[1].rule", "segments[2].rule"},
        ),
    ],
)
def test_a_cycle_of_segment_references_is_rejected_once(
    segments: list[dict[str, Any]], members: set[str]
) -> None:
    problems = problems_of(segments=segments)
    assert len(problems) == 1
    assert problems[0].path in members
    assert "cycle" in problems[0].message


def test_two_segments_referring_to_the_same_one_are_no_cycle() -> None:
    segments = [
        GOLD,
        segment("a", {"segment": "gold"}),
        segment("b", {"all": [{"segment": "a"}, {"segment": "gold"}]}),
    ]
    assert paths_of(segments=segments) == []


# ==================================================================================================
# Keys: [a-z0-9][a-z0-9._-]{0,127}, unique per kind (blocks: per locale)


@pytest.mark.parametrize("key", ["a", "0", "gold", "gold.v2_x-y", "9lives", "a" * 128, "a-" * 64])
def test_valid_keys(key: str) -> None:
    assert paths_of(placements=[{"key": key}]) == []


@pytest.mark.parametrize(
    "key", ["Gold", "-gold", ".gold", "_gold", "", "gold tier", "gold/tier", "göld", "a" * 129, 7, None]
)
def test_invalid_keys_are_rejected_at_the_key(key: Any) -> None:
    assert paths_of(placements=[HOME, {"key": key, "name": "x"}]) == ["placements[1].key"]


def test_a_missing_key_is_rejected_at_the_key() -> None:
    assert paths_of(segments=[{"rule": GOLD["rule"]}]) == ["segments[0].key"]


@pytest.mark.parametrize("kind", ["placements", "segments", "scores", "flags", "experiments", "blocks"])
def test_a_key_used_twice_in_a_kind_is_rejected_at_the_second(kind: str) -> None:
    doc = {
        "placements": HOME,
        "segments": GOLD,
        "scores": ENGAGEMENT,
        "flags": BETA,
        "experiments": {"key": "home-hero"},
        "blocks": block("home-hero"),
    }[kind]
    key = doc["key"]
    other = {**doc, "key": "other"}
    assert paths_of(**{kind: [doc, other, {**doc, "key": key}]}) == [f"{kind}[2].key"]


def test_kinds_are_separate_namespaces() -> None:
    # a placement, a block, a segment, a flag, a score and an experiment may share a key
    same = "home-hero"
    assert (
        paths_of(
            placements=[{"key": same}],
            segments=[{**GOLD, "key": same}],
            scores=[{**ENGAGEMENT, "key": same}],
            flags=[{**BETA, "key": same}],
            experiments=[{"key": same}],
            blocks=[block(same, placements=[{"key": same}])],
        )
        == []
    )


def test_a_block_key_is_unique_per_locale() -> None:
    locales = {"default": "en-US", "fallbacks": {"de-AT": "de-DE"}}
    # one key in three locales is fine
    assert (
        paths_of(
            locales,
            blocks=[block("b", locale="en-US"), block("b", locale="de-DE"), block("b", locale="de-AT")],
        )
        == []
    )
    # twice in one locale is not
    assert paths_of(locales, blocks=[block("b", locale="de-DE"), block("b", locale="de-DE")]) == [
        "blocks[1].key"
    ]
    # a block without a locale is in the default locale
    assert paths_of(locales, blocks=[block("b", locale="en-US"), block("b")]) == ["blocks[1].key"]
    assert paths_of({"default": "de-DE"}, blocks=[block("b", locale="en-US"), block("b")]) == []


def test_variant_and_arm_keys_are_checked_and_unique_within_their_block() -> None:
    doc = block(
        "b",
        variants=[
            {"key": "v"},
            {"key": "v"},
            {"key": "Bad Key"},
            experiment_variant(
                key="x", arms=[{"key": "a", "weight": 1}, {"key": "a", "weight": 1}, {"key": "", "weight": 1}]
            ),
        ],
    )
    assert paths_of(blocks=[doc]) == [
        "blocks[0].variants[1].key",
        "blocks[0].variants[2].key",
        "blocks[0].variants[3].arms[1].key",
        "blocks[0].variants[3].arms[2].key",
    ]


# ==================================================================================================
# Durations


@pytest.mark.parametrize("duration", ["7 days", "7days", "0d", "-1d", "1.5d", "7D", "P7D", "", 7])
def test_a_bad_duration_is_rejected_wherever_it_is(duration: Any) -> None:
    assert paths_of(scores=[{**ENGAGEMENT, "half_life": duration}]) == ["scores[0].half_life"]
    assert paths_of(segments=[segment("s", {"event": "x", "within": duration})]) == [
        "segments[0].rule.within"
    ]
    abandonment = {"event": "add", "not_followed_by": "done", "for": duration, "within": "1d"}
    assert paths_of(segments=[segment("s", abandonment)]) == ["segments[0].rule.for"]


def test_a_score_needs_events_with_numeric_weights_and_a_half_life() -> None:
    assert paths_of(scores=[{"key": "s", "events": {}, "half_life": "7d"}]) == ["scores[0].events"]
    assert paths_of(scores=[{"key": "s", "events": {"a": "1"}, "half_life": "7d"}]) == ["scores[0].events.a"]
    assert paths_of(scores=[{"key": "s", "events": {"a": True}, "half_life": "7d"}]) == ["scores[0].events.a"]
    assert paths_of(scores=[{"key": "s", "events": {"a": 1.5}}]) == ["scores[0].half_life"]


# ==================================================================================================
# Flags: rollout 0-100 with at most two decimals; enabled; salt; stickiness


@pytest.mark.parametrize("rollout", [0, 100, 0.0, 100.0, 25.5, 25.55, 0.01, 99.99, 33.33, 50])
def test_valid_rollouts(rollout: float) -> None:
    assert rollout_problem(rollout) is None
    assert paths_of(flags=[{"key": "f", "enabled": True, "rollout": rollout}]) == []


@pytest.mark.parametrize("rollout", [-1, -0.01, 100.01, 101, 25.555, 0.001, 99.999, "50", True, [50]])
def test_invalid_rollouts_are_rejected_at_the_rollout(rollout: Any) -> None:
    assert rollout_problem(rollout) is not None
    assert paths_of(flags=[{"key": "f", "enabled": True, "rollout": rollout}]) == ["flags[0].rollout"]


@pytest.mark.parametrize(
    "flag",
    [
        {"key": "f", "enabled": None},
        {"key": "f", "rollout": None},
        {"key": "f", "stickiness": None},
        {"key": "f", "audience": None, "salt": None},
    ],
)
def test_null_is_absent_in_optional_flag_fields(flag: dict[str, Any]) -> None:
    # The bundle example writes null for what is absent; every optional field reads it so.
    assert paths_of(flags=[flag]) == []


def test_a_rollout_message_says_what_is_wrong() -> None:
    assert "more than two decimals" in (rollout_problem(25.555) or "")
    assert "0-100" in (rollout_problem(100.5) or "")


@pytest.mark.parametrize(
    ("flag", "path"),
    [
        ({"key": "f", "enabled": "yes"}, "flags[0].enabled"),
        ({"key": "f", "enabled": 1}, "flags[0].enabled"),
        ({"key": "f", "salt": 5}, "flags[0].salt"),
        ({"key": "f", "stickiness": "deviceId"}, "flags[0].stickiness"),
        ({"key": "f", "percentage": 5}, "flags[0].percentage"),
        ({"key": "f", "name": 5}, "flags[0].name"),
    ],
)
def test_flag_problems(flag: dict[str, Any], path: str) -> None:
    assert paths_of(flags=[flag]) == [path]


def test_a_minimal_flag_is_valid() -> None:
    assert paths_of(flags=[{"key": "f"}, {"key": "g", "salt": "", "stickiness": "anonymousId"}]) == []


# ==================================================================================================
# Variants, experiments and arms


@pytest.mark.parametrize("weight", [0, -1, 1.5, "1", True, None, [1]])
def test_arm_weights_must_be_positive_integers(weight: Any) -> None:
    variant = experiment_variant(arms=[{"key": "a", "weight": 1}, {"key": "b", "weight": weight}])
    assert paths_of(blocks=[block("b", variants=[variant])]) == ["blocks[0].variants[0].arms[1].weight"]


def test_an_arm_without_a_weight_is_rejected() -> None:
    variant = experiment_variant(arms=[{"key": "a", "fields": {}}])
    assert paths_of(blocks=[block("b", variants=[variant])]) == ["blocks[0].variants[0].arms[0].weight"]


@pytest.mark.parametrize("fields", [{"title": "x"}, {}])
def test_fields_on_a_variant_with_arms_are_rejected(fields: dict[str, Any]) -> None:
    variant = experiment_variant(fields=fields)
    assert paths_of(blocks=[block("b", variants=[variant])]) == ["blocks[0].variants[0].fields"]


@pytest.mark.parametrize(
    ("variant", "path"),
    [
        ({"key": "v", "experiment": "exp"}, "blocks[0].variants[0].arms"),
        (experiment_variant(arms=[]), "blocks[0].variants[0].arms"),
        (experiment_variant(arms={"a": 1}), "blocks[0].variants[0].arms"),
        (experiment_variant(experiment=None), "blocks[0].variants[0].experiment"),
        (experiment_variant(experiment="Spring Test"), "blocks[0].variants[0].experiment"),
        (experiment_variant(stickiness="sessionId"), "blocks[0].variants[0].stickiness"),
        (
            experiment_variant(arms=[{"key": "a", "weight": 1, "share": 0.5}]),
            "blocks[0].variants[0].arms[0].share",
        ),
        (
            experiment_variant(arms=[{"key": "a", "weight": 1, "fields": "x"}]),
            "blocks[0].variants[0].arms[0].fields",
        ),
        (experiment_variant(arms=["a"]), "blocks[0].variants[0].arms[0]"),
        ({"key": "v", "fields": ["title"]}, "blocks[0].variants[0].fields"),
        ({"key": "v", "priority": 1}, "blocks[0].variants[0].priority"),
        ("v", "blocks[0].variants[0]"),
    ],
)
def test_variant_problems(variant: Any, path: str) -> None:
    assert paths_of(blocks=[block("b", variants=[variant])]) == [path]


def test_a_variant_with_stickiness_and_arms_is_valid() -> None:
    variant = experiment_variant(stickiness="anonymousId", flag="beta", when={"segment": "gold"})
    assert paths_of(segments=[GOLD], flags=[BETA], blocks=[block("b", variants=[variant])]) == []


# ==================================================================================================
# Blocks, placements, schedules, locales


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"key": "b"}, "blocks[0].type"),
        (block("b", type=""), "blocks[0].type"),
        (block("b", status="live"), "blocks[0].status"),
        (block("b", locale=""), "blocks[0].locale"),
        (block("b", tags="home"), "blocks[0].tags"),
        (block("b", tags=["home", ""]), "blocks[0].tags"),
        (block("b", fields=["title"]), "blocks[0].fields"),
        (block("b", colour="red"), "blocks[0].colour"),
        (block("b", placements={"key": "home-hero"}), "blocks[0].placements"),
        (
            block("b", placements=[{"key": "home-hero", "priority": "high"}]),
            "blocks[0].placements[0].priority",
        ),
        (block("b", placements=[{"key": "home-hero", "rank": 1}]), "blocks[0].placements[0].rank"),
        (block("b", schedule={"from": "soon"}), "blocks[0].schedule.from"),
        (block("b", schedule={"until": "2026-13-01T00:00:00Z"}), "blocks[0].schedule.until"),
        (block("b", schedule={"start": "2026-01-01T00:00:00Z"}), "blocks[0].schedule.start"),
        (block("b", schedule="2026"), "blocks[0].schedule"),
        (
            block("b", schedule={"from": "2026-02-01T00:00:00Z", "until": "2026-02-01T01:00:00+01:00"}),
            "blocks[0].schedule.until",
        ),
        (block("b", variants={"key": "v"}), "blocks[0].variants"),
    ],
)
def test_block_problems(doc: dict[str, Any], path: str) -> None:
    assert paths_of(placements=[HOME], blocks=[doc]) == [path]


def test_a_full_block_is_valid() -> None:
    doc = block(
        "b",
        locale="de-DE",
        tags=["home", "promo"],
        status="draft",
        placements=[{"key": "home-hero", "priority": 10}, {"key": "sidebar"}],
        schedule={"from": "2026-01-01T00:00:00Z", "until": None},
        audience=None,
        flag=None,
        fields={"title": "Hallo", "cta": {"label": "Los"}},
        variants=[],
    )
    assert paths_of(placements=[HOME, {"key": "sidebar"}], blocks=[doc]) == []


@pytest.mark.parametrize(
    ("placement", "path"),
    [
        ({"key": "p", "limit": 0}, "placements[0].limit"),
        ({"key": "p", "limit": -1}, "placements[0].limit"),
        ({"key": "p", "limit": 1.5}, "placements[0].limit"),
        ({"key": "p", "limit": "3"}, "placements[0].limit"),
        ({"key": "p", "size": 3}, "placements[0].size"),
    ],
)
def test_placement_problems(placement: dict[str, Any], path: str) -> None:
    assert paths_of(placements=[placement]) == [path]


@pytest.mark.parametrize(
    ("priority", "valid"),
    [(0, True), (-5, True), (30, True), (None, True), (1.5, False), ("1", False), (True, False)],
)
def test_segment_priority_is_an_integer(priority: Any, valid: bool) -> None:
    assert paths_of(segments=[{**GOLD, "priority": priority}]) == ([] if valid else ["segments[0].priority"])


@pytest.mark.parametrize(
    ("locales", "paths"),
    [
        ({"default": "en-US", "fallbacks": {"de-AT": "de-DE", "de-DE": "en-US"}}, []),
        ({}, []),
        ({"default": ""}, ["locales.default"]),
        ({"default": "en-US", "fallbacks": ["de-DE"]}, ["locales.fallbacks"]),
        ({"default": "en-US", "fallbacks": {"de-AT": 5}}, ["locales.fallbacks.de-AT"]),
        ({"default": "en-US", "fallback": {}}, ["locales.fallback"]),
    ],
)
def test_locales(locales: dict[str, Any], paths: list[str]) -> None:
    assert paths_of(locales) == paths


def test_a_cycle_of_locale_fallbacks_is_rejected() -> None:
    problems = problems_of(
        {"default": "en-US", "fallbacks": {"de-AT": "de-DE", "de-DE": "de-AT", "fr-CH": "fr-FR"}}
    )
    assert problems
    assert {p.path for p in problems} <= {"locales.fallbacks.de-AT", "locales.fallbacks.de-DE"}
    assert all("cycle" in p.message for p in problems)


def test_experiment_goals_are_event_conditions() -> None:
    assert (
        paths_of(
            experiments=[{"key": "e", "goal": [{"event": "purchase"}, {"event": "signup", "within": "7d"}]}]
        )
        == []
    )
    assert paths_of(experiments=[{"key": "e", "goal": {"segment": "gold"}}]) == ["experiments[0].goal"]
    assert paths_of(experiments=[{"key": "e", "goal": [{"event": "a"}, {"event": "b", "within": "x"}]}]) == [
        "experiments[0].goal[1].within"
    ]


def test_a_document_that_is_not_an_object_is_rejected_at_its_index() -> None:
    assert paths_of(segments=[GOLD, "vip"]) == ["segments[1]"]


# ==================================================================================================
# The bundle's own shape, and its data records (profiles and events)


def test_bundle_shape() -> None:
    assert [p.path for p in check_bundle_shape([])] == [""]
    assert [p.path for p in check_bundle_shape({"version": 2, "widgets": [], "segments": {}})] == [
        "widgets",
        "version",
        "segments",
    ]


@pytest.mark.parametrize(
    ("doc", "paths"),
    [
        ({"userId": "u-1", "traits": {"tier": "gold"}, "consent": {"personalization": True}}, []),
        ({"userId": "u-1"}, []),
        ({"userId": ""}, ["profiles[0].userId"]),
        ({"traits": {}}, ["profiles[0].userId"]),
        ({"userId": "u-1", "traits": ["gold"]}, ["profiles[0].traits"]),
        ({"userId": "u-1", "consent": {"personalization": "no"}}, ["profiles[0].consent.personalization"]),
        ({"userId": "u-1", "consent": False}, ["profiles[0].consent"]),
        ({"userId": "u-1", "email": "a@b"}, ["profiles[0].email"]),
        ("u-1", ["profiles[0]"]),
    ],
)
def test_profiles(doc: Any, paths: list[str]) -> None:
    assert [p.path for p in check_profile(doc, "profiles[0]")] == paths


@pytest.mark.parametrize(
    ("doc", "paths"),
    [
        ({"id": "e-1", "type": "purchase", "userId": "u-1", "at": "2026-11-20T10:00:00Z"}, []),
        (
            {
                "id": "e-1",
                "type": "purchase",
                "anonymousId": "a-1",
                "at": "2026-11-20T10:00:00Z",
                "properties": {},
            },
            [],
        ),
        ({"type": "purchase", "userId": "u-1", "at": "2026-11-20T10:00:00Z"}, ["events[0].id"]),
        ({"id": "e-1", "userId": "u-1", "at": "2026-11-20T10:00:00Z"}, ["events[0].type"]),
        ({"id": "e-1", "type": "purchase", "userId": "u-1"}, ["events[0].at"]),
        ({"id": "e-1", "type": "purchase", "at": "2026-11-20T10:00:00Z"}, ["events[0].userId"]),
        ({"id": "e-1", "type": "purchase", "userId": "", "at": "2026-11-20T10:00:00Z"}, ["events[0].userId"]),
        ({"id": "e-1", "type": "purchase", "userId": "u-1", "at": "yesterday"}, ["events[0].at"]),
        (
            {
                "id": "e-1",
                "type": "purchase",
                "userId": "u-1",
                "at": "2026-11-20T10:00:00Z",
                "properties": [],
            },
            ["events[0].properties"],
        ),
        (
            {"id": "e-1", "type": "purchase", "userId": "u-1", "at": "2026-11-20T10:00:00Z", "ts": 1},
            ["events[0].ts"],
        ),
    ],
)
def test_bundle_events_need_an_id_a_type_a_time_and_an_id_of_who(doc: Any, paths: list[str]) -> None:
    assert [p.path for p in check_event(doc, "events[0]")] == paths


def test_tracked_events_may_omit_id_and_time() -> None:
    # bundle.md: "events sent through the tracking APIs get an id and an at from the server"
    assert check_event({"type": "purchase", "userId": "u-1"}, "event", require_id_and_time=False) == []


# ==================================================================================================
# Property: validation never raises, and whatever it accepts compiles and evaluates

JUNK: list[Any] = [None, [], {}, 1.5, "x", True, -1, 0, ["x"], {"a": 1}, "", "Bad Key", 10**20]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _mutations() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """The example's configuration with one value replaced by junk (or one key deleted), everywhere."""
    base = example_bundle()
    config = {kind: base[kind] for kind in CONFIG_KINDS}
    for path in _paths(config):
        if len(path) < 2:
            continue
        for junk in [*JUNK, "<delete>"]:
            doc = copy.deepcopy(config)
            parent: Any = doc
            for part in path[:-1]:
                parent = parent[part]
            if junk == "<delete>":
                if not isinstance(parent, dict):
                    continue
                del parent[path[-1]]
            else:
                parent[path[-1]] = junk
            yield base["locales"], doc


def test_validation_never_raises_and_what_it_accepts_compiles_and_evaluates() -> None:
    accepted = 0
    for locales, doc in _mutations():
        # when validated  # then problems are returned, never raised
        if problems_of(locales, **doc):
            continue
        accepted += 1
        # and a configuration without problems builds a snapshot that evaluates without error
        snap = Snapshot.build(
            version=1,
            locales=locales,
            blocks=[published(b) for b in doc["blocks"]],
            **{kind: doc[kind] for kind in CONFIG_KINDS if kind != "blocks"},
        )
        for who in (viewer(user_id="u-1", device="MOBILE", timezone="Europe/Berlin"), viewer()):
            ev = evaluation(snap, who, traits={"tier": "gold"}, events=[event("add_to_cart", NOW)])
            ev.placement("home-hero")
            ev.blocks()
            ev.segments()
            ev.flags()
    assert accepted > 100  # the mutations are not all rejected: the property is not vacuous

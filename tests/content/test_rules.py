"""The rule language (rules.md): save-time validation with JSON paths, and evaluation of combinators,
trait, context and segment conditions. Behavioural conditions are in test_behaviour.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from factories import NOW, holds, t, viewer

from content.rules import Known, Scope, parse_duration, parse_instant, validate_rule

KNOWN = Known(segments=frozenset({"gold", "vip"}), scores=frozenset({"engagement"}))


def problem_paths(rule: Any, scope: Scope = Scope.TARGETING) -> list[str]:
    return [p.path for p in validate_rule(rule, "rule", scope=scope, known=KNOWN)]


def trait(op: str, value: Any = None, path: str = "tier") -> dict[str, Any]:
    return {"trait": path, "op": op, "value": value}


# ==================================================================================================
# Validation: anything that is not exactly one of the forms is rejected when saved, at its path


@pytest.mark.parametrize(
    "rule",
    [
        {"all": []},
        {"any": []},
        {"not": {"all": []}},
        trait("eq", "gold"),
        {"trait": "tier", "op": "exists"},  # exists needs no value
        {"trait": "tier", "op": "exists", "value": "ignored"},
        {"trait": "address.country", "op": "in", "value": ["DE", "AT"]},
        {"trait": "age", "op": "between", "value": [18, 30]},
        {"context": "device", "op": "eq", "value": "MOBILE"},
        {"context": "local_time", "op": "between", "value": ["22:00", "06:00"]},
        {"context": "local_hour", "op": "between", "value": [22, 6]},
        {"context": "at", "op": "gte", "value": "2026-11-20T12:00:00+01:00"},
        {"context": "attributes.utm.source", "op": "eq", "value": "newsletter"},
        {"segment": "gold"},
        {"event": "purchase"},
        {"event": "product_viewed", "where": {"category": "shoes", "price": {"op": "gt", "value": 10}}},
        {"event": "product_viewed", "within": "10m", "count": {"gte": 3}},
        {"event": "purchase", "within": "30d", "count": {"eq": 0}},
        {"event": "add_to_cart", "not_followed_by": "checkout", "for": "15m", "within": "24h"},
        {"event": "add_to_cart", "not_followed_by": "checkout", "for": "15m"},
        {"score": "engagement", "op": "gte", "value": 10},
        {"score": "engagement", "op": "between", "value": [1, 2.5]},
    ],
)
def test_valid_rules_have_no_problems(rule: dict[str, Any]) -> None:
    assert problem_paths(rule) == []


@pytest.mark.parametrize(
    ("rule", "paths"),
    [
        # not a JSON object, an unknown form, an empty object
        (["trait", "tier"], ["rule"]),
        ("gold", ["rule"]),
        ({}, ["rule"]),
        ({"equals": {"tier": "gold"}}, ["rule"]),
        # combinators
        ({"all": {"trait": "tier"}}, ["rule.all"]),
        ({"any": "x"}, ["rule.any"]),
        ({"not": [trait("eq", 1)]}, ["rule.not"]),
        ({"all": [], "any": []}, ["rule.any"]),  # extra key
        ({"all": [], "note": "why"}, ["rule.note"]),
        # an unknown operator, deep inside: the path names the offending key
        ({"all": [trait("eq", 1), {"any": [trait("equals", 1)]}]}, ["rule.all[1].any[0].op"]),
        ({"not": {"not": trait("is", 1)}}, ["rule.not.not.op"]),
        # trait leaves
        ({"trait": "tier", "value": "gold"}, ["rule.op"]),
        ({"trait": "tier", "op": "eq"}, ["rule.value"]),
        ({"trait": "tier", "op": "eq", "value": "gold", "unit": "x"}, ["rule.unit"]),
        (trait("eq", "gold", path=""), ["rule.trait"]),
        (trait("eq", "gold", path="address..country"), ["rule.trait"]),
        (trait("eq", "gold", path=".tier"), ["rule.trait"]),
        ({"trait": 3, "op": "eq", "value": 1}, ["rule.trait"]),
        (trait("eq", None), ["rule.value"]),  # null is missing: use exists
        # value shapes: in / not_in need a list, between a two-element list
        (trait("in", "gold"), ["rule.value"]),
        (trait("not_in", {"gold": True}), ["rule.value"]),
        (trait("between", 5), ["rule.value"]),
        (trait("between", [1]), ["rule.value"]),
        (trait("between", [1, 2, 3]), ["rule.value"]),
        (trait("in", ["gold", None]), ["rule.value[1]"]),
        (trait("between", [1, None]), ["rule.value[1]"]),
        (trait("gt", True), ["rule.value"]),
        (trait("lt", [1]), ["rule.value"]),
        (trait("between", [{"a": 1}, 2]), ["rule.value[0]"]),
        (trait("starts_with", 5), ["rule.value"]),
        (trait("ends_with", ["x"]), ["rule.value"]),
        # context leaves
        ({"context": "browser", "op": "eq", "value": "firefox"}, ["rule.context"]),
        ({"context": "attributes", "op": "eq", "value": "x"}, ["rule.context"]),
        ({"context": "attributes.", "op": "eq", "value": "x"}, ["rule.context"]),
        ({"context": "device", "op": "equals", "value": "MOBILE"}, ["rule.op"]),
        ({"context": "device", "op": "eq", "value": "MOBILE", "negate": True}, ["rule.negate"]),
        ({"context": "local_time", "op": "gte", "value": "25:00"}, ["rule.value"]),
        ({"context": "local_time", "op": "between", "value": ["22:00", "6:00"]}, ["rule.value[1]"]),
        ({"context": "at", "op": "gte", "value": "tomorrow"}, ["rule.value"]),
        ({"context": "at", "op": "contains", "value": "2026"}, ["rule.op"]),
        # segment leaves
        ({"segment": "platinum"}, ["rule.segment"]),
        ({"segment": ["gold"]}, ["rule.segment"]),
        ({"segment": "gold", "op": "eq"}, ["rule.op"]),
        # score leaves
        ({"score": "loyalty", "op": "gte", "value": 1}, ["rule.score"]),
        ({"score": "engagement", "op": "gte", "value": "10"}, ["rule.value"]),
        ({"score": "engagement", "op": "contains", "value": 1}, ["rule.op"]),
        ({"score": "engagement", "op": "between", "value": [1, "2"]}, ["rule.value[1]"]),
        # event leaves
        ({"event": ""}, ["rule.event"]),
        ({"event": 5}, ["rule.event"]),
        ({"event": "purchase", "within": "30 days"}, ["rule.within"]),
        ({"event": "purchase", "count": {"ne": 1}}, ["rule.count.ne"]),
        ({"event": "purchase", "count": {"gte": -1}}, ["rule.count.gte"]),
        ({"event": "purchase", "count": {"gte": 1.5}}, ["rule.count.gte"]),
        ({"event": "purchase", "count": {"gte": "3"}}, ["rule.count.gte"]),
        ({"event": "purchase", "count": {"gte": 1, "lte": 3}}, ["rule.count"]),
        ({"event": "purchase", "count": 3}, ["rule.count"]),
        ({"event": "purchase", "where": ["sku"]}, ["rule.where"]),
        ({"event": "purchase", "where": {"sku": None}}, ["rule.where.sku"]),
        ({"event": "purchase", "where": {"price": {"op": "above", "value": 1}}}, ["rule.where.price.op"]),
        ({"event": "purchase", "where": {"sku": {"op": "in", "value": "A1"}}}, ["rule.where.sku.value"]),
        ({"event": "purchase", "where": {"sku": {"op": "eq", "value": "A", "x": 1}}}, ["rule.where.sku.x"]),
        ({"event": "purchase", "for": "15m"}, ["rule.for"]),  # 'for' only goes with not_followed_by
        ({"event": "purchase", "op": "gte"}, ["rule.op"]),
        # abandonment: event, not_followed_by and for are required
        ({"event": "add_to_cart", "not_followed_by": "checkout"}, ["rule.for"]),
        ({"event": "add_to_cart", "not_followed_by": "checkout", "for": "soon"}, ["rule.for"]),
        ({"event": "add_to_cart", "not_followed_by": "", "for": "15m"}, ["rule.not_followed_by"]),
        (
            {"event": "add_to_cart", "not_followed_by": "checkout", "for": "15m", "within": "1y"},
            ["rule.within"],
        ),
        (
            {"event": "add_to_cart", "not_followed_by": "checkout", "for": "15m", "where": {"sku": "A"}},
            ["rule.where"],
        ),
        (
            {"event": "add_to_cart", "not_followed_by": "checkout", "for": "15m", "count": {"gte": 1}},
            ["rule.count"],
        ),
    ],
)
def test_invalid_rules_are_rejected_at_the_path_of_the_offending_key(rule: Any, paths: list[str]) -> None:
    assert problem_paths(rule) == paths


def test_a_node_with_two_forms_is_rejected_at_one_of_them() -> None:
    # given a node that is both a trait and a context condition ("exactly one of the forms")
    rule = {"trait": "tier", "context": "device", "op": "eq", "value": "gold"}
    # then it is rejected, naming one of the two keys
    paths = problem_paths(rule)
    assert len(paths) == 1
    assert paths[0] in ("rule.trait", "rule.context")


def test_every_problem_is_reported_not_only_the_first() -> None:
    rule = {"all": [trait("equals", 1), {"segment": "nope"}, {"event": "x", "within": "0m"}]}
    assert problem_paths(rule) == ["rule.all[0].op", "rule.all[1].segment", "rule.all[2].within"]


def test_an_unknown_operator_is_named_in_the_message() -> None:
    [problem] = validate_rule(
        {"all": [trait("eq", 1), trait("equals", 1)]}, "segments[3].rule", scope=Scope.SEGMENT, known=KNOWN
    )
    assert str(problem).startswith("segments[3].rule.all[1].op: unknown operator 'equals'")


@pytest.mark.parametrize(
    ("rule", "path"),
    [
        ({"context": "device", "op": "eq", "value": "MOBILE"}, "rule.context"),
        (
            {"all": [{"segment": "gold"}, {"context": "country", "op": "eq", "value": "DE"}]},
            "rule.all[1].context",
        ),
        ({"not": {"context": "local_hour", "op": "gte", "value": 18}}, "rule.not.context"),
        ({"any": [{"all": [{"context": "attributes.utm", "op": "exists"}]}]}, "rule.any[0].all[0].context"),
    ],
)
def test_context_conditions_are_rejected_inside_a_segment(rule: dict[str, Any], path: str) -> None:
    # given a segment definition that looks at the request  # then it is rejected at the context key
    assert problem_paths(rule, scope=Scope.SEGMENT) == [path]
    # and the same rule is fine as a targeting rule (block audience, variant, flag audience)
    assert problem_paths(rule, scope=Scope.TARGETING) == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("1s", 1),
        ("15m", 900),
        ("2h", 7_200),
        ("7d", 604_800),
        ("1w", 604_800),
        ("90d", 7_776_000),
    ],
)
def test_durations_are_fixed_lengths(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text", ["0m", "-1d", "1.5h", "15", "m", "15M", "15 m", " 15m", "15min", "1y", 15, None]
)
def test_bad_durations_are_not_durations(text: Any) -> None:
    assert parse_duration(text) is None


# ==================================================================================================
# Combinators


def test_all_of_nothing_is_true_and_any_of_nothing_is_false() -> None:
    assert holds({"all": []})
    assert not holds({"any": []})
    assert not holds({"not": {"all": []}})


@pytest.mark.parametrize(
    ("tiers", "all_", "any_"),
    [(("gold", "gold"), True, True), (("gold", "silver"), False, True), (("silver", "silver"), False, False)],
)
def test_all_needs_every_sub_rule_and_any_needs_one(tiers: tuple[str, str], all_: bool, any_: bool) -> None:
    # given a viewer with tier gold and two conditions on tier
    first, second = (trait("eq", tiers[0]), trait("eq", tiers[1]))
    assert holds({"all": [first, second]}, traits={"tier": "gold"}) is all_
    assert holds({"any": [first, second]}, traits={"tier": "gold"}) is any_


def test_not_gold_or_unknown_is_written_with_not() -> None:
    rule = {"not": trait("eq", "gold")}
    assert holds(rule, traits={})  # unknown tier
    assert holds(rule, traits={"tier": "silver"})
    assert not holds(rule, traits={"tier": "gold"})


# ==================================================================================================
# Trait conditions, operator by operator


@pytest.mark.parametrize(
    ("actual", "value", "expected"),
    [
        ("gold", "gold", True),
        ("Gold", "gold", False),  # strings compare case-sensitively
        (1, 1.0, True),  # numbers compare as numbers
        (1.0, 1, True),
        (2, 1, False),
        (True, 1, False),  # booleans are not numbers
        (1, True, False),
        (False, 0, False),
        (True, True, True),
        ("1", 1, False),
        (1, "1", False),
        ([1, "a"], [1.0, "a"], True),
        ([1, 2], [2, 1], False),
        ({"a": 1}, {"a": 1.0}, True),
        ({"a": True}, {"a": 1}, False),
    ],
)
def test_eq(actual: Any, value: Any, expected: bool) -> None:
    assert holds(trait("eq", value), traits={"tier": actual}) is expected


@pytest.mark.parametrize(
    ("actual", "value", "expected"),
    [
        ("gold", "silver", True),
        ("gold", "gold", False),
        ("Gold", "gold", True),
        (1, 2, True),
        (1, 1.0, False),
        ("1", 1, False),  # a type mismatch is false, even for ne
        (1, "1", False),
        (True, 1, False),
        (True, False, True),
        ([1], [2], True),
    ],
)
def test_ne_is_false_on_a_type_mismatch(actual: Any, value: Any, expected: bool) -> None:
    assert holds(trait("ne", value), traits={"tier": actual}) is expected


@pytest.mark.parametrize(
    ("actual", "value", "expected"),
    [
        ("gold", ["gold", "silver"], True),
        ("bronze", ["gold", "silver"], False),
        ("Gold", ["gold"], False),
        (1, [1.0, 2.0], True),
        (True, [1], False),
        ("1", [1, 2], False),
        ("gold", [], False),
        ([1], [[1], [2]], True),
    ],
)
def test_in(actual: Any, value: list[Any], expected: bool) -> None:
    assert holds(trait("in", value), traits={"tier": actual}) is expected


@pytest.mark.parametrize(
    ("actual", "value", "expected"),
    [
        ("bronze", ["gold", "silver"], True),
        ("gold", ["gold", "silver"], False),
        ("Gold", ["gold"], True),
        (3, [1, 2], True),
        (1, [1.0, 2.0], False),
        (1, ["1", "2"], False),  # a type mismatch is false, even for not_in
        (True, [1, 2], False),
        ("3", [1, 2], False),
    ],
)
def test_not_in_is_false_on_a_type_mismatch(actual: Any, value: list[Any], expected: bool) -> None:
    assert holds(trait("not_in", value), traits={"tier": actual}) is expected


@pytest.mark.parametrize(
    ("actual", "op", "value", "expected"),
    [
        # numbers
        (5, "gt", 3, True),
        (3, "gt", 3, False),
        (3.5, "gt", 3, True),
        (3, "gte", 3, True),
        (3.0, "gte", 3, True),
        (2.99, "gte", 3, False),
        (2, "lt", 3, True),
        (3, "lt", 3, False),
        (3, "lte", 3, True),
        (4, "lte", 3, False),
        (-1, "lt", 0, True),
        # strings order by Unicode code point
        ("b", "gt", "a", True),
        ("B", "gt", "a", False),  # 'B' is U+0042, 'a' is U+0061
        ("é", "gt", "z", True),  # U+00E9 > U+007A
        ("apple", "lt", "banana", True),
        ("10", "lt", "9", True),  # '1' < '9': strings, not numbers
        ("abc", "gte", "abc", True),
        ("ab", "lt", "abc", True),
        # U+1F600 is above U+FF5E by code point, though UTF-16 code units would order it below
        ("\U0001f600", "gt", "\uff5e", True),
        # the wrong type is false, never an error
        ("5", "gt", 3, False),
        (5, "gt", "3", False),
        (True, "gt", 0, False),
        (False, "lt", 1, False),
        ([5], "gt", 3, False),
        ({"a": 5}, "lte", 3, False),
    ],
)
def test_ordering_operators(actual: Any, op: str, value: Any, expected: bool) -> None:
    assert holds(trait(op, value), traits={"tier": actual}) is expected


@pytest.mark.parametrize(
    ("actual", "value", "expected"),
    [
        (5, [1, 10], True),
        (1, [1, 10], True),  # inclusive at both ends
        (10, [1, 10], True),
        (10.0, [1, 10], True),
        (0, [1, 10], False),
        (10.5, [1, 10], False),
        (5, [5, 5], True),
        (5, [10, 1], False),  # low > high is never true
        (0, [10, 1], False),
        (11, [10, 1], False),
        ("m", ["a", "z"], True),
        ("M", ["a", "z"], False),
        ("z", ["a", "z"], True),
        ("5", [1, 10], False),
        (5, ["1", "10"], False),
        (True, [0, 1], False),
        (5, [1, "10"], False),  # mixed bounds can hold nothing
    ],
)
def test_between_is_inclusive_and_never_true_when_low_is_above_high(
    actual: Any, value: list[Any], expected: bool
) -> None:
    assert holds(trait("between", value), traits={"tier": actual}) is expected


@pytest.mark.parametrize(
    ("actual", "value", "expected"),
    [
        ("hello world", "lo w", True),  # substring of a string
        ("hello world", "hello world", True),
        ("Hello", "hello", False),
        ("abc", "", True),
        ("abc", 1, False),
        (["shoes", "bags"], "bags", True),  # member of a list
        (["shoes", "bags"], "bag", False),
        ([1, 2], 1.0, True),
        ([1], True, False),
        (["1"], 1, False),
        ([["a"]], ["a"], True),
        (5, 5, False),
        ({"bags": 1}, "bags", False),  # not a key of an object
    ],
)
def test_contains(actual: Any, value: Any, expected: bool) -> None:
    assert holds(trait("contains", value), traits={"tier": actual}) is expected


@pytest.mark.parametrize(
    ("actual", "op", "value", "expected"),
    [
        ("gold-plus", "starts_with", "gold", True),
        ("gold-plus", "starts_with", "plus", False),
        ("Gold-plus", "starts_with", "gold", False),
        ("gold", "starts_with", "gold", True),
        (["gold"], "starts_with", "gold", False),
        (5, "starts_with", "5", False),
        ("gold-plus", "ends_with", "plus", True),
        ("gold-plus", "ends_with", "gold", False),
        ("gold-PLUS", "ends_with", "plus", False),
        (["plus"], "ends_with", "plus", False),
    ],
)
def test_starts_with_and_ends_with(actual: Any, op: str, value: str, expected: bool) -> None:
    assert holds(trait(op, value), traits={"tier": actual}) is expected


@pytest.mark.parametrize("actual", ["gold", "", 0, False, [], {}])
def test_exists_is_true_for_any_present_value_even_falsy_ones(actual: Any) -> None:
    assert holds({"trait": "tier", "op": "exists"}, traits={"tier": actual})


EVERY_OPERATOR = [
    ("eq", "gold"),
    ("ne", "gold"),
    ("in", ["gold"]),
    ("not_in", ["gold"]),
    ("gt", 1),
    ("gte", 1),
    ("lt", 1),
    ("lte", 1),
    ("between", [0, 10]),
    ("contains", "g"),
    ("starts_with", "g"),
    ("ends_with", "d"),
    ("exists", None),
]


@pytest.mark.parametrize(("op", "value"), EVERY_OPERATOR)
@pytest.mark.parametrize(
    "traits",
    [
        {},  # missing
        {"tier": None},  # null is missing
        {"other": "gold"},
        None,  # no profile at all
    ],
)
def test_a_missing_or_null_trait_makes_every_operator_false(op: str, value: Any, traits: Any) -> None:
    assert not holds(trait(op, value), traits=traits)


# -- dot paths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("traits", "expected"),
    [
        ({"address": {"country": "DE"}}, True),
        ({"address": {"country": "AT"}}, False),
        ({"address": {"city": "Berlin"}}, False),
        ({"address": {"country": None}}, False),
        ({"address": None}, False),
        ({"address": "DE"}, False),
        ({"address": ["DE"]}, False),
        ({"address.country": "DE"}, False),  # a dot is a path separator, never part of a key
        ({}, False),
    ],
)
def test_dot_paths_read_nested_objects(traits: dict[str, Any], expected: bool) -> None:
    rule = {"trait": "address.country", "op": "eq", "value": "DE"}
    assert holds(rule, traits=traits) is expected


def test_dot_paths_have_no_list_indexing() -> None:
    rule = {"trait": "orders.0", "op": "eq", "value": "A1"}
    # given a list: index 0 is not a key, so the trait is missing
    assert not holds(rule, traits={"orders": ["A1"]})
    assert not holds({"trait": "orders.0", "op": "exists"}, traits={"orders": ["A1"]})
    # given an object whose key is "0": it is an ordinary key
    assert holds(rule, traits={"orders": {"0": "A1"}})


def test_dot_paths_go_as_deep_as_written() -> None:
    rule = {"trait": "a.b.c.d", "op": "gte", "value": 3}
    assert holds(rule, traits={"a": {"b": {"c": {"d": 3}}}})
    assert not holds(rule, traits={"a": {"b": {"c": 3}}})


# ==================================================================================================
# Context conditions


def context(field: str, op: str, value: Any = None) -> dict[str, Any]:
    return {"context": field, "op": op, "value": value}


@pytest.mark.parametrize(
    ("rule", "viewer_kwargs", "expected"),
    [
        (context("device", "eq", "MOBILE"), {"device": "MOBILE"}, True),
        (context("device", "eq", "MOBILE"), {"device": "DESKTOP"}, False),
        (context("device", "in", ["MOBILE", "TABLET"]), {"device": "TABLET"}, True),
        (context("device", "ne", "BOT"), {"device": "DESKTOP"}, True),
        (context("device", "ne", "BOT"), {}, False),  # unknown device: missing, so ne is false
        (context("device", "exists"), {}, False),
        (context("channel", "eq", "EMAIL"), {"channel": "EMAIL"}, True),
        (context("channel", "not_in", ["EMAIL", "PUSH"]), {"channel": "WEB"}, True),
        # country codes are upper-cased at the edge; rule values are compared as written
        (context("country", "eq", "DE"), {"country": "de"}, True),
        (context("country", "eq", "de"), {"country": "DE"}, False),
        (context("country", "in", ["DE", "AT", "CH"]), {"country": "at"}, True),
        # region, city, locale and timezone are strings as given
        (context("region", "eq", "BE"), {"region": "BE"}, True),
        (context("city", "eq", "berlin"), {"city": "Berlin"}, False),
        (context("city", "starts_with", "Ber"), {"city": "Berlin"}, True),
        (context("locale", "starts_with", "de-"), {"locale": "de-AT"}, True),
        (context("locale", "eq", "de-at"), {"locale": "de-AT"}, False),
        (context("timezone", "eq", "Europe/Berlin"), {"timezone": "Europe/Berlin"}, True),
        (context("timezone", "exists"), {}, False),
        (context("region", "exists"), {}, False),
    ],
)
def test_context_fields(rule: dict[str, Any], viewer_kwargs: dict[str, Any], expected: bool) -> None:
    assert holds(rule, who=viewer(**viewer_kwargs)) is expected


def berlin(at: str) -> dict[str, Any]:
    # Berlin is UTC+01:00 in November and January
    return {"who": viewer(t(at), timezone="Europe/Berlin")}


@pytest.mark.parametrize(
    ("utc", "expected"),
    [
        ("2026-11-20T20:59:00+00:00", False),  # 21:59 Berlin
        ("2026-11-20T21:00:00+00:00", True),  # 22:00
        ("2026-11-20T22:30:00+00:00", True),  # 23:30
        ("2026-11-20T23:00:00+00:00", True),  # 00:00 the next day
        ("2026-11-21T04:59:00+00:00", True),  # 05:59
        ("2026-11-21T05:00:00+00:00", True),  # 06:00: hour 6 is in [22, 6]
        ("2026-11-21T05:59:00+00:00", True),  # 06:59: still hour 6
        ("2026-11-21T06:00:00+00:00", False),  # 07:00
        ("2026-11-21T11:00:00+00:00", False),  # 12:00
    ],
)
def test_local_hour_between_wraps_around_midnight(utc: str, expected: bool) -> None:
    assert holds(context("local_hour", "between", [22, 6]), **berlin(utc)) is expected


@pytest.mark.parametrize(
    ("utc", "expected"),
    [
        ("2026-11-20T20:59:00+00:00", False),  # 21:59 Berlin
        ("2026-11-20T21:00:00+00:00", True),  # 22:00
        ("2026-11-20T23:00:00+00:00", True),  # 00:00
        ("2026-11-21T05:00:00+00:00", True),  # 06:00: "from 22:00 through 06:00"
        ("2026-11-21T05:00:59+00:00", True),  # 06:00:59 is still "06:00"
        ("2026-11-21T05:01:00+00:00", False),  # 06:01
        ("2026-11-21T11:00:00+00:00", False),  # 12:00
    ],
)
def test_local_time_between_wraps_around_midnight(utc: str, expected: bool) -> None:
    assert holds(context("local_time", "between", ["22:00", "06:00"]), **berlin(utc)) is expected


@pytest.mark.parametrize(
    ("utc", "hour_rule", "time_rule"),
    [
        ("2026-11-20T07:59:00+00:00", False, False),  # 08:59 Berlin
        ("2026-11-20T08:00:00+00:00", True, True),  # 09:00
        ("2026-11-20T16:30:00+00:00", True, True),  # 17:30: both bounds are inclusive
        ("2026-11-20T16:31:00+00:00", True, False),  # 17:31: hour 17 is in [9, 17], 17:31 is past 17:30
        ("2026-11-20T17:00:00+00:00", False, False),  # 18:00
    ],
)
def test_local_hour_and_local_time_between_without_wrapping(
    utc: str, hour_rule: bool, time_rule: bool
) -> None:
    assert holds(context("local_hour", "between", [9, 17]), **berlin(utc)) is hour_rule
    assert holds(context("local_time", "between", ["09:00", "17:30"]), **berlin(utc)) is time_rule


def test_local_time_compares_as_hh_mm_text() -> None:
    assert holds(context("local_time", "gte", "12:30"), **berlin("2026-11-20T11:30:00+00:00"))  # 12:30
    assert not holds(context("local_time", "gt", "12:30"), **berlin("2026-11-20T11:30:00+00:00"))
    assert holds(context("local_time", "lt", "09:00"), **berlin("2026-11-20T07:05:00+00:00"))  # 08:05


def test_local_hour_uses_utc_when_the_viewer_has_no_time_zone() -> None:
    assert holds(context("local_hour", "eq", 12), who=viewer(NOW))
    assert not holds(context("local_hour", "eq", 13), who=viewer(NOW))


@pytest.mark.parametrize(
    ("utc", "zone", "weekday"),
    [
        ("2026-11-23T10:00:00+00:00", None, 1),  # Monday
        ("2026-11-20T10:00:00+00:00", None, 5),  # Friday
        ("2026-11-22T10:00:00+00:00", None, 7),  # Sunday
        ("2026-11-22T23:30:00+00:00", "Europe/Berlin", 1),  # Sunday in UTC, already Monday in Berlin
        ("2026-11-23T03:00:00+00:00", "America/New_York", 7),  # Monday in UTC, Sunday 22:00 in New York
    ],
)
def test_local_weekday_is_the_iso_weekday_in_the_viewer_time_zone(
    utc: str, zone: str | None, weekday: int
) -> None:
    who = viewer(t(utc), timezone=zone)
    assert holds(context("local_weekday", "eq", weekday), who=who)
    assert not holds(context("local_weekday", "ne", weekday), who=who)


def test_local_weekday_between_never_wraps() -> None:
    # given a Sunday (7) and a Monday (1)
    sunday = viewer(t("2026-11-22T10:00:00+00:00"))
    monday = viewer(t("2026-11-23T10:00:00+00:00"))
    # then [6, 1] ("Saturday to Monday") is never true: only local_hour and local_time wrap
    assert not holds(context("local_weekday", "between", [6, 1]), who=sunday)
    assert not holds(context("local_weekday", "between", [6, 1]), who=monday)
    # and [6, 7] is the weekend
    assert holds(context("local_weekday", "between", [6, 7]), who=sunday)
    assert not holds(context("local_weekday", "between", [6, 7]), who=monday)


def test_between_with_low_above_high_does_not_wrap_for_other_context_fields() -> None:
    who = viewer(country="DE")
    assert not holds(context("country", "between", ["US", "AT"]), who=who)
    assert holds(context("country", "between", ["AT", "US"]), who=who)


@pytest.mark.parametrize(
    ("op", "value", "viewer_at", "expected"),
    [
        # 12:00+01:00 is 11:00 UTC: instants, not text
        ("gte", "2026-11-20T12:00:00+01:00", "2026-11-20T11:00:00+00:00", True),
        ("gte", "2026-11-20T12:00:00+01:00", "2026-11-20T10:59:59+00:00", False),
        ("gt", "2026-11-20T12:00:00+01:00", "2026-11-20T11:00:00+00:00", False),
        ("lt", "2026-11-20T12:00:00+01:00", "2026-11-20T10:59:59+00:00", True),
        ("eq", "2026-11-20T12:00:00+01:00", "2026-11-20T11:00:00+00:00", True),
        ("eq", "2026-11-20T11:00:00Z", "2026-11-20T11:00:00+00:00", True),
        ("eq", "2026-11-20T06:00:00-05:00", "2026-11-20T11:00:00+00:00", True),
        ("ne", "2026-11-20T06:00:00-05:00", "2026-11-20T11:00:00+00:00", False),
        ("eq", "2026-11-20T11:00:00", "2026-11-20T11:00:00+00:00", True),  # no offset: UTC
        ("lte", "2026-11-20T11:00:00", "2026-11-20T11:00:01+00:00", False),
        ("in", ["2026-11-20T12:00:00+01:00"], "2026-11-20T11:00:00+00:00", True),
        (
            "between",
            ["2026-11-20T00:00:00+01:00", "2026-11-20T23:59:59+01:00"],
            "2026-11-19T23:00:00+00:00",
            True,
        ),
        (
            "between",
            ["2026-11-20T00:00:00+01:00", "2026-11-20T23:59:59+01:00"],
            "2026-11-19T22:59:59+00:00",
            False,
        ),
        (
            "between",
            ["2026-11-20T00:00:00+01:00", "2026-11-20T23:59:59+01:00"],
            "2026-11-20T22:59:59+00:00",
            True,
        ),
        (
            "between",
            ["2026-11-20T00:00:00+01:00", "2026-11-20T23:59:59+01:00"],
            "2026-11-20T23:00:00+00:00",
            False,
        ),
    ],
)
def test_at_compares_as_an_instant(op: str, value: Any, viewer_at: str, expected: bool) -> None:
    assert holds(context("at", op, value), who=viewer(t(viewer_at))) is expected


@pytest.mark.parametrize(
    ("rule", "attributes", "expected"),
    [
        (context("attributes.utm.source", "eq", "newsletter"), {"utm": {"source": "newsletter"}}, True),
        (context("attributes.utm.source", "eq", "newsletter"), {"utm": {"source": "Newsletter"}}, False),
        (context("attributes.utm.source", "eq", "newsletter"), {"utm": {"medium": "email"}}, False),
        (context("attributes.utm.source", "ne", "ads"), {}, False),  # missing: ne is false
        (context("attributes.utm.source", "ne", "ads"), {"utm": {"source": None}}, False),  # null is missing
        (context("attributes.page", "starts_with", "/shop"), {"page": "/shop/shoes"}, True),
        (context("attributes.referrer", "contains", "google"), {"referrer": "https://www.google.com/"}, True),
        (context("attributes.visits", "gte", 3), {"visits": 3}, True),
        (context("attributes.visits", "gte", 3), {"visits": "3"}, False),
        (context("attributes.items.0", "exists"), {"items": ["a"]}, False),  # no list indexing
        (context("attributes.ab", "exists"), {"ab": False}, True),
    ],
)
def test_attributes_paths(rule: dict[str, Any], attributes: dict[str, Any], expected: bool) -> None:
    assert holds(rule, who=viewer(attributes=attributes)) is expected


# ==================================================================================================
# Segment conditions


def test_a_segment_condition_is_membership_now() -> None:
    assert holds({"segment": "gold"}, member_of={"gold"})
    assert not holds({"segment": "gold"}, member_of={"vip"})
    assert holds({"not": {"segment": "gold"}}, member_of=())


# ==================================================================================================
# Parsing instants at the edge


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2026-11-20T12:00:00Z", "2026-11-20T12:00:00+00:00"),
        ("2026-11-20T12:00:00+01:00", "2026-11-20T11:00:00+00:00"),
        ("2026-11-20T12:00:00", "2026-11-20T12:00:00+00:00"),  # no offset: UTC
        ("2026-11-20T12:00:00.5-02:30", "2026-11-20T14:30:00.500000+00:00"),
    ],
)
def test_parse_instant_reads_offsets_and_treats_naive_text_as_utc(text: str, utc: str) -> None:
    assert parse_instant(text) == t(utc)


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01T00:00:00Z", "", 1700000000, None])
def test_parse_instant_rejects_what_is_not_a_date_time(text: Any) -> None:
    assert parse_instant(text) is None

"""Behavioural conditions (rules.md, Event, Abandonment, Score, Time; Fine print: retention, duplicates).
Every instant is written out; `now` is the viewer's `at` (NOW = 2026-11-20T12:00:00Z)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from factories import NOW, event, history, holds, score, t, viewer

from content.behaviour import Event, EventLog, latest, window
from content.rules import score_value

S = timedelta(seconds=1)
M = timedelta(minutes=1)
H = timedelta(hours=1)
D = timedelta(days=1)


def purchases(*ages: timedelta) -> EventLog:
    """Purchases made ``age`` before NOW."""
    return history(*(event("purchase", NOW - age) for age in ages))


# ==================================================================================================
# EventLog: the in-memory history


def test_event_log_keeps_the_first_of_events_sharing_an_id() -> None:
    # given two events with id e-1: a purchase, then a refund received later
    log = EventLog(
        [Event("e-1", "purchase", NOW - H), Event("e-1", "refund", NOW), Event("e-2", "refund", NOW)]
    )
    # then the purchase is kept and the second e-1 is dropped
    assert [e.id for e in log.of_type("purchase")] == ["e-1"]
    assert [e.id for e in log.of_type("refund")] == ["e-2"]


def test_event_log_orders_events_by_time_whatever_the_order_received() -> None:
    log = EventLog([Event("b", "view", NOW), Event("a", "view", NOW - H), Event("c", "view", NOW - D)])
    assert [e.id for e in log.of_type("view")] == ["c", "a", "b"]
    assert log.of_type("unknown") == ()


def test_window_is_open_at_the_start_and_closed_at_the_end() -> None:
    log = EventLog([Event(str(i), "view", NOW - i * M) for i in range(5)])  # NOW, NOW-1m ... NOW-4m
    # after NOW-3m (excluded) until NOW-1m (included): NOW-2m and NOW-1m
    assert [e.id for e in window(log, "view", NOW - 3 * M, NOW - M)] == ["2", "1"]
    latest_event = latest(log, "view", NOW - 3 * M, NOW - M)
    assert latest_event is not None
    assert latest_event.id == "1"
    assert latest(log, "view", NOW - 10 * M, NOW - 5 * M) is None


# ==================================================================================================
# Event: counts, where, windows


def test_an_event_alone_means_at_least_once() -> None:
    assert holds({"event": "purchase"}, events=purchases(40 * D))
    assert not holds({"event": "purchase"}, events=history(event("refund", NOW - D)))
    assert not holds({"event": "purchase"})


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        ({"gte": 3}, True),
        ({"gte": 4}, False),
        ({"eq": 3}, True),
        ({"eq": 2}, False),
        ({"gt": 2}, True),
        ({"gt": 3}, False),
        ({"lt": 4}, True),
        ({"lt": 3}, False),
        ({"lte": 3}, True),
        ({"lte": 2}, False),
        ({"eq": 0}, False),
    ],
)
def test_count_compares_the_number_of_matching_events(count: dict[str, int], expected: bool) -> None:
    # given three purchases in the last week
    events = purchases(H, D, 6 * D)
    assert holds({"event": "purchase", "within": "7d", "count": count}, events=events) is expected


def test_count_eq_0_is_true_without_events() -> None:
    rule = {"event": "purchase", "within": "30d", "count": {"eq": 0}}
    assert holds(rule)
    assert holds(rule, events=purchases(31 * D))
    assert not holds(rule, events=purchases(29 * D))


def views(*specs: tuple[timedelta, dict[str, Any]]) -> EventLog:
    return history(
        *(event("product_viewed", NOW - age, f"v{i}", **props) for i, (age, props) in enumerate(specs))
    )


SHOES_AND_BAGS = views(
    (M, {"sku": "A1", "category": "shoes", "price": 120}),
    (2 * M, {"sku": "A2", "category": "shoes", "price": 80}),
    (3 * M, {"sku": "A3", "category": "shoes", "price": 100, "item": {"brand": "Acme"}}),
    (4 * M, {"sku": "B1", "category": "bags", "price": 300, "sale": None}),
)


@pytest.mark.parametrize(
    ("where", "count"),
    [
        ({}, 4),
        ({"category": "shoes"}, 3),
        ({"category": "bags"}, 1),
        ({"category": "Shoes"}, 0),  # equality is case-sensitive
        ({"category": "shoes", "sku": "A2"}, 1),  # every entry must match
        ({"price": 100}, 1),
        ({"price": 100.0}, 1),  # numbers compare as numbers
        ({"price": "100"}, 0),  # but a string is not a number
        ({"price": {"op": "gt", "value": 100}}, 2),  # 120 and 300
        ({"price": {"op": "gte", "value": 100}}, 3),
        ({"price": {"op": "between", "value": [80, 120]}}, 3),
        ({"sku": {"op": "starts_with", "value": "A"}}, 3),
        ({"sku": {"op": "in", "value": ["A1", "B1"]}}, 2),
        ({"category": {"op": "ne", "value": "shoes"}}, 1),
        ({"item.brand": "Acme"}, 1),  # a dot path into properties
        ({"item.brand": {"op": "exists"}}, 1),
        ({"colour": {"op": "ne", "value": "red"}}, 0),  # a missing property never matches, ne included
        ({"sale": {"op": "exists"}}, 0),  # null is missing
        ({"sale": {"op": "ne", "value": True}}, 0),
    ],
)
def test_where_filters_events_by_their_properties(where: dict[str, Any], count: int) -> None:
    rule = {"event": "product_viewed", "where": where, "count": {"eq": count}}
    assert holds(rule, events=SHOES_AND_BAGS)


def test_high_intent_three_product_views_in_ten_minutes() -> None:
    rule = {"event": "product_viewed", "within": "10m", "count": {"gte": 3}}
    three = views((M, {}), (5 * M, {}), (9 * M, {}))
    assert holds(rule, events=three)
    # the oldest view is 9 minutes old: 2 minutes later it is 11 minutes old and out of the window
    assert not holds(rule, at=NOW + 2 * M, events=three)


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (timedelta(0), True),  # t == now is inside (t <= now)
        (S, True),
        (10 * M - S, True),  # now - within < t
        (10 * M, False),  # t == now - within is outside
        (10 * M + S, False),
        (-S, False),  # after now: not yet happened
    ],
)
def test_the_window_is_now_minus_within_exclusive_to_now_inclusive(age: timedelta, expected: bool) -> None:
    assert holds({"event": "purchase", "within": "10m"}, events=purchases(age)) is expected


@pytest.mark.parametrize(
    ("within", "age", "expected"),
    [
        ("30s", 29 * S, True),
        ("30s", 30 * S, False),
        ("2h", 2 * H - S, True),
        ("2h", 2 * H, False),
        ("7d", 7 * D - S, True),
        ("7d", 7 * D, False),
        ("1w", 7 * D - S, True),
        ("1w", 7 * D, False),
    ],
)
def test_every_duration_unit_bounds_the_window(within: str, age: timedelta, expected: bool) -> None:
    assert holds({"event": "purchase", "within": within}, events=purchases(age)) is expected


@pytest.mark.parametrize(
    ("age", "expected"),
    [(89 * D, True), (90 * D - S, True), (90 * D, False), (91 * D, False)],
)
def test_without_within_the_window_is_the_retention_period_of_90_days(age: timedelta, expected: bool) -> None:
    assert holds({"event": "purchase"}, events=purchases(age)) is expected


def test_retention_caps_a_longer_within() -> None:
    # given a purchase 100 days ago and a rule looking back 365 days
    rule = {"event": "purchase", "within": "365d"}
    # then the purchase is older than the 90-day retention and ignored
    assert not holds(rule, events=purchases(100 * D))
    assert holds(rule, events=purchases(89 * D))


def test_a_configured_retention_replaces_90_days() -> None:
    rule = {"event": "purchase"}
    assert holds(rule, events=purchases(29 * D), retention=30 * D)
    assert not holds(rule, events=purchases(30 * D), retention=30 * D)
    assert not holds({"event": "purchase", "within": "60d"}, events=purchases(45 * D), retention=30 * D)


def test_at_risk_bought_before_but_not_in_the_last_30_days() -> None:
    rule = {"all": [{"event": "purchase"}, {"not": {"event": "purchase", "within": "30d"}}]}
    assert holds(rule, events=purchases(40 * D))
    assert not holds(rule, events=purchases(40 * D, 10 * D))
    assert not holds(rule)  # never bought
    # the inactivity flips by time alone: a purchase made 29 days ago makes it true 1 day later
    assert not holds(rule, events=purchases(29 * D))
    assert holds(rule, at=NOW + D, events=purchases(29 * D))
    assert not holds(rule, at=NOW + D - S, events=purchases(29 * D))


def test_events_sharing_an_id_count_once() -> None:
    # given the same purchase received twice, and then a third time with other properties
    events = history(
        event("purchase", NOW - H, "e-1", sku="A"),
        event("purchase", NOW - H, "e-1", sku="A"),
        event("purchase", NOW - M, "e-1", sku="B"),
        event("purchase", NOW - M, "e-2", sku="B"),
    )
    # then e-1 counts once, as first received
    assert holds({"event": "purchase", "count": {"eq": 2}}, events=events)
    assert holds({"event": "purchase", "where": {"sku": "A"}, "count": {"eq": 1}}, events=events)
    assert holds({"event": "purchase", "where": {"sku": "B"}, "count": {"eq": 1}}, events=events)


# ==================================================================================================
# Abandonment

CART = {"event": "add_to_cart", "not_followed_by": "checkout", "for": "15m", "within": "24h"}
T_A = t("2026-11-20T12:00:00+00:00")


def cart(*events: tuple[str, str]) -> EventLog:
    return history(*(event(type_, t(at)) for type_, at in events))


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        ("2026-11-20T12:00:00+00:00", False),
        ("2026-11-20T12:14:59+00:00", False),  # one second before `for`
        ("2026-11-20T12:15:00+00:00", True),  # exactly `for` after the add: now - t_A >= for
        ("2026-11-20T18:00:00+00:00", True),
        ("2026-11-21T11:59:59+00:00", True),  # t_A is still inside now - 24h < t_A
        ("2026-11-21T12:00:00+00:00", False),  # t_A == now - within: no A any more
    ],
)
def test_abandonment_becomes_true_exactly_for_after_the_last_add(now: str, expected: bool) -> None:
    events = cart(("add_to_cart", "2026-11-20T12:00:00+00:00"))
    assert holds(CART, at=t(now), events=events) is expected


def test_adding_again_restarts_the_wait() -> None:
    events = cart(("add_to_cart", "2026-11-20T12:00:00+00:00"), ("add_to_cart", "2026-11-20T12:10:00+00:00"))
    assert not holds(CART, at=t("2026-11-20T12:15:00+00:00"), events=events)
    assert not holds(CART, at=t("2026-11-20T12:24:59+00:00"), events=events)
    assert holds(CART, at=t("2026-11-20T12:25:00+00:00"), events=events)


def test_an_add_after_now_is_not_the_latest_add() -> None:
    events = cart(("add_to_cart", "2026-11-20T12:00:00+00:00"), ("add_to_cart", "2026-11-20T12:20:00+00:00"))
    assert holds(CART, at=t("2026-11-20T12:16:00+00:00"), events=events)


@pytest.mark.parametrize(
    ("checkout", "expected"),
    [
        ("2026-11-20T11:00:00+00:00", True),  # before the add: it started again after
        ("2026-11-20T12:00:00+00:00", True),  # at exactly t_A: t_A < t is strict
        ("2026-11-20T12:00:01+00:00", False),  # after the add: it ended
        ("2026-11-20T12:15:00+00:00", False),  # at now: t <= now
        ("2026-11-20T12:15:01+00:00", True),  # after now: has not happened yet
    ],
)
def test_a_checkout_after_the_add_ends_the_abandonment(checkout: str, expected: bool) -> None:
    events = cart(("add_to_cart", "2026-11-20T12:00:00+00:00"), ("checkout", checkout))
    assert holds(CART, at=t("2026-11-20T12:15:00+00:00"), events=events) is expected


def test_an_add_after_a_checkout_starts_a_new_abandonment() -> None:
    events = cart(
        ("add_to_cart", "2026-11-20T10:00:00+00:00"),
        ("checkout", "2026-11-20T10:05:00+00:00"),
        ("add_to_cart", "2026-11-20T11:00:00+00:00"),
    )
    assert not holds(CART, at=t("2026-11-20T11:14:59+00:00"), events=events)
    assert holds(CART, at=t("2026-11-20T11:15:00+00:00"), events=events)


def test_an_add_older_than_within_is_no_abandonment() -> None:
    # given an add at 11:00 the day before, never checked out
    events = cart(("add_to_cart", "2026-11-19T11:00:00+00:00"))
    # then 25 hours later it is out of the 24h window, and 1 second short of 24 hours it is in
    assert not holds(CART, at=t("2026-11-20T12:00:00+00:00"), events=events)
    assert holds(CART, at=t("2026-11-20T10:59:59+00:00"), events=events)


@pytest.mark.parametrize(("age", "expected"), [(89 * D, True), (90 * D - S, True), (90 * D, False)])
def test_abandonment_within_defaults_to_the_retention_period(age: timedelta, expected: bool) -> None:
    rule = {"event": "add_to_cart", "not_followed_by": "checkout", "for": "15m"}
    assert holds(rule, events=history(event("add_to_cart", NOW - age))) is expected


def test_retention_caps_the_abandonment_window() -> None:
    rule = {"event": "add_to_cart", "not_followed_by": "checkout", "for": "1d", "within": "200d"}
    assert not holds(rule, events=history(event("add_to_cart", NOW - 100 * D)))
    assert holds(rule, events=history(event("add_to_cart", NOW - 80 * D)))


def test_abandonment_for_is_inclusive_at_other_units() -> None:
    rule = {"event": "signup_started", "not_followed_by": "signup_done", "for": "1h"}
    events = history(event("signup_started", NOW))
    assert not holds(rule, at=NOW + H - S, events=events)
    assert holds(rule, at=NOW + H, events=events)


# ==================================================================================================
# Scores: sum(w * 2 ** (-(now - t) / half_life)), rounded to 6 decimals, capped by retention

ENGAGEMENT = score("engagement", {"page_view": 1, "product_viewed": 2, "add_to_cart": 5}, "7d")
SCORES = {"engagement": ENGAGEMENT}


def engagement(op: str, value: Any, events: EventLog, **kwargs: Any) -> bool:
    return holds({"score": "engagement", "op": op, "value": value}, events=events, scores=SCORES, **kwargs)


def test_a_score_decays_by_half_every_half_life() -> None:
    # given a page view now (1 * 1), a product view 7 days ago (2 * 1/2) and an add 14 days ago (5 * 1/4)
    events = history(
        event("page_view", NOW),
        event("product_viewed", NOW - 7 * D),
        event("add_to_cart", NOW - 14 * D),
        event("purchase", NOW),  # not one of the score's types
    )
    # then the score is 1 + 1 + 1.25 = 3.25
    assert score_value(ENGAGEMENT, events, NOW, 90 * D) == 3.25
    assert engagement("eq", 3.25, events)
    assert engagement("gte", 3.25, events)
    assert not engagement("gt", 3.25, events)
    assert engagement("lt", 3.26, events)
    assert engagement("between", [3, 3.5], events)
    assert engagement("ne", 3, events)
    # and 7 days later each term halves: 0.5 + 0.5 + 0.625 = 1.625
    assert engagement("eq", 1.625, events, at=NOW + 7 * D)


def test_a_score_without_events_is_0() -> None:
    assert engagement("eq", 0, history())
    assert not engagement("gt", 0, history())


def test_a_score_is_compared_after_rounding_to_6_decimals() -> None:
    # given one page view half a half-life ago: 2 ** -0.5 = 0.70710678118...
    events = history(event("page_view", NOW - timedelta(days=3.5)))
    # then it compares as 0.707107
    assert engagement("eq", 0.707107, events)
    assert engagement("gte", 0.707107, events)
    assert not engagement("lt", 0.707107, events)
    assert engagement("gt", 0.707106, events)


def test_rounding_hides_floating_point_noise() -> None:
    # given weights 0.1 and 0.2 at now: 0.1 + 0.2 is 0.30000000000000004 in floating point
    tenths = {"tenths": score("tenths", {"a": 0.1, "b": 0.2}, "1d")}
    events = history(event("a", NOW), event("b", NOW))
    # then the score equals 0.3
    assert holds({"score": "tenths", "op": "eq", "value": 0.3}, events=events, scores=tenths)
    assert not holds({"score": "tenths", "op": "gt", "value": 0.3}, events=events, scores=tenths)


def test_a_score_ignores_events_after_now_and_beyond_retention() -> None:
    # given a half-life of 30 days: an event 60 days ago is worth 1/4, one 91 days ago would be ~0.12
    monthly = {"monthly": score("monthly", {"visit": 1}, "30d")}
    events = history(
        event("visit", NOW - 60 * D),
        event("visit", NOW - 91 * D),
        event("visit", NOW - 90 * D),
        event("visit", NOW + H),
    )
    # then only the one 60 days ago counts
    assert holds({"score": "monthly", "op": "eq", "value": 0.25}, events=events, scores=monthly)


def test_a_score_counts_duplicate_event_ids_once() -> None:
    events = history(event("add_to_cart", NOW, "e-1"), event("add_to_cart", NOW, "e-1"))
    assert engagement("eq", 5, events)


def test_score_rules_in_the_viewer_timezone_do_not_shift_time() -> None:
    # `now` is the viewer's instant whatever its time zone
    events = history(event("page_view", NOW - 7 * D))
    who = viewer(NOW, timezone="Asia/Tokyo")
    assert holds({"score": "engagement", "op": "eq", "value": 0.5}, who=who, events=events, scores=SCORES)

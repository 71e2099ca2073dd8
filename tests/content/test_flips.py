"""Time-driven flips (rules.md, Time; issue 3, "Time-driven flips"): when segment membership changes
with the passing of time alone, and the boundaries that say so. Every instant is written out; a
boundary is the earliest instant after the viewer's `at` at which membership can change with no new
event, so membership holds from `at` until just before it."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from factories import evaluation, event, example_snapshot, history, score, snapshot, t, viewer

from content.behaviour import Event, after
from content.rules import Facts, compile_boundary
from content.snapshot import Snapshot

US = timedelta(microseconds=1)
MS = timedelta(milliseconds=1)
M = timedelta(minutes=1)
H = timedelta(hours=1)
D = timedelta(days=1)


def member(snap: Snapshot, key: str, at: datetime, events: Iterable[Event], **kwargs: Any) -> bool:
    return evaluation(snap, viewer(at), events=events, **kwargs).segment(key)


def boundary(snap: Snapshot, key: str, at: datetime, events: Iterable[Event], **kwargs: Any) -> datetime | None:
    return evaluation(snap, viewer(at), events=events, **kwargs).segment_boundary(key)


def walk(snap: Snapshot, key: str, start: datetime, events: Sequence[Event]) -> list[tuple[datetime, bool]]:
    """Follow the boundaries of segment ``key`` from ``start``: each boundary and the membership there."""
    steps: list[tuple[datetime, bool]] = []
    at = boundary(snap, key, start, events)
    while at is not None:
        steps.append((at, member(snap, key, at, events)))
        at = boundary(snap, key, at, events)
    return steps


# ==================================================================================================
# Abandonment: true exactly `for` after the last add-to-cart, false when the add leaves the window

CART = "cart-abandoner"  # add_to_cart not followed by checkout for 15m within 24h (the example bundle)


def test_an_abandonment_turns_true_exactly_for_after_the_add() -> None:
    # given an add-to-cart at 10:00
    snap = example_snapshot()
    adds = [event("add_to_cart", t("2026-11-20T10:00:00+00:00"))]
    # then at 10:00 the next flip is at 10:15:00, when the 15 minutes have passed
    assert not member(snap, CART, t("2026-11-20T10:00:00+00:00"), adds)
    assert boundary(snap, CART, t("2026-11-20T10:00:00+00:00"), adds) == t("2026-11-20T10:15:00+00:00")
    # and a millisecond before it the cart is not abandoned yet, at it the cart is
    assert boundary(snap, CART, t("2026-11-20T10:14:59.999+00:00"), adds) == t("2026-11-20T10:15:00+00:00")
    assert not member(snap, CART, t("2026-11-20T10:14:59.999+00:00"), adds)
    assert member(snap, CART, t("2026-11-20T10:15:00+00:00"), adds)
    # then the next flip is when the add leaves the 24h window: 10:00 the next day, and it is over
    assert boundary(snap, CART, t("2026-11-20T10:15:00+00:00"), adds) == t("2026-11-21T10:00:00+00:00")
    assert member(snap, CART, t("2026-11-21T09:59:59.999999+00:00"), adds)
    assert not member(snap, CART, t("2026-11-21T10:00:00+00:00"), adds)
    # and after that time alone changes nothing
    assert boundary(snap, CART, t("2026-11-21T10:00:00+00:00"), adds) is None


def test_a_checkout_ends_the_abandonment_before_it_starts() -> None:
    # given an add-to-cart at 10:00 and a checkout at 10:05
    snap = example_snapshot()
    events = [event("add_to_cart", t("2026-11-20T10:00:00+00:00")), event("checkout", t("2026-11-20T10:05:00+00:00"))]
    # then at 10:05 the cart is not abandoned, and time alone never makes it so
    assert not member(snap, CART, t("2026-11-20T10:05:00+00:00"), events)
    assert boundary(snap, CART, t("2026-11-20T10:05:00+00:00"), events) is None
    assert not member(snap, CART, t("2026-11-20T10:15:00+00:00"), events)
    # nor at 10:00, when the checkout is still ahead in the history
    assert boundary(snap, CART, t("2026-11-20T10:00:00+00:00"), events) is None


def test_adding_again_moves_the_flip() -> None:
    # given adds at 10:00 and 10:10: at 10:12 the wait restarted at 10:10
    snap = example_snapshot()
    adds = [event("add_to_cart", t("2026-11-20T10:00:00+00:00")), event("add_to_cart", t("2026-11-20T10:10:00+00:00"))]
    assert boundary(snap, CART, t("2026-11-20T10:12:00+00:00"), adds) == t("2026-11-20T10:25:00+00:00")
    # seen from 10:05, the second add is ahead: the flips are 10:25 (true) and 10:10 the next day (false)
    assert walk(snap, CART, t("2026-11-20T10:05:00+00:00"), adds) == [
        (t("2026-11-20T10:25:00+00:00"), True),
        (t("2026-11-21T10:10:00+00:00"), False),
    ]


def test_a_checkout_ahead_in_the_history_ends_an_abandonment_at_its_instant() -> None:
    # given an add at 10:00 and a checkout at 10:20 (ahead of the viewer's 10:15)
    snap = example_snapshot()
    events = [event("add_to_cart", t("2026-11-20T10:00:00+00:00")), event("checkout", t("2026-11-20T10:20:00+00:00"))]
    assert member(snap, CART, t("2026-11-20T10:15:00+00:00"), events)
    # then the abandonment ends at 10:20 exactly
    assert boundary(snap, CART, t("2026-11-20T10:15:00+00:00"), events) == t("2026-11-20T10:20:00+00:00")
    assert not member(snap, CART, t("2026-11-20T10:20:00+00:00"), events)


# ==================================================================================================
# Event counts: an event stops counting `within` after its instant

INTENT = "high-intent"  # 3 product views within 10m (the example bundle)


def views(*instants: str) -> list[Event]:
    return [event("product_viewed", t(f"2026-11-20T{hhmm}:00+00:00")) for hhmm in instants]


def test_the_window_leaves_the_segment_when_the_oldest_view_leaves_it() -> None:
    # given views at 10:00, 10:02 and 10:04
    snap = example_snapshot()
    three = views("10:00", "10:02", "10:04")
    # then at 10:04 the viewer is a member until 10:10:00, when the 10:00 view leaves the window
    assert member(snap, INTENT, t("2026-11-20T10:04:00+00:00"), three)
    assert boundary(snap, INTENT, t("2026-11-20T10:04:00+00:00"), three) == t("2026-11-20T10:10:00+00:00")
    assert member(snap, INTENT, t("2026-11-20T10:09:59.999999+00:00"), three)
    assert not member(snap, INTENT, t("2026-11-20T10:10:00+00:00"), three)
    # and with two views left, the count can only fall: time alone brings nobody back
    assert boundary(snap, INTENT, t("2026-11-20T10:10:00+00:00"), three) is None


def test_a_fourth_view_at_10_11_re_enters_until_10_02_leaves() -> None:
    # given views at 10:00, 10:02, 10:04 and a fourth at 10:11: 10:02, 10:04 and 10:11 make 3 again
    snap = example_snapshot()
    four = views("10:00", "10:02", "10:04", "10:11")
    assert member(snap, INTENT, t("2026-11-20T10:11:00+00:00"), four)
    assert boundary(snap, INTENT, t("2026-11-20T10:11:00+00:00"), four) == t("2026-11-20T10:12:00+00:00")
    # then walking from 10:04 (the fourth view still ahead), every flip is found at its instant
    assert walk(snap, INTENT, t("2026-11-20T10:04:00+00:00"), four) == [
        (t("2026-11-20T10:10:00+00:00"), False),  # 10:00 leaves
        (t("2026-11-20T10:11:00+00:00"), True),  # the fourth view arrives
        (t("2026-11-20T10:12:00+00:00"), False),  # 10:02 leaves
    ]
    # and from before the first view, the only earlier flip is the third view's arrival
    assert walk(snap, INTENT, t("2026-11-20T09:59:00+00:00"), four)[0] == (t("2026-11-20T10:04:00+00:00"), True)


def test_a_fourth_view_does_not_re_enter_a_segment_that_the_window_has_left() -> None:
    # given views at 10:00, 10:02, 10:04 and a fourth at 10:13, after 10:02 left at 10:12
    snap = example_snapshot()
    four = views("10:00", "10:02", "10:04", "10:13")
    # then at 10:13 only 10:04 and 10:13 count: not a member, and time alone changes nothing
    assert not member(snap, INTENT, t("2026-11-20T10:13:00+00:00"), four)
    assert boundary(snap, INTENT, t("2026-11-20T10:13:00+00:00"), four) is None
    assert walk(snap, INTENT, t("2026-11-20T10:04:00+00:00"), four) == [(t("2026-11-20T10:10:00+00:00"), False)]


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        # views at 10:00, 10:02, 10:04 within 10m; seen at 10:04, they leave at 10:10, 10:12, 10:14
        ({"gte": 1}, "2026-11-20T10:14:00+00:00"),  # true until the last one leaves
        ({"gte": 2}, "2026-11-20T10:12:00+00:00"),
        ({"eq": 2}, "2026-11-20T10:10:00+00:00"),  # false now, true when the first leaves
        ({"lt": 2}, "2026-11-20T10:12:00+00:00"),
        ({"lte": 3}, None),  # true now and for good: the count only falls
        ({"gt": 3}, None),
    ],
)
def test_a_count_flips_when_its_comparison_turns_not_whenever_an_event_leaves(
    count: dict[str, int], expected: str | None
) -> None:
    snap = snapshot(segments=[{"key": "s", "rule": {"event": "product_viewed", "within": "10m", "count": count}}])
    at = boundary(snap, "s", t("2026-11-20T10:04:00+00:00"), views("10:00", "10:02", "10:04"))
    assert at == (None if expected is None else t(expected))


def test_only_events_matching_where_set_a_boundary() -> None:
    # given a shoe view at 10:00 and a hat view at 10:05, and a segment of shoe views within 10m
    snap = snapshot(
        segments=[{"key": "s", "rule": {"event": "product_viewed", "where": {"category": "shoes"}, "within": "10m"}}]
    )
    events = [
        event("product_viewed", t("2026-11-20T10:00:00+00:00"), category="shoes"),
        event("product_viewed", t("2026-11-20T10:05:00+00:00"), category="hats"),
    ]
    # then at 10:05 the flip is when the shoe view leaves, at 10:10
    assert boundary(snap, "s", t("2026-11-20T10:05:00+00:00"), events) == t("2026-11-20T10:10:00+00:00")


def test_events_at_the_same_instant_leave_together() -> None:
    # given two views at 10:00 and one at 10:01, and a segment of exactly one view within 10m
    snap = snapshot(segments=[{"key": "s", "rule": {"event": "v", "within": "10m", "count": {"eq": 1}}}])
    events = [
        event("v", t("2026-11-20T10:00:00+00:00"), "a"),
        event("v", t("2026-11-20T10:00:00+00:00"), "b"),
        event("v", t("2026-11-20T10:01:00+00:00"), "c"),
    ]
    # then the count goes 3 -> 1 at 10:10 (never 2): the flip is at 10:10, and at 10:11 it ends
    assert walk(snap, "s", t("2026-11-20T10:02:00+00:00"), events) == [
        (t("2026-11-20T10:10:00+00:00"), True),
        (t("2026-11-20T10:11:00+00:00"), False),
    ]


def test_retention_caps_the_window_of_a_boundary() -> None:
    # given a retention of 30 days, a purchase 29 days ago counts until day 30, whatever `within` says
    snap = snapshot(segments=[{"key": "buyer", "rule": {"event": "purchase", "within": "60d"}}], retention=30 * D)
    purchase = [event("purchase", t("2026-11-01T08:00:00+00:00"))]
    assert boundary(snap, "buyer", t("2026-11-30T08:00:00+00:00"), purchase) == t("2026-12-01T08:00:00+00:00")


# ==================================================================================================
# Inactivity: bought before, but not within 30 days


def test_inactivity_begins_30_days_after_the_purchase_and_ends_with_retention() -> None:
    # given one purchase at T and the example's at-risk segment (purchase, and none within 30d)
    snap = example_snapshot()
    purchase = [event("purchase", t("2026-08-01T09:30:00+00:00"))]
    # then at T the next flip is T + 30d: at-risk from then on, not a microsecond before
    assert boundary(snap, "at-risk", t("2026-08-01T09:30:00+00:00"), purchase) == t("2026-08-31T09:30:00+00:00")
    assert not member(snap, "at-risk", t("2026-08-31T09:29:59.999999+00:00"), purchase)
    assert member(snap, "at-risk", t("2026-08-31T09:30:00+00:00"), purchase)
    # and T + 90d, when the purchase leaves retention and the viewer never bought as far as we know
    assert boundary(snap, "at-risk", t("2026-08-31T09:30:00+00:00"), purchase) == t("2026-10-30T09:30:00+00:00")
    assert member(snap, "at-risk", t("2026-10-30T09:29:59.999999+00:00"), purchase)
    assert not member(snap, "at-risk", t("2026-10-30T09:30:00+00:00"), purchase)
    assert boundary(snap, "at-risk", t("2026-10-30T09:30:00+00:00"), purchase) is None


# ==================================================================================================
# Scores: decay across a threshold, after rounding to 6 decimals

T = t("2026-11-20T10:00:00+00:00")


def scored(op: str, value: Any, weights: Mapping[str, float]) -> Snapshot:
    return snapshot(
        scores=[{"key": "e", "events": dict(weights), "half_life": "1h"}],
        segments=[{"key": "s", "rule": {"score": "e", "op": op, "value": value}}],
    )


def test_a_score_decays_below_its_threshold_at_the_first_microsecond_it_rounds_below() -> None:
    # given one view of weight 8 at T, half-life 1h, and the segment score >= 2
    snap = scored("gte", 2, {"view": 8})
    views_ = [event("view", T)]
    # the value is 8 * 2 ** (-x / 3600) after x seconds: exactly 2 at T + 2h, which still rounds to 2.
    # It rounds below 2 once it is below 1.9999995, i.e. x > 7200 + 3600 * log2(2 / 1.9999995)
    #   = 7200 + 3600 * 2.5e-7 / ln 2 (to 1e-13) = 7200.00129843 s: the first microsecond is T + 2h + 1299us.
    at = boundary(snap, "s", T, views_)
    assert at == T + 2 * H + 1299 * US
    assert not member(snap, "s", at, views_)
    assert member(snap, "s", at - US, views_)
    assert member(snap, "s", T + 2 * H, views_)  # the true crossing: 2.000000 >= 2
    assert member(snap, "s", T + 2 * H - MS, views_)
    # and after it, nothing but retention: the view leaves at T + 90d (and the value was 0 long before)
    assert boundary(snap, "s", at, views_) == T + 90 * D


def test_a_score_between_two_values_is_entered_and_left_as_it_decays() -> None:
    # given 8 at T, half-life 1h, and the segment 1 <= score <= 2
    snap = scored("between", [1, 2], {"view": 8})
    views_ = [event("view", T)]
    # it enters when the value rounds to 2, below 2.0000005: x > 7200 - 3600 * 2.5e-7 / ln 2 = 7199.99870157 s;
    # it leaves when the value rounds below 1, below 0.9999995: x > 10800 + 3600 * 5e-7 / ln 2 = 10800.00259686 s
    assert walk(snap, "s", T, views_) == [
        (T + 2 * H - 1298 * US, True),
        (T + 3 * H + 2597 * US, False),
        (T + 90 * D, False),  # the view leaves retention: a boundary, if no longer a flip
    ]


def test_negative_weights_decay_towards_zero_too() -> None:
    # given refunds of weight -4 (two of them, -8 in all) and a view of weight 8 an hour later
    snap = scored("gt", -1, {"refund": -4, "view": 8})
    refunds = [event("refund", T, "r1"), event("refund", T, "r2")]
    # -8 * 2 ** (-x / 3600) > -1 once it rounds to -0.999999, above -0.9999995: x > 10800 + 3600 * 5e-7 / ln 2
    assert boundary(snap, "s", T, refunds) == T + 3 * H + 2597 * US
    # a view ahead in the history changes the sum when it arrives: that is the next boundary
    ahead = [*refunds, event("view", T + H)]
    assert boundary(snap, "s", T, ahead) == T + H
    # at T + 1h the sum is -4 + 8 = 4 > -1: a member from the view on
    assert not member(snap, "s", T + H - US, ahead)
    assert member(snap, "s", T + H, ahead)


def test_a_score_without_events_has_no_boundary() -> None:
    assert boundary(scored("lt", 1, {"view": 8}), "s", T, []) is None
    # a score that is 0 compared with 0 stays so
    assert boundary(scored("eq", 0, {"view": 8}), "s", T, [event("other", T)]) is None


def test_a_score_reaches_zero_after_rounding() -> None:
    # given 1 at T, half-life 1h, and the segment score > 0
    snap = scored("gt", 0, {"view": 1})
    views_ = [event("view", T)]
    # it rounds to 0 below 5e-7: x > 3600 * log2(1 / 5e-7) = 3600 * 20.931568569324174 = 75353.64684956703 s
    assert boundary(snap, "s", T, views_) == T + timedelta(seconds=75353, microseconds=646850)
    assert member(snap, "s", T + timedelta(seconds=75353, microseconds=646849), views_)


# ==================================================================================================
# Segments referring to segments; traits; the snapshot's indexes; consent

CONFIG: dict[str, Any] = {
    "scores": [{"key": "engagement", "events": {"page_view": 1, "add_to_cart": 5}, "half_life": "7d"}],
    "segments": [
        {"key": "gold", "priority": 20, "rule": {"trait": "tier", "op": "eq", "value": "gold"}},
        {"key": "cart", "rule": {"event": "add_to_cart", "not_followed_by": "checkout", "for": "15m"}},
        {"key": "gold-cart", "priority": 10, "rule": {"all": [{"segment": "gold"}, {"segment": "cart"}]}},
        {"key": "rescue", "priority": 5, "rule": {"not": {"segment": "gold-cart"}}},
        {"key": "engaged", "priority": 30, "rule": {"score": "engagement", "op": "gte", "value": 10}},
        {"key": "gold-or-engaged", "rule": {"any": [{"segment": "gold"}, {"segment": "engaged"}]}},
        {"key": "buyer", "priority": -1, "rule": {"event": "purchase"}},
    ],
}


def config_snapshot() -> Snapshot:
    return snapshot(scores=CONFIG["scores"], segments=CONFIG["segments"])


def test_timed_segments_are_those_reading_events_directly_or_through_references() -> None:
    snap = config_snapshot()
    # in segment order: engaged (30), gold-cart (10), rescue (5), then priority 0 by key, then buyer (-1)
    assert snap.segment_order == ("engaged", "gold", "gold-cart", "rescue", "cart", "gold-or-engaged", "buyer")
    assert snap.timed_segments == ("engaged", "gold-cart", "rescue", "cart", "gold-or-engaged", "buyer")


def test_segments_by_event_type_follow_references_in_priority_order() -> None:
    assert dict(config_snapshot().segments_by_event_type) == {
        "add_to_cart": ("engaged", "gold-cart", "rescue", "cart", "gold-or-engaged"),  # the score and the cart
        "checkout": ("gold-cart", "rescue", "cart"),
        "page_view": ("engaged", "gold-or-engaged"),
        "purchase": ("buyer",),
    }


def test_a_segment_referring_to_a_timed_segment_inherits_its_boundary() -> None:
    snap = config_snapshot()
    add = [event("add_to_cart", t("2026-11-20T10:00:00+00:00"))]
    at = t("2026-11-20T10:05:00+00:00")
    gold = evaluation(snap, viewer(at), traits={"tier": "gold"}, events=add)
    assert gold.segment_boundary("cart") == t("2026-11-20T10:15:00+00:00")
    assert gold.segment_boundary("gold-cart") == t("2026-11-20T10:15:00+00:00")
    assert gold.segment_boundary("rescue") == t("2026-11-20T10:15:00+00:00")
    assert gold.segment_boundary("gold") is None
    # for a silver viewer "gold and cart" stays false whatever time does, so it has no boundary
    silver = evaluation(snap, viewer(at), traits={"tier": "silver"}, events=add)
    assert silver.segment_boundary("gold-cart") is None
    assert silver.segment_boundary("rescue") is None
    assert silver.segment_boundary("cart") == t("2026-11-20T10:15:00+00:00")
    # and "gold or engaged" stays true for a gold viewer, while the engagement score decays
    assert gold.segment_boundary("gold-or-engaged") is None
    assert silver.segment_boundary("gold-or-engaged") is not None  # the add leaves retention some day


def test_next_change_is_the_earliest_boundary_of_the_timed_segments() -> None:
    snap = config_snapshot()
    # an add at 10:00 (engagement 5, decaying) and a purchase on 2026-09-01 (a buyer until it leaves retention)
    events = [event("add_to_cart", t("2026-11-20T10:00:00+00:00")), event("purchase", t("2026-09-01T00:00:00+00:00"))]
    ev = evaluation(snap, viewer(t("2026-11-20T10:05:00+00:00")), traits={"tier": "gold"}, events=events)
    assert ev.next_change() == t("2026-11-20T10:15:00+00:00")  # the cart, before all else
    assert ev.next_change(["buyer"]) == t("2026-11-30T00:00:00+00:00")  # 2026-09-01 + 90d
    assert ev.next_change(["gold", "unknown"]) is None
    assert ev.next_change([]) is None


def test_without_consent_nothing_changes_with_time() -> None:
    snap = config_snapshot()
    add = [event("add_to_cart", t("2026-11-20T10:00:00+00:00"))]
    ev = evaluation(snap, viewer(t("2026-11-20T10:05:00+00:00")), traits={"tier": "gold"}, events=add, consent=False)
    assert ev.next_change() is None
    assert ev.next_change(["cart"]) is None
    assert ev.segment_boundary("cart") is None


def test_trait_only_segments_and_unknown_segments_have_no_boundary() -> None:
    ev = evaluation(config_snapshot(), traits={"tier": "gold"})
    assert ev.segment_boundary("gold") is None
    assert ev.segment_boundary("nope") is None


def test_facts_without_segment_boundaries_answer_none_for_references() -> None:
    # callers that build Facts as before get no boundary for a segment reference
    facts = Facts(viewer(T), traits=None, history=history(), retention=90 * D, segment=lambda key: False)
    assert compile_boundary({"segment": "gold"}, {})(facts) is None
    assert compile_boundary({"context": "local_hour", "op": "gte", "value": 18}, {})(facts) is None
    scores = {"e": score("e", {"view": 1}, "1h")}
    assert compile_boundary({"score": "e", "op": "gt", "value": 0}, scores)(facts) is None


def test_after_lists_the_events_later_than_an_instant() -> None:
    log = history(*views("10:00", "10:02", "10:04"))
    assert [e.at for e in after(log, "product_viewed", t("2026-11-20T10:02:00+00:00"))] == [
        t("2026-11-20T10:04:00+00:00")
    ]
    assert after(log, "other", T) == ()


# ==================================================================================================
# Property: walking next_change never skips a flip

PROPERTY_SEGMENTS: list[dict[str, Any]] = [
    {"key": "gold", "rule": {"trait": "tier", "op": "eq", "value": "gold"}},
    {"key": "viewers", "rule": {"event": "view", "within": "1h", "count": {"gte": 2}}},
    {"key": "one-big-view", "rule": {"event": "view", "where": {"big": True}, "within": "3h", "count": {"eq": 1}}},
    {"key": "abandoner", "rule": {"event": "cart", "not_followed_by": "buy", "for": "30m", "within": "6h"}},
    {"key": "lapsed", "rule": {"all": [{"event": "buy"}, {"not": {"event": "buy", "within": "12h"}}]}},
    {"key": "engaged", "rule": {"score": "engagement", "op": "gte", "value": 2}},
    {"key": "middling", "rule": {"score": "engagement", "op": "between", "value": [0.5, 1.5]}},
    {"key": "owing", "rule": {"score": "engagement", "op": "lt", "value": 0}},
    {"key": "gold-abandoner", "rule": {"all": [{"segment": "gold"}, {"segment": "abandoner"}]}},
    {"key": "either", "rule": {"any": [{"segment": "viewers"}, {"segment": "engaged"}, {"segment": "gold"}]}},
]
# Counts and abandonments have exact boundaries (each one a flip); scores and combinations may be early.
EXACT = ("viewers", "one-big-view", "abandoner", "gold-abandoner")
START = t("2026-11-20T00:00:00+00:00")
HORIZON = START + 2 * D


def random_history(rng: random.Random) -> list[Event]:
    """Up to 12 events from two days before START to HORIZON, some sharing an instant."""
    instants: list[datetime] = []
    events: list[Event] = []
    for index in range(rng.randrange(13)):
        if instants and rng.random() < 0.2:
            at = rng.choice(instants)
        else:
            at = START + timedelta(microseconds=rng.randrange(-2 * 86_400_000_000, 2 * 86_400_000_000))
        instants.append(at)
        type_ = rng.choice(("view", "view", "cart", "buy", "refund"))
        events.append(event(type_, at, f"e{index}", big=rng.random() < 0.5))
    return events


def memberships(
    snap: Snapshot, at: datetime, events: Sequence[Event], traits: Mapping[str, Any], keys: Sequence[str]
) -> list[str]:
    ev = evaluation(snap, viewer(at), traits=traits, events=events)
    return [key for key in keys if ev.segment(key)]


def test_walking_next_change_never_skips_a_flip() -> None:
    snap = snapshot(
        scores=[{"key": "engagement", "events": {"view": 1, "cart": 3, "refund": -2}, "half_life": "6h"}],
        segments=PROPERTY_SEGMENTS,
        retention=2 * D,
    )
    rng = random.Random(20261120)
    walked = flips = 0
    for _ in range(400):
        events = random_history(rng)
        traits = {"tier": rng.choice(("gold", "silver"))}
        # every timed segment at once (the earliest boundary of all), or one alone (its own boundaries,
        # so that another segment's boundary cannot hide a late one)
        chosen = rng.choice((None, *snap.timed_segments))
        keys = snap.segment_order if chosen is None else (chosen,)
        at = START
        while at < HORIZON:
            now = memberships(snap, at, events, traits, keys)
            following = evaluation(snap, viewer(at), traits=traits, events=events).next_change(
                None if chosen is None else keys
            )
            assert following is None or following > at
            until = HORIZON if following is None else min(following, HORIZON)
            # membership is constant from `at` until just before the boundary
            samples = [until - US, *(at + (until - at) * rng.random() for _ in range(3))]
            for sample in samples:
                if sample > at:
                    assert memberships(snap, sample, events, traits, keys) == now, (events, traits, at, sample)
            if following is None:
                break
            flipped = memberships(snap, following, events, traits, keys) != now
            assert flipped or chosen not in EXACT, (events, traits, at, following)
            flips += flipped
            walked += 1
            at = following
    # the walk went somewhere (with this seed: 1,452 boundaries, 729 of them flips; the others are early
    # boundaries of scores and combinations, which are allowed)
    assert walked > 1000
    assert flips > 500

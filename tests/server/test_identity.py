"""Identity, consent and deletion of issue 3 (rules.md, Fine print: identity, consent), in both modes:
identify and alias join an anonymous history to a user's, the merged viewer keeps an experiment arm
bucketed by anonymousId, a viewer who withheld consent leaves no events and is evaluated as
anonymous, and ``deleteViewerData`` removes a viewer everywhere and says what it removed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from fixtures_app import T0

from server.events import LocalEventStore
from server.ingest import Ingestor
from server.store import IdentityRepository, ProfileRepository
from tests.server.factories import (
    block,
    bundle,
    expected_arm,
    experiment_variant,
    given,
    mutate,
    placed,
    placement,
    segment,
    trait,
)
from tests.server.test_worker import (
    MODES,
    REDIS_ONLY,
    SCORES,
    SEGMENTS,
    Backend,
    Live,
    change,
    choose_backend,
    event,
    live_app,
)

EXPERIMENT = "hero-spring"
WEIGHTS = {"control": 50, "bold": 50}
RULES = bundle(
    segments=[*SEGMENTS, segment("gold", trait("tier", "eq", "gold"), priority=40)],
    scores=SCORES,
    placements=[placement("home-hero")],
    blocks=[
        block(
            "hero",
            placements=[placed("home-hero")],
            variants=[experiment_variant("spring", EXPERIMENT, WEIGHTS, stickiness="anonymousId")],
        ),
        block("promo", placements=[placed("home-hero")], variants=[experiment_variant("promo-test", "promo", WEIGHTS)]),
    ],
)
BLOCK = "query Block($key: String!, $viewer: ViewerInput) { block(key: $key, viewer: $viewer) { variant } }"
DELETE = """
mutation Delete($userId: String, $anonymousId: String) {
  deleteViewerData(userId: $userId, anonymousId: $anonymousId) { ok result errors { path message code } }
}
"""


@pytest.fixture(params=MODES)
def backend(request: pytest.FixtureRequest) -> Backend:
    return choose_backend(request)


@pytest.fixture
async def live(backend: Backend) -> AsyncIterator[Live]:
    async with live_app(backend, document=RULES) as running:
        yield running


def shoe_view(user: str | None = None, anon: str | None = None, **fields: Any) -> dict[str, Any]:
    return event("product_viewed", user, anon=anon, category="shoes", **fields)


async def variant(live: Live, key: str, **viewer: Any) -> str | None:
    reply = await live.running.graphql(BLOCK, {"key": key, "viewer": viewer})
    assert reply.errors == [], reply.errors
    return reply.data["block"]["variant"] if reply.data["block"] else None


async def identities(live: Live) -> list[tuple[str, str]]:
    async with live.services.sessions() as session:
        return sorted(await IdentityRepository(session).all())


# -- identify and alias ------------------------------------------------------------------------------


async def test_identify_makes_the_anonymous_events_count_for_the_user(live: Live) -> None:
    # Given two shoe views as an anonymous visitor, and one as the user (no segment either way)
    await live.send(shoe_view(anon="a-1"), shoe_view(anon="a-1"), shoe_view("u-1"))
    assert await live.segments(anonymousId="a-1") == []
    assert await live.segments(userId="u-1") == []
    assert await live.announced() == []

    # When the visitor logs in
    await live.services.ingest.identify(user_id="u-1", anonymous_id="a-1")

    # Then the user's segments count all three views, and the change is announced for the user
    assert await live.segments(userId="u-1") == ["shoe-browser"]
    assert await live.segments(userId="u-1", anonymousId="a-1") == ["shoe-browser"]
    assert await live.announced() == [change("u:u-1", T0, entered=["shoe-browser"])]
    assert await identities(live) == [("a-1", "u-1")]
    assert len(await live.state(["product_viewed"], user_id="u-1")) == 3


async def test_alias_joins_like_identify(live: Live) -> None:
    await live.send(event("add_to_cart", anon="a-1"))
    await live.services.ingest.alias(previous_id="a-1", user_id="u-1")

    # the user inherits the anonymous cart: abandoned 15 minutes after it, announced for the user
    await live.at(T0 + timedelta(minutes=15))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=15), entered=["cart-abandoner"])]
    assert await live.segments(userId="u-1") == ["cart-abandoner"]


async def test_an_event_carrying_both_ids_joins_them(live: Live) -> None:
    await live.send(shoe_view(anon="a-1"), shoe_view(anon="a-1"))
    await live.send(shoe_view("u-1", anon="a-1"))

    assert await live.segments(userId="u-1") == ["shoe-browser"]
    assert await live.announced() == [change("u:u-1", T0, entered=["shoe-browser"])]
    assert await identities(live) == [("a-1", "u-1")]


async def test_an_event_of_any_type_carrying_both_ids_re_evaluates_every_segment_of_the_user(live: Live) -> None:
    # Given two shoe views as a visitor and one as the user
    await live.send(shoe_view(anon="a-1"), shoe_view(anon="a-1"), shoe_view("u-1"))

    # When a page view (which no count of shoe views depends on) joins the two ids
    await live.send(event("page_view", "u-1", anon="a-1"))

    # Then the user is announced in the segment that the joined views make
    assert await live.segments(userId="u-1") == ["shoe-browser"]
    assert await live.announced() == [change("u:u-1", T0, entered=["shoe-browser"])]


async def test_after_identify_anonymous_events_count_for_the_user(live: Live) -> None:
    # Given a visitor who logged in
    await live.send(shoe_view(anon="a-1"))
    await live.services.ingest.identify(user_id="u-1", anonymous_id="a-1")

    # When the tracker goes on sending the anonymous id alone
    await live.send(shoe_view(anon="a-1"), shoe_view(anon="a-1"))

    # Then the events are the user's, and so is the announcement
    assert await live.segments(userId="u-1") == ["shoe-browser"]
    assert await live.announced() == [change("u:u-1", T0, entered=["shoe-browser"])]
    # ... and so are the flips: the user leaves when the window passes, announced once, as the user
    await live.at(T0 + timedelta(minutes=10))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=10), left=["shoe-browser"])]


async def test_the_anonymous_visitors_memberships_move_to_the_user(live: Live) -> None:
    # Given an anonymous visitor in a segment, with a flip to come (the window passing)
    await live.send(shoe_view(anon="a-1"), shoe_view(anon="a-1"), shoe_view(anon="a-1"))
    assert await live.announced() == [change("a:a-1", T0, entered=["shoe-browser"])]

    # When they log in
    live.clock.advance(minutes=1)
    await live.services.ingest.identify(user_id="u-1", anonymous_id="a-1")

    # Then the user is in it, and the flip to come is the user's alone
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=1), entered=["shoe-browser"])]
    await live.at(T0 + timedelta(minutes=10))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=10), left=["shoe-browser"])]


async def test_an_event_carrying_both_ids_moves_the_memberships_and_flips_to_the_user(live: Live) -> None:
    # Given an anonymous visitor in a segment, with a flip to come (the window passing)
    await live.send(shoe_view(anon="a-1"), shoe_view(anon="a-1"), shoe_view(anon="a-1"))
    assert await live.announced() == [change("a:a-1", T0, entered=["shoe-browser"])]

    # When one batch holds the visitor's next event and one carrying both ids (the login)
    live.clock.advance(minutes=1)
    await live.send(shoe_view(anon="a-1"), event("page_view", "u-1", anon="a-1"))

    # Then the user is announced in it, the visitor is not announced again, and the flip is the user's
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=1), entered=["shoe-browser"])]
    await live.at(T0 + timedelta(minutes=11))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=11), left=["shoe-browser"])]


async def test_an_experiment_arm_sticky_to_the_anonymous_id_survives_the_login(live: Live) -> None:
    # (a-1 and u-1 fall in different arms: the test would prove nothing otherwise)
    assert expected_arm(EXPERIMENT, "a-1", WEIGHTS) == "control" != expected_arm(EXPERIMENT, "u-1", WEIGHTS)
    assert await variant(live, "hero", anonymousId="a-1") == "control"
    await live.send(shoe_view(anon="a-1"))

    await live.services.ingest.identify(user_id="u-1", anonymous_id="a-1", traits={"tier": "gold"})

    assert await variant(live, "hero", userId="u-1", anonymousId="a-1") == "control"
    # while an experiment with the default stickiness follows the user id
    assert await variant(live, "promo", userId="u-1", anonymousId="a-1") == expected_arm("promo", "u-1", WEIGHTS)


# -- consent -----------------------------------------------------------------------------------------


async def test_a_viewer_without_consent_stores_no_events_and_is_evaluated_as_anonymous(live: Live) -> None:
    # Given a gold profile that withheld consent to personalization
    await live.services.ingest.identify(user_id="u-1", traits={"tier": "gold"}, consent={"personalization": False})

    # When their events are tracked
    result = await live.send(shoe_view("u-1"), shoe_view("u-1"), shoe_view("u-1"), event("add_to_cart", "u-1"))

    # Then they are accepted, and stored nowhere
    assert result == {"accepted": 4, "rejected": 0, "errors": []}
    assert await live.stored(user_id="u-1") == []
    assert await live.state(["product_viewed", "add_to_cart"], user_id="u-1") == []
    # and the viewer is anonymous: no segments (not even by trait), no experiment unit, no flips
    assert await live.segments(userId="u-1") == []
    assert await variant(live, "promo", userId="u-1") == "default"
    await live.at(T0 + timedelta(minutes=15))
    assert await live.announced() == []


async def test_a_bundle_profile_without_consent_withholds_events_too(live: Live) -> None:
    await given(live.running, bundle(profiles=[{"userId": "u-1", "consent": {"personalization": False}}]))
    await live.send(shoe_view("u-1"))
    assert await live.stored(user_id="u-1") == []

    # and a viewer with no profile is treated as consenting
    await live.send(shoe_view("u-2"))
    assert len(await live.stored(user_id="u-2")) == 1


async def test_events_sent_under_the_anonymous_id_of_a_user_without_consent_are_withheld(live: Live) -> None:
    # Given a device joined to a user who withheld consent
    await live.services.ingest.identify(user_id="u-1", anonymous_id="a-1", consent={"personalization": False})

    # When the device keeps sending events under its anonymous id alone (as trackers do until reset)
    result = await live.send(shoe_view(anon="a-1"), shoe_view(anon="a-2"))

    # Then they are the user's events and are stored nowhere; an unjoined device's are stored
    assert result == {"accepted": 2, "rejected": 0, "errors": []}
    assert await live.stored(anonymous_id="a-1") == []
    assert await live.stored(user_id="u-1") == []
    assert await live.state(["product_viewed"], anonymous_id="a-1") == []
    assert len(await live.stored(anonymous_id="a-2")) == 1


async def test_a_join_the_behavioural_state_no_longer_holds_still_decides_consent(live: Live) -> None:
    # Given a device joined to a user who withheld consent, a join only the database still knows:
    # the Redis alias expired (a retention period of silence), or the process keeps no state (the CLI)
    await live.services.ingest.identify(user_id="u-1", anonymous_id="a-1", consent={"personalization": False})
    if live.services.redis is not None:
        await live.services.redis.delete(live.backend.redis_prefix + "alias:a-1")
        ingest = live.services.ingest
    else:
        store = LocalEventStore(
            live.services.sessions, retention=timedelta(days=90), clock=live.clock, keep_state=False
        )

        async def consents(user_id: str) -> bool:
            profile = await live.services.profiles.get(user_id, wait=True)
            return profile is None or profile.consent

        ingest = Ingestor(
            store, live.services.sessions, limits=live.services.ingest.limits, clock=live.clock, consents=consents
        )

    # When the device sends events under its anonymous id alone
    result = await ingest.track([("events[0]", shoe_view(anon="a-1")), ("events[1]", shoe_view(anon="a-2"))])
    await live.process()

    # Then the joined device's event is withheld, the other device's stored
    assert (result.withheld, result.stored) == (1, 1)
    assert await live.stored(anonymous_id="a-1") == []
    assert await live.state(["product_viewed"], anonymous_id="a-1") == []


async def test_withdrawing_consent_makes_a_member_anonymous_at_once(live: Live) -> None:
    await live.services.ingest.identify(user_id="u-1", traits={"tier": "gold"})
    await live.send(shoe_view("u-1"), shoe_view("u-1"), shoe_view("u-1"))
    assert await live.segments(userId="u-1") == ["gold", "shoe-browser"]

    await live.services.ingest.identify(user_id="u-1", consent={"personalization": False})

    assert await live.segments(userId="u-1") == []
    assert await live.announced() == [
        change("u:u-1", T0, entered=["gold"]),
        change("u:u-1", T0, entered=["shoe-browser"]),
        change("u:u-1", T0, left=["gold", "shoe-browser"]),
    ]


# -- deletion -----------------------------------------------------------------------------------------


async def test_delete_viewer_data_removes_everything_and_says_what(live: Live) -> None:
    # Given a user with a profile, an anonymous history joined to theirs, and events of their own
    await live.send(shoe_view(anon="a-1"), shoe_view(anon="a-1"))
    await live.services.ingest.identify(user_id="u-1", anonymous_id="a-1", traits={"tier": "gold"})
    await live.send(shoe_view("u-1"), event("add_to_cart", "u-1"))
    assert await live.segments(userId="u-1") == ["gold", "shoe-browser"]
    await live.announced()

    # When their data is deleted through the admin API
    payload = await mutate(live.running, DELETE, {"userId": "u-1"})

    # Then it says what it removed ...
    assert payload == {
        "ok": True,
        "result": {"profiles": 1, "events": 4, "stateEvents": 4, "identities": 1},
        "errors": [],
    }
    # ... and it is gone: profile, events (database and state), identities
    async with live.services.sessions() as session:
        assert await ProfileRepository(session).get("u-1") is None
    assert await live.stored(user_id="u-1") == []
    assert await live.stored(anonymous_id="a-1") == []
    assert await identities(live) == []
    assert await live.state(["product_viewed", "add_to_cart"], user_id="u-1") == []
    assert await live.state(["product_viewed", "add_to_cart"], anonymous_id="a-1") == []
    # the viewer has no segments, under either id
    assert await live.segments(userId="u-1") == []
    assert await live.segments(anonymousId="a-1") == []
    assert await live.segments(userId="u-1", anonymousId="a-1") == []
    # their flips are cancelled (the cart would have been abandoned at T0 + 15m)
    await live.at(T0 + timedelta(minutes=15))
    assert await live.announced() == []
    # and their memberships forgotten: a new start is announced from nothing
    await live.send(shoe_view("u-1"), shoe_view("u-1"), shoe_view("u-1"))
    assert await live.announced() == [change("u:u-1", T0 + timedelta(minutes=15), entered=["shoe-browser"])]


async def test_delete_viewer_data_by_anonymous_id(live: Live) -> None:
    await live.send(shoe_view(anon="a-1", id="v-1"), shoe_view(anon="a-1", id="v-2"), shoe_view(anon="a-2"))

    payload = await mutate(live.running, DELETE, {"anonymousId": "a-1"})

    assert payload["result"] == {"profiles": 0, "events": 2, "stateEvents": 2, "identities": 0}
    assert await live.stored(anonymous_id="a-1") == []
    assert len(await live.stored(anonymous_id="a-2")) == 1
    # the same event ids, sent again afterwards, are new events: stored and counted
    await live.send(shoe_view(anon="a-1", id="v-1"), shoe_view(anon="a-1", id="v-2"))
    assert sorted(await live.stored(anonymous_id="a-1")) == ["v-1", "v-2"]
    assert await live.state(["product_viewed"], anonymous_id="a-1") == ["v-1", "v-2"]


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_events_still_in_the_stream_when_their_viewer_is_deleted_are_not_stored_after(live: Live) -> None:
    # Given events tracked, not yet consumed by a worker
    await live.track(shoe_view("u-1"), shoe_view("u-1"), shoe_view("u-1"))

    # When the viewer is deleted, and then the worker catches up
    payload = await mutate(live.running, DELETE, {"userId": "u-1"})
    assert payload["result"] == {"profiles": 0, "events": 0, "stateEvents": 3, "identities": 0}
    await live.process()

    # Then the deleted events do not come back
    assert await live.stored(user_id="u-1") == []
    assert await live.announced() == []
    assert await live.segments(userId="u-1") == []


async def test_delete_viewer_data_needs_an_id(live: Live) -> None:
    payload = await mutate(live.running, DELETE, {})
    assert payload["ok"] is False
    assert [e["path"] for e in payload["errors"]] == ["userId"]

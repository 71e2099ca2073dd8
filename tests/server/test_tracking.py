"""The Segment-compatible HTTP Tracking API (server/tracking.py): the real analytics-python client
against a real server on loopback, then the protocol's edges over HTTP in-process."""

from __future__ import annotations

import asyncio
import base64
import gzip
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import segment.analytics as analytics
from fixtures_app import T0, RunningApp, running_app, served
from segment.analytics.request import APIError

from content.behaviour import Event
from tests.server.factories import bundle, given, segment, trait

SEGMENTS = [
    segment("shoppers", {"event": "add_to_cart"}),
    segment("pricing-readers", {"event": "page_view", "where": {"name": "Pricing"}}),
    segment("app-users", {"event": "screen_view", "where": {"category": "Onboarding"}}),
    segment("gold", trait("tier", "eq", "gold")),
    segment("one-purchase", {"event": "purchase", "count": {"eq": 1}}),
    segment("visitors", {"event": "visit", "count": {"gte": 100}}),
]
VIEWER = "query V($viewer: ViewerInput!) { viewer(viewer: $viewer) { segments { key } } }"


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        "sqlite",
        pytest.param("redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
    ]
)
def backing(request: pytest.FixtureRequest) -> tuple[str, str | None, str]:
    """(database URL, Redis URL, Redis prefix): embedded on PostgreSQL, on SQLite, and with Redis."""
    # A sync fixture that fetches the others by name, like conftest's db_url.
    mode: str = request.param
    database = "sqlite" if mode == "sqlite" else "postgres"
    url: str = request.getfixturevalue(f"{database}_url")
    request.getfixturevalue(f"_empty_{database}")
    if mode != "redis":
        return url, None, "tessera:"
    return url, request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")


@pytest.fixture
async def tracked(backing: tuple[str, str | None, str]) -> AsyncIterator[RunningApp]:
    """The application in each mode, with SEGMENTS published."""
    url, redis_url, prefix = backing
    async with running_app(url, redis_url=redis_url, redis_prefix=prefix) as running:
        await given(running, bundle(segments=SEGMENTS))
        yield running


@pytest.fixture
async def embedded(app: RunningApp) -> RunningApp:
    """The embedded application (PostgreSQL, then SQLite), with SEGMENTS published."""
    await given(app, bundle(segments=SEGMENTS))
    return app


# -- helpers ------------------------------------------------------------------------------------


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(
    app: RunningApp,
    path: str,
    body: Any,
    *,
    headers: Mapping[str, str] | None = None,
    key: str | None = "ingest",
) -> httpx.Response:
    """POST ``body`` (JSON unless bytes) with the fixture key of scope ``key`` as the Basic-auth user."""
    sent = {"Content-Type": "application/json", **(basic(app.keys[key]) if key else {}), **(headers or {})}
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await app.client.post(path, content=content, headers=sent)


async def send_batch(app: RunningApp, messages: Sequence[Any], **body: Any) -> dict[str, Any]:
    response = await post(app, "/v1/batch", {"batch": list(messages), **body})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def track(event: str, message_id: str, *, user: str | None = "u-1", **fields: Any) -> dict[str, Any]:
    message = {"type": "track", "event": event, "messageId": message_id, **fields}
    if user is not None:
        message["userId"] = user
    return message


async def segments_of(app: RunningApp, **viewer: str) -> list[str]:
    reply = await app.graphql(VIEWER, {"viewer": viewer})
    assert reply.errors == [], reply.body
    return [s["key"] for s in reply.data["viewer"]["segments"]]


async def events_of(
    app: RunningApp, type_: str, *, user_id: str | None = None, anonymous_id: str | None = None
) -> list[Event]:
    history = await app.services.events.history(user_id=user_id, anonymous_id=anonymous_id, now=app.clock())
    return list(history.of_type(type_))


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def accepted(n: int) -> dict[str, Any]:
    return {"success": True, "accepted": n, "rejected": []}


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert [e["extensions"]["code"] for e in response.json()["errors"]] == [code]


# -- the real Segment client over a real socket -------------------------------------------------


@pytest.fixture
def segment_settings() -> Iterator[None]:
    """Leaves analytics-python's module-level settings and default client as they were."""
    saved = (analytics.write_key, analytics.host, analytics.sync_mode, analytics.default_client)
    analytics.default_client = None
    yield
    analytics.write_key, analytics.host, analytics.sync_mode, analytics.default_client = saved


@pytest.mark.usefixtures("segment_settings")
async def test_the_segment_client_feeds_segments_traits_and_identity(tracked: RunningApp) -> None:
    async with served(tracked.app) as base_url:
        # given analytics-python configured as its README says, with Tessera as the host
        analytics.write_key = tracked.keys["ingest"]
        analytics.host = base_url
        analytics.sync_mode = True  # each call is one POST /v1/batch, answered before it returns

        def browse_then_sign_up() -> None:
            analytics.track(anonymous_id="a-1", event="add_to_cart", properties={"sku": "boots"})
            analytics.page(anonymous_id="a-1", category="Docs", name="Pricing", properties={"plan": "pro"})
            analytics.screen(anonymous_id="a-2", category="Onboarding", name="Welcome")
            analytics.identify(user_id="u-1", traits={"tier": "gold", "email": "ada@example.com"})

        # when an anonymous visitor browses, and a user identifies with traits
        await asyncio.to_thread(browse_then_sign_up)

        # then the tracked events make segments, and identify's traits do
        assert await segments_of(tracked, anonymousId="a-1") == ["pricing-readers", "shoppers"]
        assert await segments_of(tracked, anonymousId="a-2") == ["app-users"]
        assert await segments_of(tracked, userId="u-1") == ["gold"]
        (page,) = await events_of(tracked, "page_view", anonymous_id="a-1")
        assert page.properties == {"name": "Pricing", "category": "Docs", "plan": "pro"}

        # when the anonymous visitor is aliased to the user
        await asyncio.to_thread(analytics.alias, previous_id="a-1", user_id="u-1")

        # then the anonymous history counts for the user
        assert await segments_of(tracked, userId="u-1") == ["gold", "pricing-readers", "shoppers"]


@pytest.mark.usefixtures("segment_settings")
async def test_the_segment_client_batches_in_the_background(tracked: RunningApp) -> None:
    async with served(tracked.app) as base_url:
        client = analytics.Client(tracked.keys["delivery"], host=base_url, max_retries=0)

        def visit_150_times() -> None:
            for i in range(150):
                client.track(user_id="u-7", event="visit", properties={"i": i})
            client.flush()  # until every batch (100, then 50) was answered
            client.join()

        await asyncio.to_thread(visit_150_times)

        assert len(await events_of(tracked, "visit", user_id="u-7")) == 150
        assert await segments_of(tracked, userId="u-7") == ["visitors"]


@pytest.mark.usefixtures("segment_settings")
async def test_the_segment_client_is_refused_an_unknown_or_wrong_key(embedded: RunningApp) -> None:
    async with served(embedded.app) as base_url:
        analytics.host = base_url
        analytics.sync_mode = True
        for key, status in (("tess_ingest_not-a-key", 401), (embedded.keys["preview"], 403)):
            analytics.write_key, analytics.default_client = key, None

            with pytest.raises(APIError) as refused:
                await asyncio.to_thread(analytics.track, user_id="u-1", event="add_to_cart")

            assert refused.value.status == status
    assert await events_of(embedded, "add_to_cart", user_id="u-1") == []


# -- authentication -----------------------------------------------------------------------------


async def test_ingest_and_delivery_keys_send_by_basic_auth_bearer_or_write_key(embedded: RunningApp) -> None:
    ingest, delivery = embedded.keys["ingest"], embedded.keys["delivery"]
    for i, (headers, body) in enumerate(
        [
            (basic(ingest), {}),
            (basic(delivery), {}),
            (bearer(ingest), {}),
            ({"Authorization": "Basic " + base64.b64encode(ingest.encode()).decode()}, {}),  # no colon
            ({}, {"writeKey": delivery}),  # Segment also takes the key in the body
        ]
    ):
        message = track("visit", f"m-{i}")

        response = await post(embedded, "/v1/batch", {"batch": [message], **body}, headers=headers, key=None)

        assert (response.status_code, response.json()) == (200, accepted(1))
    assert len(await events_of(embedded, "visit", user_id="u-1")) == 5


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({}, {}, 401, "missing write key"),
        ({"Authorization": "Bearer "}, {}, 401, "missing write key"),
        ({"Authorization": "Basic " + base64.b64encode(b":").decode()}, {}, 401, "missing write key"),
        ({"Authorization": "Basic %%%"}, {}, 401, "malformed Basic credentials"),
        (basic("tess_ingest_nope"), {}, 401, "unknown or revoked write key"),
        ({}, {"writeKey": "tess_ingest_nope"}, 401, "unknown or revoked write key"),
        ({"Authorization": "Digest abc"}, {}, 401, "missing write key"),
        ("preview", {}, 403, "a preview key cannot send events (needs ingest or delivery)"),
        ("admin", {}, 403, "an admin key cannot send events (needs ingest or delivery)"),
    ],
    ids=[
        "none",
        "empty-bearer",
        "empty-user",
        "bad-base64",
        "unknown",
        "unknown-in-body",
        "digest",
        "preview",
        "admin",
    ],
)
async def test_a_missing_unknown_or_wrong_key_is_refused(
    embedded: RunningApp, headers: dict[str, str] | str, body: dict[str, Any], status: int, message: str
) -> None:
    sent = basic(embedded.keys[headers]) if isinstance(headers, str) else headers

    response = await post(embedded, "/v1/batch", {"batch": [track("visit", "m-1")], **body}, headers=sent, key=None)

    assert_refused(response, status, "UNAUTHENTICATED" if status == 401 else "FORBIDDEN")
    assert response.json()["errors"][0]["message"].startswith(message)
    assert await events_of(embedded, "visit", user_id="u-1") == []


# -- the request as a whole ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"batch": [', "the body is not valid JSON"),
        (b"[]", "the body must be a JSON object, not list"),
        (b'{"batch": {"type": "track"}}', "batch: must be a list of messages, not object"),
        (b"{}", "batch: must be a list of messages, not null"),
    ],
    ids=["invalid-json", "not-an-object", "batch-not-a-list", "no-batch"],
)
async def test_a_body_that_is_not_a_batch_is_a_bad_request(embedded: RunningApp, body: bytes, message: str) -> None:
    response = await post(embedded, "/v1/batch", body)

    assert_refused(response, 400, "BAD_REQUEST")
    assert response.json()["errors"][0]["message"].startswith(message)


async def test_a_batch_over_the_limit_is_refused_whole(embedded: RunningApp) -> None:
    # 20 valid messages of ~30 KB each: every one under 32 KB, together over 500 KB
    messages = [track("visit", f"m-{i}", properties={"pad": "x" * 30_000}) for i in range(20)]

    response = await post(embedded, "/v1/batch", {"batch": messages})

    assert_refused(response, 400, "BAD_REQUEST")
    assert response.json()["errors"][0]["message"] == ("the request is larger than 512000 bytes; send smaller batches")
    assert await events_of(embedded, "visit", user_id="u-1") == []


async def test_a_gzipped_body_over_the_limit_is_refused_by_its_inflated_size(embedded: RunningApp) -> None:
    body = orjson.dumps({"batch": [track("visit", f"m-{i}", properties={"pad": "x" * 30_000}) for i in range(20)]})
    assert len(gzip.compress(body)) < 10_000

    response = await post(embedded, "/v1/batch", gzip.compress(body), headers={"Content-Encoding": "gzip"})

    assert_refused(response, 400, "BAD_REQUEST")
    assert await events_of(embedded, "visit", user_id="u-1") == []


async def test_a_gzipped_batch_is_taken(embedded: RunningApp) -> None:
    body = gzip.compress(orjson.dumps({"batch": [track("visit", "m-1"), track("visit", "m-2")]}))

    response = await post(embedded, "/v1/batch", body, headers={"Content-Encoding": "gzip"})

    assert (response.status_code, response.json()) == (200, accepted(2))
    broken = await post(embedded, "/v1/batch", body[:-8], headers={"Content-Encoding": "gzip"})
    assert_refused(broken, 400, "BAD_REQUEST")


async def test_a_message_over_the_limit_is_rejected_alone(embedded: RunningApp) -> None:
    big = track("visit", "m-big", properties={"pad": "x" * 33_000})

    answer = await send_batch(embedded, [track("visit", "m-1"), big, track("visit", "m-2")])

    size = len(orjson.dumps(big))
    assert answer == {
        "success": True,
        "accepted": 2,
        "rejected": [{"index": 1, "errors": [f"batch[1]: the message is {size} bytes; at most 32768 are taken"]}],
    }
    assert {e.id for e in await events_of(embedded, "visit", user_id="u-1")} == {"m-1", "m-2"}


# -- each message -------------------------------------------------------------------------------


async def test_invalid_messages_are_reported_and_the_valid_ones_kept(embedded: RunningApp) -> None:
    messages: list[Any] = [
        track("visit", "m-0"),
        {"type": "track", "messageId": "m-1", "userId": "u-1"},  # no event
        {"type": "group", "userId": "u-1", "groupId": "g-1"},
        {"type": "track", "event": "visit", "messageId": "m-3"},  # nobody
        track("visit", "m-4", properties=["not", "an", "object"]),
        {"type": "identify", "anonymousId": "a-1", "traits": {"tier": "gold"}},
        "a string",
        {"event": "visit", "userId": "u-1"},  # no type
        {"type": "alias", "userId": "u-1"},
        track("visit", "m-9", user=None, anonymousId=True),
        {"type": "page", "userId": "u-1", "name": "Home", "messageId": "m-10"},
        track("visit", "m-11", timestamp="yesterday"),
        track("x" * 129, "m-12"),
        {"type": "identify", "userId": "u-1", "traits": "gold"},
        {"type": "alias", "userId": "u-2", "previousId": "p" * 257},
    ]

    answer = await send_batch(embedded, messages)

    expected_rejections = {
        1: ["batch[1].event: an event needs a non-empty type"],
        2: ["batch[2].type: Tessera does not take group calls; send track, identify, alias, page or screen"],
        3: ["batch[3].userId: an event needs a userId or an anonymousId"],
        4: ["batch[4].properties: must be a JSON object, not list"],
        5: ["batch[5].userId: an identify needs a userId (Tessera keeps traits for users only)"],
        6: ["batch[6]: a message must be a JSON object, not string"],
        7: ["batch[7].type: a message needs a type: one of track, identify, alias, page, screen"],
        8: ["batch[8].previousId: an alias needs a previousId"],
        9: ["batch[9].anonymousId: must be a string, not bool"],
        11: ["batch[11].timestamp: must be an ISO 8601 date-time, not 'yesterday'"],
        12: ["batch[12].event: is longer than 128 characters"],
        13: ["batch[13].traits: must be a JSON object, not string"],
        14: ["batch[14].previousId: is longer than 256 characters"],
    }
    assert answer["rejected"] == [{"index": i, "errors": e} for i, e in expected_rejections.items()]
    assert answer["accepted"] == 2
    assert [e.id for e in await events_of(embedded, "visit", user_id="u-1")] == ["m-0"]
    assert [e.id for e in await events_of(embedded, "page_view", user_id="u-1")] == ["m-10"]
    assert await segments_of(embedded, userId="u-1") == []  # neither identify took


async def test_every_problem_of_a_message_is_reported(embedded: RunningApp) -> None:
    message = {"type": "track", "timestamp": "2020-01-01T00:00:00Z", "properties": 3}

    answer = await send_batch(embedded, [message])

    assert answer["rejected"] == [
        {
            "index": 0,
            "errors": [
                "batch[0].timestamp: 2020-01-01T00:00:00Z is older than the retention period (90 days)",
                "batch[0].event: an event needs a non-empty type",
                "batch[0].userId: an event needs a userId or an anonymousId",
                "batch[0].properties: must be a JSON object, not number",
            ],
        }
    ]


async def test_each_message_type_has_its_own_endpoint(embedded: RunningApp) -> None:
    calls = [
        ("/v1/track", {"userId": "u-1", "event": "add_to_cart", "messageId": "m-1"}),
        ("/v1/page", {"anonymousId": "a-1", "name": "Pricing", "properties": {"path": "/pricing"}}),
        ("/v1/screen", {"anonymousId": "a-1", "name": "Welcome", "category": "Onboarding"}),
        ("/v1/identify", {"userId": "u-1", "traits": {"tier": "gold"}}),
        ("/v1/alias", {"previousId": "a-1", "userId": "u-1"}),
    ]
    for path, message in calls:
        response = await post(embedded, path, message)

        assert (response.status_code, response.json()) == (200, accepted(1)), path

    assert await segments_of(embedded, userId="u-1") == ["app-users", "gold", "pricing-readers", "shoppers"]
    (page,) = await events_of(embedded, "page_view", user_id="u-1")
    assert page.properties == {"name": "Pricing", "path": "/pricing"}


async def test_a_single_message_is_rejected_with_paths_from_its_own_root(embedded: RunningApp) -> None:
    response = await post(embedded, "/v1/track", {"userId": "u-1", "event": "", "timestamp": 5})

    assert response.status_code == 200
    assert response.json() == {
        "success": True,
        "accepted": 0,
        "rejected": [
            {
                "index": 0,
                "errors": ["timestamp: must be an ISO 8601 date-time, not 5", "event: an event needs a non-empty type"],
            }
        ],
    }
    # the body's own type is not what counts: the endpoint's is
    identify = await post(embedded, "/v1/identify", {"type": "track", "userId": "u-1", "traits": {"tier": "gold"}})
    assert identify.json() == accepted(1)
    assert await segments_of(embedded, userId="u-1") == ["gold"]


async def test_duplicates_by_message_id_count_once(tracked: RunningApp) -> None:
    batch = [track("purchase", "m-1"), track("purchase", "m-1"), track("purchase", "m-2", user="u-2")]

    first = await send_batch(tracked, batch)
    retried = await send_batch(tracked, batch)  # a client retrying after a lost answer

    assert first == accepted(3)  # duplicates are accepted (the client need not resend), stored once
    assert retried == accepted(3)
    assert [e.id for e in await events_of(tracked, "purchase", user_id="u-1")] == ["m-1"]
    assert await segments_of(tracked, userId="u-1") == ["one-purchase"]  # count eq 1


# -- time ---------------------------------------------------------------------------------------


async def test_the_timestamp_is_when_the_event_happened(embedded: RunningApp) -> None:
    messages = [
        track("visit", "m-1", timestamp="2026-11-20T11:00:00Z"),
        track("visit", "m-2", originalTimestamp="2026-11-20T10:00:00+01:00"),  # without timestamp
        track("visit", "m-3", timestamp="2026-11-20T11:30:00", originalTimestamp="2026-01-01T00:00:00Z"),
        track("visit", "m-4"),  # neither: when it arrived
    ]

    assert await send_batch(embedded, messages) == accepted(4)

    times = {e.id: e.at for e in await events_of(embedded, "visit", user_id="u-1")}
    assert times == {
        "m-1": T0 - timedelta(hours=1),
        "m-2": T0 - timedelta(hours=3),
        "m-3": T0 - timedelta(minutes=30),  # no offset: UTC
        "m-4": T0,
    }


async def test_sent_at_corrects_the_clients_clock(embedded: RunningApp) -> None:
    # given a device whose clock is 3 hours fast, sending 10 minutes after the event happened
    device_now = T0 + timedelta(hours=3)
    happened = device_now - timedelta(minutes=10)

    per_message = track("visit", "m-1", timestamp=iso(happened), sentAt=iso(device_now))
    per_batch = track("visit", "m-2", timestamp=iso(happened))
    answer = await send_batch(embedded, [per_message, per_batch], sentAt=iso(device_now))

    # then each happened 10 minutes before the server received it: T0 - 10 minutes
    assert answer == accepted(2)
    times = {e.id: e.at for e in await events_of(embedded, "visit", user_id="u-1")}
    assert times == {"m-1": T0 - timedelta(minutes=10), "m-2": T0 - timedelta(minutes=10)}


async def test_a_message_sent_at_overrides_the_batch_sent_at(embedded: RunningApp) -> None:
    message = track("visit", "m-1", timestamp=iso(T0 - timedelta(minutes=5)), sentAt=iso(T0))

    answer = await send_batch(embedded, [message], sentAt=iso(T0 + timedelta(days=1)))

    assert answer == accepted(1)
    assert [e.at for e in await events_of(embedded, "visit", user_id="u-1")] == [T0 - timedelta(minutes=5)]


async def test_a_batch_sent_at_that_is_no_date_time_rejects_the_messages_it_would_correct(
    embedded: RunningApp,
) -> None:
    messages = [
        track("visit", "m-1", timestamp=iso(T0)),
        track("visit", "m-2"),
        track("visit", "m-3", timestamp=iso(T0), sentAt=iso(T0)),
    ]

    answer = await send_batch(embedded, messages, sentAt="tomorrow")

    assert answer["rejected"] == [{"index": 0, "errors": ["sentAt: must be an ISO 8601 date-time, not 'tomorrow'"]}]
    assert answer["accepted"] == 2  # m-2 has no timestamp to correct, m-3 its own sentAt


async def test_events_outside_retention_or_too_far_ahead_are_rejected(embedded: RunningApp) -> None:
    messages = [
        track("visit", "m-0", timestamp="2026-08-22T12:00:00Z"),  # exactly 90 days: out
        track("visit", "m-1", timestamp="2026-08-22T12:00:01Z"),  # just inside
        track("visit", "m-2", timestamp="2026-11-20T12:10:00Z"),  # 10 minutes ahead: the limit
        track("visit", "m-3", timestamp="2026-11-20T12:10:01Z"),
        track("visit", "m-4", timestamp="2026-11-20T15:00:00Z", sentAt="2026-11-20T11:00:00Z"),  # corrected: ahead
        track("visit", "m-5", originalTimestamp="2020-01-01T00:00:00Z"),
        track("visit", "m-6", timestamp="2026-11-20T12:00:00Z", sentAt="soon"),
    ]

    answer = await send_batch(embedded, messages)

    assert answer["accepted"] == 2
    assert answer["rejected"] == [
        {
            "index": 0,
            "errors": ["batch[0].timestamp: 2026-08-22T12:00:00Z is older than the retention period (90 days)"],
        },
        {
            "index": 3,
            "errors": ["batch[3].timestamp: 2026-11-20T12:10:01Z is more than 10 minutes ahead of the server clock"],
        },
        {
            "index": 4,
            "errors": [
                "batch[4].timestamp: 2026-11-20T15:00:00Z (2026-11-20T16:00:00+00:00 once corrected for the client's "
                "clock by sentAt) is more than 10 minutes ahead of the server clock"
            ],
        },
        {
            "index": 5,
            "errors": ["batch[5].originalTimestamp: 2020-01-01T00:00:00Z is older than the retention period (90 days)"],
        },
        {"index": 6, "errors": ["batch[6].sentAt: must be an ISO 8601 date-time, not 'soon'"]},
    ]
    assert sorted(e.id for e in await events_of(embedded, "visit", user_id="u-1")) == ["m-1", "m-2"]


# -- identify and consent -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "consent_in",
    ["traits", "context"],
)
async def test_identify_sets_consent_and_withheld_events_are_not_stored(tracked: RunningApp, consent_in: str) -> None:
    consent = {"personalization": False}
    identify: dict[str, Any] = {"type": "identify", "userId": "u-1", "traits": {"tier": "gold"}}
    if consent_in == "traits":
        identify["traits"]["consent"] = consent
    else:
        identify["context"] = {"consent": consent}

    # given a batch in which the user withdraws consent between two events
    answer = await send_batch(tracked, [track("purchase", "m-1"), identify, track("add_to_cart", "m-2")])

    # then all are accepted, the event before the identify is kept and the one after is withheld
    assert answer == accepted(3)
    assert [e.id for e in await events_of(tracked, "purchase", user_id="u-1")] == ["m-1"]
    assert await events_of(tracked, "add_to_cart", user_id="u-1") == []
    profile = await tracked.services.profiles.get("u-1", wait=True)
    assert profile is not None
    assert (profile.traits, profile.consent) == ({"tier": "gold"}, False)  # consent is not a trait
    assert await segments_of(tracked, userId="u-1") == []  # evaluated as an anonymous viewer


async def test_a_consent_that_is_not_an_object_is_a_trait(embedded: RunningApp) -> None:
    identify = {"type": "identify", "userId": "u-1", "traits": {"consent": "yes"}, "context": {"consent": False}}

    assert await send_batch(embedded, [identify, track("purchase", "m-1")]) == accepted(2)

    profile = await embedded.services.profiles.get("u-1", wait=True)
    assert profile is not None
    assert (profile.traits, profile.consent) == ({"consent": "yes"}, True)
    assert len(await events_of(embedded, "purchase", user_id="u-1")) == 1


async def test_identify_with_an_anonymous_id_joins_its_history(tracked: RunningApp) -> None:
    anonymous = {"type": "track", "event": "add_to_cart", "anonymousId": "a-1", "messageId": "m-1"}
    identify = {"type": "identify", "userId": "u-1", "anonymousId": "a-1", "traits": {"tier": "gold"}}

    assert await send_batch(tracked, [anonymous, identify]) == accepted(2)

    assert await segments_of(tracked, userId="u-1") == ["gold", "shoppers"]
    assert await segments_of(tracked, anonymousId="a-1") == ["shoppers"]  # read through the alias


@pytest.mark.usefixtures("_empty_postgres")
async def test_a_store_that_is_down_answers_503_so_that_clients_retry(postgres_url: str) -> None:
    # given Redis (where events are made durable) unreachable: nothing listens on port 1
    async with running_app(postgres_url, redis_url="redis://127.0.0.1:1/0") as down:
        response = await post(down, "/v1/batch", {"batch": [track("visit", "m-1")]})

    assert_refused(response, 503, "SERVICE_UNAVAILABLE")
    assert response.json()["errors"][0]["message"] == "the messages could not be stored; retry"

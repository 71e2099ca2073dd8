"""The OpenFeature provider (server/openfeature.py), used only through the OpenFeature SDK's public
client, against a real Tessera served by uvicorn on loopback over PostgreSQL and SQLite: values
and buckets equal rules.md's formula and the delivery API, reasons, the kill switch, the per-context
cache (counted on the real transport), and every failure as the default value with an error code.
The sync SDK runs in a worker thread while the server runs in the test's event loop. No test sleeps:
the cache's clock is injected."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import mmh3
import pytest
from fixtures_app import RunningApp, Served, serve
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagEvaluationDetails, Reason

from server.openfeature import TesseraProvider
from tests.server.factories import bundle, context, flag, given, mutate, trait

TIMEOUT = 5.0
ROLLOUT, SALT = 30, "checkout-salt"
UPDATE_FLAG = "mutation ($k: String!, $i: FlagPatch!) { updateFlag(key: $k, input: $i) { ok errors { path message } } }"
VIEWER_FLAGS = "query ($v: ViewerInput!) { viewer(viewer: $v) { flags { key enabled variant reason } } }"

FLAGS = bundle(
    flags=[
        flag("everyone"),
        flag("checkout", rollout=ROLLOUT, salt=SALT),
        flag("visitors", rollout=ROLLOUT, stickiness="anonymousId"),
        flag("gold-only", audience=trait("tier", "eq", "gold")),
        flag("germany", audience=context("country", "eq", "DE")),
        flag("pro-plan", audience=context("attributes.plan", "eq", "pro")),
        flag("evening", audience=context("local_hour", "between", [18, 23])),
        flag("other-devices", audience=context("device", "eq", "OTHER")),
        flag("gold-half", audience=trait("tier", "eq", "gold"), rollout=50),
        flag("retired", enabled=False),
    ],
    profiles=[{"userId": "u-gold", "traits": {"tier": "gold"}}],
)


def bucket(salt: str, unit: str) -> int:
    """rules.md's bucketing written out here, so that the test trusts neither the server nor content/."""
    return int(mmh3.hash(f"{salt}/{unit}".encode(), 0, signed=False)) % 10_000


# -- a real Tessera on loopback ---------------------------------------------------------------------


@dataclass
class LiveTessera:
    """The test's app served over HTTP on 127.0.0.1 by uvicorn, in the test's event loop."""

    app: RunningApp
    served: Served

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def key(self) -> str:
        return self.app.keys["delivery"]

    async def stop(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            await self.served.stop()


@pytest.fixture
async def tessera(app: RunningApp) -> AsyncIterator[LiveTessera]:
    await given(app, FLAGS)
    # The app fixture already runs the lifespan; uvicorn only serves it.
    live = LiveTessera(app, serve(app.app, name="tessera"))
    try:
        yield live
    finally:
        await live.stop()


@pytest.fixture(autouse=True)
def _openfeature_api() -> Iterator[None]:
    """Each test starts from, and leaves, the SDK's global state as a fresh process has it."""
    api.shutdown()
    yield
    api.shutdown()


@dataclass
class MonotonicClock:
    """The provider's cache clock: seconds that move only when a test moves them."""

    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


def openfeature_client(provider: TesseraProvider) -> OpenFeatureClient:
    api.set_provider_and_wait(provider)
    return api.get_client()


def user(unit: str, **attributes: Any) -> EvaluationContext:
    return EvaluationContext(targeting_key=unit, attributes=attributes)


def boolean_details(
    client: OpenFeatureClient, key: str, ctx: EvaluationContext, default: bool = False
) -> FlagEvaluationDetails[bool]:
    return client.get_boolean_details(key, default, ctx)


async def details(
    client: OpenFeatureClient, key: str, ctx: EvaluationContext, default: bool = False
) -> FlagEvaluationDetails[bool]:
    """A boolean evaluation by the sync SDK, in a worker thread while the server serves."""
    return await asyncio.to_thread(boolean_details, client, key, ctx, default)


async def delivery_flags(app: RunningApp, viewer: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    reply = await app.graphql(VIEWER_FLAGS, {"v": viewer})
    assert reply.status == 200, reply.body
    return {f["key"]: f for f in reply.data["viewer"]["flags"]}


def summary(d: FlagEvaluationDetails[Any]) -> tuple[Any, str | None, str | None, ErrorCode | None]:
    return d.value, d.variant, d.reason, d.error_code


# -- same buckets as the server and as the formula ----------------------------------------------------


async def test_a_rollout_answers_by_the_formula_and_as_the_delivery_api_does(tessera: LiveTessera) -> None:
    # Given a 30% rollout with its own salt, and 1,000 users
    client = openfeature_client(TesseraProvider(tessera.url, tessera.key))
    units = [f"u-{n}" for n in range(1_000)]

    # When a service evaluates it for each of them through OpenFeature
    def evaluate_all() -> dict[str, FlagEvaluationDetails[bool]]:
        return {unit: client.get_boolean_details("checkout", False, user(unit)) for unit in units}

    answers = await asyncio.to_thread(evaluate_all)

    # Then each answer is bucket(salt, unit) < round(P * 100), with the reason SPLIT...
    threshold = round(ROLLOUT * 100)
    expected = {unit: bucket(SALT, unit) < threshold for unit in units}
    assert {unit: summary(d) for unit, d in answers.items()} == {
        unit: (on, "on" if on else "off", Reason.SPLIT, None) for unit, on in expected.items()
    }
    assert 0.25 < sum(expected.values()) / len(units) < 0.35
    # ...and what the delivery API answers for the same viewer
    limit = asyncio.Semaphore(20)

    async def served(unit: str) -> tuple[bool, str, str]:
        async with limit:
            value = (await delivery_flags(tessera.app, {"userId": unit}))["checkout"]
        return value["enabled"], value["variant"], value["reason"]

    delivered = await asyncio.gather(*(served(unit) for unit in units))
    assert dict(zip(units, delivered, strict=True)) == {
        unit: (d.value, d.variant, d.reason) for unit, d in answers.items()
    }


async def test_an_anonymous_context_buckets_by_its_anonymous_id(tessera: LiveTessera) -> None:
    # Given a 30% rollout sticky to the anonymousId
    client = openfeature_client(TesseraProvider(tessera.url, tessera.key))
    visitors = [f"a-{n}" for n in range(200)]

    # When anonymous visitors (targeting key + anonymous: true) and logged-in users evaluate it
    def evaluate_all() -> tuple[dict[str, bool], dict[str, bool], FlagEvaluationDetails[bool]]:
        anonymous = {a: client.get_boolean_value("visitors", False, user(a, anonymous=True)) for a in visitors}
        logged_in = {a: client.get_boolean_value("visitors", False, user(f"u-{a}", anonymousId=a)) for a in visitors}
        no_anonymous_id = client.get_boolean_details("visitors", True, user("u-1"))
        return anonymous, logged_in, no_anonymous_id

    anonymous, logged_in, no_anonymous_id = await asyncio.to_thread(evaluate_all)

    # Then both are bucketed by the anonymousId, so a visitor keeps their bucket when they log in
    expected = {a: bucket("visitors", a) < round(ROLLOUT * 100) for a in visitors}
    assert anonymous == expected
    assert logged_in == expected
    assert set(expected.values()) == {True, False}
    # and a user with no anonymousId has no unit: outside the rollout, not an error
    assert summary(no_anonymous_id) == (False, "off", Reason.SPLIT, None)


# -- reasons ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "ctx", "expected"),
    [
        pytest.param("everyone", user("u-1"), (True, "on", Reason.STATIC), id="static"),
        pytest.param("everyone", EvaluationContext(), (True, "on", Reason.STATIC), id="static-without-a-unit"),
        pytest.param("gold-only", user("u-gold"), (True, "on", Reason.TARGETING_MATCH), id="trait-matches"),
        pytest.param("gold-only", user("u-1"), (False, "off", Reason.DEFAULT), id="trait-does-not-match"),
        pytest.param("germany", user("u-1", country="de"), (True, "on", Reason.TARGETING_MATCH), id="country"),
        pytest.param("germany", user("u-1", country="FR"), (False, "off", Reason.DEFAULT), id="other-country"),
        pytest.param("pro-plan", user("u-1", plan="pro"), (True, "on", Reason.TARGETING_MATCH), id="attribute"),
        pytest.param(
            "pro-plan", user("u-1", attributes={"plan": "pro"}), (True, "on", Reason.TARGETING_MATCH), id="attributes"
        ),
        pytest.param("pro-plan", user("u-1", plan="free"), (False, "off", Reason.DEFAULT), id="other-attribute"),
        pytest.param(
            "evening",
            user("u-1", at=datetime(2026, 11, 20, 17, 30, tzinfo=UTC), timezone="Europe/Berlin"),
            (True, "on", Reason.TARGETING_MATCH),
            id="at-and-timezone",  # 18:30 in Berlin
        ),
        pytest.param(
            "evening",
            user("u-1", at="2026-11-20T17:30:00Z", timezone="UTC"),
            (False, "off", Reason.DEFAULT),
            id="at-as-a-string",
        ),
        pytest.param("other-devices", user("u-1", device="other"), (True, "on", Reason.TARGETING_MATCH), id="device"),
        # The provider's own request is not the viewer's: its User-Agent says nothing about the device.
        pytest.param("other-devices", user("u-1"), (False, "off", Reason.DEFAULT), id="device-not-inferred"),
        pytest.param("gold-half", user("u-1"), (False, "off", Reason.DEFAULT), id="split-outside-the-audience"),
        pytest.param("retired", user("u-gold"), (False, "off", Reason.DISABLED), id="disabled"),
    ],
)
async def test_each_flag_says_why(
    tessera: LiveTessera, key: str, ctx: EvaluationContext, expected: tuple[bool, str, Reason]
) -> None:
    client = openfeature_client(TesseraProvider(tessera.url, tessera.key))

    # When the flag is evaluated as a boolean (with the opposite default) and as a string
    value, variant, reason = expected
    as_boolean = await details(client, key, ctx, default=not value)
    as_string = await asyncio.to_thread(client.get_string_details, key, "default", ctx)

    # Then both carry Tessera's value, variant and reason, with no error
    assert summary(as_boolean) == (value, variant, reason, None)
    assert summary(as_string) == (variant, variant, reason, None)


async def test_a_rollout_inside_an_audience_is_a_split(tessera: LiveTessera) -> None:
    client = openfeature_client(TesseraProvider(tessera.url, tessera.key))

    answer = await details(client, "gold-half", user("u-gold"))

    on = bucket("gold-half", "u-gold") < 5_000
    assert summary(answer) == (on, "on" if on else "off", Reason.SPLIT, None)


# -- the kill switch and the cache ----------------------------------------------------------------------


async def test_a_kill_switch_turns_the_flag_off_at_the_next_evaluation_without_a_cache(tessera: LiveTessera) -> None:
    # Given a provider that asks Tessera on every evaluation, and a flag on for everyone
    client = openfeature_client(TesseraProvider(tessera.url, tessera.key, cache_ttl=0))
    assert summary(await details(client, "everyone", user("u-1"))) == (True, "on", Reason.STATIC, None)

    # When the flag is switched off through the admin API
    payload = await mutate(tessera.app, UPDATE_FLAG, {"k": "everyone", "i": {"enabled": False}})
    assert payload["ok"], payload

    # Then the very next evaluation is off
    assert summary(await details(client, "everyone", user("u-1"), default=True)) == (
        False,
        "off",
        Reason.DISABLED,
        None,
    )


async def test_a_cached_answer_lasts_its_ttl_and_no_longer(tessera: LiveTessera) -> None:
    # Given a provider with a 5 s cache on an injected clock, which has answered for u-1
    clock = MonotonicClock()
    client = openfeature_client(TesseraProvider(tessera.url, tessera.key, cache_ttl=5, clock=clock))
    assert (await details(client, "everyone", user("u-1"))).value is True

    # When the flag is switched off
    payload = await mutate(tessera.app, UPDATE_FLAG, {"k": "everyone", "i": {"enabled": False}})
    assert payload["ok"], payload

    # Then the cached answer is served until its TTL has passed, and the new one from then on
    clock.now += 4.999
    assert (await details(client, "everyone", user("u-1"))).value is True
    assert (await details(client, "everyone", user("u-2"))).value is False  # another viewer: not cached
    clock.now += 0.001
    assert summary(await details(client, "everyone", user("u-1"), default=True)) == (
        False,
        "off",
        Reason.DISABLED,
        None,
    )


async def test_many_evaluations_for_one_context_make_one_http_call(tessera: LiveTessera) -> None:
    # Given a provider whose HTTP client (on the real transport) records every request it sends
    clock = MonotonicClock()
    sent: list[httpx.Request] = []
    with httpx.Client(event_hooks={"request": [sent.append]}) as http:
        client = openfeature_client(TesseraProvider(tessera.url, tessera.key, client=http, clock=clock))
        ada = user("u-ada", country="DE", plan="pro")

        # When one request of a service evaluates every flag, both ways, plus one that does not exist
        def evaluate_request(ctx: EvaluationContext) -> None:
            for key in ("everyone", "checkout", "gold-only", "germany", "pro-plan", "retired", "nope"):
                client.get_boolean_value(key, False, ctx)
                client.get_string_value(key, "off", ctx)

        await asyncio.to_thread(evaluate_request, ada)

        # Then Tessera was asked once, for that viewer, with the delivery key and no User-Agent
        assert len(sent) == 1
        assert sent[0].url == f"{tessera.url}/graphql"
        assert sent[0].headers["authorization"] == f"Bearer {tessera.key}"
        assert sent[0].headers["user-agent"] == ""

        # and another context is another call, an equal one is not, and an expired one is again
        await asyncio.to_thread(evaluate_request, user("u-bob"))
        await asyncio.to_thread(evaluate_request, user("u-ada", plan="pro", country="DE"))
        assert len(sent) == 2
        clock.now += 1.0  # the default TTL
        await asyncio.to_thread(evaluate_request, ada)
        assert len(sent) == 3


# -- errors: the default value and an error code, never an exception ---------------------------------------


async def test_an_unknown_flag_is_the_default_value_with_flag_not_found(tessera: LiveTessera) -> None:
    client = openfeature_client(TesseraProvider(tessera.url, tessera.key))

    as_boolean = await details(client, "no-such-flag", user("u-1"), default=True)
    as_string = await asyncio.to_thread(client.get_string_details, "no-such-flag", "fallback", user("u-1"))

    assert summary(as_boolean) == (True, None, Reason.ERROR, ErrorCode.FLAG_NOT_FOUND)
    assert summary(as_string) == ("fallback", None, Reason.ERROR, ErrorCode.FLAG_NOT_FOUND)
    assert as_boolean.error_message == "Tessera has no flag 'no-such-flag'"


async def test_numbers_and_objects_are_type_mismatches(tessera: LiveTessera) -> None:
    client = openfeature_client(TesseraProvider(tessera.url, tessera.key))
    ctx = user("u-1")

    def evaluate() -> list[FlagEvaluationDetails[Any]]:
        return [
            client.get_integer_details("everyone", 7, ctx),
            client.get_float_details("everyone", 0.5, ctx),
            client.get_object_details("everyone", {"a": 1}, ctx),
        ]

    integer, number, obj = await asyncio.to_thread(evaluate)

    assert summary(integer) == (7, None, Reason.ERROR, ErrorCode.TYPE_MISMATCH)
    assert summary(number) == (0.5, None, Reason.ERROR, ErrorCode.TYPE_MISMATCH)
    assert summary(obj) == ({"a": 1}, None, Reason.ERROR, ErrorCode.TYPE_MISMATCH)


async def test_a_server_that_goes_down_gives_the_default_value_with_an_error(tessera: LiveTessera) -> None:
    # Given a provider that has been answering
    client = openfeature_client(TesseraProvider(tessera.url, tessera.key, cache_ttl=0))
    assert (await details(client, "everyone", user("u-1"))).value is True

    # When Tessera goes down
    await tessera.stop()

    # Then evaluations give the caller's default with a GENERAL error, and raise nothing
    down = await details(client, "everyone", user("u-1"), default=False)
    assert summary(down) == (False, None, Reason.ERROR, ErrorCode.GENERAL)
    assert down.error_message is not None
    assert "unreachable" in down.error_message


async def test_a_server_that_does_not_answer_times_out_to_the_default_value() -> None:
    # Given a "server" that accepts connections and never answers
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = openfeature_client(TesseraProvider(url, "k", timeout=0.2))

        # When a flag is evaluated, then the timeout gives the default value and a GENERAL error
        answer = await details(client, "everyone", user("u-1"), default=True)

    assert summary(answer) == (True, None, Reason.ERROR, ErrorCode.GENERAL)
    assert answer.error_message is not None
    assert "did not answer within 0.2 s" in answer.error_message


async def test_a_refused_key_gives_the_default_value_with_an_error(tessera: LiveTessera) -> None:
    client = openfeature_client(TesseraProvider(tessera.url, "not-a-key"))
    ingest_client = TesseraProvider(tessera.url, tessera.app.keys["ingest"])

    refused = await details(client, "everyone", user("u-1"), default=False)
    api.set_provider_and_wait(ingest_client, domain="ingest")
    forbidden = await asyncio.to_thread(api.get_client("ingest").get_boolean_details, "everyone", False, user("u-1"))

    assert summary(refused) == (False, None, Reason.ERROR, ErrorCode.GENERAL)
    assert refused.error_message is not None
    assert "refused the API key (401)" in refused.error_message
    assert summary(forbidden) == (False, None, Reason.ERROR, ErrorCode.GENERAL)
    assert forbidden.error_message is not None
    assert "refused the API key (403)" in forbidden.error_message


@pytest.mark.parametrize(
    ("ctx", "message"),
    [
        pytest.param(user("u-1", timezone="Mars/Olympus_Mons"), "Tessera rejected the viewer", id="not-iana"),
        pytest.param(user("u-1", device="watch"), "Tessera rejected the viewer", id="unknown-device"),
        pytest.param(user("u-1", country=49), "attribute 'country' must be a string, not int", id="wrong-type"),
        pytest.param(user("u-1", anonymous="yes"), "attribute 'anonymous' must be a boolean", id="anonymous"),
    ],
)
async def test_a_context_tessera_cannot_take_is_invalid(
    tessera: LiveTessera, ctx: EvaluationContext, message: str
) -> None:
    client = openfeature_client(TesseraProvider(tessera.url, tessera.key))

    answer = await details(client, "everyone", ctx, default=False)

    assert summary(answer) == (False, None, Reason.ERROR, ErrorCode.INVALID_CONTEXT)
    assert answer.error_message is not None
    assert message in answer.error_message


# -- async ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("own_async_client", [True, False], ids=["async-client", "sync-client-in-a-thread"])
async def test_the_async_api_answers_as_the_sync_one(tessera: LiveTessera, own_async_client: bool) -> None:
    units = [f"u-{n}" for n in range(50)]
    async with httpx.AsyncClient() as http:
        client = openfeature_client(
            TesseraProvider(tessera.url, tessera.key, async_client=http if own_async_client else None)
        )

        answers = {unit: await client.get_boolean_details_async("checkout", False, user(unit)) for unit in units}
        variant = await client.get_string_value_async("gold-only", "default", user("u-gold"))
        missing = await client.get_boolean_details_async("nope", True, user("u-1"))

    expected = {unit: bucket(SALT, unit) < round(ROLLOUT * 100) for unit in units}
    assert {unit: summary(d) for unit, d in answers.items()} == {
        unit: (on, "on" if on else "off", Reason.SPLIT, None) for unit, on in expected.items()
    }
    assert variant == "on"
    assert summary(missing) == (True, None, Reason.ERROR, ErrorCode.FLAG_NOT_FOUND)

"""The admin API (``/admin/graphql``) over HTTP, on PostgreSQL and on SQLite: entities and blocks
with their versions, every invalid input rejected whole with every error at its path, and bundles in
and out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from fixtures_app import T0, Reply, RunningApp

from tests.server.factories import (
    block,
    bundle,
    context,
    demo_bundle,
    experiment_variant,
    export_bundle,
    flag,
    given,
    import_bundle,
    mutate,
    placed,
    placement,
    segment,
    trait,
    variant,
)

ERRORS = "errors { path message code }"
BLOCK = (
    "key locale type status draft publishedVersion latestVersion publishedAt updatedAt "
    "versions { key locale version document publishedAt }"
)
CONFIG_KINDS = ("placements", "segments", "scores", "flags", "experiments")
NOTHING = {kind: [] for kind in ("placements", "segments", "scores", "flags", "experiments", "blocks")}


def ok(reply: Reply) -> Any:
    """The data of a reply that must have succeeded."""
    assert reply.status == 200, reply.body
    assert reply.errors == [], reply.body
    return reply.data


def problems(payload: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The (path, code) of every error of a rejected payload."""
    assert payload["ok"] is False, payload
    return {(error["path"], error["code"]) for error in payload["errors"]}


async def content_version(app: RunningApp) -> int:
    return app.services.snapshots.current.version


# -- entities -------------------------------------------------------------------------------------

ENTITIES = [
    pytest.param(
        "Placement",
        {"key": "home", "name": "Home", "limit": 2},
        {"limit": 3, "name": None, "description": "The home page"},
        {"key": "home", "limit": 3, "description": "The home page"},
        id="placements",
    ),
    pytest.param(
        "Segment",
        {"key": "gold", "name": "Gold", "rule": trait("tier", "eq", "gold")},
        {"priority": 20, "rule": trait("tier", "in", ["gold", "platinum"])},
        {"key": "gold", "name": "Gold", "priority": 20, "rule": trait("tier", "in", ["gold", "platinum"])},
        id="segments",
    ),
    pytest.param(
        "Score",
        {"key": "engagement", "events": {"page_view": 1, "add_to_cart": 5}, "halfLife": "7d"},
        {"halfLife": "14d"},
        {"key": "engagement", "events": {"page_view": 1, "add_to_cart": 5}, "half_life": "14d"},
        id="scores",
    ),
    pytest.param(
        "Flag",
        {"key": "beta", "name": "Beta", "enabled": True, "rollout": 25.5},
        {"rollout": 50, "salt": "beta-2", "audience": context("country", "eq", "DE")},
        {"key": "beta", "name": "Beta", "enabled": True, "rollout": 50, "salt": "beta-2",
         "audience": context("country", "eq", "DE")},
        id="flags",
    ),
    pytest.param(
        "Experiment",
        {"key": "exp", "goal": {"event": "purchase"}},
        {"name": "Checkout test", "goal": [{"event": "purchase"}, {"event": "checkout"}]},
        {"key": "exp", "name": "Checkout test", "goal": [{"event": "purchase"}, {"event": "checkout"}]},
        id="experiments",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("name", "created", "patch", "updated"), ENTITIES)
async def test_an_entity_is_created_listed_read_updated_and_deleted(
    app: RunningApp, name: str, created: dict[str, Any], patch: dict[str, Any], updated: dict[str, Any]
) -> None:
    kind, one = f"{name.lower()}s", name.lower()
    key = created["key"]
    stored = {k.replace("halfLife", "half_life"): v for k, v in created.items()}
    read = f'{{ {kind} {{ key document }} {one}(key: "{key}") {{ key document }} }}'
    create = f"mutation($i: {name}Input!) {{ create{name}(input: $i) {{ ok result {{ key document }} {ERRORS} }} }}"
    update = f"mutation($k: String!, $i: {name}Patch!) {{ update{name}(key: $k, input: $i) {{ ok result {{ document }} {ERRORS} }} }}"  # noqa: E501
    delete = f"mutation($k: String!) {{ delete{name}(key: $k) {{ ok result {ERRORS} }} }}"

    # when it is created, then it is listed and can be read
    assert await mutate(app, create, {"i": created}) == {
        "ok": True,
        "result": {"key": key, "document": stored},
        "errors": [],
    }
    entity = {"key": key, "document": stored}
    assert ok(await app.admin(read)) == {kind: [entity], one: entity}

    # when it is created again, then that is a conflict
    assert problems(await mutate(app, create, {"i": created})) == {("input.key", "CONFLICT")}

    # when it is updated, then the fields left out keep their values and a null removes one
    changed = await mutate(app, update, {"k": key, "i": patch})
    assert changed == {"ok": True, "result": {"document": updated}, "errors": []}
    assert ok(await app.admin(read))[one] == {"key": key, "document": updated}

    # when it is deleted, then it is gone
    assert await mutate(app, delete, {"k": key}) == {"ok": True, "result": True, "errors": []}
    assert ok(await app.admin(read)) == {kind: [], one: None}

    # and updating or deleting what does not exist is NOT_FOUND
    assert problems(await mutate(app, update, {"k": key, "i": patch})) == {("key", "NOT_FOUND")}
    assert problems(await mutate(app, delete, {"k": key})) == {("key", "NOT_FOUND")}


async def test_entities_are_listed_by_key_with_their_fields(app: RunningApp) -> None:
    await given(app, demo_bundle())

    data = ok(
        await app.admin(
            """{ placements { key name limit } segments { key priority } scores { key halfLife events }
                 flags { key enabled rollout salt stickiness } experiments { key goal } }"""
        )
    )

    assert data["placements"] == [
        {"key": "email-footer", "name": "Email footer", "limit": 1},
        {"key": "home-hero", "name": "Home page hero", "limit": 1},
        {"key": "product-page", "name": "Product page sidebar", "limit": 3},
    ]
    assert [s["key"] for s in data["segments"]] == sorted(s["key"] for s in demo_bundle()["segments"])
    assert data["scores"] == [
        {"key": "engagement", "halfLife": "7d", "events": {"page_view": 1, "product_viewed": 2, "add_to_cart": 5}}
    ]
    assert data["flags"] == [
        {"key": "new-hero-rules", "enabled": True, "rollout": 100, "salt": "new-hero-rules", "stickiness": None},
        {"key": "recs-v2", "enabled": True, "rollout": 50, "salt": "recs-v2", "stickiness": None},
    ]
    assert data["experiments"] == [{"key": "recs-layout", "goal": {"event": "purchase"}}]


# -- blocks and their versions --------------------------------------------------------------------

CREATE_BLOCK = f"mutation($i: BlockInput!) {{ createBlock(input: $i) {{ ok result {{ {BLOCK} }} {ERRORS} }} }}"
UPDATE_BLOCK = (
    "mutation($k: String!, $i: BlockPatch!, $l: String) "
    f"{{ updateBlock(key: $k, input: $i, locale: $l) {{ ok result {{ {BLOCK} }} {ERRORS} }} }}"
)
PUBLISH = (
    "mutation($k: String!, $l: String) { publishBlock(key: $k, locale: $l) "
    f"{{ ok result {{ key locale version document publishedAt }} {ERRORS} }} }}"
)
UNPUBLISH = f"mutation($k: String!, $l: String) {{ unpublishBlock(key: $k, locale: $l) {{ ok result {ERRORS} }} }}"
DELETE_BLOCK = f"mutation($k: String!, $l: String) {{ deleteBlock(key: $k, locale: $l) {{ ok result {ERRORS} }} }}"
READ_BLOCK = f"query($k: String!, $l: String) {{ block(key: $k, locale: $l) {{ {BLOCK} }} }}"
DELIVERED = '{ block(key: "hero") { fields variant version } }'

HERO_INPUT = {
    "key": "hero",
    "type": "hero",
    "tags": ["home"],
    "placements": [{"key": "home", "priority": 10}],
    "schedule": {"from": "2026-01-01T00:00:00Z"},
    "fields": {"title": "Welcome"},
    "variants": [
        {"key": "beta", "flag": "beta", "when": context("device", "eq", "MOBILE"), "fields": {"title": "Beta"}},
        {
            "key": "test",
            "experiment": "exp",
            "arms": [{"key": "a", "weight": 1}, {"key": "b", "weight": 2, "fields": {"title": "B"}}],
        },
    ],
}


def block_config() -> dict[str, Any]:
    return bundle(placements=[placement("home")], flags=[flag("beta")], experiments=[{"key": "exp"}])


async def test_a_block_with_variants_and_arms_is_created_as_a_draft(app: RunningApp) -> None:
    await given(app, block_config())

    created = await mutate(app, CREATE_BLOCK, {"i": HERO_INPUT})

    assert created["ok"], created
    result = created["result"]
    assert (result["key"], result["locale"], result["type"], result["status"]) == ("hero", "en-US", "hero", "draft")
    assert (result["publishedVersion"], result["latestVersion"], result["publishedAt"]) == (None, 0, None)
    assert result["versions"] == []
    draft = result["draft"]
    assert draft["variants"] == HERO_INPUT["variants"]
    assert draft["placements"] == HERO_INPUT["placements"]
    assert draft["fields"] == {"title": "Welcome"}
    assert draft["locale"] == "en-US"
    # and delivery does not serve a draft
    assert ok(await app.graphql(DELIVERED)) == {"block": None}


async def test_each_publish_is_a_new_immutable_version(app: RunningApp) -> None:
    # given a draft block
    await given(app, block_config())
    assert (await mutate(app, CREATE_BLOCK, {"i": HERO_INPUT}))["ok"]

    # when it is published
    first = await mutate(app, PUBLISH, {"k": "hero"})

    # then it is version 1, published now, and served
    assert first["ok"], first
    assert (first["result"]["version"], first["result"]["publishedAt"]) == (1, T0.isoformat())
    assert ok(await app.graphql(DELIVERED))["block"]["version"] == 1

    # when it is published again unchanged, then no version is made
    again = await mutate(app, PUBLISH, {"k": "hero"})
    assert again["result"]["version"] == 1

    # when its draft changes and is published an hour later
    patched = await mutate(app, UPDATE_BLOCK, {"k": "hero", "i": {"fields": {"title": "Hello"}}})
    assert patched["ok"], patched
    assert (patched["result"]["status"], patched["result"]["publishedVersion"]) == ("published", 1)
    assert ok(await app.graphql(DELIVERED))["block"]["fields"] == {"title": "Welcome"}  # the draft is not live
    app.clock.advance(hours=1)
    second = await mutate(app, PUBLISH, {"k": "hero"})

    # then it is version 2, served at once, and version 1 keeps its document
    assert second["result"]["version"] == 2
    assert second["result"]["publishedAt"] == app.clock().isoformat()
    delivered = ok(await app.graphql(DELIVERED))["block"]
    assert delivered == {"fields": {"title": "Hello"}, "variant": "default", "version": 2}
    state = ok(await app.admin(READ_BLOCK, {"k": "hero"}))["block"]
    assert (state["publishedVersion"], state["latestVersion"]) == (2, 2)
    assert [v["version"] for v in state["versions"]] == [1, 2]
    assert state["versions"][0]["document"]["fields"] == {"title": "Welcome"}
    assert state["versions"][1]["document"]["fields"] == {"title": "Hello"}
    assert state["versions"][0]["publishedAt"] == T0.isoformat()


async def test_an_unpublished_block_leaves_delivery_and_keeps_its_versions(app: RunningApp) -> None:
    await given(app, block_config())
    assert (await mutate(app, CREATE_BLOCK, {"i": HERO_INPUT}))["ok"]
    assert (await mutate(app, PUBLISH, {"k": "hero"}))["ok"]

    unpublished = await mutate(app, UNPUBLISH, {"k": "hero"})

    assert unpublished == {"ok": True, "result": True, "errors": []}
    assert ok(await app.graphql(DELIVERED)) == {"block": None}
    state = ok(await app.admin(READ_BLOCK, {"k": "hero"}))["block"]
    assert (state["status"], state["publishedVersion"], state["latestVersion"]) == ("draft", None, 1)
    assert [v["version"] for v in state["versions"]] == [1]
    # and unpublishing what does not exist is NOT_FOUND
    assert problems(await mutate(app, UNPUBLISH, {"k": "nope"})) == {("key", "NOT_FOUND")}
    assert problems(await mutate(app, PUBLISH, {"k": "nope"})) == {("key", "NOT_FOUND")}


async def test_a_deleted_block_is_gone_with_its_versions(app: RunningApp) -> None:
    await given(app, block_config())
    assert (await mutate(app, CREATE_BLOCK, {"i": HERO_INPUT}))["ok"]
    assert (await mutate(app, PUBLISH, {"k": "hero"}))["ok"]

    deleted = await mutate(app, DELETE_BLOCK, {"k": "hero"})

    assert deleted == {"ok": True, "result": True, "errors": []}
    assert ok(await app.admin(READ_BLOCK, {"k": "hero"})) == {"block": None}
    assert ok(await app.admin("{ blocks { key } }")) == {"blocks": []}
    assert ok(await app.graphql(DELIVERED)) == {"block": None}
    assert problems(await mutate(app, DELETE_BLOCK, {"k": "hero"})) == {("key", "NOT_FOUND")}
    assert problems(await mutate(app, UPDATE_BLOCK, {"k": "hero", "i": {"tags": []}})) == {("key", "NOT_FOUND")}


async def test_blocks_are_kept_per_locale(app: RunningApp) -> None:
    # given the hero in en-US and a German one
    await given(app, block_config())
    assert (await mutate(app, CREATE_BLOCK, {"i": HERO_INPUT}))["ok"]
    german = {"key": "hero", "type": "hero", "locale": "de-DE", "fields": {"title": "Willkommen"}}
    assert (await mutate(app, CREATE_BLOCK, {"i": german}))["ok"]

    # when the German one is changed and published
    patched = await mutate(app, UPDATE_BLOCK, {"k": "hero", "l": "de-DE", "i": {"fields": {"title": "Hallo"}}})
    published = await mutate(app, PUBLISH, {"k": "hero", "l": "de-DE"})

    # then only it changed
    assert patched["result"]["draft"]["fields"] == {"title": "Hallo"}
    assert (published["result"]["locale"], published["result"]["version"]) == ("de-DE", 1)
    listed = ok(await app.admin("{ blocks { key locale status } }"))["blocks"]
    assert listed == [
        {"key": "hero", "locale": "de-DE", "status": "published"},
        {"key": "hero", "locale": "en-US", "status": "draft"},
    ]
    assert ok(await app.admin(READ_BLOCK, {"k": "hero"}))["block"]["draft"]["fields"] == {"title": "Welcome"}


# -- invalid input: rejected whole, every error at its path, nothing written ----------------------


def invalid_case_config() -> dict[str, Any]:
    return bundle(
        placements=[placement("home")],
        segments=[segment("gold", trait("tier", "eq", "gold")), segment("vip", {"segment": "gold"})],
        scores=[{"key": "engagement", "events": {"page_view": 1}, "half_life": "7d"}],
        flags=[flag("beta")],
        experiments=[{"key": "exp"}],
        blocks=[block("hero", placements=[placed("home")], variants=[variant("beta", flag="beta")])],
    )


CREATE_SEGMENT = f"mutation($i: SegmentInput!) {{ createSegment(input: $i) {{ ok {ERRORS} }} }}"
UPDATE_SEGMENT = f"mutation($k: String!, $i: SegmentPatch!) {{ updateSegment(key: $k, input: $i) {{ ok {ERRORS} }} }}"
CREATE_FLAG = f"mutation($i: FlagInput!) {{ createFlag(input: $i) {{ ok {ERRORS} }} }}"
CREATE_SCORE = f"mutation($i: ScoreInput!) {{ createScore(input: $i) {{ ok {ERRORS} }} }}"
CREATE_BLOCK_ERRORS = f"mutation($i: BlockInput!) {{ createBlock(input: $i) {{ ok {ERRORS} }} }}"
IMPORT_ERRORS = f"mutation($b: JSON!) {{ importBundle(bundle: $b) {{ ok {ERRORS} }} }}"


def new_block(**doc: Any) -> dict[str, Any]:
    return {"key": "promo", "type": "banner", **doc}


INVALID = [
    pytest.param(
        CREATE_SEGMENT,
        {"i": {"key": "new", "rule": {"all": [
            trait("tier", "eq", "gold"),
            trait("tier", "equals", "gold"),
            context("device", "eq", "MOBILE"),
            {"segment": "no-such-segment"},
        ]}}},
        {("input.rule.all[1].op", "INVALID"): "unknown operator 'equals'",
         ("input.rule.all[2].context", "INVALID"): "context conditions are not allowed in a segment",
         ("input.rule.all[3].segment", "INVALID"): "unknown segment 'no-such-segment'"},
        id="segment-with-three-errors",
    ),
    pytest.param(
        UPDATE_SEGMENT,
        {"k": "gold", "i": {"rule": {"segment": "vip"}}},
        {("input.rule", "INVALID"): "cycle of segment references: gold -> vip -> gold"},
        id="segment-cycle-through-an-update",
    ),
    pytest.param(
        CREATE_SEGMENT,
        {"i": {"key": "recent", "rule": {"event": "purchase", "within": "10 minutes"}}},
        {("input.rule.within", "INVALID"): "10 minutes"},
        id="segment-bad-duration",
    ),
    pytest.param(
        CREATE_SCORE,
        {"i": {"key": "loyalty", "events": {"purchase": 5}, "halfLife": "7x"}},
        {("input.half_life", "INVALID"): "'7x' is not a duration"},
        id="score-bad-duration",
    ),
    pytest.param(CREATE_FLAG, {"i": {"key": "wide", "rollout": 150}}, {("input.rollout", "INVALID"): "outside 0-100"},
                 id="rollout-150"),
    pytest.param(CREATE_FLAG, {"i": {"key": "fine", "rollout": 25.555}},
                 {("input.rollout", "INVALID"): "more than two decimals"}, id="rollout-25.555"),
    pytest.param(
        CREATE_BLOCK_ERRORS,
        {"i": new_block(variants=[{"key": "t", "experiment": "exp", "arms": [{"key": "a", "weight": 0}]}])},
        {("input.variants[0].arms[0].weight", "INVALID"): "positive integer"},
        id="arm-weight-0",
    ),
    pytest.param(
        IMPORT_ERRORS,
        {"b": bundle(blocks=[block("promo", variants=[experiment_variant("t", "exp", {"a": 1.5})])])},
        {("blocks[0].variants[0].arms[0].weight", "INVALID"): "positive integer"},
        id="arm-weight-1.5",
    ),
    pytest.param(
        CREATE_BLOCK_ERRORS,
        {"i": new_block(variants=[{"key": "t", "experiment": "exp", "fields": {"x": 1}, "arms": [{"key": "a", "weight": 1}]}])},  # noqa: E501
        {("input.variants[0].fields", "INVALID"): "no fields of its own"},
        id="fields-on-an-arms-variant",
    ),
    pytest.param(
        CREATE_BLOCK_ERRORS,
        {"i": new_block(variants=[{"key": "v", "flag": "no-such-flag"}])},
        {("input.variants[0].flag", "INVALID"): "unknown flag 'no-such-flag'"},
        id="unknown-flag-on-a-variant",
    ),
    pytest.param(
        CREATE_BLOCK_ERRORS,
        {"i": new_block(placements=[{"key": "no-such-placement"}])},
        {("input.placements[0].key", "INVALID"): "unknown placement 'no-such-placement'"},
        id="unknown-placement-on-a-block",
    ),
    pytest.param(
        CREATE_BLOCK_ERRORS,
        {"i": new_block(variants=[{"key": "v", "fields": {}}, {"key": "v", "fields": {}}])},
        {("input.variants[1].key", "INVALID"): "duplicate variant key 'v'"},
        id="duplicate-variant-keys",
    ),
    pytest.param(
        CREATE_BLOCK_ERRORS,
        {"i": new_block(
            placements=[{"key": "no-such-placement"}],
            audience={"trait": "tier", "op": "eq"},
            variants=[{"key": "v", "flag": "no-such-flag"}, {"key": "v", "when": {"segment": "nope"}}],
        )},
        {("input.placements[0].key", "INVALID"): "unknown placement",
         ("input.audience.value", "INVALID"): "value",
         ("input.variants[0].flag", "INVALID"): "unknown flag",
         ("input.variants[1].when.segment", "INVALID"): "unknown segment 'nope'",
         ("input.variants[1].key", "INVALID"): "duplicate variant key"},
        id="block-with-five-errors",
    ),
    pytest.param(CREATE_SEGMENT, {"i": {"key": "gold", "rule": trait("tier", "eq", "gold")}},
                 {("input.key", "CONFLICT"): "already exists"}, id="create-an-existing-key"),
    pytest.param(CREATE_BLOCK_ERRORS, {"i": {"key": "hero", "type": "hero"}},
                 {("input.key", "CONFLICT"): "already exists"}, id="create-an-existing-block"),
    pytest.param(UPDATE_SEGMENT, {"k": "nope", "i": {"priority": 1}}, {("key", "NOT_FOUND"): "not found"},
                 id="update-a-missing-key"),
    pytest.param(
        f'mutation {{ deleteSegment(key: "gold") {{ ok {ERRORS} }} }}',
        None,
        {("segments['vip'].rule.segment", "INVALID"): "refers to segment 'gold', which cannot be deleted"},
        id="delete-a-referenced-segment",
    ),
    pytest.param(
        f'mutation {{ deleteFlag(key: "beta") {{ ok {ERRORS} }} }}',
        None,
        {("blocks['hero' in en-US].variants[0].flag", "INVALID"): "refers to flag 'beta', which cannot be deleted"},
        id="delete-a-referenced-flag",
    ),
    pytest.param(
        f'mutation {{ deletePlacement(key: "home") {{ ok {ERRORS} }} }}',
        None,
        {("blocks['hero' in en-US].placements[0].key", "INVALID"): "refers to placement 'home', which cannot"},
        id="delete-a-referenced-placement",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("mutation", "variables", "expected"), INVALID)
async def test_an_invalid_input_is_rejected_whole_with_every_error_and_nothing_is_written(
    app: RunningApp,
    mutation: str,
    variables: dict[str, Any] | None,
    expected: dict[tuple[str, str], str],
) -> None:
    # given a valid space
    await given(app, invalid_case_config())
    before, version = await export_bundle(app), await content_version(app)

    # when an invalid change is sent
    payload = await mutate(app, mutation, variables)

    # then every error is listed at its path, with a message that says what is wrong
    assert problems(payload) == set(expected), payload["errors"]
    for error in payload["errors"]:
        assert expected[(error["path"], error["code"])] in error["message"], error
    # and nothing changed
    assert await export_bundle(app) == before
    assert await content_version(app) == version


async def test_what_a_live_version_refers_to_cannot_be_deleted(app: RunningApp) -> None:
    # given a published hero whose draft no longer uses the flag its live version uses
    await given(app, invalid_case_config())
    assert (await mutate(app, UPDATE_BLOCK, {"k": "hero", "i": {"variants": []}}))["ok"]
    before = await export_bundle(app)
    delete_flag = f'mutation {{ deleteFlag(key: "beta") {{ ok {ERRORS} }} }}'

    # when the flag is deleted
    refused = await mutate(app, delete_flag)

    # then the live version's reference is reported, and nothing is deleted
    assert problems(refused) == {("blocks['hero' in en-US] (live version 1).variants[0].flag", "INVALID")}
    assert await export_bundle(app) == before

    # and once the draft is published, the flag can go
    assert (await mutate(app, PUBLISH, {"k": "hero"}))["ok"]
    assert await mutate(app, delete_flag) == {"ok": True, "errors": []}


async def test_a_variable_of_the_wrong_graphql_type_is_a_bad_user_input(app: RunningApp) -> None:
    arms = [{"key": "a", "weight": 1.5}]

    reply = await app.admin(CREATE_BLOCK_ERRORS, {"i": new_block(variants=[{"key": "t", "arms": arms}])})

    assert reply.status == 400
    assert reply.codes() == ["BAD_USER_INPUT"]
    assert "weight" in reply.errors[0]["message"]
    assert ok(await app.admin("{ blocks { key } }")) == {"blocks": []}


# -- bundles --------------------------------------------------------------------------------------

DEMO_COUNTS = {"placements": 3, "segments": 6, "scores": 1, "flags": 2, "experiments": 1, "blocks": 8}


async def test_the_demo_bundle_imports_and_a_second_import_changes_nothing(app: RunningApp) -> None:
    # when the demo is imported into an empty space
    first = await import_bundle(app, demo_bundle())

    # then everything in it is created
    assert first["ok"], first["errors"]
    assert (first["created"], first["updated"], first["unchanged"]) == (DEMO_COUNTS, {}, {})
    assert (first["profiles"], first["events"], first["rejected"]) == (3, 0, [])
    assert first["version"] == await content_version(app)
    exported = await export_bundle(app)

    # when it is imported again
    second = await import_bundle(app, demo_bundle())

    # then nothing changes: the same content version, every entity unchanged
    assert second["ok"], second["errors"]
    assert (second["created"], second["updated"], second["unchanged"]) == ({}, {}, DEMO_COUNTS)
    assert second["version"] == first["version"] == await content_version(app)
    assert await export_bundle(app) == exported
    versions = ok(await app.admin('{ block(key: "hero-main") { versions { version } } }'))["block"]["versions"]
    assert versions == [{"version": 1}]


async def test_a_changed_entity_is_counted_as_updated(app: RunningApp) -> None:
    await given(app, demo_bundle())
    changed = demo_bundle()
    changed["flags"][1]["rollout"] = 10
    changed["blocks"][0]["fields"]["title"] = "Welcome!"

    result = await import_bundle(app, changed)

    assert result["updated"] == {"flags": 1, "blocks": 1}
    assert result["unchanged"] == {**DEMO_COUNTS, "flags": 1, "blocks": 7}
    hero = ok(await app.admin('{ block(key: "hero-main") { publishedVersion versions { version } } }'))["block"]
    assert hero == {"publishedVersion": 2, "versions": [{"version": 1}, {"version": 2}]}


async def test_a_dry_run_counts_and_writes_nothing(app: RunningApp) -> None:
    version = await content_version(app)

    result = await import_bundle(app, demo_bundle(), dry_run=True)

    assert result["ok"], result["errors"]
    assert result["dryRun"] is True
    assert result["created"] == DEMO_COUNTS
    assert result["version"] == version == await content_version(app)
    exported = await export_bundle(app)
    assert {kind: exported[kind] for kind in NOTHING} == NOTHING
    # and no profile was stored: Ada is in no segment once the configuration is there
    await given(app, {**demo_bundle(), "profiles": []})
    viewer = ok(await app.graphql('{ viewer(viewer: {userId: "u-ada"}) { segments { key } } }'))
    assert viewer == {"viewer": {"segments": []}}


async def test_an_invalid_bundle_imports_nothing_and_lists_every_error(app: RunningApp) -> None:
    # given a bundle with errors in several entities
    broken = demo_bundle()
    broken["placements"][1]["limit"] = -1
    broken["segments"][0]["rule"]["op"] = "equals"
    broken["flags"][1]["rollout"] = 150
    broken["blocks"][0]["variants"][0]["flag"] = "no-such-flag"
    broken["blocks"][2]["variants"][0]["arms"][1]["weight"] = 0
    broken["blocks"][3]["schedule"] = {"from": "soon"}
    version = await content_version(app)

    # when it is imported
    result = await import_bundle(app, broken)

    # then it is refused with every error at its path
    assert result["ok"] is False
    assert {(e["path"], e["code"]) for e in result["errors"]} == {
        ("placements[1].limit", "INVALID"),
        ("segments[0].rule.op", "INVALID"),
        ("flags[1].rollout", "INVALID"),
        ("blocks[0].variants[0].flag", "INVALID"),
        ("blocks[2].variants[0].arms[1].weight", "INVALID"),
        ("blocks[3].schedule.from", "INVALID"),
    }
    # and nothing was imported, configuration or data
    assert (result["created"], result["profiles"], result["events"]) == ({}, 0, 0)
    assert await content_version(app) == version
    exported = await export_bundle(app)
    assert {kind: exported[kind] for kind in NOTHING} == NOTHING


async def test_a_bundle_that_is_not_a_bundle_is_refused(app: RunningApp) -> None:
    cases = (([1, 2], ""), ({"version": 2}, "version"), ({"blocks": {}}, "blocks"), ({"extra": 1}, "extra"))
    for document, path in cases:
        reply = await app.admin(IMPORT_ERRORS, {"b": document})

        assert ok(reply)["importBundle"]["ok"] is False
        assert path in [e["path"] for e in reply.data["importBundle"]["errors"]]


async def test_bad_profiles_and_events_are_rejected_one_by_one(app: RunningApp) -> None:
    # given a valid configuration with some bad data records
    document = bundle(
        segments=[segment("gold", trait("tier", "eq", "gold"))],
        profiles=[
            {"userId": "u-1", "traits": {"tier": "gold"}},
            {"traits": {"tier": "gold"}},
            {"userId": "u-2", "traits": "gold"},
            {"userId": "u-3", "traits": {"tier": "gold"}, "consent": {"personalization": "yes"}},
        ],
        events=[
            {"id": "e-1", "type": "page_view", "userId": "u-1", "at": "2026-11-20T10:00:00Z"},
            {"type": "page_view", "userId": "u-1", "at": "2026-11-20T10:00:00Z"},
            {"id": "e-3", "type": "page_view", "userId": "u-1", "at": "yesterday"},
            {"id": "e-4", "type": "page_view", "at": "2026-11-20T10:00:00Z"},
            {"id": "e-5", "type": "purchase", "anonymousId": "a-1", "at": "2026-11-20T11:00:00Z"},
        ],
    )

    # when it is imported
    result = await import_bundle(app, document)

    # then the configuration and the good records are in, and each bad record is reported
    assert result["ok"], result["errors"]
    assert result["created"] == {"segments": 1}
    assert (result["profiles"], result["events"]) == (1, 2)
    assert {e["path"] for e in result["rejected"]} == {
        "profiles[1].userId",
        "profiles[2].traits",
        "profiles[3].consent.personalization",
        "events[1].id",
        "events[2].at",
        "events[3].userId",
    }
    viewer = ok(await app.graphql('{ viewer(viewer: {userId: "u-1"}) { segments { key } } }'))
    assert viewer == {"viewer": {"segments": [{"key": "gold"}]}}


def by_identity(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["key"], d.get("locale", "")): d for d in documents}


async def test_an_export_equals_the_imported_bundle_and_imports_as_a_no_op(app: RunningApp) -> None:
    # given the demo, imported
    imported = demo_bundle()
    first = await given(app, imported)

    # when it is exported
    exported = await export_bundle(app)

    # then it holds the configuration, entity by entity, without profiles and events
    assert exported["version"] == 1
    assert exported["locales"] == imported["locales"]
    assert "profiles" not in exported
    assert "events" not in exported
    for kind in (*CONFIG_KINDS, "blocks"):
        assert len(exported[kind]) == len(imported[kind]), kind
        assert by_identity(exported[kind]) == by_identity(imported[kind]), kind
    # and each list is sorted by key (blocks by key, then locale)
    assert [(b["key"], b["locale"]) for b in exported["blocks"]] == sorted(by_identity(imported["blocks"]))
    for kind in CONFIG_KINDS:
        assert [d["key"] for d in exported[kind]] == sorted(d["key"] for d in imported[kind])

    # and importing the export changes nothing
    again = await import_bundle(app, exported)
    assert again["ok"], again["errors"]
    assert (again["created"], again["updated"]) == ({}, {})
    assert again["version"] == first["version"]


async def test_an_export_carries_what_is_live_with_its_status(app: RunningApp) -> None:
    # given the demo, with a draft edit of the published hero and the recommendations unpublished
    await given(app, demo_bundle())
    edited = await mutate(app, UPDATE_BLOCK, {"k": "hero-main", "i": {"fields": {"title": "Draft"}}})
    assert edited["ok"], edited
    assert (await mutate(app, UNPUBLISH, {"k": "recs"}))["ok"]

    # when it is exported
    exported = by_identity((await export_bundle(app))["blocks"])

    # then the published hero exports its live version, not the pending draft
    original = by_identity(demo_bundle()["blocks"])
    assert exported[("hero-main", "en-US")] == original[("hero-main", "en-US")]
    # and the unpublished block, and the never published one, export their drafts as drafts
    assert exported[("recs", "en-US")] == {**original[("recs", "en-US")], "status": "draft"}
    assert exported[("spring-teaser", "en-US")]["status"] == "draft"

    # and importing that export leaves the pending draft alone
    result = await import_bundle(app, await export_bundle(app))
    assert (result["created"], result["updated"]) == ({}, {})
    draft = ok(await app.admin('{ block(key: "hero-main") { draft } }'))["block"]["draft"]
    assert draft["fields"] == {"title": "Draft"}


async def test_a_block_without_a_locale_is_imported_in_the_default_locale(app: RunningApp) -> None:
    # given a bundle whose block names no locale
    document = bundle(placements=[placement("home")], blocks=[{**block("plain", placements=[placed("home")])}])
    del document["blocks"][0]["locale"]

    # when it is imported, twice
    first = await import_bundle(app, document)
    second = await import_bundle(app, document)

    # then it is in the default locale, served, and the second import changes nothing
    assert first["created"] == {"placements": 1, "blocks": 1}
    assert (second["created"], second["updated"], second["unchanged"]) == ({}, {}, {"placements": 1, "blocks": 1})
    state = ok(await app.admin('{ block(key: "plain") { locale status } }'))["block"]
    assert state == {"locale": "en-US", "status": "published"}
    assert ok(await app.graphql('{ block(key: "plain") { locale } }')) == {"block": {"locale": "en-US"}}
    # and a block created through the API without a locale is too
    created = await mutate(app, CREATE_BLOCK, {"i": {"key": "other", "type": "hero"}})
    assert (created["ok"], created["result"]["locale"]) == (True, "en-US")

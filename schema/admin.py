"""The admin schema (``/admin/graphql``, admin keys): blocks with their variants, arms and versions,
placements, segments, scores, flags and experiments; bundles in and out.

Mutations return a payload with ``errors`` (each with the JSON path of what is wrong) rather than
raising: an invalid input is an expected outcome, and nothing of it is written."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar

import strawberry
from strawberry.scalars import JSON
from strawberry.types.base import has_object_definition

from content.errors import InvalidContent
from schema.context import Context
from schema.ports import (
    AdminService,
    BlockState,
    BlockVersionState,
    ConflictError,
    ExperimentReport,
    ImportReport,
    NotFoundError,
)

Info = strawberry.Info[Context, None]
T = TypeVar("T")


def _admin(info: Info) -> AdminService:
    admin = info.context.admin
    assert admin is not None, "the admin schema runs with an admin service"
    return admin


# -- outputs --------------------------------------------------------------------------------------


@strawberry.type(description="One thing wrong with an input; `path` is its JSON path.")
class InputError:
    path: str
    message: str
    code: str


@strawberry.type
class Payload(Generic[T]):
    ok: bool
    result: T | None
    errors: list[InputError]


@strawberry.type
class Placement:
    key: str
    name: str | None
    description: str | None
    limit: int | None
    document: JSON

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Placement:
        return cls(
            key=doc["key"],
            name=doc.get("name"),
            description=doc.get("description"),
            limit=doc.get("limit"),
            document=JSON(doc),
        )


@strawberry.type
class Segment:
    key: str
    name: str | None
    description: str | None
    priority: int
    rule: JSON
    document: JSON

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Segment:
        return cls(
            key=doc["key"],
            name=doc.get("name"),
            description=doc.get("description"),
            priority=int(doc.get("priority") or 0),
            rule=doc["rule"],
            document=JSON(doc),
        )


@strawberry.type
class Score:
    key: str
    name: str | None
    events: JSON
    half_life: str
    document: JSON

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Score:
        return cls(
            key=doc["key"],
            name=doc.get("name"),
            events=JSON(doc["events"]),
            half_life=doc["half_life"],
            document=JSON(doc),
        )


@strawberry.type
class Flag:
    key: str
    name: str | None
    description: str | None
    enabled: bool
    rollout: float
    salt: str
    audience: JSON | None
    stickiness: str | None
    steps: JSON | None = strawberry.field(description='A scheduled ramp: [{"at": date-time, "rollout": 25}, ...].')
    document: JSON

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Flag:
        return cls(
            key=doc["key"],
            name=doc.get("name"),
            description=doc.get("description"),
            enabled=bool(doc.get("enabled")),
            rollout=float(100 if doc.get("rollout") is None else doc["rollout"]),
            salt=doc.get("salt") or doc["key"],
            audience=JSON(doc["audience"]) if doc.get("audience") is not None else None,
            stickiness=doc.get("stickiness"),
            steps=JSON(doc["steps"]) if doc.get("steps") is not None else None,
            document=JSON(doc),
        )


@strawberry.type
class Experiment:
    key: str
    name: str | None
    description: str | None
    goal: JSON | None
    document: JSON

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Experiment:
        return cls(
            key=doc["key"],
            name=doc.get("name"),
            description=doc.get("description"),
            goal=JSON(doc["goal"]) if doc.get("goal") is not None else None,
            document=JSON(doc),
        )


@strawberry.type
class BlockVersion:
    key: str
    locale: str
    version: int
    document: JSON
    published_at: datetime

    @classmethod
    def from_state(cls, state: BlockVersionState) -> BlockVersion:
        return cls(
            key=state.key,
            locale=state.locale,
            version=state.version,
            document=JSON(state.document),
            published_at=state.published_at,
        )


@strawberry.type(description="A block in one locale: its draft, and which version (if any) is live.")
class Block:
    key: str
    locale: str
    type: str
    status: str = strawberry.field(description="'published' when a version is live, else 'draft'.")
    draft: JSON
    published_version: int | None
    latest_version: int
    published_at: datetime | None
    updated_at: datetime

    @strawberry.field(description="Every published version, oldest first.")
    async def versions(self, info: Info) -> list[BlockVersion]:
        return [BlockVersion.from_state(v) for v in await _admin(info).block_versions(self.key, self.locale)]

    @classmethod
    def from_state(cls, state: BlockState) -> Block:
        return cls(
            key=state.key,
            locale=state.locale,
            type=str(state.draft.get("type")),
            status="published" if state.published_version is not None else "draft",
            draft=JSON(state.draft),
            published_version=state.published_version,
            latest_version=state.latest_version,
            published_at=state.published_at,
            updated_at=state.updated_at,
        )


@strawberry.type(description="One arm's results against the first arm (the control).")
class ArmResult:
    arm: str
    weight: int
    exposed: int = strawberry.field(description="Viewers who were shown this arm (first exposure).")
    converted: int = strawberry.field(description="Exposed viewers with a goal event after their first exposure.")
    conversion_rate: float | None
    uplift: float | None = strawberry.field(description="(rate - control rate) / control rate.")
    difference: float | None = strawberry.field(description="rate - control rate.")
    p_value: float | None = strawberry.field(description="Two-sided two-proportion z-test against the control.")
    ci_low: float | None = strawberry.field(description="95% confidence interval of the difference.")
    ci_high: float | None


@strawberry.type
class ExperimentResults:
    key: str
    goal: JSON
    exposed: int
    arms: list[ArmResult]
    srm_chi_square: float | None
    srm_p_value: float | None
    sample_ratio_mismatch: bool = strawberry.field(
        description="The exposures do not follow the configured weights (chi-square p < 0.001)."
    )

    @classmethod
    def from_report(cls, report: ExperimentReport) -> ExperimentResults:
        analysis = report.analysis
        return cls(
            key=report.key,
            goal=JSON(list(report.goal)),
            exposed=analysis.exposed,
            arms=[
                ArmResult(
                    arm=a.key,
                    weight=a.weight,
                    exposed=a.exposed,
                    converted=a.converted,
                    conversion_rate=a.rate,
                    uplift=a.uplift,
                    difference=a.difference,
                    p_value=a.p_value,
                    ci_low=a.ci_low,
                    ci_high=a.ci_high,
                )
                for a in analysis.arms
            ],
            srm_chi_square=analysis.srm_chi_square,
            srm_p_value=analysis.srm_p_value,
            sample_ratio_mismatch=analysis.sample_ratio_mismatch,
        )


@strawberry.type
class ImportResult:
    ok: bool
    dry_run: bool
    version: int
    created: JSON
    updated: JSON
    unchanged: JSON
    profiles: int
    events: int
    rejected: list[InputError] = strawberry.field(description="Profiles and events that were not accepted.")
    errors: list[InputError] = strawberry.field(description="Why nothing was imported, when ok is false.")

    @classmethod
    def from_report(cls, report: ImportReport) -> ImportResult:
        return cls(
            ok=True,
            dry_run=report.dry_run,
            version=report.version,
            created=JSON(report.created),
            updated=JSON(report.updated),
            unchanged=JSON(report.unchanged),
            profiles=report.profiles,
            events=report.events,
            rejected=[InputError(path=p.path, message=p.message, code="INVALID") for p in report.rejected],
            errors=[],
        )


# -- inputs ---------------------------------------------------------------------------------------
# Create inputs name every required field; patch inputs leave out what does not change (a field set
# to null is removed). Rules, fields and goals are JSON documents of the rule language.


@strawberry.input
class PlacementInput:
    key: str
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    limit: int | None = strawberry.UNSET


@strawberry.input
class PlacementPatch:
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    limit: int | None = strawberry.UNSET


@strawberry.input
class SegmentInput:
    key: str
    rule: JSON
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    priority: int | None = strawberry.UNSET


@strawberry.input
class SegmentPatch:
    rule: JSON | None = strawberry.UNSET
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    priority: int | None = strawberry.UNSET


@strawberry.input
class ScoreInput:
    key: str
    events: JSON
    half_life: str
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET


@strawberry.input
class ScorePatch:
    events: JSON | None = strawberry.UNSET
    half_life: str | None = strawberry.UNSET
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET


@strawberry.input
class FlagInput:
    key: str
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    enabled: bool | None = strawberry.UNSET
    rollout: float | None = strawberry.UNSET
    salt: str | None = strawberry.UNSET
    audience: JSON | None = strawberry.UNSET
    stickiness: str | None = strawberry.UNSET
    steps: JSON | None = strawberry.UNSET


@strawberry.input
class FlagPatch:
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    enabled: bool | None = strawberry.UNSET
    rollout: float | None = strawberry.UNSET
    salt: str | None = strawberry.UNSET
    audience: JSON | None = strawberry.UNSET
    stickiness: str | None = strawberry.UNSET
    steps: JSON | None = strawberry.UNSET


@strawberry.input
class ExperimentInput:
    key: str
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    goal: JSON | None = strawberry.UNSET


@strawberry.input
class ExperimentPatch:
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    goal: JSON | None = strawberry.UNSET


@strawberry.input
class BlockPlacementInput:
    key: str
    priority: int | None = strawberry.UNSET


@strawberry.input
class ScheduleInput:
    from_: datetime | None = strawberry.field(default=strawberry.UNSET, name="from")
    until: datetime | None = strawberry.UNSET


@strawberry.input
class ArmInput:
    key: str
    weight: int
    fields: JSON | None = strawberry.UNSET


@strawberry.input
class VariantInput:
    key: str
    flag: str | None = strawberry.UNSET
    when: JSON | None = strawberry.UNSET
    fields: JSON | None = strawberry.UNSET
    experiment: str | None = strawberry.UNSET
    arms: list[ArmInput] | None = strawberry.UNSET
    stickiness: str | None = strawberry.UNSET


@strawberry.input
class BlockInput:
    key: str
    type: str
    locale: str | None = strawberry.UNSET
    tags: list[str] | None = strawberry.UNSET
    placements: list[BlockPlacementInput] | None = strawberry.UNSET
    schedule: ScheduleInput | None = strawberry.UNSET
    audience: JSON | None = strawberry.UNSET
    flag: str | None = strawberry.UNSET
    fields: JSON | None = strawberry.UNSET
    variants: list[VariantInput] | None = strawberry.UNSET


@strawberry.input
class BlockPatch:
    type: str | None = strawberry.UNSET
    tags: list[str] | None = strawberry.UNSET
    placements: list[BlockPlacementInput] | None = strawberry.UNSET
    schedule: ScheduleInput | None = strawberry.UNSET
    audience: JSON | None = strawberry.UNSET
    flag: str | None = strawberry.UNSET
    fields: JSON | None = strawberry.UNSET
    variants: list[VariantInput] | None = strawberry.UNSET


def to_document(value: Any) -> Any:
    """A Strawberry input as the bundle document it stands for: unset fields are left out,
    ``from_`` is ``from``, date-times are ISO 8601 strings."""
    if has_object_definition(value):
        doc: dict[str, Any] = {}
        for f in dataclasses.fields(value):  # type: ignore[arg-type]  # inputs are dataclasses
            item = getattr(value, f.name)
            if item is strawberry.UNSET:
                continue
            doc[f.name.rstrip("_")] = to_document(item)
        return doc
    if isinstance(value, list):
        return [to_document(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


# -- running a write --------------------------------------------------------------------------------


async def _attempt(write: Callable[[], Awaitable[T]]) -> tuple[T | None, list[InputError]]:
    try:
        return await write(), []
    except InvalidContent as exc:
        return None, [InputError(path=p.path, message=p.message, code="INVALID") for p in exc.problems]
    except ConflictError as exc:
        return None, [InputError(path="input.key", message=str(exc), code="CONFLICT")]
    except NotFoundError as exc:
        return None, [InputError(path="key", message=str(exc), code="NOT_FOUND")]


def _payload(result: T | None, errors: list[InputError]) -> Payload[T]:
    return Payload(ok=not errors, result=result, errors=errors)


def _entity_mutations(kind: str, node: Any, create_input: Any, patch_input: Any) -> dict[str, Any]:
    """createX, updateX and deleteX for one kind of configuration entity."""
    singular = node.__name__

    async def create(info: Info, input: Any) -> Payload[Any]:
        result, errors = await _attempt(lambda: _admin(info).save(kind, to_document(input), mode="create"))
        return _payload(node.from_doc(result) if result else None, errors)

    async def update(info: Info, key: str, input: Any) -> Payload[Any]:
        doc = {**to_document(input), "key": key}
        result, errors = await _attempt(lambda: _admin(info).save(kind, doc, mode="update"))
        return _payload(node.from_doc(result) if result else None, errors)

    async def delete(info: Info, key: str) -> Payload[bool]:
        result, errors = await _attempt(lambda: _admin(info).delete(kind, key))
        return _payload(result, errors)

    create.__annotations__ = {"info": Info, "input": create_input, "return": Payload[node]}
    update.__annotations__ = {"info": Info, "key": str, "input": patch_input, "return": Payload[node]}
    delete.__annotations__ = {"info": Info, "key": str, "return": Payload[bool]}
    return {
        f"create_{singular.lower()}": strawberry.mutation(create, description=f"Create a {singular.lower()}."),
        f"update_{singular.lower()}": strawberry.mutation(
            update, description=f"Change a {singular.lower()}: fields left out keep their values."
        ),
        f"delete_{singular.lower()}": strawberry.mutation(
            delete, description=f"Delete a {singular.lower()} (refused while something refers to it)."
        ),
    }


def _entity_queries(kind: str, node: Any) -> dict[str, Any]:
    singular = node.__name__

    async def list_all(info: Info) -> list[Any]:
        return [node.from_doc(d) for d in await _admin(info).entities(kind)]

    async def get_one(info: Info, key: str) -> Any:
        doc = await _admin(info).entity(kind, key)
        return node.from_doc(doc) if doc else None

    list_all.__annotations__ = {"info": Info, "return": list[node]}
    get_one.__annotations__ = {"info": Info, "key": str, "return": node | None}
    return {kind: strawberry.field(list_all), singular.lower(): strawberry.field(get_one)}


_ENTITIES = (
    ("placements", Placement, PlacementInput, PlacementPatch),
    ("segments", Segment, SegmentInput, SegmentPatch),
    ("scores", Score, ScoreInput, ScorePatch),
    ("flags", Flag, FlagInput, FlagPatch),
    ("experiments", Experiment, ExperimentInput, ExperimentPatch),
)


@strawberry.type
class BlockQueries:
    @strawberry.field(description="Every block in every locale.")
    async def blocks(self, info: Info) -> list[Block]:
        return [Block.from_state(b) for b in await _admin(info).blocks()]

    @strawberry.field(description="One block; the locale defaults to the space's default locale.")
    async def block(self, info: Info, key: str, locale: str | None = None) -> Block | None:
        state = await _admin(info).block(key, locale)
        return Block.from_state(state) if state else None

    @strawberry.field(description="The whole configuration as a bundle (spec/bundle.md), without data.")
    async def export_bundle(self, info: Info) -> JSON:
        return JSON(await _admin(info).export_bundle())

    @strawberry.field(description="Exposures, conversions and statistics per arm; null for an unknown experiment.")
    async def experiment_results(self, info: Info, key: str) -> ExperimentResults | None:
        report = await _admin(info).experiment_results(key)
        return ExperimentResults.from_report(report) if report else None

    @strawberry.field
    async def locales(self, info: Info) -> JSON:
        return JSON(dict(await _admin(info).locales()))


@strawberry.type
class BlockMutations:
    @strawberry.mutation(description="Create a block's draft (publish it to make it live).")
    async def create_block(self, info: Info, input: BlockInput) -> Payload[Block]:
        result, errors = await _attempt(lambda: _admin(info).save_block(to_document(input), mode="create"))
        return _payload(Block.from_state(result) if result else None, errors)

    @strawberry.mutation(description="Change a block's draft: fields left out keep their values.")
    async def update_block(self, info: Info, key: str, input: BlockPatch, locale: str | None = None) -> Payload[Block]:
        doc = {**to_document(input), "key": key}
        if locale:
            doc["locale"] = locale
        result, errors = await _attempt(lambda: _admin(info).save_block(doc, mode="update"))
        return _payload(Block.from_state(result) if result else None, errors)

    @strawberry.mutation
    async def delete_block(self, info: Info, key: str, locale: str | None = None) -> Payload[bool]:
        result, errors = await _attempt(lambda: _admin(info).delete_block(key, locale))
        return _payload(result, errors)

    @strawberry.mutation(description="Publish the draft as a new immutable version.")
    async def publish_block(self, info: Info, key: str, locale: str | None = None) -> Payload[BlockVersion]:
        result, errors = await _attempt(lambda: _admin(info).publish_block(key, locale))
        return _payload(BlockVersion.from_state(result) if result else None, errors)

    @strawberry.mutation(description="Take the block off delivery; its versions are kept.")
    async def unpublish_block(self, info: Info, key: str, locale: str | None = None) -> Payload[bool]:
        result, errors = await _attempt(lambda: _admin(info).unpublish_block(key, locale))
        return _payload(result, errors)

    @strawberry.mutation(description="Upsert a whole bundle; with dryRun, validate and count only.")
    async def import_bundle(self, info: Info, bundle: JSON, dry_run: bool | None = False) -> ImportResult:
        try:
            report = await _admin(info).import_bundle(bundle, dry_run=bool(dry_run))
        except InvalidContent as exc:
            errors = [InputError(path=p.path, message=p.message, code="INVALID") for p in exc.problems]
            return ImportResult(
                ok=False,
                dry_run=bool(dry_run),
                version=info.context.snapshot.version,
                created=JSON({}),
                updated=JSON({}),
                unchanged=JSON({}),
                profiles=0,
                events=0,
                rejected=[],
                errors=errors,
            )
        return ImportResult.from_report(report)

    @strawberry.mutation(
        description="Delete everything Tessera holds about a viewer: profile, events, identities, "
        "behavioural state, memberships and cached copies, on every instance. Says what it removed."
    )
    async def delete_viewer_data(
        self, info: Info, user_id: str | None = None, anonymous_id: str | None = None
    ) -> Payload[JSON]:
        if not user_id and not anonymous_id:
            error = InputError(path="userId", message="give a userId or an anonymousId", code="INVALID")
            return _payload(None, [error])
        removed = await _admin(info).delete_viewer_data(user_id=user_id, anonymous_id=anonymous_id)
        return _payload(JSON(dict(removed)), [])

    @strawberry.mutation(description='Set the locales: {"default": "en-US", "fallbacks": {"de-AT": "de-DE"}}.')
    async def set_locales(self, info: Info, locales: JSON) -> Payload[JSON]:
        result, errors = await _attempt(lambda: _admin(info).set_locales(locales))
        return _payload(JSON(dict(result)) if result is not None else None, errors)


def _build_type(name: str, base: type, members: dict[str, Any]) -> Any:
    cls = type(name, (base,), members)
    return strawberry.type(cls)


_query_members: dict[str, Any] = {}
_mutation_members: dict[str, Any] = {}
for _kind, _node, _create, _patch in _ENTITIES:
    _query_members.update(_entity_queries(_kind, _node))
    _mutation_members.update(_entity_mutations(_kind, _node, _create, _patch))

Query = _build_type("Query", BlockQueries, _query_members)
Mutation = _build_type("Mutation", BlockMutations, _mutation_members)

schema = strawberry.Schema(query=Query, mutation=Mutation)

"""The delivery schema is a public contract (issue 2): every type, field, argument and default of
it must be in the served schema exactly; more is welcome. The checked-in SDL stays current."""

from __future__ import annotations

import pytest
from graphql import (
    GraphQLEnumType,
    GraphQLInputObjectType,
    GraphQLObjectType,
    GraphQLSchema,
    build_schema,
)
from strawberry import Schema

from schema import admin, delivery
from schema.export import FILES

CONTRACT = """
scalar JSON
scalar DateTime
enum DeviceType { DESKTOP MOBILE TABLET BOT OTHER }
enum Channel { WEB APP EMAIL PUSH }
enum TagMatch { ANY ALL }
input ViewerInput { userId: ID, anonymousId: ID, device: DeviceType, country: String, region: String, city: String,
  at: DateTime, timezone: String, locale: String, channel: Channel, attributes: JSON }
input EventInput { id: ID, type: String!, userId: ID, anonymousId: ID, at: DateTime, properties: JSON }
type Decision { variant: String!, reason: String!, rule: String, flag: String, experiment: String, trace: [String!]! }
type Block { id: ID!, key: String!, type: String!, tags: [String!]!, locale: String!, fields: JSON!, variant: String!,
  version: Int!, publishedAt: DateTime, decision: Decision! }
type Placement { key: String!, blocks: [Block!]! }
type PageInfo { hasNextPage: Boolean!, endCursor: String }
type BlockEdge { cursor: String!, node: Block! }
type BlockConnection { edges: [BlockEdge!]!, pageInfo: PageInfo! }
type Segment { key: String!, name: String! }
type FlagValue { key: String!, enabled: Boolean!, variant: String, reason: String! }
type ViewerState { userId: ID, anonymousId: ID, segments: [Segment!]!, flags: [FlagValue!]! }
type TrackResult { accepted: Int!, rejected: Int!, errors: [String!]! }
type Query {
  placement(key: String!, viewer: ViewerInput, limit: Int): Placement
  block(key: String!, viewer: ViewerInput): Block
  blocks(tags: [String!], match: TagMatch = ANY, type: String, viewer: ViewerInput, first: Int = 20,
    after: String): BlockConnection!
  viewer(viewer: ViewerInput!): ViewerState!
}
type Mutation { track(events: [EventInput!]!): TrackResult! }
type Subscription {
  placement(key: String!, viewer: ViewerInput, limit: Int): Placement!
  block(key: String!, viewer: ViewerInput): Block!
  viewer(viewer: ViewerInput!): ViewerState!
}
"""


def _served() -> GraphQLSchema:
    return build_schema(delivery.schema.as_str())


def _named_types(schema: GraphQLSchema) -> list[str]:
    return sorted(name for name in schema.type_map if not name.startswith("__"))


@pytest.mark.parametrize("name", _named_types(build_schema(CONTRACT)))
def test_every_contract_type_is_served_exactly(name: str) -> None:
    # Given the contract's type and the served one
    promised = build_schema(CONTRACT).type_map[name]
    served = _served().type_map.get(name)

    # Then the served type exists, of the same kind, with every promised member unchanged
    assert served is not None, f"type {name} is missing"
    assert type(served) is type(promised)
    if isinstance(promised, GraphQLEnumType):
        assert isinstance(served, GraphQLEnumType)
        assert set(promised.values) <= set(served.values)
    if isinstance(promised, GraphQLObjectType | GraphQLInputObjectType):
        assert isinstance(served, GraphQLObjectType | GraphQLInputObjectType)
        for field_name, field in promised.fields.items():
            assert field_name in served.fields, f"{name}.{field_name} is missing"
            served_field = served.fields[field_name]
            assert str(served_field.type) == str(field.type), f"{name}.{field_name}"
            for arg_name, arg in getattr(field, "args", {}).items():
                served_arg = served_field.args.get(arg_name)  # type: ignore[union-attr]
                assert served_arg is not None, f"{name}.{field_name}({arg_name}) is missing"
                assert str(served_arg.type) == str(arg.type), f"{name}.{field_name}({arg_name})"
                assert served_arg.default_value == arg.default_value, f"{name}.{field_name}({arg_name}) default"
            extra_args = set(getattr(served_field, "args", {})) - set(getattr(field, "args", {}))
            required = [a for a in extra_args if str(served_field.args[a].type).endswith("!")]  # type: ignore[union-attr]
            assert not required, f"{name}.{field_name} adds required arguments {required}"


@pytest.mark.parametrize(("path", "schema"), list(FILES.items()), ids=lambda v: getattr(v, "name", ""))
def test_checked_in_sdl_is_current(path: object, schema: Schema) -> None:
    # The SDL files in schema/ are what clients read; `make schema` rewrites them.
    from pathlib import Path

    assert isinstance(path, Path)
    assert path.read_text() == schema.as_str() + "\n", f"{path.name} is stale: run `make schema`"


def test_admin_schema_builds() -> None:
    assert "importBundle" in admin.schema.as_str()

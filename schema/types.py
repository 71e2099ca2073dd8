"""GraphQL types shared by the delivery and admin schemas, with ``from_domain`` constructors."""

from __future__ import annotations

from datetime import datetime
from enum import Enum

import strawberry
from strawberry.scalars import JSON

from content.decide import Decision as DomainDecision
from content.decide import FlagValue as DomainFlagValue
from content.decide import Resolved
from content.snapshot import Segment as DomainSegment


@strawberry.enum
class DeviceType(Enum):
    DESKTOP = "DESKTOP"
    MOBILE = "MOBILE"
    TABLET = "TABLET"
    BOT = "BOT"
    OTHER = "OTHER"


@strawberry.enum
class Channel(Enum):
    WEB = "WEB"
    APP = "APP"
    EMAIL = "EMAIL"
    PUSH = "PUSH"


@strawberry.enum
class TagMatch(Enum):
    ANY = "ANY"
    ALL = "ALL"


@strawberry.input(description="Who is looking, and from where. Missing fields are inferred from the request.")
class ViewerInput:
    user_id: strawberry.ID | None = None
    anonymous_id: strawberry.ID | None = None
    device: DeviceType | None = None
    country: str | None = None
    region: str | None = None
    city: str | None = None
    at: datetime | None = strawberry.field(default=None, description="Evaluation instant; default: now.")
    timezone: str | None = None
    locale: str | None = None
    channel: Channel | None = None
    attributes: JSON | None = None


@strawberry.input
class EventInput:
    id: strawberry.ID | None = None
    type: str
    user_id: strawberry.ID | None = None
    anonymous_id: strawberry.ID | None = None
    at: datetime | None = None
    properties: JSON | None = None


@strawberry.type(description="Why a block shows what it shows.")
class Decision:
    variant: str
    reason: str = strawberry.field(description="RULE_MATCH, EXPERIMENT or DEFAULT.")
    rule: str | None = strawberry.field(description="The key of the variant entry that was taken.")
    flag: str | None
    experiment: str | None
    trace: list[str]

    @classmethod
    def from_domain(cls, decision: DomainDecision) -> Decision:
        return cls(
            variant=decision.variant,
            reason=decision.reason,
            rule=decision.rule,
            flag=decision.flag,
            experiment=decision.experiment,
            trace=list(decision.trace),
        )


@strawberry.type
class Block:
    id: strawberry.ID
    key: str
    type: str
    tags: list[str]
    locale: str
    fields: JSON
    variant: str
    version: int
    published_at: datetime | None
    decision: Decision

    @classmethod
    def from_domain(cls, resolved: Resolved) -> Block:
        block = resolved.block
        return cls(
            id=strawberry.ID(f"{block.key}:{block.locale}"),
            key=block.key,
            type=block.type,
            tags=list(block.tags),
            locale=block.locale,
            fields=JSON(resolved.fields),
            variant=resolved.decision.variant,
            version=block.version,
            published_at=block.published_at,
            decision=Decision.from_domain(resolved.decision),
        )


@strawberry.type
class Placement:
    key: str
    blocks: list[Block]


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class BlockEdge:
    cursor: str
    node: Block


@strawberry.type
class BlockConnection:
    edges: list[BlockEdge]
    page_info: PageInfo


@strawberry.type
class Segment:
    key: str
    name: str
    priority: int

    @classmethod
    def from_domain(cls, segment: DomainSegment) -> Segment:
        return cls(key=segment.key, name=segment.name, priority=segment.priority)


@strawberry.type
class FlagValue:
    key: str
    enabled: bool
    variant: str | None
    reason: str = strawberry.field(
        description="OpenFeature reason: STATIC, TARGETING_MATCH, SPLIT, DISABLED, DEFAULT or ERROR."
    )

    @classmethod
    def from_domain(cls, value: DomainFlagValue) -> FlagValue:
        return cls(key=value.key, enabled=value.enabled, variant=value.variant, reason=value.reason)


@strawberry.type
class ViewerState:
    user_id: strawberry.ID | None
    anonymous_id: strawberry.ID | None
    segments: list[Segment]
    flags: list[FlagValue]


@strawberry.type
class TrackResult:
    accepted: int
    rejected: int
    errors: list[str]

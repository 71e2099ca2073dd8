"""The delivery schema (``/graphql``): placements, blocks and viewers as the viewer's segments and
context select them, each block with its decision. Resolvers are thin: arguments -> engine ->
``from_domain``."""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator
from typing import Any

import strawberry
from strawberry.extensions import ParserCache, ValidationCache
from strawberry.permission import BasePermission

from schema.context import Context
from schema.errors import FORBIDDEN, not_implemented, user_error
from schema.types import (
    Block,
    BlockConnection,
    BlockEdge,
    EventInput,
    FlagValue,
    PageInfo,
    Placement,
    Segment,
    TagMatch,
    TrackResult,
    ViewerInput,
    ViewerState,
)

Info = strawberry.Info[Context, None]
_CURSOR_PREFIX = "block:"
MAX_PAGE = 100


class _Scoped(BasePermission):
    scopes: frozenset[str] = frozenset()
    message = "this key's scope does not allow this field"
    error_extensions = {"code": FORBIDDEN}  # noqa: RUF012

    def has_permission(self, source: object, info: Info, **kwargs: object) -> bool:
        allowed = info.context.principal.scope in self.scopes
        if not allowed and info.context.response is not None and hasattr(info.context.response, "status_code"):
            info.context.response.status_code = 403
        return allowed


class CanRead(_Scoped):
    """Delivery and preview keys read content; ingest keys may only send events."""

    scopes = frozenset({"delivery", "preview"})


class CanTrack(_Scoped):
    scopes = frozenset({"delivery", "ingest"})


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode((_CURSOR_PREFIX + key).encode()).decode()


def decode_cursor(cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise user_error("not a cursor returned by this API", "after") from exc
    if not text.startswith(_CURSOR_PREFIX):
        raise user_error("not a cursor returned by this API", "after")
    return text[len(_CURSOR_PREFIX) :]


@strawberry.type
class Query:
    @strawberry.field(
        permission_classes=[CanRead],
        description="A placement's blocks for the viewer; null when the placement does not exist.",
    )
    async def placement(
        self, info: Info, key: str, viewer: ViewerInput | None = None, limit: int | None = None
    ) -> Placement | None:
        if limit is not None and limit < 0:
            raise user_error("must be zero or more", "limit")
        evaluation = await info.context.evaluation(viewer)
        resolved = evaluation.placement(key, limit=limit, preview=info.context.principal.preview)
        if resolved is None:
            return None
        await info.context.expose(evaluation, resolved)
        return Placement(key=key, blocks=[Block.from_domain(r) for r in resolved])

    @strawberry.field(
        permission_classes=[CanRead], description="One block for the viewer; null when it is not eligible."
    )
    async def block(self, info: Info, key: str, viewer: ViewerInput | None = None) -> Block | None:
        evaluation = await info.context.evaluation(viewer)
        resolved = evaluation.block(key, preview=info.context.principal.preview)
        if resolved is None:
            return None
        await info.context.expose(evaluation, [resolved])
        return Block.from_domain(resolved)

    @strawberry.field(permission_classes=[CanRead])
    async def blocks(
        self,
        info: Info,
        tags: list[str] | None = None,
        match: TagMatch | None = TagMatch.ANY,
        type: str | None = None,
        viewer: ViewerInput | None = None,
        first: int | None = 20,
        after: str | None = None,
    ) -> BlockConnection:
        first = 20 if first is None else first
        if not 0 <= first <= MAX_PAGE:
            raise user_error(f"must be from 0 to {MAX_PAGE}", "first")
        after_key = decode_cursor(after) if after else None
        evaluation = await info.context.evaluation(viewer)
        page = evaluation.blocks(
            tags=tags,
            match_all=match is TagMatch.ALL,
            type_=type,
            first=first,
            after=after_key,
            preview=info.context.principal.preview,
        )
        await info.context.expose(evaluation, page.items)
        edges = [BlockEdge(cursor=encode_cursor(r.block.key), node=Block.from_domain(r)) for r in page.items]
        return BlockConnection(
            edges=edges,
            page_info=PageInfo(has_next_page=page.has_next, end_cursor=edges[-1].cursor if edges else None),
        )

    @strawberry.field(permission_classes=[CanRead], description="The viewer's segments (by priority) and flags.")
    async def viewer(self, info: Info, viewer: ViewerInput) -> ViewerState:
        evaluation = await info.context.evaluation(viewer)
        return ViewerState(
            user_id=strawberry.ID(viewer.user_id) if viewer.user_id else None,
            anonymous_id=strawberry.ID(viewer.anonymous_id) if viewer.anonymous_id else None,
            segments=[Segment.from_domain(s) for s in evaluation.segments()],
            flags=[FlagValue.from_domain(f) for f in evaluation.flags()],
        )


def _event_record(event: EventInput) -> dict[str, Any]:
    record: dict[str, Any] = {"type": event.type}
    for name, value in (
        ("id", event.id),
        ("userId", event.user_id),
        ("anonymousId", event.anonymous_id),
        ("at", event.at),
        ("properties", event.properties),
    ):
        if value is not None:
            record[name] = value
    return record


@strawberry.type
class Mutation:
    @strawberry.mutation(permission_classes=[CanTrack])
    async def track(self, info: Info, events: list[EventInput]) -> TrackResult:
        """Record events. Each invalid one is rejected and reported; the valid ones are accepted and
        durable when this returns, and the next query of their viewer reflects them."""
        ingest = info.context.ingest
        if ingest is None:
            raise not_implemented("track (event ingestion)")
        records = [(f"events[{i}]", _event_record(e)) for i, e in enumerate(events)]
        report = await ingest.track(records)
        return TrackResult(
            accepted=report.accepted,
            rejected=report.rejected_count,
            errors=[str(problem) for problem in report.rejected],
        )


@strawberry.type
class Subscription:
    @strawberry.subscription(permission_classes=[CanRead])
    async def placement(
        self, info: Info, key: str, viewer: ViewerInput | None = None, limit: int | None = None
    ) -> AsyncGenerator[Placement, None]:
        raise not_implemented("live placements (subscriptions)")
        yield  # pragma: no cover  (makes this an async generator)

    @strawberry.subscription(permission_classes=[CanRead])
    async def block(self, info: Info, key: str, viewer: ViewerInput | None = None) -> AsyncGenerator[Block, None]:
        raise not_implemented("live blocks (subscriptions)")
        yield  # pragma: no cover

    @strawberry.subscription(permission_classes=[CanRead])
    async def viewer(self, info: Info, viewer: ViewerInput) -> AsyncGenerator[ViewerState, None]:
        raise not_implemented("live viewers (subscriptions)")
        yield  # pragma: no cover


# Documents repeat (clients send the same few queries): parse and validate each one once.
schema = strawberry.Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    extensions=[lambda: ParserCache(maxsize=1024), lambda: ValidationCache(maxsize=1024)],
)

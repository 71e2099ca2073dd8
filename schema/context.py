"""The typed per-request context: who is calling, the snapshot the whole request reads, the
request's own hints about the viewer, and the ports resolvers use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from content.decide import Evaluation, Resolved
from content.errors import InvalidViewer
from content.snapshot import Snapshot
from content.viewer import make_viewer
from schema.errors import user_error
from schema.ports import AdminService, ExposureSink, HistorySource, Ingest, Principal, ProfileSource, RequestContext
from schema.types import ViewerInput


@dataclass
class Context:
    request: Request | WebSocket
    response: Response | WebSocket | None
    principal: Principal
    snapshot: Snapshot
    now: datetime
    inferred: RequestContext
    profiles: ProfileSource
    history: HistorySource
    admin: AdminService | None = None
    ingest: Ingest | None = None
    exposures: ExposureSink | None = None
    _evaluations: dict[tuple[Any, ...], Evaluation] = field(default_factory=dict)

    async def evaluation(self, viewer: ViewerInput | None, path: str = "viewer") -> Evaluation:
        """The viewer's evaluation against this request's snapshot (one per distinct viewer)."""
        viewer = viewer or ViewerInput()
        identity = (
            viewer.user_id, viewer.anonymous_id, viewer.device, viewer.country, viewer.region, viewer.city,
            viewer.at, viewer.timezone, viewer.locale, viewer.channel, _freeze(viewer.attributes),
        )  # fmt: skip
        cached = self._evaluations.get(identity)
        if cached is not None:
            return cached
        inferred = self.inferred
        try:
            normalised = make_viewer(
                at=viewer.at or self.now,
                user_id=viewer.user_id,
                anonymous_id=viewer.anonymous_id,
                device=viewer.device.value if viewer.device else inferred.device,
                channel=viewer.channel.value if viewer.channel else None,
                country=viewer.country or inferred.country,
                region=viewer.region or inferred.region,
                city=viewer.city or inferred.city,
                locale=viewer.locale,
                timezone=viewer.timezone,
                attributes=viewer.attributes,  # type: ignore[arg-type]  # checked by make_viewer
            )
        except InvalidViewer as exc:
            raise user_error(exc.message, exc.path.replace("viewer", path, 1)) from exc
        traits: Mapping[str, Any] | None = None
        consent = True
        if normalised.user_id:
            profile = await self.profiles.get(normalised.user_id)
            if profile is not None:
                traits, consent = profile.traits, profile.consent
        history = await self.history.history(
            user_id=normalised.user_id, anonymous_id=normalised.anonymous_id, now=normalised.at
        )
        evaluation = Evaluation(self.snapshot, normalised, traits=traits, history=history, consent=consent)
        self._evaluations[identity] = evaluation
        return evaluation


    async def expose(self, evaluation: Evaluation, delivered: Iterable[Resolved]) -> None:
        """Record the experiment arms handed to this viewer (one exposure per viewer per experiment)."""
        if self.exposures is not None and not self.principal.preview:
            await self.exposures.record(evaluation.viewer, delivered)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value

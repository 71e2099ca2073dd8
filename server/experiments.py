"""Experiments on the server: exposures recorded as the delivery path hands out arms, and results
computed from exposures and goal events.

An exposure is an event of type ``$exposure:<experiment>`` whose id is
``exposure:<experiment>:<unit>``: the event pipeline's deduplication by id keeps one exposure per
viewer per experiment (the first), and makes it as durable as any tracked event."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from content.decide import EXPERIMENT, Resolved
from content.experiments import ArmCounts, analyse, goal_matcher, goals
from content.snapshot import Snapshot
from content.viewer import Viewer
from schema.ports import ExperimentReport, SnapshotSource
from server.events import EventStore, Tracked
from server.settings import Clock
from server.store import EventRepository

log = logging.getLogger(__name__)

EXPOSURE_PREFIX = "$exposure:"
_BATCH = 1000


def exposure_type(experiment: str) -> str:
    return EXPOSURE_PREFIX + experiment


class ExposureRecorder:
    """Records the first exposure of each viewer to each experiment. Repeats are dropped in-process
    first (an LRU of recent (experiment, unit) pairs), then by the event store's id deduplication."""

    def __init__(self, store: EventStore, clock: Clock, *, remember: int = 200_000) -> None:
        self._store = store
        self._clock = clock
        self._remember = remember
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()

    async def record(self, viewer: Viewer, delivered: Iterable[Resolved]) -> None:
        """Record exposures for the experiment arms among ``delivered``. Never fails the request."""
        exposures = []
        now = self._clock()
        for resolved in delivered:
            decision = resolved.decision
            if decision.reason != EXPERIMENT or decision.experiment is None:
                continue
            variant = next((v for v in resolved.block.variants if v.key == decision.rule), None)
            unit = viewer.unit(variant.stickiness if variant else None)
            if unit is None or (decision.experiment, unit) in self._recent:
                continue
            exposures.append(
                Tracked(
                    id=f"exposure:{decision.experiment}:{unit}",
                    type=exposure_type(decision.experiment),
                    at=now,
                    user_id=viewer.user_id,
                    anonymous_id=viewer.anonymous_id,
                    properties={"experiment": decision.experiment, "arm": decision.variant, "unit": unit},
                )
            )
        if not exposures:
            return
        try:
            await self._store.append(exposures)
        except Exception:  # fail open to content: the viewer gets the block; the exposure is retried
            log.warning("could not record %d exposures", len(exposures), exc_info=True)
            return
        for exposure in exposures:
            self._recent[(exposure.properties["experiment"], exposure.properties["unit"])] = None
        while len(self._recent) > self._remember:
            self._recent.popitem(last=False)


def arms_of(snapshot: Snapshot, experiment: str) -> list[tuple[str, int]]:
    """The (arm, weight) list of the first published variant holding ``experiment``."""
    for locales in snapshot.published.by_key.values():
        for block in locales.values():
            for variant in block.variants:
                if variant.experiment == experiment:
                    return [(arm.key, arm.weight) for arm in variant.arms]
    return []


class ExperimentResults:
    """Per arm: exposed viewers, converted viewers (a goal event after their first exposure), and
    the statistics of content.experiments."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], snapshots: SnapshotSource) -> None:
        self._sessions = sessions
        self._snapshots = snapshots

    async def report(self, key: str) -> ExperimentReport | None:
        snapshot = self._snapshots.current
        arms = arms_of(snapshot, key)
        experiment = snapshot.experiments.get(key)
        if not arms and experiment is None:
            return None
        goal = experiment.goal if experiment is not None else ()
        async with self._sessions() as session:
            repository = EventRepository(session)
            exposures = await repository.of_types([exposure_type(key)])
            first: dict[str, tuple[str, datetime, str | None, str | None]] = {}
            for row in exposures:  # oldest first: the first exposure of each unit wins
                props = row["properties"]
                first.setdefault(props.get("unit") or row["id"], (props.get("arm"), row["at"], row.get("userId"),
                                                                  row.get("anonymousId")))
            conversions = await self._conversions(repository, goal, first)
        known = [a for a, _ in arms]
        exposed = {arm: 0 for arm in known}
        converted = {arm: 0 for arm in known}
        for unit, (arm, _, _, _) in first.items():
            if arm not in exposed:  # an arm that is no longer configured still counts
                exposed[arm], converted[arm] = 0, 0
            exposed[arm] += 1
            converted[arm] += unit in conversions
        weights = dict(arms)
        counts = [ArmCounts(arm, weights.get(arm, 0), exposed[arm], converted[arm]) for arm in exposed]
        return ExperimentReport(key=key, goal=goals(list(goal)) if goal else (), analysis=analyse(counts))

    async def _conversions(
        self,
        repository: EventRepository,
        goal: Sequence[Mapping[str, Any]],
        first: Mapping[str, tuple[str, datetime, str | None, str | None]],
    ) -> set[str]:
        if not goal or not first:
            return set()
        reaches = goal_matcher(list(goal))
        types = sorted({g["event"] for g in goal})
        by_user = {user: unit for unit, (_, _, user, _) in first.items() if user}
        by_anonymous = {anon: unit for unit, (_, _, user, anon) in first.items() if anon and not user}
        converted: set[str] = set()
        users, anonymous = list(by_user), list(by_anonymous)
        for start in range(0, max(len(users), len(anonymous)), _BATCH):
            rows = await repository.of_types(
                types, user_ids=users[start : start + _BATCH], anonymous_ids=anonymous[start : start + _BATCH]
            )
            for row in rows:
                unit = by_user.get(row.get("userId") or "") or by_anonymous.get(row.get("anonymousId") or "")
                if unit is None or unit in converted:
                    continue
                if row["at"] > first[unit][1] and reaches(row["type"], row["properties"]):
                    converted.add(unit)
        return converted

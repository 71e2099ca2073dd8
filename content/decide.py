"""Choosing what a viewer sees (spec/rules.md, "Choosing what a viewer sees"): segment membership,
flag values, block eligibility, variants and experiment arms, placements, and the decision trace
that explains each choice. Reads a :class:`~content.snapshot.Snapshot`; touches no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from content.behaviour import EMPTY_HISTORY, History
from content.bucketing import bucket, rollout_threshold
from content.rules import Facts, earliest
from content.snapshot import DEFAULT_PLACEMENT_LIMIT, Block, BlockView, Segment, Snapshot
from content.viewer import Viewer

# Decision reasons (Decision.reason)
RULE_MATCH = "RULE_MATCH"
EXPERIMENT = "EXPERIMENT"
DEFAULT = "DEFAULT"

# Flag evaluation reasons, in OpenFeature's vocabulary
STATIC = "STATIC"
TARGETING_MATCH = "TARGETING_MATCH"
SPLIT = "SPLIT"
DISABLED = "DISABLED"
ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class Decision:
    """Why a block shows what it shows. ``rule`` is the key of the variant entry that was taken."""

    variant: str
    reason: str
    rule: str | None
    flag: str | None
    experiment: str | None
    trace: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A block as one viewer sees it: the chosen version, its merged fields and the decision."""

    block: Block
    fields: Mapping[str, Any]
    decision: Decision


@dataclass(frozen=True, slots=True)
class FlagValue:
    key: str
    enabled: bool
    reason: str
    detail: str  # a human sentence for traces: "bucket 635 < 2550"

    @property
    def variant(self) -> str:
        return "on" if self.enabled else "off"


@dataclass(frozen=True, slots=True)
class Page:
    items: tuple[Resolved, ...]
    has_next: bool


class Evaluation:
    """One viewer against one snapshot. Memoises segment and flag answers for the request; make a
    new one per request (it is cheap)."""

    def __init__(
        self,
        snapshot: Snapshot,
        viewer: Viewer,
        *,
        traits: Mapping[str, Any] | None = None,
        history: History = EMPTY_HISTORY,
        consent: bool = True,
    ) -> None:
        if not consent:  # evaluated as an anonymous viewer: no unit, traits, events or segments
            viewer, traits, history = viewer.anonymised(), None, EMPTY_HISTORY
        self.snapshot = snapshot
        self.viewer = viewer
        self.consent = consent
        self.facts = Facts(
            viewer,
            traits=traits,
            history=history,
            retention=snapshot.retention,
            segment=self.segment,
            segment_boundary=self.segment_boundary,
        )
        self._segments: dict[str, bool] = {}
        self._boundaries: dict[str, datetime | None] = {}
        self._flags: dict[str, FlagValue] = {}

    # -- segments and flags --------------------------------------------------------------------

    def segment(self, key: str) -> bool:
        """Whether the viewer is a member of segment ``key`` now (an unknown segment: no)."""
        member = self._segments.get(key)
        if member is None:
            definition = self.snapshot.segments.get(key)
            member = self.consent and definition is not None and definition.rule(self.facts)
            self._segments[key] = member
        return member

    def segment_boundary(self, key: str) -> datetime | None:
        """The earliest instant after the viewer's ``at`` at which membership of segment ``key`` can
        change if no new event arrives (it may be early, never late); None when time alone cannot
        change it, for an unknown segment, and without consent."""
        if key in self._boundaries:
            return self._boundaries[key]
        definition = self.snapshot.segments.get(key)
        at = definition.boundary(self.facts) if self.consent and definition is not None else None
        self._boundaries[key] = at
        return at

    def next_change(self, keys: Iterable[str] | None = None) -> datetime | None:
        """When to evaluate this viewer again: the earliest :meth:`segment_boundary` of ``keys``
        (by default every segment that time alone can change), or None."""
        if not self.consent:
            return None
        return earliest(self.segment_boundary(k) for k in (self.snapshot.timed_segments if keys is None else keys))

    def segments(self) -> list[Segment]:
        """The viewer's segments, by priority (descending) and then key."""
        return [self.snapshot.segments[k] for k in self.snapshot.segment_order if self.segment(k)]

    def flag(self, key: str) -> FlagValue:
        value = self._flags.get(key)
        if value is None:
            value = self._evaluate_flag(key)
            self._flags[key] = value
        return value

    def flags(self) -> list[FlagValue]:
        return [self.flag(k) for k in self.snapshot.flag_order]

    def _evaluate_flag(self, key: str) -> FlagValue:
        flag = self.snapshot.flags.get(key)
        if flag is None:
            return FlagValue(key, False, ERROR, "unknown flag")
        if not flag.enabled:
            return FlagValue(key, False, DISABLED, "disabled")
        if flag.audience is not None and not flag.audience(self.facts):
            return FlagValue(key, False, DEFAULT, "audience does not match")
        rollout = flag.rollout_at(self.viewer.at)
        threshold = rollout_threshold(rollout)
        if threshold >= 10_000:
            if flag.audience is not None:
                return FlagValue(key, True, TARGETING_MATCH, "audience matches, rollout 100%")
            return FlagValue(key, True, STATIC, "on for everyone")
        unit = self.viewer.unit(flag.stickiness)
        if unit is None:
            return FlagValue(key, False, SPLIT, f"no unit for a {rollout:g}% rollout")
        b = bucket(flag.salt, unit)
        if b < threshold:
            return FlagValue(key, True, SPLIT, f"bucket {b} < {threshold} ({rollout:g}% rollout)")
        return FlagValue(key, False, SPLIT, f"bucket {b} >= {threshold} ({rollout:g}% rollout)")

    # -- blocks -----------------------------------------------------------------------------------

    def block(self, key: str, *, preview: bool = False) -> Resolved | None:
        """The block as this viewer sees it, or None when it is not eligible for them."""
        block = self._version(self.snapshot.view(preview), key)
        if block is None or not self._eligible(block):
            return None
        return self._decide(block)

    def placement(self, key: str, *, limit: int | None = None, preview: bool = False) -> list[Resolved] | None:
        """The eligible blocks of a placement, by priority then key; None for an unknown placement."""
        placement = self.snapshot.placements.get(key)
        if placement is None:
            return None
        count = limit if limit is not None else (placement.limit or DEFAULT_PLACEMENT_LIMIT)
        view = self.snapshot.view(preview)
        candidates: list[tuple[int, str, Block]] = []
        for block_key in view.by_placement.get(key, ()):
            block = self._version(view, block_key)
            if block is not None and key in block.placements:
                candidates.append((-block.placements[key], block_key, block))
        candidates.sort(key=lambda c: (c[0], c[1]))
        chosen: list[Resolved] = []
        for _, _, block in candidates:
            if len(chosen) >= count:
                break
            if self._eligible(block):
                chosen.append(self._decide(block))
        return chosen

    def blocks(
        self,
        *,
        tags: Sequence[str] | None = None,
        match_all: bool = False,
        type_: str | None = None,
        first: int = 20,
        after: str | None = None,
        preview: bool = False,
    ) -> Page:
        """Eligible blocks with any (or all) of ``tags`` and of ``type_``, by key, after a key."""
        view = self.snapshot.view(preview)
        keys: Sequence[str] = view.keys
        if tags:
            sets = [view.by_tag.get(tag, frozenset()) for tag in tags]
            chosen = frozenset.intersection(*sets) if match_all else frozenset().union(*sets)
            keys = sorted(chosen)
        if type_ is not None:
            of_type = view.by_type.get(type_, frozenset())
            keys = [k for k in keys if k in of_type]
        wanted = set(tags or ())
        items: list[Resolved] = []
        for key in keys:
            if after is not None and key <= after:
                continue
            block = self._version(view, key)
            if block is None or (type_ is not None and block.type != type_):
                continue
            if wanted:
                have = wanted.intersection(block.tags)
                if (match_all and have != wanted) or not have:
                    continue
            if not self._eligible(block):
                continue
            if len(items) == first:
                return Page(tuple(items), has_next=True)
            items.append(self._decide(block))
        return Page(tuple(items), has_next=False)

    def _version(self, view: BlockView, key: str) -> Block | None:
        locales = view.by_key.get(key)
        if not locales:
            return None
        for locale in self.snapshot.locale_chain(self.viewer.locale):
            block = locales.get(locale)
            if block is not None:
                return block
        return None

    def _eligible(self, block: Block) -> bool:
        now = self.viewer.at
        if block.schedule_from is not None and now < block.schedule_from:
            return False
        if block.schedule_until is not None and now >= block.schedule_until:
            return False
        if block.flag is not None and not self.flag(block.flag).enabled:
            return False
        return block.audience is None or block.audience(self.facts)

    def _decide(self, block: Block) -> Resolved:
        trace = [self._block_line(block)]
        for variant in block.variants:
            if variant.flag is not None:
                flag = self.flag(variant.flag)
                if not flag.enabled:
                    trace.append(
                        f"variant {variant.key}: skipped, flag {variant.flag} is off ({flag.reason}: {flag.detail})"
                    )
                    continue
            if variant.when is not None and not variant.when(self.facts):
                trace.append(f"variant {variant.key}: skipped, its rule is false")
                continue
            why = "its rule is true" if variant.when is not None else "it has no condition"
            if variant.flag is not None:
                why += f" and flag {variant.flag} is on"
            if not variant.arms:
                trace.append(f"variant {variant.key}: taken, {why}")
                decision = Decision(variant.key, RULE_MATCH, variant.key, variant.flag, None, tuple(trace))
                return Resolved(block, variant.fields, decision)
            unit = self.viewer.unit(variant.stickiness)
            if unit is None:
                trace.append(
                    f"variant {variant.key}: skipped, the viewer has no unit for experiment {variant.experiment}"
                )
                continue
            b = bucket(variant.experiment or "", unit)
            index = next(i for i, threshold in enumerate(variant.thresholds) if b < threshold)
            arm = variant.arms[index]
            trace.append(
                f"variant {variant.key}: taken, {why}; experiment {variant.experiment}: "
                f"bucket {b} < {variant.thresholds[index]} -> arm {arm.key}"
            )
            decision = Decision(arm.key, EXPERIMENT, variant.key, variant.flag, variant.experiment, tuple(trace))
            return Resolved(block, arm.fields, decision)
        trace.append("no variant taken: default fields")
        return Resolved(block, block.fields, Decision("default", DEFAULT, None, None, None, tuple(trace)))

    def _block_line(self, block: Block) -> str:
        version = f"v{block.version}" if block.version else "draft"
        line = f"block {block.key} ({block.locale}, {version})"
        if self.viewer.locale and block.locale != self.viewer.locale:
            line += f", falling back from {self.viewer.locale}"
        return line

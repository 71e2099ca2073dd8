"""The published snapshot: an immutable, precompiled and indexed view of one content version.

Everything that can be done before a request is done here, once per version: rules are compiled,
variant fields are merged, and blocks are indexed by key, locale, placement, tag and type. The
request path (content.decide) only reads it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from content.bucketing import arm_thresholds
from content.bundle import DEFAULT_LOCALES, block_locale
from content.rules import (
    Boundary,
    Rule,
    ScoreDef,
    compile_boundary,
    compile_rule,
    event_types,
    parse_duration,
    parse_instant,
    segment_references,
)

DEFAULT_RETENTION = timedelta(days=90)
DEFAULT_PLACEMENT_LIMIT = 10


@dataclass(frozen=True, slots=True)
class BlockSource:
    """A block as stored: its draft document and, when published, its live version."""

    key: str
    locale: str
    draft: Mapping[str, Any]
    published: Mapping[str, Any] | None = None
    published_version: int | None = None
    published_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Arm:
    key: str
    weight: int
    fields: Mapping[str, Any]  # merged over the block's default fields


@dataclass(frozen=True, slots=True)
class Variant:
    key: str
    flag: str | None
    when: Rule | None
    fields: Mapping[str, Any]  # merged over the block's default fields
    experiment: str | None = None
    arms: tuple[Arm, ...] = ()
    thresholds: tuple[int, ...] = ()
    stickiness: str | None = None


@dataclass(frozen=True, slots=True)
class Block:
    key: str
    locale: str
    type: str
    tags: tuple[str, ...]
    version: int  # 0 for a draft that was never published as it is
    published_at: datetime | None
    fields: Mapping[str, Any]
    placements: Mapping[str, int]  # placement key -> priority
    schedule_from: datetime | None
    schedule_until: datetime | None
    audience: Rule | None
    flag: str | None
    variants: tuple[Variant, ...]
    document: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Segment:
    key: str
    name: str
    priority: int
    rule: Rule
    event_types: frozenset[str]  # event types whose arrival can change membership (directly)
    references: frozenset[str]  # segments it refers to
    boundary: Boundary  # when membership can next change with time alone


@dataclass(frozen=True, slots=True)
class Flag:
    key: str
    name: str
    enabled: bool
    rollout: float
    salt: str
    audience: Rule | None
    stickiness: str | None
    steps: tuple[tuple[datetime, float], ...] = ()  # a scheduled ramp: (from, rollout), in time order

    def rollout_at(self, now: datetime) -> float:
        """The rollout in force at ``now``: the last step whose instant has come, else ``rollout``."""
        rollout = self.rollout
        for at, step in self.steps:
            if at > now:
                break
            rollout = step
        return rollout


@dataclass(frozen=True, slots=True)
class Placement:
    key: str
    name: str
    limit: int | None


@dataclass(frozen=True, slots=True)
class Experiment:
    key: str
    name: str
    goal: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True, slots=True)
class BlockView:
    """Blocks as one kind of key sees them: published versions only, or drafts too (preview)."""

    by_key: Mapping[str, Mapping[str, Block]]  # key -> locale -> block
    keys: tuple[str, ...]  # sorted
    by_placement: Mapping[str, tuple[str, ...]]  # placement key -> block keys (any locale), sorted
    by_tag: Mapping[str, frozenset[str]]
    by_type: Mapping[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One content version, compiled. Immutable: a new version builds a new snapshot."""

    version: int
    default_locale: str
    fallbacks: Mapping[str, str]
    segments: Mapping[str, Segment]
    segment_order: tuple[str, ...]  # priority descending, then key
    scores: Mapping[str, ScoreDef]
    flags: Mapping[str, Flag]
    flag_order: tuple[str, ...]
    experiments: Mapping[str, Experiment]
    placements: Mapping[str, Placement]
    published: BlockView
    preview: BlockView
    retention: timedelta = DEFAULT_RETENTION
    # event type -> the segments whose membership its arrival can change, directly or through
    # references, in segment_order
    segments_by_event_type: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    timed_segments: tuple[str, ...] = ()  # membership can change with time alone; in segment_order
    _chains: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    def locale_chain(self, locale: str | None) -> tuple[str, ...]:
        """The viewer's locale, then its fallbacks in order, then the default locale."""
        key = locale or ""
        chain = self._chains.get(key)
        if chain is None:
            items: list[str] = []
            current: str | None = locale
            while current and current not in items:
                items.append(current)
                current = self.fallbacks.get(current)
            if self.default_locale not in items:
                items.append(self.default_locale)
            chain = tuple(items)
            self._chains[key] = chain  # a memo of a pure function: the snapshot stays immutable
        return chain

    def view(self, preview: bool) -> BlockView:
        return self.preview if preview else self.published

    @classmethod
    def build(
        cls,
        *,
        version: int,
        locales: Mapping[str, Any] | None,
        placements: Sequence[Mapping[str, Any]],
        segments: Sequence[Mapping[str, Any]],
        scores: Sequence[Mapping[str, Any]],
        flags: Sequence[Mapping[str, Any]],
        experiments: Sequence[Mapping[str, Any]],
        blocks: Sequence[BlockSource],
        retention: timedelta = DEFAULT_RETENTION,
    ) -> Snapshot:
        """Compile a validated configuration. Documents must have passed ``check_config``."""
        locales = locales or DEFAULT_LOCALES
        default_locale: str = locales.get("default") or DEFAULT_LOCALES["default"]
        score_defs = {
            s["key"]: ScoreDef(
                key=s["key"],
                weights={t: float(w) for t, w in s["events"].items()},
                half_life=_duration(s["half_life"]),
            )
            for s in scores
        }
        compiled_segments = {
            s["key"]: Segment(
                key=s["key"],
                name=s.get("name") or s["key"],
                priority=int(s.get("priority") or 0),
                rule=compile_rule(s["rule"], score_defs),
                event_types=frozenset(event_types(s["rule"], score_defs)),
                references=frozenset(segment_references(s["rule"])),
                boundary=compile_boundary(s["rule"], score_defs),
            )
            for s in segments
        }
        order = tuple(sorted(compiled_segments, key=lambda k: (-compiled_segments[k].priority, k)))
        referrers = _referrers(compiled_segments)
        by_event_type: dict[str, set[str]] = {}
        for segment in compiled_segments.values():
            for type_ in segment.event_types:
                by_event_type.setdefault(type_, set()).add(segment.key)
        # Only conditions that read events can change with time alone (windows slide, scores decay);
        # a segment reading no event may still refer to one that does.
        timed = _closure({k for k, s in compiled_segments.items() if s.event_types}, referrers)
        compiled_flags = {
            f["key"]: Flag(
                key=f["key"],
                name=f.get("name") or f["key"],
                enabled=bool(f.get("enabled")),
                rollout=float(100 if f.get("rollout") is None else f["rollout"]),
                salt=f.get("salt") or f["key"],
                audience=compile_rule(f["audience"], score_defs) if f.get("audience") is not None else None,
                stickiness=f.get("stickiness"),
                steps=tuple(
                    (instant, float(step["rollout"]))
                    for step in f.get("steps") or ()
                    if (instant := parse_instant(step["at"])) is not None
                ),
            )
            for f in flags
        }
        compiled_experiments = {
            e["key"]: Experiment(
                key=e["key"],
                name=e.get("name") or e["key"],
                goal=tuple(_goals(e.get("goal"))),
            )
            for e in experiments
        }
        compiled_placements = {
            p["key"]: Placement(key=p["key"], name=p.get("name") or p["key"], limit=p.get("limit")) for p in placements
        }
        published: list[Block] = []
        preview: list[Block] = []
        for source in blocks:
            if source.published is not None:
                live = _compile_block(
                    source.published, default_locale, source.published_version or 0, source.published_at, score_defs
                )
                published.append(live)
            if source.published is not None and source.published == source.draft:
                preview.append(live)
            else:
                preview.append(_compile_block(source.draft, default_locale, 0, None, score_defs))
        return cls(
            version=version,
            default_locale=default_locale,
            fallbacks=dict(locales.get("fallbacks") or {}),
            segments=compiled_segments,
            segment_order=order,
            scores=score_defs,
            flags=compiled_flags,
            flag_order=tuple(sorted(compiled_flags)),
            experiments=compiled_experiments,
            placements=compiled_placements,
            published=_index(published),
            preview=_index(preview),
            retention=retention,
            segments_by_event_type={
                type_: _in_order(order, _closure(direct, referrers)) for type_, direct in sorted(by_event_type.items())
            },
            timed_segments=_in_order(order, timed),
        )


def _referrers(segments: Mapping[str, Segment]) -> dict[str, set[str]]:
    """segment key -> the segments that refer to it directly."""
    referrers: dict[str, set[str]] = {}
    for segment in segments.values():
        for key in segment.references:
            referrers.setdefault(key, set()).add(segment.key)
    return referrers


def _in_order(order: Sequence[str], keys: set[str]) -> tuple[str, ...]:
    return tuple(k for k in order if k in keys)


def _closure(keys: set[str], referrers: Mapping[str, set[str]]) -> set[str]:
    """``keys`` and every segment referring to one of them, however indirectly."""
    found = set(keys)
    pending = list(keys)
    while pending:
        for referrer in referrers.get(pending.pop(), ()):
            if referrer not in found:
                found.add(referrer)
                pending.append(referrer)
    return found


def _duration(text: str) -> timedelta:
    duration = parse_duration(text)
    assert duration is not None, text
    return duration


def _goals(goal: Any) -> list[Mapping[str, Any]]:
    if goal is None:
        return []
    return list(goal) if isinstance(goal, list) else [goal]


def _merge(base: Mapping[str, Any], over: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return {**base, **over} if over else base


def _compile_block(
    doc: Mapping[str, Any],
    default_locale: str,
    version: int,
    published_at: datetime | None,
    scores: Mapping[str, ScoreDef],
) -> Block:
    fields: Mapping[str, Any] = doc.get("fields") or {}
    variants = []
    for v in doc.get("variants") or ():
        arms = tuple(Arm(a["key"], int(a["weight"]), _merge(fields, a.get("fields"))) for a in v.get("arms") or ())
        variants.append(
            Variant(
                key=v["key"],
                flag=v.get("flag"),
                when=compile_rule(v["when"], scores) if v.get("when") is not None else None,
                fields=_merge(fields, v.get("fields")),
                experiment=v.get("experiment") if arms else None,
                arms=arms,
                thresholds=tuple(arm_thresholds([a.weight for a in arms])) if arms else (),
                stickiness=v.get("stickiness"),
            )
        )
    schedule = doc.get("schedule") or {}
    return Block(
        key=doc["key"],
        locale=block_locale(doc, default_locale),
        type=doc["type"],
        tags=tuple(doc.get("tags") or ()),
        version=version,
        published_at=published_at,
        fields=fields,
        placements={p["key"]: int(p.get("priority", 0)) for p in doc.get("placements") or ()},
        schedule_from=parse_instant(schedule.get("from")) if schedule.get("from") else None,
        schedule_until=parse_instant(schedule.get("until")) if schedule.get("until") else None,
        audience=compile_rule(doc["audience"], scores) if doc.get("audience") is not None else None,
        flag=doc.get("flag"),
        variants=tuple(variants),
        document=doc,
    )


def _index(blocks: Sequence[Block]) -> BlockView:
    by_key: dict[str, dict[str, Block]] = {}
    by_placement: dict[str, set[str]] = {}
    by_tag: dict[str, set[str]] = {}
    by_type: dict[str, set[str]] = {}
    for block in blocks:
        by_key.setdefault(block.key, {})[block.locale] = block
        for placement in block.placements:
            by_placement.setdefault(placement, set()).add(block.key)
        for tag in block.tags:
            by_tag.setdefault(tag, set()).add(block.key)
        by_type.setdefault(block.type, set()).add(block.key)
    return BlockView(
        by_key=by_key,
        keys=tuple(sorted(by_key)),
        by_placement={k: tuple(sorted(v)) for k, v in by_placement.items()},
        by_tag={k: frozenset(v) for k, v in by_tag.items()},
        by_type={k: frozenset(v) for k, v in by_type.items()},
    )


EMPTY = Snapshot.build(
    version=0, locales=None, placements=(), segments=(), scores=(), flags=(), experiments=(), blocks=()
)

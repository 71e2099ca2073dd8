"""Small factories of literal test data for the content engine's tests (no fixtures, no clock)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import mmh3

from content.behaviour import EMPTY_HISTORY, Event, EventLog, History
from content.bundle import CONFIG_KINDS, ConfigDocs, Entity, check_config
from content.decide import Evaluation
from content.errors import Problem
from content.rules import Facts, Known, Scope, ScoreDef, compile_rule, parse_duration, validate_rule
from content.snapshot import DEFAULT_RETENTION, BlockSource, Snapshot
from content.viewer import Viewer, make_viewer

NOW = datetime(2026, 11, 20, 12, 0, 0, tzinfo=UTC)  # a Friday


def t(text: str) -> datetime:
    """An aware instant from ISO 8601 text (``Z`` or an offset)."""
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo is not None, "write instants with an offset in tests"
    return parsed


def independent_bucket(salt: str, unit: str) -> int:
    """rules.md's formula written out again, so that tests do not trust content.bucketing."""
    return mmh3.hash((salt + "/" + unit).encode("utf-8"), 0, signed=False) % 10_000


def viewer(at: datetime = NOW, **kwargs: Any) -> Viewer:
    return make_viewer(at=at, **kwargs)


def event(type_: str, at: datetime, id_: str | None = None, **properties: Any) -> Event:
    return Event(id=id_ or f"{type_}@{at.isoformat()}", type=type_, at=at, properties=properties)


def history(*events: Event) -> EventLog:
    return EventLog(events)


# -- rules -----------------------------------------------------------------------------------------

KNOWN_SEGMENTS = frozenset({"gold", "vip", "new"})


def holds(
    rule: Mapping[str, Any],
    *,
    traits: Mapping[str, Any] | None = None,
    at: datetime = NOW,
    who: Viewer | None = None,
    events: History = EMPTY_HISTORY,
    member_of: Iterable[str] = (),
    scores: Mapping[str, ScoreDef] | None = None,
    retention: timedelta = DEFAULT_RETENTION,
) -> bool:
    """Validate ``rule`` as a targeting rule (it must be valid), compile it and evaluate it."""
    scores = scores or {}
    known = Known(segments=KNOWN_SEGMENTS, scores=frozenset(scores))
    problems = validate_rule(rule, "rule", scope=Scope.TARGETING, known=known)
    assert problems == [], problems
    compiled = compile_rule(rule, scores)
    members = frozenset(member_of)
    facts = Facts(
        who or viewer(at),
        traits=traits,
        history=events,
        retention=retention,
        segment=lambda key: key in members,
    )
    return compiled(facts)


def score(key: str, weights: Mapping[str, float], half_life: str) -> ScoreDef:
    duration = parse_duration(half_life)
    assert duration is not None
    return ScoreDef(key=key, weights=dict(weights), half_life=duration)


# -- configuration ---------------------------------------------------------------------------------


def config(locales: Mapping[str, Any] | None = None, **kinds: Sequence[Any]) -> ConfigDocs:
    """A ConfigDocs whose documents are reported at ``kind[index]``, as a bundle's are."""
    unknown = set(kinds) - set(CONFIG_KINDS)
    assert not unknown, unknown
    docs = ConfigDocs(**{k: [Entity(f"{k}[{i}]", d) for i, d in enumerate(v)] for k, v in kinds.items()})
    if locales is not None:
        docs.locales = Entity("locales", locales)
    return docs


def problems_of(locales: Mapping[str, Any] | None = None, **kinds: Sequence[Any]) -> list[Problem]:
    return check_config(config(locales, **kinds))


def paths_of(locales: Mapping[str, Any] | None = None, **kinds: Sequence[Any]) -> list[str]:
    return [p.path for p in problems_of(locales, **kinds)]


def block(key: str, **doc: Any) -> dict[str, Any]:
    """A published block document: type ``hero``, default fields ``{"title": key}``."""
    return {"key": key, "type": "hero", "status": "published", "fields": {"title": key}, **doc}


def published(
    doc: Mapping[str, Any], *, version: int = 1, draft: Mapping[str, Any] | None = None
) -> BlockSource:
    """A block whose live version is ``doc`` (and whose draft is ``draft``, the same when omitted)."""
    locale = doc.get("locale") or "en-US"
    return BlockSource(doc["key"], locale, draft or doc, doc, version, t("2026-01-02T00:00:00+00:00"))


def draft_only(doc: Mapping[str, Any]) -> BlockSource:
    """A block that was never published."""
    return BlockSource(doc["key"], doc.get("locale") or "en-US", {**doc, "status": "draft"}, None, None, None)


def snapshot(
    *,
    blocks: Sequence[BlockSource | Mapping[str, Any]] = (),
    locales: Mapping[str, Any] | None = None,
    placements: Sequence[Mapping[str, Any]] = (),
    segments: Sequence[Mapping[str, Any]] = (),
    scores: Sequence[Mapping[str, Any]] = (),
    flags: Sequence[Mapping[str, Any]] = (),
    experiments: Sequence[Mapping[str, Any]] = (),
    retention: timedelta = DEFAULT_RETENTION,
) -> Snapshot:
    """A snapshot of a configuration that must be valid; plain block documents are published."""
    sources = [b if isinstance(b, BlockSource) else published(b) for b in blocks]
    rest = {
        "placements": placements,
        "segments": segments,
        "scores": scores,
        "flags": flags,
        "experiments": experiments,
    }
    for docs in ([s.draft for s in sources], [s.published for s in sources if s.published is not None]):
        problems = problems_of(locales, blocks=docs, **rest)
        assert problems == [], problems
    return Snapshot.build(
        version=1,
        locales=locales,
        placements=placements,
        segments=segments,
        scores=scores,
        flags=flags,
        experiments=experiments,
        blocks=sources,
        retention=retention,
    )


def evaluation(
    snap: Snapshot,
    who: Viewer | None = None,
    *,
    traits: Mapping[str, Any] | None = None,
    events: Iterable[Event] = (),
    consent: bool = True,
) -> Evaluation:
    return Evaluation(snap, who or viewer(), traits=traits, history=EventLog(events), consent=consent)


def example_bundle() -> dict[str, Any]:
    """The example of spec/bundle.md, verbatim (a fresh copy each call)."""
    return copy.deepcopy(_EXAMPLE_BUNDLE)


_EXAMPLE_BUNDLE: dict[str, Any] = {
    "version": 1,
    "locales": {"default": "en-US", "fallbacks": {"de-AT": "de-DE", "de-DE": "en-US"}},
    "placements": [{"key": "home-hero", "name": "Home page hero", "limit": 1}],
    "segments": [
        {
            "key": "gold",
            "name": "Gold tier",
            "priority": 20,
            "rule": {"trait": "tier", "op": "eq", "value": "gold"},
        },
        {
            "key": "high-intent",
            "name": "High intent",
            "priority": 30,
            "rule": {"event": "product_viewed", "within": "10m", "count": {"gte": 3}},
        },
        {
            "key": "cart-abandoner",
            "name": "Abandoned cart",
            "rule": {"event": "add_to_cart", "not_followed_by": "checkout", "for": "15m", "within": "24h"},
        },
        {
            "key": "at-risk",
            "name": "At risk",
            "rule": {"all": [{"event": "purchase"}, {"not": {"event": "purchase", "within": "30d"}}]},
        },
    ],
    "scores": [
        {
            "key": "engagement",
            "events": {"page_view": 1, "product_viewed": 2, "add_to_cart": 5},
            "half_life": "7d",
        }
    ],
    "flags": [
        {
            "key": "new-hero-rules",
            "name": "New hero targeting",
            "enabled": True,
            "rollout": 25.5,
            "salt": "new-hero-rules",
            "audience": {"segment": "gold"},
        }
    ],
    "experiments": [{"key": "hero-spring", "name": "Spring hero test", "goal": {"event": "purchase"}}],
    "blocks": [
        {
            "key": "hero-main",
            "type": "hero",
            "locale": "en-US",
            "tags": ["home", "promo"],
            "status": "published",
            "placements": [{"key": "home-hero", "priority": 10}],
            "schedule": {"from": "2026-01-01T00:00:00Z", "until": None},
            "audience": None,
            "flag": None,
            "fields": {"title": "Welcome", "cta": {"label": "Shop now", "href": "/shop"}},
            "variants": [
                {
                    "key": "gold-mobile",
                    "flag": "new-hero-rules",
                    "when": {
                        "all": [{"segment": "gold"}, {"context": "device", "op": "eq", "value": "MOBILE"}]
                    },
                    "fields": {"title": "Your gold offer"},
                },
                {
                    "key": "spring-test",
                    "experiment": "hero-spring",
                    "arms": [
                        {"key": "control", "weight": 50, "fields": {}},
                        {"key": "bold", "weight": 50, "fields": {"title": "Spring is here"}},
                    ],
                },
                {
                    "key": "evening",
                    "when": {"context": "local_hour", "op": "between", "value": [18, 23]},
                    "fields": {"title": "Good evening"},
                },
            ],
        }
    ],
    "profiles": [
        {"userId": "u-1", "traits": {"tier": "gold", "name": "Ada"}, "consent": {"personalization": True}}
    ],
    "events": [
        {
            "id": "e-1",
            "type": "product_viewed",
            "userId": "u-1",
            "at": "2026-11-20T10:00:00Z",
            "properties": {"sku": "A1", "category": "shoes"},
        }
    ],
}


def example_snapshot() -> Snapshot:
    doc = example_bundle()
    return snapshot(
        locales=doc["locales"],
        placements=doc["placements"],
        segments=doc["segments"],
        scores=doc["scores"],
        flags=doc["flags"],
        experiments=doc["experiments"],
        blocks=doc["blocks"],
    )

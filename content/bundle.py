"""Validation of configuration documents (spec/bundle.md): placements, segments, scores, flags,
experiments, blocks and locales, checked together so that references and cycles are caught, with
every problem reported at its JSON path; and of the data records (profiles, events) a bundle or an
NDJSON file carries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from content.errors import Problem
from content.rules import (
    Known,
    Scope,
    describe,
    is_key,
    parse_duration,
    parse_instant,
    segment_references,
    validate_rule,
)

CONFIG_KINDS = ("placements", "segments", "scores", "flags", "experiments", "blocks")
BUNDLE_KEYS = ("version", "locales", *CONFIG_KINDS, "profiles", "events")
DEFAULT_LOCALE = "en-US"
DEFAULT_LOCALES: dict[str, Any] = {"default": DEFAULT_LOCALE, "fallbacks": {}}
STICKINESS = ("userId", "anonymousId")

_ALLOWED = {
    "placements": {"key", "name", "description", "limit"},
    "segments": {"key", "name", "description", "priority", "rule"},
    "scores": {"key", "name", "description", "events", "half_life"},
    "flags": {"key", "name", "description", "enabled", "rollout", "salt", "audience", "stickiness", "steps"},
    "experiments": {"key", "name", "description", "goal"},
    "blocks": {
        "key", "type", "locale", "tags", "status", "placements", "schedule",
        "audience", "flag", "fields", "variants",
    },
}  # fmt: skip
_VARIANT_KEYS = {"key", "flag", "when", "fields", "experiment", "arms", "stickiness"}
_ARM_KEYS = {"key", "weight", "fields"}


@dataclass(frozen=True, slots=True)
class Entity:
    """One configuration document and the path its problems are reported under."""

    path: str
    doc: Any


@dataclass(slots=True)
class ConfigDocs:
    """A whole space's configuration, as documents, to be validated together."""

    locales: Entity = field(default_factory=lambda: Entity("locales", DEFAULT_LOCALES))
    placements: list[Entity] = field(default_factory=list)
    segments: list[Entity] = field(default_factory=list)
    scores: list[Entity] = field(default_factory=list)
    flags: list[Entity] = field(default_factory=list)
    experiments: list[Entity] = field(default_factory=list)
    blocks: list[Entity] = field(default_factory=list)

    def of(self, kind: str) -> list[Entity]:
        entities: list[Entity] = getattr(self, kind)
        return entities


def entity_id(kind: str, doc: Any) -> tuple[str, ...] | None:
    """What makes a document unique within its kind: its key (and, for blocks, its locale)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("key"), str):
        return None
    if kind == "blocks":
        return (doc["key"], block_locale(doc, None))
    return (doc["key"],)


def block_locale(doc: Mapping[str, Any], default: str | None) -> str:
    locale = doc.get("locale")
    if isinstance(locale, str) and locale:
        return locale
    return default or DEFAULT_LOCALES["default"]


def check_bundle_shape(bundle: object) -> list[Problem]:
    """Top-level problems of a bundle document: not an object, unknown keys, a wrong version."""
    if not isinstance(bundle, Mapping):
        return [Problem("", f"a bundle must be a JSON object, not {describe(bundle)}")]
    problems = [Problem(k, f"unexpected key '{k}'") for k in bundle if k not in BUNDLE_KEYS]
    if "version" in bundle and bundle["version"] != 1:
        problems.append(Problem("version", f"unsupported bundle version {bundle['version']!r}; expected 1"))
    for kind in (*CONFIG_KINDS, "profiles", "events"):
        if kind in bundle and not isinstance(bundle[kind], list):
            problems.append(Problem(kind, f"must be a list, not {describe(bundle[kind])}"))
    return problems


def check_config(config: ConfigDocs) -> list[Problem]:
    """Every problem of a whole configuration: shapes, rules, duplicate keys, unknown references and
    cycles of segment references."""
    out: list[Problem] = []
    default_locale = _check_locales(config.locales, out)
    keys: dict[str, set[str]] = {}
    for kind in CONFIG_KINDS:
        seen: dict[tuple[str, ...], str] = {}
        keys[kind] = set()
        for entity in config.of(kind):
            doc = entity.doc
            if not isinstance(doc, Mapping):
                out.append(Problem(entity.path, f"must be a JSON object, not {describe(doc)}"))
                continue
            key = doc.get("key")
            if not is_key(key):
                out.append(Problem(f"{entity.path}.key", _bad_key(key)))
                continue
            ident = entity_id(kind, doc if kind != "blocks" else {**doc, "locale": block_locale(doc, default_locale)})
            assert ident is not None
            if ident in seen:
                what = f"'{key}'" if kind != "blocks" else f"'{key}' in locale '{ident[1]}'"
                out.append(Problem(f"{entity.path}.key", f"duplicate key {what} (also at {seen[ident]})"))
                continue
            seen[ident] = entity.path
            keys[kind].add(key)
    known = Known(segments=frozenset(keys["segments"]), scores=frozenset(keys["scores"]))
    for entity in config.placements:
        _check_entity(entity, "placements", out, lambda e, p: _check_placement(e, p, out))
    for entity in config.segments:
        _check_entity(entity, "segments", out, lambda e, p: _check_segment(e, p, known, out))
    for entity in config.scores:
        _check_entity(entity, "scores", out, lambda e, p: _check_score(e, p, out))
    for entity in config.flags:
        _check_entity(entity, "flags", out, lambda e, p: _check_flag(e, p, known, out))
    for entity in config.experiments:
        _check_entity(entity, "experiments", out, lambda e, p: _check_experiment(e, p, out))
    for entity in config.blocks:
        _check_entity(entity, "blocks", out, lambda e, p: _check_block(e, p, known, keys, out))
    _check_cycles(config.segments, out)
    return out


def _bad_key(key: object) -> str:
    if key is None:
        return "missing key"
    return f"{key!r} is not a valid key (lower-case letters, digits, '.', '_' and '-'; up to 128)"


def _check_entity(entity: Entity, kind: str, out: list[Problem], check: Any) -> None:
    doc = entity.doc
    if not isinstance(doc, Mapping) or not is_key(doc.get("key")):
        return  # already reported
    for k in doc:
        if k not in _ALLOWED[kind]:
            out.append(Problem(f"{entity.path}.{k}", f"unexpected key '{k}'"))
    for k in ("name", "description"):
        if k in doc and doc[k] is not None and not isinstance(doc[k], str):
            out.append(Problem(f"{entity.path}.{k}", f"must be a string, not {describe(doc[k])}"))
    check(doc, entity.path)


def _check_locales(entity: Entity, out: list[Problem]) -> str:
    doc, path = entity.doc, entity.path
    if not isinstance(doc, Mapping):
        out.append(Problem(path, f"must be an object with 'default' and 'fallbacks', not {describe(doc)}"))
        return DEFAULT_LOCALE
    for k in doc:
        if k not in ("default", "fallbacks"):
            out.append(Problem(f"{path}.{k}", f"unexpected key '{k}'"))
    default = doc.get("default", DEFAULT_LOCALE)
    if not isinstance(default, str) or not default:
        out.append(Problem(f"{path}.default", "must be a locale such as 'en-US'"))
        default = DEFAULT_LOCALE
    fallbacks = doc.get("fallbacks", {})
    if not isinstance(fallbacks, Mapping):
        out.append(Problem(f"{path}.fallbacks", "must be an object of locale: fallback locale"))
        return default
    for locale, target in fallbacks.items():
        if not isinstance(target, str) or not target:
            out.append(Problem(f"{path}.fallbacks.{locale}", "must be a locale"))
    for locale in fallbacks:
        chain, current = [locale], fallbacks.get(locale)
        while isinstance(current, str) and current in fallbacks:
            if current in chain:
                cycle = " -> ".join([*chain[chain.index(current) :], current])
                if chain[0] == current:  # report each cycle once, at its first member
                    out.append(Problem(f"{path}.fallbacks.{locale}", f"cycle of locale fallbacks: {cycle}"))
                break
            chain.append(current)
            current = fallbacks.get(current)
    return default


def _check_placement(doc: Mapping[str, Any], path: str, out: list[Problem]) -> None:
    limit = doc.get("limit")
    if limit is not None and not _is_int(limit, minimum=1):
        out.append(Problem(f"{path}.limit", f"must be a positive integer, not {limit!r}"))


def _check_segment(doc: Mapping[str, Any], path: str, known: Known, out: list[Problem]) -> None:
    priority = doc.get("priority")
    if priority is not None and not _is_int(priority):
        out.append(Problem(f"{path}.priority", f"must be an integer, not {priority!r}"))
    if "rule" not in doc:
        out.append(Problem(f"{path}.rule", "a segment needs a rule"))
    else:
        out.extend(validate_rule(doc["rule"], f"{path}.rule", scope=Scope.SEGMENT, known=known))


def _check_score(doc: Mapping[str, Any], path: str, out: list[Problem]) -> None:
    events = doc.get("events")
    if not isinstance(events, Mapping) or not events:
        out.append(Problem(f"{path}.events", 'must be a non-empty object of event type: weight ({"purchase": 5})'))
    else:
        for type_, weight in events.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                out.append(Problem(f"{path}.events.{type_}", f"weight must be a number, not {weight!r}"))
    if "half_life" not in doc:
        out.append(Problem(f"{path}.half_life", "a score needs a half_life ('7d')"))
    elif parse_duration(doc["half_life"]) is None:
        out.append(Problem(f"{path}.half_life", f"{doc['half_life']!r} is not a duration ('15m', '7d')"))


def _check_flag(doc: Mapping[str, Any], path: str, known: Known, out: list[Problem]) -> None:
    if doc.get("enabled") is not None and not isinstance(doc["enabled"], bool):
        out.append(Problem(f"{path}.enabled", f"must be true or false, not {doc['enabled']!r}"))
    if doc.get("rollout") is not None:
        message = rollout_problem(doc["rollout"])
        if message:
            out.append(Problem(f"{path}.rollout", message))
    if doc.get("steps") is not None:
        _check_steps(doc["steps"], f"{path}.steps", out)
    salt = doc.get("salt")
    if salt is not None and not isinstance(salt, str):
        out.append(Problem(f"{path}.salt", f"must be a string, not {describe(salt)}"))
    _check_stickiness(doc, path, out)
    if doc.get("audience") is not None:
        out.extend(validate_rule(doc["audience"], f"{path}.audience", scope=Scope.TARGETING, known=known))


def _check_steps(steps: object, path: str, out: list[Problem]) -> None:
    """A scheduled ramp: [{"at": ISO 8601, "rollout": P}, ...] in strictly increasing time order."""
    if not isinstance(steps, list):
        out.append(Problem(path, 'must be a list of {"at": date-time, "rollout": percentage}'))
        return
    previous = None
    for index, step in enumerate(steps):
        spath = f"{path}[{index}]"
        if not isinstance(step, Mapping):
            out.append(Problem(spath, 'a step must be an object {"at": date-time, "rollout": percentage}'))
            continue
        for k in step:
            if k not in ("at", "rollout"):
                out.append(Problem(f"{spath}.{k}", f"unexpected key '{k}'"))
        at = parse_instant(step.get("at"))
        if at is None:
            out.append(Problem(f"{spath}.at", f"must be an ISO 8601 date-time, not {step.get('at')!r}"))
        elif previous is not None and at <= previous:
            out.append(Problem(f"{spath}.at", "steps must be in increasing time order: this one is not after the last"))
        if at is not None:
            previous = at if previous is None else max(previous, at)
        if "rollout" not in step:
            out.append(Problem(f"{spath}.rollout", "a step needs a rollout"))
        elif (message := rollout_problem(step["rollout"])) is not None:
            out.append(Problem(f"{spath}.rollout", message))


def rollout_problem(value: object) -> str | None:
    """Why a rollout percentage is invalid (0-100, at most two decimals), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number from 0 to 100, not {value!r}"
    if not 0 <= value <= 100:
        return f"{value!r} is outside 0-100"
    exponent = Decimal(str(value)).normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2:
        return f"{value!r} has more than two decimals"
    return None


def _check_stickiness(doc: Mapping[str, Any], path: str, out: list[Problem]) -> None:
    if doc.get("stickiness") is not None and doc["stickiness"] not in STICKINESS:
        out.append(Problem(f"{path}.stickiness", f"must be 'userId' or 'anonymousId', not {doc['stickiness']!r}"))


def _check_experiment(doc: Mapping[str, Any], path: str, out: list[Problem]) -> None:
    goal = doc.get("goal")
    if goal is None:
        return
    goals = goal if isinstance(goal, list) else [goal]
    for index, item in enumerate(goals):
        gpath = f"{path}.goal[{index}]" if isinstance(goal, list) else f"{path}.goal"
        if not isinstance(item, Mapping) or "event" not in item or "not_followed_by" in item:
            out.append(Problem(gpath, 'a goal is an event condition such as {"event": "purchase"}'))
            continue
        out.extend(validate_rule(item, gpath, scope=Scope.SEGMENT, known=Known()))


def _check_block(
    doc: Mapping[str, Any], path: str, known: Known, keys: dict[str, set[str]], out: list[Problem]
) -> None:
    if not isinstance(doc.get("type"), str) or not doc.get("type"):
        out.append(Problem(f"{path}.type", "a block needs a type (a non-empty string such as 'hero')"))
    locale = doc.get("locale")
    if locale is not None and (not isinstance(locale, str) or not locale):
        out.append(Problem(f"{path}.locale", "must be a locale such as 'en-US'"))
    tags = doc.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags)):
        out.append(Problem(f"{path}.tags", "must be a list of non-empty strings"))
    if doc.get("status", "draft") not in ("draft", "published"):
        out.append(Problem(f"{path}.status", f"must be 'draft' or 'published', not {doc['status']!r}"))
    placements = doc.get("placements")
    if placements is not None:
        if not isinstance(placements, list):
            out.append(Problem(f"{path}.placements", "must be a list of {key, priority}"))
        else:
            for index, entry in enumerate(placements):
                _check_block_placement(entry, f"{path}.placements[{index}]", keys["placements"], out)
    _check_schedule(doc.get("schedule"), f"{path}.schedule", out)
    if doc.get("audience") is not None:
        out.extend(validate_rule(doc["audience"], f"{path}.audience", scope=Scope.TARGETING, known=known))
    _check_flag_ref(doc.get("flag"), f"{path}.flag", keys["flags"], out)
    if doc.get("fields") is not None and not isinstance(doc["fields"], Mapping):
        out.append(Problem(f"{path}.fields", f"must be a JSON object, not {describe(doc['fields'])}"))
    variants = doc.get("variants")
    if variants is None:
        return
    if not isinstance(variants, list):
        out.append(Problem(f"{path}.variants", "must be a list of variants"))
        return
    seen: dict[str, int] = {}
    for index, variant in enumerate(variants):
        vpath = f"{path}.variants[{index}]"
        _check_variant(variant, vpath, known, keys, out)
        key = variant.get("key") if isinstance(variant, Mapping) else None
        if isinstance(key, str):
            if key in seen:
                out.append(Problem(f"{vpath}.key", f"duplicate variant key '{key}' (also variants[{seen[key]}])"))
            seen.setdefault(key, index)


def _check_block_placement(entry: object, path: str, placements: set[str], out: list[Problem]) -> None:
    if not isinstance(entry, Mapping):
        out.append(Problem(path, "must be an object {key, priority}"))
        return
    for k in entry:
        if k not in ("key", "priority"):
            out.append(Problem(f"{path}.{k}", f"unexpected key '{k}'"))
    key = entry.get("key")
    if not isinstance(key, str) or key not in placements:  # a list or an object would not hash
        out.append(Problem(f"{path}.key", f"unknown placement {key!r}"))
    if "priority" in entry and not _is_int(entry["priority"]):
        out.append(Problem(f"{path}.priority", f"must be an integer, not {entry['priority']!r}"))


def _check_schedule(schedule: object, path: str, out: list[Problem]) -> None:
    if schedule is None:
        return
    if not isinstance(schedule, Mapping):
        out.append(Problem(path, 'must be an object {"from": ..., "until": ...} or null'))
        return
    bounds = {}
    for k, value in schedule.items():
        if k not in ("from", "until"):
            out.append(Problem(f"{path}.{k}", f"unexpected key '{k}'"))
        elif value is not None:
            instant = parse_instant(value)
            if instant is None:
                out.append(Problem(f"{path}.{k}", f"must be an ISO 8601 date-time or null, not {value!r}"))
            else:
                bounds[k] = instant
    if "from" in bounds and "until" in bounds and bounds["from"] >= bounds["until"]:
        out.append(Problem(f"{path}.until", "must be later than 'from'"))


def _check_flag_ref(flag: object, path: str, flags: set[str], out: list[Problem]) -> None:
    if flag is not None and (not isinstance(flag, str) or flag not in flags):
        out.append(Problem(path, f"unknown flag {flag!r}"))


def _check_variant(variant: object, path: str, known: Known, keys: dict[str, set[str]], out: list[Problem]) -> None:
    if not isinstance(variant, Mapping):
        out.append(Problem(path, f"a variant must be a JSON object, not {describe(variant)}"))
        return
    for k in variant:
        if k not in _VARIANT_KEYS:
            out.append(Problem(f"{path}.{k}", f"unexpected key '{k}'"))
    if not is_key(variant.get("key")):
        out.append(Problem(f"{path}.key", _bad_key(variant.get("key"))))
    _check_flag_ref(variant.get("flag"), f"{path}.flag", keys["flags"], out)
    if variant.get("when") is not None:
        out.extend(validate_rule(variant["when"], f"{path}.when", scope=Scope.TARGETING, known=known))
    _check_stickiness(variant, path, out)
    if "arms" not in variant:
        if "experiment" in variant:
            out.append(Problem(f"{path}.arms", "a variant holding an experiment needs arms"))
        if variant.get("fields") is not None and not isinstance(variant["fields"], Mapping):
            out.append(Problem(f"{path}.fields", f"must be a JSON object, not {describe(variant['fields'])}"))
        return
    if not is_key(variant.get("experiment")):
        out.append(Problem(f"{path}.experiment", "a variant with arms names its experiment (a key)"))
    if variant.get("fields") is not None:
        out.append(Problem(f"{path}.fields", "a variant with arms has no fields of its own: put them on its arms"))
    arms = variant["arms"]
    if not isinstance(arms, list) or not arms:
        out.append(Problem(f"{path}.arms", "must be a non-empty list of arms"))
        return
    seen: set[str] = set()
    for index, arm in enumerate(arms):
        apath = f"{path}.arms[{index}]"
        if not isinstance(arm, Mapping):
            out.append(Problem(apath, "an arm must be an object {key, weight, fields}"))
            continue
        for k in arm:
            if k not in _ARM_KEYS:
                out.append(Problem(f"{apath}.{k}", f"unexpected key '{k}'"))
        key = arm.get("key")
        if not is_key(key):
            out.append(Problem(f"{apath}.key", _bad_key(key)))
        elif key in seen:
            out.append(Problem(f"{apath}.key", f"duplicate arm key '{key}'"))
        else:
            seen.add(key)
        if not _is_int(arm.get("weight"), minimum=1):
            out.append(Problem(f"{apath}.weight", f"must be a positive integer, not {arm.get('weight')!r}"))
        if arm.get("fields") is not None and not isinstance(arm["fields"], Mapping):
            out.append(Problem(f"{apath}.fields", f"must be a JSON object, not {describe(arm['fields'])}"))


def _is_int(value: object, minimum: int | None = None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        return False
    return minimum is None or value >= minimum


def _check_cycles(segments: Iterable[Entity], out: list[Problem]) -> None:
    graph: dict[str, set[str]] = {}
    paths: dict[str, str] = {}
    for entity in segments:
        doc = entity.doc
        if isinstance(doc, Mapping) and is_key(doc.get("key")) and isinstance(doc.get("rule"), Mapping):
            try:
                graph[doc["key"]] = segment_references(doc["rule"])
            except (TypeError, KeyError, AttributeError):  # an invalid rule, reported elsewhere
                graph[doc["key"]] = set()
            paths.setdefault(doc["key"], entity.path)
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    reported: set[frozenset[str]] = set()

    def visit(key: str, stack: list[str]) -> None:
        state[key] = 1
        stack.append(key)
        for ref in sorted(graph.get(key, ())):
            if state.get(ref) == 1:
                cycle = stack[stack.index(ref) :]
                members = frozenset(cycle)
                if members not in reported:
                    reported.add(members)
                    text = " -> ".join([*cycle, ref])
                    # Report it where the user is editing: at an entity given in this input (a bundle
                    # path or "input") rather than at one already stored ("segments['b']").
                    at = min(cycle, key=lambda k: ("['" in paths[k], k != ref))
                    out.append(Problem(f"{paths[at]}.rule", f"cycle of segment references: {text}"))
            elif ref in graph and ref not in state:
                visit(ref, stack)
        stack.pop()
        state[key] = 2

    for key in sorted(graph):
        if key not in state:
            visit(key, [])


# --------------------------------------------------------------------------------------------------
# Data records: profiles and events (partially accepted, each rejected record reported)


def check_profile(doc: object, path: str) -> list[Problem]:
    if not isinstance(doc, Mapping):
        return [Problem(path, f"a profile must be a JSON object, not {describe(doc)}")]
    out = [Problem(f"{path}.{k}", f"unexpected key '{k}'") for k in doc if k not in ("userId", "traits", "consent")]
    if not isinstance(doc.get("userId"), str) or not doc.get("userId"):
        out.append(Problem(f"{path}.userId", "a profile needs a non-empty userId"))
    if "traits" in doc and not isinstance(doc["traits"], Mapping):
        out.append(Problem(f"{path}.traits", f"must be a JSON object, not {describe(doc['traits'])}"))
    consent = doc.get("consent")
    if consent is not None:
        if not isinstance(consent, Mapping):
            out.append(Problem(f"{path}.consent", 'must be an object such as {"personalization": true}'))
        elif "personalization" in consent and not isinstance(consent["personalization"], bool):
            out.append(Problem(f"{path}.consent.personalization", "must be true or false"))
    return out


def check_event(doc: object, path: str, *, require_id_and_time: bool = True) -> list[Problem]:
    if not isinstance(doc, Mapping):
        return [Problem(path, f"an event must be a JSON object, not {describe(doc)}")]
    allowed = ("id", "type", "userId", "anonymousId", "at", "properties")
    out = [Problem(f"{path}.{k}", f"unexpected key '{k}'") for k in doc if k not in allowed]
    for k in ("id", "type"):
        value = doc.get(k)
        if value is None and k == "id" and not require_id_and_time:
            continue
        if not isinstance(value, str) or not value:
            out.append(Problem(f"{path}.{k}", f"an event needs a non-empty {k}"))
    for k in ("userId", "anonymousId"):
        if doc.get(k) is not None and not isinstance(doc[k], str):
            out.append(Problem(f"{path}.{k}", f"must be a string, not {describe(doc[k])}"))
    if not doc.get("userId") and not doc.get("anonymousId"):
        out.append(Problem(f"{path}.userId", "an event needs a userId or an anonymousId"))
    if doc.get("at") is None:
        if require_id_and_time:
            out.append(Problem(f"{path}.at", "an event needs 'at' (an ISO 8601 date-time)"))
    elif parse_instant(doc["at"]) is None:
        out.append(Problem(f"{path}.at", f"must be an ISO 8601 date-time, not {doc['at']!r}"))
    if doc.get("properties") is not None and not isinstance(doc["properties"], Mapping):
        out.append(Problem(f"{path}.properties", f"must be a JSON object, not {describe(doc['properties'])}"))
    return out

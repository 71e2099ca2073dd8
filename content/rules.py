"""The rule language of spec/rules.md: validate a rule (every problem, each with its JSON path) and
compile it, once per published version, into a plain callable that the request path evaluates."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, TypeGuard

from content.behaviour import Event, History, after, latest, window
from content.errors import Problem
from content.viewer import Viewer

OPERATORS = (
    "eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "between",
    "contains", "starts_with", "ends_with", "exists",
)  # fmt: skip
COUNT_OPERATORS = ("eq", "gt", "gte", "lt", "lte")
SCORE_OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "between")
AT_OPERATORS = ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "between", "exists")
CONTEXT_FIELDS = (
    "device", "channel", "country", "region", "city", "locale", "timezone",
    "local_hour", "local_weekday", "local_time", "at",
)  # fmt: skip
FORMS = ("all", "any", "not", "trait", "context", "segment", "event", "score")
KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_DURATION = re.compile(r"([0-9]+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_HHMM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")


class Scope(Enum):
    """Where a rule stands: a segment definition may not look at the request context."""

    SEGMENT = "segment"
    TARGETING = "targeting"  # block audiences, variant conditions, flag audiences


def is_key(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and KEY_PATTERN.fullmatch(value) is not None


def parse_duration(text: object) -> timedelta | None:
    """``"15m"`` -> 15 minutes; None for anything that is not a positive integer and a unit."""
    if not isinstance(text, str):
        return None
    match = _DURATION.fullmatch(text)
    if match is None or int(match.group(1)) == 0:
        return None
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_instant(value: object) -> datetime | None:
    """An ISO 8601 date-time; one without an offset is UTC (rules.md, Fine print)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _kind(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, datetime):
        return "instant"
    return "other"


def describe(value: object) -> str:
    kind = _kind(value)
    return "null" if kind is None else kind


# --------------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True, slots=True)
class Known:
    """The keys a rule may refer to."""

    segments: frozenset[str] = frozenset()
    scores: frozenset[str] = frozenset()


def validate_rule(node: object, path: str, *, scope: Scope, known: Known) -> list[Problem]:
    """Every problem of ``node`` as a rule, each with the path of the offending key."""
    problems: list[Problem] = []
    _validate(node, path, scope, known, problems)
    return problems


def _validate(node: object, path: str, scope: Scope, known: Known, out: list[Problem]) -> None:
    if not isinstance(node, Mapping):
        out.append(Problem(path, f"a rule must be a JSON object, not {describe(node)}"))
        return
    form = next((f for f in FORMS if f in node), None)
    if form is None:
        keys = ", ".join(repr(k) for k in node) or "none"
        out.append(Problem(path, f"unknown rule form (keys: {keys}); expected one of {', '.join(FORMS)}"))
        return
    if form in ("all", "any"):
        _extra_keys(node, path, {form}, out)
        items = node[form]
        if not isinstance(items, list):
            out.append(Problem(f"{path}.{form}", f"must be a list of rules, not {describe(items)}"))
            return
        for index, item in enumerate(items):
            _validate(item, f"{path}.{form}[{index}]", scope, known, out)
    elif form == "not":
        _extra_keys(node, path, {"not"}, out)
        _validate(node["not"], f"{path}.not", scope, known, out)
    elif form == "trait":
        _extra_keys(node, path, {"trait", "op", "value"}, out)
        if not _is_path(node["trait"]):
            out.append(Problem(f"{path}.trait", "must be a dot path such as 'tier' or 'address.country'"))
        _validate_comparison(node, path, OPERATORS, out)
    elif form == "context":
        _validate_context(node, path, scope, out)
    elif form == "segment":
        _extra_keys(node, path, {"segment"}, out)
        key = node["segment"]
        if not isinstance(key, str):
            out.append(Problem(f"{path}.segment", f"must be a segment key, not {describe(key)}"))
        elif key not in known.segments:
            out.append(Problem(f"{path}.segment", f"unknown segment '{key}'"))
    elif form == "score":
        _extra_keys(node, path, {"score", "op", "value"}, out)
        key = node["score"]
        if not isinstance(key, str) or key not in known.scores:
            out.append(Problem(f"{path}.score", f"unknown score {key!r}"))
        _validate_comparison(node, path, SCORE_OPERATORS, out, numbers_only=True)
    else:
        _validate_event(node, path, out)


def _extra_keys(node: Mapping[str, Any], path: str, allowed: set[str], out: list[Problem]) -> None:
    for key in node:
        if key not in allowed:
            out.append(Problem(f"{path}.{key}", f"unexpected key '{key}'"))


def _is_path(value: object) -> bool:
    return isinstance(value, str) and value != "" and all(part for part in value.split("."))


def _validate_comparison(
    node: Mapping[str, Any],
    path: str,
    operators: Sequence[str],
    out: list[Problem],
    *,
    numbers_only: bool = False,
    value_check: Callable[[object], str | None] | None = None,
) -> None:
    op = node.get("op")
    if "op" not in node:
        out.append(Problem(f"{path}.op", "missing operator"))
        return
    if op not in operators:
        out.append(Problem(f"{path}.op", f"unknown operator {op!r}; expected one of {', '.join(operators)}"))
        return
    if op == "exists":
        return
    if "value" not in node:
        out.append(Problem(f"{path}.value", f"'{op}' needs a value"))
        return
    value = node["value"]
    vpath = f"{path}.value"
    if op in ("in", "not_in"):
        if not isinstance(value, list):
            out.append(Problem(vpath, f"'{op}' needs a list, not {describe(value)}"))
            return
        elements: list[tuple[str, object]] = [(f"{vpath}[{i}]", v) for i, v in enumerate(value)]
    elif op == "between":
        if not isinstance(value, list) or len(value) != 2:
            out.append(Problem(vpath, "'between' needs a two-element list [low, high]"))
            return
        elements = [(f"{vpath}[{i}]", v) for i, v in enumerate(value)]
    else:
        elements = [(vpath, value)]
    for epath, element in elements:
        if element is None:
            out.append(Problem(epath, "must not be null (null means missing: use 'exists')"))
        elif numbers_only and _kind(element) != "number":
            out.append(Problem(epath, f"must be a number, not {describe(element)}"))
        elif op in ("gt", "gte", "lt", "lte", "between") and _kind(element) not in ("number", "string"):
            out.append(Problem(epath, f"'{op}' compares numbers or strings, not {describe(element)}"))
        elif op in ("starts_with", "ends_with") and not isinstance(element, str):
            out.append(Problem(epath, f"'{op}' needs a string, not {describe(element)}"))
        elif value_check is not None and (message := value_check(element)) is not None:
            out.append(Problem(epath, message))


def _check_instant(value: object) -> str | None:
    if parse_instant(value) is None:
        return f"must be an ISO 8601 date-time, not {value!r}"
    return None


def _check_hhmm(value: object) -> str | None:
    if not isinstance(value, str) or _HHMM.fullmatch(value) is None:
        return f"must be a time 'HH:MM' (00:00-23:59), not {value!r}"
    return None


def _validate_context(node: Mapping[str, Any], path: str, scope: Scope, out: list[Problem]) -> None:
    _extra_keys(node, path, {"context", "op", "value"}, out)
    field = node["context"]
    if scope is Scope.SEGMENT:
        out.append(
            Problem(
                f"{path}.context",
                "context conditions are not allowed in a segment (a segment says who someone is, "
                "not where they are looking from); put it in a block audience or variant instead",
            )
        )
        return
    if isinstance(field, str) and field.startswith("attributes."):
        if not _is_path(field[len("attributes.") :]):
            out.append(Problem(f"{path}.context", f"'{field}' is not a valid attributes path"))
            return
        _validate_comparison(node, path, OPERATORS, out)
        return
    if field not in CONTEXT_FIELDS:
        expected = ", ".join((*CONTEXT_FIELDS, "attributes.PATH"))
        out.append(Problem(f"{path}.context", f"unknown context field {field!r}; expected one of {expected}"))
        return
    if field == "at":
        _validate_comparison(node, path, AT_OPERATORS, out, value_check=_check_instant)
    elif field == "local_time":
        op = node.get("op")
        check = _check_hhmm if op in ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "between") else None
        _validate_comparison(node, path, OPERATORS, out, value_check=check)
    else:
        _validate_comparison(node, path, OPERATORS, out)


def _validate_event(node: Mapping[str, Any], path: str, out: list[Problem]) -> None:
    if not isinstance(node["event"], str) or not node["event"]:
        out.append(Problem(f"{path}.event", "must be a non-empty event type"))
    if "not_followed_by" in node:  # abandonment
        _extra_keys(node, path, {"event", "not_followed_by", "for", "within"}, out)
        if not isinstance(node["not_followed_by"], str) or not node["not_followed_by"]:
            out.append(Problem(f"{path}.not_followed_by", "must be a non-empty event type"))
        if "for" not in node:
            out.append(Problem(f"{path}.for", "an abandonment needs 'for' (how long it must stay unfinished)"))
        elif parse_duration(node["for"]) is None:
            out.append(Problem(f"{path}.for", _bad_duration(node["for"])))
    else:
        _extra_keys(node, path, {"event", "where", "within", "count"}, out)
        if "for" in node:
            pass  # already reported as an unexpected key: 'for' only goes with 'not_followed_by'
        if "where" in node:
            _validate_where(node["where"], f"{path}.where", out)
        if "count" in node:
            _validate_count(node["count"], f"{path}.count", out)
    if "within" in node and parse_duration(node["within"]) is None:
        out.append(Problem(f"{path}.within", _bad_duration(node["within"])))


def _bad_duration(value: object) -> str:
    return f"{value!r} is not a duration (a positive integer and a unit s, m, h, d or w: '15m', '7d')"


def _validate_where(where: object, path: str, out: list[Problem]) -> None:
    if not isinstance(where, Mapping):
        out.append(Problem(path, f"must be an object of property: value, not {describe(where)}"))
        return
    for prop, condition in where.items():
        ppath = f"{path}.{prop}"
        if not _is_path(prop):
            out.append(Problem(ppath, f"{prop!r} is not a property path"))
        elif isinstance(condition, Mapping) and "op" in condition:
            _extra_keys(condition, ppath, {"op", "value"}, out)
            _validate_comparison(condition, ppath, OPERATORS, out)
        elif condition is None:
            out.append(Problem(ppath, "must not be null (null means missing)"))


def _validate_count(count: object, path: str, out: list[Problem]) -> None:
    if not isinstance(count, Mapping) or len(count) != 1:
        out.append(Problem(path, 'must be an object with one comparison, such as {"gte": 3}'))
        return
    op, n = next(iter(count.items()))
    if op not in COUNT_OPERATORS:
        out.append(Problem(f"{path}.{op}", f"unknown count operator {op!r}; expected one of eq, gt, gte, lt, lte"))
    elif _kind(n) != "number" or int(n) != n or n < 0:
        out.append(Problem(f"{path}.{op}", f"must be a non-negative integer, not {n!r}"))


# --------------------------------------------------------------------------------------------------
# What a rule depends on


def leaves(node: Any) -> Iterator[Mapping[str, Any]]:
    """Every leaf condition of a (valid) rule."""
    if "all" in node or "any" in node:
        for item in node.get("all", node.get("any", ())):
            yield from leaves(item)
    elif "not" in node:
        yield from leaves(node["not"])
    else:
        yield node


def segment_references(node: Any) -> set[str]:
    return {leaf["segment"] for leaf in leaves(node) if "segment" in leaf}


def event_types(node: Any, scores: Mapping[str, ScoreDef] | None = None) -> set[str]:
    """Event types whose arrival can change the rule's truth (directly, not through segments)."""
    types: set[str] = set()
    for leaf in leaves(node):
        if "event" in leaf:
            types.add(leaf["event"])
            if "not_followed_by" in leaf:
                types.add(leaf["not_followed_by"])
        elif "score" in leaf and scores and leaf["score"] in scores:
            types.update(scores[leaf["score"]].weights)
    return types


# --------------------------------------------------------------------------------------------------
# Evaluation


def _no_boundary(key: str) -> datetime | None:
    return None


class Facts:
    """What one evaluation knows about the viewer. ``segment(key)`` answers membership and
    ``segment_boundary(key)`` when that membership can next change with time alone (both memoised
    by the caller); ``traits`` is None for a viewer without a profile or consent."""

    __slots__ = ("history", "retention", "segment", "segment_boundary", "traits", "viewer")

    def __init__(
        self,
        viewer: Viewer,
        *,
        traits: Mapping[str, Any] | None,
        history: History,
        retention: timedelta,
        segment: Callable[[str], bool],
        segment_boundary: Callable[[str], datetime | None] = _no_boundary,
    ) -> None:
        self.viewer = viewer
        self.traits = traits
        self.history = history
        self.retention = retention
        self.segment = segment
        self.segment_boundary = segment_boundary


Rule = Callable[[Facts], bool]
Boundary = Callable[[Facts], datetime | None]
"""The earliest instant strictly after ``facts.viewer.at`` at which a rule's truth can change if no
new event arrives, or None when it cannot change with time alone."""


@dataclass(frozen=True, slots=True)
class ScoreDef:
    key: str
    weights: Mapping[str, float]
    half_life: timedelta


def score_value(score: ScoreDef, history: History, now: datetime, retention: timedelta) -> float:
    """``sum(weight * 2 ** (-(now - t) / half_life))`` over the score's events in retention."""
    half_life = score.half_life.total_seconds()
    total = 0.0
    for type_, weight in score.weights.items():
        for event in window(history, type_, now - retention, now):
            total += weight * 2 ** (-(now - event.at).total_seconds() / half_life)
    return total


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def lookup(data: Mapping[str, Any] | None, parts: Sequence[str]) -> Any:
    """The value at a dot path, or MISSING (a null value is missing too)."""
    value: Any = data
    for part in parts:
        if not isinstance(value, Mapping):
            return MISSING
        value = value.get(part, MISSING)
        if value is MISSING:
            return MISSING
    return MISSING if value is None else value


def strict_equal(a: object, b: object) -> bool:
    """JSON equality where types must agree: 1 == 1.0, but True != 1 and "1" != 1."""
    kind = _kind(a)
    if kind != _kind(b):
        return False
    if kind == "list":
        assert isinstance(a, list | tuple)
        assert isinstance(b, list | tuple)
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b, strict=True))
    if kind == "object":
        assert isinstance(a, Mapping)
        assert isinstance(b, Mapping)
        return a.keys() == b.keys() and all(strict_equal(a[k], b[k]) for k in a)
    return a == b


def _ordered(a: object, b: object) -> bool:
    kind = _kind(a)
    return kind in ("number", "string", "instant") and kind == _kind(b)


def predicate(op: str, value: Any, *, wraps: bool = False) -> Callable[[Any], bool]:
    """A test of an actual (present, non-null) value against ``op`` and ``value``."""
    if op == "exists":
        return lambda actual: True
    if op == "eq":
        return lambda actual: strict_equal(actual, value)
    if op == "ne":
        return lambda actual: _kind(actual) == _kind(value) and not strict_equal(actual, value)
    if op == "in":
        return lambda actual: any(strict_equal(actual, v) for v in value)
    if op == "not_in":  # every element must be a 'ne': a type mismatch makes it false
        return lambda actual: all(_kind(actual) == _kind(v) and not strict_equal(actual, v) for v in value)
    if op == "gt":
        return lambda actual: _ordered(actual, value) and actual > value
    if op == "gte":
        return lambda actual: _ordered(actual, value) and actual >= value
    if op == "lt":
        return lambda actual: _ordered(actual, value) and actual < value
    if op == "lte":
        return lambda actual: _ordered(actual, value) and actual <= value
    if op == "between":
        low, high = value
        if not _ordered(low, high):
            return lambda actual: False
        if low > high:
            if not wraps:
                return lambda actual: False
            return lambda actual: _ordered(actual, low) and (actual >= low or actual <= high)
        return lambda actual: _ordered(actual, low) and low <= actual <= high
    if op == "contains":

        def contains(actual: Any) -> bool:
            if isinstance(actual, str):
                return isinstance(value, str) and value in actual
            if isinstance(actual, list):
                return any(strict_equal(item, value) for item in actual)
            return False

        return contains
    if op == "starts_with":
        return lambda actual: isinstance(actual, str) and actual.startswith(value)
    if op == "ends_with":
        return lambda actual: isinstance(actual, str) and actual.endswith(value)
    raise ValueError(f"unknown operator {op!r}")  # validation makes this unreachable


def _context_accessor(field: str) -> Callable[[Viewer], Any]:
    if field.startswith("attributes."):
        parts = field[len("attributes.") :].split(".")
        return lambda viewer: lookup(viewer.attributes, parts)
    name = field

    def read(viewer: Viewer) -> Any:
        value = getattr(viewer, name)
        return MISSING if value is None else value

    return read


_COUNT_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "eq": lambda a, b: a == b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def compile_rule(node: Any, scores: Mapping[str, ScoreDef]) -> Rule:
    """Compile a valid rule into a callable of :class:`Facts`. Validate first: this assumes validity."""
    if "all" in node:
        parts = [compile_rule(item, scores) for item in node["all"]]
        if len(parts) == 1:
            return parts[0]
        return lambda facts: all(part(facts) for part in parts)
    if "any" in node:
        parts = [compile_rule(item, scores) for item in node["any"]]
        if len(parts) == 1:
            return parts[0]
        return lambda facts: any(part(facts) for part in parts)
    if "not" in node:
        inner = compile_rule(node["not"], scores)
        return lambda facts: not inner(facts)
    if "trait" in node:
        path = node["trait"].split(".")
        test = predicate(node["op"], node.get("value"))

        def trait(facts: Facts) -> bool:
            actual = lookup(facts.traits, path)
            return actual is not MISSING and test(actual)

        return trait
    if "context" in node:
        return _compile_context(node)
    if "segment" in node:
        key = node["segment"]
        return lambda facts: facts.segment(key)
    if "score" in node:
        return _compile_score(node, scores[node["score"]])
    if "not_followed_by" in node:
        return _compile_abandonment(node)
    return _compile_event(node)


def _compile_context(node: Mapping[str, Any]) -> Rule:
    field: str = node["context"]
    op: str = node["op"]
    value = node.get("value")
    if field == "at" and op != "exists":
        value = [parse_instant(v) for v in value] if isinstance(value, list) else parse_instant(value)
    test = predicate(op, value, wraps=field in ("local_hour", "local_time"))
    read = _context_accessor(field)

    def context(facts: Facts) -> bool:
        actual = read(facts.viewer)
        return actual is not MISSING and test(actual)

    return context


def _rounded_score(score: ScoreDef, history: History, now: datetime, retention: timedelta) -> float:
    return round(score_value(score, history, now, retention), 6)


def _compile_score(node: Mapping[str, Any], score: ScoreDef) -> Rule:
    test = predicate(node["op"], node["value"])

    def rule(facts: Facts) -> bool:
        return test(_rounded_score(score, facts.history, facts.viewer.at, facts.retention))

    return rule


def properties_matcher(where: Mapping[str, Any] | None) -> Callable[[Mapping[str, Any]], bool] | None:
    """The test of an event's properties against a (valid) ``where``; None when there is nothing to test."""
    return _where(where)


def _where(where: Mapping[str, Any] | None) -> Callable[[Mapping[str, Any]], bool] | None:
    if not where:
        return None
    tests: list[tuple[list[str], Callable[[Any], bool]]] = []
    for prop, condition in where.items():
        if isinstance(condition, Mapping) and "op" in condition:
            tests.append((prop.split("."), predicate(condition["op"], condition.get("value"))))
        else:
            tests.append((prop.split("."), predicate("eq", condition)))

    def matches(properties: Mapping[str, Any]) -> bool:
        for path, test in tests:
            actual = lookup(properties, path)
            if actual is MISSING or not test(actual):
                return False
        return True

    return matches


def _span(within: timedelta | None, retention: timedelta) -> timedelta:
    return retention if within is None else min(within, retention)


@dataclass(frozen=True, slots=True)
class _EventCount:
    """An event condition, parsed: shared by the rule and its boundary so that both count alike."""

    type: str
    within: timedelta | None
    where: Callable[[Mapping[str, Any]], bool] | None
    compare: Callable[[int, int], bool]
    n: int

    @classmethod
    def parse(cls, node: Mapping[str, Any]) -> _EventCount:
        op, n = next(iter(node.get("count", {"gte": 1}).items()))
        within = parse_duration(node["within"]) if "within" in node else None
        return cls(node["event"], within, _where(node.get("where")), _COUNT_COMPARE[op], int(n))

    def matching(self, events: Sequence[Event]) -> Sequence[Event]:
        where = self.where
        return events if where is None else [e for e in events if where(e.properties)]


def _compile_event(node: Mapping[str, Any]) -> Rule:
    condition = _EventCount.parse(node)
    type_, within, where = condition.type, condition.within, condition.where
    compare, n = condition.compare, condition.n

    def rule(facts: Facts) -> bool:
        now = facts.viewer.at
        events = window(facts.history, type_, now - _span(within, facts.retention), now)
        count = len(events) if where is None else sum(1 for e in events if where(e.properties))
        return compare(count, n)

    return rule


@dataclass(frozen=True, slots=True)
class _Abandonment:
    """An abandonment condition, parsed: shared by the rule and its boundary."""

    type: str
    other: str
    hold: timedelta
    within: timedelta | None

    @classmethod
    def parse(cls, node: Mapping[str, Any]) -> _Abandonment:
        hold = parse_duration(node["for"])
        assert hold is not None
        within = parse_duration(node["within"]) if "within" in node else None
        return cls(node["event"], node["not_followed_by"], hold, within)

    def holds(self, history: History, now: datetime, retention: timedelta) -> bool:
        started = latest(history, self.type, now - _span(self.within, retention), now)
        if started is None or now - started.at < self.hold:
            return False
        return not window(history, self.other, started.at, now)


def _compile_abandonment(node: Mapping[str, Any]) -> Rule:
    condition = _Abandonment.parse(node)

    def rule(facts: Facts) -> bool:
        return condition.holds(facts.history, facts.viewer.at, facts.retention)

    return rule


# --------------------------------------------------------------------------------------------------
# Boundaries: when a rule's truth can next change with time alone
#
# Seen as functions of `now` with the history fixed, behavioural conditions are step functions that
# hold their value on half-open intervals [a, b): an event counts from its instant t until t + span
# (where `now - span < t` fails), an abandonment turns true at t_A + for, and a rounded score steps at
# some microsecond (datetime's resolution). A boundary is the start of the next interval: the truth
# at `now` holds until just before it and may differ at it. Boundaries may be early (the caller
# evaluates again and asks again) but never late, and always strictly after `now`.

_TICK = timedelta(microseconds=1)
_BRACKET = timedelta(milliseconds=1)
_HALF_UNIT = 5e-7  # half of the 6th decimal place, where round(value, 6) steps


def never(facts: Facts) -> datetime | None:
    """The boundary of a rule that time alone cannot change."""
    return None


def earliest(instants: Iterable[datetime | None]) -> datetime | None:
    """The earliest of the instants that are not None, or None."""
    found = [at for at in instants if at is not None]
    return min(found) if found else None


def compile_boundary(node: Any, scores: Mapping[str, ScoreDef]) -> Boundary:
    """Compile a valid rule into its :data:`Boundary`: for the viewer's facts, the earliest instant
    strictly after ``facts.viewer.at`` at which the rule's truth can change if no new event arrives
    (events already in the history with a later time count from their instant), or None when time
    alone cannot change it. The instant may be early, never late."""
    if "all" in node or "any" in node:
        return _combined_boundary(node, scores)
    if "not" in node:
        return compile_boundary(node["not"], scores)
    if "trait" in node or "context" in node:
        # Traits change by identify, never by time. Context (`at`, `local_hour`...) does change with
        # time, but only targeting rules may read it and those are evaluated per request; segments,
        # whose membership is what gets scheduled, cannot contain a context condition.
        return never
    if "segment" in node:
        key: str = node["segment"]
        return lambda facts: facts.segment_boundary(key)
    if "score" in node:
        return _score_boundary(node, scores[node["score"]])
    if "not_followed_by" in node:
        return _abandonment_boundary(node)
    return _event_boundary(node)


def _combined_boundary(node: Mapping[str, Any], scores: Mapping[str, ScoreDef]) -> Boundary:
    form = "all" if "all" in node else "any"
    children = [(compile_rule(item, scores), compile_boundary(item, scores)) for item in node[form]]
    if all(child is never for _, child in children):
        return never
    settling = form == "any"  # the truth of one child that decides the whole: true for any, false for all

    def boundary(facts: Facts) -> datetime | None:
        soonest: datetime | None = None
        for rule, child in children:
            at = child(facts)
            if at is None:
                # This child keeps its truth for good; when that truth decides the whole, so does the
                # whole (a non-gold viewer never enters "gold and abandoned a cart" by waiting).
                if rule(facts) == settling:
                    return None
            elif soonest is None or at < soonest:
                soonest = at
        return soonest

    return boundary


def _event_boundary(node: Mapping[str, Any]) -> Boundary:
    condition = _EventCount.parse(node)

    def boundary(facts: Facts) -> datetime | None:
        now = facts.viewer.at
        span = _span(condition.within, facts.retention)
        counted = condition.matching(window(facts.history, condition.type, now - span, now))
        coming = condition.matching(after(facts.history, condition.type, now))
        # Each event counts on [t, t + span), so the count only steps at those instants: walk them in
        # order and stop at the first where the comparison turns (not merely where the count moves).
        steps = [(e.at + span, -1) for e in counted]  # already in time order
        if coming:
            steps += [(e.at, 1) for e in coming] + [(e.at + span, -1) for e in coming]
            steps.sort(key=lambda step: step[0])
        count = len(counted)
        truth = condition.compare(count, condition.n)
        for index, (at, step) in enumerate(steps):
            count += step
            last_at_this_instant = index + 1 == len(steps) or steps[index + 1][0] != at
            if last_at_this_instant and condition.compare(count, condition.n) != truth:
                return at
        return None

    return boundary


def _abandonment_boundary(node: Mapping[str, Any]) -> Boundary:
    condition = _Abandonment.parse(node)

    def boundary(facts: Facts) -> datetime | None:
        history, now, retention = facts.history, facts.viewer.at, facts.retention
        span = _span(condition.within, retention)
        # The truth can only change when a start arrives, has waited `for`, or leaves the window
        # (the latest one: older starts have left before it), or when an end arrives. Between those
        # instants nothing it reads moves, so trying each in order finds the first change exactly.
        started = latest(history, condition.type, now - span, now)
        starts = [*([started] if started is not None else []), *after(history, condition.type, now)]
        instants = {at for s in starts for at in (s.at, s.at + condition.hold, s.at + span)}
        instants.update(e.at for e in after(history, condition.other, now))
        truth = condition.holds(history, now, retention)
        for at in sorted(at for at in instants if at > now):
            if condition.holds(history, at, retention) != truth:
                return at
        return None

    return boundary


def _score_boundary(node: Mapping[str, Any], score: ScoreDef) -> Boundary:
    """A score's value moves for two reasons: decay, and its window changing (an event reaching its
    instant, or leaving retention). Between window changes every term decays with the same half-life,
    so the whole sum does: S(t) = S(now) * 2 ** (-(t - now) / half_life), whatever the signs of the
    weights. The value therefore moves monotonically towards 0 (down from a positive score, up from
    a negative one), and so does its rounding: each test "rounded < N" and "rounded > N" changes at
    most once before the window changes, at an instant found by bisection on the microsecond, with
    the rule's own arithmetic. (With weights of both signs the float sum is monotone only to its last
    bit; a wobble exactly at a rounding edge could move that instant by a microsecond or so.)"""
    test = predicate(node["op"], node["value"])
    value = node["value"]
    thresholds = [float(v) for v in value] if node["op"] == "between" else [float(value)]
    half_life = score.half_life.total_seconds()

    def boundary(facts: Facts) -> datetime | None:
        history, now, retention = facts.history, facts.viewer.at, facts.retention
        window_change = _score_window_change(score, history, now, retention)
        if window_change is None:
            return None  # no event in the window and none to come: the score stays 0

        def rounded(at: datetime) -> float:
            return _rounded_score(score, history, at, retention)

        exact = score_value(score, history, now, retention)
        truth = test(round(exact, 6))
        changes: list[datetime] = []
        for n in thresholds:
            # rounded < n changes where the exact value crosses about n - half a unit, rounded > n
            # about n + half a unit: the analytic crossing narrows the bisection to a millisecond.
            for target, side in ((n - _HALF_UNIT, _below(n)), (n + _HALF_UNIT, _above(n))):
                hint = _decay_crossing(exact, target, half_life, now, window_change)
                at = _first_change(_at(rounded, side), now, window_change, hint)
                if at is not None:
                    changes.append(at)
        for at in sorted(changes):
            if test(rounded(at)) != truth:
                return at
        return window_change

    return boundary


def _at(value: Callable[[datetime], float], test: Callable[[float], bool]) -> Callable[[datetime], bool]:
    return lambda at: test(value(at))


def _below(n: float) -> Callable[[float], bool]:
    return lambda value: value < n


def _above(n: float) -> Callable[[float], bool]:
    return lambda value: value > n


def _score_window_change(
    score: ScoreDef, history: History, now: datetime, retention: timedelta
) -> datetime | None:
    """The next instant after ``now`` at which an event enters or leaves the score's sum."""
    instants: list[datetime] = []
    for type_ in score.weights:
        counted = window(history, type_, now - retention, now)
        if counted:
            instants.append(counted[0].at + retention)  # the oldest leaves first
        coming = after(history, type_, now)
        if coming:
            instants.append(coming[0].at)
    return min(instants) if instants else None


def _decay_crossing(
    exact: float, target: float, half_life: float, now: datetime, until: datetime
) -> datetime | None:
    """When ``exact * 2 ** (-(t - now) / half_life)`` reaches ``target``, if before ``until``."""
    if target == 0 or exact / target <= 1:
        return None  # it never does: opposite signs, or already at or past the target
    seconds = half_life * math.log2(exact / target)
    if seconds >= (until - now).total_seconds():
        return None
    return now + timedelta(seconds=seconds)


def _first_change(
    holds: Callable[[datetime], bool], start: datetime, end: datetime, hint: datetime | None
) -> datetime | None:
    """The first microsecond in (start, end) at which ``holds`` differs from its value at ``start``,
    or None; ``holds`` must change at most once there. ``hint``, a guess of the instant, saves steps."""
    initial = holds(start)
    low, high = start, end - _TICK  # invariant: holds(low) == initial != holds(high)
    if high <= low or holds(high) == initial:
        return None
    if hint is not None:
        for probe in (hint - _BRACKET, hint + _BRACKET):
            if low < probe < high:
                if holds(probe) == initial:
                    low = probe
                else:
                    high = probe
    while high - low > _TICK:
        middle = low + (high - low) // 2
        if holds(middle) == initial:
            low = middle
        else:
            high = middle
    return high

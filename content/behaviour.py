"""What a viewer did: events and the history that behavioural conditions read."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    at: datetime
    properties: Mapping[str, Any] = field(default_factory=dict)


class History(Protocol):
    """A viewer's events, by type, in ascending time order."""

    def of_type(self, type_: str) -> Sequence[Event]: ...


class EventLog:
    """An in-memory :class:`History`. Events sharing an id count once: the first one given is kept."""

    __slots__ = ("_by_type", "_times")

    def __init__(self, events: Iterable[Event] = ()) -> None:
        seen: set[str] = set()
        by_type: dict[str, list[Event]] = {}
        for event in events:
            if event.id in seen:
                continue
            seen.add(event.id)
            by_type.setdefault(event.type, []).append(event)
        for items in by_type.values():
            items.sort(key=lambda e: e.at)
        self._by_type = by_type
        self._times = {t: [e.at for e in items] for t, items in by_type.items()}

    def of_type(self, type_: str) -> Sequence[Event]:
        return self._by_type.get(type_, ())

    def between(self, type_: str, after: datetime, until: datetime) -> Sequence[Event]:
        """Events of ``type_`` with ``after < at <= until``."""
        times = self._times.get(type_)
        if not times:
            return ()
        lo = bisect_right(times, after)
        hi = bisect_right(times, until)
        return self._by_type[type_][lo:hi]

    def after(self, type_: str, instant: datetime) -> Sequence[Event]:
        """Events of ``type_`` with ``at > instant``."""
        times = self._times.get(type_)
        if not times:
            return ()
        return self._by_type[type_][bisect_right(times, instant) :]


EMPTY_HISTORY = EventLog()


def window(history: History, type_: str, after: datetime, until: datetime) -> Sequence[Event]:
    """Events of ``type_`` with ``after < at <= until``, in ascending time order."""
    if isinstance(history, EventLog):
        return history.between(type_, after, until)
    events = history.of_type(type_)
    times = [e.at for e in events]
    return events[bisect_right(times, after) : bisect_right(times, until)]


def after(history: History, type_: str, instant: datetime) -> Sequence[Event]:
    """Events of ``type_`` with ``at > instant``, in ascending time order: seen from ``instant``, the
    future-dated ones (a tracker's clock ahead of ours, or an email rendered for an earlier send time)."""
    if isinstance(history, EventLog):
        return history.after(type_, instant)
    events = history.of_type(type_)
    return events[bisect_right([e.at for e in events], instant) :]


def latest(history: History, type_: str, after: datetime, until: datetime) -> Event | None:
    events = window(history, type_, after, until)
    return events[-1] if events else None

"""Segment's HTTP Tracking API (``POST /v1/track``, ``/v1/page``, ``/v1/screen``, ``/v1/identify``,
``/v1/alias`` and ``/v1/batch``), so that trackers written for Segment or RudderStack send to Tessera
unchanged: each message becomes an event, an identify or an alias of the :class:`~server.ingest.Ingestor`.

How messages map (Segment's field names on the left):

- ``track``: an event of type ``event``. ``page`` and ``screen``: an event of type ``page_view`` or
  ``screen_view`` whose properties are ``{"name": name, "category": category, **properties}`` (the
  message's own ``properties.name`` wins, as in analytics.js, which copies the name there too).
  ``messageId`` is the event's id (a repeated one is dropped), ``userId`` and ``anonymousId`` its
  viewer. Other fields (``context``, ``integrations``, ...) are ignored.
- Time: ``timestamp``, else ``originalTimestamp``, else the time of arrival. When the message (or,
  in a batch, the batch) carries ``sentAt``, the client's clock is corrected with it: the event's
  instant is ``timestamp + (receivedAt - sentAt)``, as Segment does, so that a device whose clock is
  hours off still records its events when they happened. The corrected instant must lie within the
  retention period and at most ``event_max_future_seconds`` ahead of the server's clock.
- ``identify``: merges ``traits`` into the profile of ``userId`` (required: Tessera keeps traits for
  known users only) and joins ``anonymousId`` to it. Consent is ``traits.consent`` when it is an
  object (taken out of the traits: it is stored as the profile's consent, not as a trait), else
  ``context.consent`` when that is an object, else unchanged. Tessera reads ``personalization``
  from it: ``{"personalization": false}`` withholds the viewer's events.
- ``alias``: joins ``previousId`` (taken to be an anonymous id) to ``userId``.
- A batch is processed in order: the events between two identify or alias messages are appended in
  one call, so that an identify changes what the events after it mean (their consent).

Answers: 200 ``{"success": true, "accepted": n, "rejected": [{"index": i, "errors": [...]}]}`` once
every accepted message is durable, each error ``"path: message"`` (``batch[3].event: ...``); 400 for
a body that is not JSON or is larger than ``batch_max_bytes`` (nothing is stored); 401 and 403 for
the key; 503 when the store is unreachable. Segment clients look only at the status and retry 5xx,
so a message that can never be taken is rejected in a 200, never failed with a 5xx; a retried batch
does not count twice because its events keep their ``messageId``.

The write key is the Basic-auth user name (the password is ignored), an ``Authorization: Bearer``
key, or, as Segment allows, the body's ``writeKey``. Ingest and delivery keys may send.
"""

from __future__ import annotations

import base64
import binascii
import logging
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from content.errors import Problem
from content.rules import describe, parse_instant
from schema.errors import FORBIDDEN, UNAUTHENTICATED
from schema.http import Authenticator, error_response
from server.events import MAX_ID, check_tracked
from server.ingest import Ingestor
from server.settings import Clock, Limits

log = logging.getLogger(__name__)

SCOPES = frozenset({"ingest", "delivery"})
BAD_REQUEST = "BAD_REQUEST"
UNAVAILABLE = "SERVICE_UNAVAILABLE"

EVENT_TYPES = {"page": "page_view", "screen": "screen_view"}  # track: the message's `event`
MESSAGE_TYPES = ("track", "identify", "alias", "page", "screen")
# check_tracked's names for an event's fields, in Segment's words (its paths become ours)
_SEGMENT_NAMES = {"type": "event", "id": "messageId", "at": "timestamp"}
# The store failed, not the message: the client should retry (the events keep their messageId).
_UNAVAILABLE_ERRORS = (RedisError, SQLAlchemyError, OSError, TimeoutError)


class _Refused(Exception):
    """The request as a whole is refused (401, 403, 400, 503): nothing of it is stored."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(slots=True)
class _Answer:
    accepted: int = 0
    rejected: dict[int, list[str]] = field(default_factory=dict)

    def reject(self, index: int, errors: Sequence[str]) -> None:
        self.rejected.setdefault(index, []).extend(errors)

    def response(self) -> Response:
        rejected = [{"index": i, "errors": errors} for i, errors in sorted(self.rejected.items())]
        body = {"success": True, "accepted": self.accepted, "rejected": rejected}
        return Response(orjson.dumps(body), 200, media_type="application/json")


class TrackingCORS:
    """CORS for the tracking API only, so that browser trackers can send to ``/v1/*`` from the
    configured origins (ingest keys are public in a browser anyway); other paths are untouched."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self._app = app
        self._cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=["POST"],
            allow_headers=["authorization", "content-type", "content-encoding"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            await self._cors(scope, receive, send)
        else:
            await self._app(scope, receive, send)


def tracking_routes(authenticator: Authenticator, ingest: Ingestor, *, clock: Clock) -> list[Route]:
    """The routes of the tracking API: ``/v1/batch`` and one per message type."""
    api = TrackingAPI(authenticator, ingest, clock=clock)
    routes = [Route("/v1/batch", api.batch, methods=["POST"])]
    for kind in ("track", "page", "screen", "identify", "alias"):
        routes.append(Route(f"/v1/{kind}", api.single(kind), methods=["POST"]))
    return routes


class TrackingAPI:
    """The endpoints of Segment's HTTP Tracking API over an :class:`Ingestor`."""

    def __init__(self, authenticator: Authenticator, ingest: Ingestor, *, clock: Clock) -> None:
        self._authenticator = authenticator
        self._ingest = ingest
        self._clock = clock

    async def batch(self, request: Request) -> Response:
        return await self._answer(request, None)

    def single(self, kind: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self._answer(request, kind)

        endpoint.__name__ = f"v1_{kind}"
        return endpoint

    async def _answer(self, request: Request, kind: str | None) -> Response:
        try:
            return await self._handle(request, kind)
        except _Refused as refused:
            return error_response(refused.status, refused.message, refused.code)
        except _UNAVAILABLE_ERRORS:  # the key lookup or the store: partly stored at most, and a retry is safe
            log.warning("tracked messages could not be taken", exc_info=True)
            return error_response(503, "the messages could not be stored; retry", UNAVAILABLE)

    async def _handle(self, request: Request, kind: str | None) -> Response:
        received_at = self._clock()
        limits = self._ingest.limits
        key = _key_from_header(request.headers.get("authorization"))
        if key is not None:  # a key in the header is checked before the body is read
            await self._check_key(key)
        body = await _read_body(request, limits.max_batch_bytes)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if key is None:
                raise _Refused(401, _MISSING_KEY, UNAUTHENTICATED) from None
            raise _Refused(400, f"the body is not valid JSON: {exc}", BAD_REQUEST) from None
        if key is None:
            write_key = doc.get("writeKey") if isinstance(doc, dict) else None
            if not isinstance(write_key, str) or not write_key:
                raise _Refused(401, _MISSING_KEY, UNAUTHENTICATED)
            await self._check_key(write_key)
        if not isinstance(doc, dict):
            raise _Refused(400, f"the body must be a JSON object, not {describe(doc)}", BAD_REQUEST)
        if kind is None:
            messages = doc.get("batch")
            if not isinstance(messages, list):
                raise _Refused(400, f"batch: must be a list of messages, not {describe(messages)}", BAD_REQUEST)
        else:
            messages = [doc]
        # A body that is no larger than the message limit holds no message larger than it.
        measure = len(body) > limits.max_event_bytes
        return await self._take(messages, kind, doc.get("sentAt"), received_at, measure)

    async def _check_key(self, raw: str) -> None:
        principal = await self._authenticator.authenticate(raw)
        if principal is None:
            raise _Refused(401, "unknown or revoked write key", UNAUTHENTICATED)
        if principal.scope not in SCOPES:
            article = "an" if principal.scope[:1] in ("a", "e", "i", "o", "u") else "a"
            message = f"{article} {principal.scope} key cannot send events (needs ingest or delivery)"
            raise _Refused(403, message, FORBIDDEN)

    async def _take(
        self, messages: list[Any], kind: str | None, batch_sent_at: Any, received_at: datetime, measure: bool
    ) -> Response:
        limits = self._ingest.limits
        max_bytes = limits.max_event_bytes
        window = _Window.of(received_at, limits, batch_sent_at)
        answer = _Answer()
        prefixes = [f"batch[{i}]" for i in range(len(messages))] if kind is None else [""]
        pending: list[tuple[str, Any]] = []  # (index, record) of the events since the last identify or alias
        for index, message in enumerate(messages):
            prefix = prefixes[index]
            if not isinstance(message, dict):
                answer.reject(index, [_error(prefix, "", f"a message must be a JSON object, not {describe(message)}")])
                continue
            if measure:
                size = len(orjson.dumps(message))
                if size > max_bytes:
                    too_large = f"the message is {size} bytes; at most {max_bytes} are taken"
                    answer.reject(index, [_error(prefix, "", too_large)])
                    continue
            type_ = kind or message.get("type")
            if type_ == "track" or type_ == "page" or type_ == "screen":
                errors: list[str] = []
                at = _instant(message, prefix, window, errors)
                record = _event_record(message, type_, at)
                if errors:  # not for the Ingestor; but say everything else that is wrong with it too
                    checked = check_tracked(record, str(index), now=received_at, limits=limits)
                    others = _segment_errors(checked if isinstance(checked, list) else [], prefixes)
                    rest = [p for p in others.get(index, []) if not p.startswith(_path(prefix, "timestamp"))]
                    answer.reject(index, errors + rest)
                    continue
                pending.append((str(index), record))
            elif type_ == "identify" or type_ == "alias":
                if pending:
                    await self._track(pending, prefixes, answer)
                    pending = []
                if type_ == "identify":
                    errors = await self._identify(message, prefix)
                else:
                    errors = await self._alias(message, prefix)
                if errors:
                    answer.reject(index, errors)
                else:
                    answer.accepted += 1
            else:
                answer.reject(index, [_error(prefix, "type", _unknown_type(type_))])
        if pending:
            await self._track(pending, prefixes, answer)
        return answer.response()

    async def _track(self, records: list[tuple[str, Any]], prefixes: list[str], answer: _Answer) -> None:
        result = await self._ingest.track(records, measured=True)  # _take measured each message
        answer.accepted += result.accepted
        for index, errors in _segment_errors(result.rejected, prefixes).items():
            answer.reject(index, errors)

    async def _identify(self, message: Mapping[str, Any], prefix: str) -> list[str]:
        errors: list[str] = []
        user_id = _identifier(message, "userId", prefix, errors)
        anonymous_id = _identifier(message, "anonymousId", prefix, errors)
        traits = message.get("traits")
        if traits is None:
            traits = {}
        elif not isinstance(traits, dict):
            errors.append(_error(prefix, "traits", f"must be a JSON object, not {describe(traits)}"))
        if user_id is None and not any(e.startswith(_path(prefix, "userId")) for e in errors):
            errors.append(_error(prefix, "userId", "an identify needs a userId (Tessera keeps traits for users only)"))
        if errors or user_id is None:
            return errors
        consent = traits.get("consent")
        if isinstance(consent, dict):
            traits = {k: v for k, v in traits.items() if k != "consent"}
        else:
            context = message.get("context")
            consent = context.get("consent") if isinstance(context, dict) else None
            consent = consent if isinstance(consent, dict) else None
        await self._ingest.identify(user_id=user_id, anonymous_id=anonymous_id, traits=traits, consent=consent)
        return []

    async def _alias(self, message: Mapping[str, Any], prefix: str) -> list[str]:
        errors: list[str] = []
        previous_id = _identifier(message, "previousId", prefix, errors)
        user_id = _identifier(message, "userId", prefix, errors)
        for name, value in (("previousId", previous_id), ("userId", user_id)):
            if value is None and not any(e.startswith(_path(prefix, name)) for e in errors):
                errors.append(_error(prefix, name, f"an alias needs a {name}"))
        if errors or previous_id is None or user_id is None:
            return errors
        await self._ingest.alias(previous_id=previous_id, user_id=user_id)
        return []


_MISSING_KEY = "missing write key: send it as the Basic-auth user name, or 'Authorization: Bearer <key>'"


def _key_from_header(authorization: str | None) -> str | None:
    """The write key of an ``Authorization`` header; None without one."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    scheme = scheme.lower()
    if scheme == "bearer" and credentials:
        return credentials
    if scheme == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            malformed = "malformed Basic credentials: expected base64 of '<write key>:'"
            raise _Refused(401, malformed, UNAUTHENTICATED) from None
        key = decoded.partition(":")[0]
        if key:
            return key
    raise _Refused(401, _MISSING_KEY, UNAUTHENTICATED)


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = f"the request is larger than {limit} bytes; send smaller batches"
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _Refused(400, too_large, BAD_REQUEST)
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise _Refused(400, too_large, BAD_REQUEST)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return bytes(chunks)
    if encoding != "gzip":
        raise _Refused(400, f"unsupported Content-Encoding {encoding!r}: send gzip or nothing", BAD_REQUEST)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        body = inflater.decompress(bytes(chunks), limit + 1)  # never inflate more than the limit
    except zlib.error as exc:
        raise _Refused(400, f"the body is not valid gzip: {exc}", BAD_REQUEST) from None
    if len(body) > limit:
        raise _Refused(400, too_large, BAD_REQUEST)
    if not inflater.eof:
        raise _Refused(400, "the body is not valid gzip: it ends too early", BAD_REQUEST)
    return body


@dataclass(frozen=True, slots=True)
class _Window:
    """A request's frame of time: when it arrived, the instants an event may have, and the clock
    correction of the batch's own ``sentAt`` (parsed once, not once per message)."""

    received_at: datetime
    oldest: datetime
    latest: datetime
    batch_skew: timedelta | None = None  # received_at - the batch's sentAt
    batch_error: str | None = None  # the batch's sentAt is not a date-time

    @classmethod
    def of(cls, received_at: datetime, limits: Limits, batch_sent_at: Any) -> _Window:
        oldest, latest = received_at - limits.retention, received_at + limits.max_future
        if batch_sent_at is None:
            return cls(received_at, oldest, latest)
        sent_at = parse_instant(batch_sent_at)
        if sent_at is None:
            return cls(received_at, oldest, latest, batch_error=_not_an_instant("", "sentAt", batch_sent_at))
        return cls(received_at, oldest, latest, batch_skew=received_at - sent_at)


def _instant(message: Mapping[str, Any], prefix: str, window: _Window, errors: list[str]) -> datetime:
    """When the event happened, corrected for the client's clock by ``sentAt`` (see the module)."""
    name = "timestamp"
    raw = message.get("timestamp")
    if raw is None:
        name, raw = "originalTimestamp", message.get("originalTimestamp")
        if raw is None:
            return window.received_at
    at = parse_instant(raw)
    if at is None:
        errors.append(_not_an_instant(prefix, name, raw))
        return window.received_at
    sent_raw = message.get("sentAt")
    if sent_raw is None:
        if window.batch_error is not None:
            errors.append(window.batch_error)
            return window.received_at
        skew = window.batch_skew
    else:
        sent_at = parse_instant(sent_raw)
        if sent_at is None:
            errors.append(_not_an_instant(prefix, "sentAt", sent_raw))
            return window.received_at
        skew = window.received_at - sent_at
    if skew:
        at += skew
    if window.oldest < at <= window.latest:
        return at
    shown = f"{raw} ({at.isoformat()} once corrected for the client's clock by sentAt)" if skew else str(raw)
    if at > window.latest:
        ahead = _duration(window.latest - window.received_at)
        errors.append(_error(prefix, name, f"{shown} is more than {ahead} ahead of the server clock"))
    else:
        days = (window.received_at - window.oldest).days
        errors.append(_error(prefix, name, f"{shown} is older than the retention period ({days} days)"))
    return at


def _not_an_instant(prefix: str, name: str, raw: object) -> str:
    return _error(prefix, name, f"must be an ISO 8601 date-time, not {raw!r}")


def _event_record(message: Mapping[str, Any], type_: str, at: datetime) -> dict[str, Any]:
    """The Ingestor's form of a track, page or screen message."""
    properties = message.get("properties")
    if type_ == "track":
        event_type = message.get("event")
    else:
        event_type = EVENT_TYPES[type_]
        if properties is None or isinstance(properties, dict):
            named = {k: message[k] for k in ("name", "category") if message.get(k) is not None}
            properties = {**named, **properties} if properties else named
    return {
        "id": message.get("messageId"),
        "type": event_type,
        "userId": message.get("userId"),
        "anonymousId": message.get("anonymousId"),
        "at": at,
        "properties": properties,
    }


def _identifier(message: Mapping[str, Any], name: str, prefix: str, errors: list[str]) -> str | None:
    value = message.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        errors.append(_error(prefix, name, f"must be a string, not {describe(value)}"))
        return None
    text = str(value)
    if len(text) > MAX_ID:
        errors.append(_error(prefix, name, f"is longer than {MAX_ID} characters"))
        return None
    return text


def _unknown_type(type_: object) -> str:
    if type_ == "group":
        return "Tessera does not take group calls; send track, identify, alias, page or screen"
    if type_ is None:
        return f"a message needs a type: one of {', '.join(MESSAGE_TYPES)}"
    return f"unknown message type {type_!r}; expected one of {', '.join(MESSAGE_TYPES)}"


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, length in (("hours", 3600), ("minutes", 60)):
        if seconds >= length and seconds % length == 0:
            return f"{seconds // length} {unit}"
    return f"{seconds} seconds"


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _error(prefix: str, name: str, message: str) -> str:
    """``"batch[3].name: message"``; for a message's own fault (``name`` empty) ``"batch[3]: message"``."""
    path = _path(prefix, name) if name else prefix
    return f"{path}: {message}" if path else message


def _segment_errors(problems: Sequence[Problem], prefixes: list[str]) -> dict[int, list[str]]:
    """The Ingestor's problems (paths ``<index>.<field>`` in its names) by message, in Segment's names."""
    errors: dict[int, list[str]] = {}
    for problem in problems:
        index, _, rest = problem.path.partition(".")
        head, dot, tail = rest.partition(".")
        name = _SEGMENT_NAMES.get(head, head) + dot + tail
        errors.setdefault(int(index), []).append(_error(prefixes[int(index)], name, problem.message))
    return errors

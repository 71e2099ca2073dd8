"""An OpenFeature provider for Tessera flags, so that Python services beside Tessera (an email
renderer, a backend) evaluate the same flags, with the same buckets, through the standard API.

The provider does not evaluate anything itself: it asks the delivery API for
``viewer(viewer) { flags { key enabled variant reason } }`` and reads the answer, so every value,
bucket and reason is exactly the server's (spec/rules.md, Bucketing). One answer holds every flag
for one viewer, and it is kept for a short TTL per evaluation context: the N flags a request
evaluates for one viewer cost one HTTP call. Install it with ``pip install tessera[openfeature]``.

Nothing is raised into the caller; every failure becomes the caller's default value and an
OpenFeature error code:

    FLAG_NOT_FOUND     the flag does not exist in Tessera
    TYPE_MISMATCH      an integer, float or object evaluation (Tessera flags are on/off)
    INVALID_CONTEXT    a context attribute of the wrong type, or a viewer Tessera rejected (400)
    PARSE_ERROR        an answer that is not the delivery API's JSON
    GENERAL            Tessera is down or slow (connection error, timeout), refused the key
                       (401/403), or failed (5xx, a GraphQL error)
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import httpx
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType, Reason
from openfeature.provider import AbstractProvider, Metadata

__all__ = ["DEFAULT_CACHE_TTL_SECONDS", "DEFAULT_TIMEOUT_SECONDS", "TesseraProvider", "viewer_input"]

DEFAULT_TIMEOUT_SECONDS = 1.0
# Long enough to share one answer between the evaluations of one request, short enough that a kill
# switch reaches every service within a second of reaching Tessera.
DEFAULT_CACHE_TTL_SECONDS = 1.0
DEFAULT_CACHE_SIZE = 10_000

FLAGS_QUERY = (
    "query TesseraFlags($viewer: ViewerInput!) { viewer(viewer: $viewer) { flags { key enabled variant reason } } }"
)

# Context attributes that are ViewerInput fields of the same name (all strings on the wire).
_STRING_FIELDS = ("userId", "anonymousId", "country", "region", "city", "timezone", "locale")
_ENUM_FIELDS = ("device", "channel")  # DeviceType and Channel: upper-cased, so "mobile" is MOBILE
_ANONYMOUS = "anonymous"  # a boolean attribute: the targeting key is an anonymousId, not a userId
_ATTRIBUTES = "attributes"  # a mapping attribute: merged into the free-form attributes

_REASONS = {
    reason.value: reason
    for reason in (Reason.STATIC, Reason.TARGETING_MATCH, Reason.SPLIT, Reason.DISABLED, Reason.DEFAULT, Reason.ERROR)
}

T = TypeVar("T")


class _ContextError(ValueError):
    """An evaluation context that cannot be a ViewerInput."""


@dataclass(frozen=True, slots=True)
class _Flag:
    enabled: bool
    variant: str
    reason: Reason


@dataclass(frozen=True, slots=True)
class _Failure:
    code: ErrorCode
    message: str


_Answer = Mapping[str, _Flag] | _Failure


def viewer_input(context: EvaluationContext | None) -> dict[str, Any]:
    """The ViewerInput for an OpenFeature evaluation context.

    ``targeting_key`` is the ``userId``, or the ``anonymousId`` when the attribute ``anonymous`` is
    true; an explicit ``userId`` / ``anonymousId`` attribute wins over it. The attributes ``userId``,
    ``anonymousId``, ``device``, ``country``, ``region``, ``city``, ``at``, ``timezone``, ``locale``
    and ``channel`` are the fields of the same name (``device`` and ``channel`` are upper-cased;
    ``at`` is a datetime or an ISO 8601 string). Every other attribute goes into ``attributes``
    (a mapping attribute named ``attributes`` is merged into them). Raises ValueError for an
    attribute of the wrong type.
    """
    if context is None:
        return {}
    given = dict(context.attributes)
    viewer: dict[str, Any] = {}
    anonymous = given.pop(_ANONYMOUS, False)
    if not isinstance(anonymous, bool):
        raise _ContextError(f"attribute {_ANONYMOUS!r} must be a boolean, not {type(anonymous).__name__}")
    for name in _STRING_FIELDS:
        if name in given:
            viewer[name] = _string(name, given.pop(name), ids=name in ("userId", "anonymousId"))
    for name in _ENUM_FIELDS:
        if name in given:
            viewer[name] = _string(name, given.pop(name)).upper()
    if "at" in given:
        at = given.pop("at")
        if not isinstance(at, datetime | str):
            raise _ContextError(f"attribute 'at' must be a datetime or an ISO 8601 string, not {type(at).__name__}")
        viewer["at"] = at.isoformat() if isinstance(at, datetime) else at
    if context.targeting_key:
        viewer.setdefault("anonymousId" if anonymous else "userId", context.targeting_key)
    extra = given.pop(_ATTRIBUTES, {})
    if not isinstance(extra, Mapping):
        raise _ContextError(f"attribute {_ATTRIBUTES!r} must be a mapping, not {type(extra).__name__}")
    attributes = {**{str(k): _json(v) for k, v in extra.items()}, **{k: _json(v) for k, v in given.items()}}
    if attributes:
        viewer["attributes"] = attributes
    return viewer


def _string(name: str, value: object, *, ids: bool = False) -> str:
    # GraphQL's ID takes integers too; the other fields are strings only.
    if not isinstance(value, str) and (not ids or isinstance(value, bool) or not isinstance(value, int)):
        raise _ContextError(f"attribute {name!r} must be a string, not {type(value).__name__}")
    return str(value)


def _json(value: object) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_json(v) for v in value]
    return value


class _AnswerCache:
    """Answers by viewer, for ``ttl`` seconds of ``clock`` after they arrived; at most ``size`` of
    them (the oldest go first). Shared by the threads of a sync service, hence the lock."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float]) -> None:
        self._ttl, self._size, self._clock = ttl, size, clock
        self._answers: OrderedDict[str, tuple[float, _Answer]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> _Answer | None:
        if self._ttl <= 0:
            return None
        with self._lock:
            entry = self._answers.get(key)
            if entry is None:
                return None
            if self._clock() >= entry[0]:
                del self._answers[key]
                return None
            return entry[1]

    def put(self, key: str, answer: _Answer) -> None:
        if self._ttl <= 0:
            return
        with self._lock:
            self._answers.pop(key, None)
            self._answers[key] = (self._clock() + self._ttl, answer)
            while len(self._answers) > self._size:
                self._answers.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()


class TesseraProvider(AbstractProvider):
    """Tessera flags through OpenFeature: ``api.set_provider(TesseraProvider(url, key))``.

    ``url`` is Tessera's base URL (the provider posts to ``{url}/graphql``) and ``api_key`` a
    delivery key, sent as a Bearer token. ``timeout`` bounds each HTTP call, in seconds.
    ``cache_ttl`` is how long, in seconds of ``clock``, one answer (all flags for one evaluation
    context, or the failure to get them) is reused: 1 s by default, 0 to ask Tessera on every
    evaluation; ``cache_size`` caps the number of contexts kept.

    Pass ``client`` (sync evaluations) and ``async_client`` (async evaluations) to share connection
    pools or to wrap the transport; the caller owns and closes them. Without ``client`` the
    provider opens its own, closed by ``shutdown()``; without ``async_client`` async evaluations
    run the sync client in a worker thread.

    Boolean evaluations return ``enabled``; string evaluations return the variant (``"on"`` or
    ``"off"``); integer, float and object evaluations are type mismatches. The variant is
    ``"on"``/``"off"`` and the reason is Tessera's (STATIC, TARGETING_MATCH, SPLIT, DISABLED,
    DEFAULT). See :func:`viewer_input` for how the evaluation context becomes the viewer.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        cache_ttl: float = DEFAULT_CACHE_TTL_SECONDS,
        cache_size: int = DEFAULT_CACHE_SIZE,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if cache_ttl < 0:
            raise ValueError("cache_ttl must be 0 (no cache) or positive")
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._endpoint = url.rstrip("/") + "/graphql"
        # An empty User-Agent: Tessera infers the viewer's device from the request when the query
        # does not say, and this request is the service's, not the viewer's.
        self._headers = {"Authorization": f"Bearer {api_key}", "User-Agent": ""}
        self._timeout = timeout
        self._cache = _AnswerCache(cache_ttl, cache_size, clock)
        self._client = client
        self._async_client = async_client
        self._owned: httpx.Client | None = None
        self._owned_lock = threading.Lock()

    def get_metadata(self) -> Metadata:
        return Metadata(name="Tessera")

    def shutdown(self) -> None:
        """Close the provider's own HTTP client (not one passed in) and forget cached answers."""
        with self._owned_lock:
            owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()
        self._cache.clear()

    # -- resolution -------------------------------------------------------------------------------

    def resolve_boolean_details(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[bool]:
        return _boolean(flag_key, default_value, self._answer(evaluation_context))

    async def resolve_boolean_details_async(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[bool]:
        return _boolean(flag_key, default_value, await self._answer_async(evaluation_context))

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return _string_variant(flag_key, default_value, self._answer(evaluation_context))

    async def resolve_string_details_async(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return _string_variant(flag_key, default_value, await self._answer_async(evaluation_context))

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return _mismatch(flag_key, default_value, "integer", self._answer(evaluation_context))

    async def resolve_integer_details_async(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return _mismatch(flag_key, default_value, "integer", await self._answer_async(evaluation_context))

    def resolve_float_details(
        self, flag_key: str, default_value: float, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[float]:
        return _mismatch(flag_key, default_value, "float", self._answer(evaluation_context))

    async def resolve_float_details_async(
        self, flag_key: str, default_value: float, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[float]:
        return _mismatch(flag_key, default_value, "float", await self._answer_async(evaluation_context))

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        return _mismatch(flag_key, default_value, "object", self._answer(evaluation_context))

    async def resolve_object_details_async(
        self,
        flag_key: str,
        default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        return _mismatch(flag_key, default_value, "object", await self._answer_async(evaluation_context))

    # -- answers ------------------------------------------------------------------------------------

    def _answer(self, context: EvaluationContext | None) -> _Answer:
        try:
            viewer = viewer_input(context)
        except _ContextError as error:
            return _Failure(ErrorCode.INVALID_CONTEXT, str(error))
        key = _cache_key(viewer)
        answer = self._cache.get(key)
        if answer is None:
            answer = self._fetch(viewer)
            self._cache.put(key, answer)
        return answer

    async def _answer_async(self, context: EvaluationContext | None) -> _Answer:
        try:
            viewer = viewer_input(context)
        except _ContextError as error:
            return _Failure(ErrorCode.INVALID_CONTEXT, str(error))
        key = _cache_key(viewer)
        answer = self._cache.get(key)
        if answer is None:
            answer = await self._fetch_async(viewer)
            self._cache.put(key, answer)
        return answer

    def _fetch(self, viewer: Mapping[str, Any]) -> _Answer:
        try:
            response = self._sync_client().post(
                self._endpoint, json=_request_body(viewer), headers=self._headers, timeout=self._timeout
            )
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            return self._unreachable(error)
        return _read(response)

    async def _fetch_async(self, viewer: Mapping[str, Any]) -> _Answer:
        if self._async_client is None:
            return await asyncio.to_thread(self._fetch, viewer)
        try:
            response = await self._async_client.post(
                self._endpoint, json=_request_body(viewer), headers=self._headers, timeout=self._timeout
            )
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            return self._unreachable(error)
        return _read(response)

    def _sync_client(self) -> httpx.Client:
        if self._client is not None:
            return self._client
        with self._owned_lock:
            if self._owned is None:  # opened on first use, so that a provider shut down can be set again
                # No Nagle: httpx writes a request's headers and body separately, and a flag lookup
                # should not wait on the server's delayed ACK for its body.
                nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
                self._owned = httpx.Client(transport=httpx.HTTPTransport(socket_options=nodelay))
            return self._owned

    def _unreachable(self, error: Exception) -> _Failure:
        if isinstance(error, httpx.TimeoutException):
            return _Failure(ErrorCode.GENERAL, f"Tessera did not answer within {self._timeout:g} s ({self._endpoint})")
        return _Failure(ErrorCode.GENERAL, f"Tessera is unreachable at {self._endpoint}: {error!r}")


def _cache_key(viewer: Mapping[str, Any]) -> str:
    return json.dumps(viewer, sort_keys=True, separators=(",", ":"), default=str)


def _request_body(viewer: Mapping[str, Any]) -> dict[str, Any]:
    return {"query": FLAGS_QUERY, "variables": {"viewer": viewer}}


def _read(response: httpx.Response) -> _Answer:
    """The flags of a delivery API answer, or why there are none."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        return _Failure(ErrorCode.PARSE_ERROR, f"Tessera answered {status} with a body that is not JSON")
    errors = body.get("errors") if isinstance(body, dict) else None
    if errors:
        codes = {_error_code(e) for e in errors} if isinstance(errors, list) else {None}
        messages = "; ".join(str(e.get("message")) for e in errors if isinstance(e, dict)) or str(errors)
        if status in (401, 403):
            return _Failure(ErrorCode.GENERAL, f"Tessera refused the API key ({status}): {messages}")
        if status == 400 and codes == {"BAD_USER_INPUT"}:
            return _Failure(ErrorCode.INVALID_CONTEXT, f"Tessera rejected the viewer: {messages}")
        return _Failure(ErrorCode.GENERAL, f"Tessera answered {status}: {messages}")
    if status != 200:
        return _Failure(ErrorCode.GENERAL, f"Tessera answered {status}")
    try:
        flags = body["data"]["viewer"]["flags"]
        return {str(f["key"]): _flag(f) for f in flags}
    except (KeyError, TypeError, ValueError) as error:
        return _Failure(ErrorCode.PARSE_ERROR, f"Tessera's answer is not viewer {{ flags }}: {error!r}")


def _error_code(error: object) -> object:
    if not isinstance(error, dict):
        return None
    extensions = error.get("extensions")
    return extensions.get("code") if isinstance(extensions, dict) else None


def _flag(raw: Mapping[str, Any]) -> _Flag:
    enabled, variant, reason = raw["enabled"], raw.get("variant"), raw["reason"]
    if not isinstance(enabled, bool) or not isinstance(reason, str) or not isinstance(variant, str | None):
        raise ValueError(f"flag {raw.get('key')!r}: {raw!r}")
    return _Flag(enabled, variant or ("on" if enabled else "off"), _REASONS.get(reason, Reason.UNKNOWN))


def _error(default_value: T, code: ErrorCode, message: str) -> FlagResolutionDetails[T]:
    return FlagResolutionDetails(value=default_value, error_code=code, error_message=message, reason=Reason.ERROR)


def _lookup(flag_key: str, answer: _Answer) -> _Flag | _Failure:
    if isinstance(answer, _Failure):
        return answer
    flag = answer.get(flag_key)
    if flag is None:
        return _Failure(ErrorCode.FLAG_NOT_FOUND, f"Tessera has no flag {flag_key!r}")
    return flag


def _boolean(flag_key: str, default_value: bool, answer: _Answer) -> FlagResolutionDetails[bool]:
    flag = _lookup(flag_key, answer)
    if isinstance(flag, _Failure):
        return _error(default_value, flag.code, flag.message)
    return FlagResolutionDetails(value=flag.enabled, reason=flag.reason, variant=flag.variant)


def _string_variant(flag_key: str, default_value: str, answer: _Answer) -> FlagResolutionDetails[str]:
    flag = _lookup(flag_key, answer)
    if isinstance(flag, _Failure):
        return _error(default_value, flag.code, flag.message)
    return FlagResolutionDetails(value=flag.variant, reason=flag.reason, variant=flag.variant)


def _mismatch(flag_key: str, default_value: T, kind: str, answer: _Answer) -> FlagResolutionDetails[T]:
    # An unknown flag (or no answer at all) says so first: that is the more useful error.
    flag = _lookup(flag_key, answer)
    if isinstance(flag, _Failure):
        return _error(default_value, flag.code, flag.message)
    message = f"Tessera flag {flag_key!r} is a boolean (variant 'on'/'off'), not {kind}"
    return _error(default_value, ErrorCode.TYPE_MISMATCH, message)

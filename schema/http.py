"""GraphQL over HTTP for Starlette: authentication by API key (401/403 with a GraphQL-shaped body),
the typed context per request, and request errors as JSON with codes and the right status."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

import orjson
from cross_web import AsyncHTTPRequestAdapter, HTTPException
from graphql import GraphQLError, OperationType, VariableDefinitionNode, get_operation_ast, parse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.schema import BaseSchema
from strawberry.types import ExecutionResult

from schema.context import Context
from schema.errors import FORBIDDEN, UNAUTHENTICATED
from schema.ports import (
    AdminService,
    ExposureSink,
    HistorySource,
    Inference,
    Ingest,
    Principal,
    ProfileSource,
    SnapshotSource,
)

_STATUS_CODES = {401: UNAUTHENTICATED, 403: FORBIDDEN}


class Authenticator(Protocol):
    async def authenticate(self, raw_key: str) -> Principal | None: ...


class _RequestRejected(HTTPException):
    def __init__(self, status_code: int, reason: str, code: str) -> None:
        super().__init__(status_code, reason)
        self.code = code


def error_response(status: int, message: str, code: str) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="tessera"'} if status == 401 else None
    return JSONResponse({"errors": [{"message": message, "extensions": {"code": code}}]}, status, headers)


class TesseraGraphQL(GraphQL[Context, None]):
    """One GraphQL endpoint; ``scopes`` are the key scopes it admits."""

    def __init__(
        self,
        schema: BaseSchema,
        *,
        scopes: frozenset[str],
        authenticator: Authenticator,
        snapshots: SnapshotSource,
        inference: Inference,
        profiles: ProfileSource,
        history: HistorySource,
        clock: Callable[[], datetime],
        admin: AdminService | None = None,
        ingest: Ingest | None = None,
        exposures: ExposureSink | None = None,
        graphiql: bool = True,
        max_body_bytes: int = 1_000_000,
    ) -> None:
        super().__init__(schema, graphql_ide="graphiql" if graphiql else None)
        self._scopes = scopes
        self._authenticator = authenticator
        self._snapshots = snapshots
        self._inference = inference
        self._profiles = profiles
        self._history = history
        self._clock = clock
        self._admin = admin
        self._ingest = ingest
        self._exposures = exposures
        self._max_body_bytes = max_body_bytes

    def encode_json(self, data: object) -> bytes:
        return orjson.dumps(data)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope, receive)
            try:
                self._check_size(request)
                response = await self.run(request)
            except HTTPException as exc:
                code = getattr(exc, "code", None) or _STATUS_CODES.get(exc.status_code, "BAD_REQUEST")
                response = error_response(exc.status_code, exc.reason, code)
            await response(scope, receive, send)
        else:
            try:
                await super().__call__(scope, receive, send)
            except _RequestRejected as exc:
                # The handshake is accepted before the context (and so the key) is read: close with
                # graphql-transport-ws's 4401 Unauthorized / 4403 Forbidden instead of crashing.
                await send({"type": "websocket.close", "code": 4000 + exc.status_code, "reason": exc.reason})

    def _check_size(self, request: Request) -> None:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body_bytes:
            raise _RequestRejected(413, f"request body is larger than {self._max_body_bytes} bytes", "BAD_REQUEST")

    async def execute_single(
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        sub_response: Response,
        context: Context,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> ExecutionResult:
        # Strawberry would run a subscription sent over plain HTTP as if it were a query, and every
        # field would fail as an internal error: say where subscriptions are served instead.
        if _is_subscription(request_data.query, request_data.operation_name):
            raise _RequestRejected(
                400, "subscriptions are served over a WebSocket (graphql-transport-ws), not plain HTTP", "BAD_REQUEST"
            )
        return await super().execute_single(
            request=request,
            request_adapter=request_adapter,
            sub_response=sub_response,
            context=context,
            root_value=root_value,
            request_data=request_data,
        )

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        principal = await self._principal(request)
        return Context(
            request=request,
            response=response,
            principal=principal,
            snapshot=self._snapshots.current,
            now=self._clock(),
            inferred=self._inference.infer(request.headers),
            profiles=self._profiles,
            history=self._history,
            admin=self._admin,
            ingest=self._ingest,
            exposures=self._exposures,
        )

    async def _principal(self, request: Request | WebSocket) -> Principal:
        if isinstance(request, Request) and self.should_render_graphql_ide(self.request_adapter_class(request)):
            return Principal(scope="anonymous")  # the IDE page itself; its queries send a key
        authorization = request.headers.get("authorization", "")
        scheme, _, raw = authorization.partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            raise _RequestRejected(401, "missing API key: send 'Authorization: Bearer <key>'", UNAUTHENTICATED)
        principal = await self._authenticator.authenticate(raw.strip())
        if principal is None:
            raise _RequestRejected(401, "unknown or revoked API key", UNAUTHENTICATED)
        if principal.scope not in self._scopes:
            allowed = " or ".join(sorted(self._scopes))
            raise _RequestRejected(
                403, f"a {principal.scope} key cannot use this endpoint (needs {allowed})", FORBIDDEN
            )
        return principal

    async def process_result(self, request: Request, result: ExecutionResult) -> GraphQLHTTPResponse:
        response: GraphQLHTTPResponse = {"data": result.data}
        if result.errors:
            response["errors"] = [_format_error(e) for e in result.errors]
        if result.extensions:
            response["extensions"] = result.extensions
        return response

    def create_response(
        self, response_data: GraphQLHTTPResponse | list[GraphQLHTTPResponse], sub_response: Response
    ) -> Response:
        response = super().create_response(response_data, sub_response)
        errors: Any = response_data.get("errors") if isinstance(response_data, dict) else None
        if isinstance(response_data, dict) and errors and _nothing_returned(response_data.get("data")):
            codes = {e.get("extensions", {}).get("code") for e in errors}
            if codes <= {"GRAPHQL_PARSE_FAILED", "GRAPHQL_VALIDATION_FAILED", "BAD_USER_INPUT"}:
                response.status_code = 400  # a request error (GraphQL over HTTP): nothing was executed
        return response


def _is_subscription(query: str | None, operation_name: str | None) -> bool:
    if not query or "subscription" not in query:  # cheap: a document without the word holds none
        return False
    try:
        document = parse(query)
    except GraphQLError:
        return False  # the normal path reports it as GRAPHQL_PARSE_FAILED
    operation = get_operation_ast(document, operation_name)
    return operation is not None and operation.operation is OperationType.SUBSCRIPTION


def _nothing_returned(data: object) -> bool:
    # A nullable field whose argument was rejected answers {"placement": null}, not a null `data`:
    # when no field returned anything, the request as a whole was the error.
    return data is None or (isinstance(data, Mapping) and all(value is None for value in data.values()))


def _format_error(error: GraphQLError) -> Mapping[str, Any]:
    formatted: dict[str, Any] = dict(error.formatted)
    extensions = dict(formatted.get("extensions") or {})
    if "code" not in extensions:
        if error.path is None and any(isinstance(node, VariableDefinitionNode) for node in error.nodes or ()):
            # A variable's value does not fit its type: the request is wrong, not the server.
            extensions["code"] = "BAD_USER_INPUT"
        elif error.original_error is None and error.message.startswith("Syntax Error"):
            extensions["code"] = "GRAPHQL_PARSE_FAILED"
        elif error.original_error is None and error.path is None:
            extensions["code"] = "GRAPHQL_VALIDATION_FAILED"
        else:
            extensions["code"] = "INTERNAL_SERVER_ERROR"
    formatted["extensions"] = extensions
    return formatted

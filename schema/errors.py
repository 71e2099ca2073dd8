"""Error codes that GraphQL clients see in ``extensions.code``, and helpers that raise them.

BAD_USER_INPUT      an argument is invalid (its ``path`` names which part)
UNAUTHENTICATED     no API key, or an unknown or revoked one (HTTP 401)
FORBIDDEN           the key's scope does not allow this (HTTP 403)
NOT_FOUND           the entity named does not exist (admin)
CONFLICT            creating something that exists (admin)
NOT_IMPLEMENTED     a capability that this release does not have yet
GRAPHQL_PARSE_FAILED / GRAPHQL_VALIDATION_FAILED   the document itself is wrong (HTTP 400)
BAD_REQUEST         the HTTP request is not a GraphQL request (HTTP 400, 405, 413, 415)
"""

from __future__ import annotations

from graphql import GraphQLError

BAD_USER_INPUT = "BAD_USER_INPUT"
UNAUTHENTICATED = "UNAUTHENTICATED"
FORBIDDEN = "FORBIDDEN"
NOT_FOUND = "NOT_FOUND"
CONFLICT = "CONFLICT"
NOT_IMPLEMENTED = "NOT_IMPLEMENTED"


def user_error(message: str, path: str | None = None) -> GraphQLError:
    extensions: dict[str, object] = {"code": BAD_USER_INPUT}
    if path:
        extensions["argumentPath"] = path
    return GraphQLError(f"{path}: {message}" if path else message, extensions=extensions)


def not_implemented(what: str) -> GraphQLError:
    return GraphQLError(f"{what} is not implemented yet", extensions={"code": NOT_IMPLEMENTED})

"""Webhooks that other systems call. ``POST /hooks/profiles/{id}/invalidate`` (admin key): a profile
changed in the upstream profile service, so every instance drops its cached copy."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from schema.errors import FORBIDDEN, UNAUTHENTICATED
from schema.http import Authenticator, error_response
from schema.ports import Bus
from server.profiles import PROFILES_CHANNEL, ProfileStore

log = logging.getLogger(__name__)

# Redis (the shared cache and the bus) did not take the invalidation: the caller should retry.
UNAVAILABLE = "SERVICE_UNAVAILABLE"
BAD_REQUEST = "BAD_REQUEST"


def profile_invalidation_hook(authenticator: Authenticator, profiles: ProfileStore, bus: Bus) -> Route:
    """The route of ``POST /hooks/profiles/{id}/invalidate``: drops this instance's copy of the
    profile and the Redis copy, and tells the other instances on the bus. Answers
    ``{"invalidated": id}``; 401/403 without an admin key, 503 when Redis did not take it."""

    async def invalidate(request: Request) -> Response:
        rejected = await _admin_only(authenticator, request)
        if rejected is not None:
            return rejected
        user_id: str = request.path_params["id"]
        if not user_id:
            return error_response(400, "the URL names no profile: /hooks/profiles/{id}/invalidate", BAD_REQUEST)
        profiles.invalidate(user_id)
        try:
            await profiles.invalidate_shared([user_id])
            await bus.publish(PROFILES_CHANNEL, {"userIds": [user_id]})
        except Exception:
            log.warning("could not invalidate profile %r everywhere", user_id, exc_info=True)
            return error_response(503, "the invalidation could not be shared with every instance; retry", UNAVAILABLE)
        return JSONResponse({"invalidated": user_id})

    # `path`, not `str`: a user id may hold a slash (sent as %2F, which arrives decoded).
    return Route("/hooks/profiles/{id:path}/invalidate", invalidate, methods=["POST"])


async def _admin_only(authenticator: Authenticator, request: Request) -> Response | None:
    """None for an admin key; else the 401 or 403 answer."""
    scheme, _, raw = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        return error_response(401, "missing API key: send 'Authorization: Bearer <key>'", UNAUTHENTICATED)
    principal = await authenticator.authenticate(raw.strip())
    if principal is None:
        return error_response(401, "unknown or revoked API key", UNAUTHENTICATED)
    if principal.scope != "admin":
        return error_response(403, f"a {principal.scope} key cannot use this endpoint (needs admin)", FORBIDDEN)
    return None

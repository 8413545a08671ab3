"""`POST /api/v1/sessions/{id}/activity` through the activity lane (services/activity_lane.py)
when it can answer, and through the app as any other request when it cannot.

The lane sits in front of FastAPI's routing, dependencies and body handling, about a third of
what an activity report cost there.  It takes only a request the route would take: the exact
path, a bearer token and a JSON body of at most `MAX_BODY` bytes.  Every other request, and every
one the lane gives back, goes on to the app with its body replayed unchanged; the route
(api/sessions.py) stays the reference, and the one in the OpenAPI schema.
"""

from __future__ import annotations

import re

from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from offload.core.schemas import API_PREFIX
from offload.server.api.responses import model_response
from offload.server.context import ServerContext
from offload.server.services import activity_lane

MAX_BODY = 4096  # a report is about 50 bytes; anything larger takes the full path
# The route's pattern is Starlette's `{session_id}`, [^/]+ of the decoded path.  The lane takes
# only the characters a session id is made of (`ses_` + hex): any other path, which names no
# session, gets the full path's answer, and cannot make a batch's statement fail for the rest.
_ACTIVITY_PATH = re.compile(re.escape(API_PREFIX) + r"/sessions/([A-Za-z0-9_-]{1,64})/activity")


def _session_id(scope: Scope) -> str | None:
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    match = _ACTIVITY_PATH.fullmatch(scope["path"])
    return match.group(1) if match else None


def _bearer(headers: Headers) -> str | None:
    """The token of `Authorization: Bearer …`, read as FastAPI's HTTPBearer reads it."""
    scheme, token = get_authorization_scheme_param(headers.get("authorization"))
    return token if scheme.lower() == "bearer" and token else None


def _json(headers: Headers) -> bool:
    return headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"


async def _read_body(receive: Receive) -> tuple[list[Message], bytes | None]:
    """The messages read, to replay, and the whole body (None: longer than MAX_BODY, or the
    client went away)."""
    messages: list[Message] = []
    body = b""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            return messages, None
        if not message.get("more_body", False):
            return messages, body


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


class ActivityLane:
    """ASGI middleware: activity reports the lane can answer, answered there."""

    def __init__(self, app: ASGIApp, context: ServerContext) -> None:
        self.app = app
        self.context = context
        self.batches = activity_lane.lane_batches(context)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session_id = _session_id(scope)
        if session_id is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        token = _bearer(headers)
        if token is None or not _json(headers):
            await self.app(scope, receive, send)
            return
        messages, body = await _read_body(receive)
        info = None
        if body is not None:
            info = await activity_lane.try_report(
                self.context, self.batches, token, session_id, body
            )
        self.context.lane_counts.count(info is not None)
        if info is not None:
            await model_response(info)(scope, receive, send)
            return
        await self.app(scope, _replaying(messages, receive), send)

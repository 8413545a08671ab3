"""Session routes (user token): a user sees and acts on their own sessions only."""

from __future__ import annotations

from fastapi import APIRouter, Response

from offload.core import schemas as s
from offload.server.api.deps import Context, CurrentUser
from offload.server.api.responses import model_response
from offload.server.services import sessions

router = APIRouter(prefix="/sessions", tags=["sessions"])


@router.post("")
async def create_session(ctx: Context, user: CurrentUser, body: s.SessionCreate) -> s.SessionInfo:
    return await sessions.create_session(ctx, user, body)


# Declared before /{session_id} so that "current" is not taken for an id.
@router.get("/current")
async def current_session(ctx: Context, user: CurrentUser) -> s.SessionInfo:
    return await sessions.current_session(ctx, user)


@router.get("/{session_id}")
async def get_session(ctx: Context, user: CurrentUser, session_id: str) -> s.SessionInfo:
    return await sessions.get_session(ctx, user, session_id)


@router.post("/{session_id}/certificate", response_model=s.SessionInfo)
async def renew_certificate(
    ctx: Context, user: CurrentUser, session_id: str, body: s.CertificateRequest
) -> Response:
    info = await sessions.renew_certificate(ctx, user, session_id, body.client_public_key)
    return model_response(info)


@router.post("/{session_id}/stop")
async def stop_session(ctx: Context, user: CurrentUser, session_id: str) -> s.SessionInfo:
    return await sessions.stop_session(ctx, user, session_id)


@router.post("/{session_id}/activity", response_model=s.SessionInfo)
async def report_activity(
    ctx: Context, user: CurrentUser, session_id: str, body: s.ActivityReport
) -> Response:
    return model_response(await sessions.report_activity(ctx, user, session_id, body))


@router.post("/{session_id}/prompt")
async def answer_prompt(
    ctx: Context, user: CurrentUser, session_id: str, body: s.PromptAnswer
) -> s.SessionInfo:
    return await sessions.answer_prompt(ctx, user, session_id, body)


@router.post("/{session_id}/idle")
async def idle_now(ctx: Context, user: CurrentUser, session_id: str) -> s.SessionInfo:
    return await sessions.idle_now(ctx, user, session_id)

"""Runner routes (runner token): a runner acts on its own record and its own sessions only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from offload.core import schemas as s
from offload.server.api.deps import Context, CurrentRunner
from offload.server.api.responses import model_response
from offload.server.services import runners

router = APIRouter(prefix="/runners", tags=["runners"])


@router.post("/register")
async def register(
    ctx: Context, runner: CurrentRunner, body: s.RunnerRegister
) -> s.RunnerRegistered:
    return await runners.register_runner(ctx, runner, body)


@router.post("/{runner_id}/heartbeat", response_model=s.RunnerDesired)
async def heartbeat(
    ctx: Context,
    runner: CurrentRunner,
    runner_id: str,
    body: s.RunnerHeartbeat,
    wait: Annotated[
        float,
        Query(description="long poll: seconds to wait for a change (clamped to 0..60)"),
    ] = 0.0,
) -> Response:
    return model_response(await runners.heartbeat(ctx, runner, runner_id, body, wait))


@router.get("/{runner_id}/sessions/{session_id}")
async def assigned_session(
    ctx: Context, runner: CurrentRunner, runner_id: str, session_id: str
) -> s.AssignedSession:
    return await runners.assigned_session(ctx, runner, runner_id, session_id)


@router.post("/{runner_id}/sessions/{session_id}/ready")
async def session_ready(
    ctx: Context, runner: CurrentRunner, runner_id: str, session_id: str, body: s.EnvironmentReady
) -> s.AssignedSession:
    return await runners.session_ready(ctx, runner, runner_id, session_id, body.env_id)

"""Device login routes (no auth; RFC 8628): the CLI gets a code pair, then polls for its token.

The token endpoint answers errors the RFC's way (400 with `{"error": …}`) rather than with
`ErrorBody`: `authorization_pending` and `slow_down` are not failures, they tell the client to
keep polling.  Both endpoints count against the per-address device-login limit; beyond it they
answer 429 with `ErrorBody` and `Retry-After` (the CLI waits that long).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from offload.core import schemas as s
from offload.server.api.deps import Context
from offload.server.services import device_codes
from offload.server.services.throttle import Limits

router = APIRouter(prefix="/device", tags=["device login"])

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def verification_uri(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/device"


@router.post("/code")
async def device_code(
    ctx: Context,
    request: Request,
    body: Annotated[s.DeviceCodeRequest | None, Body()] = None,
) -> s.DeviceCodeResponse:
    client_name = body.client_name if body else ""
    limits = Limits.from_settings(ctx.settings)
    started = await ctx.db.run(device_codes.start, client_name, ctx.now(), limits)
    uri = verification_uri(request)
    return s.DeviceCodeResponse(
        device_code=started.device_code,
        user_code=started.user_code,
        verification_uri=uri,
        verification_uri_complete=f"{uri}?code={started.user_code}",
        expires_in=int(device_codes.LIFETIME.total_seconds()),
        interval=device_codes.POLL_INTERVAL_S,
    )


@router.post(
    "/token",
    response_model=s.DeviceTokenResponse,
    responses={400: {"model": s.DeviceTokenError}},
)
async def device_token(ctx: Context, body: s.DeviceTokenRequest) -> JSONResponse:
    if body.grant_type != s.DEVICE_GRANT_TYPE:
        error = s.DeviceTokenError(
            error="unsupported_grant_type",
            error_description=f"Only grant_type {s.DEVICE_GRANT_TYPE} is served here.",
        )
        return JSONResponse(error.model_dump(), status_code=400, headers=_NO_STORE)
    limits = Limits.from_settings(ctx.settings)
    result = await ctx.db.run(device_codes.poll, body.device_code, ctx.now(), limits)
    if result.token is not None:
        return JSONResponse(result.token.model_dump(mode="json"), headers=_NO_STORE)
    assert result.error is not None
    error = s.DeviceTokenError(
        error=result.error.value,
        error_description=device_codes.POLL_DESCRIPTIONS[result.error],
    )
    return JSONResponse(error.model_dump(), status_code=400, headers=_NO_STORE)

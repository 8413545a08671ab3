"""Dependencies of the routers: the process context and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from offload.server.context import ServerContext
from offload.server.services import auth
from offload.server.services.tokens import AuthRunner, AuthUser

# auto_error=False: a missing token becomes our NotAuthenticated (with its fix), not FastAPI's 403.
_user_bearer = HTTPBearer(
    auto_error=False, scheme_name="UserToken", description="User API token (off_u_…)"
)
_runner_bearer = HTTPBearer(
    auto_error=False, scheme_name="RunnerToken", description="Runner token (off_r_…)"
)
Credentials = HTTPAuthorizationCredentials | None


async def get_context(request: Request) -> ServerContext:
    # async: FastAPI runs a plain `def` dependency on a worker thread, a thread hop per request
    # for one attribute lookup.
    context: ServerContext = request.app.state.context
    return context


Context = Annotated[ServerContext, Depends(get_context)]


async def _current_user(
    ctx: Context, credentials: Annotated[Credentials, Depends(_user_bearer)]
) -> AuthUser:
    return await auth.authenticate_user(ctx, credentials.credentials if credentials else None)


async def _current_runner(
    ctx: Context, credentials: Annotated[Credentials, Depends(_runner_bearer)]
) -> AuthRunner:
    return await auth.authenticate_runner(ctx, credentials.credentials if credentials else None)


CurrentUser = Annotated[AuthUser, Depends(_current_user)]
CurrentRunner = Annotated[AuthRunner, Depends(_current_runner)]

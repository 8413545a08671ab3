"""User routes: login, who am I, my organisations, server version."""

from __future__ import annotations

from fastapi import APIRouter

import offload
from offload.core import schemas as s
from offload.server.api.deps import Context, CurrentUser
from offload.server.services import accounts

router = APIRouter(tags=["users"])


@router.post("/auth/login")
async def login(ctx: Context, body: s.LoginRequest) -> s.TokenResponse:
    return await accounts.login(ctx, body)


@router.get("/me")
async def me(ctx: Context, user: CurrentUser) -> s.UserInfo:
    return await ctx.db.read(accounts.me, user)


@router.get("/accounts")
async def list_accounts(ctx: Context, user: CurrentUser) -> s.AccountsResponse:
    return await ctx.db.read(accounts.accounts, user)


@router.get("/version")
async def version(ctx: Context) -> s.VersionInfo:
    return s.VersionInfo(
        server_version=offload.__version__,
        min_client_version=ctx.settings.min_client_version,
    )

"""User routes: login, who am I, my organisations, my settings, my usage, server version."""

from __future__ import annotations

from fastapi import APIRouter

import offload
from offload.core import schemas as s
from offload.server.api.deps import Context, CurrentUser
from offload.server.services import accounts, org_settings, usage, web_auth
from offload.server.services.lifecycle import Rules

router = APIRouter(tags=["users"])


@router.post("/auth/login")
async def login(ctx: Context, body: s.LoginRequest) -> s.TokenResponse:
    return await accounts.login(ctx, body)


@router.post("/me/password")
async def change_password(ctx: Context, user: CurrentUser, body: s.PasswordChange) -> s.UserInfo:
    """Set a new password (the current one is checked like a sign-in); every dashboard session
    of the user ends.  API tokens stay valid: revoke them in the dashboard if one leaked."""
    await web_auth.change_password(ctx, user, body, via="api")
    return await ctx.db.read(accounts.me, user)


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


@router.get("/me/settings")
async def my_settings(ctx: Context, user: CurrentUser) -> s.UserSettings:
    return await ctx.db.read(org_settings.user_settings, user)


@router.put("/me/settings")
async def update_my_settings(
    ctx: Context, user: CurrentUser, body: s.UserSettingsUpdate
) -> s.UserSettings:
    return await ctx.db.run(
        org_settings.update_user_settings, user, body, ctx.settings.default_idle_timeout_s
    )


@router.get("/usage")
async def my_usage(ctx: Context, user: CurrentUser) -> s.UsageReport:
    return await ctx.db.read(usage.user_report, user, ctx.now(), Rules.from_settings(ctx.settings))

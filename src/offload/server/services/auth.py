"""Who is calling: a user (API token) or a runner (runner token)."""

from __future__ import annotations

from offload.core.errors import NotAuthenticated
from offload.server.context import ServerContext
from offload.server.services import tokens
from offload.server.services.tokens import AuthRunner, AuthUser


def _require(token: str | None, kind: str, example: str) -> str:
    if not token:
        raise NotAuthenticated(
            f"No {kind} was sent.",
            f"Send `Authorization: Bearer {example}`; "
            + (
                "`offload login` stores one for the CLI."
                if kind == "API token"
                else "`offload up` or an administrator issues runner tokens."
            ),
        )
    return token


async def authenticate_user(ctx: ServerContext, token: str | None) -> AuthUser:
    check = await ctx.db.read(
        tokens.check_user_token, _require(token, "API token", "off_u_…"), ctx.now()
    )
    if check.touch_due:  # a separate, rare write: plain requests stay read-only
        await ctx.db.run_row_locked(tokens.touch_api_token, check.token_id, ctx.now())
    return check.user


async def authenticate_runner(ctx: ServerContext, token: str | None) -> AuthRunner:
    return await ctx.db.read(tokens.authenticate_runner, _require(token, "runner token", "off_r_…"))

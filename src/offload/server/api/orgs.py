"""Organisation routes (user token): members read settings, billing and usage; owners change them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from offload.core import schemas as s
from offload.server.api.deps import Context, CurrentUser
from offload.server.services import audit, org_members, orgs
from offload.server.services.throttle import Limits

router = APIRouter(prefix="/orgs", tags=["organisations"])


@router.get("/{org}/settings")
async def get_settings(ctx: Context, user: CurrentUser, org: str) -> s.OrgSettings:
    return await ctx.db.read(orgs.get_settings, user, org)


@router.put("/{org}/settings")
async def put_settings(
    ctx: Context, user: CurrentUser, org: str, body: s.OrgSettingsUpdate
) -> s.OrgSettings:
    return await ctx.db.run(orgs.put_settings, user, org, body, ctx.now())


@router.get("/{org}/billing")
async def get_billing(ctx: Context, user: CurrentUser, org: str) -> s.OrgBilling:
    return await ctx.db.read(orgs.get_billing, user, org, ctx.now())


@router.put("/{org}/billing")
async def put_billing(
    ctx: Context, user: CurrentUser, org: str, body: s.OrgBillingUpdate
) -> s.OrgBilling:
    return await ctx.db.run(orgs.put_billing, user, org, body, ctx.now())


@router.post("/{org}/billing/trial-credits")
async def grant_trial_credit(
    ctx: Context, user: CurrentUser, org: str, body: s.TrialCreditGrant
) -> s.OrgBilling:
    return await ctx.db.run(orgs.grant_trial_credit, user, org, body, ctx.now())


@router.get("/{org}/audit")
async def get_audit(
    ctx: Context,
    user: CurrentUser,
    org: str,
    limit: Annotated[int, Query(ge=1, le=audit.PAGE_MAX)] = 100,
    # An event id: an INTEGER column, 32-bit on PostgreSQL (a larger `before` was a 500 there).
    before: Annotated[int | None, Query(ge=1, le=s.MAX_INT)] = None,
    action: s.AuditAction | None = None,
) -> s.AuditLog:
    """Security-relevant actions in the organisation and of its members, newest first (owners)."""
    return await ctx.db.read(org_members.owner_audit, user, org, limit, before, action)


@router.post("/{org}/members/{username}/unlock")
async def unlock_member(ctx: Context, user: CurrentUser, org: str, username: str) -> s.Lockout:
    """Clear a member's sign-in lockout after too many failed passwords (owners)."""
    limits = Limits.from_settings(ctx.settings)
    return await ctx.db.run(org_members.owner_unlock, user, org, username, limits, ctx.now())


@router.get("/{org}/usage")
async def get_usage(ctx: Context, user: CurrentUser, org: str) -> s.OrgUsage:
    return await ctx.db.read(orgs.get_usage, user, org, ctx.now())

"""Organisation routes (user token): members read settings, billing and usage; owners change them."""

from __future__ import annotations

from fastapi import APIRouter

from offload.core import schemas as s
from offload.server.api.deps import Context, CurrentUser
from offload.server.services import orgs

router = APIRouter(prefix="/orgs", tags=["organisations"])


@router.get("/{org}/settings")
async def get_settings(ctx: Context, user: CurrentUser, org: str) -> s.OrgSettings:
    return await ctx.db.read(orgs.get_settings, user, org)


@router.put("/{org}/settings")
async def put_settings(
    ctx: Context, user: CurrentUser, org: str, body: s.OrgSettingsUpdate
) -> s.OrgSettings:
    return await ctx.db.run(orgs.put_settings, user, org, body)


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


@router.get("/{org}/usage")
async def get_usage(ctx: Context, user: CurrentUser, org: str) -> s.OrgUsage:
    return await ctx.db.read(orgs.get_usage, user, org, ctx.now())

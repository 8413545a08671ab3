"""Organisation pages, for owners: activity (with CSV export), billing, settings and members,
and the audit log.

Members reach none of them: each answers 403 with a page naming the owners to ask.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse

from offload.core import schemas as s
from offload.core.errors import InvalidInput
from offload.server.api.deps import Context
from offload.server.services import org_activity, org_members, org_settings, orgs
from offload.server.services.throttle import Limits
from offload.server.web import charts
from offload.server.web.routing import (
    CurrentViewer,
    FormViewer,
    WebRoute,
    page,
    redirect,
)

router = APIRouter(prefix="/orgs/{org}", route_class=WebRoute, include_in_schema=False)

DateParam = Annotated[str | None, Query(alias="from", max_length=10)]
ToParam = Annotated[str | None, Query(alias="to", max_length=10)]


# ---- activity -----------------------------------------------------------------------------------


@router.get("/activity")
async def activity(
    ctx: Context,
    request: Request,
    viewer: CurrentViewer,
    org: str,
    first: DateParam = None,
    last: ToParam = None,
) -> HTMLResponse:
    found = await ctx.db.read(org_activity.owner_activity, viewer.user, org, first, last, ctx.now())
    chart = charts.hours_per_day(found.daily, f"Billed time per day in {org} (UTC)")
    return page(request, "org_activity.html", org=org, found=found, daily_chart=chart)


@router.get("/activity.csv")
async def activity_csv(
    ctx: Context,
    viewer: CurrentViewer,
    org: str,
    first: DateParam = None,
    last: ToParam = None,
) -> Response:
    period, found = await ctx.db.read(
        org_activity.owner_sessions, viewer.user, org, first, last, ctx.now()
    )
    filename = f"offload-{org}-sessions-{period.first}-{period.last}.csv"
    return StreamingResponse(
        org_activity.csv_lines(found),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        },
    )


# ---- billing ------------------------------------------------------------------------------------


@router.get("/billing")
async def billing_page(
    ctx: Context, request: Request, viewer: CurrentViewer, org: str
) -> HTMLResponse:
    found = await ctx.db.read(org_activity.owner_billing, viewer.user, org, ctx.now())
    chart = (
        charts.spend_per_day(found.days, "On-demand spend so far this month")
        if found.month.metered
        else charts.minutes_per_day(found.days, "Minutes used per day this month")
    )
    return page(
        request,
        "billing.html",
        org=org,
        found=found,
        spend_chart=chart,
        instance_types=list(s.InstanceType),
    )


def _cents(text: str, what: str) -> int | None:
    """Dollars as typed ('250', '250.50') to cents; empty means none."""
    text = text.strip().lstrip("$").replace(",", "")
    if not text:
        return None
    try:
        value = round(float(text) * 100)
    except ValueError:
        raise InvalidInput(f"{what} must be an amount in dollars, not {text[:20]!r}.") from None
    if value < 0:
        raise InvalidInput(f"{what} cannot be negative.", "Give 0 or more.")
    if value > s.MAX_INT:
        raise InvalidInput(f"{what} is too large.", f"Give at most ${s.MAX_INT // 100:,}.")
    return value


def _minutes(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or int(text) > s.MAX_INT:
        raise InvalidInput(
            f"Committed minutes must be a whole number up to {s.MAX_INT:,}, not {text[:20]!r}.",
            "Leave it empty for an unmetered organisation.",
        )
    return int(text)


def _rate(text: str, instance_type: s.InstanceType) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise InvalidInput(
            f"The {instance_type.value} rate must be a number of cents per minute.",
            "e.g. 1 or 0.5",
        ) from None


@router.post("/billing")
async def save_billing(
    ctx: Context,
    viewer: FormViewer,
    org: str,
    committed_minutes: Annotated[str, Form(max_length=12)] = "",
    on_demand: Annotated[str, Form(max_length=3)] = "",
    monthly_limit: Annotated[str, Form(max_length=16)] = "",
    rate_standard: Annotated[str, Form(max_length=12)] = "",
    rate_gpu: Annotated[str, Form(max_length=12)] = "",
) -> Response:
    rates = {
        t: _rate(text, t)
        for t, text in ((s.InstanceType.STANDARD, rate_standard), (s.InstanceType.GPU, rate_gpu))
        if text.strip()
    }
    update = s.OrgBillingUpdate(
        committed_minutes_per_month=_minutes(committed_minutes),
        on_demand_enabled=on_demand == "on",
        on_demand_limit_cents=_cents(monthly_limit, "The monthly limit"),
        rates_cents_per_minute=rates or None,
    )
    await ctx.db.run(orgs.put_billing, viewer.user, org, update, ctx.now())
    return redirect(f"/orgs/{org}/billing?notice=saved")


# ---- settings and members -----------------------------------------------------------------------


async def _settings_page(
    ctx: Context,
    request: Request,
    viewer: CurrentViewer,
    org: str,
    invited: org_members.Invited | None = None,
) -> HTMLResponse:
    limits = Limits.from_settings(ctx.settings)
    found = await ctx.db.read(org_members.owner_settings, viewer.user, org, limits, ctx.now())
    return page(
        request,
        "org_settings.html",
        org=org,
        current=found.settings,
        members=found.members,
        invited=invited,
        access_states=list(s.OffloadAccess),
        fair_use_policies=list(s.FairUsePolicy),
        roles=list(s.Role),
        idle_min=org_settings.IDLE_TIMEOUT_MIN_S,
        idle_max=org_settings.IDLE_TIMEOUT_MAX_S,
    )


@router.get("/settings")
async def settings_page(
    ctx: Context, request: Request, viewer: CurrentViewer, org: str
) -> HTMLResponse:
    return await _settings_page(ctx, request, viewer, org)


@router.post("/settings")
async def save_settings(
    ctx: Context,
    viewer: FormViewer,
    org: str,
    offload_access: Annotated[s.OffloadAccess, Form()],
    fair_use_policy: Annotated[s.FairUsePolicy, Form()],
    idle_timeout_default_s: Annotated[str, Form(max_length=10)] = "",
    idle_timeout_locked: Annotated[str, Form(max_length=3)] = "",
    # `gpu_fields` marks a form with the GPU fields (one from before them changes nothing
    # there); an empty limit is no cap.
    gpu_fields: Annotated[str, Form(max_length=1)] = "",
    gpu_sessions: Annotated[Literal["allow", "deny"], Form()] = "allow",
    gpu_session_limit: Annotated[str, Form(max_length=6)] = "",
) -> Response:
    text = idle_timeout_default_s.strip()
    if text and not text.isdigit():
        raise InvalidInput(
            f"The idle timeout must be a number of seconds, not {text[:20]!r}.",
            f"Choose {org_settings.IDLE_TIMEOUT_RANGE}, or leave it empty for the server's default.",
        )
    update = s.OrgSettingsUpdate(
        offload_access=offload_access,
        idle_timeout_default_s=int(text) if text else None,
        idle_timeout_locked=idle_timeout_locked == "on",
        fair_use_policy=fair_use_policy,
    )
    if gpu_fields:
        update.gpu_sessions_allowed = gpu_sessions == "allow"
        update.gpu_session_limit = _gpu_limit(gpu_session_limit)
    await ctx.db.run(orgs.put_settings, viewer.user, org, update, ctx.now())
    return redirect(f"/orgs/{org}/settings?notice=saved")


def _gpu_limit(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or int(text) > 10_000:
        raise InvalidInput(
            f"GPU sessions at once must be a whole number up to 10,000, not {text[:20]!r}.",
            "Leave it empty for no limit, or give 0 to hold every new GPU session back.",
        )
    return int(text)


@router.post("/members")
async def invite_member(
    ctx: Context,
    request: Request,
    viewer: FormViewer,
    org: str,
    username: Annotated[str, Form(min_length=1, max_length=64)],
    role: Annotated[s.Role, Form()] = s.Role.MEMBER,
) -> HTMLResponse:
    """Shows a new account's generated password once, in this response only."""
    invited = await ctx.db.run(
        org_members.owner_invite, viewer.user, org, username, role, ctx.now()
    )
    return await _settings_page(ctx, request, viewer, org, invited=invited)


@router.post("/members/{username}/role")
async def change_role(
    ctx: Context,
    viewer: FormViewer,
    org: str,
    username: str,
    role: Annotated[s.Role, Form()],
) -> Response:
    await ctx.db.run(org_members.owner_set_role, viewer.user, org, username, role, ctx.now())
    return redirect(f"/orgs/{org}/settings?notice=role-changed")


@router.post("/members/{username}/unlock")
async def unlock_member(ctx: Context, viewer: FormViewer, org: str, username: str) -> Response:
    limits = Limits.from_settings(ctx.settings)
    await ctx.db.run(org_members.owner_unlock, viewer.user, org, username, limits, ctx.now())
    return redirect(f"/orgs/{org}/settings?notice=unlocked")


# ---- audit log ----------------------------------------------------------------------------------


@router.get("/audit")
async def audit_page(
    ctx: Context,
    request: Request,
    viewer: CurrentViewer,
    org: str,
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    action: s.AuditAction | None = None,
) -> HTMLResponse:
    log = await ctx.db.read(org_members.owner_audit, viewer.user, org, 100, before, action)
    return page(
        request, "org_audit.html", org=org, log=log, action=action, actions=list(s.AuditAction)
    )


@router.post("/members/{username}/remove")
async def remove_member(ctx: Context, viewer: FormViewer, org: str, username: str) -> Response:
    await ctx.db.run(org_members.owner_remove, viewer.user, org, username, ctx.now())
    return redirect(f"/orgs/{org}/settings?notice=member-removed")

"""A user's own pages: overview, recent activity, prompt answers, personal settings, tokens."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.responses import HTMLResponse

from offload.core import schemas as s
from offload.core.errors import InvalidInput
from offload.server.api.deps import Context
from offload.server.services import dashboard, org_settings, sessions, usage, user_tokens, web_auth
from offload.server.web import charts
from offload.server.web.routing import (
    CurrentViewer,
    FormViewer,
    WebRoute,
    page,
    redirect,
    rules,
    safe_next,
    set_session_cookie,
)

router = APIRouter(route_class=WebRoute, include_in_schema=False)


@router.get("/")
async def overview(ctx: Context, request: Request, viewer: CurrentViewer) -> HTMLResponse:
    now = ctx.now()
    report = await ctx.db.read(usage.user_report, viewer.user, now, rules(ctx))
    daily = await ctx.db.read(dashboard.daily_usage, viewer.user.id, now)
    chart = charts.hours_per_day(daily, "Offload time per day (UTC)")
    return page(request, "overview.html", report=report, daily=daily, daily_chart=chart)


@router.get("/activity")
async def activity(
    ctx: Context,
    request: Request,
    viewer: CurrentViewer,
    number: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1,
) -> HTMLResponse:
    found = await ctx.db.read(dashboard.sessions_page, viewer.user, ctx.now(), number)
    return page(request, "activity.html", found=found)


@router.post("/sessions/{session_id}/prompt")
async def answer_prompt(
    ctx: Context,
    viewer: FormViewer,
    session_id: str,
    answer: Annotated[s.PromptAnswerChoice, Form()],
    prompt_id: Annotated[str | None, Form()] = None,
    next: Annotated[str, Form()] = "/",
) -> Response:
    """The banner's keep / idle-now buttons: the same service the CLI's answer goes through."""
    reply = s.PromptAnswer(answer=answer, prompt_id=prompt_id or None)
    await sessions.answer_prompt(ctx, viewer.user, session_id, reply)
    notice = "kept" if answer is s.PromptAnswerChoice.KEEP else "idled"
    target = safe_next(next).split("?")[0]
    return redirect(f"{target}?notice={notice}")


# ---- personal settings --------------------------------------------------------------------------


async def _settings_page(
    ctx: Context, request: Request, viewer: CurrentViewer, new_token: str | None = None
) -> HTMLResponse:
    personal = await ctx.db.read(dashboard.personal_settings, viewer.user)
    token_list = await ctx.db.read(user_tokens.list_tokens, viewer.user.id)
    return page(
        request,
        "settings.html",
        personal=personal,
        tokens=token_list,
        new_token=new_token,
        idle_min=org_settings.IDLE_TIMEOUT_MIN_S,
        idle_max=org_settings.IDLE_TIMEOUT_MAX_S,
    )


@router.get("/settings")
async def settings_page(ctx: Context, request: Request, viewer: CurrentViewer) -> HTMLResponse:
    return await _settings_page(ctx, request, viewer)


def _optional_int(text: str, what: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"{what} must be a whole number, not {text[:20]!r}.") from None


@router.post("/settings")
async def save_settings(
    ctx: Context,
    viewer: FormViewer,
    idle_timeout_s: Annotated[str, Form(max_length=10)] = "",
    default_org: Annotated[str, Form(max_length=64)] = "",
    offload_choice: Annotated[str, Form(pattern="^(|on|off|default)$")] = "",
) -> Response:
    fields: dict[str, object] = {
        "idle_timeout_s": _optional_int(idle_timeout_s, "The idle timeout")
    }
    if default_org:
        fields["default_org"] = default_org
    if offload_choice:
        fields["offload_enabled"] = {"on": True, "off": False, "default": None}[offload_choice]
    update = s.UserSettingsUpdate.model_validate(fields)
    await ctx.db.run(
        org_settings.update_user_settings,
        viewer.user,
        update,
        ctx.settings.default_idle_timeout_s,
    )
    return redirect("/settings?notice=saved")


@router.post("/settings/password")
async def change_password(
    ctx: Context,
    request: Request,
    viewer: FormViewer,
    current_password: Annotated[str, Form(min_length=1, max_length=1024)],
    new_password: Annotated[str, Form(max_length=1024)],
    confirm_password: Annotated[str, Form(max_length=1024)],
) -> Response:
    """Every browser session of the user ends; this browser gets a fresh one."""
    if new_password != confirm_password:
        raise InvalidInput("The two new passwords differ.", "Type the same new password twice.")
    if len(new_password) < 8:
        raise InvalidInput("The new password is shorter than 8 characters.", "Choose a longer one.")
    change = s.PasswordChange(current_password=current_password, new_password=new_password)
    token = await web_auth.change_password(ctx, viewer.user, change, via="dashboard")
    response = redirect("/settings?notice=password-changed")
    set_session_cookie(request, response, token)
    return response


@router.post("/settings/tokens")
async def create_token(
    ctx: Context,
    request: Request,
    viewer: FormViewer,
    name: Annotated[str, Form(max_length=64)],
) -> HTMLResponse:
    """Shows the new token once, in this response only (no redirect: it must not reach a URL
    or the browser's history)."""
    token = await ctx.db.run(user_tokens.create, viewer.user, name, ctx.now())
    return await _settings_page(ctx, request, viewer, new_token=token)


@router.post("/settings/tokens/{token_id}/revoke")
async def revoke_token(ctx: Context, viewer: FormViewer, token_id: str) -> Response:
    await ctx.db.run(user_tokens.revoke, viewer.user, token_id, ctx.now())
    return redirect("/settings?notice=revoked")

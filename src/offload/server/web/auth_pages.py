"""Sign in, sign out, and the browser side of device login (/device)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse

from offload.core.errors import NotAuthenticated, RateLimited
from offload.server.api.deps import Context
from offload.server.api.errors import error_headers
from offload.server.services import device_codes, web_auth
from offload.server.services.throttle import Limits
from offload.server.web.routing import (
    LOGIN_CSRF_COOKIE,
    CurrentViewer,
    FormViewer,
    WebRoute,
    page,
    redirect,
    safe_next,
    set_cookie,
    set_session_cookie,
)

router = APIRouter(route_class=WebRoute, include_in_schema=False)


def _login_form(
    request: Request,
    next_path: str,
    error: str | None = None,
    username: str = "",
    status: int = 200,
) -> HTMLResponse:
    """The sign-in form. Before any session exists, CSRF is a double-submit: a random cookie
    and the form field derived from it must arrive together."""
    secret = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    response = page(
        request,
        "login.html",
        status=status,
        csrf_token=web_auth.csrf_token_for(secret),
        next_path=next_path,
        error=error,
        username=username,
    )
    set_cookie(request, response, LOGIN_CSRF_COOKIE, secret, max_age=3600)
    return response


@router.get("/login")
async def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    return _login_form(request, safe_next(next))


@router.post("/login")
async def login_submit(
    ctx: Context,
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    target = safe_next(next)
    secret = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not secret or not web_auth.csrf_matches(secret, csrf_token):
        return _login_form(
            request, target, "The form expired; please sign in again.", username, status=403
        )
    try:
        token = await web_auth.sign_in(ctx, username, password)
    except NotAuthenticated as exc:
        return _login_form(request, target, exc.message, username, status=401)
    except RateLimited as exc:
        refused = _login_form(request, target, f"{exc.message} {exc.fix}", username, status=429)
        refused.headers.update(error_headers(exc) or {})
        return refused
    response = redirect(target)
    set_session_cookie(request, response, token)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/logout")
async def logout(ctx: Context, viewer: FormViewer) -> Response:
    await web_auth.sign_out(ctx, viewer.identity)
    response = redirect("/login?notice=signed-out")
    response.delete_cookie(web_auth.SESSION_COOKIE, path="/", httponly=True, samesite="lax")
    return response


# ---- device login: the user confirms the code their terminal shows ------------------------------


@router.get("/device")
async def device_page(
    ctx: Context, request: Request, viewer: CurrentViewer, code: str | None = None
) -> HTMLResponse:
    """Enter a code; a code in the link (verification_uri_complete) goes straight to confirm."""
    if code:
        pending = await ctx.db.read(device_codes.pending_request, code, ctx.now())
        return page(request, "device_confirm.html", pending=pending)
    return page(request, "device.html")


@router.post("/device")
async def device_lookup(
    ctx: Context,
    request: Request,
    viewer: FormViewer,
    user_code: Annotated[str, Form(max_length=32)],
) -> HTMLResponse:
    pending = await ctx.db.read(device_codes.pending_request, user_code, ctx.now())
    return page(request, "device_confirm.html", pending=pending)


@router.post("/device/decision")
async def device_decision(
    ctx: Context,
    request: Request,
    viewer: FormViewer,
    user_code: Annotated[str, Form(max_length=32)],
    decision: Annotated[str, Form(pattern="^(approve|deny)$")],
) -> HTMLResponse:
    approve = decision == "approve"
    limits = Limits.from_settings(ctx.settings)
    decided = await ctx.db.run(
        device_codes.decide, viewer.user, user_code, approve, ctx.now(), limits
    )
    return page(request, "device_done.html", decided=decided, approved=approve)

"""What every dashboard page shares: templates, the signed-in viewer, CSRF checks, error pages
and security headers.

Pages are routes of `WebRoute`: an expected failure (`OffloadError`, a bad form, a missing
sign-in, a failed CSRF check) becomes a readable HTML page with the right status instead of the
API's JSON, and every response gets the same security headers.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from offload.core.errors import OffloadError
from offload.server.api.deps import Context
from offload.server.api.errors import describe_validation_errors, error_headers
from offload.server.context import ServerContext
from offload.server.services import dashboard, web_auth
from offload.server.services.lifecycle import Rules
from offload.server.services.tokens import AuthUser
from offload.server.web import charts, formats

WEB_DIR = Path(__file__).resolve().parent
STATIC_DIR = WEB_DIR / "static"
LOGIN_CSRF_COOKIE = "offload_login_csrf"

templates = Jinja2Templates(directory=WEB_DIR / "templates")
templates.env.filters.update(
    duration=formats.duration,
    clock_duration=formats.clock_duration,
    when=formats.when,
    day=formats.day,
    money=formats.money,
    seconds_choice=formats.seconds_choice,
)
templates.env.globals.update(bar_chart=charts.bar_chart)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}

# Short notices after a form is saved (POST, redirect, GET): the URL carries only a key.
NOTICES = {
    "saved": "Saved.",
    "revoked": "Token revoked.",
    "kept": "Keeping your session going.",
    "idled": "Your session is idle now; its containers are paused until you use Docker again.",
    "member-removed": "Member removed.",
    "role-changed": "Role changed.",
    "signed-out": "You are signed out.",
    "unlocked": "The account can sign in again.",
    "password-changed": "Password changed; your other browser sessions were signed out.",
}


class SignInRequired(Exception):
    """No (valid) session cookie: the page redirects to the sign-in form."""


class CsrfRejected(Exception):
    """A form without the right CSRF token: refused with 403."""


@dataclass(frozen=True)
class Viewer:
    """The signed-in user of a page, and what the layout shows them."""

    identity: web_auth.WebIdentity
    frame: dashboard.Frame

    @property
    def user(self) -> AuthUser:
        return self.identity.user

    @property
    def csrf_token(self) -> str:
        return self.identity.csrf_token


def rules(ctx: ServerContext) -> Rules:
    return Rules.from_settings(ctx.settings)


async def _viewer(request: Request, ctx: Context) -> Viewer:
    identity = await web_auth.who(ctx, request.cookies.get(web_auth.SESSION_COOKIE))
    if identity is None:
        raise SignInRequired
    frame = await ctx.db.read(dashboard.frame, identity.user, ctx.now(), rules(ctx))
    viewer = Viewer(identity, frame)
    request.state.viewer = viewer
    return viewer


CurrentViewer = Annotated[Viewer, Depends(_viewer)]


async def _csrf_checked(request: Request, viewer: CurrentViewer) -> Viewer:
    """The viewer, once the form's CSRF token proved it came from our own page."""
    form = await request.form()  # Starlette caches it: Form() parameters read the same data
    sent = form.get("csrf_token")
    if not web_auth.csrf_matches(
        viewer.identity.session_token, sent if isinstance(sent, str) else None
    ):
        raise CsrfRejected
    return viewer


FormViewer = Annotated[Viewer, Depends(_csrf_checked)]


def safe_next(target: str | None, default: str = "/") -> str:
    """A local path to go back to; anything else (another site, `//host`) becomes `default`."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    viewer: Viewer | None = getattr(request.state, "viewer", None)
    notice = NOTICES.get(request.query_params.get("notice", ""))
    values = {
        "viewer": viewer,
        "csrf_token": viewer.csrf_token if viewer else context.pop("csrf_token", ""),
        "notice": notice,
        "path": request.url.path,
        **context,
    }
    return templates.TemplateResponse(request, template, values, status_code=status)


def error_page(request: Request, status: int, message: str, fix: str = "") -> HTMLResponse:
    titles = {
        401: "Sign-in needed",
        403: "Not allowed",
        404: "Not found",
        409: "Conflict",
        429: "Too many attempts",
    }
    return page(
        request,
        "error.html",
        status=status,
        title=titles.get(status, "Something went wrong"),
        message=message,
        fix=fix,
    )


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    """HttpOnly (no script reads it), SameSite=Lax (no cross-site POST carries it), Secure
    when the page came over HTTPS (behind a TLS proxy: `forwarded_allow_ips`)."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def set_session_cookie(request: Request, response: Response, token: str) -> None:
    max_age = int(web_auth.SESSION_LIFETIME.total_seconds())
    set_cookie(request, response, web_auth.SESSION_COOKIE, token, max_age)


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def secure_headers(response: Response, html: bool) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if html:  # pages hold personal data and tokens shown once: never cache them
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _return_path(request: Request) -> str:
    """Where to come back after signing in: the page asked for (a form post cannot be
    replayed, so it returns to the overview)."""
    if request.method != "GET":
        return "/"
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


class WebRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            response: Response
            try:
                response = await original(request)
            except SignInRequired:
                response = redirect(f"/login?next={quote(_return_path(request))}")
            except CsrfRejected:
                response = error_page(
                    request,
                    403,
                    "This form was not accepted: it expired or came from another site.",
                    "Reload the page and send the form again.",
                )
            except RequestValidationError as exc:
                response = error_page(
                    request, 422, describe_validation_errors(exc), "Go back and correct the form."
                )
            except OffloadError as exc:
                response = error_page(request, exc.http_status, exc.message, exc.fix)
                response.headers.update(error_headers(exc) or {})
            is_html = response.media_type == "text/html" or isinstance(response, HTMLResponse)
            return secure_headers(response, html=is_html)

        return handler

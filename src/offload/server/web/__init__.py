"""The web dashboard: server-rendered pages (Jinja2) with a little progressive JavaScript.

Served by the control plane itself, outside the API prefix; no front-end build.  Pages sign in
with a username and password (a session cookie), forms carry CSRF tokens, charts are inline SVG
drawn on the server.  `mount(app)` adds it to the FastAPI app.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles


def mount(app: FastAPI) -> None:
    from offload.server.web import auth_pages, org_pages, user_pages
    from offload.server.web.routing import STATIC_DIR

    for module in (auth_pages, user_pages, org_pages):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

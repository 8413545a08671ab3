"""`offload server`: migrate the database, then serve the API with uvicorn."""

from __future__ import annotations

import importlib.util
from typing import Any

import uvicorn

from offload.core.config import ServerSettings
from offload.server.app import create_app


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """How `serve` runs uvicorn (bench/serve_costs.py measures the same options).

    uvloop and httptools (`uvicorn[standard]`) when importable: the C event loop and HTTP
    parser cost a fraction of asyncio's pure-Python loop and h11 per request; without them
    (a minimal install) uvicorn falls back to those.
    """
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "log_level": "info",
        "access_log": settings.access_log,
        # Behind a load balancer or TLS proxy: believe its X-Forwarded-For (abuse limits and the
        # audit log see the real client) and X-Forwarded-Proto (cookies get Secure).
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": settings.forwarded_allow_ips or None,
        # Runners' long polls are parked for up to 15 s; they retry, so shutdown need not wait.
        "timeout_graceful_shutdown": 2,
    }


def serve(settings: ServerSettings) -> None:
    """Run the control plane in the foreground until interrupted.

    `create_app` applies pending migrations before the first request is accepted.  Access logs
    show method, path and status only: tokens travel in headers, never in URLs.
    """
    uvicorn.run(create_app(settings), **uvicorn_options(settings))

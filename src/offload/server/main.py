"""`offload server`: migrate the database, then serve the API with uvicorn."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from offload.core.config import ServerSettings
from offload.server.app import create_app

# Longer than our clients (schemas.CLIENT_KEEPALIVE_S) and proxies in front (nginx drops idle
# upstream connections after 60 s) keep an idle connection: the side that reuses one drops it.
SERVER_KEEPALIVE_S = 65


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
        # uvicorn's 5 s closed every agent's connection between two of its 5 s reports.
        "timeout_keep_alive": SERVER_KEEPALIVE_S,
        # Runners' long polls are parked for up to 15 s; they retry, so shutdown need not wait.
        "timeout_graceful_shutdown": 2,
    }


def freeze_startup_objects() -> None:
    """Leave what start-up made (FastAPI's routes and models, SQLAlchemy's mappers, pydantic's
    schemas, about 190,000 objects) out of every later garbage collection.

    They live as long as the process, yet each full collection walked them all: 100-140 ms with
    every request in flight waiting, every 3-20 s under bench/load.py (1,000 agents), which was
    most of the activity reports' p99.  `gc.freeze` is CPython's way to exempt such objects
    (its docs suggest it for long-lived state made before serving); what is made afterwards is
    collected as before.  Collected first, so that no start-up garbage is kept for good.
    """
    gc.collect()
    gc.freeze()


class _Server(uvicorn.Server):
    """uvicorn's server, which also answers the runners' parked long polls when it is told to
    stop (SIGTERM, SIGINT: a rolling restart, `offload down`).  uvicorn waits up to
    `timeout_graceful_shutdown` for requests in flight, then cancels them, and a cancelled
    request is a 500; a poll parked for up to a minute would always be one."""

    def __init__(self, app: FastAPI, options: dict[str, Any]) -> None:
        super().__init__(uvicorn.Config(app, **options))
        self._signals = app.state.context.signals

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving yet (or any more): nothing is parked
            return
        loop.call_soon_threadsafe(self._signals.release_all)  # a signal handler: not set() here


def serve(settings: ServerSettings) -> None:
    """Run the control plane in the foreground until interrupted.

    `create_app` applies pending migrations before the first request is accepted.  Access logs
    show method, path and status only: tokens travel in headers, never in URLs.
    """
    app = create_app(settings)
    freeze_startup_objects()
    _Server(app, uvicorn_options(settings)).run()

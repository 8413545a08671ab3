"""The control plane's FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.types import ASGIApp, Receive, Scope, Send

import offload
from offload.core.config import ServerSettings
from offload.core.errors import ErrorBody
from offload.core.schemas import API_PREFIX
from offload.server import web
from offload.server.api import device, ops, orgs, runners, sessions, users
from offload.server.api.activity_lane import ActivityLane
from offload.server.api.errors import install_error_handlers
from offload.server.context import CLIENT_ADDRESS, Clock, ServerContext, utc_now
from offload.server.db.engine import Database
from offload.server.db.leadership import TickLeadership
from offload.server.db.migrate import upgrade_database
from offload.server.db.wakeups import PostgresWakeups
from offload.server.services import background, installation
from offload.server.services.ca import CA_KEY_FILENAME, CertificateAuthority
from offload.server.services.signals import RunnerSignals

log = logging.getLogger(__name__)

DB_THREADS = 32

# The control plane exports Prometheus metrics (/metrics) and logs to stderr, not OpenTelemetry.
# FastAPI's own telemetry, on by default, looked up the global OpenTelemetry providers (reads of
# os.environ) on every request to find none: 2-3 % of a replica's CPU under bench/load.py.
NO_OPENTELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}

_ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (401, 403, 404, 409, 422, 429, 503)
}


class ClientAddressMiddleware:
    """Makes each request's client address known to the services (`context.client_address`):
    the abuse limits count per address and the audit log says where an action came from."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        token = CLIENT_ADDRESS.set(client[0] if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            CLIENT_ADDRESS.reset(token)


def open_database(settings: ServerSettings) -> Database:
    """The settings' database, migrated to the newest schema (data_dir made if missing)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(settings.resolved_database_url())
    upgrade_database(db)
    return db


def build_context(settings: ServerSettings, clock: Clock | None = None) -> ServerContext:
    db = open_database(settings)
    ca = CertificateAuthority.load_or_create(settings.data_dir)
    key_path = str(settings.data_dir / CA_KEY_FILENAME)
    try:
        db.call(installation.claim_session_ca, ca.public_key_line(), key_path)
    except BaseException:
        db.dispose()
        raise
    return ServerContext(
        settings=settings,
        db=db,
        ca=ca,
        signals=RunnerSignals(),
        clock=clock or utc_now,
    )


async def run_lifecycle_clock(context: ServerContext) -> None:
    """Apply idle, grace, prompts, limits and lost runners every `tick_interval_s`, until
    cancelled; on PostgreSQL only on the replica that leads (db/leadership.py).

    A failing tick is logged and retried on the next one: the rules are re-derived from the
    database each time, so nothing is lost by a skipped tick."""
    url = context.db.engine.url
    leadership = None
    if url.get_backend_name() == "postgresql":
        leadership = TickLeadership(url.render_as_string(False))
    try:
        while True:
            try:
                if leadership is None or await asyncio.to_thread(leadership.holds):
                    await background.tick(context)
            except Exception:
                log.exception("lifecycle tick failed; retrying on the next one")
            await asyncio.sleep(context.settings.tick_interval_s)
    finally:
        if leadership is not None:
            leadership.close()


def create_app(settings: ServerSettings, clock: Clock | None = None) -> FastAPI:
    """The app, with its database migrated and its CA key loaded (created on first start).

    `clock` returns an aware UTC datetime; tests pass a controllable one.
    """
    context = build_context(settings, clock)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Database work runs on worker threads (Database.run/read): asyncio's default pool has
        # cores + 4 of them, 6 on two cores, fewer than the connection pool serves.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=DB_THREADS, thread_name_prefix="offload-db")
        )
        tasks = []
        if settings.tick_interval_s > 0:
            tasks.append(asyncio.create_task(run_lifecycle_clock(context), name="lifecycle"))
        wakeups = None
        engine_url = context.db.engine.url
        if engine_url.get_backend_name() == "postgresql":  # replicas wake each other's polls
            wakeups = PostgresWakeups(engine_url.render_as_string(False), context.signals)
            context.signals.publisher = wakeups.publish
            tasks.append(asyncio.create_task(wakeups.listen(), name="runner-wakeups"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if wakeups is not None:
                context.signals.publisher = None
                wakeups.close()
            context.db.dispose()

    app = FastAPI(
        title="Offload control plane",
        version=offload.__version__,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        lifespan=lifespan,
        telemetry=NO_OPENTELEMETRY,
    )
    app.state.context = context
    api = APIRouter(prefix=API_PREFIX, responses=_ERROR_RESPONSES)
    for module in (users, sessions, runners, orgs, device):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(ops.router)
    web.mount(app)  # the dashboard: pages at /, assets at /static
    install_error_handlers(app)
    app.add_middleware(ActivityLane, context=context)
    app.add_middleware(ClientAddressMiddleware)  # added last: outside the lane
    return app

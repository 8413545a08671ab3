"""The control plane's FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

import offload
from offload.core.config import ServerSettings
from offload.core.errors import ErrorBody
from offload.core.schemas import API_PREFIX
from offload.server.api import ops, runners, sessions, users
from offload.server.api.errors import install_error_handlers
from offload.server.context import Clock, ServerContext, utc_now
from offload.server.db.engine import Database
from offload.server.db.migrate import upgrade_database
from offload.server.services.ca import CertificateAuthority
from offload.server.services.signals import RunnerSignals

_ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (401, 403, 404, 409, 422, 503)
}


def open_database(settings: ServerSettings) -> Database:
    """The settings' database, migrated to the newest schema (data_dir made if missing)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(settings.resolved_database_url())
    upgrade_database(db)
    return db


def build_context(settings: ServerSettings, clock: Clock | None = None) -> ServerContext:
    db = open_database(settings)
    return ServerContext(
        settings=settings,
        db=db,
        ca=CertificateAuthority.load_or_create(settings.data_dir),
        signals=RunnerSignals(),
        clock=clock or utc_now,
    )


def create_app(settings: ServerSettings, clock: Clock | None = None) -> FastAPI:
    """The app, with its database migrated and its CA key loaded (created on first start).

    `clock` returns an aware UTC datetime; tests pass a controllable one.
    """
    context = build_context(settings, clock)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        context.db.dispose()

    app = FastAPI(
        title="Offload control plane",
        version=offload.__version__,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.context = context
    api = APIRouter(prefix=API_PREFIX, responses=_ERROR_RESPONSES)
    for module in (users, sessions, runners):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(ops.router)
    install_error_handlers(app)
    return app

"""Every error response carries `ErrorBody`: what happened and the fix, never a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from offload.core.errors import ErrorBody, InvalidInput, NotFound, OffloadError
from offload.core.schemas import API_PREFIX

log = logging.getLogger(__name__)

SCHEMA_FIX = f"Correct the fields named above; the request schemas are at {API_PREFIX}/docs."
IDLE_TIMEOUT_FIX = (
    "Choose an idle timeout from 10 s to 1 h (10-3600 seconds), e.g. `--idle-timeout 5m`."
)


def _response(status: int, body: ErrorBody) -> JSONResponse:
    return JSONResponse(status_code=status, content=body.model_dump())


async def _offload_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OffloadError)
    return _response(exc.http_status, exc.body())


def describe_validation_errors(exc: RequestValidationError) -> str:
    """'body.gpu: Input should be a valid boolean; …'. Input values are left out: they may
    be passwords or tokens."""
    parts = []
    for error in exc.errors():
        location = ".".join(str(item) for item in error.get("loc", ())) or "request"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts) + "."


def _fix_for(exc: RequestValidationError) -> str:
    """The idle timeout's range is a rule users meet often: name it rather than the schema."""
    locations = [error.get("loc", ()) for error in exc.errors()]
    if any(location and location[-1] == "idle_timeout_s" for location in locations):
        return IDLE_TIMEOUT_FIX
    return SCHEMA_FIX


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    error = InvalidInput(describe_validation_errors(exc), _fix_for(exc))
    return _response(error.http_status, error.body())


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        body = NotFound(
            f"No such endpoint: {request.method} {request.url.path}.",
            f"See the API at {API_PREFIX}/docs; is the client newer than the server?",
        ).body()
    else:
        body = ErrorBody(
            code="http_error", message=str(exc.detail), fix=f"See the API at {API_PREFIX}/docs."
        )
    return _response(exc.status_code, body)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    body = ErrorBody(
        code="internal",
        message="The control plane failed unexpectedly.",
        fix="Try again; if it persists, an operator will find the cause in the server log.",
    )
    return _response(500, body)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OffloadError, _offload_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)

"""Every error response carries `ErrorBody`: what happened and the fix, never a stack trace."""

from __future__ import annotations

import logging

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from offload.core.errors import ErrorBody, InvalidInput, NotFound, OffloadError, RateLimited
from offload.core.schemas import API_PREFIX

log = logging.getLogger(__name__)

DATABASE_RETRY_AFTER_S = 5
SCHEMA_FIX = f"Correct the fields named above; the request schemas are at {API_PREFIX}/docs."
IDLE_TIMEOUT_FIX = (
    "Choose an idle timeout from 10 s to 1 h (10-3600 seconds), e.g. `--idle-timeout 5m`."
)


def _response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def error_headers(exc: OffloadError) -> dict[str, str] | None:
    """Retry-After on a 429 (RFC 6585): clients wait that long before trying again."""
    if isinstance(exc, RateLimited):
        return {"Retry-After": str(exc.retry_after_s)}
    return None


async def _offload_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OffloadError)
    return _response(exc.http_status, exc.body(), error_headers(exc))


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
    if exc.status_code == 400:
        # FastAPI's answer to a body it cannot decode (bytes that are not UTF-8 JSON text): as
        # invalid as JSON that does not parse, which FastAPI answers 422 like the schema's rules.
        error = InvalidInput("The request body is not JSON text in UTF-8.", SCHEMA_FIX)
        return _response(error.http_status, error.body())
    if exc.status_code == 404:
        body = NotFound(
            f"No such endpoint: {request.method} {request.url.path}.",
            f"See the API at {API_PREFIX}/docs; is the client newer than the server?",
        ).body()
    else:
        body = ErrorBody(
            code="http_error", message=str(exc.detail), fix=f"See the API at {API_PREFIX}/docs."
        )
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return _response(exc.status_code, body, headers or None)


def _allowed_methods(request: Request) -> str:
    """A 405's `Allow` (RFC 9110): every method served at the path.  Starlette names only those
    of the first route matching the path, e.g. GET where PUT is served too."""
    allowed = []
    for method in ("DELETE", "GET", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database cannot be reached (restarting, failed over) or is too busy to answer in
    time: a retry soon will do (the connection pool reconnects), so 503 with Retry-After."""
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    body = ErrorBody(
        code="unavailable",
        message="The control plane cannot reach its database right now.",
        fix="Try again in a few seconds; if it persists, an operator will find the cause in "
        "the server log.",
    )
    return _response(503, body, {"Retry-After": str(DATABASE_RETRY_AFTER_S)})


# What the database refused, by SQLSTATE (the driver refuses a NUL character itself: none).
_REFUSED_VALUES = {
    "22001": "a text longer than its field holds",
    "22003": "a number larger than its field holds",
}


async def _value_refused(request: Request, exc: Exception) -> JSONResponse:
    """The database refused a value of the request (PostgreSQL stores no NUL character in a
    text, nor a number beyond its column): invalid input, as a schema violation is.  The
    request's transaction rolled back; the API's bounds keep most such values out before."""
    assert isinstance(exc, sqlalchemy.exc.DataError)
    log.warning("database refused a value on %s %s: %s", request.method, request.url.path, exc.orig)
    what = _REFUSED_VALUES.get(getattr(exc.orig, "sqlstate", None) or "")
    if what is None:
        nul = "NUL" in str(exc.orig)  # psycopg: "… cannot contain NUL (0x00) bytes"
        what = "a text holding a NUL character (\\x00)" if nul else "a value its field cannot hold"
    error = InvalidInput(
        f"The request holds a value the database cannot store: {what}.",
        f"Send texts without NUL characters, within the bounds at {API_PREFIX}/docs.",
    )
    return _response(error.http_status, error.body())


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
    for database_error in (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError):
        app.add_exception_handler(database_error, _database_unavailable)
    app.add_exception_handler(sqlalchemy.exc.DataError, _value_refused)
    app.add_exception_handler(Exception, _unexpected_error)

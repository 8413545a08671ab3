"""The error hierarchy shared by every process.

Every error a user can meet says what happened (`message`) and what to do (`fix`).  The CLI maps
`exit_code` to its exit status; the control plane maps `http_status` to the response code and
sends `ErrorBody` so that the client can rebuild the same error on its side.
"""

from __future__ import annotations

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """The JSON body of every error response of the control plane."""

    code: str
    message: str
    fix: str = ""


class OffloadError(Exception):
    """Base class: an expected failure with a message and a fix. Never carries a secret."""

    code = "error"
    http_status = 400
    exit_code = 1
    default_fix = ""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = self.default_fix if fix is None else fix

    def __str__(self) -> str:
        return f"{self.message}\n  Fix: {self.fix}" if self.fix else self.message

    def body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, fix=self.fix)


class InvalidInput(OffloadError):
    code = "invalid_input"
    http_status = 422
    exit_code = 2


class NotAuthenticated(OffloadError):
    code = "not_authenticated"
    http_status = 401
    exit_code = 3
    default_fix = "Sign in again with `offload login` (or `offload up` on the embedded default)."


class PermissionDenied(OffloadError):
    code = "permission_denied"
    http_status = 403
    exit_code = 3


class NotFound(OffloadError):
    code = "not_found"
    http_status = 404
    exit_code = 4


class Conflict(OffloadError):
    code = "conflict"
    http_status = 409
    exit_code = 5


class NoCapacity(OffloadError):
    code = "no_capacity"
    http_status = 503
    exit_code = 6
    default_fix = "Try again in a minute; an operator can add runners with `offload runner`."


class Unreachable(OffloadError):
    """A peer (control plane, runner, agent, engine) could not be reached."""

    code = "unreachable"
    http_status = 502
    exit_code = 7


class Suspended(Unreachable):
    """The tunnel is closed on purpose while the session is idle; it comes back on activity."""


class EnvironmentError_(OffloadError):
    """An environment (session engine) could not be created, resumed or destroyed."""

    code = "environment_error"
    http_status = 500
    exit_code = 8


class PolicyDenied(OffloadError):
    """A Docker API request refused by the runner's policy."""

    code = "policy_denied"
    http_status = 403
    exit_code = 9


class RateLimited(OffloadError):
    """Too many attempts (sign-ins, device-login polls): refused until `retry_after_s` passed.

    The control plane sends it as 429 with a `Retry-After` header."""

    code = "rate_limited"
    http_status = 429
    exit_code = 10

    def __init__(self, message: str, fix: str | None = None, retry_after_s: int = 60) -> None:
        super().__init__(message, fix)
        self.retry_after_s = max(1, retry_after_s)


ERRORS_BY_CODE: dict[str, type[OffloadError]] = {
    cls.code: cls
    for cls in (
        OffloadError,
        InvalidInput,
        NotAuthenticated,
        PermissionDenied,
        NotFound,
        Conflict,
        NoCapacity,
        Unreachable,
        EnvironmentError_,
        PolicyDenied,
        RateLimited,
    )
}


def error_from_body(body: ErrorBody) -> OffloadError:
    """Rebuild, on the client, the error the control plane raised."""
    cls = ERRORS_BY_CODE.get(body.code, OffloadError)
    return cls(body.message, body.fix)

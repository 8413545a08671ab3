"""`offload login --server URL` without a token: the device flow (RFC 8628), like `gh auth login`.

The CLI asks the control plane for a code pair, shows the user a URL and a short code, and polls
until the user approves (an API token comes back), denies, or the code expires.  The command
wiring calls `device_login(server_url, show)` and stores the token it returns.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import httpx
from pydantic import ValidationError

from offload.core import schemas as s
from offload.core.errors import (
    ErrorBody,
    NotAuthenticated,
    OffloadError,
    PermissionDenied,
    Unreachable,
    error_from_body,
)

SLOW_DOWN_STEP_S = 5.0  # RFC 8628 3.5: add 5 seconds after a slow_down
RETRY_FIX = "Run `offload login --server URL` again and approve the new code in the browser."


def _unreachable(server_url: str, exc: Exception) -> Unreachable:
    return Unreachable(
        f"Cannot reach the Offload control plane at {server_url} ({exc.__class__.__name__}).",
        "Check the URL and that the control plane runs (`offload up` starts the embedded one).",
    )


def _unexpected(response: httpx.Response) -> OffloadError:
    try:
        return error_from_body(ErrorBody.model_validate(response.json()))
    except (ValueError, ValidationError):
        return OffloadError(
            f"The control plane answered {response.status_code} to the device login.",
            "Check the server URL; is it an Offload control plane of version 0.1 or later?",
        )


def retry_after(response: httpx.Response, default: float = 60.0) -> float:
    """The seconds a 429's `Retry-After` asks for (RFC 9110: delay-seconds)."""
    try:
        return max(1.0, float(response.headers.get("Retry-After", default)))
    except ValueError:
        return default


def _final_error(error: str, description: str) -> OffloadError:
    if error == "access_denied":
        return PermissionDenied(
            "The sign-in request was denied in the browser.",
            "Nothing was granted. To sign in, run `offload login --server URL` again and approve "
            "the new code.",
        )
    if error == "expired_token":
        return NotAuthenticated(
            "The sign-in code expired before it was approved (codes last 10 minutes).",
            RETRY_FIX,
        )
    if error == "invalid_grant":
        return NotAuthenticated(
            "The control plane no longer knows this sign-in code (it was already used).",
            RETRY_FIX,
        )
    return OffloadError(f"Device login failed: {error}: {description}".rstrip(": "), RETRY_FIX)


async def _post(
    client: httpx.AsyncClient, server_url: str, path: str, body: dict[str, str]
) -> httpx.Response:
    try:
        return await client.post(path, json=body)
    except httpx.TransportError as exc:
        raise _unreachable(server_url, exc) from None


async def request_code(
    client: httpx.AsyncClient, server_url: str, client_name: str
) -> s.DeviceCodeResponse:
    response = await _post(client, server_url, "/device/code", {"client_name": client_name})
    if response.status_code != 200:
        raise _unexpected(response)
    return s.DeviceCodeResponse.model_validate(response.json())


async def device_login(
    server_url: str,
    show: Callable[[str, str], None],
    clock: Callable[[], float] = time.monotonic,
    poll_interval: float | None = None,
    client_name: str | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> str:
    """Sign in through the browser; returns a new API token (off_u_…) of the approving user.

    `show(verification_uri, user_code)` tells the user where to go and what code to confirm.
    `poll_interval` overrides the server's interval (tests); `clock` bounds the wait locally at
    the code's lifetime, so a server that never answers "expired" cannot hang the CLI.
    Raises PermissionDenied (denied), NotAuthenticated (expired or used), Unreachable.
    """
    base = server_url.rstrip("/")
    name = socket.gethostname() if client_name is None else client_name
    async with httpx.AsyncClient(base_url=base + s.API_PREFIX, timeout=30.0) as client:
        code = await request_code(client, base, name)
        show(code.verification_uri, code.user_code)
        interval = float(code.interval if poll_interval is None else poll_interval)
        deadline = clock() + code.expires_in
        while True:
            await sleep(interval)
            if clock() > deadline:
                raise _final_error("expired_token", "")
            response = await _post(client, base, "/device/token", {"device_code": code.device_code})
            if response.status_code == 200:
                return s.DeviceTokenResponse.model_validate(response.json()).access_token
            if response.status_code == 429:  # the address's limit: wait as long as it says
                await sleep(retry_after(response))
                continue
            try:
                error = s.DeviceTokenError.model_validate(response.json())
            except (ValueError, ValidationError):
                raise _unexpected(response) from None
            if error.error == "slow_down":
                interval += SLOW_DOWN_STEP_S
            elif error.error != "authorization_pending":
                raise _final_error(error.error, error.error_description)

"""`offload builder status|prune`: the organisation's build cache, through the user's session.

Both speak to the agent's Docker socket like `docker build` does; the runner's builder channel
answers (`offload.runner.builder_proxy`): status from the builder's `GET /system/df`, prune as
`POST /build/prune`, which only the organisation's owners may send.
"""

from __future__ import annotations

from typing import Any

import httpx

from offload.core.client_paths import ClientPaths
from offload.core.engine_http import engine_client
from offload.core.errors import InvalidInput, OffloadError, PermissionDenied, Unreachable

TIMEOUT = httpx.Timeout(600.0, connect=10.0)
_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}


def parse_size(text: str, option: str) -> int:
    """`20GB`, `500MB`, `1.5TB` or a byte count (decimal units, as BuildKit's)."""
    value = text.strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(unit):
            number = value[: -len(unit)]
            break
    else:
        number, unit = value, "B"
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise InvalidInput(
            f"{option}: '{text}' is not a size.", f"e.g. {option} 20GB, 500MB or 1.5TB."
        ) from None
    if size <= 0:
        raise InvalidInput(f"{option}: '{text}' is not above zero.", f"e.g. {option} 20GB.")
    return size


async def status(paths: ClientPaths) -> dict[str, Any]:
    return await _call(paths, "GET", "/offload/builder")


async def prune(paths: ClientPaths, everything: bool, keep_storage: int | None) -> dict[str, Any]:
    params = {"all": "1" if everything else "0"}
    if keep_storage is not None:
        params["keep-storage"] = str(keep_storage)
    return await _call(paths, "POST", "/build/prune", params)


async def _call(
    paths: ClientPaths, method: str, path: str, params: dict[str, str] | None = None
) -> dict[str, Any]:
    socket = paths.agent_socket
    if not socket.exists():
        raise Unreachable(
            "No Offload session is running on this machine.", "Start one: `docker offload start`."
        )
    try:
        async with engine_client(socket, TIMEOUT) as agent:
            answer = await agent.request(method, path, params=params)
    except httpx.HTTPError as exc:
        raise Unreachable(
            f"The Offload agent did not answer ({exc.__class__.__name__}).",
            "Run `offload diagnose`.",
        ) from None
    body = _json(answer)
    message = str(body.get("message") or answer.text).strip()
    if answer.status_code == 403:
        raise PermissionDenied(message.removeprefix("Offload: "), "")
    if answer.status_code >= 400:
        raise OffloadError(f"The builder refused: {message}", "Run `offload diagnose`.")
    return body


def _json(answer: httpx.Response) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}

"""Typed clients of the control plane's REST API, for the CLI, the agent and runners.

Errors come back as the same `OffloadError` subclasses the server raised; a server that cannot be
reached raises `Unreachable` with the fix.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from offload.core import schemas as s
from offload.core.errors import ErrorBody, OffloadError, Unreachable, error_from_body

M = TypeVar("M", bound=BaseModel)


def _raise_for_response(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = ErrorBody.model_validate(response.json())
    except (ValueError, ValidationError):
        raise OffloadError(
            f"The control plane answered {response.status_code}: {response.text[:200]}",
            "Check the server URL with `offload status`; is it an Offload control plane?",
        ) from None
    raise error_from_body(body)


class _Base:
    def __init__(self, server_url: str, token: str | None, timeout: float = 30.0) -> None:
        self.server_url = server_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=self.server_url + s.API_PREFIX, headers=headers, timeout=timeout
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self: Any) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        model: type[M],
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> M:
        kwargs: dict[str, Any] = {"params": params}
        if body is not None:
            kwargs["json"] = body.model_dump(mode="json")
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(
                f"Cannot reach the Offload control plane at {self.server_url} ({exc.__class__.__name__}).",
                "Check that it runs (`offload up` starts the embedded one) and that the URL "
                "in `offload status` is right.",
            ) from None
        _raise_for_response(response)
        return model.model_validate(response.json())


class UserClient(_Base):
    """Calls made with a user's API token (CLI and agent)."""

    async def login(self, request: s.LoginRequest) -> s.TokenResponse:
        return await self._call("POST", "/auth/login", s.TokenResponse, request)

    async def me(self) -> s.UserInfo:
        return await self._call("GET", "/me", s.UserInfo)

    async def accounts(self) -> s.AccountsResponse:
        return await self._call("GET", "/accounts", s.AccountsResponse)

    async def version(self) -> s.VersionInfo:
        return await self._call("GET", "/version", s.VersionInfo)

    async def create_session(self, request: s.SessionCreate) -> s.SessionInfo:
        return await self._call("POST", "/sessions", s.SessionInfo, request)

    async def current_session(self) -> s.SessionInfo:
        return await self._call("GET", "/sessions/current", s.SessionInfo)

    async def get_session(self, session_id: str) -> s.SessionInfo:
        return await self._call("GET", f"/sessions/{session_id}", s.SessionInfo)

    async def renew_certificate(self, session_id: str, public_key: str) -> s.SessionInfo:
        body = s.CertificateRequest(client_public_key=public_key)
        return await self._call("POST", f"/sessions/{session_id}/certificate", s.SessionInfo, body)

    async def stop_session(self, session_id: str) -> s.SessionInfo:
        return await self._call("POST", f"/sessions/{session_id}/stop", s.SessionInfo)


class RunnerClient(_Base):
    """Calls made with a runner token."""

    async def register(self, request: s.RunnerRegister) -> s.RunnerRegistered:
        return await self._call("POST", "/runners/register", s.RunnerRegistered, request)

    async def heartbeat(
        self, runner_id: str, report: s.RunnerHeartbeat, wait_s: float = 0
    ) -> s.RunnerDesired:
        return await self._call(
            "POST",
            f"/runners/{runner_id}/heartbeat",
            s.RunnerDesired,
            report,
            params={"wait": wait_s},
            timeout=wait_s + 30,
        )

    async def assigned_session(self, runner_id: str, session_id: str) -> s.AssignedSession:
        return await self._call(
            "GET", f"/runners/{runner_id}/sessions/{session_id}", s.AssignedSession
        )

    async def session_ready(
        self, runner_id: str, session_id: str, env_id: str
    ) -> s.AssignedSession:
        return await self._call(
            "POST",
            f"/runners/{runner_id}/sessions/{session_id}/ready",
            s.AssignedSession,
            s.EnvironmentReady(env_id=env_id),
        )

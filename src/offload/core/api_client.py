"""Typed clients of the control plane's REST API, for the CLI, the agent and runners.

Errors come back as the same `OffloadError` subclasses the server raised; a server that cannot be
reached raises `Unreachable` with the fix.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from offload.core import schemas as s
from offload.core.errors import (
    ErrorBody,
    OffloadError,
    RateLimited,
    Unreachable,
    error_from_body,
)

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
    error = error_from_body(body)
    if isinstance(error, RateLimited):
        error.retry_after_s = _retry_after(response)
    raise error


def _retry_after(response: httpx.Response) -> int:
    try:
        return max(1, int(response.headers.get("Retry-After", "60")))
    except ValueError:
        return 60


class _Sent:
    """A partial update: only the fields the caller set travel (a null means "clear")."""

    def __init__(self, model: BaseModel) -> None:
        self.model = model


@functools.cache
def _shared_tls() -> ssl.SSLContext:
    return httpx.create_ssl_context()  # httpx's default: certifi, SSL_CERT_FILE/DIR honoured


def _tls_for(url: str) -> ssl.SSLContext | bool:
    """httpx loads the CA bundle for every client it makes (50-70 ms of a 2-core machine, on
    the critical path of `start`, in the CLI and again in the agent): an HTTPS control plane
    gets one context per process, a plain-HTTP one (the embedded default, on loopback) none;
    no redirect is followed, so TLS cannot come up later."""
    return _shared_tls() if url.lower().startswith("https:") else False


class _Base:
    def __init__(self, server_url: str, token: str | None, timeout: float = 30.0) -> None:
        self.server_url = server_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=self.server_url + s.API_PREFIX,
            headers=headers,
            timeout=timeout,
            verify=_tls_for(self.server_url),
            limits=httpx.Limits(keepalive_expiry=s.CLIENT_KEEPALIVE_S),
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
        body: BaseModel | _Sent | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> M:
        kwargs: dict[str, Any] = {"params": params}
        if isinstance(body, _Sent):
            kwargs["json"] = body.model.model_dump(mode="json", exclude_unset=True)
        elif body is not None:
            kwargs["json"] = body.model_dump(mode="json")
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.server_url, exc) from None
        _raise_for_response(response)
        return model.model_validate(response.json())


def _unreachable(server_url: str, exc: httpx.TransportError) -> Unreachable:
    failed = exc.__context__ or exc.__cause__
    while failed is not None and not isinstance(failed, ssl.SSLCertVerificationError):
        failed = failed.__context__ or failed.__cause__
    if isinstance(failed, ssl.SSLCertVerificationError):
        return Unreachable(
            f"The Offload control plane at {server_url} has a certificate this machine does not "
            f"trust: {failed.verify_message}.",
            "If your company signs it with its own CA, point SSL_CERT_FILE at that CA's PEM "
            "file (or install it in the system's trust store); otherwise check the URL.",
        )
    return Unreachable(
        f"Cannot reach the Offload control plane at {server_url} ({exc.__class__.__name__}).",
        "Check that it runs (`offload up` starts the embedded one) and that the URL "
        "in `offload status` is right.",
    )


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

    async def report_activity(self, session_id: str, report: s.ActivityReport) -> s.SessionInfo:
        return await self._call("POST", f"/sessions/{session_id}/activity", s.SessionInfo, report)

    async def answer_prompt(self, session_id: str, answer: s.PromptAnswer) -> s.SessionInfo:
        return await self._call("POST", f"/sessions/{session_id}/prompt", s.SessionInfo, answer)

    async def idle_session(self, session_id: str) -> s.SessionInfo:
        return await self._call("POST", f"/sessions/{session_id}/idle", s.SessionInfo)

    async def my_settings(self) -> s.UserSettings:
        return await self._call("GET", "/me/settings", s.UserSettings)

    async def update_my_settings(self, update: s.UserSettingsUpdate) -> s.UserSettings:
        return await self._call("PUT", "/me/settings", s.UserSettings, _Sent(update))

    async def usage(self) -> s.UsageReport:
        return await self._call("GET", "/usage", s.UsageReport)

    async def org_settings(self, org: str) -> s.OrgSettings:
        return await self._call("GET", f"/orgs/{org}/settings", s.OrgSettings)

    async def update_org_settings(self, org: str, update: s.OrgSettingsUpdate) -> s.OrgSettings:
        return await self._call("PUT", f"/orgs/{org}/settings", s.OrgSettings, _Sent(update))

    async def org_billing(self, org: str) -> s.OrgBilling:
        return await self._call("GET", f"/orgs/{org}/billing", s.OrgBilling)

    async def update_org_billing(self, org: str, update: s.OrgBillingUpdate) -> s.OrgBilling:
        return await self._call("PUT", f"/orgs/{org}/billing", s.OrgBilling, _Sent(update))

    async def grant_trial_credit(self, org: str, amount_cents: int) -> s.OrgBilling:
        body = s.TrialCreditGrant(amount_cents=amount_cents)
        return await self._call("POST", f"/orgs/{org}/billing/trial-credits", s.OrgBilling, body)

    async def org_audit(
        self, org: str, limit: int, before: int | None, action: s.AuditAction | None
    ) -> s.AuditLog:
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        if action is not None:
            params["action"] = action.value
        return await self._call("GET", f"/orgs/{org}/audit", s.AuditLog, params=params)

    async def unlock_member(self, org: str, username: str) -> s.Lockout:
        return await self._call("POST", f"/orgs/{org}/members/{username}/unlock", s.Lockout)

    async def change_password(self, change: s.PasswordChange) -> s.UserInfo:
        return await self._call("POST", "/me/password", s.UserInfo, change)

    async def org_usage(self, org: str) -> s.OrgUsage:
        return await self._call("GET", f"/orgs/{org}/usage", s.OrgUsage)


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

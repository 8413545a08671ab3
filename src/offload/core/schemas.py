"""Typed boundaries: every body that crosses the wire between CLI/agent, control plane and runner.

The REST API lives under `API_PREFIX`.  Authentication is `Authorization: Bearer <token>`:
user API tokens (prefix `off_u_`) for the CLI and agent, runner tokens (prefix `off_r_`) for runners.

User endpoints
  POST /auth/login                    LoginRequest -> TokenResponse  (user + password -> new API token)
  GET  /me                            -> UserInfo
  GET  /accounts                      -> AccountsResponse
  GET  /version                       -> VersionInfo                 (no auth)
  POST /sessions                      SessionCreate -> SessionInfo   (with certificate)
  GET  /sessions/current              -> SessionInfo                 (404 when the user has none live)
  GET  /sessions/{id}                 -> SessionInfo
  POST /sessions/{id}/certificate     CertificateRequest -> SessionInfo (with a fresh certificate)
  POST /sessions/{id}/stop            -> SessionInfo                 (state terminated)

Runner endpoints (runner token)
  POST /runners/register                         RunnerRegister -> RunnerRegistered
  POST /runners/{id}/heartbeat?wait=SECONDS      RunnerHeartbeat -> RunnerDesired
        (long poll: answers at once if something changed for this runner, else after `wait`)
  GET  /runners/{id}/sessions/{session_id}       -> AssignedSession  (404 unless live and assigned here)
  POST /runners/{id}/sessions/{session_id}/ready EnvironmentReady -> AssignedSession

Every error response carries `offload.core.errors.ErrorBody`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

API_PREFIX = "/api/v1"
API_VERSION = "1"

# The one unix-socket name a client may ask the runner's SSH endpoint for: the runner maps it to
# the engine of the session named by the client's certificate, never to any other path.
ENGINE_CHANNEL_PATH = "/docker.sock"


class SessionState(StrEnum):
    IDLE_DISCONNECTED = "idle-disconnected"
    STARTING = "starting"
    ACTIVE = "active"
    IDLE = "idle"
    TERMINATED = "terminated"
    FAILED = "failed"

    @property
    def live(self) -> bool:
        return self in (SessionState.STARTING, SessionState.ACTIVE, SessionState.IDLE)


class Role(StrEnum):
    OWNER = "owner"
    MEMBER = "member"


class InstanceType(StrEnum):
    STANDARD = "standard"
    GPU = "gpu"


class InstanceSpec(BaseModel):
    """Resources of one environment."""

    cpus: float = 4.0
    memory_bytes: int = 8 * 1024**3
    pids: int = 4096


INSTANCE_SPECS: dict[InstanceType, InstanceSpec] = {
    InstanceType.STANDARD: InstanceSpec(),
    InstanceType.GPU: InstanceSpec(cpus=8.0, memory_bytes=32 * 1024**3),
}


# ---- users, organisations, tokens -------------------------------------------------------------


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)
    token_name: str = Field(default="cli", max_length=64)


class OrgMembership(BaseModel):
    name: str
    role: Role
    is_default: bool = False


class UserInfo(BaseModel):
    id: str
    username: str
    default_org: str | None = None
    orgs: list[OrgMembership] = []


class TokenResponse(BaseModel):
    token: str  # shown once; the server keeps only its hash
    user: UserInfo


class AccountsResponse(BaseModel):
    user: str
    orgs: list[OrgMembership]


class VersionInfo(BaseModel):
    server_version: str
    api_version: str = API_VERSION
    min_client_version: str


# ---- sessions ---------------------------------------------------------------------------------


class SessionCreate(BaseModel):
    org: str | None = None  # None: the user's default organisation
    gpu: bool = False
    idle_timeout_s: int | None = Field(default=None, ge=10, le=3600)
    client_public_key: str = Field(description="OpenSSH public key line of the agent's key")
    client_name: str = Field(default="", max_length=255, description="hostname of the laptop")


class CertificateRequest(BaseModel):
    client_public_key: str


class RunnerEndpoint(BaseModel):
    id: str
    name: str
    ssh_host: str
    ssh_port: int
    host_key: str = Field(description="OpenSSH public host key line the client pins")


class SessionInfo(BaseModel):
    id: str
    state: SessionState
    user: str
    org: str
    instance_type: InstanceType
    gpu: bool
    idle_timeout_s: int
    client_name: str = ""
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    runner: RunnerEndpoint | None = None
    engine_channel_path: str = ENGINE_CHANNEL_PATH
    # Only in answers to POST /sessions and /certificate: OpenSSH certificate text.
    certificate: str | None = None
    certificate_valid_before: datetime | None = None


# ---- runners ----------------------------------------------------------------------------------


class RunnerRegister(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    ssh_host: str
    ssh_port: int = Field(ge=1, le=65535)
    host_key: str
    capacity: int = Field(ge=0, description="environments this runner can hold at once")
    instance_types: list[InstanceType] = [InstanceType.STANDARD]
    gpus: int = 0


class RunnerRegistered(BaseModel):
    id: str
    ca_public_key: str = Field(description="OpenSSH public key of the session certificate CA")
    heartbeat_interval_s: float


class EnvironmentReport(BaseModel):
    env_id: str
    session_id: str | None = None  # None: a warm, unassigned environment
    state: str  # "warm" | "bound" | "paused" | "destroying"


class RunnerHeartbeat(BaseModel):
    capacity: int
    warm: int
    environments: list[EnvironmentReport] = []


class AssignedSession(BaseModel):
    session_id: str
    state: SessionState
    user: str
    org: str
    instance_type: InstanceType


class RunnerDesired(BaseModel):
    """What the control plane wants this runner to hold: sessions not listed are to be wiped."""

    sessions: list[AssignedSession]
    ca_public_key: str


class EnvironmentReady(BaseModel):
    env_id: str

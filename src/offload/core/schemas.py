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
  POST /sessions/{id}/activity        ActivityReport -> SessionInfo  (the agent: activity seen)
  POST /sessions/{id}/prompt          PromptAnswer -> SessionInfo    (keep | idle)
  POST /sessions/{id}/idle            -> SessionInfo                 (go idle now)
  GET  /me/settings                   -> UserSettings
  PUT  /me/settings                   UserSettingsUpdate -> UserSettings
  GET  /usage                         -> UsageReport                 (my insights)
  GET  /orgs/{org}/settings           -> OrgSettings                 (members read)
  PUT  /orgs/{org}/settings           OrgSettingsUpdate -> OrgSettings   (owners only)
  GET  /orgs/{org}/billing            -> OrgBilling                  (members read)
  PUT  /orgs/{org}/billing            OrgBillingUpdate -> OrgBilling     (owners only)
  POST /orgs/{org}/billing/trial-credits  TrialCreditGrant -> OrgBilling (owners only)
  GET  /orgs/{org}/usage              -> OrgUsage                    (this month vs allowance)

Device login (no auth; RFC 8628, used by `offload login --server URL` without a token)
  POST /device/code                   DeviceCodeRequest -> DeviceCodeResponse
  POST /device/token                  DeviceTokenRequest -> DeviceTokenResponse
        (400 DeviceTokenError while pending: authorization_pending | slow_down, or at the end:
         access_denied | expired_token | invalid_grant)

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
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, Strict, StrictBool

API_PREFIX = "/api/v1"
# How long a client keeps an idle connection to the control plane for its next request.
# httpx's default (5 s) is the agent's report cadence (agent/activity.py), so nearly every report
# found its connection just expired: a TCP and, over HTTPS, a TLS handshake every 5 s per laptop.
# The server keeps idle connections longer (server/main.py), so the side that reuses one is the
# side that drops it, and no request races a server-side close.
CLIENT_KEEPALIVE_S = 30.0
API_VERSION = "1"

# The one unix-socket name a client may ask the runner's SSH endpoint for: the runner maps it to
# the engine of the session named by the client's certificate, never to any other path.
ENGINE_CHANNEL_PATH = "/docker.sock"
# Build requests (`/build`, BuildKit's `/session`) go here instead: the runner maps it to the
# persistent builder of the session's organisation (its shared build cache), lets only build
# requests through, and moves each built image into the session's engine before the build ends.
BUILDER_CHANNEL_PATH = "/builder.sock"
# Each environment's engine also listens here, inside its mount area, so that a container given
# `-v /var/run/docker.sock:/var/run/docker.sock` talks to the session's own engine (under the
# same policy), as it would to the local one.
ENGINE_SOCKET_IN_MOUNT_AREA = ".docker.sock"

# The largest count or amount a request may carry: what an INTEGER column holds in every database
# the control plane runs on (PostgreSQL's is 32-bit); a larger one is refused as invalid input.
MAX_INT = 2**31 - 1
# Ranges the control plane's services enforce, each with its own message and fix; they are
# documented here (json_schema_extra), not validated, so that a dashboard form's value gets the
# service's answer rather than a pydantic error.
IDLE_TIMEOUT_RANGE: dict[str, Any] = {"minimum": 10, "maximum": 3600}
BUILDER_CACHE_RANGE: dict[str, Any] = {"minimum": 10 * 1000**2, "maximum": 100 * 1000**4}


def _integral(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# The integers (JsonInt) and booleans (StrictBool) of requests are JSON's: 5 (or 5.0) is an
# integer, true a boolean, where pydantic's lax mode would also take true or "5" for an
# integer, and 0 or "yes" for a boolean.
# An optional one with bounds spells them out before the validator (`Annotated[int, Field(…),
# Strict(), BeforeValidator(_integral)] | None`): else the document reads `ge`/`le` for them.
JsonInt = Annotated[int, Strict(), BeforeValidator(_integral)]


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


# Engine labels (`docker info`) the runner writes and the agent and diagnose read: the sandbox's
# kind ("rootless"), and the environment's id.
ENGINE_ISOLATION_LABEL = "offload.isolation"
ENGINE_ENV_LABEL = "offload.environment"

# ---- GPUs ------------------------------------------------------------------------------------

MAX_GPUS_PER_RUNNER = 64
# Labels of a GPU session's engine (`docker info`): the UUIDs of the GPUs it sees, and what
# serves `docker run --gpus` there ("nvidia-container-toolkit", or "none": the runner has no
# toolkit, so --gpus fails). `offload diagnose` reads them.
ENGINE_GPU_LABEL = "offload.gpus"
ENGINE_GPU_RUNTIME_LABEL = "offload.gpu-runtime"
GPU_RUNTIME_NONE = "none"


class GpuDevice(BaseModel):
    """One GPU a runner offers, as NVML describes it (`offload.runner.gpus`)."""

    uuid: str = Field(min_length=1, max_length=96, description="NVML's UUID, e.g. GPU-5d1c…")
    index: JsonInt = Field(ge=0, le=1024, description="NVML index on the runner host")
    model: str = Field(max_length=128, description="e.g. NVIDIA H200")
    memory_bytes: JsonInt = Field(ge=0, le=2**53)
    driver_version: str = Field(default="", max_length=64)
    # Sampled by the runner at each heartbeat (None: NVML gives no value for this GPU).
    utilization_percent: (
        Annotated[int, Field(ge=0, le=100), Strict(), BeforeValidator(_integral)] | None
    ) = None
    memory_used_bytes: (
        Annotated[int, Field(ge=0, le=2**53), Strict(), BeforeValidator(_integral)] | None
    ) = None
    # A warm GPU environment holds this GPU, ready for the next session placed on it.
    warm: StrictBool = False

    def describe(self) -> str:
        """'NVIDIA H200, 141 GiB, 87% busy, 40 GiB used' (what NVML gave)."""
        parts = [self.model, f"{self.memory_bytes / 1024**3:.0f} GiB"]
        if self.utilization_percent is not None:
            parts.append(f"{self.utilization_percent}% busy")
        if self.memory_used_bytes is not None:
            parts.append(f"{self.memory_used_bytes / 1024**3:.1f} GiB used")
        return ", ".join(parts)


# ---- sessions ---------------------------------------------------------------------------------


class SessionCreate(BaseModel):
    org: str | None = None  # None: the user's default organisation
    gpu: StrictBool = False
    idle_timeout_s: (
        Annotated[int, Field(ge=10, le=3600), Strict(), BeforeValidator(_integral)] | None
    ) = None
    client_public_key: str = Field(description="OpenSSH public key line of the agent's key")
    client_name: str = Field(default="", max_length=255, description="hostname of the laptop")
    # Move the user's live session from another machine to this one (its old key stops working).
    takeover: StrictBool = False


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
    # Lifecycle, as the control plane sees it when answering (see docs/activity.md).
    last_activity_at: datetime | None = None
    time_until_idle_s: float | None = None  # active sessions: seconds left before idle
    idle_since: datetime | None = None
    grace_ends_at: datetime | None = None  # idle sessions: destroyed at this instant
    prompt: Prompt | None = None  # a question the user should answer (POST …/prompt)
    fair_use_remaining_s: float | None = None  # of the user's 8 compute hours this UTC day
    fair_use_policy: FairUsePolicy | None = None
    billed_s: float | None = None  # this session's billed seconds so far
    # GPU sessions: the assigned GPU(s), with the utilisation of the runner's last heartbeat.
    gpu_devices: list[GpuDevice] = []
    warnings: list[str] = []
    end_reason: str | None = None
    # Set once, in the answer that created a session right after the previous one was wiped.
    replaced_session_notice: str | None = None


# ---- runners ----------------------------------------------------------------------------------


class RunnerRegister(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    ssh_host: str = Field(min_length=1, max_length=255)
    ssh_port: JsonInt = Field(ge=1, le=65535)
    host_key: str
    capacity: JsonInt = Field(
        ge=0, le=MAX_INT, description="environments this runner can hold at once"
    )
    instance_types: list[InstanceType] = [InstanceType.STANDARD]
    # Deprecated: a count without devices, from runners older than GPU discovery; such a
    # runner takes no GPU session. `gpu_devices` is what placement uses.
    gpus: JsonInt = Field(default=0, ge=0, le=MAX_INT)
    gpu_devices: list[GpuDevice] = Field(default=[], max_length=MAX_GPUS_PER_RUNNER)


class RunnerRegistered(BaseModel):
    id: str
    ca_public_key: str = Field(description="OpenSSH public key of the session certificate CA")
    heartbeat_interval_s: float


class EnvironmentReport(BaseModel):
    env_id: str
    session_id: str | None = None  # None: a warm, unassigned environment
    state: str  # "warm" | "bound" | "paused" | "destroying"
    # What the environment's engine holds (bound environments): a running container counts as
    # activity; images feed the usage insights.
    running_containers: JsonInt = Field(default=0, ge=0, le=MAX_INT)
    containers_total: JsonInt = Field(default=0, ge=0, le=MAX_INT)
    # Images of the containers it holds and of those created since the last answered heartbeat.
    images: list[str] = []
    # Containers created since the environment was bound, `docker run --rm` ones included: a
    # running total, so the control plane keeps the highest it saw (a retry counts nothing twice).
    containers_created: JsonInt = Field(default=0, ge=0, le=MAX_INT)
    # Seconds its organisation's builder was busy with builds this session began (concurrent
    # builds count once): a running total since bind, billed by the control plane as it grows.
    build_seconds: float = Field(default=0, ge=0, le=MAX_INT, allow_inf_nan=False)


class RunnerHeartbeat(BaseModel):
    capacity: JsonInt = Field(ge=0, le=MAX_INT)
    warm: JsonInt = Field(ge=0, le=MAX_INT)
    environments: list[EnvironmentReport] = []
    # The GPUs offered now, with utilisation (None: unchanged since registration).
    gpu_devices: list[GpuDevice] | None = Field(default=None, max_length=MAX_GPUS_PER_RUNNER)


class AssignedSession(BaseModel):
    session_id: str
    state: SessionState
    user: str
    org: str
    instance_type: InstanceType
    # True while the session is idle: pause the environment's containers; false: unpause them.
    paused: bool = False
    # SHA256 fingerprint (`SHA256:…`) of the one client key allowed now; after a takeover,
    # connections authenticated with another key are to be dropped.
    client_key_fingerprint: str | None = None
    # The user's role in the organisation (owners may prune its builder's cache), and the
    # organisation's limit for that cache (None: the runner's default).
    org_role: Role = Role.MEMBER
    builder_keep_storage_bytes: int | None = None
    # GPU sessions: the UUIDs of the runner's GPUs assigned to this session, and to no other
    # live one. The environment's engine sees these and nothing else.
    gpu_uuids: list[str] = []


class RunnerDesired(BaseModel):
    """What the control plane wants this runner to hold: sessions not listed are to be wiped."""

    sessions: list[AssignedSession]
    ca_public_key: str


class EnvironmentReady(BaseModel):
    env_id: str = Field(min_length=1, max_length=64)


# ---- lifecycle, settings, billing and usage (issue 3) ----------------------------------------


class FairUsePolicy(StrEnum):
    """What happens once a user has 8 compute hours in a UTC day."""

    WARN = "warn"  # a warning in SessionInfo.warnings; nothing else changes
    PROMPT = "prompt"  # a keep/idle prompt every hour instead of every 3 hours
    STOP = "stop"  # the session ends and new ones are refused until the next UTC day


class PromptReason(StrEnum):
    QUIET = "quiet"  # no activity for 3 minutes (or more: see docs/activity.md)
    LONG_SESSION = "long_session"  # every 3 hours of session
    FAIR_USE = "fair_use"  # every hour past 8 compute hours in the day (policy `prompt`)


class PromptAnswerChoice(StrEnum):
    KEEP = "keep"
    IDLE = "idle"


class Prompt(BaseModel):
    id: str
    reason: PromptReason
    message: str
    asked_at: datetime
    expires_at: datetime  # no answer by then: the session goes idle


class PromptAnswer(BaseModel):
    answer: PromptAnswerChoice
    prompt_id: str | None = None  # when given, must be the open prompt's id


class ActivityReport(BaseModel):
    """What the agent saw since its last report (see docs/activity.md)."""

    api_calls: JsonInt = Field(default=0, ge=0)
    open_streams: JsonInt = Field(default=0, ge=0)
    building: StrictBool = False


class OffloadAccess(StrEnum):
    """Whether members may use Offload, in the five states of Docker's settings management."""

    ALWAYS_ENABLED = "always_enabled"  # on; members cannot turn it off
    ENABLED = "enabled"  # on unless a member turns it off in their personal settings
    DISABLED = "disabled"  # off unless a member turns it on in their personal settings
    ALWAYS_DISABLED = "always_disabled"  # off for everyone (offload_enabled false)
    USER_DEFINED = "user_defined"  # each member decides; on until they turn it off


class UserSettings(BaseModel):
    idle_timeout_s: int | None = None  # None: the organisation's default
    default_org: str | None = None
    # Personal Offload switch, honoured where the organisation's access lets members choose;
    # None: the organisation's default.
    offload_enabled: bool | None = None


class UserSettingsUpdate(BaseModel):
    """Only the fields sent change; `idle_timeout_s: null` goes back to the org's default."""

    idle_timeout_s: JsonInt | None = Field(default=None, json_schema_extra=IDLE_TIMEOUT_RANGE)
    default_org: str | None = None
    offload_enabled: StrictBool | None = None


class OrgSettings(BaseModel):
    org: str
    offload_enabled: bool = True
    offload_access: OffloadAccess | None = None  # None: a server older than the access states
    idle_timeout_default_s: int | None = None  # None: the server's default
    idle_timeout_locked: bool = False
    fair_use_policy: FairUsePolicy = FairUsePolicy.PROMPT
    # The organisation's build cache is garbage-collected to this size (None: the runner's).
    builder_cache_limit_bytes: int | None = None
    # Owners may turn GPU sessions off, or cap how many run at once (None: no cap).
    gpu_sessions_allowed: bool = True
    gpu_session_limit: int | None = None
    owners: list[str] = []


class OrgSettingsUpdate(BaseModel):
    """Only the fields sent change."""

    offload_enabled: StrictBool | None = None
    # Wins over offload_enabled when both are sent; always_disabled means offload_enabled false.
    offload_access: OffloadAccess | None = None
    idle_timeout_default_s: JsonInt | None = Field(
        default=None, json_schema_extra=IDLE_TIMEOUT_RANGE
    )
    idle_timeout_locked: StrictBool | None = None
    fair_use_policy: FairUsePolicy | None = None
    # Sent as null: back to the runner's default.
    builder_cache_limit_bytes: JsonInt | None = Field(
        default=None, json_schema_extra=BUILDER_CACHE_RANGE
    )
    gpu_sessions_allowed: StrictBool | None = None
    # Sent as null: no cap.
    gpu_session_limit: (
        Annotated[int, Field(ge=0, le=10_000), Strict(), BeforeValidator(_integral)] | None
    ) = None


class TrialCredit(BaseModel):
    amount_cents: int
    granted_at: datetime
    expires_at: datetime
    remaining_cents: float | None = None


class OrgBilling(BaseModel):
    org: str
    # None: the organisation is not metered (the self-hosted default): no limit applies.
    committed_minutes_per_month: int | None = None
    on_demand_enabled: bool = False
    on_demand_limit_cents: int | None = None  # None: no monthly limit
    rates_cents_per_minute: dict[InstanceType, float] = {}
    trial_credits: list[TrialCredit] = []


class OrgBillingUpdate(BaseModel):
    """Only the fields sent change; `committed_minutes_per_month: null` makes the org unmetered,
    `on_demand_limit_cents: null` removes the on-demand limit."""

    committed_minutes_per_month: (
        Annotated[int, Field(ge=0, le=MAX_INT), Strict(), BeforeValidator(_integral)] | None
    ) = None
    on_demand_enabled: StrictBool | None = None
    on_demand_limit_cents: (
        Annotated[int, Field(ge=0, le=MAX_INT), Strict(), BeforeValidator(_integral)] | None
    ) = None
    # 0 or more, and finite (enforced by the billing service).
    rates_cents_per_minute: (
        dict[InstanceType, Annotated[float, Field(strict=True, json_schema_extra={"minimum": 0})]]
        | None
    ) = None


class TrialCreditGrant(BaseModel):
    amount_cents: JsonInt = Field(gt=0, le=MAX_INT)


class OrgUsage(BaseModel):
    """One organisation's month (UTC calendar month) against its allowance."""

    org: str
    month_start: datetime
    used_minutes: float
    metered: bool
    committed_minutes: int | None = None
    committed_left_minutes: float | None = None
    trial_left_cents: float = 0
    on_demand_enabled: bool = False
    on_demand_spent_cents: float = 0
    on_demand_left_cents: float | None = None  # None: no limit
    standard_minutes_left: float | None = None  # None: unlimited


class SessionSummary(BaseModel):
    id: str
    org: str
    state: SessionState
    instance_type: InstanceType
    client_name: str = ""
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    billed_s: float = 0
    containers: int = 0
    end_reason: str | None = None
    gpu_model: str | None = None  # GPU sessions: the model of the GPU it had
    gpu_devices: list[GpuDevice] = []  # live GPU sessions: the GPU, with its utilisation
    # Its organisation's builder busy with its builds: billed to the organisation beside
    # `billed_s` (at the builder's instance rate), not counted in fair use.
    build_s: float = 0


class ImageUse(BaseModel):
    image: str
    sessions: int


class ActivityEntry(BaseModel):
    """One stretch of billed use (active, with idle gaps under 5 minutes merged in)."""

    session_id: str
    start: datetime
    duration_s: float
    containers: int


class UsageReport(BaseModel):
    user: str
    now: datetime
    total_billed_s: float
    today_billed_s: float  # this UTC day
    fair_use_limit_s: float
    fair_use_remaining_s: float
    recent_sessions: list[SessionSummary]
    active_sessions: list[SessionSummary]
    top_images: list[ImageUse]
    recent_activity: list[ActivityEntry]
    orgs: list[OrgUsage]


# ---- device login (RFC 8628) -------------------------------------------------------------------

DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"


class DeviceCodeRequest(BaseModel):
    client_name: str = Field(default="", max_length=255, description="hostname of the laptop")


class DeviceCodeResponse(BaseModel):
    device_code: str  # secret of the CLI: only ever sent in a POST body
    user_code: str  # what the user types or confirms in the browser, e.g. BCDF-GHJK
    verification_uri: str
    verification_uri_complete: str
    expires_in: int
    interval: int  # seconds between polls of POST /device/token


class DeviceTokenRequest(BaseModel):
    device_code: str = Field(min_length=1, max_length=128)
    grant_type: str = DEVICE_GRANT_TYPE


class DeviceTokenResponse(BaseModel):
    access_token: str  # an API token (off_u_…), shown once
    token_type: str = "Bearer"
    user: UserInfo


class DeviceTokenError(BaseModel):
    """RFC 8628 section 3.5: `error` says whether to keep polling."""

    error: str  # authorization_pending | slow_down | access_denied | expired_token | invalid_grant
    error_description: str = ""


# ---- security: password changes, lockouts, the audit log ---------------------------------------


class PasswordChange(BaseModel):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=8, max_length=1024)


class AuditAction(StrEnum):
    SIGN_IN = "auth.sign_in"
    SIGN_IN_FAILED = "auth.sign_in_failed"
    ACCOUNT_LOCKED = "auth.account_locked"
    ACCOUNT_UNLOCKED = "auth.account_unlocked"
    SIGN_OUT = "auth.sign_out"
    PASSWORD_CHANGED = "auth.password_changed"
    DEVICE_APPROVED = "auth.device_login_approved"
    DEVICE_DENIED = "auth.device_login_denied"
    TOKEN_CREATED = "token.created"
    TOKEN_REVOKED = "token.revoked"
    MEMBER_ADDED = "member.added"
    MEMBER_ROLE_CHANGED = "member.role_changed"
    MEMBER_REMOVED = "member.removed"
    SETTINGS_CHANGED = "org.settings_changed"
    BILLING_CHANGED = "org.billing_changed"
    TRIAL_CREDIT_GRANTED = "org.trial_credit_granted"
    SESSION_TAKEOVER = "session.takeover"
    RUNNER_REGISTERED = "runner.registered"
    RUNNER_TOKEN_CREATED = "runner.token_created"
    RUNNER_DRAINED = "runner.drain_changed"


AuditDetail = str | int | float | bool | None


class AuditEventView(BaseModel):
    id: int
    at: datetime
    action: AuditAction
    actor: str  # a username, `runner NAME`, or `someone` for an unknown caller
    subject: str | None = None  # the account acted on, when it is not the actor's own
    target: str = ""  # what was acted on: a token's name and prefix, a setting, a session
    address: str | None = None  # the client address the request came from
    details: dict[str, AuditDetail] = Field(default_factory=dict)


class AuditLog(BaseModel):
    org: str
    events: list[AuditEventView]  # newest first
    next_before: int | None = None  # pass as `before` for the next (older) page


class RunnerAdminView(BaseModel):
    """One runner host as the operator sees it (`offload admin runners`)."""

    name: str
    id: str
    ssh: str  # host:port users' tunnels reach
    online: bool  # heartbeat within the server's runner timeout
    draining: bool  # takes no new sessions
    last_heartbeat_at: datetime | None
    capacity: int
    live_sessions: int
    free: int  # slots a new session could take now (0 when offline or draining)
    warm: int  # environments started ahead of demand
    instance_types: list[InstanceType]
    gpus: int
    gpu_devices: list[GpuDevice] = []
    gpus_busy: int = 0  # assigned to live sessions
    sessions: list[str]


class RunnerFleet(BaseModel):
    runners: list[RunnerAdminView]
    online: int
    live_sessions: int
    free: int


class Lockout(BaseModel):
    username: str
    locked: bool
    locked_until: datetime | None = None


SessionInfo.model_rebuild()

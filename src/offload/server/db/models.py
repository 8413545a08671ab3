"""The control plane's tables (SQLAlchemy 2, typed).

Every schema change goes through an Alembic revision in `migrations/versions/`; the models and the
migrations are compared by a unit test so they cannot drift apart.

Identifiers are strings: uuid4 hex for users, organisations, tokens and runners; sessions carry a
short, human-friendly id (`ses_` + 12 hex characters) because users read and type it and it is the
principal of their SSH certificate.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from offload.server.db.types import UtcDateTime


def new_id() -> str:
    return uuid.uuid4().hex


# Named constraints: PostgreSQL and later ALTERs (SQLite batch mode) need names to find them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JSON, list[str]: JSON}


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]
    default_org_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("organizations.id", ondelete="SET NULL")
    )
    # Personal idle timeout (`start --idle-timeout` default); None: the organisation's default.
    idle_timeout_s: Mapped[int | None]
    # Personal Offload switch (core.schemas.OffloadAccess says when it counts); None: org default.
    offload_enabled: Mapped[bool | None] = mapped_column(Boolean)

    default_org: Mapped[Organization | None] = relationship()
    memberships: Mapped[list[Membership]] = relationship(back_populates="user")


class Membership(Base):
    __tablename__ = "memberships"

    # The primary key is the (user, organisation) pair: one role per user in each organisation.
    user_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    org_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(16))  # core.schemas.Role
    created_at: Mapped[datetime]

    user: Mapped[User] = relationship(back_populates="memberships")
    org: Mapped[Organization] = relationship()


class ApiToken(Base):
    """A user's API token. Only its sha256 is kept; `prefix` lets a user tell tokens apart."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class RunnerToken(Base):
    """A token that lets a runner host register and heartbeat. Only its sha256 is kept."""

    __tablename__ = "runner_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class Runner(Base):
    __tablename__ = "runners"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    ssh_host: Mapped[str] = mapped_column(String(255))
    ssh_port: Mapped[int]
    host_key: Mapped[str] = mapped_column(Text)
    capacity: Mapped[int]
    instance_types: Mapped[list[str]]
    gpus: Mapped[int] = mapped_column(default=0)
    # core.schemas.GpuDevice dicts, as the runner last reported them (utilisation included).
    gpu_devices: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    registered_at: Mapped[datetime]
    last_heartbeat_at: Mapped[datetime | None]
    warm: Mapped[int] = mapped_column(default=0)
    # `offload runner drain`: no new sessions are placed here; live ones run to their end.
    draining: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The runner token that registered it last: a token acts only for its own runners.
    token_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("runner_tokens.id", ondelete="SET NULL")
    )


class OffloadSession(Base):
    """One user's remote environment, from `offload start` to its end (table `sessions`)."""

    __tablename__ = "sessions"
    __table_args__ = (
        Index("ix_sessions_user_state", "user_id", "state"),
        Index("ix_sessions_runner_state", "runner_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(32), ForeignKey("users.id", ondelete="CASCADE"))
    org_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    runner_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("runners.id", ondelete="SET NULL")
    )
    state: Mapped[str] = mapped_column(String(32))  # core.schemas.SessionState
    instance_type: Mapped[str] = mapped_column(String(32))  # core.schemas.InstanceType
    gpu: Mapped[bool] = mapped_column(Boolean, default=False)
    # GPU sessions: the runner's GPU it was given (kept after the end, for usage).
    gpu_uuid: Mapped[str | None] = mapped_column(String(96))
    gpu_model: Mapped[str | None] = mapped_column(String(128))
    idle_timeout_s: Mapped[int]
    client_name: Mapped[str] = mapped_column(String(255), default="")
    client_public_key: Mapped[str] = mapped_column(Text)
    env_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    end_reason: Mapped[str | None] = mapped_column(String(255))
    # Lifecycle (services/lifecycle.py): the quiet clock, the idle moment, the open prompt.
    last_activity_at: Mapped[datetime | None]
    idle_since: Mapped[datetime | None]
    prompt_id: Mapped[str | None] = mapped_column(String(32))
    prompt_reason: Mapped[str | None] = mapped_column(String(32))  # core.schemas.PromptReason
    prompt_asked_at: Mapped[datetime | None]
    prompt_expires_at: Mapped[datetime | None]
    last_long_prompt_at: Mapped[datetime | None]
    # Insights fed by the runner's reports.
    images: Mapped[list[str]] = mapped_column(default=list)
    containers_max: Mapped[int] = mapped_column(default=0)
    # The runner's running total of builder seconds for this session that is billed already.
    build_seconds_billed: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # The "previous session was wiped after idling" notice was shown (once) to its user.
    replacement_noticed: Mapped[bool] = mapped_column(Boolean, default=False)

    user: Mapped[User] = relationship()
    org: Mapped[Organization] = relationship()
    runner: Mapped[Runner | None] = relationship()


class OrgSettingsRow(Base):
    """An organisation's Offload settings; no row means the defaults."""

    __tablename__ = "org_settings"

    org_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    offload_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # core.schemas.OffloadAccess; None (rows from before it existed): derived from offload_enabled.
    offload_access: Mapped[str | None] = mapped_column(String(24))
    idle_timeout_default_s: Mapped[int | None]
    idle_timeout_locked: Mapped[bool] = mapped_column(Boolean, default=False)
    fair_use_policy: Mapped[str] = mapped_column(String(16), default="prompt")
    builder_cache_limit_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_sessions_allowed: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    gpu_session_limit: Mapped[int | None]  # live GPU sessions at once; None: no cap


class GpuClaim(Base):
    """A runner's GPU held by a live session: the primary key makes it one session's at a time.

    Written with the session at placement, deleted when the session ends (`lifecycle.move`)."""

    __tablename__ = "gpu_claims"

    runner_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("runners.id", ondelete="CASCADE"), primary_key=True
    )
    gpu_uuid: Mapped[str] = mapped_column(String(96), primary_key=True)
    session_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("sessions.id", ondelete="CASCADE"), unique=True
    )


class OrgBillingRow(Base):
    """An organisation's billing terms; no row means unmetered."""

    __tablename__ = "org_billing"

    org_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    committed_minutes_per_month: Mapped[int | None]
    on_demand_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    on_demand_limit_cents: Mapped[int | None]
    # InstanceType value -> cents per minute; missing types use the defaults of billing.py.
    rates_cents_per_minute: Mapped[dict[str, Any]] = mapped_column(default=dict)


class TrialCreditRow(Base):
    __tablename__ = "trial_credits"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    amount_cents: Mapped[int]
    granted_at: Mapped[datetime]


class LedgerInterval(Base):
    """One billed stretch of a session: opened when it becomes active, closed when it goes idle
    or ends; reopened (the idle gap billed) when it resumes within the grace period."""

    __tablename__ = "ledger_intervals"
    __table_args__ = (
        Index("ix_ledger_intervals_user_start", "user_id", "start"),
        Index("ix_ledger_intervals_org_start", "org_id", "start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[str] = mapped_column(String(32), ForeignKey("users.id", ondelete="CASCADE"))
    org_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("organizations.id", ondelete="CASCADE")
    )
    instance_type: Mapped[str] = mapped_column(String(32))
    start: Mapped[datetime]
    end: Mapped[datetime | None]  # None: billing now


class WebSession(Base):
    """A signed-in browser. The cookie holds a random token; only its sha256 is kept."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class DeviceCode(Base):
    """A pending `offload login` (RFC 8628): the CLI polls with the device code (kept as sha256),
    the user approves the short user code in the browser; single use."""

    __tablename__ = "device_codes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    device_code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_code: Mapped[str] = mapped_column(String(16), unique=True)
    client_name: Mapped[str] = mapped_column(String(255), default="")
    status: Mapped[str] = mapped_column(String(16))  # services.device_codes.Status
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    # Who approved or denied it, and when.
    user_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("users.id", ondelete="CASCADE")
    )
    decided_at: Mapped[datetime | None]
    last_polled_at: Mapped[datetime | None]


class AuthThrottle(Base):
    """Attempts counted against one abuse limit (services/throttle.py), per scope and key.

    Kept in the database so that every replica counts the same attempts.  Keys never hold what
    was typed: an account key is a hash of the username, an address key the client address."""

    __tablename__ = "auth_throttles"

    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    attempts: Mapped[int] = mapped_column(default=0)
    window_start: Mapped[datetime]
    blocked_until: Mapped[datetime | None]


class AuditEvent(Base):
    """One security-relevant action (services/audit.py): who, what, when, from where.

    Actor and subject are copied as names, without foreign keys, so the log outlives the
    accounts it names; `org_id` is set for organisation actions and None for a user's own
    (sign-ins, tokens), which owners see for their members through `subject_user_id`."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_org_id_id", "org_id", "id"),
        Index("ix_audit_events_subject_user_id_id", "subject_user_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    action: Mapped[str] = mapped_column(String(48))  # core.schemas.AuditAction
    actor: Mapped[str] = mapped_column(String(160))
    actor_user_id: Mapped[str | None] = mapped_column(String(32))
    subject: Mapped[str | None] = mapped_column(String(64))
    subject_user_id: Mapped[str | None] = mapped_column(String(32))
    org_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("organizations.id", ondelete="CASCADE")
    )
    address: Mapped[str | None] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255), default="")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class InstallationFact(Base):
    """What every replica of one installation must agree on, e.g. the session CA's public key
    (runners trust one CA: a replica with another key would sign certificates nobody accepts)."""

    __tablename__ = "installation"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class BuilderInterval(Base):
    """A stretch of the organisation's builder busy with a session's builds: billed to the
    organisation at the builder's instance rate, beside (not inside) the session's own time.

    Written when a heartbeat's running total grows: [report time - growth, report time]."""

    __tablename__ = "builder_intervals"
    __table_args__ = (Index("ix_builder_intervals_org_start", "org_id", "start"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    org_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("organizations.id", ondelete="CASCADE")
    )
    instance_type: Mapped[str] = mapped_column(String(32))
    start: Mapped[datetime]
    end: Mapped[datetime]

"""Organisation settings and who may change them; personal settings; the idle timeout a new
session gets.

Settings: Offload enabled for the organisation, the default idle timeout and whether it is locked,
the fair-use policy.  Members read them; only owners change them (and billing): anyone else gets
PermissionDenied naming the owners to ask.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.errors import InvalidInput, PermissionDenied
from offload.server.db.models import (
    Membership,
    OffloadSession,
    Organization,
    OrgSettingsRow,
    User,
)
from offload.server.services import accounts, tokens

IDLE_TIMEOUT_MIN_S = 10
IDLE_TIMEOUT_MAX_S = 3600
IDLE_TIMEOUT_RANGE = "10 s to 1 h (10-3600 seconds)"


@dataclass(frozen=True)
class OrgPolicy:
    """An organisation's settings, defaults filled in."""

    offload_enabled: bool = True
    idle_timeout_default_s: int | None = None
    idle_timeout_locked: bool = False
    fair_use_policy: s.FairUsePolicy = s.FairUsePolicy.PROMPT
    offload_access: s.OffloadAccess = s.OffloadAccess.ENABLED
    builder_cache_limit_bytes: int | None = None
    gpu_sessions_allowed: bool = True
    gpu_session_limit: int | None = None  # live GPU sessions at once

    def allows(self, personal: bool | None) -> bool:
        """Whether a member whose personal switch is `personal` (None: unset) may use Offload."""
        access = self.offload_access
        if not self.offload_enabled or access is s.OffloadAccess.ALWAYS_DISABLED:
            return False
        if access is s.OffloadAccess.ALWAYS_ENABLED:
            return True
        if access is s.OffloadAccess.DISABLED:
            return personal is True
        return personal is not False  # enabled, user defined: on until the member turns it off

    @property
    def member_choice(self) -> bool:
        """Whether members' personal switches count at all."""
        return self.offload_access in (
            s.OffloadAccess.ENABLED,
            s.OffloadAccess.DISABLED,
            s.OffloadAccess.USER_DEFINED,
        )


def check_idle_timeout(seconds: int) -> int:
    if not IDLE_TIMEOUT_MIN_S <= seconds <= IDLE_TIMEOUT_MAX_S:
        raise InvalidInput(
            f"An idle timeout of {seconds} s is out of range.",
            f"Choose an idle timeout from {IDLE_TIMEOUT_RANGE}, e.g. `--idle-timeout 5m`.",
        )
    return seconds


BUILDER_CACHE_MIN = 10 * 1000**2  # 10 MB: BuildKit keeps at least what one build uses
BUILDER_CACHE_MAX = 100 * 1000**4  # 100 TB


def check_cache_limit(limit: int) -> int:
    if not BUILDER_CACHE_MIN <= limit <= BUILDER_CACHE_MAX:
        raise InvalidInput(
            f"A build cache limit of {limit} bytes is out of range.",
            "Choose 10MB to 100TB, e.g. `offload org settings --builder-cache-limit 20GB`, or "
            "`default` (the runner's).",
        )
    return limit


def describe_seconds(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


# ---- membership and permissions -----------------------------------------------------------------


def owner_names(db: Db, org: Organization) -> list[str]:
    return list(
        db.scalars(
            select(User.username)
            .join(Membership, Membership.user_id == User.id)
            .where(Membership.org_id == org.id, Membership.role == s.Role.OWNER.value)
            .order_by(User.username)
        )
    )


def member_org(db: Db, user_id: str, org_name: str) -> tuple[Organization, s.Role]:
    """The organisation and the caller's role in it; PermissionDenied if not a member."""
    org = accounts.find_org(db, org_name)
    membership = db.get(Membership, (user_id, org.id)) if org else None
    if org is None or membership is None:
        raise PermissionDenied(
            f"You are not a member of organisation {org_name!r}.",
            "`offload accounts` lists yours; an owner of the organisation can add you.",
        )
    return org, s.Role(membership.role)


def owned_org(db: Db, user_id: str, org_name: str, what: str) -> Organization:
    """The organisation, if the caller owns it; else PermissionDenied naming its owners."""
    org, role = member_org(db, user_id, org_name)
    if role is not s.Role.OWNER:
        owners = ", ".join(owner_names(db, org)) or "none"
        raise PermissionDenied(
            f"Only owners of {org.name} can change {what}; you are a member.",
            f"Ask an owner: {owners}.",
        )
    return org


# ---- settings -----------------------------------------------------------------------------------


# Built once (services/ledger.py says why): every activity report reads it.
_SETTINGS_ROW = select(OrgSettingsRow).where(OrgSettingsRow.org_id == bindparam("org_id"))


def policy_of(db: Db, org: Organization) -> OrgPolicy:
    row = db.scalars(_SETTINGS_ROW, {"org_id": org.id}).one_or_none()
    if row is None:
        return OrgPolicy()
    return OrgPolicy(
        offload_enabled=row.offload_enabled,
        offload_access=_access_of(row),
        idle_timeout_default_s=row.idle_timeout_default_s,
        idle_timeout_locked=row.idle_timeout_locked,
        fair_use_policy=s.FairUsePolicy(row.fair_use_policy),
        builder_cache_limit_bytes=row.builder_cache_limit_bytes,
        gpu_sessions_allowed=row.gpu_sessions_allowed,
        gpu_session_limit=row.gpu_session_limit,
    )


def _access_of(row: OrgSettingsRow) -> s.OffloadAccess:
    if not row.offload_enabled:
        return s.OffloadAccess.ALWAYS_DISABLED
    if row.offload_access is None or row.offload_access == s.OffloadAccess.ALWAYS_DISABLED:
        return s.OffloadAccess.ENABLED  # rows from before the access states, or out of step
    return s.OffloadAccess(row.offload_access)


def _apply_access(row: OrgSettingsRow, update: s.OrgSettingsUpdate) -> None:
    """`offload_access` wins; the older `offload_enabled` alone maps onto it."""
    if update.offload_access is not None:
        row.offload_access = update.offload_access.value
        row.offload_enabled = update.offload_access is not s.OffloadAccess.ALWAYS_DISABLED
    elif update.offload_enabled is not None:
        row.offload_enabled = update.offload_enabled
        if not update.offload_enabled:
            row.offload_access = s.OffloadAccess.ALWAYS_DISABLED.value
        elif row.offload_access in (None, s.OffloadAccess.ALWAYS_DISABLED.value):
            row.offload_access = s.OffloadAccess.ENABLED.value


def settings_view(db: Db, org: Organization) -> s.OrgSettings:
    policy = policy_of(db, org)
    return s.OrgSettings(
        org=org.name,
        offload_enabled=policy.offload_enabled,
        offload_access=policy.offload_access,
        idle_timeout_default_s=policy.idle_timeout_default_s,
        idle_timeout_locked=policy.idle_timeout_locked,
        fair_use_policy=policy.fair_use_policy,
        builder_cache_limit_bytes=policy.builder_cache_limit_bytes,
        gpu_sessions_allowed=policy.gpu_sessions_allowed,
        gpu_session_limit=policy.gpu_session_limit,
        owners=owner_names(db, org),
    )


def update_settings(db: Db, org: Organization, update: s.OrgSettingsUpdate) -> None:
    row = db.get(OrgSettingsRow, org.id)
    if row is None:
        defaults = OrgPolicy()
        row = OrgSettingsRow(
            org_id=org.id,
            offload_enabled=defaults.offload_enabled,
            idle_timeout_locked=defaults.idle_timeout_locked,
            fair_use_policy=defaults.fair_use_policy.value,
            gpu_sessions_allowed=defaults.gpu_sessions_allowed,
        )
        db.add(row)
    sent = update.model_fields_set
    _apply_access(row, update)
    if "idle_timeout_default_s" in sent:
        seconds = update.idle_timeout_default_s
        row.idle_timeout_default_s = None if seconds is None else check_idle_timeout(seconds)
    if update.idle_timeout_locked is not None:
        row.idle_timeout_locked = update.idle_timeout_locked
    if update.fair_use_policy is not None:
        row.fair_use_policy = update.fair_use_policy.value
    if "builder_cache_limit_bytes" in sent:
        limit = update.builder_cache_limit_bytes
        row.builder_cache_limit_bytes = None if limit is None else check_cache_limit(limit)
    if update.gpu_sessions_allowed is not None:
        row.gpu_sessions_allowed = update.gpu_sessions_allowed
    if "gpu_session_limit" in sent:
        row.gpu_session_limit = update.gpu_session_limit
    db.flush()


# ---- what a new session gets --------------------------------------------------------------------


def check_gpu_allowed(db: Db, policy: OrgPolicy, org: Organization) -> None:
    """Refuse a GPU session the owners have turned off or capped, naming who and what to do."""
    owners = ", ".join(owner_names(db, org)) or "none"
    if not policy.gpu_sessions_allowed:
        raise PermissionDenied(
            f"Organisation {org.name} does not allow GPU sessions.",
            f"Run `docker offload start` without --gpu, or ask an owner ({owners}) to allow "
            "them: `offload org settings --gpu-sessions allow`.",
        )
    limit = policy.gpu_session_limit
    if limit is None:
        return
    live = db.execute(
        select(OffloadSession.id, User.username)
        .join(User, User.id == OffloadSession.user_id)
        .where(
            OffloadSession.org_id == org.id,
            OffloadSession.gpu.is_(True),
            OffloadSession.state.in_([st.value for st in s.SessionState if st.live]),
        )
        .order_by(OffloadSession.created_at)
    ).all()
    if len(live) >= limit:
        held = ", ".join(f"{session_id} ({username})" for session_id, username in live)
        raise PermissionDenied(
            f"Organisation {org.name} allows {limit} GPU session(s) at once, and "
            f"{len(live)} are live" + (f": {held}." if held else "."),
            f"Try again when one of them stops (`docker offload stop`), or ask an owner "
            f"({owners}) to raise the cap: `offload org settings --gpu-limit N`.",
        )


def idle_timeout_for(
    policy: OrgPolicy, org: Organization, user: User, requested_s: int | None, server_default_s: int
) -> int:
    """The idle timeout of a new session: the one asked for, else the user's setting, else the
    organisation's default, else the server's.  A locked organisation default wins over the
    user's setting and refuses a different explicit request, saying the locked value."""
    org_default = policy.idle_timeout_default_s or server_default_s
    if requested_s is not None:
        check_idle_timeout(requested_s)
    if policy.idle_timeout_locked:
        if requested_s is not None and requested_s != org_default:
            raise InvalidInput(
                f"Organisation {org.name} locks the idle timeout at "
                f"{describe_seconds(org_default)} ({org_default} s); "
                f"{describe_seconds(requested_s)} cannot be used.",
                "Start without --idle-timeout, or ask an owner of the organisation to unlock it.",
            )
        return org_default
    return requested_s or user.idle_timeout_s or org_default


def check_enabled(db: Db, policy: OrgPolicy, org: Organization, user: User | None = None) -> None:
    """Refuse Offload where the organisation's access (and, where members choose, `user`'s
    personal switch) turns it off."""
    if not policy.offload_enabled or policy.offload_access is s.OffloadAccess.ALWAYS_DISABLED:
        owners = ", ".join(owner_names(db, org)) or "none"
        raise PermissionDenied(
            f"Offload is disabled for organisation {org.name}.",
            f"Ask an owner of {org.name} ({owners}) to enable it in the organisation's "
            "settings, or start with another organisation: `docker offload start --account ORG`.",
        )
    if user is not None and not policy.allows(user.offload_enabled):
        state = "off by default" if user.offload_enabled is None else "turned off"
        raise PermissionDenied(
            f"Offload is {state} for you in organisation {org.name}.",
            "Turn on 'Use Offload' in your personal settings on the dashboard (Settings), "
            "or `PUT /api/v1/me/settings` with offload_enabled true.",
        )


# ---- personal settings --------------------------------------------------------------------------


def user_settings(db: Db, auth: tokens.AuthUser) -> s.UserSettings:
    user = db.get_one(User, auth.id)
    return s.UserSettings(
        idle_timeout_s=user.idle_timeout_s,
        default_org=user.default_org.name if user.default_org else None,
        offload_enabled=user.offload_enabled,
    )


def update_user_settings(
    db: Db,
    auth: tokens.AuthUser,
    update: s.UserSettingsUpdate,
    server_default_idle_s: int | None = None,
) -> s.UserSettings:
    """Only the fields sent change; the default organisation must be one of the user's.

    A new personal idle timeout also applies to the user's live session at once (where its
    organisation does not lock the timeout): the agent shows it on its next poll."""
    user = db.get_one(User, auth.id)
    sent = update.model_fields_set
    if "idle_timeout_s" in sent:
        seconds = update.idle_timeout_s
        user.idle_timeout_s = None if seconds is None else check_idle_timeout(seconds)
        if server_default_idle_s is not None:
            _apply_idle_timeout_to_live_sessions(db, user, server_default_idle_s)
    if "default_org" in sent and update.default_org is not None:
        user.default_org_id = accounts.resolve_org(db, user, update.default_org).id
    if "offload_enabled" in sent:
        user.offload_enabled = update.offload_enabled
    db.flush()
    return user_settings(db, auth)


def _apply_idle_timeout_to_live_sessions(db: Db, user: User, server_default_s: int) -> None:
    from offload.server.services.lifecycle import LIVE_STATES  # lifecycle imports this module

    live = db.scalars(
        select(OffloadSession).where(
            OffloadSession.user_id == user.id, OffloadSession.state.in_(LIVE_STATES)
        )
    )
    for session in live:
        org = db.get_one(Organization, session.org_id)
        session.idle_timeout_s = idle_timeout_for(
            policy_of(db, org), org, user, None, server_default_s
        )

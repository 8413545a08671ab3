"""Members and roles of an organisation, as owners manage them from the dashboard.

Invite adds an existing user, or creates the account with a generated password that the owner
passes on (a self-hosted control plane sends no mail).  An organisation always keeps at least
one owner: removing or demoting the last one is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.errors import Conflict, NotFound, PermissionDenied
from offload.server.db.models import Membership, Organization, User
from offload.server.services import accounts, audit, org_settings, sign_in, tokens
from offload.server.services.throttle import Limits
from offload.server.services.tokens import AuthUser


@dataclass(frozen=True)
class MemberView:
    username: str
    role: s.Role
    joined_at: datetime
    locked_until: datetime | None = None  # too many failed sign-ins: owners can unlock


@dataclass(frozen=True)
class Invited:
    username: str
    role: s.Role
    password: str | None  # set when the account was created now: shown once to the owner


def require_owner(db: Db, user_id: str, org_name: str, what: str) -> Organization:
    """The organisation, if the caller owns it; PermissionDenied naming its owners otherwise."""
    org, role = org_settings.member_org(db, user_id, org_name)
    if role is not s.Role.OWNER:
        owners = ", ".join(org_settings.owner_names(db, org)) or "none"
        raise PermissionDenied(
            f"Only owners of {org.name} can see {what}; you are a member.",
            f"Ask an owner ({owners}) if you need it.",
        )
    return org


def members(db: Db, org: Organization) -> list[MemberView]:
    rows = db.execute(
        select(User.username, Membership.role, Membership.created_at)
        .join(Membership, Membership.user_id == User.id)
        .where(Membership.org_id == org.id)
        .order_by(User.username)
    ).all()
    return [MemberView(name, s.Role(role), joined) for name, role, joined in rows]


def _membership(db: Db, org: Organization, username: str) -> tuple[User, Membership]:
    user = accounts.find_user(db, username)
    membership = db.get(Membership, (user.id, org.id)) if user else None
    if user is None or membership is None:
        raise NotFound(f"{username} is not a member of {org.name}.", "Reload the members list.")
    return user, membership


def _owner_count(db: Db, org: Organization) -> int:
    return (
        db.scalar(
            select(func.count())
            .select_from(Membership)
            .where(Membership.org_id == org.id, Membership.role == s.Role.OWNER.value)
        )
        or 0
    )


def _keep_an_owner(db: Db, org: Organization, membership: Membership) -> None:
    if membership.role == s.Role.OWNER.value and _owner_count(db, org) <= 1:
        raise Conflict(
            f"{org.name} would be left without an owner.",
            "Make another member an owner first.",
        )


def invite(db: Db, org: Organization, username: str, role: s.Role, now: datetime) -> Invited:
    user = accounts.find_user(db, username.strip())
    password = None
    if user is None:
        password = tokens.generate_password()
        user = accounts.create_user(db, username.strip(), password, now)
    elif db.get(Membership, (user.id, org.id)) is not None:
        raise Conflict(
            f"{user.username} is already a member of {org.name}.",
            "Change their role in the members list instead.",
        )
    accounts.add_member(db, user, org, role, now)
    return Invited(user.username, role, password)


def set_role(db: Db, org: Organization, username: str, role: s.Role) -> None:
    _, membership = _membership(db, org, username)
    if role is not s.Role.OWNER:
        _keep_an_owner(db, org, membership)
    membership.role = role.value


def remove(db: Db, org: Organization, username: str) -> None:
    user, membership = _membership(db, org, username)
    _keep_an_owner(db, org, membership)
    db.delete(membership)
    db.flush()
    if user.default_org_id == org.id:  # fall back to another organisation of theirs, if any
        user.default_org_id = db.scalar(
            select(Membership.org_id).where(Membership.user_id == user.id).limit(1)
        )


# ---- owners' requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingsPage:
    settings: s.OrgSettings
    members: list[MemberView]


def owner_settings(
    db: Db, auth: AuthUser, org_name: str, limits: Limits, now: datetime
) -> SettingsPage:
    org = require_owner(db, auth.id, org_name, "its settings")
    shown = [
        replace(member, locked_until=sign_in.locked_until(db, limits, member.username, now))
        for member in members(db, org)
    ]
    return SettingsPage(org_settings.settings_view(db, org), shown)


def _subject(db: Db, username: str) -> AuthUser | None:
    user = accounts.find_user(db, username)
    return AuthUser(user.id, user.username) if user else None


def owner_invite(
    db: Db, auth: AuthUser, org_name: str, username: str, role: s.Role, now: datetime
) -> Invited:
    org = org_settings.owned_org(db, auth.id, org_name, "its members")
    invited = invite(db, org, username, role, now)
    details: dict[str, s.AuditDetail] = {
        "role": role.value,
        "account_created": invited.password is not None,
    }
    subject = _subject(db, invited.username)
    audit.record(
        db, now, s.AuditAction.MEMBER_ADDED, auth, org=org, subject=subject, details=details
    )
    return invited


def owner_set_role(
    db: Db, auth: AuthUser, org_name: str, username: str, role: s.Role, now: datetime
) -> None:
    org = org_settings.owned_org(db, auth.id, org_name, "its members")
    set_role(db, org, username, role)
    audit.record(
        db,
        now,
        s.AuditAction.MEMBER_ROLE_CHANGED,
        auth,
        org=org,
        subject=_subject(db, username),
        details={"role": role.value},
    )


def owner_remove(db: Db, auth: AuthUser, org_name: str, username: str, now: datetime) -> None:
    org = org_settings.owned_org(db, auth.id, org_name, "its members")
    remove(db, org, username)
    audit.record(
        db, now, s.AuditAction.MEMBER_REMOVED, auth, org=org, subject=_subject(db, username)
    )


def owner_unlock(
    db: Db, auth: AuthUser, org_name: str, username: str, limits: Limits, now: datetime
) -> s.Lockout:
    """Clear a member's sign-in lockout (owners of an organisation the account belongs to)."""
    org = org_settings.owned_org(db, auth.id, org_name, "its members")
    user, _ = _membership(db, org, username)
    if sign_in.unlock(db, limits, user.username):
        subject = AuthUser(user.id, user.username)
        audit.record(
            db,
            now,
            s.AuditAction.ACCOUNT_UNLOCKED,
            auth,
            org=org,
            subject=subject,
            details={"by": "owner"},
        )
    return s.Lockout(username=user.username, locked=False)


def owner_audit(
    db: Db,
    auth: AuthUser,
    org_name: str,
    limit: int,
    before: int | None,
    action: s.AuditAction | None,
) -> s.AuditLog:
    org = require_owner(db, auth.id, org_name, "its audit log")
    return audit.org_events(db, org, limit, before, action)

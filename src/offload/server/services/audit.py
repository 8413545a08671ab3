"""The audit log: security-relevant actions, recorded in the transaction that does them.

Who (a username, a runner, `someone` for an unknown caller), what (`AuditAction` and a target),
when (the control plane's clock), from where (the client address of the request).  Nothing
secret goes in: tokens appear by name and display prefix only, passwords never, and a failed
sign-in names the account only when it exists (what was typed may be a password).

Owners read their organisation's events and their members' own ones (sign-ins, tokens).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.server.context import client_address
from offload.server.db.models import AuditEvent, Membership, Organization
from offload.server.services.tokens import AuthUser

PAGE_MAX = 500
SOMEONE = "someone"
OPERATOR = "operator"  # the server's own commands (offload up, runner tokens, drains)


def record(
    db: Db,
    now: datetime,
    action: s.AuditAction,
    actor: AuthUser | str,
    *,
    org: Organization | None = None,
    subject: AuthUser | None = None,
    target: str = "",
    details: dict[str, s.AuditDetail] | None = None,
) -> None:
    """Add one event; `subject` is the account acted on (defaults to a user actor's own)."""
    actor_user = actor if isinstance(actor, AuthUser) else None
    subject = subject or actor_user
    db.add(
        AuditEvent(
            at=now,
            action=action.value,
            actor=actor_user.username if actor_user else actor,
            actor_user_id=actor_user.id if actor_user else None,
            subject=subject.username if subject else None,
            subject_user_id=subject.id if subject else None,
            org_id=org.id if org else None,
            address=(client_address() or "")[:64] or None,
            target=target[:255],
            details=details or {},
        )
    )


def token_label(name: str, prefix: str) -> str:
    return f"{name} ({prefix}…)"


def _view(row: AuditEvent) -> s.AuditEventView:
    subject = row.subject if row.subject != row.actor else None
    return s.AuditEventView(
        id=row.id,
        at=row.at,
        action=s.AuditAction(row.action),
        actor=row.actor,
        subject=subject,
        target=row.target,
        address=row.address,
        details=row.details,
    )


def org_events(
    db: Db,
    org: Organization,
    limit: int = 100,
    before: int | None = None,
    action: s.AuditAction | None = None,
) -> s.AuditLog:
    """The organisation's events and its members' own ones, newest first, one page."""
    members = select(Membership.user_id).where(Membership.org_id == org.id)
    query = select(AuditEvent).where(
        or_(
            AuditEvent.org_id == org.id,
            AuditEvent.org_id.is_(None) & AuditEvent.subject_user_id.in_(members),
        )
    )
    if before is not None:
        query = query.where(AuditEvent.id < before)
    if action is not None:
        query = query.where(AuditEvent.action == action.value)
    size = max(1, min(limit, PAGE_MAX))
    rows = list(db.scalars(query.order_by(AuditEvent.id.desc()).limit(size + 1)))
    more = len(rows) > size
    rows = rows[:size]
    return s.AuditLog(
        org=org.name,
        events=[_view(row) for row in rows],
        next_before=rows[-1].id if more else None,
    )

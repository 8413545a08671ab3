"""A user's own API tokens, as the dashboard manages them: list, create (shown once), revoke."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.errors import InvalidInput, NotFound
from offload.server.db.models import ApiToken
from offload.server.services import audit, tokens
from offload.server.services.tokens import AuthUser

NAME_MAX = 64


@dataclass(frozen=True)
class TokenView:
    id: str
    name: str
    prefix: str  # the first characters, so a user can tell tokens apart; never the token
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def list_tokens(db: Db, user_id: str) -> list[TokenView]:
    rows = db.scalars(
        select(ApiToken)
        .where(ApiToken.user_id == user_id)
        .order_by(ApiToken.created_at.desc(), ApiToken.id)
    )
    return [
        TokenView(r.id, r.name, r.prefix, r.created_at, r.last_used_at, r.revoked_at) for r in rows
    ]


def create(db: Db, auth: AuthUser, name: str, now: datetime) -> str:
    name = name.strip()
    if not name or len(name) > NAME_MAX:
        raise InvalidInput(
            "A token needs a name of 1-64 characters.",
            "Name it after where it is used, e.g. 'laptop' or 'ci'.",
        )
    token = tokens.issue_api_token(db, auth.id, name, now)
    label = audit.token_label(name, token[: tokens.DISPLAY_PREFIX_LEN])
    audit.record(
        db, now, s.AuditAction.TOKEN_CREATED, auth, target=label, details={"via": "dashboard"}
    )
    return token


def revoke(db: Db, auth: AuthUser, token_id: str, now: datetime) -> str:
    """Revoke one of the user's tokens (idempotent); returns its name."""
    row = db.get(ApiToken, token_id)
    if row is None or row.user_id != auth.id:
        raise NotFound("You have no such API token.", "Reload the settings page and try again.")
    if row.revoked_at is None:
        row.revoked_at = now
        label = audit.token_label(row.name, row.prefix)
        audit.record(db, now, s.AuditAction.TOKEN_REVOKED, auth, target=label)
    return row.name

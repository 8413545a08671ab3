"""Browser sign-in for the dashboard: password check, session cookies, CSRF tokens.

The cookie carries a random token (256 bits); the database keeps only its sha256, so a leaked
database cannot be replayed as a browser.  Each form carries a CSRF token derived from the
cookie's token with HMAC: an attacker's page can make the browser send the cookie (SameSite=Lax
already stops cross-site POSTs in current browsers) but cannot read it, so it cannot forge the
form field either.  Nothing needs storing for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.errors import InvalidInput
from offload.server.context import ServerContext
from offload.server.db.models import User, WebSession
from offload.server.services import audit, tokens
from offload.server.services import sign_in as sign_in_service
from offload.server.services.tokens import AuthUser

SESSION_COOKIE = "offload_session"
SESSION_LIFETIME = timedelta(hours=12)
_CSRF_LABEL = b"offload-csrf-v1"


@dataclass(frozen=True)
class WebIdentity:
    """A signed-in browser: the user and the cookie token its CSRF tokens derive from."""

    user: AuthUser
    session_token: str

    @property
    def csrf_token(self) -> str:
        return csrf_token_for(self.session_token)


def csrf_token_for(secret: str) -> str:
    return hmac.new(secret.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def csrf_matches(secret: str, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(csrf_token_for(secret), str(sent))


# ---- transactions -------------------------------------------------------------------------------


def _open_tx(db: Db, user_id: str, now: datetime, new_hash: str | None) -> str:
    if new_hash is not None:
        db.get_one(User, user_id).password_hash = new_hash
    # Sign-ins are rare: a good moment to forget expired sessions.
    db.execute(delete(WebSession).where(WebSession.expires_at <= now))
    return _new_session(db, user_id, now)


def _new_session(db: Db, user_id: str, now: datetime) -> str:
    token = secrets.token_urlsafe(32)
    db.add(
        WebSession(
            token_hash=tokens.hash_token(token),
            user_id=user_id,
            created_at=now,
            expires_at=now + SESSION_LIFETIME,
        )
    )
    db.flush()
    return token


def identify(db: Db, token: str, now: datetime) -> AuthUser | None:
    """The user of a session cookie, or None if it is unknown or expired (read only)."""
    row = db.execute(
        select(WebSession, User)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.token_hash == tokens.hash_token(token))
    ).first()
    if row is None or row[0].expires_at <= now:
        return None
    return AuthUser(id=row[1].id, username=row[1].username)


def close(db: Db, token: str, user: AuthUser, now: datetime) -> None:
    db.execute(delete(WebSession).where(WebSession.token_hash == tokens.hash_token(token)))
    audit.record(db, now, s.AuditAction.SIGN_OUT, user)


def close_all(db: Db, user_id: str) -> None:
    """End every browser session of the user (a password change or reset)."""
    db.execute(delete(WebSession).where(WebSession.user_id == user_id))


def _change_password_tx(db: Db, user: AuthUser, new_hash: str, via: str, now: datetime) -> str:
    db.get_one(User, user.id).password_hash = new_hash
    close_all(db, user.id)
    audit.record(db, now, s.AuditAction.PASSWORD_CHANGED, user, details={"via": via})
    return _new_session(db, user.id, now)


# ---- the service --------------------------------------------------------------------------------


async def sign_in(ctx: ServerContext, username: str, password: str) -> str:
    """A new browser session's cookie token for a right username and password (within the
    abuse limits)."""
    verified = await sign_in_service.verify(ctx, username, password, via="dashboard")
    new_hash = None
    if tokens.password_needs_rehash(verified.password_hash):
        new_hash = await asyncio.to_thread(tokens.hash_password, password)
    return await ctx.db.run(_open_tx, verified.user.id, ctx.now(), new_hash)


async def change_password(
    ctx: ServerContext, user: AuthUser, change: s.PasswordChange, via: str
) -> str:
    """Set a new password after checking the current one (counted like a sign-in): every
    browser session of the user ends; returns a new session token for the caller's browser."""
    await sign_in_service.verify(ctx, user.username, change.current_password, via=via)
    if change.new_password == change.current_password:
        raise InvalidInput(
            "The new password is the same as the current one.", "Choose a different one."
        )
    new_hash = await asyncio.to_thread(tokens.hash_password, change.new_password)
    return await ctx.db.run(_change_password_tx, user, new_hash, via, ctx.now())


async def who(ctx: ServerContext, token: str | None) -> WebIdentity | None:
    if not token:
        return None
    user = await ctx.db.read(identify, token, ctx.now())
    return WebIdentity(user, token) if user else None


async def sign_out(ctx: ServerContext, identity: WebIdentity) -> None:
    await ctx.db.run(close, identity.session_token, identity.user, ctx.now())

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

from offload.core.errors import NotAuthenticated
from offload.server.context import ServerContext
from offload.server.db.models import User, WebSession
from offload.server.services import accounts, tokens
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


def _check_password_tx(db: Db, username: str, password: str) -> tuple[str, str]:
    user = accounts.find_user(db, username)
    if not tokens.verify_password(user.password_hash if user else None, password):
        raise NotAuthenticated(
            "Wrong username or password.",
            "Check both and try again; an administrator can reset your password.",
        )
    assert user is not None  # verify_password is False for an unknown user
    return user.id, user.password_hash


def _open_tx(db: Db, user_id: str, now: datetime, new_hash: str | None) -> str:
    if new_hash is not None:
        db.get_one(User, user_id).password_hash = new_hash
    # Sign-ins are rare: a good moment to forget expired sessions.
    db.execute(delete(WebSession).where(WebSession.expires_at <= now))
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


def close(db: Db, token: str) -> None:
    db.execute(delete(WebSession).where(WebSession.token_hash == tokens.hash_token(token)))


# ---- the service --------------------------------------------------------------------------------


async def sign_in(ctx: ServerContext, username: str, password: str) -> str:
    """A new browser session's cookie token for a right username and password.

    argon2 runs in a read transaction so that no write lock is held while it works."""
    user_id, password_hash = await ctx.db.read(_check_password_tx, username, password)
    new_hash = None
    if tokens.password_needs_rehash(password_hash):
        new_hash = await asyncio.to_thread(tokens.hash_password, password)
    return await ctx.db.run(_open_tx, user_id, ctx.now(), new_hash)


async def who(ctx: ServerContext, token: str | None) -> WebIdentity | None:
    if not token:
        return None
    user = await ctx.db.read(identify, token, ctx.now())
    return WebIdentity(user, token) if user else None


async def sign_out(ctx: ServerContext, token: str) -> None:
    await ctx.db.run(close, token)

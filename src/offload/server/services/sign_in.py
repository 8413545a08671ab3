"""Password sign-in, shared by the API's token login and the dashboard's sign-in form.

The abuse limits come first (services/throttle.py: the attempt is counted per account and per
address before the password is looked at), then argon2 in a read transaction (no write lock
held while it works; an unknown username is checked against a dummy hash, so both failures take
the same time), then the outcome is recorded: counters and the audit log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.errors import NotAuthenticated
from offload.server.context import ServerContext, client_address
from offload.server.services import accounts, audit, throttle, tokens
from offload.server.services.throttle import Limits
from offload.server.services.tokens import AuthUser


def wrong_password() -> NotAuthenticated:
    return NotAuthenticated(
        "Wrong username or password.",
        "Check both and try again; an administrator can reset your password.",
    )


@dataclass(frozen=True)
class Verified:
    user: AuthUser
    password_hash: str


@dataclass(frozen=True)
class _Keys:
    account: str
    address: str

    @classmethod
    def of(cls, username: str) -> _Keys:
        return cls(throttle.account_key(username), throttle.address_key(client_address()))


def _begin_tx(db: Db, limits: Limits, keys: _Keys, now: datetime) -> None:
    throttle.begin(db, limits.login_address, keys.address, now)
    throttle.begin(db, limits.login_account, keys.account, now)


def _check_tx(db: Db, username: str, password: str) -> Verified | None:
    user = accounts.find_user(db, username)
    if not tokens.verify_password(user.password_hash if user else None, password):
        return None
    assert user is not None  # verify_password is False for an unknown user
    return Verified(AuthUser(user.id, user.username), user.password_hash)


def _failed_tx(db: Db, limits: Limits, keys: _Keys, username: str, via: str, now: datetime) -> None:
    user = accounts.find_user(db, username)
    subject = AuthUser(user.id, user.username) if user else None
    throttle.failed(db, limits.login_address, keys.address, now)
    locked = throttle.failed(db, limits.login_account, keys.account, now)
    details: dict[str, s.AuditDetail] = {"via": via, "account_exists": subject is not None}
    audit.record(
        db, now, s.AuditAction.SIGN_IN_FAILED, audit.SOMEONE, subject=subject, details=details
    )
    if locked and subject is not None:
        until = now + limits.login_account.block
        details = {"until": until.isoformat(), "failures": limits.login_account.attempts}
        audit.record(
            db, now, s.AuditAction.ACCOUNT_LOCKED, audit.SOMEONE, subject=subject, details=details
        )


def _succeeded_tx(
    db: Db, limits: Limits, keys: _Keys, user: AuthUser, via: str, now: datetime
) -> None:
    throttle.clear(db, limits.login_account, keys.account)
    throttle.succeeded(db, limits.login_address, keys.address, now)
    throttle.forget_stale(db, now, limits.login_account.window + limits.login_account.block)
    audit.record(db, now, s.AuditAction.SIGN_IN, user, details={"via": via})


async def verify(ctx: ServerContext, username: str, password: str, via: str) -> Verified:
    """The user, for a right username and password within the limits.

    RateLimited when the account or the address has no attempts left; NotAuthenticated for a
    wrong username or password."""
    limits = Limits.from_settings(ctx.settings)
    keys = _Keys.of(username)
    await ctx.db.run(_begin_tx, limits, keys, ctx.now())
    verified = await ctx.db.read(_check_tx, username, password)
    if verified is None:
        await ctx.db.run(_failed_tx, limits, keys, username, via, ctx.now())
        raise wrong_password()
    await ctx.db.run(_succeeded_tx, limits, keys, verified.user, via, ctx.now())
    return verified


def unlock(db: Db, limits: Limits, username: str) -> bool:
    """Clear the account's sign-in lockout; True if it was locked."""
    return throttle.clear(db, limits.login_account, throttle.account_key(username))


def locked_until(db: Db, limits: Limits, username: str, now: datetime) -> datetime | None:
    return throttle.blocked_until(db, limits.login_account, throttle.account_key(username), now)

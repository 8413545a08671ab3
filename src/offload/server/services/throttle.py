"""Abuse limits: attempts counted per scope and key in the database, so every replica counts
the same ones.

A key may make `limit.attempts` attempts in a window of `limit.window`.  Every attempt is counted
*before* it is checked, so parallel guesses cannot slip past the count; a successful one is
uncounted again (or the key forgotten).  When the last allowed attempt fails, the key is blocked
for `limit.block` (for an account: a temporary lockout, which an owner or the account's own
device login clears).  A blocked key is refused with `RateLimited` (429 and `Retry-After`)
without the password or code being looked at.

Keys never hold what was typed: an account is a hash of the username (an unknown username is
counted like a real one, so a lockout reveals nothing), an address is the client's address.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session as Db

from offload.core.config import ServerSettings
from offload.core.errors import RateLimited
from offload.server.db.engine import insert_for
from offload.server.db.models import AuthThrottle


@dataclass(frozen=True)
class Limit:
    scope: str
    attempts: int
    window: timedelta
    block: timedelta
    refusal: str  # "{retry}" is replaced with the wait, e.g. "14 min"
    fix: str


@dataclass(frozen=True)
class Limits:
    login_account: Limit
    login_address: Limit
    device_address: Limit

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Limits:
        window = timedelta(seconds=settings.login_window_s)
        minute = timedelta(minutes=1)
        return cls(
            login_account=Limit(
                "login_account",
                settings.login_failures_per_account,
                window,
                timedelta(seconds=settings.login_lockout_s),
                "Too many failed sign-ins for this account: it is locked for {retry}.",
                "Wait and try again; or approve a device login (`offload login --server URL`) "
                "in a browser that is still signed in; an owner of your organisation can "
                "unlock it at once (`offload org unlock USERNAME`).",
            ),
            login_address=Limit(
                "login_address",
                settings.login_failures_per_address,
                window,
                window,
                "Too many failed sign-ins from your address: sign-ins are refused for {retry}.",
                "Wait and try again.",
            ),
            device_address=Limit(
                "device_address",
                settings.device_requests_per_address_per_minute,
                minute,
                minute,
                "Too many device-login requests from your address: wait {retry}.",
                "Poll no faster than the `interval` the server gives (5 s).",
            ),
        )


def account_key(username: str) -> str:
    return "user:" + hashlib.sha256(username.encode()).hexdigest()[:40]


def address_key(address: str | None) -> str:
    return "addr:" + (address or "unknown")[:64]


def _row(db: Db, limit: Limit, key: str, now: datetime) -> AuthThrottle:
    """The key's counter, created if missing, locked against other replicas' attempts."""
    statement = insert_for(db)(AuthThrottle).values(
        scope=limit.scope, key=key, attempts=0, window_start=now, blocked_until=None
    )
    db.execute(statement.on_conflict_do_nothing(index_elements=["scope", "key"]))
    return db.scalars(
        select(AuthThrottle)
        .where(AuthThrottle.scope == limit.scope, AuthThrottle.key == key)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()


def _refuse(limit: Limit, until: datetime, now: datetime) -> RateLimited:
    seconds = max(1, math.ceil((until - now).total_seconds()))
    wait = f"{seconds} s" if seconds < 120 else f"{math.ceil(seconds / 60)} min"
    return RateLimited(limit.refusal.format(retry=wait), limit.fix, retry_after_s=seconds)


def begin(db: Db, limit: Limit, key: str, now: datetime) -> None:
    """Count one attempt of `key`, or raise RateLimited if it has none left."""
    row = _row(db, limit, key, now)
    if row.blocked_until is not None and now < row.blocked_until:
        raise _refuse(limit, row.blocked_until, now)
    if row.blocked_until is not None or now >= row.window_start + limit.window:
        row.attempts, row.window_start, row.blocked_until = 0, now, None
    if row.attempts >= limit.attempts:  # the rest are in flight
        raise _refuse(limit, row.window_start + limit.window, now)
    row.attempts += 1


def failed(db: Db, limit: Limit, key: str, now: datetime) -> bool:
    """A counted attempt failed; True if it used the last one (the key is blocked now)."""
    row = _row(db, limit, key, now)
    if row.attempts >= limit.attempts and row.blocked_until is None:
        row.blocked_until = now + limit.block
        return True
    return False


def succeeded(db: Db, limit: Limit, key: str, now: datetime) -> None:
    """A counted attempt succeeded: it does not count against the key."""
    row = _row(db, limit, key, now)
    row.attempts = max(0, row.attempts - 1)


def clear(db: Db, limit: Limit, key: str) -> bool:
    """Forget the key's attempts and any block; True if it was blocked."""
    row = db.get(AuthThrottle, (limit.scope, key))
    if row is None:
        return False
    was_blocked = row.blocked_until is not None
    db.delete(row)
    return was_blocked


def blocked_until(db: Db, limit: Limit, key: str, now: datetime) -> datetime | None:
    row = db.get(AuthThrottle, (limit.scope, key))
    if row is None or row.blocked_until is None or row.blocked_until <= now:
        return None
    return row.blocked_until


def forget_stale(db: Db, now: datetime, older_than: timedelta) -> None:
    """Drop counters no attempt touched for `older_than` (called on sign-ins: they are rare)."""
    db.execute(
        delete(AuthThrottle).where(
            AuthThrottle.window_start < now - older_than,
            (AuthThrottle.blocked_until.is_(None)) | (AuthThrottle.blocked_until < now),
        )
    )

"""Secrets at rest: argon2 password hashes, API and runner tokens kept only as sha256.

A token is shown once when issued; the database holds its sha256 (tokens are long random
strings, so a fast hash is enough, unlike passwords) and a short prefix for display.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session as Db

from offload.core.errors import InvalidInput, NotAuthenticated
from offload.server.db.engine import execute_columns
from offload.server.db.models import ApiToken, RunnerToken, User

USER_TOKEN_PREFIX = "off_u_"
RUNNER_TOKEN_PREFIX = "off_r_"
DISPLAY_PREFIX_LEN = 12
# Writing last_used_at on every request would make each read a write; a minute is precise enough.
LAST_USED_RESOLUTION = timedelta(minutes=1)
RUNNER_TOKEN_NAME_MAX = 128  # runner_tokens.name

_hasher = PasswordHasher()
# Verified against when the username is unknown, so both failures take the same time.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def password_needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


def generate_password() -> str:
    return secrets.token_urlsafe(18)


def generate_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_api_token(db: Db, user_id: str, name: str, now: datetime) -> str:
    token = generate_token(USER_TOKEN_PREFIX)
    db.add(
        ApiToken(
            user_id=user_id,
            name=name,
            token_hash=hash_token(token),
            prefix=token[:DISPLAY_PREFIX_LEN],
            created_at=now,
        )
    )
    db.flush()
    return token


def issue_runner_token(db: Db, name: str, now: datetime) -> str:
    if not name or len(name) > RUNNER_TOKEN_NAME_MAX:
        raise InvalidInput(
            f"A runner token needs a name of 1-{RUNNER_TOKEN_NAME_MAX} characters.",
            "Name it after the runner's host, e.g. `gpu-1`.",
        )
    token = generate_token(RUNNER_TOKEN_PREFIX)
    db.add(
        RunnerToken(
            name=name,
            token_hash=hash_token(token),
            prefix=token[:DISPLAY_PREFIX_LEN],
            created_at=now,
        )
    )
    db.flush()
    return token


@dataclass(frozen=True)
class AuthUser:
    """The user a request acts for."""

    id: str
    username: str


@dataclass(frozen=True)
class AuthRunner:
    """The runner token a request carries; it acts only for the runners it registered."""

    token_id: str
    name: str


@dataclass(frozen=True)
class UserTokenCheck:
    user: AuthUser
    token_id: str
    touch_due: bool  # last_used_at is older than LAST_USED_RESOLUTION


# Every request runs one of these: columns, in statements built once (services/ledger.py says why).
_USER_TOKEN = (
    select(ApiToken.id, ApiToken.last_used_at, ApiToken.revoked_at, User.id, User.username)
    .join(User, User.id == ApiToken.user_id)
    .where(ApiToken.token_hash == bindparam("token_hash"))
)
_RUNNER_TOKEN = select(RunnerToken.id, RunnerToken.name, RunnerToken.revoked_at).where(
    RunnerToken.token_hash == bindparam("token_hash")
)


def check_user_token(db: Db, token: str, now: datetime) -> UserTokenCheck:
    """Who `token` belongs to (read only); NotAuthenticated with the fix if nobody."""
    if token.startswith(RUNNER_TOKEN_PREFIX):
        raise NotAuthenticated(
            "A runner token was sent where a user API token is needed.",
            "Use your API token (off_u_…) from `offload login`; runner tokens are for "
            "`offload runner` only.",
        )
    row = execute_columns(db, _USER_TOKEN, {"token_hash": hash_token(token)}).first()
    if row is None:
        raise NotAuthenticated("The API token is not valid or was revoked.")
    token_id, last, revoked_at, user_id, username = row
    if revoked_at is not None:
        raise NotAuthenticated("The API token is not valid or was revoked.")
    return UserTokenCheck(
        user=AuthUser(id=user_id, username=username),
        token_id=token_id,
        touch_due=touch_due(last, now),
    )


def touch_due(last_used_at: datetime | None, now: datetime) -> bool:
    """Whether a token's last use is to be written again (every LAST_USED_RESOLUTION)."""
    return last_used_at is None or now - last_used_at >= LAST_USED_RESOLUTION


# The token's own row only, newest time kept: callers run it row-locked (db/engine.py), without
# the writers' turn, which every live agent's token otherwise joined once a minute.
_TOUCH = (
    update(ApiToken)
    .where(
        ApiToken.id == bindparam("token_id"),
        or_(ApiToken.last_used_at.is_(None), ApiToken.last_used_at < bindparam("now")),
    )
    .values(last_used_at=bindparam("now"))
)


def touch_api_token(db: Db, token_id: str, now: datetime) -> None:
    execute_columns(db, _TOUCH, {"token_id": token_id, "now": now})


def authenticate_runner(db: Db, token: str) -> AuthRunner:
    fix = "Start the runner with a runner token (off_r_…) from `offload up` or an administrator."
    if not token.startswith(RUNNER_TOKEN_PREFIX):
        raise NotAuthenticated("Runner endpoints need a runner token.", fix)
    row = execute_columns(db, _RUNNER_TOKEN, {"token_hash": hash_token(token)}).first()
    if row is None or row.revoked_at is not None:
        raise NotAuthenticated("The runner token is not valid or was revoked.", fix)
    return AuthRunner(token_id=row.id, name=row.name)

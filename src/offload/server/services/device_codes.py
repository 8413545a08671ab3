"""Device login (RFC 8628): `offload login --server URL` without a token.

1. The CLI asks for a code pair (`start`): a long random device code that only the CLI knows
   (kept here as sha256) and a short user code the user reads in the terminal.
2. A signed-in user opens /device, enters or confirms the user code, and approves or denies.
3. The CLI polls with its device code (`poll`): pending, slow down, denied, expired, or - once,
   and only once - a new API token of the approving user.

Codes live `LIFETIME` on the control plane's clock, so tests can expire them.  User codes use
20 consonants (no vowels: no words; no look-alikes like 0/O, 1/I), 8 of them: 2.56e10 codes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import delete, select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.errors import Conflict, NotFound
from offload.server.context import client_address
from offload.server.db.models import DeviceCode, User
from offload.server.services import accounts, audit, sign_in, throttle, tokens
from offload.server.services.throttle import Limits
from offload.server.services.tokens import AuthUser

USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
LIFETIME = timedelta(minutes=10)
POLL_INTERVAL_S = 5
# Polls closer together than this get slow_down (RFC 8628 3.5); lenient on purpose, so a client
# that honours `interval` never meets it.
MIN_POLL_GAP = timedelta(seconds=1)
FORGET_AFTER = timedelta(days=1)
RETRY_FIX = "Run `offload login --server URL` again and approve the new code in the browser."


class Status(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    USED = "used"  # the token was handed out: the code is spent


class PollError(StrEnum):
    PENDING = "authorization_pending"
    SLOW_DOWN = "slow_down"
    DENIED = "access_denied"
    EXPIRED = "expired_token"
    INVALID = "invalid_grant"


POLL_DESCRIPTIONS = {
    PollError.PENDING: "Waiting for the code to be approved in the browser.",
    PollError.SLOW_DOWN: "Polling too fast; wait 5 seconds longer between polls.",
    PollError.DENIED: "The sign-in request was denied in the browser.",
    PollError.EXPIRED: "The sign-in code expired before it was approved.",
    PollError.INVALID: "The device code is not valid: it is unknown or was already used.",
}


@dataclass(frozen=True)
class Started:
    device_code: str
    user_code: str  # formatted, e.g. BCDF-GHJK


@dataclass(frozen=True)
class Request:
    """A pending request, as the approval page shows it."""

    user_code: str
    client_name: str
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class PollResult:
    error: PollError | None = None
    token: s.DeviceTokenResponse | None = None


def format_user_code(code: str) -> str:
    half = USER_CODE_LENGTH // 2
    return f"{code[:half]}-{code[half:]}"


def normalize_user_code(text: str) -> str | None:
    """What the user typed, as stored: upper case, dashes and spaces dropped; None if it
    cannot be a code (so nothing is looked up)."""
    code = "".join(ch for ch in text.upper() if ch not in "- \t")
    if len(code) != USER_CODE_LENGTH or any(ch not in USER_CODE_ALPHABET for ch in code):
        return None
    return code


def _new_user_code(db: Db) -> str:
    while True:  # a clash among live codes is rare; the column is unique
        code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
        if db.scalar(select(DeviceCode.id).where(DeviceCode.user_code == code)) is None:
            return code


def start(db: Db, client_name: str, now: datetime, limits: Limits) -> Started:
    throttle.begin(db, limits.device_address, throttle.address_key(client_address()), now)
    db.execute(delete(DeviceCode).where(DeviceCode.expires_at <= now - FORGET_AFTER))
    device_code = secrets.token_urlsafe(32)
    user_code = _new_user_code(db)
    db.add(
        DeviceCode(
            device_code_hash=tokens.hash_token(device_code),
            user_code=user_code,
            client_name=client_name,
            status=Status.PENDING.value,
            created_at=now,
            expires_at=now + LIFETIME,
        )
    )
    db.flush()
    return Started(device_code, format_user_code(user_code))


def _pending(db: Db, user_code: str, now: datetime) -> DeviceCode:
    code = normalize_user_code(user_code)
    row = db.scalar(select(DeviceCode).where(DeviceCode.user_code == code)) if code else None
    if row is None or row.expires_at <= now:
        raise NotFound(
            f"No sign-in request with code {user_code.strip()[:20]!r} is waiting.",
            "Check the code your terminal shows (it expires after 10 minutes); " + RETRY_FIX,
        )
    if row.status != Status.PENDING:
        raise Conflict(
            f"The sign-in request {format_user_code(row.user_code)} was already {row.status}.",
            RETRY_FIX,
        )
    return row


def pending_request(db: Db, user_code: str, now: datetime) -> Request:
    row = _pending(db, user_code, now)
    return Request(format_user_code(row.user_code), row.client_name, row.created_at, row.expires_at)


def decide(
    db: Db, auth: AuthUser, user_code: str, approve: bool, now: datetime, limits: Limits
) -> Request:
    """The signed-in user approves (the CLI then gets a token of theirs) or denies the code.

    Approving also clears a sign-in lockout of the account: whoever approves is signed in to
    it already, so they are its owner, not the one guessing its password."""
    row = _pending(db, user_code, now)
    row.status = (Status.APPROVED if approve else Status.DENIED).value
    row.user_id = auth.id
    row.decided_at = now
    action = s.AuditAction.DEVICE_APPROVED if approve else s.AuditAction.DEVICE_DENIED
    target = f"{format_user_code(row.user_code)} {row.client_name}".strip()
    audit.record(db, now, action, auth, target=target)
    if approve and sign_in.unlock(db, limits, auth.username):
        audit.record(db, now, s.AuditAction.ACCOUNT_UNLOCKED, auth, details={"by": "device login"})
    return Request(format_user_code(row.user_code), row.client_name, row.created_at, row.expires_at)


def _token_name(row: DeviceCode) -> str:
    return f"device login {row.client_name}".strip()[:64]


def poll(db: Db, device_code: str, now: datetime, limits: Limits) -> PollResult:
    """One poll of the CLI. The token is issued in the same transaction that spends the code,
    so two concurrent polls cannot both get one."""
    throttle.begin(db, limits.device_address, throttle.address_key(client_address()), now)
    row = db.scalar(
        select(DeviceCode).where(DeviceCode.device_code_hash == tokens.hash_token(device_code))
    )
    if row is None or row.status == Status.USED:
        return PollResult(PollError.INVALID)
    if row.status == Status.DENIED:
        return PollResult(PollError.DENIED)
    if row.expires_at <= now:
        return PollResult(PollError.EXPIRED)
    if row.status == Status.PENDING:
        too_soon = row.last_polled_at is not None and now - row.last_polled_at < MIN_POLL_GAP
        row.last_polled_at = now
        return PollResult(PollError.SLOW_DOWN if too_soon else PollError.PENDING)
    assert row.user_id is not None
    user = db.get_one(User, row.user_id)
    token = tokens.issue_api_token(db, user.id, _token_name(row), now)
    row.status = Status.USED.value
    audit.record(
        db,
        now,
        s.AuditAction.TOKEN_CREATED,
        AuthUser(user.id, user.username),
        target=audit.token_label(_token_name(row), token[: tokens.DISPLAY_PREFIX_LEN]),
        details={"via": "device login"},
    )
    return PollResult(
        token=s.DeviceTokenResponse(access_token=token, user=accounts.user_info(db, user))
    )

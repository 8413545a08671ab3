"""First-run setup and operator helpers, used by `offload up`, `offload server` commands and tests.

All functions are synchronous (the CLI calls them outside any event loop), open the database
of `settings`, apply migrations, do their work in one transaction and close the database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.core.schemas import Role
from offload.server.app import open_database
from offload.server.context import utc_now
from offload.server.db.engine import Database
from offload.server.services import accounts, admin, audit, tokens, web_auth
from offload.server.services.tokens import AuthUser


@dataclass(frozen=True)
class BootstrapResult:
    admin_token: str  # a fresh API token of the admin (off_u_…)
    runner_token: str  # a fresh runner token (off_r_…)
    # The admin's password when it was set now (generated or given); None if the admin existed
    # and no password was given (the old one stays).
    admin_password: str | None


@contextmanager
def _database(settings: ServerSettings) -> Iterator[Database]:
    db = open_database(settings)
    try:
        yield db
    finally:
        db.dispose()


def bootstrap(
    settings: ServerSettings,
    admin_username: str = "admin",
    admin_password: str | None = None,
    org_name: str = "default",
    clock: Callable[[], datetime] = utc_now,
) -> BootstrapResult:
    """Make sure the admin exists (owner of `org_name`, their default); issue fresh tokens.

    A missing admin gets `admin_password`, or a generated one.  An existing admin keeps their
    password unless `admin_password` is given.  Safe to run at every start.
    """
    with _database(settings) as db, db.transaction() as session:
        now = clock()
        password = _ensure_admin(session, admin_username, admin_password, org_name, now)
        return BootstrapResult(
            admin_token=_user_token(session, admin_username, "bootstrap", now),
            runner_token=_runner_token(session, "bootstrap", now),
            admin_password=password,
        )


def _ensure_admin(
    db: Db, username: str, password: str | None, org_name: str, now: datetime
) -> str | None:
    org = accounts.get_or_create_org(db, org_name, now)
    user = accounts.find_user(db, username)
    if user is None:
        password = password or tokens.generate_password()
        user = accounts.create_user(db, username, password, now)
    elif password is not None:
        accounts.set_password(user, password)
        web_auth.close_all(db, user.id)  # a reset password ends every browser session
        subject = AuthUser(user.id, user.username)
        details: dict[str, s.AuditDetail] = {"via": "offload up"}
        audit.record(
            db,
            now,
            s.AuditAction.PASSWORD_CHANGED,
            audit.OPERATOR,
            subject=subject,
            details=details,
        )
    accounts.add_member(db, user, org, Role.OWNER, now)
    return password


def _user_token(db: Db, username: str, token_name: str, now: datetime) -> str:
    user = accounts.find_user(db, username)
    assert user is not None
    return tokens.issue_api_token(db, user.id, token_name, now)


def create_user(
    settings: ServerSettings,
    username: str,
    password: str,
    org_name: str,
    role: Role = Role.MEMBER,
    clock: Callable[[], datetime] = utc_now,
) -> str:
    """Create `username` as a `role` of `org_name` (made if missing); returns an API token.

    Conflict if the user exists.
    """
    with _database(settings) as db, db.transaction() as session:
        now = clock()
        org = accounts.get_or_create_org(session, org_name, now)
        user = accounts.create_user(session, username, password, now)
        accounts.add_member(session, user, org, role, now)
        return tokens.issue_api_token(session, user.id, "cli", now)


def create_runner_token(
    settings: ServerSettings, name: str, clock: Callable[[], datetime] = utc_now
) -> str:
    """A new runner token (off_r_…), shown once."""
    with _database(settings) as db, db.transaction() as session:
        return _runner_token(session, name, clock())


def runner_fleet(
    settings: ServerSettings, clock: Callable[[], datetime] = utc_now
) -> s.RunnerFleet:
    """Every registered runner: online, draining, capacity, live sessions (operators)."""
    with _database(settings) as db, db.transaction(read_only=True) as session:
        return admin.runners_view(session, clock(), settings.runner_timeout_s)


def drain_runner(
    settings: ServerSettings, name: str, draining: bool, clock: Callable[[], datetime] = utc_now
) -> s.RunnerFleet:
    """Stop (or resume) placing new sessions on `name`; live sessions run to their end."""
    with _database(settings) as db:
        with db.transaction() as session:
            admin.set_draining(session, name, draining, clock())
        with db.transaction(read_only=True) as session:
            return admin.runners_view(session, clock(), settings.runner_timeout_s)


def _runner_token(db: Db, name: str, now: datetime) -> str:
    token = tokens.issue_runner_token(db, name, now)
    label = audit.token_label(name, token[: tokens.DISPLAY_PREFIX_LEN])
    audit.record(db, now, s.AuditAction.RUNNER_TOKEN_CREATED, audit.OPERATOR, target=label)
    return token

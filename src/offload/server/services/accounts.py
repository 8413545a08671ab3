"""Users, organisations and memberships; login."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.errors import Conflict, InvalidInput, PermissionDenied
from offload.server.context import ServerContext
from offload.server.db.models import Membership, Organization, User
from offload.server.services import audit, sign_in, tokens

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidInput(
            f"{kind} name {name!r} is not allowed.",
            "Use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
        )
    return name


# ---- organisations ------------------------------------------------------------------------------


def find_org(db: Db, name: str) -> Organization | None:
    return db.scalar(select(Organization).where(Organization.name == name))


def get_or_create_org(db: Db, name: str, now: datetime) -> Organization:
    org = find_org(db, check_name("Organisation", name))
    if org is None:
        org = Organization(name=name, created_at=now)
        db.add(org)
        db.flush()
    return org


# ---- users --------------------------------------------------------------------------------------


def find_user(db: Db, username: str) -> User | None:
    return db.scalar(select(User).where(User.username == username))


def create_user(db: Db, username: str, password: str, now: datetime) -> User:
    check_name("User", username)
    if find_user(db, username) is not None:
        raise Conflict(
            f"User {username!r} already exists.",
            "Pick another username, or sign in as that user with `offload login`.",
        )
    if not password:
        raise InvalidInput("The password is empty.", "Give a non-empty password.")
    user = User(username=username, password_hash=tokens.hash_password(password), created_at=now)
    db.add(user)
    db.flush()
    return user


def set_password(user: User, password: str) -> None:
    user.password_hash = tokens.hash_password(password)


def add_member(db: Db, user: User, org: Organization, role: s.Role, now: datetime) -> Membership:
    """Make `user` a member of `org` with `role` (updating the role if already a member).

    The first organisation a user joins becomes their default.
    """
    membership = db.get(Membership, (user.id, org.id))
    if membership is None:
        membership = Membership(user_id=user.id, org_id=org.id, role=role.value, created_at=now)
        db.add(membership)
    else:
        membership.role = role.value
    if user.default_org_id is None:
        user.default_org_id = org.id
    db.flush()
    return membership


def memberships(db: Db, user: User) -> list[s.OrgMembership]:
    rows = db.execute(
        select(Organization, Membership.role)
        .join(Membership, Membership.org_id == Organization.id)
        .where(Membership.user_id == user.id)
        .order_by(Organization.name)
    ).all()
    return [
        s.OrgMembership(name=org.name, role=s.Role(role), is_default=org.id == user.default_org_id)
        for org, role in rows
    ]


def user_info(db: Db, user: User) -> s.UserInfo:
    return s.UserInfo(
        id=user.id,
        username=user.username,
        default_org=user.default_org.name if user.default_org else None,
        orgs=memberships(db, user),
    )


def resolve_org(db: Db, user: User, org_name: str | None) -> Organization:
    """The organisation that pays for the user's session: the one named, else their default."""
    usable = memberships(db, user)
    names = ", ".join(m.name for m in usable) or "none"
    if org_name is None:
        if user.default_org is None:
            raise PermissionDenied(
                "You have no default organisation.",
                f"Name one with `--org` (yours: {names}) or ask an owner to add you to one.",
            )
        org_name = user.default_org.name
    org = find_org(db, org_name)
    if org is None or db.get(Membership, (user.id, org.id)) is None:
        raise PermissionDenied(
            f"You are not a member of organisation {org_name!r}.",
            f"Use one of yours with `--org` ({names}) or ask an owner of {org_name!r} to add you.",
        )
    return org


# ---- requests -----------------------------------------------------------------------------------


def _issue_login_token_tx(
    db: Db, user_id: str, token_name: str, now: datetime, new_hash: str | None
) -> s.TokenResponse:
    user = db.get_one(User, user_id)
    if new_hash is not None:
        user.password_hash = new_hash
    token = tokens.issue_api_token(db, user.id, token_name, now)
    audit.record(
        db,
        now,
        s.AuditAction.TOKEN_CREATED,
        tokens.AuthUser(user.id, user.username),
        target=audit.token_label(token_name, token[: tokens.DISPLAY_PREFIX_LEN]),
        details={"via": "password login"},
    )
    return s.TokenResponse(token=token, user=user_info(db, user))


async def login(ctx: ServerContext, request: s.LoginRequest) -> s.TokenResponse:
    """A new API token for a right username and password (within the abuse limits)."""
    verified = await sign_in.verify(ctx, request.username, request.password, via="api")
    new_hash = None
    if tokens.password_needs_rehash(verified.password_hash):
        new_hash = await asyncio.to_thread(tokens.hash_password, request.password)
    return await ctx.db.run(
        _issue_login_token_tx, verified.user.id, request.token_name or "cli", ctx.now(), new_hash
    )


def me(db: Db, auth: tokens.AuthUser) -> s.UserInfo:
    return user_info(db, db.get_one(User, auth.id))


def accounts(db: Db, auth: tokens.AuthUser) -> s.AccountsResponse:
    user = db.get_one(User, auth.id)
    return s.AccountsResponse(user=user.username, orgs=memberships(db, user))

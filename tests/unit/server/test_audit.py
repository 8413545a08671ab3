"""The audit log: each security-relevant action leaves one entry (who, what, when, from where),
owners read their organisation's, nobody else does, and no secret is in it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import asyncssh
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from offload.core import schemas as s
from offload.server.context import ServerContext
from offload.server.db.models import ApiToken, AuditEvent, AuthThrottle
from offload.server.services import device_codes, org_members, user_tokens, web_auth
from offload.server.services.throttle import Limits
from offload.server.services.tokens import AuthUser

from .support import PASSWORD, FakeClock, session_request

ADDRESS = "203.0.113.50"
A = s.AuditAction


@pytest.fixture
async def http_from(app: FastAPI) -> AsyncIterator[Callable[[str], httpx.AsyncClient]]:
    opened: list[httpx.AsyncClient] = []

    def _open(address: str = ADDRESS) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        opened.append(httpx.AsyncClient(transport=transport, base_url="http://offload.test"))
        return opened[-1]

    yield _open
    for client in opened:
        await client.aclose()


def _auth(user) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"Authorization": f"Bearer {user.token}"}


async def _audit(http: httpx.AsyncClient, owner, **params: object) -> s.AuditLog:  # type: ignore[no-untyped-def]
    response = await http.get(
        f"/api/v1/orgs/{owner.org}/audit", params=params, headers=_auth(owner)
    )
    assert response.status_code == 200, response.text
    return s.AuditLog.model_validate(response.json())


def _actions(log: s.AuditLog) -> list[str]:
    return [event.action.value for event in reversed(log.events)]  # oldest first


async def test_sign_ins_lockouts_and_unlocks_are_recorded_with_address(
    app: FastAPI, make_user, http_from, clock: FakeClock
) -> None:
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    http = http_from()
    login = {"username": member.username, "password": PASSWORD}
    assert (await http.post("/api/v1/auth/login", json=login)).status_code == 200
    for attempt in range(5):
        wrong = {"username": member.username, "password": f"wrong-{attempt}"}
        assert (await http.post("/api/v1/auth/login", json=wrong)).status_code == 401
    unlock = f"/api/v1/orgs/{owner.org}/members/{member.username}/unlock"
    assert (await http_from("198.51.100.8").post(unlock, headers=_auth(owner))).status_code == 200

    log = await _audit(http, owner)
    assert _actions(log) == [
        "auth.sign_in",
        "token.created",
        *["auth.sign_in_failed"] * 5,
        "auth.account_locked",
        "auth.account_unlocked",
    ]
    by_action = {event.action: event for event in log.events}
    signed_in = by_action[A.SIGN_IN]
    assert (signed_in.actor, signed_in.address, signed_in.details) == (
        member.username,
        ADDRESS,
        {"via": "api"},
    )
    assert signed_in.at == clock()
    failed = by_action[A.SIGN_IN_FAILED]
    assert (failed.actor, failed.subject, failed.address) == ("someone", member.username, ADDRESS)
    unlocked = by_action[A.ACCOUNT_UNLOCKED]
    assert (unlocked.actor, unlocked.subject, unlocked.address) == (
        owner.username,
        member.username,
        "198.51.100.8",
    )
    assert by_action[A.TOKEN_CREATED].target.startswith("cli (off_u_")


async def test_a_failed_sign_in_of_an_unknown_account_keeps_nothing_that_was_typed(
    app: FastAPI, ctx: ServerContext, http_from
) -> None:
    typed = "hunter2-typed-as-username"
    http = http_from()
    answer = await http.post("/api/v1/auth/login", json={"username": typed, "password": "pw-x1"})
    assert answer.status_code == 401
    with ctx.db.transaction(read_only=True) as db:
        rows = list(db.scalars(select(AuditEvent).where(AuditEvent.action == A.SIGN_IN_FAILED)))
        throttles = db.execute(select(AuthThrottle.scope, AuthThrottle.key)).all()
    assert len(rows) == 1 and rows[0].subject is None and rows[0].address == ADDRESS
    dumped = json.dumps([_row_dict(row) for row in rows]) + repr(throttles)
    assert typed not in dumped and "pw-x1" not in dumped


def _row_dict(row: AuditEvent) -> dict[str, object]:
    return {column.name: str(getattr(row, column.key)) for column in AuditEvent.__table__.columns}


async def test_tokens_members_settings_billing_and_takeovers_are_recorded(
    app: FastAPI, ctx: ServerContext, make_user, make_runner, http_from
) -> None:
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    http = http_from()
    owner_auth = AuthUser(owner.id, owner.username)
    now = ctx.now()
    token = ctx.db.call(user_tokens.create, AuthUser(member.id, member.username), "ci", now)
    with ctx.db.transaction(read_only=True) as db:
        token_id = db.scalars(select(ApiToken.id).where(ApiToken.name == "ci")).one()
    ctx.db.call(user_tokens.revoke, AuthUser(member.id, member.username), token_id, now)
    invited = ctx.db.call(
        org_members.owner_invite, owner_auth, owner.org, "newcomer-audit", s.Role.MEMBER, now
    )
    ctx.db.call(
        org_members.owner_set_role, owner_auth, owner.org, member.username, s.Role.OWNER, now
    )
    ctx.db.call(org_members.owner_remove, owner_auth, owner.org, "newcomer-audit", now)
    settings = {"idle_timeout_default_s": 600, "fair_use_policy": "warn"}
    path = f"/api/v1/orgs/{owner.org}"
    assert (await http.put(f"{path}/settings", json=settings, headers=_auth(owner))).is_success
    billing = {"on_demand_enabled": True, "on_demand_limit_cents": 5000}
    assert (await http.put(f"{path}/billing", json=billing, headers=_auth(owner))).is_success
    credit = {"amount_cents": 1234}
    grant = await http.post(f"{path}/billing/trial-credits", json=credit, headers=_auth(owner))
    assert grant.is_success
    runner = await make_runner()
    key = asyncssh.generate_private_key("ssh-ed25519")
    first = await member.client.create_session(session_request(key))
    moved = session_request(key, takeover=True).model_copy(update={"client_name": "desktop"})
    await member.client.create_session(moved)

    log = await _audit(http, owner, limit=500)
    assert _actions(log) == [
        "token.created",
        "token.revoked",
        "member.added",
        "member.role_changed",
        "member.removed",
        "org.settings_changed",
        "org.billing_changed",
        "org.trial_credit_granted",
        "session.takeover",
    ]
    events = {event.action: event for event in log.events}
    assert events[A.TOKEN_CREATED].target == f"ci ({token[:12]}…)"
    assert events[A.MEMBER_ADDED].subject == "newcomer-audit"
    assert events[A.MEMBER_ADDED].details == {"role": "member", "account_created": True}
    assert events[A.MEMBER_ROLE_CHANGED].details == {"role": "owner"}
    assert events[A.SETTINGS_CHANGED].details == settings
    assert events[A.BILLING_CHANGED].details == billing
    assert events[A.TRIAL_CREDIT_GRANTED].details == credit
    takeover = events[A.SESSION_TAKEOVER]
    assert takeover.target == first.id
    assert takeover.details == {"from": "laptop", "to": "desktop"}
    # Nothing secret: not the new token, not the invited account's generated password.
    dumped = json.dumps(log.model_dump(mode="json"))
    assert token not in dumped and invited.password and invited.password not in dumped
    # Runner registrations are recorded too (an operator's event: no organisation shows it).
    with ctx.db.transaction(read_only=True) as db:
        registered = db.scalars(
            select(AuditEvent).where(AuditEvent.action == A.RUNNER_REGISTERED)
        ).all()
    assert [row.target for row in registered] == [runner.name]


async def test_sign_out_password_change_and_device_login_are_recorded(
    app: FastAPI, ctx: ServerContext, make_user, http_from
) -> None:
    owner = make_user(role=s.Role.OWNER)
    http = http_from()
    cookie = await web_auth.sign_in(ctx, owner.username, PASSWORD)
    identity = await web_auth.who(ctx, cookie)
    assert identity is not None
    change = {"current_password": PASSWORD, "new_password": "a much newer password"}
    changed = await http.post("/api/v1/me/password", json=change, headers=_auth(owner))
    assert changed.status_code == 200
    assert await web_auth.who(ctx, cookie) is None  # the browser session ended with it
    new_cookie = await web_auth.sign_in(ctx, owner.username, "a much newer password")
    new_identity = await web_auth.who(ctx, new_cookie)
    assert new_identity is not None
    await web_auth.sign_out(ctx, new_identity)
    code = (await http.post("/api/v1/device/code", json={"client_name": "laptop-9"})).json()
    limits = Limits.from_settings(ctx.settings)
    ctx.db.call(device_codes.decide, identity.user, code["user_code"], True, ctx.now(), limits)

    log = await _audit(http, owner)
    assert _actions(log) == [
        "auth.sign_in",
        "auth.sign_in",  # the current password, checked like a sign-in
        "auth.password_changed",
        "auth.sign_in",
        "auth.sign_out",
        "auth.device_login_approved",
    ]
    assert log.events[0].target == f"{code['user_code']} laptop-9"
    dumped = json.dumps(log.model_dump(mode="json"))
    assert "a much newer password" not in dumped and PASSWORD not in dumped


async def test_only_owners_read_the_log_and_only_their_organisations(
    app: FastAPI, make_user, http_from
) -> None:
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    other_owner = make_user(role=s.Role.OWNER)
    http = http_from()
    await http.post("/api/v1/auth/login", json={"username": member.username, "password": "no"})
    refused = await http.get(f"/api/v1/orgs/{owner.org}/audit", headers=_auth(member))
    assert refused.status_code == 403 and refused.json()["fix"]
    stranger = await http.get(f"/api/v1/orgs/{owner.org}/audit", headers=_auth(other_owner))
    assert stranger.status_code == 403
    assert (await _audit(http, other_owner)).events == []  # the member's failure is not theirs
    assert _actions(await _audit(http, owner)) == ["auth.sign_in_failed"]


async def test_pages_of_the_log_and_the_action_filter(app: FastAPI, make_user, http_from) -> None:
    owner = make_user(role=s.Role.OWNER)
    http = http_from()
    for attempt in range(4):
        login = {"username": owner.username, "password": f"no-{attempt}"}
        await http.post("/api/v1/auth/login", json=login)
    await http.post("/api/v1/auth/login", json={"username": owner.username, "password": PASSWORD})
    first = await _audit(http, owner, limit=2)
    assert len(first.events) == 2 and first.next_before == first.events[-1].id
    rest = await _audit(http, owner, limit=500, before=first.next_before)
    assert [e.id for e in first.events + rest.events] == sorted(
        [e.id for e in first.events + rest.events], reverse=True
    )
    assert len(first.events + rest.events) == 6 and rest.next_before is None
    failures = await _audit(http, owner, action="auth.sign_in_failed")
    assert _actions(failures) == ["auth.sign_in_failed"] * 4
    bad = await http.get(
        f"/api/v1/orgs/{owner.org}/audit", params={"limit": 0}, headers=_auth(owner)
    )
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_input"

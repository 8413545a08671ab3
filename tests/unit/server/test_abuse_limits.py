"""Abuse limits as an attacker meets them: raw HTTP against the real app and database, the
control plane's clock driven by the test, client addresses set per connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI

from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.server.context import ServerContext
from offload.server.services import device_codes
from offload.server.services.throttle import Limits
from offload.server.services.tokens import AuthUser

from .support import PASSWORD, FakeClock

LOGIN = "/api/v1/auth/login"

Connect = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """`connect(app, address)`: a raw client whose requests come from `address`."""
    opened: list[httpx.AsyncClient] = []

    def _connect(app: FastAPI, address: str = "203.0.113.7") -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        opened.append(httpx.AsyncClient(transport=transport, base_url="http://offload.test"))
        return opened[-1]

    yield _connect
    for client in opened:
        await client.aclose()


async def _login(http: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await http.post(LOGIN, json={"username": username, "password": password})


def _assert_rate_limited(response: httpx.Response, retry_after: int) -> dict[str, str]:
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"] == str(retry_after)
    body = response.json()
    assert body["code"] == "rate_limited" and body["message"] and body["fix"]
    return body


async def _wrong_until_refused(http: httpx.AsyncClient, username: str) -> int:
    """Wrong passwords until the first 429; returns how many were answered 401 before it."""
    for attempt in range(100):
        response = await _login(http, username, f"guess-{attempt}")
        if response.status_code == 429:
            return attempt
        assert response.status_code == 401, response.text
    raise AssertionError("100 wrong passwords and never a 429")


async def test_brute_force_locks_the_account_then_the_right_password_works_after_the_lockout(
    app: FastAPI, ctx: ServerContext, clock: FakeClock, make_user, connect: Connect
) -> None:
    user = make_user()
    http = connect(app)
    settings = ctx.settings
    assert await _wrong_until_refused(http, user.username) == settings.login_failures_per_account

    # Locked: even the right password is refused, without being looked at.
    refused = await _login(http, user.username, PASSWORD)
    body = _assert_rate_limited(refused, settings.login_lockout_s)
    assert "locked" in body["message"] and "offload org unlock" in body["fix"]
    # From another address too: the lockout belongs to the account.
    _assert_rate_limited(
        await _login(connect(app, "198.51.100.4"), user.username, PASSWORD),
        settings.login_lockout_s,
    )

    clock.advance(settings.login_lockout_s - 1)
    _assert_rate_limited(await _login(http, user.username, PASSWORD), 1)
    clock.advance(1)
    assert (await _login(http, user.username, PASSWORD)).status_code == 200
    # A success starts the count again: the next lockout takes as many failures.
    assert await _wrong_until_refused(http, user.username) == settings.login_failures_per_account


async def test_an_unknown_username_is_locked_alike_so_lockouts_reveal_no_account(
    app: FastAPI, ctx: ServerContext, make_user, connect: Connect
) -> None:
    real = make_user()
    http = connect(app)
    assert await _wrong_until_refused(http, "nobody-at-all") == 5
    await _wrong_until_refused(http, real.username)
    unknown = (await _login(http, "nobody-at-all", "x")).json()
    known = (await _login(http, real.username, "x")).json()
    assert unknown == known


async def test_parallel_guesses_cannot_slip_past_the_count(
    app: FastAPI, ctx: ServerContext, make_user, connect: Connect
) -> None:
    user = make_user()
    http = connect(app)
    answers = await asyncio.gather(*(_login(http, user.username, f"p{i}") for i in range(20)))
    statuses = sorted(response.status_code for response in answers)
    assert statuses.count(401) == ctx.settings.login_failures_per_account
    assert statuses.count(429) == 20 - ctx.settings.login_failures_per_account


async def test_an_address_guessing_many_accounts_is_refused_while_others_sign_in(
    settings: ServerSettings, app_for, make_user, connect: Connect
) -> None:
    strict = settings.model_copy(update={"login_failures_per_address": 7})
    app = app_for(strict)
    attacker = connect(app, "203.0.113.66")
    victims = [make_user() for _ in range(3)]
    failures = 0
    for attempt in range(20):
        victim = victims[attempt % len(victims)]
        response = await _login(attacker, victim.username, f"guess-{attempt}")
        if response.status_code == 429:
            break
        assert response.status_code == 401
        failures += 1
    assert failures == 7
    body = _assert_rate_limited(response, strict.login_window_s)
    assert "your address" in body["message"]
    # No account is locked by it (each got fewer than 5), and another address signs in.
    colleague = connect(app, "198.51.100.20")
    assert (await _login(colleague, victims[0].username, PASSWORD)).status_code == 200
    # The attacker's own right password is refused too: the address has no attempts left.
    _assert_rate_limited(
        await _login(attacker, victims[1].username, PASSWORD), strict.login_window_s
    )


async def test_limits_hold_across_replicas_on_one_database(
    settings: ServerSettings, app: FastAPI, app_for, make_user, connect: Connect
) -> None:
    """Two control planes on the same database: failures on either count against the account."""
    other = app_for(settings)
    user = make_user()
    replicas = [connect(app), connect(other)]
    for attempt in range(5):
        response = await _login(replicas[attempt % 2], user.username, f"guess-{attempt}")
        assert response.status_code == 401
    for replica in replicas:
        _assert_rate_limited(await _login(replica, user.username, PASSWORD), 900)


async def test_an_owner_clears_a_members_lockout(app: FastAPI, make_user, connect: Connect) -> None:
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    bystander = make_user(org=owner.org)
    stranger_owner = make_user(role=s.Role.OWNER)
    http = connect(app)
    await _wrong_until_refused(http, member.username)
    path = f"/api/v1/orgs/{owner.org}/members/{member.username}/unlock"

    def auth(user) -> dict[str, str]:  # type: ignore[no-untyped-def]
        return {"Authorization": f"Bearer {user.token}"}

    assert (await http.post(path, headers=auth(bystander))).status_code == 403
    assert (await http.post(path, headers=auth(stranger_owner))).status_code == 403
    _assert_rate_limited(await _login(http, member.username, PASSWORD), 900)

    unlocked = await http.post(path, headers=auth(owner))
    assert unlocked.status_code == 200
    assert unlocked.json() == {"username": member.username, "locked": False, "locked_until": None}
    assert (await _login(http, member.username, PASSWORD)).status_code == 200
    # Unlocking an account that is not locked is a no-op, not an error.
    assert (await http.post(path, headers=auth(owner))).status_code == 200


async def test_the_accounts_own_device_login_clears_its_lockout(
    app: FastAPI, ctx: ServerContext, make_user, connect: Connect
) -> None:
    user = make_user()
    http = connect(app)
    await _wrong_until_refused(http, user.username)
    code = (await http.post("/api/v1/device/code", json={"client_name": "laptop"})).json()
    # The user approves in a browser where they are still signed in (the dashboard's service).
    approver = AuthUser(user.id, user.username)
    limits = Limits.from_settings(ctx.settings)
    ctx.db.call(device_codes.decide, approver, code["user_code"], True, ctx.now(), limits)
    assert (await _login(http, user.username, PASSWORD)).status_code == 200


async def test_device_login_requests_are_limited_per_address(
    settings: ServerSettings, app_for, clock: FakeClock, connect: Connect
) -> None:
    strict = settings.model_copy(update={"device_requests_per_address_per_minute": 4})
    app = app_for(strict)
    poller = connect(app, "203.0.113.99")
    code = (await poller.post("/api/v1/device/code", json={})).json()
    answers = []
    for _ in range(3):  # the code request above was the first of 4
        clock.advance(5)
        answers.append(await poller.post("/api/v1/device/token", json=code))
    assert [a.json()["error"] for a in answers] == ["authorization_pending"] * 3
    refused = await poller.post("/api/v1/device/token", json=code)
    assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
    assert refused.headers["Retry-After"] == str(60 - 15)
    # Guessing device codes from the same address gets nothing but the same refusal.
    guess = await poller.post("/api/v1/device/token", json={"device_code": "guess"})
    assert guess.status_code == 429
    # Other addresses are not affected, and the address polls again after the minute.
    assert (await connect(app, "198.51.100.1").post("/api/v1/device/code")).status_code == 200
    clock.advance(60)
    assert (await poller.post("/api/v1/device/token", json=code)).json() == {
        "error": "authorization_pending",
        "error_description": device_codes.POLL_DESCRIPTIONS[device_codes.PollError.PENDING],
    }

"""The dashboard and device login over plain HTTP: cookies, CSRF, headers, permissions, and the
device flow's RFC 8628 answers, against the same live control plane as the browser tests."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import select

from offload.cli.device_login import device_login
from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.core.errors import NotFound, Unreachable
from offload.server.context import ServerContext
from offload.server.db.models import WebSession
from offload.server.services import device_codes, org_settings, tokens, web_auth
from offload.server.services.throttle import Limits
from offload.server.services.tokens import AuthUser

from .conftest import WebUser
from .support import LiveClock, LiveServer, run

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
LIMITS = Limits.from_settings(ServerSettings())


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=15) as client:
        yield client


def csrf_of(response: httpx.Response) -> str:
    found = CSRF_RE.search(response.text)
    assert found, "no CSRF token in the page"
    return found.group(1)


def sign_in(
    http: httpx.Client, user: WebUser, headers: dict[str, str] | None = None
) -> httpx.Response:
    form = http.get("/login", headers=headers)
    return http.post(
        "/login",
        data={"username": user.username, "password": user.password, "csrf_token": csrf_of(form)},
        headers=headers,
    )


def set_cookie_headers(response: httpx.Response, name: str) -> list[str]:
    return [h for h in response.headers.get_list("set-cookie") if h.startswith(f"{name}=")]


# ---- cookies ------------------------------------------------------------------------------------


def test_the_session_cookie_is_httponly_lax_and_stored_hashed(
    http: httpx.Client, make_user: Callable[..., WebUser], ctx: ServerContext
) -> None:
    response = sign_in(http, make_user())
    assert response.status_code == 303 and response.headers["location"] == "/"
    (cookie,) = set_cookie_headers(response, web_auth.SESSION_COOKIE)
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes and "samesite=lax" in attributes and "path=/" in attributes
    assert "secure" not in attributes  # plain http: a Secure cookie would never come back
    token = http.cookies[web_auth.SESSION_COOKIE]
    with ctx.db.transaction(read_only=True) as db:
        hashes = set(db.scalars(select(WebSession.token_hash)))
    assert tokens.hash_token(token) in hashes and token not in hashes


def test_the_session_cookie_is_secure_behind_https(
    server: LiveServer, make_user: Callable[..., WebUser]
) -> None:
    # uvicorn trusts X-Forwarded-Proto from 127.0.0.1, as from a TLS-terminating proxy.  httpx
    # keeps Secure cookies for https URLs, so the login form's cookie is carried by hand.
    user = make_user()
    https = {"X-Forwarded-Proto": "https"}
    with httpx.Client(base_url=server.url, headers=https) as client:
        form = client.get("/login")
        (csrf_cookie,) = set_cookie_headers(form, "offload_login_csrf")
        assert "secure" in [part.strip().lower() for part in csrf_cookie.split(";")]
        response = client.post(
            "/login",
            data={
                "username": user.username,
                "password": user.password,
                "csrf_token": csrf_of(form),
            },
            headers={"Cookie": csrf_cookie.split(";")[0]},
        )
    assert response.status_code == 303
    (cookie,) = set_cookie_headers(response, web_auth.SESSION_COOKIE)
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "secure" in attributes and "httponly" in attributes


def test_pages_carry_security_headers_and_are_not_cached(
    http: httpx.Client, make_user: Callable[..., WebUser]
) -> None:
    sign_in(http, make_user())
    response = http.get("/settings")
    assert response.status_code == 200
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"


def test_sign_in_returns_only_to_local_pages(
    http: httpx.Client, make_user: Callable[..., WebUser]
) -> None:
    user = make_user()
    form = http.get("/login", params={"next": "//evil.example/x"})
    response = http.post(
        "/login",
        data={
            "username": user.username,
            "password": user.password,
            "csrf_token": csrf_of(form),
            "next": "//evil.example/x",
        },
    )
    assert response.headers["location"] == "/"


# ---- CSRF ---------------------------------------------------------------------------------------


def test_sign_in_without_the_form_token_is_refused(
    http: httpx.Client, make_user: Callable[..., WebUser]
) -> None:
    user = make_user()
    http.get("/login")  # the cookie half alone
    response = http.post("/login", data={"username": user.username, "password": user.password})
    assert response.status_code == 403
    assert web_auth.SESSION_COOKIE not in http.cookies


@pytest.mark.parametrize("sent", [None, "0" * 64])
def test_a_form_without_the_right_csrf_token_changes_nothing(
    http: httpx.Client,
    make_user: Callable[..., WebUser],
    ctx: ServerContext,
    sent: str | None,
) -> None:
    user = make_user()
    sign_in(http, user)
    data = {"idle_timeout_s": "600"} | ({"csrf_token": sent} if sent else {})
    refused = http.post("/settings", data=data)
    assert refused.status_code == 403
    assert "came from another site" in refused.text
    auth = _auth(ctx, user)
    with ctx.db.transaction(read_only=True) as db:
        assert org_settings.user_settings(db, auth).idle_timeout_s is None

    page = http.get("/settings")
    accepted = http.post("/settings", data={"idle_timeout_s": "600", "csrf_token": csrf_of(page)})
    assert accepted.status_code == 303


def _auth(ctx: ServerContext, user: WebUser) -> AuthUser:
    with ctx.db.transaction(read_only=True) as db:
        return tokens.check_user_token(db, user.token, ctx.now()).user


def test_signing_out_ends_the_session_on_the_server(
    http: httpx.Client, make_user: Callable[..., WebUser]
) -> None:
    sign_in(http, make_user())
    old = http.cookies[web_auth.SESSION_COOKIE]
    page = http.get("/")
    assert http.post("/logout", data={"csrf_token": csrf_of(page)}).status_code == 303
    with httpx.Client(base_url=str(http.base_url)) as fresh:
        fresh.cookies.set(web_auth.SESSION_COOKIE, old)
        replay = fresh.get("/")
    assert replay.status_code == 303 and replay.headers["location"].startswith("/login")


# ---- permissions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/orgs/{org}/billing", "/orgs/{org}/settings", "/orgs/{org}/activity.csv"]
)
def test_owner_pages_are_403_for_members(
    http: httpx.Client, make_user: Callable[..., WebUser], path: str
) -> None:
    owner = make_user(role=s.Role.OWNER)
    sign_in(http, make_user(org=owner.org))
    response = http.get(path.format(org=owner.org))
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("text/html")
    assert f"Only owners of {owner.org}" in response.text


def test_a_stranger_cannot_see_another_organisation(
    http: httpx.Client, make_user: Callable[..., WebUser]
) -> None:
    other = make_user(role=s.Role.OWNER)
    sign_in(http, make_user(role=s.Role.OWNER))
    response = http.get(f"/orgs/{other.org}/activity")
    assert response.status_code == 403 and "not a member" in response.text


def test_the_last_owner_cannot_be_removed(
    http: httpx.Client, make_user: Callable[..., WebUser]
) -> None:
    owner = make_user(role=s.Role.OWNER)
    sign_in(http, owner)
    page = http.get(f"/orgs/{owner.org}/settings")
    response = http.post(
        f"/orgs/{owner.org}/members/{owner.username}/remove", data={"csrf_token": csrf_of(page)}
    )
    assert response.status_code == 409 and "without an owner" in response.text


# ---- device login (RFC 8628) --------------------------------------------------------------------


def _start(http: httpx.Client) -> s.DeviceCodeResponse:
    response = http.post("/api/v1/device/code", json={"client_name": "ci"})
    assert response.status_code == 200
    return s.DeviceCodeResponse.model_validate(response.json())


def _poll(http: httpx.Client, code: s.DeviceCodeResponse) -> httpx.Response:
    return http.post("/api/v1/device/token", json={"device_code": code.device_code})


def test_device_code_answers_follow_rfc_8628(
    http: httpx.Client, make_user: Callable[..., WebUser], ctx: ServerContext, clock: LiveClock
) -> None:
    user = make_user()
    code = _start(http)
    assert re.fullmatch(r"[B-DF-HJ-NP-TV-XZ]{4}-[B-DF-HJ-NP-TV-XZ]{4}", code.user_code)
    assert code.verification_uri.endswith("/device") and code.expires_in == 600
    assert code.device_code not in code.verification_uri_complete

    first = _poll(http, code)
    assert first.status_code == 400 and first.json()["error"] == "authorization_pending"
    assert first.headers["cache-control"] == "no-store"
    assert _poll(http, code).json()["error"] == "slow_down"  # polled again at once

    ctx.db.call(
        device_codes.decide, _auth(ctx, user), code.user_code.lower(), True, ctx.now(), LIMITS
    )
    clock.advance(2)
    granted = _poll(http, code)
    assert granted.status_code == 200
    body = s.DeviceTokenResponse.model_validate(granted.json())
    assert body.user.username == user.username and body.access_token.startswith("off_u_")
    again = _poll(http, code)  # single use
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_device_codes_expire_on_the_control_plane_clock(
    http: httpx.Client, clock: LiveClock, make_user: Callable[..., WebUser], ctx: ServerContext
) -> None:
    code = _start(http)
    clock.advance(601)
    assert _poll(http, code).json()["error"] == "expired_token"
    with pytest.raises(NotFound, match="No sign-in request"):
        ctx.db.call(
            device_codes.decide, _auth(ctx, make_user()), code.user_code, True, ctx.now(), LIMITS
        )


def test_a_denied_device_code_says_so(
    http: httpx.Client, make_user: Callable[..., WebUser], ctx: ServerContext
) -> None:
    code = _start(http)
    ctx.db.call(
        device_codes.decide, _auth(ctx, make_user()), code.user_code, False, ctx.now(), LIMITS
    )
    response = _poll(http, code)
    assert response.json() == {
        "error": "access_denied",
        "error_description": "The sign-in request was denied in the browser.",
    }


def test_unknown_device_codes_and_grant_types_are_refused(http: httpx.Client) -> None:
    unknown = http.post("/api/v1/device/token", json={"device_code": "nope"})
    assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_grant"
    wrong = http.post(
        "/api/v1/device/token", json={"device_code": "nope", "grant_type": "password"}
    )
    assert wrong.json()["error"] == "unsupported_grant_type"


def test_user_codes_are_read_forgivingly() -> None:
    assert device_codes.normalize_user_code(" bcdf-ghjk ") == "BCDFGHJK"
    assert device_codes.normalize_user_code("BCDF-GHJ") is None
    assert device_codes.normalize_user_code("AEIO-UBCD") is None  # vowels are never issued


def test_device_login_says_when_the_server_cannot_be_reached() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    shown: list[str] = []
    with pytest.raises(Unreachable, match="Cannot reach the Offload control plane"):
        run(device_login(url, lambda uri, code: shown.append(code)))
    assert shown == []


# ---- passwords, lockouts, the audit page --------------------------------------------------------


def _change_password(
    http: httpx.Client, current: str, new: str, with_csrf: bool = True
) -> httpx.Response:
    page = http.get("/settings")
    data = {"current_password": current, "new_password": new, "confirm_password": new}
    if with_csrf:
        data["csrf_token"] = csrf_of(page)
    return http.post("/settings/password", data=data)


def test_a_password_change_signs_out_every_other_browser(
    http: httpx.Client, server: LiveServer, make_user: Callable[..., WebUser]
) -> None:
    user = make_user()
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=15) as other:
        sign_in(other, user)
        assert other.get("/settings").status_code == 200
        sign_in(http, user)
        old_cookie = http.cookies[web_auth.SESSION_COOKIE]
        changed = _change_password(http, user.password, "a brand new password")
        assert changed.status_code == 303
        assert changed.headers["location"] == "/settings?notice=password-changed"
        assert http.cookies[web_auth.SESSION_COOKIE] != old_cookie  # this browser: a new session
        assert http.get("/settings").status_code == 200
        # The other browser, and a replay of this browser's old cookie, are signed out.
        assert other.get("/settings").headers["location"].startswith("/login")
        with httpx.Client(base_url=server.url, follow_redirects=False) as replay:
            replay.cookies.set(web_auth.SESSION_COOKIE, old_cookie)
            assert replay.get("/settings").headers["location"].startswith("/login")
    with httpx.Client(base_url=server.url, follow_redirects=False) as fresh:
        assert sign_in(fresh, user).status_code == 401  # the old password
        renamed = WebUser(user.username, "a brand new password", user.org, user.token)
        assert sign_in(fresh, renamed).status_code == 303


def test_the_password_form_replayed_without_its_csrf_token_changes_nothing(
    http: httpx.Client, server: LiveServer, make_user: Callable[..., WebUser]
) -> None:
    user = make_user()
    sign_in(http, user)
    refused = _change_password(http, user.password, "attacker chosen pw", with_csrf=False)
    assert refused.status_code == 403
    wrong_current = _change_password(http, "not the password", "another new password")
    assert wrong_current.status_code == 401 and "Wrong username or password" in wrong_current.text
    with httpx.Client(base_url=server.url, follow_redirects=False) as fresh:
        assert sign_in(fresh, user).status_code == 303  # the password is still the old one


def test_the_sign_in_form_throttles_and_owners_unlock_from_the_members_list(
    http: httpx.Client, server: LiveServer, make_user: Callable[..., WebUser], ctx: ServerContext
) -> None:
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    guesser = WebUser(member.username, "not-it", member.org, member.token)
    with httpx.Client(base_url=server.url, follow_redirects=False) as attacker:
        statuses = [
            sign_in(attacker, guesser).status_code
            for _ in range(ctx.settings.login_failures_per_account)
        ]
        assert statuses == [401] * ctx.settings.login_failures_per_account
        locked = sign_in(attacker, member)  # the right password, refused while locked
        assert locked.status_code == 429
        assert locked.headers["Retry-After"] == str(ctx.settings.login_lockout_s)
        assert "locked" in locked.text and web_auth.SESSION_COOKIE not in attacker.cookies

        sign_in(http, owner)
        members = http.get(f"/orgs/{owner.org}/settings")
        assert "locked until" in members.text
        unlock = f"/orgs/{owner.org}/members/{member.username}/unlock"
        assert http.post(unlock, data={}).status_code == 403  # CSRF holds here too
        done = http.post(unlock, data={"csrf_token": csrf_of(members)})
        assert done.status_code == 303 and done.headers["location"].endswith("notice=unlocked")
        assert sign_in(attacker, member).status_code == 303

        audit = http.get(f"/orgs/{owner.org}/audit")
        assert audit.status_code == 200
        rows = re.findall(r'<th scope="row" data-label="Action">([a-z_.]+)</th>', audit.text)
        failures = ctx.settings.login_failures_per_account
        assert rows[:4] == [
            "auth.sign_in",
            "auth.account_unlocked",
            "auth.sign_in",
            "auth.account_locked",
        ]
        assert rows[4 : 4 + failures] == ["auth.sign_in_failed"] * failures
        assert "not-it" not in audit.text


def test_the_audit_page_is_for_owners_only(
    http: httpx.Client, make_user: Callable[..., WebUser]
) -> None:
    owner = make_user(role=s.Role.OWNER)
    sign_in(http, make_user(org=owner.org))
    refused = http.get(f"/orgs/{owner.org}/audit")
    assert refused.status_code == 403 and f"Only owners of {owner.org}" in refused.text

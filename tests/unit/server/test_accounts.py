"""Login, tokens and organisations as a user meets them."""

from __future__ import annotations

import httpx
import pytest

from offload.core import schemas as s
from offload.core.errors import NotAuthenticated
from offload.server.context import ServerContext
from offload.server.db.models import ApiToken
from offload.server.services import accounts, tokens

from .support import PASSWORD


async def test_login_with_the_right_password_issues_a_working_token(make_user, api_client):
    user = make_user()
    answer = await api_client(None).login(s.LoginRequest(username=user.username, password=PASSWORD))
    assert answer.token.startswith("off_u_")
    assert answer.user.username == user.username
    me = await api_client(answer.token).me()
    assert me.id == user.id
    assert me.default_org == user.org


async def test_login_with_a_wrong_password_or_unknown_user_is_refused_alike(make_user, api_client):
    user = make_user()
    client = api_client(None)
    with pytest.raises(NotAuthenticated) as wrong_password:
        await client.login(s.LoginRequest(username=user.username, password="nope"))
    with pytest.raises(NotAuthenticated) as unknown_user:
        await client.login(s.LoginRequest(username="nobody-here", password="nope"))
    assert wrong_password.value.message == unknown_user.value.message
    assert "Wrong username or password" in wrong_password.value.message


async def test_tokens_are_stored_only_as_hashes(make_user, ctx: ServerContext):
    user = make_user()
    with ctx.db.transaction(read_only=True) as db:
        stored = db.query(ApiToken).filter_by(user_id=user.id).one()
    assert stored.token_hash == tokens.hash_token(user.token)
    assert user.token not in (stored.token_hash, stored.prefix)
    assert user.token.startswith(stored.prefix)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, "No API token was sent"),
        ({"Authorization": "Bearer off_u_not-a-real-token"}, "not valid or was revoked"),
        ({"Authorization": "Bearer off_r_runner-token"}, "runner token was sent"),
    ],
)
async def test_a_missing_or_bad_token_gets_401_with_the_fix(
    http: httpx.AsyncClient, headers, expected
):
    response = await http.get("/api/v1/me", headers=headers)
    assert response.status_code == 401
    body = response.json()
    assert body["code"] == "not_authenticated"
    assert expected in body["message"]
    assert body["fix"]


async def test_a_revoked_token_is_refused(make_user, ctx: ServerContext, http, clock):
    user = make_user()
    with ctx.db.transaction() as db:
        db.query(ApiToken).filter_by(user_id=user.id).one().revoked_at = clock()
    response = await http.get("/api/v1/me", headers={"Authorization": f"Bearer {user.token}"})
    assert response.status_code == 401
    assert "revoked" in response.json()["message"]


async def test_accounts_lists_every_organisation_and_the_default(make_user, make_org, ctx):
    user = make_user(org="acme", role=s.Role.OWNER)
    other = make_org("side-project")
    with ctx.db.transaction() as db:
        row = accounts.find_user(db, user.username)
        org = accounts.find_org(db, other)
        assert row is not None and org is not None
        accounts.add_member(db, row, org, s.Role.MEMBER, ctx.now())

    answer = await user.client.accounts()
    assert answer.user == user.username
    assert [(m.name, m.role, m.is_default) for m in answer.orgs] == [
        ("acme", s.Role.OWNER, True),
        ("side-project", s.Role.MEMBER, False),
    ]


async def test_last_used_is_recorded(make_user, ctx: ServerContext, clock):
    user = make_user()
    await user.client.me()
    with ctx.db.transaction(read_only=True) as db:
        assert db.query(ApiToken).filter_by(user_id=user.id).one().last_used_at == clock()


async def test_version_health_and_docs_need_no_token(http: httpx.AsyncClient, settings):
    version = s.VersionInfo.model_validate((await http.get("/api/v1/version")).json())
    assert version.min_client_version == settings.min_client_version
    assert (await http.get("/healthz")).json() == {"ok": True}
    openapi = (await http.get("/api/v1/openapi.json")).json()
    assert "/api/v1/sessions/{session_id}/certificate" in openapi["paths"]
    assert (await http.get("/api/v1/docs")).status_code == 200


async def test_unknown_endpoint_answers_an_error_body(http: httpx.AsyncClient):
    response = await http.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"

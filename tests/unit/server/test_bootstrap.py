"""First-run setup and operator helpers used by `offload up` and the CLI."""

from __future__ import annotations

import pytest

from offload.core import schemas as s
from offload.core.api_client import RunnerClient
from offload.core.config import ServerSettings
from offload.core.errors import Conflict, InvalidInput
from offload.server.bootstrap import bootstrap, create_runner_token, create_user

from .support import new_host_key_line


@pytest.fixture
def fresh_settings(tmp_path, empty_database_url: str) -> ServerSettings:
    """A first run: bootstrap migrates an empty database."""
    return ServerSettings(data_dir=tmp_path / "fresh", database_url=empty_database_url)


async def test_bootstrap_creates_the_admin_and_fresh_tokens(fresh_settings, app_for, client_for):
    first = bootstrap(fresh_settings)
    assert first.admin_password  # generated
    second = bootstrap(fresh_settings)
    assert second.admin_password is None  # the admin existed: password unchanged
    assert first.admin_token != second.admin_token
    assert first.runner_token.startswith("off_r_") and first.runner_token != second.runner_token

    app = app_for(fresh_settings)
    for token in (first.admin_token, second.admin_token):
        me = await client_for(app, token).me()
        assert me.username == "admin"
        assert me.orgs == [s.OrgMembership(name="default", role=s.Role.OWNER, is_default=True)]
    login = await client_for(app, None).login(
        s.LoginRequest(username="admin", password=first.admin_password)
    )
    assert login.user.username == "admin"


async def test_bootstrap_with_a_given_password(fresh_settings, app_for, client_for):
    result = bootstrap(fresh_settings, admin_username="root", admin_password="s3cret", org_name="x")
    assert result.admin_password == "s3cret"
    app = app_for(fresh_settings)
    me = await client_for(app, None).login(s.LoginRequest(username="root", password="s3cret"))
    assert me.user.default_org == "x"


async def test_create_user_and_runner_token(fresh_settings, app_for, client_for):
    bootstrap(fresh_settings)
    token = create_user(fresh_settings, "dev", "pw", "team", s.Role.MEMBER)
    with pytest.raises(Conflict):
        create_user(fresh_settings, "dev", "pw", "team", s.Role.MEMBER)
    app = app_for(fresh_settings)
    accounts = await client_for(app, token).accounts()
    assert [(m.name, m.role) for m in accounts.orgs] == [("team", s.Role.MEMBER)]

    with pytest.raises(InvalidInput, match="1-128 characters"):
        create_runner_token(fresh_settings, "h" * 129)
    runner_token = create_runner_token(fresh_settings, "host-7")
    registered = await client_for(app, runner_token, RunnerClient).register(
        s.RunnerRegister(
            name="host-7", ssh_host="h", ssh_port=22, host_key=new_host_key_line(), capacity=2
        )
    )
    assert registered.id

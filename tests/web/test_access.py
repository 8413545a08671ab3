"""Offload access in the five states of Docker's settings management, and what a member's
personal switch does under each: the rule table, then a session start refused and allowed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from offload.core import schemas as s
from offload.core.api_client import UserClient
from offload.core.errors import PermissionDenied
from offload.server.services.org_settings import OrgPolicy

from .conftest import WebUser
from .support import LiveServer, report_session, run

A = s.OffloadAccess


@pytest.mark.parametrize(
    ("access", "unset", "on", "off"),
    [
        (A.ALWAYS_ENABLED, True, True, True),
        (A.ENABLED, True, True, False),
        (A.DISABLED, False, True, False),
        (A.ALWAYS_DISABLED, False, False, False),
        (A.USER_DEFINED, True, True, False),
    ],
)
def test_access_states_and_the_personal_switch(
    access: s.OffloadAccess, unset: bool, on: bool, off: bool
) -> None:
    policy = OrgPolicy(offload_enabled=access is not A.ALWAYS_DISABLED, offload_access=access)
    assert (policy.allows(None), policy.allows(True), policy.allows(False)) == (unset, on, off)


def test_a_disabled_organisation_lets_members_opt_in(
    server: LiveServer, make_user: Callable[..., WebUser], runner_token: str
) -> None:
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)

    async def set_access() -> s.OrgSettings:
        async with UserClient(server.url, owner.token) as client:
            return await client.update_org_settings(
                owner.org, s.OrgSettingsUpdate(offload_access=A.DISABLED)
            )

    saved = run(set_access())
    assert saved.offload_access is A.DISABLED and saved.offload_enabled

    with pytest.raises(PermissionDenied, match="off by default for you") as refused:
        run(report_session(server.url, member.token, runner_token))
    assert "personal settings" in refused.value.fix

    async def opt_in() -> s.UserSettings:
        async with UserClient(server.url, member.token) as client:
            return await client.update_my_settings(s.UserSettingsUpdate(offload_enabled=True))

    assert run(opt_in()).offload_enabled is True
    started = run(report_session(server.url, member.token, runner_token))
    assert started.state is s.SessionState.ACTIVE


def test_always_disabled_is_the_old_offload_enabled_false(
    server: LiveServer, make_user: Callable[..., WebUser]
) -> None:
    owner = make_user(role=s.Role.OWNER)

    async def update(change: s.OrgSettingsUpdate) -> s.OrgSettings:
        async with UserClient(server.url, owner.token) as client:
            return await client.update_org_settings(owner.org, change)

    off = run(update(s.OrgSettingsUpdate(offload_enabled=False)))
    assert off.offload_access is A.ALWAYS_DISABLED and not off.offload_enabled
    back = run(update(s.OrgSettingsUpdate(offload_enabled=True)))
    assert back.offload_access is A.ENABLED and back.offload_enabled

"""Limits users meet: fair use (warn / prompt / stop, daily reset), the organisation's allowance
(committed minutes, on-demand, trial credit), a disabled organisation, idle-timeout rules, one
session per user and takeover.  Each refusal says what happened and the fix."""

from __future__ import annotations

from datetime import timedelta

import asyncssh
import httpx
import pytest

from offload.core import schemas as s
from offload.core.errors import Conflict, InvalidInput, PermissionDenied
from offload.server.services import lifecycle

from .support import keep_busy, public_line, session_request

S = s.SessionState


def _team(make_user, owner_name: str | None = None):
    owner = make_user(username=owner_name, role=s.Role.OWNER)
    return owner, make_user(org=owner.org)


def _key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


# ---- fair use -----------------------------------------------------------------------------------


async def _set_policy(owner, policy: s.FairUsePolicy) -> None:
    await owner.client.update_org_settings(owner.org, s.OrgSettingsUpdate(fair_use_policy=policy))


async def test_fair_use_stop_warns_stops_refuses_and_resets_at_utc_midnight(
    make_user, start_active, clock, tick
):
    owner, member = _team(make_user)
    await _set_policy(owner, s.FairUsePolicy.STOP)
    _, runner, info = await start_active(user=member, idle_timeout_s=3600)

    busy = await keep_busy(member, info.id, clock, tick, 8 * 3600 - 600)
    assert busy.state is S.ACTIVE
    assert busy.fair_use_policy is s.FairUsePolicy.STOP
    assert busy.fair_use_remaining_s == 600
    assert any("left of today's 8 fair-use" in w and "stops" in w for w in busy.warnings)
    ended = await keep_busy(member, info.id, clock, tick, 600)
    assert (ended.state, ended.end_reason) == (S.TERMINATED, lifecycle.END_FAIR_USE)

    with pytest.raises(PermissionDenied) as refused:
        await member.client.create_session(session_request(_key()))
    assert "8 fair-use compute hours" in refused.value.message
    assert "00:00 UTC" in refused.value.fix and owner.username in refused.value.fix

    # 09:00 + 8 h = 17:00 UTC; the counter resets at midnight.
    clock.advance(7 * 3600 - 1)
    with pytest.raises(PermissionDenied):
        await member.client.create_session(session_request(_key()))
    clock.advance(1)
    await runner.heartbeat()  # still online after the night
    fresh = await member.client.create_session(session_request(_key()))
    assert fresh.fair_use_remaining_s == 8 * 3600


async def test_fair_use_warn_only_warns(make_user, start_active, clock, tick):
    owner, member = _team(make_user)
    await _set_policy(owner, s.FairUsePolicy.WARN)
    _, _, info = await start_active(user=member, idle_timeout_s=3600)
    busy = await keep_busy(member, info.id, clock, tick, 9 * 3600)
    assert busy.state is S.ACTIVE
    assert any("past today's 8 fair-use" in w for w in busy.warnings)
    assert busy.prompt is None or busy.prompt.reason is s.PromptReason.LONG_SESSION


async def test_fair_use_counts_across_sessions(start_active, clock, tick, make_user):
    user = make_user()
    _, runner, first = await start_active(user=user, idle_timeout_s=3600)
    await keep_busy(user, first.id, clock, tick, 2 * 3600)
    await user.client.stop_session(first.id)
    await runner.heartbeat()
    _, _, second = await start_active(user=user, runner=runner, idle_timeout_s=3600)
    busy = await keep_busy(user, second.id, clock, tick, 3600)
    assert busy.fair_use_remaining_s == 5 * 3600


# ---- allowance ----------------------------------------------------------------------------------


async def test_an_exhausted_allowance_warns_then_stops_then_refuses_naming_the_fix(
    make_user, start_active, clock, tick
):
    owner, member = _team(make_user)
    terms = s.OrgBillingUpdate(committed_minutes_per_month=60, on_demand_enabled=False)
    await owner.client.update_org_billing(owner.org, terms)
    _, runner, info = await start_active(user=member, idle_timeout_s=3600)

    busy = await keep_busy(member, info.id, clock, tick, 49 * 60, step=600)
    assert not busy.warnings
    busy = await keep_busy(member, info.id, clock, tick, 60, step=60)
    assert any(owner.org in w and "10 min" in w for w in busy.warnings)
    ended = await keep_busy(member, info.id, clock, tick, 10 * 60, step=60)
    assert ended.state is S.TERMINATED
    assert ended.end_reason == lifecycle.end_allowance(owner.org)
    assert ended.billed_s == 3600

    with pytest.raises(PermissionDenied) as refused:
        await member.client.create_session(session_request(_key()))
    assert owner.org in refused.value.message and "60 committed minutes" in refused.value.message
    assert owner.username in refused.value.fix and "on-demand" in refused.value.fix
    usage = await member.client.org_usage(owner.org)
    assert (usage.used_minutes, usage.committed_left_minutes) == (60, 0)
    assert usage.standard_minutes_left == 0

    enable = s.OrgBillingUpdate(on_demand_enabled=True, on_demand_limit_cents=500)
    await owner.client.update_org_billing(owner.org, enable)
    await runner.heartbeat()
    fresh = await member.client.create_session(session_request(_key()))
    assert fresh.state is S.STARTING


async def test_on_demand_spend_stops_at_its_monthly_limit(make_user, start_active, clock, tick):
    owner, member = _team(make_user)
    terms = s.OrgBillingUpdate(
        committed_minutes_per_month=0,
        on_demand_enabled=True,
        on_demand_limit_cents=30,
        rates_cents_per_minute={s.InstanceType.STANDARD: 2.0},
    )
    await owner.client.update_org_billing(owner.org, terms)
    _, _, info = await start_active(user=member, idle_timeout_s=3600)
    ended = await keep_busy(member, info.id, clock, tick, 20 * 60, step=60)
    assert ended.state is S.TERMINATED and ended.billed_s == 15 * 60  # 30 cents at 2 c/min
    usage = await owner.client.org_usage(owner.org)
    assert (usage.on_demand_spent_cents, usage.on_demand_left_cents) == (30, 0)


async def test_trial_credit_pays_until_it_expires_after_ninety_days(make_user, clock):
    owner, member = _team(make_user)
    await owner.client.update_org_billing(
        owner.org, s.OrgBillingUpdate(committed_minutes_per_month=0)
    )
    with pytest.raises(PermissionDenied, match="no Offload allowance"):
        await member.client.create_session(session_request(_key()))
    billing = await owner.client.grant_trial_credit(owner.org, 300)
    (credit,) = billing.trial_credits
    assert credit.expires_at == clock() + timedelta(days=90)
    assert (await member.client.org_usage(owner.org)).standard_minutes_left == 300  # 1 c/min

    clock.advance(90 * 86400 - 1)
    assert (await member.client.org_usage(owner.org)).trial_left_cents == 300
    clock.advance(1)
    assert (await member.client.org_usage(owner.org)).trial_left_cents == 0
    with pytest.raises(PermissionDenied, match="no Offload allowance"):
        await member.client.create_session(session_request(_key()))


async def test_unmetered_by_default(make_user):
    user = make_user()
    billing = await user.client.org_billing(user.org)
    assert billing.committed_minutes_per_month is None
    usage = await user.client.org_usage(user.org)
    assert (usage.metered, usage.standard_minutes_left) == (False, None)


# ---- organisation switches ----------------------------------------------------------------------


async def test_a_disabled_organisation_refuses_new_sessions_naming_its_owners(
    make_user, make_runner
):
    await make_runner()
    owner, member = _team(make_user)
    await owner.client.update_org_settings(owner.org, s.OrgSettingsUpdate(offload_enabled=False))
    with pytest.raises(PermissionDenied) as refused:
        await member.client.create_session(session_request(_key()))
    assert f"disabled for organisation {owner.org}" in refused.value.message
    assert owner.username in refused.value.fix and "--account" in refused.value.fix


async def test_account_picks_the_paying_org_and_a_default_can_be_set(
    make_user, make_org, make_runner, ctx
):
    await make_runner()
    user = make_user()
    other = make_org()
    with ctx.db.transaction() as db:
        from offload.server.services import accounts

        row, org = accounts.find_user(db, user.username), accounts.find_org(db, other)
        assert row is not None and org is not None
        accounts.add_member(db, row, org, s.Role.MEMBER, ctx.now())
    info = await user.client.create_session(session_request(_key(), org=other))
    assert info.org == other
    await user.client.stop_session(info.id)
    settings = await user.client.update_my_settings(s.UserSettingsUpdate(default_org=other))
    assert settings.default_org == other
    assert (await user.client.create_session(session_request(_key()))).org == other
    with pytest.raises(PermissionDenied):
        await user.client.update_my_settings(s.UserSettingsUpdate(default_org="not-mine"))


# ---- idle timeout -------------------------------------------------------------------------------


async def test_an_out_of_range_idle_timeout_is_refused_with_the_range(
    make_user, make_runner, http: httpx.AsyncClient
):
    await make_runner()
    user = make_user()
    for seconds in (9, 3601):
        body = session_request(_key()).model_dump(mode="json") | {"idle_timeout_s": seconds}
        response = await http.post(
            "/api/v1/sessions", json=body, headers={"Authorization": f"Bearer {user.token}"}
        )
        assert response.status_code == 422
        assert "10 s to 1 h" in response.json()["fix"]
    with pytest.raises(InvalidInput) as refused:
        await user.client.update_my_settings(s.UserSettingsUpdate(idle_timeout_s=5))
    assert "10 s to 1 h" in refused.value.fix


async def test_idle_timeout_comes_from_request_then_user_then_org_then_server(
    make_user, make_runner, settings
):
    await make_runner(capacity=8)
    owner, member = _team(make_user)

    async def started(**changes) -> int:
        info = await member.client.create_session(session_request(_key(), **changes))
        await member.client.stop_session(info.id)
        return info.idle_timeout_s

    assert await started() == settings.default_idle_timeout_s
    await owner.client.update_org_settings(
        owner.org, s.OrgSettingsUpdate(idle_timeout_default_s=600)
    )
    assert await started() == 600
    assert (
        await member.client.update_my_settings(s.UserSettingsUpdate(idle_timeout_s=120))
    ).idle_timeout_s == 120
    assert await started() == 120
    assert await started(idle_timeout_s=45) == 45
    cleared = await member.client.update_my_settings(s.UserSettingsUpdate(idle_timeout_s=None))
    assert cleared.idle_timeout_s is None
    assert await started() == 600


async def test_a_locked_idle_timeout_refuses_another_value_and_says_the_locked_one(
    make_user, make_runner
):
    await make_runner(capacity=8)
    owner, member = _team(make_user)
    await owner.client.update_org_settings(
        owner.org, s.OrgSettingsUpdate(idle_timeout_default_s=600, idle_timeout_locked=True)
    )
    with pytest.raises(InvalidInput) as refused:
        await member.client.create_session(session_request(_key(), idle_timeout_s=120))
    assert "locks the idle timeout at 10 min (600 s)" in refused.value.message
    assert "without --idle-timeout" in refused.value.fix
    await member.client.update_my_settings(s.UserSettingsUpdate(idle_timeout_s=120))
    info = await member.client.create_session(session_request(_key()))
    assert info.idle_timeout_s == 600  # the personal setting yields to the lock


# ---- one session per user -----------------------------------------------------------------------


async def test_a_second_machine_is_refused_naming_the_first_and_takeover_moves_the_session(
    start_active, clock
):
    user, runner, info = await start_active()  # from "laptop"
    desktop_key = _key()
    desktop = s.SessionCreate(client_public_key=public_line(desktop_key), client_name="desktop")
    with pytest.raises(Conflict) as refused:
        await user.client.create_session(desktop)
    assert "laptop" in refused.value.message and info.id in refused.value.message
    assert "--takeover" in refused.value.fix

    moved = await user.client.create_session(desktop.model_copy(update={"takeover": True}))
    assert (moved.id, moved.client_name, moved.state) == (info.id, "desktop", S.ACTIVE)
    assert moved.certificate is not None
    (assigned,) = (await runner.heartbeat()).sessions
    assert assigned.client_key_fingerprint == desktop_key.get_fingerprint("sha256")

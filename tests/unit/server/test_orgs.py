"""Organisation settings and billing: members read, only owners change; insights for a user."""

from __future__ import annotations

import httpx
import pytest

from offload.core import schemas as s
from offload.core.errors import InvalidInput, PermissionDenied

from .support import BUSY, keep_busy

OWNER_WRITES = [
    ("PUT", "settings", {"offload_enabled": False}),
    ("PUT", "settings", {"idle_timeout_default_s": 600, "idle_timeout_locked": True}),
    ("PUT", "settings", {"fair_use_policy": "stop"}),
    ("PUT", "billing", {"committed_minutes_per_month": 100}),
    ("PUT", "billing", {"on_demand_enabled": True, "on_demand_limit_cents": 1000}),
    ("POST", "billing/trial-credits", {"amount_cents": 500}),
]


@pytest.mark.parametrize(("method", "path", "body"), OWNER_WRITES)
async def test_members_get_403_naming_the_owners_and_owners_succeed(
    make_user, http: httpx.AsyncClient, method, path, body
):
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    url = f"/api/v1/orgs/{owner.org}/{path}"

    refused = await http.request(
        method, url, json=body, headers={"Authorization": f"Bearer {member.token}"}
    )
    assert refused.status_code == 403
    error = refused.json()
    assert error["code"] == "permission_denied"
    assert f"Only owners of {owner.org} can change" in error["message"]
    assert error["fix"] == f"Ask an owner: {owner.username}."

    done = await http.request(
        method, url, json=body, headers={"Authorization": f"Bearer {owner.token}"}
    )
    assert done.status_code == 200, done.text


async def test_members_read_settings_billing_and_usage(make_user):
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    update = s.OrgSettingsUpdate(fair_use_policy=s.FairUsePolicy.WARN, idle_timeout_default_s=900)
    await owner.client.update_org_settings(owner.org, update)
    seen = await member.client.org_settings(owner.org)
    assert (seen.fair_use_policy, seen.idle_timeout_default_s) == (s.FairUsePolicy.WARN, 900)
    assert seen.owners == [owner.username]
    assert (await member.client.org_billing(owner.org)).org == owner.org
    assert (await member.client.org_usage(owner.org)).org == owner.org


async def test_outsiders_are_refused_even_reading(make_user):
    owner = make_user(role=s.Role.OWNER)
    outsider = make_user()
    for call in (
        outsider.client.org_settings(owner.org),
        outsider.client.org_billing(owner.org),
        outsider.client.org_usage(owner.org),
        outsider.client.update_org_settings(owner.org, s.OrgSettingsUpdate(offload_enabled=False)),
    ):
        with pytest.raises(PermissionDenied, match="not a member"):
            await call


async def test_partial_updates_change_only_what_is_sent(make_user):
    owner = make_user(role=s.Role.OWNER)
    await owner.client.update_org_billing(
        owner.org,
        s.OrgBillingUpdate(
            committed_minutes_per_month=100,
            on_demand_enabled=True,
            on_demand_limit_cents=700,
            rates_cents_per_minute={s.InstanceType.GPU: 25.0},
        ),
    )
    after = await owner.client.update_org_billing(
        owner.org, s.OrgBillingUpdate(on_demand_limit_cents=None)
    )
    assert after.committed_minutes_per_month == 100
    assert (after.on_demand_enabled, after.on_demand_limit_cents) == (True, None)
    assert after.rates_cents_per_minute[s.InstanceType.GPU] == 25.0
    assert after.rates_cents_per_minute[s.InstanceType.STANDARD] == 1.0
    with pytest.raises(InvalidInput, match="out of range"):
        await owner.client.update_org_settings(
            owner.org, s.OrgSettingsUpdate(idle_timeout_default_s=7200)
        )


async def test_usage_insights(start_active, make_runner, make_user, clock, tick):
    user = make_user()
    runner = await make_runner()
    _, _, first = await start_active(user=user, runner=runner, idle_timeout_s=600)
    report = s.RunnerHeartbeat(
        capacity=4,
        warm=0,
        environments=[
            s.EnvironmentReport(
                env_id="e1",
                session_id=first.id,
                state="bound",
                running_containers=2,
                containers_total=2,
                images=["busybox:latest", "web:1"],
            )
        ],
    )
    await runner.client.heartbeat(runner.id, report)
    await keep_busy(user, first.id, clock, tick, 1200, step=300)
    await user.client.stop_session(first.id)
    await runner.heartbeat()
    _, _, second = await start_active(user=user, runner=runner, idle_timeout_s=600)
    report.environments[0].session_id = second.id
    report.environments[0].images = ["busybox:latest"]
    await runner.client.heartbeat(runner.id, report)
    clock.advance(60)
    await user.client.report_activity(second.id, BUSY)

    usage = await user.client.usage()

    assert [x.id for x in usage.recent_sessions] == [second.id, first.id]
    assert [x.id for x in usage.active_sessions] == [second.id]
    assert usage.total_billed_s == 1260 and usage.today_billed_s == 1260
    assert usage.fair_use_remaining_s == 8 * 3600 - 1260
    assert [(i.image, i.sessions) for i in usage.top_images] == [
        ("busybox:latest", 2),
        ("web:1", 1),
    ]
    assert [(a.session_id, a.duration_s, a.containers) for a in usage.recent_activity] == [
        (second.id, 60, 2),
        (first.id, 1200, 2),
    ]
    (org,) = usage.orgs
    assert (org.org, org.used_minutes, org.metered) == (user.org, 21, False)

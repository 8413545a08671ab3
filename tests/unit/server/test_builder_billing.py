"""The organisation's builder time is billed to the organisation at the builder's instance rate,
beside its sessions' own time: from the runner's running totals (a retried report bills nothing
twice), shown per session in usage, and left out of the session's billed time and fair use."""

from __future__ import annotations

import pytest

from offload.core import schemas as s
from offload.core.schemas import SessionState as S


def _report(session_id: str, build_seconds: float) -> s.RunnerHeartbeat:
    env = s.EnvironmentReport(
        env_id=f"env-{session_id}",
        session_id=session_id,
        state="bound",
        build_seconds=build_seconds,
    )
    return s.RunnerHeartbeat(capacity=4, warm=0, environments=[env])


async def _metered_team(make_user):
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    await owner.client.update_org_billing(
        owner.org,
        s.OrgBillingUpdate(
            committed_minutes_per_month=0,
            on_demand_enabled=True,
            rates_cents_per_minute={s.InstanceType.STANDARD: 2.0},
        ),
    )
    return owner, member


async def test_builder_time_is_billed_once_beside_the_session(make_user, start_active, clock):
    owner, member = await _metered_team(make_user)
    _, runner, info = await start_active(user=member)
    clock.advance(60)  # the session itself: 60 s, 2 cents

    await runner.client.heartbeat(runner.id, _report(info.id, 90))  # 90 s of builds: 3 cents
    await runner.client.heartbeat(runner.id, _report(info.id, 90))  # a retry: nothing more
    usage = await owner.client.org_usage(owner.org)
    assert usage.on_demand_spent_cents == pytest.approx(5.0)
    assert usage.used_minutes == pytest.approx(2.5)

    await runner.client.heartbeat(runner.id, _report(info.id, 120))  # the build went on
    assert (await owner.client.org_usage(owner.org)).on_demand_spent_cents == pytest.approx(6.0)

    # The session's own time and the user's fair-use hours are the session's alone.
    seen = await member.client.get_session(info.id)
    assert seen.billed_s == 60
    assert seen.fair_use_remaining_s == 8 * 3600 - 60
    report = await member.client.usage()
    summary = next(item for item in report.active_sessions if item.id == info.id)
    assert (summary.billed_s, summary.build_s) == (60, 120)


async def test_an_ended_session_bills_no_more_builder_time(make_user, start_active, clock):
    owner, member = await _metered_team(make_user)
    _, runner, info = await start_active(user=member)
    clock.advance(60)
    await runner.client.heartbeat(runner.id, _report(info.id, 30))
    assert (await member.client.stop_session(info.id)).state is S.TERMINATED
    await runner.client.heartbeat(runner.id, _report(info.id, 600))  # a late report
    usage = await owner.client.org_usage(owner.org)
    assert usage.on_demand_spent_cents == pytest.approx(2.0 + 1.0)


async def test_a_smaller_total_after_a_runner_restart_bills_nothing(make_user, start_active, clock):
    owner, member = await _metered_team(make_user)
    _, runner, info = await start_active(user=member)
    await runner.client.heartbeat(runner.id, _report(info.id, 60))
    await runner.client.heartbeat(runner.id, _report(info.id, 10))  # counted afresh: ignored
    assert (await owner.client.org_usage(owner.org)).on_demand_spent_cents == pytest.approx(2.0)


@pytest.mark.parametrize("value", ["-1", "1e400", '"NaN"', "Infinity"])
async def test_a_bad_build_total_is_422_and_bills_nothing(make_user, start_active, http, value):
    owner, member = await _metered_team(make_user)
    _, runner, info = await start_active(user=member)
    body = (
        '{"capacity": 4, "warm": 0, "environments": [{"env_id": "e", "session_id": "'
        + info.id
        + '", "state": "bound", "build_seconds": '
        + value
        + "}]}"
    )
    response = await http.post(
        f"/api/v1/runners/{runner.id}/heartbeat",
        content=body,
        headers={"Authorization": f"Bearer {runner.token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert (await owner.client.org_usage(owner.org)).on_demand_spent_cents == 0

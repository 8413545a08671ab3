"""GPU sessions on the control plane: a specific GPU per session, never two live sessions on one,
refusals that name what is busy, owners' rules, the GPU rate, and release at the end.

The runners here are API clients reporting stand-in GPUs (`stand_in_gpu`): no machine these
tests run on has a GPU. The runner's own discovery and the engine's view of the GPU are tested
in tests/unit/runner and tests/integration/runner; the whole path in tests/e2e/test_gpu_sessions.
"""

from __future__ import annotations

import asyncio

import asyncssh
import httpx
import pytest

from offload.core import schemas as s
from offload.core.errors import InvalidInput, NoCapacity, PermissionDenied
from offload.core.schemas import SessionState as S

from .support import keep_busy, session_request, stand_in_gpu


def _key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def _gpu_request(**changes):
    return session_request(_key(), gpu=True, **changes)


async def _gpu_runner(make_runner, gpus: int, **kwargs):
    return await make_runner(gpus=gpus, instance_types=[s.InstanceType.GPU], **kwargs)


def _assigned(desired: s.RunnerDesired) -> dict[str, list[str]]:
    return {item.session_id: item.gpu_uuids for item in desired.sessions}


async def test_each_gpu_session_gets_its_own_gpu_and_the_runner_is_told(make_user, make_runner):
    runner = await _gpu_runner(make_runner, gpus=2)
    first = await make_user().client.create_session(_gpu_request())
    second = await make_user().client.create_session(_gpu_request())

    assigned = _assigned(await runner.heartbeat())
    assert assigned == {first.id: [f"GPU-{runner.name}-0"], second.id: [f"GPU-{runner.name}-1"]}
    assert [gpu.uuid for gpu in first.gpu_devices] == [f"GPU-{runner.name}-0"]
    assert first.gpu_devices[0].model == "NVIDIA H200 (stand-in)"
    assert first.instance_type is s.InstanceType.GPU


async def test_no_free_gpu_is_refused_naming_what_is_busy_and_a_stop_frees_it(
    make_user, make_runner
):
    runner = await _gpu_runner(make_runner, gpus=1, capacity=4)
    holder = make_user()
    held = await holder.client.create_session(_gpu_request())

    with pytest.raises(NoCapacity) as refused:
        await make_user().client.create_session(_gpu_request())
    assert refused.value.message == (
        f"Every GPU is in use: runner {runner.name} has 1 of 1 NVIDIA H200 (stand-in) busy."
    )
    assert "without --gpu" in refused.value.fix
    # A CPU session still fits: the refusal is about the GPU, not the runner's slots.
    cpu_runner = await make_runner()
    cpu = await make_user().client.create_session(session_request(_key()))
    assert cpu.runner is not None and cpu.runner.id == cpu_runner.id

    await holder.client.stop_session(held.id)
    assert _assigned(await runner.heartbeat()) == {}
    again = await make_user().client.create_session(_gpu_request())
    assert [gpu.uuid for gpu in again.gpu_devices] == [f"GPU-{runner.name}-0"]


async def test_concurrent_gpu_starts_never_share_a_gpu(make_user, make_runner):
    runner = await _gpu_runner(make_runner, gpus=2, capacity=16)
    users = [make_user() for _ in range(8)]
    results = await asyncio.gather(
        *(user.client.create_session(_gpu_request()) for user in users), return_exceptions=True
    )
    started = [r for r in results if isinstance(r, s.SessionInfo)]
    refused = [r for r in results if isinstance(r, NoCapacity)]
    assert (len(started), len(refused)) == (2, 6), results
    assigned = _assigned(await runner.heartbeat())
    assert sorted(uuid for uuids in assigned.values() for uuid in uuids) == [
        f"GPU-{runner.name}-0",
        f"GPU-{runner.name}-1",
    ]


async def test_a_gpu_session_ended_by_its_runner_restarting_frees_its_gpu(
    make_user, make_runner, start_active
):
    runner = await _gpu_runner(make_runner, gpus=1)
    user, _, info = await start_active(runner=runner, gpu=True)
    assert info.state is S.ACTIVE
    # The runner restarts (same name, registered again): its engines are gone.
    again = await _gpu_runner(make_runner, gpus=1, name=runner.name)
    assert (await user.client.get_session(info.id)).state is S.FAILED
    fresh = await make_user().client.create_session(_gpu_request())
    assert fresh.runner is not None and fresh.runner.id == again.id
    assert [gpu.uuid for gpu in fresh.gpu_devices] == [f"GPU-{runner.name}-0"]


async def test_placement_prefers_a_gpu_a_warm_environment_holds(make_user, make_runner):
    name = "gpu-warm"
    gpus = [stand_in_gpu(name, 0), stand_in_gpu(name, 1).model_copy(update={"warm": True})]
    await _gpu_runner(make_runner, gpus=2, name=name, gpu_devices=gpus)
    info = await make_user().client.create_session(_gpu_request())
    assert [gpu.uuid for gpu in info.gpu_devices] == [f"GPU-{name}-1"]


async def test_heartbeats_bring_utilisation_to_the_session_view(make_user, make_runner):
    runner = await _gpu_runner(make_runner, gpus=1)
    user = make_user()
    info = await user.client.create_session(_gpu_request())
    assert info.gpu_devices[0].utilization_percent is None
    busy = stand_in_gpu(runner.name, 0).model_copy(
        update={"utilization_percent": 87, "memory_used_bytes": 40 * 1024**3}
    )
    report = s.RunnerHeartbeat(capacity=4, warm=0, gpu_devices=[busy])
    await runner.client.heartbeat(runner.id, report)
    seen = (await user.client.get_session(info.id)).gpu_devices[0]
    assert (seen.utilization_percent, seen.memory_used_bytes) == (87, 40 * 1024**3)


async def test_a_runner_reporting_one_gpu_twice_is_refused(make_runner):
    twice = [stand_in_gpu("dup", 0), stand_in_gpu("dup", 0).model_copy(update={"index": 1})]
    with pytest.raises(InvalidInput, match="same GPU UUID twice"):
        await _gpu_runner(make_runner, gpus=2, name="dup", gpu_devices=twice)


async def test_a_runner_with_a_gpu_count_but_no_devices_takes_no_gpu_session(
    make_user, make_runner
):
    # Runners older than discovery sent only `gpus`: no GPU can be assigned on them.
    await _gpu_runner(make_runner, gpus=2, gpu_devices=[])
    with pytest.raises(NoCapacity, match="No online runner offers the gpu instance type"):
        await make_user().client.create_session(_gpu_request())


async def test_owners_can_turn_gpu_sessions_off_and_members_cannot(make_user, make_runner):
    await _gpu_runner(make_runner, gpus=2)
    await make_runner()
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    with pytest.raises(PermissionDenied):
        await member.client.update_org_settings(
            owner.org, s.OrgSettingsUpdate(gpu_sessions_allowed=False)
        )
    settings = await owner.client.update_org_settings(
        owner.org, s.OrgSettingsUpdate(gpu_sessions_allowed=False)
    )
    assert settings.gpu_sessions_allowed is False
    with pytest.raises(PermissionDenied) as refused:
        await member.client.create_session(_gpu_request())
    assert refused.value.message == f"Organisation {owner.org} does not allow GPU sessions."
    assert owner.username in refused.value.fix and "--gpu-sessions allow" in refused.value.fix
    cpu = await member.client.create_session(session_request(_key()))  # CPU sessions still start
    assert cpu.instance_type is s.InstanceType.STANDARD


async def test_an_owners_cap_counts_live_gpu_sessions_of_the_organisation(make_user, make_runner):
    await _gpu_runner(make_runner, gpus=4)
    owner = make_user(role=s.Role.OWNER)
    first, second = make_user(org=owner.org), make_user(org=owner.org)
    outsider = make_user()  # another organisation's GPU sessions do not count
    await outsider.client.create_session(_gpu_request())
    await owner.client.update_org_settings(owner.org, s.OrgSettingsUpdate(gpu_session_limit=1))
    held = await first.client.create_session(_gpu_request())

    with pytest.raises(PermissionDenied) as refused:
        await second.client.create_session(_gpu_request())
    assert refused.value.message == (
        f"Organisation {owner.org} allows 1 GPU session(s) at once, and 1 are live: "
        f"{held.id} ({first.username})."
    )
    assert "--gpu-limit" in refused.value.fix

    await first.client.stop_session(held.id)
    assert (await second.client.create_session(_gpu_request())).gpu is True
    lifted = await owner.client.update_org_settings(
        owner.org, s.OrgSettingsUpdate(gpu_session_limit=None)
    )
    assert lifted.gpu_session_limit is None


@pytest.mark.parametrize("body", ['{"gpu_session_limit": -1}', '{"gpu_sessions_allowed": "no"}'])
async def test_bad_gpu_settings_are_422_and_change_nothing(
    make_user, http: httpx.AsyncClient, body: str
):
    owner = make_user(role=s.Role.OWNER)
    response = await http.put(
        f"/api/v1/orgs/{owner.org}/settings",
        content=body,
        headers={"Authorization": f"Bearer {owner.token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["fix"]
    settings = await owner.client.org_settings(owner.org)
    assert (settings.gpu_sessions_allowed, settings.gpu_session_limit) == (True, None)


async def test_gpu_sessions_bill_at_the_gpu_rate(make_user, make_runner, start_active, clock, tick):
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    await owner.client.update_org_billing(
        owner.org,
        s.OrgBillingUpdate(
            committed_minutes_per_month=0, on_demand_enabled=True, on_demand_limit_cents=100
        ),
    )
    runner = await _gpu_runner(make_runner, gpus=1)
    _, _, info = await start_active(user=member, runner=runner, gpu=True, idle_timeout_s=3600)
    ended = await keep_busy(member, info.id, clock, tick, 20 * 60, step=60)
    # 100 cents at the default GPU rate of 10 c/min: 10 minutes (a CPU session would get 100).
    assert ended.state is S.TERMINATED and ended.billed_s == 10 * 60
    usage = await owner.client.org_usage(owner.org)
    assert usage.on_demand_spent_cents == 100
    report = await member.client.usage()
    summary = next(item for item in report.recent_sessions if item.id == info.id)
    assert (summary.instance_type, summary.gpu_model) == (
        s.InstanceType.GPU,
        "NVIDIA H200 (stand-in)",
    )
    # Its GPU is free again once it ended.
    assert _assigned(await runner.heartbeat()) == {}
    again = await make_user().client.create_session(_gpu_request())
    assert [gpu.uuid for gpu in again.gpu_devices] == [f"GPU-{runner.name}-0"]

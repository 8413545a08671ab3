"""RootlessDriver against real sandboxed dockerds: identity, namespaces, limits, pause, and
wiping without a trace.  The real policy plugin guards every engine here."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio

from offload.core.config import RunnerSettings
from offload.core.engine_http import engine_client
from offload.core.errors import EnvironmentError_
from offload.core.schemas import ENGINE_SOCKET_IN_MOUNT_AREA
from offload.core.waiting import async_wait_until
from offload.runner import cgroups, identities, netns
from offload.runner.driver import Environment, EnvState
from offload.runner.environment import (
    PolicyLike,
    RootlessDriver,
    cleanup_orphans,
    contents_of,
    default_policy_factory,
    identity_range,
    image_name,
    read_contents,
)
from offload.runner.gpus import SandboxGpu
from tests.integration.runner.conftest import SMALL, MakeSettings, docker, dockerd_pid, leftovers
from tests.support.images import TEST_IMAGE, build_test_image

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver(runner_settings: RunnerSettings) -> RootlessDriver:
    return RootlessDriver(runner_settings)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(driver: RootlessDriver) -> AsyncIterator[Environment]:
    env = await driver.create(SMALL)
    try:
        await asyncio.to_thread(build_test_image, f"unix://{env.engine_socket}")
        yield env
    finally:
        await driver.destroy(env)


def host_ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a host process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(int(line.split()[1]) for line in status if line.startswith("Uid:"))
    gid = next(int(line.split()[1]) for line in status if line.startswith("Gid:"))
    return uid, gid


async def run_sleeper(env: Environment, name: str) -> str:
    return (await docker(env, "run", "-d", "--name", name, TEST_IMAGE, "sleep", "300")).out


async def paused(env: Environment, container: str) -> str:
    return (await docker(env, "inspect", "-f", "{{.State.Paused}}", container)).out


async def test_engine_answers(env: Environment) -> None:
    result = await docker(env, "version", "--format", "{{.Server.Version}}")
    assert result.out.startswith("20.10")
    assert env.mount_area.is_dir()
    assert env.state == EnvState.WARM
    # The same engine listens in the mount area, for containers that mount the Docker socket.
    async with engine_client(env.mount_area / ENGINE_SOCKET_IN_MOUNT_AREA, 10) as engine:
        assert (await engine.get("/_ping")).text == "OK"


async def test_dockerd_runs_as_the_identity_in_namespaces_of_its_own(
    runner_settings: RunnerSettings, env: Environment
) -> None:
    pid = dockerd_pid(runner_settings, env)
    env_netns = f"net:[{netns.inode(env.netns)}]"
    assert os.readlink(f"/proc/{pid}/ns/net") == env_netns
    for kind in ("net", "mnt", "pid", "ipc", "uts", "cgroup", "user"):
        assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
    # Root inside is the environment's own unprivileged identity outside.
    assert env.area_owner is not None and env.area_owner[0] >= runner_settings.identity_uid_base
    assert host_ids(pid) == env.area_owner
    uid_map = Path(f"/proc/{pid}/uid_map").read_text().split()
    assert uid_map[:3] == ["0", str(env.area_owner[0]), "1"]
    assert env.isolation == "rootless"


async def test_cgroup_limits_hold_dockerd_and_containers(
    runner_settings: RunnerSettings, env: Environment
) -> None:
    top = {c: Path("/sys/fs/cgroup", c, runner_settings.cgroup_parent, env.id) for c in
           cgroups.CONTROLLERS}  # fmt: skip
    assert (top["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (top["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "100000"
    assert (top["memory"] / "memory.limit_in_bytes").read_text().strip() == str(1024**3)
    assert (top["pids"] / "pids.max").read_text().strip() == "1024"
    # The sandbox manages its own children but cannot raise its own limits.
    assert (top["memory"] / "memory.limit_in_bytes").stat().st_uid == 0
    assert (top["memory"] / "cgroup.procs").stat().st_uid == env.area_owner[0]  # type: ignore[index]
    pid = dockerd_pid(runner_settings, env)
    for directory in top.values():
        assert str(pid) in (directory / "cgroup.procs").read_text().split()

    cid = await run_sleeper(env, "limits")
    inner = top["memory"] / "docker" / cid
    container_pids = (inner / "cgroup.procs").read_text().split()
    assert container_pids, "the container's process is in a child of the environment's cgroup"
    lines = Path(f"/proc/{container_pids[0]}/cgroup").read_text().splitlines()
    memory_path = next(line.split(":", 2)[2] for line in lines if ":memory:" in line)
    assert memory_path == f"/{runner_settings.cgroup_parent}/{env.id}/docker/{cid}"


async def test_docker_run_limits_work_inside_below_the_environment(env: Environment) -> None:
    """cgroup v1 delegation: the inner engine sets a container's own limit (as a local one)."""
    result = await docker(
        env, "run", "--rm", "-m", "64m", "--pids-limit", "50", TEST_IMAGE,
        "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/pids/pids.max",
    )  # fmt: skip
    assert result.out.split() == [str(64 * 1024**2), "50"]


async def test_build_and_run_the_test_image(env: Environment) -> None:
    result = await docker(env, "run", "--rm", TEST_IMAGE)
    assert result.out == "hello from offload"


async def test_pause_freezes_running_containers_and_resume_thaws_them(
    driver: RootlessDriver, env: Environment
) -> None:
    await run_sleeper(env, "frozen-by-idle")
    await run_sleeper(env, "paused-by-user")
    await docker(env, "pause", "paused-by-user")

    await driver.pause(env)
    assert env.state == EnvState.PAUSED
    assert await paused(env, "frozen-by-idle") == "true"
    description = await driver.describe(env)
    assert description.containers_running >= 2
    assert description.pids

    await driver.resume(env)
    assert env.state == EnvState.WARM
    assert await paused(env, "frozen-by-idle") == "false"
    # What the user paused stays paused: resume thaws only what pause froze.
    assert await paused(env, "paused-by-user") == "true"


async def test_pause_twice_keeps_what_it_froze_and_freezes_newcomers(
    driver: RootlessDriver, env: Environment
) -> None:
    await run_sleeper(env, "first-frozen")
    await driver.pause(env)
    await run_sleeper(env, "started-while-paused")  # e.g. a restart policy brought it back

    await driver.pause(env)

    assert await paused(env, "first-frozen") == "true"
    assert await paused(env, "started-while-paused") == "true"
    await driver.resume(env)
    assert await paused(env, "first-frozen") == "false"
    assert await paused(env, "started-while-paused") == "false"


async def test_contents_count_running_not_paused_and_name_images(env: Environment) -> None:
    await run_sleeper(env, "contents-running")
    await run_sleeper(env, "contents-paused")
    await docker(env, "pause", "contents-paused")
    await docker(env, "create", "--name", "contents-created", TEST_IMAGE)
    image_id = (await docker(env, "image", "inspect", "-f", "{{.Id}}", TEST_IMAGE)).out
    await docker(env, "create", "--name", "contents-by-id", image_id.removeprefix("sha256:")[:12])
    running = (await docker(env, "ps", "-q", "--filter", "status=running")).out.split()
    everything = (await docker(env, "ps", "-aq")).out.split()

    contents = await read_contents(env, timeout_s=5.0)

    assert contents.running == len(running)  # the paused one is not running
    assert contents.total == len(everything)
    # One name per image, repo:tag; a container created by image id names none.
    assert contents.images == [TEST_IMAGE]
    await docker(env, "unpause", "contents-paused")


async def test_image_names_are_repo_tag_and_never_bare_ids() -> None:
    image_id = "sha256:" + "ab" * 32
    assert image_name({"Image": "busybox", "ImageID": image_id}) == "busybox:latest"
    assert image_name({"Image": "reg:5000/team/app", "ImageID": image_id}) == (
        "reg:5000/team/app:latest"
    )
    assert image_name({"Image": "app:1.2", "ImageID": image_id}) == "app:1.2"
    assert image_name({"Image": "app@sha256:" + "cd" * 32, "ImageID": image_id}).startswith("app@")
    assert image_name({"Image": image_id, "ImageID": image_id}) is None
    assert image_name({"Image": "abababababab", "ImageID": image_id}) is None
    many = [{"Image": f"img{i}:v", "State": "exited"} for i in range(150)] * 2
    listed = contents_of(many)
    assert (listed.running, listed.total, len(listed.images)) == (0, 300, 100)


async def test_two_environments_are_isolated(driver: RootlessDriver, env: Environment) -> None:
    other = await driver.create(SMALL)
    try:
        await run_sleeper(env, "only-in-a")
        listed = await docker(other, "ps", "-a", "--format", "{{.Names}}")
        assert "only-in-a" not in listed.out
        assert netns.inode(other.netns) != netns.inode(env.netns)
        assert other.engine_socket != env.engine_socket
        assert other.area_owner != env.area_owner  # never one identity for two environments
    finally:
        await driver.destroy(other)


async def test_destroy_leaves_nothing_behind(
    runner_settings: RunnerSettings, driver: RootlessDriver
) -> None:
    victim = await driver.create(SMALL)
    await asyncio.to_thread(build_test_image, f"unix://{victim.engine_socket}")
    await run_sleeper(victim, "running")
    await run_sleeper(victim, "frozen")
    await docker(victim, "pause", "frozen")  # frozen tasks ignore SIGKILL until thawed
    (victim.mount_area / "synced.txt").write_text("from the laptop")
    pids = (await driver.describe(victim)).pids
    assert len(pids) >= 4  # dockerd, containerd, shims, containers

    await driver.destroy(victim)

    assert victim.state == EnvState.DESTROYING
    assert victim.area_owner is not None
    assert leftovers(runner_settings, victim.id, pids, victim.area_owner[0]) == []
    await driver.destroy(victim)  # idempotent


async def test_failed_create_cleans_up_and_explains(make_settings: MakeSettings) -> None:
    settings = make_settings(dockerd="/bin/false")
    broken = RootlessDriver(settings)

    with pytest.raises(EnvironmentError_) as caught:
        await broken.create(SMALL)

    assert "dockerd exited" in caught.value.message
    assert "docker.io" in caught.value.fix
    assert not any((settings.data_dir / "envs").iterdir())
    assert not any(settings.run_dir.iterdir())
    assert not cgroups.children(settings.cgroup_parent)
    assert not broken._held_slots  # the identity is free again


async def test_cleanup_orphans_wipes_what_a_dead_runner_left(make_settings: MakeSettings) -> None:
    settings = make_settings()
    policies: list[PolicyLike] = []

    def factory(
        name: str, mount_area: Path, plugin_dir: Path, gpus: Sequence[SandboxGpu]
    ) -> PolicyLike:
        policies.append(default_policy_factory(name, mount_area, plugin_dir, gpus))
        return policies[-1]

    orphan = await RootlessDriver(settings, policy_factory=factory).create(SMALL)
    pids = await asyncio.to_thread(cgroups.EnvCgroups(settings.cgroup_parent, orphan.id).pids)
    # The runner "dies": its driver is dropped, the sandbox keeps running on its own.
    try:
        wiped = await cleanup_orphans(settings)
    finally:
        for policy in policies:
            await policy.stop()

    assert wiped == [orphan.id]
    assert orphan.area_owner is not None
    assert leftovers(settings, orphan.id, pids, orphan.area_owner[0]) == []


async def test_the_policy_plugin_refuses_legacy_api_versions(env: Environment) -> None:
    """The second wall: dockerd 20.10 still honours pre-1.24 request shapes; we do not."""
    async with engine_client(env.engine_socket, 10) as engine:
        refused = await engine.get("/v1.23/containers/json")
        allowed = await engine.get("/v1.24/containers/json")
    assert refused.status_code == 403
    assert "client version 1.23 is too old" in refused.text  # plain text at <= 1.23, as dockerd
    assert allowed.status_code == 200


async def test_containers_get_the_user_mode_network_mtu(env: Environment) -> None:
    """At docker's default 1500 behind slirp4netns's 65520, downloads ran at half the speed."""
    result = await docker(env, "run", "--rm", TEST_IMAGE, "cat", "/sys/class/net/eth0/mtu")
    assert result.out == "65520"


async def test_a_cancelled_create_settles_then_leaves_nothing(
    make_settings: MakeSettings,
) -> None:
    """The runner stopping cancels a warm-pool fill half-way: nothing of it may survive."""
    settings = make_settings()
    driver = RootlessDriver(settings)
    creating = asyncio.create_task(driver.create(SMALL))
    envs = settings.data_dir / "envs"

    async def started() -> bool:
        return envs.is_dir() and any(envs.iterdir())

    await async_wait_until(started, 30, "the create to make its directories")
    env_id = next(envs.iterdir()).name
    creating.cancel()
    with pytest.raises(asyncio.CancelledError):
        await creating
    assert leftovers(settings, env_id) == []
    assert not cgroups.children(settings.cgroup_parent)
    every = identity_range(settings)
    assert identities.processes_of([every.identity(s) for s in range(every.count)]) == []

"""DockerdDriver against real dockerd: isolation, limits, pause, and wiping without a trace."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from offload.core.config import RunnerSettings
from offload.core.engine_http import engine_client
from offload.core.errors import EnvironmentError_
from offload.core.schemas import ENGINE_SOCKET_IN_MOUNT_AREA
from offload.runner import cgroups, netns
from offload.runner.driver import Environment, EnvState
from offload.runner.environment import (
    DockerdDriver,
    EnvPaths,
    cleanup_orphans,
    contents_of,
    image_name,
    read_contents,
)
from tests.integration.runner.conftest import SMALL, MakeSettings, docker, leftovers
from tests.integration.runner.standin_policy import PermissiveStandInPolicy
from tests.support.images import TEST_IMAGE, build_test_image

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver(runner_settings: RunnerSettings) -> DockerdDriver:
    return DockerdDriver(runner_settings, policy_factory=PermissiveStandInPolicy)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(driver: DockerdDriver) -> AsyncIterator[Environment]:
    env = await driver.create(SMALL)
    try:
        await asyncio.to_thread(build_test_image, f"unix://{env.engine_socket}")
        yield env
    finally:
        await driver.destroy(env)


def dockerd_pid(settings: RunnerSettings, env: Environment) -> int:
    return int(EnvPaths.of(settings, env.id).pidfile.read_text())


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


async def test_dockerd_runs_in_the_environment_netns(
    runner_settings: RunnerSettings, env: Environment
) -> None:
    pid = dockerd_pid(runner_settings, env)
    env_netns = f"net:[{netns.inode(env.netns)}]"
    assert os.readlink(f"/proc/{pid}/ns/net") == env_netns
    assert os.readlink("/proc/self/ns/net") != env_netns


async def test_cgroup_limits_hold_dockerd_and_containers(
    runner_settings: RunnerSettings, env: Environment
) -> None:
    top = {c: Path("/sys/fs/cgroup", c, runner_settings.cgroup_parent, env.id) for c in
           cgroups.CONTROLLERS}  # fmt: skip
    assert (top["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (top["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "100000"
    assert (top["memory"] / "memory.limit_in_bytes").read_text().strip() == str(1024**3)
    assert (top["pids"] / "pids.max").read_text().strip() == "1024"
    pid = dockerd_pid(runner_settings, env)
    for directory in top.values():
        assert str(pid) in (directory / "cgroup.procs").read_text().split()

    await run_sleeper(env, "limits")
    container_pid = (await docker(env, "inspect", "-f", "{{.State.Pid}}", "limits")).out
    lines = Path(f"/proc/{container_pid}/cgroup").read_text().splitlines()
    memory_path = next(line.split(":", 2)[2] for line in lines if ":memory:" in line)
    assert memory_path.startswith(f"/{runner_settings.cgroup_parent}/{env.id}/")


async def test_build_and_run_the_test_image(env: Environment) -> None:
    result = await docker(env, "run", "--rm", TEST_IMAGE)
    assert result.out == "hello from offload"


async def test_pause_freezes_running_containers_and_resume_thaws_them(
    driver: DockerdDriver, env: Environment
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
    driver: DockerdDriver, env: Environment
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


async def test_two_environments_are_isolated(driver: DockerdDriver, env: Environment) -> None:
    other = await driver.create(SMALL)
    try:
        await run_sleeper(env, "only-in-a")
        listed = await docker(other, "ps", "-a", "--format", "{{.Names}}")
        assert "only-in-a" not in listed.out
        assert netns.inode(other.netns) != netns.inode(env.netns)
        assert other.engine_socket != env.engine_socket
    finally:
        await driver.destroy(other)


async def test_destroy_leaves_nothing_behind(
    runner_settings: RunnerSettings, driver: DockerdDriver
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
    assert leftovers(runner_settings, victim.id, pids) == []
    await driver.destroy(victim)  # idempotent


async def test_failed_create_cleans_up_and_explains(make_settings: MakeSettings) -> None:
    settings = make_settings(dockerd="/bin/false")
    broken = DockerdDriver(settings, policy_factory=PermissiveStandInPolicy)

    with pytest.raises(EnvironmentError_) as caught:
        await broken.create(SMALL)

    assert "dockerd exited" in caught.value.message
    assert "docker.io" in caught.value.fix
    assert not any((settings.data_dir / "envs").iterdir())
    assert not any(settings.run_dir.iterdir())
    assert not cgroups.children(settings.cgroup_parent)


async def test_cleanup_orphans_wipes_what_a_dead_runner_left(make_settings: MakeSettings) -> None:
    settings = make_settings()
    policies: list[PermissiveStandInPolicy] = []

    def factory(name: str, mount_area: Path) -> PermissiveStandInPolicy:
        policies.append(PermissiveStandInPolicy(name, mount_area))
        return policies[-1]

    orphan = await DockerdDriver(settings, policy_factory=factory).create(SMALL)
    pids = await asyncio.to_thread(cgroups.EnvCgroups(settings.cgroup_parent, orphan.id).pids)
    # The runner "dies": its driver is dropped, dockerd keeps running on its own.
    try:
        wiped = await cleanup_orphans(settings)
    finally:
        for policy in policies:
            await policy.stop()

    assert wiped == [orphan.id]
    assert leftovers(settings, orphan.id, pids) == []


async def test_real_policy_plugin_guards_the_engine(make_settings: MakeSettings) -> None:
    pytest.importorskip("offload.runner.policy")
    settings = make_settings()
    real = DockerdDriver(settings)  # the default factory: offload.runner.policy.PolicyPlugin
    guarded = await real.create(SMALL)
    try:
        await asyncio.to_thread(build_test_image, f"unix://{guarded.engine_socket}")
        assert (await docker(guarded, "run", "--rm", TEST_IMAGE)).out == "hello from offload"
        refused = await docker(guarded, "run", "--rm", "--privileged", TEST_IMAGE, check=False)
        assert refused.rc != 0
        assert "privileged" in refused.err.lower()
        await run_sleeper(guarded, "to-freeze")
        await real.pause(guarded)
        assert await paused(guarded, "to-freeze") == "true"
        await real.resume(guarded)
    finally:
        await real.destroy(guarded)
    assert leftovers(settings, guarded.id) == []

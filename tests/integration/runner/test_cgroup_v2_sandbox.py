"""The cgroup v2 path of RootlessDriver, end to end, as far as this host allows.

This host is hybrid: cpu, memory and pids are bound to cgroup v1, and the cgroup2 hierarchy at
/sys/fs/cgroup/unified offers only hugetlb.  Pointing the runner there in v2 mode still runs
everything v2-specific for real: the environment's cgroup is created and delegated to its
identity, rootlesskit evacuates the sandbox's processes into `init` (no internal processes),
the sandbox mounts cgroup2 as its /sys/fs/cgroup, the inner dockerd runs in cgroup v2 mode and
puts containers in children it creates, `docker pause` freezes through cgroup.freeze, and
teardown kills and removes the tree.  What this host cannot show: cpu/memory/pids limits on v2
(their controllers are not available to cgroup2 here), which `test_cgroups.py` covers as far
as the files allow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from offload.core.config import RunnerSettings
from offload.runner import cgroups
from offload.runner.driver import Environment
from offload.runner.environment import EnvPaths, RootlessDriver, engine_pid
from tests.integration.runner.conftest import SMALL, MakeSettings, docker, leftovers
from tests.support.images import TEST_IMAGE, build_test_image

UNIFIED = Path("/sys/fs/cgroup/unified")

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        cgroups.cgroup_mode(UNIFIED) != "v2" if UNIFIED.is_dir() else True,
        reason="needs a cgroup2 mount at /sys/fs/cgroup/unified (a hybrid cgroup host)",
    ),
]


@pytest.fixture(scope="module")
def v2_settings(make_settings: MakeSettings) -> RunnerSettings:
    return make_settings(cgroup_root=UNIFIED, cgroup_mode="v2")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def v2_env(v2_settings: RunnerSettings) -> AsyncIterator[tuple[RootlessDriver, Environment]]:
    driver = RootlessDriver(v2_settings)
    env = await driver.create(SMALL)
    try:
        await asyncio.to_thread(build_test_image, f"unix://{env.engine_socket}")
        yield driver, env
    finally:
        await driver.destroy(env)


def env_dir(settings: RunnerSettings, env: Environment) -> Path:
    return UNIFIED / settings.cgroup_parent / env.id


async def test_inner_engine_runs_in_cgroup_v2_mode(
    v2_settings: RunnerSettings, v2_env: tuple[RootlessDriver, Environment]
) -> None:
    _, env = v2_env
    info = await docker(env, "info", "--format", "{{.CgroupVersion}} {{.CgroupDriver}}")
    assert info.out == "2 cgroupfs"
    top = env_dir(v2_settings, env)
    assert env.area_owner is not None
    # Delegated: the sandbox owns its cgroup's membership and subtree files.
    for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
        assert (top / name).stat().st_uid == env.area_owner[0], name
    # Evacuated: the environment's own cgroup holds no process, `init` holds dockerd.
    assert (top / "cgroup.procs").read_text().split() == []
    pid = engine_pid(EnvPaths.of(v2_settings, env.id))
    assert pid is not None
    assert str(pid) in (top / "init" / "cgroup.procs").read_text().split()


async def test_containers_live_in_children_the_sandbox_made_and_pause_freezes_them(
    v2_settings: RunnerSettings, v2_env: tuple[RootlessDriver, Environment]
) -> None:
    driver, env = v2_env
    cid = (await docker(env, "run", "-d", "--name", "v2-sleeper", TEST_IMAGE, "sleep", "300")).out
    container = env_dir(v2_settings, env) / "docker" / cid
    assert (container / "cgroup.procs").read_text().split(), "the container's process is there"
    assert container.stat().st_uid == env.area_owner[0]  # type: ignore[index]

    await driver.pause(env)
    assert "frozen 1" in (container / "cgroup.events").read_text().splitlines()
    assert (await docker(env, "inspect", "-f", "{{.State.Paused}}", "v2-sleeper")).out == "true"
    await driver.resume(env)
    assert "frozen 0" in (container / "cgroup.events").read_text().splitlines()


async def test_destroy_removes_the_whole_v2_tree(v2_settings: RunnerSettings) -> None:
    driver = RootlessDriver(v2_settings)
    victim = await driver.create(SMALL)
    pids = (await driver.describe(victim)).pids
    assert pids
    await driver.destroy(victim)
    assert not env_dir(v2_settings, victim).exists()
    assert victim.area_owner is not None
    assert leftovers(v2_settings, victim.id, pids, victim.area_owner[0]) == []

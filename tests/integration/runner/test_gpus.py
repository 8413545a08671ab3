"""GPU environments with the GPU STAND-IN (fake device nodes, fake NVML, a stand-in for the
NVIDIA Container Toolkit's hook) against real sandboxed engines: the engine of a GPU
environment sees its GPU and no other, `--gpus` works through the hook, the policy refuses
other GPUs through the raw API in any shape, and destroying the environment leaves no process
on its GPU. Three sandboxes: one shared by the checks, one for the release, one for a dead
runner's leftovers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from offload.core.config import RunnerSettings
from offload.core.engine_http import engine_client
from offload.runner.driver import Environment
from offload.runner.environment import (
    PolicyLike,
    RootlessDriver,
    cleanup_orphans,
    default_policy_factory,
)
from offload.runner.gpu_standin import StandinNvml, holders
from offload.runner.gpus import GpuInventory, SandboxGpu, discover, find_toolkit
from tests.integration.runner.conftest import SMALL, MakeSettings, docker, dockerd_pid, leftovers
from tests.support.gpus import STANDIN_HOOKS, STANDIN_MODEL, StandinGpus, make_standin_gpus
from tests.support.images import TEST_IMAGE, build_test_image

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> StandinGpus:
    return make_standin_gpus(tmp_path_factory.mktemp("gpus"), count=2)


@pytest.fixture(scope="module")
def settings(make_settings: MakeSettings, standin: StandinGpus) -> RunnerSettings:
    return make_settings(gpu_standin=standin.file, gpu_hook_dir=STANDIN_HOOKS)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver(settings: RunnerSettings, standin: StandinGpus) -> AsyncIterator[RootlessDriver]:
    fake = StandinNvml(standin.file)
    inventory = discover(fake, "all", fake.device_nodes())
    toolkit = find_toolkit(settings.gpu_hook_dir)
    yield RootlessDriver(settings, gpus=inventory, toolkit=toolkit)
    inventory.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(driver: RootlessDriver, standin: StandinGpus) -> AsyncIterator[Environment]:
    env = await driver.create(SMALL, [standin.uuids[0]])
    try:
        await asyncio.to_thread(build_test_image, f"unix://{env.engine_socket}")
        yield env
    finally:
        await driver.destroy(env)


def sandbox_dev(settings: RunnerSettings, env: Environment) -> Path:
    return Path(f"/proc/{dockerd_pid(settings, env)}/root/dev")


async def test_the_sandbox_has_its_gpu_node_and_no_other(
    settings: RunnerSettings, driver: RootlessDriver, env: Environment, standin: StandinGpus
) -> None:
    assert env.gpu_uuids == (standin.uuids[0],)
    assert driver.capabilities.gpus == 2
    dev = sandbox_dev(settings, env)
    nvidia = sorted(name for name in os.listdir(dev) if name.startswith("nvidia"))
    assert nvidia == ["nvidia-uvm", "nvidia0", "nvidiactl"]
    # The very node of GPU 0 (the same inode), not a copy: what NVML sees as its user.
    inside, host = os.stat(dev / "nvidia0"), os.stat(standin.node(0))
    assert (inside.st_dev, inside.st_ino) == (host.st_dev, host.st_ino)
    # The other GPU's node is nowhere in the sandbox, and cannot be given to a container.
    refused = await docker(env, "run", "--rm", "--device", "/dev/nvidia1", TEST_IMAGE, "true",
                           check=False)  # fmt: skip
    assert refused.rc != 0
    assert "/dev/nvidia1" in refused.err and "no such file" in refused.err.lower()
    # `docker info` says which GPU the engine has and what serves --gpus (offload diagnose).
    labels = (await docker(env, "info", "--format", "{{json .Labels}}")).out
    assert f'"offload.gpus={standin.uuids[0]}"' in labels
    assert '"offload.gpu-runtime=nvidia-container-toolkit"' in labels


async def test_gpus_all_gives_the_container_its_gpu_and_nothing_else(env: Environment) -> None:
    listed = await docker(env, "run", "--rm", "--gpus", "all", TEST_IMAGE, "ls", "/dev")
    assert sorted(n for n in listed.out.split() if n.startswith("nvidia")) == [
        "nvidia-uvm",
        "nvidia0",
        "nvidiactl",
    ]
    by_index = await docker(env, "run", "--rm", "--gpus", "device=0", TEST_IMAGE, "ls", "/dev")
    assert "nvidia0" in by_index.out.split()
    plain = await docker(env, "run", "--rm", TEST_IMAGE, "ls", "/dev")
    assert not [n for n in plain.out.split() if n.startswith("nvidia")]  # no --gpus: none


async def test_another_gpu_is_refused_by_the_cli_naming_the_sessions_gpu(
    env: Environment, standin: StandinGpus
) -> None:
    refused = await docker(env, "run", "--rm", "--gpus", "device=1", TEST_IMAGE, "true",
                           check=False)  # fmt: skip
    assert refused.rc != 0
    assert "GPU '1' is not this session's" in refused.err
    assert STANDIN_MODEL in refused.err and standin.uuids[0] in refused.err
    assert "`--gpus device=0`" in refused.err
    too_many = await docker(env, "run", "--rm", "--gpus", "2", TEST_IMAGE, "true", check=False)
    assert too_many.rc != 0 and "2 GPUs asked for" in too_many.err


async def raw_create(env: Environment, content: bytes, **headers: str) -> httpx.Response:
    async with engine_client(env.engine_socket, 30) as engine:
        return await engine.post(
            "/v1.41/containers/create",
            content=content,
            headers={"Content-Type": "application/json", **headers},
        )


@pytest.mark.parametrize(
    "body",
    [
        {"HostConfig": {"DeviceRequests": [{"DeviceIDs": ["1"], "Capabilities": [["gpu"]]}]}},
        {"hostconfig": {"devicerequests": [{"deviceids": ["0,1"], "capabilities": [["gpu"]]}]}},
        {"DeviceRequests": [{"DeviceIDs": ["GPU-other"], "Capabilities": [["gpu"]]}]},
        {"HostConfig": {"DeviceRequests": [{"Count": 2, "Capabilities": [["gpu"]]}]}},
        {
            "Env": ["NVIDIA_VISIBLE_DEVICES=1"],
            "HostConfig": {"DeviceRequests": [{"Count": -1, "Capabilities": [["gpu"]]}]},
        },
    ],  # fmt: skip
)
async def test_the_raw_api_is_refused_in_odd_shapes(env: Environment, body: dict[str, Any]) -> None:
    answer = await raw_create(env, json.dumps({"Image": TEST_IMAGE, **body}).encode())
    assert answer.status_code == 403, answer.text
    assert "authorization denied by plugin" in answer.json()["message"]
    assert "Offload policy: " in answer.json()["message"]


async def test_chunked_and_oversized_bodies_are_refused(env: Environment) -> None:
    request = {"DeviceIDs": ["1"], "Capabilities": [["gpu"]]}
    body = json.dumps({"Image": TEST_IMAGE, "HostConfig": {"DeviceRequests": [request]}})

    async def chunks() -> AsyncIterator[bytes]:
        yield body.encode()  # no Content-Length: chunked

    async with engine_client(env.engine_socket, 30) as engine:
        chunked = await engine.post(
            "/v1.41/containers/create",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
    assert chunked.status_code == 403, chunked.text  # dockerd shows the plugin chunked bodies
    assert "GPU '1' is not this session's" in chunked.json()["message"]
    padded = await raw_create(env, body.encode() + b" " * 1024**2)  # over 1 MiB: withheld
    assert padded.status_code == 403, padded.text
    assert "could not be checked" in padded.json()["message"]


async def test_the_raw_api_may_ask_for_the_sessions_gpu_by_uuid(
    env: Environment, standin: StandinGpus
) -> None:
    request = {"DeviceIDs": [standin.uuids[0]], "Capabilities": [["gpu"]]}
    body = {"Image": TEST_IMAGE, "Cmd": ["ls", "/dev"], "HostConfig": {"DeviceRequests": [request]}}
    created = await raw_create(env, json.dumps(body).encode())
    assert created.status_code == 201, created.text
    ident = created.json()["Id"]
    try:
        await docker(env, "start", "-a", ident)
        logs = await docker(env, "logs", ident)
        assert "nvidia0" in logs.out.split()
    finally:
        await docker(env, "rm", "-f", ident)


async def test_destroy_kills_what_holds_the_gpu(
    settings: RunnerSettings,
    driver: RootlessDriver,
    standin: StandinGpus,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A container holding its GPU, and a process NVML lists on that GPU outside the sandbox
    (what a runaway would look like): none of them outlives the environment."""
    gpu = standin.uuids[1]
    released = await driver.create(SMALL, [gpu])
    await asyncio.to_thread(build_test_image, f"unix://{released.engine_socket}")
    await docker(released, "run", "-d", "--gpus", "all", TEST_IMAGE, "sh", "-c",
                 "exec 3</dev/nvidia1; sleep 300")  # fmt: skip
    with standin.node(1).open("rb") as node:
        stray = subprocess.Popen(["sleep", "300"], stdin=node, start_new_session=True)
    try:
        held = holders(standin.node(1))
        assert stray.pid in held and len(held) >= 2  # the container's shell and the stray

        with caplog.at_level(logging.WARNING, logger="offload.runner.gpus"):
            await driver.destroy(released)

        assert holders(standin.node(1)) == []
        assert stray.wait(timeout=10) == -9
        assert f"GPU {gpu}: killing 1 process(es)" in caplog.text
        assert f"[{stray.pid}]" in caplog.text
        assert released.area_owner is not None
        assert leftovers(settings, released.id, owner=released.area_owner[0]) == []
    finally:
        stray.kill()
        stray.wait()


async def test_the_inventory_reports_the_gpus_and_their_processes(
    driver: RootlessDriver, env: Environment, standin: StandinGpus
) -> None:
    inventory: GpuInventory = driver.gpus
    [first, second] = inventory.devices(warm={standin.uuids[1]})
    assert (first.uuid, first.model, first.warm) == (standin.uuids[0], STANDIN_MODEL, False)
    assert second.warm
    running = await docker(env, "run", "-d", "--gpus", "all", TEST_IMAGE, "sh", "-c",
                           "exec 3</dev/nvidia0; sleep 300")  # fmt: skip
    try:
        assert inventory.compute_pids(standin.uuids[0])  # the container's shell, through NVML
    finally:
        await docker(env, "rm", "-f", running.out)
    assert inventory.compute_pids(standin.uuids[0]) == []


async def test_a_dead_runners_gpu_environment_is_wiped_with_its_gpu(
    make_settings: MakeSettings, standin: StandinGpus, caplog: pytest.LogCaptureFixture
) -> None:
    """The runner dies: its successor finds the environment by its directories, and the GPU
    it held by the record in them."""
    settings = make_settings(gpu_standin=standin.file)
    fake = StandinNvml(standin.file)
    inventory = discover(fake, "all", fake.device_nodes())
    policies: list[PolicyLike] = []

    def factory(name: str, area: Path, plugins: Path, gpus: Sequence[SandboxGpu]) -> PolicyLike:
        policies.append(default_policy_factory(name, area, plugins, gpus))
        return policies[-1]

    orphan = await RootlessDriver(settings, factory, gpus=inventory).create(
        SMALL, [standin.uuids[1]]
    )
    with standin.node(1).open("rb") as node:
        stray = subprocess.Popen(["sleep", "300"], stdin=node, start_new_session=True)
    try:
        with caplog.at_level(logging.WARNING, logger="offload.runner.gpus"):
            wiped = await cleanup_orphans(settings, gpus=inventory)
        assert wiped == [orphan.id]
        assert stray.wait(timeout=10) == -9
        assert f"after environment {orphan.id}: [{stray.pid}]" in caplog.text
        assert orphan.area_owner is not None
        assert leftovers(settings, orphan.id, owner=orphan.area_owner[0]) == []
    finally:
        stray.kill()
        stray.wait()
        for policy in policies:
            await policy.stop()
        inventory.close()

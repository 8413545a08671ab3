"""GPU discovery (`offload.runner.gpus`) driven by the stand-in NVML, the operator's choice of
GPUs, and what registration and heartbeats carry. No GPU needed: the device nodes are real
character devices made with mknod (tests/support/gpus.py)."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from pydantic import ValidationError

from offload.core.config import RunnerSettings
from offload.core.errors import EnvironmentError_
from offload.core.schemas import GpuDevice, InstanceType, RunnerDesired, RunnerHeartbeat
from offload.core.waiting import async_wait_until
from offload.runner.daemon import Runner
from offload.runner.gpu_standin import StandinNvml, holders
from offload.runner.gpus import (
    GpuInventory,
    discover,
    find_toolkit,
    load,
    load_gpus,
    toolkit_config,
)
from offload.runner.pool import EnvironmentPool
from tests.support.drivers import FakeDriver
from tests.support.gpus import (
    STANDIN_DRIVER,
    STANDIN_HOOKS,
    STANDIN_MEMORY,
    STANDIN_MODEL,
    StandinGpus,
    make_standin_gpus,
)


@pytest.fixture
def standin(tmp_path: Path) -> StandinGpus:
    return make_standin_gpus(tmp_path / "gpus", count=2)


def standin_inventory(standin: StandinGpus, offered: str = "all") -> GpuInventory:
    fake = StandinNvml(standin.file)
    return discover(fake, offered, fake.device_nodes())


class NoDriver:
    """A minimal NVML as pynvml behaves on a host without the NVIDIA driver."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.init_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        raise self.NVMLError("Driver Not Loaded")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} called without a driver")


# ---- discovery -------------------------------------------------------------------------------


def test_the_standin_gpus_are_discovered_with_their_nodes(standin: StandinGpus) -> None:
    inventory = standin_inventory(standin)

    assert inventory.uuids == standin.uuids
    first = inventory.gpus[0]
    assert (first.index, first.model, first.memory_bytes) == (0, STANDIN_MODEL, STANDIN_MEMORY)
    assert (first.driver_version, first.minor, first.node) == (STANDIN_DRIVER, 0, standin.node(0))
    assert first.pci_bus == "0000:3b:00.0"  # as /proc/driver/nvidia/gpus names it
    assert inventory.gpus[1].inside_node == "/dev/nvidia1"
    # An environment holding GPU 1 gets its node under its own name, and the control nodes.
    assert inventory.sandbox_devices([standin.uuids[1]]) == [
        (standin.node(1), "/dev/nvidia1"),
        (standin.directory / "nvidia-uvm", "/dev/nvidia-uvm"),
        (standin.directory / "nvidiactl", "/dev/nvidiactl"),
    ]
    assert inventory.sandbox_devices([]) == []
    [view] = inventory.sandbox_view([standin.uuids[1]])
    assert (view.index, view.uuid, view.inside_node) == (0, standin.uuids[1], "/dev/nvidia1")


def test_devices_carry_fresh_utilisation_and_the_warm_flag(standin: StandinGpus) -> None:
    inventory = standin_inventory(standin)
    before = inventory.devices()
    assert [d.utilization_percent for d in before] == [0, 0]

    standin.set(1, utilization_percent=73, memory_used_bytes=5 * 1024**3)
    standin.set(0, utilization_percent=None)  # NVML gives no value for this one
    after = inventory.devices(warm={standin.uuids[1]})

    assert after[1] == GpuDevice(
        uuid=standin.uuids[1],
        index=1,
        model=STANDIN_MODEL,
        memory_bytes=STANDIN_MEMORY,
        driver_version=STANDIN_DRIVER,
        utilization_percent=73,
        memory_used_bytes=5 * 1024**3,
        warm=True,
    )
    assert (after[0].utilization_percent, after[0].warm) == (None, False)


def test_a_host_without_the_driver_has_no_gpus_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = NoDriver()
    with caplog.at_level(logging.INFO, logger="offload.runner.gpus"):
        inventory = discover(nvml, "all")
    assert len(inventory) == 0 and inventory.devices() == []
    assert "no NVIDIA driver" in caplog.text and "Driver Not Loaded" in caplog.text
    assert nvml.init_calls == 1


def test_the_standin_can_play_a_host_without_the_driver(standin: StandinGpus) -> None:
    standin.fail_init()
    assert len(load("all", standin.file)) == 0
    with pytest.raises(EnvironmentError_, match="NVML cannot start: Driver Not Loaded"):
        load("0", standin.file)


def test_naming_gpus_on_a_host_without_the_driver_stops_the_runner() -> None:
    with pytest.raises(EnvironmentError_) as caught:
        discover(NoDriver(), "0")
    assert "NVML cannot start" in caught.value.message
    assert "OFFLOAD_RUNNER_GPUS" in caught.value.fix


def test_none_offers_nothing_without_asking_nvml() -> None:
    nvml = NoDriver()
    assert len(discover(nvml, "none")) == 0
    assert nvml.init_calls == 0


def test_a_gpu_without_its_device_node_is_not_offered(
    standin: StandinGpus, caplog: pytest.LogCaptureFixture
) -> None:
    standin.node(0).unlink()
    inventory = standin_inventory(standin)
    assert inventory.uuids == [standin.uuids[1]]
    assert "device node" in caplog.text and "missing" in caplog.text


# ---- the operator's choice -----------------------------------------------------------------


def test_the_operator_restricts_the_gpus_by_index_or_uuid(standin: StandinGpus) -> None:
    assert standin_inventory(standin, "1").uuids == [standin.uuids[1]]
    by_uuid = standin_inventory(standin, standin.uuids[0].upper())
    assert by_uuid.uuids == [standin.uuids[0]]
    both = standin_inventory(standin, f"{standin.uuids[1]}, 0")
    assert both.uuids == standin.uuids  # host order, whatever the order named
    assert len(standin_inventory(standin, "none")) == 0


def test_a_name_that_matches_no_gpu_is_a_startup_error_naming_those_found(
    standin: StandinGpus,
) -> None:
    with pytest.raises(EnvironmentError_) as caught:
        standin_inventory(standin, "0,7")
    message = caught.value.message
    assert "'7'" in message and "matches no GPU" in message
    for gpu_uuid in standin.uuids:
        assert gpu_uuid in message
    assert "nvidia-smi -L" in caught.value.fix


@pytest.mark.parametrize("value", ["", "0,,1", " , "])
def test_malformed_gpu_choices_are_refused_by_the_settings(value: str) -> None:
    with pytest.raises(ValidationError, match="OFFLOAD_RUNNER_GPUS"):
        RunnerSettings(gpus=value)


def test_the_settings_pick_the_standin_and_say_so(
    standin: StandinGpus, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OFFLOAD_RUNNER_GPU_STANDIN", str(standin.file))
    monkeypatch.setenv("OFFLOAD_RUNNER_GPUS", "1")
    monkeypatch.setenv("OFFLOAD_RUNNER_WARM_GPU", "1")
    settings = RunnerSettings()
    assert (settings.gpu_standin, settings.gpus, settings.warm_gpu) == (standin.file, "1", 1)
    with caplog.at_level(logging.WARNING):
        inventory = load_gpus(settings)
    assert inventory.uuids == [standin.uuids[1]]
    assert "GPU STAND-IN in use" in caplog.text


# ---- processes on a GPU ---------------------------------------------------------------------


def test_compute_processes_are_those_holding_the_node_and_wipe_kills_them(
    standin: StandinGpus, caplog: pytest.LogCaptureFixture
) -> None:
    inventory = standin_inventory(standin)
    with standin.node(0).open("rb") as node:
        holder = subprocess.Popen(["sleep", "300"], stdin=node, start_new_session=True)
    try:
        assert inventory.compute_pids(standin.uuids[0]) == [holder.pid]
        assert inventory.compute_pids(standin.uuids[1]) == []
        # The same numbers as /dev/null: only the inode counts, not the device numbers.
        assert os.getpid() not in holders(standin.node(0))

        left = inventory.wipe(standin.uuids, "environment env-test")

        assert left == []
        assert holder.wait(timeout=10) == -9
        assert inventory.compute_pids(standin.uuids[0]) == []
        assert f"killing 1 process(es) still on it after environment env-test: [{holder.pid}]" in (
            caplog.text
        )
    finally:
        holder.kill()
        holder.wait()


# ---- the container toolkit -------------------------------------------------------------------


def test_the_toolkit_config_gets_no_cgroups() -> None:
    fresh = toolkit_config(None)
    assert fresh == "[nvidia-container-cli]\nno-cgroups = true\n"
    host = (
        "disable-require = false\n\n[nvidia-container-cli]\nenvironment = []\n#no-cgroups = false\n"
        'ldconfig = "@/sbin/ldconfig"\n\n[nvidia-container-runtime]\nlog-level = "info"\n'
    )
    edited = toolkit_config(host)
    assert "#no-cgroups" not in edited
    assert edited.count("no-cgroups = true") == 1
    cli = edited.split("[nvidia-container-cli]")[1].split("[nvidia-container-runtime]")[0]
    assert "no-cgroups = true" in cli and 'ldconfig = "@/sbin/ldconfig"' in cli
    # No line for it: added at the end of the section, before the next one.
    added = toolkit_config('[nvidia-container-cli]\nuser = ""\n[other]\nx = 1\n')
    assert added == '[nvidia-container-cli]\nuser = ""\nno-cgroups = true\n[other]\nx = 1\n'


def test_an_operator_hook_dir_must_hold_the_hook(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentError_, match="no executable nvidia-container-runtime-hook"):
        find_toolkit(tmp_path)
    toolkit = find_toolkit(STANDIN_HOOKS, host_config=tmp_path / "absent.toml")
    assert toolkit.available and toolkit.hooks == STANDIN_HOOKS
    assert toolkit.config == "[nvidia-container-cli]\nno-cgroups = true\n"


# ---- registration and heartbeats -------------------------------------------------------------


class RecordingClient:
    """The part of RunnerClient that `Runner._heartbeat` calls, recording what it sends."""

    def __init__(self) -> None:
        self.heartbeats: list[RunnerHeartbeat] = []

    async def heartbeat(self, runner_id: str, report: RunnerHeartbeat, wait_s: float) -> Any:
        self.heartbeats.append(report)
        return RunnerDesired(sessions=[], ca_public_key="")


def make_runner(inventory: GpuInventory, pool: EnvironmentPool) -> tuple[Runner, RecordingClient]:
    client = RecordingClient()
    runner = Runner(
        RunnerSettings(name="gpu-host"),
        client,  # type: ignore[arg-type]
        pool,
        asyncssh.generate_private_key("ssh-ed25519"),
        gpus=inventory,
    )
    runner.runner_id = "run-1"
    return runner, client


def warm_gpu_in(pool: EnvironmentPool) -> Callable[[], Awaitable[bool]]:
    async def warm() -> bool:
        return bool(pool.warm_gpus())

    return warm


async def test_registration_and_heartbeats_carry_the_gpus(standin: StandinGpus) -> None:
    inventory = standin_inventory(standin)
    driver = FakeDriver()
    pool = EnvironmentPool(driver, size=0, capacity=4, gpus=inventory.uuids, warm_gpu=1)
    runner, client = make_runner(inventory, pool)
    await pool.start()
    try:
        await async_wait_until(warm_gpu_in(pool), 10, "a warm GPU environment")
        registration = runner.registration(await runner.gpu_devices())
        assert registration.instance_types == [InstanceType.STANDARD, InstanceType.GPU]
        assert registration.gpus == 2
        assert [d.uuid for d in registration.gpu_devices] == standin.uuids
        # The warm GPU environment holds the first free GPU.
        assert [d.warm for d in registration.gpu_devices] == [True, False]
        assert registration.gpu_devices[0].model == STANDIN_MODEL

        standin.set(1, utilization_percent=55)
        await runner._heartbeat()
        [sent] = client.heartbeats
        assert sent.gpu_devices is not None
        assert [d.utilization_percent for d in sent.gpu_devices] == [0, 55]
        assert sent.warm == 1
    finally:
        await pool.close()


async def test_a_runner_without_gpus_registers_standard_only() -> None:
    pool = EnvironmentPool(FakeDriver(), size=0, capacity=2)
    runner, client = make_runner(GpuInventory.empty(), pool)
    registration = runner.registration(await runner.gpu_devices())
    assert (registration.instance_types, registration.gpus) == ([InstanceType.STANDARD], 0)
    assert registration.gpu_devices == []
    await runner._heartbeat()
    assert client.heartbeats[0].gpu_devices is None  # unchanged: none

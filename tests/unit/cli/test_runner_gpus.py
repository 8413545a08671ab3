"""`offload runner gpus`, the real CLI process, on the GPU stand-in (device nodes by mknod: root):
what it lists is what the runner's registration would send, OFFLOAD_RUNNER_GPUS restricts it,
and a name that matches no GPU stops it with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offload.core.schemas import GpuDevice, RunnerRegister
from tests.support.gpus import STANDIN_DRIVER, STANDIN_HOOKS, STANDIN_MODEL, make_standin_gpus

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the stand-in's nodes need mknod")


def offload_gpus(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    return subprocess.run(
        [str(BIN / "offload"), "runner", "gpus", *args],
        env={**base, "COLUMNS": "400", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_lists_the_standin_gpus_as_the_registration_sends_them(tmp_path: Path) -> None:
    gpus = make_standin_gpus(tmp_path / "gpus", count=2)
    gpus.set(1, utilization_percent=40, memory_used_bytes=2 * 1024**3)
    env = {
        "OFFLOAD_RUNNER_GPU_STANDIN": str(gpus.file),
        "OFFLOAD_RUNNER_GPU_HOOK_DIR": str(STANDIN_HOOKS),
    }

    result = offload_gpus("--json", **env)

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    devices = [GpuDevice.model_validate(d) for d in data["gpu_devices"]]
    assert [d.uuid for d in devices] == gpus.uuids
    assert [d.index for d in devices] == [0, 1]
    assert {d.model for d in devices} == {STANDIN_MODEL}
    assert {d.driver_version for d in devices} == {STANDIN_DRIVER}
    assert (devices[1].utilization_percent, devices[1].memory_used_bytes) == (40, 2 * 1024**3)
    assert not any(d.warm for d in devices)
    # The control plane's schema takes them as they are.
    RunnerRegister(
        name="r", ssh_host="h", ssh_port=22, host_key="k", capacity=1, gpu_devices=devices
    )
    assert data["device_nodes"] == {u: str(gpus.node(i)) for i, u in enumerate(gpus.uuids)}
    assert data["toolkit"]["available"] and data["toolkit"]["hook_dir"] == str(STANDIN_HOOKS)
    assert data["standin"] == str(gpus.file)

    table = offload_gpus(**env)
    assert table.returncode == 0, table.stderr
    assert "GPU STAND-IN in use" in table.stdout and "2 GPU(s) offered" in table.stdout
    for i, gpu_uuid in enumerate(gpus.uuids):
        assert gpu_uuid in table.stdout and str(gpus.node(i)) in table.stdout
    assert "80 GiB" in table.stdout and "40%" in table.stdout
    assert f"Toolkit: nvidia-container-runtime-hook from {STANDIN_HOOKS}" in table.stdout


def test_offload_runner_gpus_restricts_to_the_gpus_named(tmp_path: Path) -> None:
    gpus = make_standin_gpus(tmp_path / "gpus", count=3)
    env = {"OFFLOAD_RUNNER_GPU_STANDIN": str(gpus.file)}

    by_uuid = offload_gpus("--json", OFFLOAD_RUNNER_GPUS=gpus.uuids[2].lower(), **env)
    by_index = offload_gpus("--json", OFFLOAD_RUNNER_GPUS="1", **env)

    assert by_uuid.returncode == 0 and by_index.returncode == 0, by_uuid.stderr + by_index.stderr
    assert [d["uuid"] for d in json.loads(by_uuid.stdout)["gpu_devices"]] == [gpus.uuids[2]]
    assert [d["index"] for d in json.loads(by_index.stdout)["gpu_devices"]] == [1]


def test_a_name_that_matches_no_gpu_fails_with_the_fix(tmp_path: Path) -> None:
    gpus = make_standin_gpus(tmp_path / "gpus", count=2)

    result = offload_gpus(OFFLOAD_RUNNER_GPU_STANDIN=str(gpus.file), OFFLOAD_RUNNER_GPUS="0,7")

    assert result.returncode == 8, result.stdout + result.stderr
    assert "'7'" in result.stderr and "matches no GPU" in result.stderr
    assert gpus.uuids[0] in result.stderr  # the GPUs found are listed
    assert "nvidia-smi -L" in result.stderr and "Traceback" not in result.stderr
    malformed = offload_gpus(OFFLOAD_RUNNER_GPUS="0,,1")
    assert malformed.returncode == 2 and "OFFLOAD_RUNNER_GPUS" in malformed.stderr
    assert "Traceback" not in malformed.stderr


def test_no_driver_is_said_with_nvmls_error_and_is_not_a_failure(tmp_path: Path) -> None:
    gpus = make_standin_gpus(tmp_path / "gpus", count=1)
    gpus.fail_init("Driver Not Loaded")

    result = offload_gpus(OFFLOAD_RUNNER_GPU_STANDIN=str(gpus.file))
    as_json = offload_gpus("--json", OFFLOAD_RUNNER_GPU_STANDIN=str(gpus.file))

    assert result.returncode == 0, result.stderr
    assert "No GPU to offer" in result.stdout and "Driver Not Loaded" in result.stdout
    data = json.loads(as_json.stdout)
    assert data["gpu_devices"] == [] and any("Driver Not Loaded" in n for n in data["notes"])

"""GPU sessions end to end, with the GPU STAND-IN: `offload up` whose runner finds two fake GPUs
through the stand-in NVML (tests/support/gpus.py: real character devices, a JSON file read in
place of NVML) and runs `--gpus` through the stand-in for the NVIDIA Container Toolkit's hook.
No machine CI runs on has a GPU; everything else is real: the CLI, the control plane's
placement, the SSH tunnel, the sandboxed engines, the docker CLI.

What it shows: `docker offload start --gpu` places the session on a GPU and says which; the
container sees that GPU and no other (`--gpus all`), another one is refused naming the
session's; a second user gets the other GPU, a third is refused naming what is busy; a stop
frees the GPU and leaves no process on it; owners' rules; status, diagnose and the operator's
fleet view show the GPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload.core.schemas import Role
from offload.core.waiting import wait_until
from offload.runner.gpu_standin import holders
from tests.e2e.conftest import Deployment, User, embedded_deployment, signed_in_user, started
from tests.support.gpus import STANDIN_HOOKS, STANDIN_MODEL, StandinGpus, make_standin_gpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> StandinGpus:
    return make_standin_gpus(tmp_path_factory.mktemp("gpus"), count=2)


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, standin: StandinGpus
) -> Iterator[Deployment]:
    runner_env = {
        "OFFLOAD_RUNNER_GPU_STANDIN": str(standin.file),
        "OFFLOAD_RUNNER_GPU_HOOK_DIR": str(STANDIN_HOOKS),
    }
    with embedded_deployment(tmp_path_factory.mktemp("gpu-admin"), "gpu", runner_env) as found:
        yield found


@pytest.fixture(scope="module")
def people(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> dict[str, User]:
    def user(prefix: str, role: Role = Role.MEMBER) -> User:
        return signed_in_user(deployment, tmp_path_factory, prefix, "vision", role)

    return {name: user(name) for name in ("ada", "bo", "cy")} | {"owner": user("own", Role.OWNER)}


@pytest.fixture(scope="module", autouse=True)
def _sessions_stop(people: dict[str, User]) -> Iterator[None]:
    yield
    for user in people.values():
        user.offload("stop", "--force", check=False, timeout=60)


def _gpu_nodes(user: User, *run_args: str) -> list[str]:
    listed = user.docker("run", "--rm", *run_args, "hello", "ls", "/dev").stdout.split()
    return sorted(name for name in listed if name.startswith("nvidia"))


def _status(user: User) -> dict[str, object]:
    data: dict[str, object] = json.loads(user.offload("status", "--format", "json").stdout)
    return data


def test_gpu_sessions_get_one_gpu_each_and_release_it_at_stop(
    people: dict[str, User], standin: StandinGpus, hello_context: Path, deployment: Deployment
) -> None:
    ada, bo, cy = people["ada"], people["bo"], people["cy"]

    start = ada.docker("offload", "start", "--gpu", "--timeout", "60s")
    assert f"GPU: {STANDIN_MODEL}" in start.stdout and standin.uuids[0] in start.stdout
    started(ada, hello_context)
    status = _status(ada)
    assert [gpu["uuid"] for gpu in status["gpu_devices"]] == [standin.uuids[0]]  # type: ignore[index, union-attr]

    # The container sees its GPU (and the control nodes), no other; no --gpus: none.
    assert _gpu_nodes(ada, "--gpus", "all") == ["nvidia-uvm", "nvidia0", "nvidiactl"]
    assert _gpu_nodes(ada) == []
    other = ada.docker(
        "run", "--rm", "--gpus", f"device={standin.uuids[1]}", "hello", "true", check=False
    )
    assert other.returncode != 0
    assert standin.uuids[1] in other.stderr and standin.uuids[0] in other.stderr, other.stderr
    assert "--gpus all" in other.stderr
    missing = ada.docker("run", "--rm", "--device", "/dev/nvidia1", "hello", "true", check=False)
    assert missing.returncode != 0 and "/dev/nvidia1" in missing.stderr

    # NVML's utilisation reaches `offload status` with the runner's next heartbeat.
    standin.set(0, utilization_percent=63, memory_used_bytes=20 * 1024**3)
    wait_until(
        lambda: "63% busy, 20.0 GiB used" in ada.offload("status").stdout,
        60,
        "the GPU's utilisation in `offload status`",
    )

    diagnose = json.loads(ada.offload("diagnose", "--json", check=False).stdout)
    gpu_check = next(check for check in diagnose["checks"] if check["name"] == "GPU")
    assert gpu_check["status"] == "pass", gpu_check
    assert standin.uuids[0] in gpu_check["detail"]

    # A process of the session holds its GPU: the stand-in NVML lists it as a compute process.
    ada.docker("run", "-d", "--gpus", "all", "hello", "sh", "-c", "exec sleep 600 < /dev/nvidia0")
    wait_until(lambda: holders(standin.node(0)) != [], 30, "the container to hold GPU 0")

    # A second user gets the other GPU; a third is refused, told what is busy.
    bo.docker("offload", "start", "--gpu", "--timeout", "60s")
    assert [gpu["uuid"] for gpu in _status(bo)["gpu_devices"]] == [standin.uuids[1]]  # type: ignore[index, union-attr]
    refused = cy.docker("offload", "start", "--gpu", "--timeout", "60s", check=False)
    assert refused.returncode != 0
    assert "Every GPU is in use" in refused.stderr and "2 of 2" in refused.stderr, refused.stderr
    assert "without --gpu" in refused.stderr

    # Without the embedded control plane's data dir the operator is told where it is (no empty
    # database is made at the default path).
    lost = deployment.admin.offload(
        "admin", "runners", "--json", check=False, env_extra={"COLUMNS": "400"}
    )
    assert lost.returncode != 0 and str(deployment.server_settings.data_dir) in lost.stderr
    server_env = {"OFFLOAD_DATA_DIR": str(deployment.server_settings.data_dir)}
    fleet = json.loads(
        deployment.admin.offload("admin", "runners", "--json", env_extra=server_env).stdout
    )
    assert [(r["gpus"], r["gpus_busy"]) for r in fleet["runners"]] == [(2, 2)]

    # Stopping frees the GPU and leaves nothing running on it.
    ada.docker("offload", "stop", "--force")
    wait_until(lambda: holders(standin.node(0)) == [], 60, "GPU 0 to be wiped of processes")
    cy.docker("offload", "start", "--gpu", "--timeout", "60s")
    assert [gpu["uuid"] for gpu in _status(cy)["gpu_devices"]] == [standin.uuids[0]]  # type: ignore[index, union-attr]
    for user in (bo, cy):
        user.docker("offload", "stop", "--force")


def test_owners_turn_gpu_sessions_off_and_members_are_told(people: dict[str, User]) -> None:
    owner, member = people["owner"], people["bo"]
    denied = member.offload("org", "settings", "vision", "--gpu-sessions", "deny", check=False)
    assert denied.returncode != 0 and owner.name in denied.stderr  # members cannot change it

    owner.offload("org", "settings", "vision", "--gpu-sessions", "deny")
    refused = member.docker("offload", "start", "--gpu", "--timeout", "60s", check=False)
    assert refused.returncode != 0
    assert "Organisation vision does not allow GPU sessions" in refused.stderr, refused.stderr
    settings = json.loads(
        owner.offload("org", "settings", "vision", "--gpu-sessions", "allow", "--json").stdout
    )
    assert settings["gpu_sessions_allowed"] is True
    bad = owner.offload("org", "settings", "vision", "--gpu-limit", "lots", check=False)
    assert bad.returncode != 0 and "--gpu-limit 2" in bad.stderr

"""GPU STAND-IN for tests on hosts without a GPU: fake device nodes and the file that
`offload.runner.gpu_standin` (OFFLOAD_RUNNER_GPU_STANDIN) reads in place of NVML.

The device nodes are real character devices (mknod, with the numbers of /dev/null: opening one
reads and writes nothing), so they can be bound into a sandbox and into containers, and a
process that holds one open is a real "compute process" of that GPU. `STANDIN_HOOKS` is the
directory of the stand-in for the NVIDIA Container Toolkit's prestart hook
(OFFLOAD_RUNNER_GPU_HOOK_DIR), which makes `docker run --gpus` work in a GPU session's engine.

A runner with stand-in GPUs (the real `offload runner` process as well):

    gpus = make_standin_gpus(tmp_dir, count=2)
    RunnerSettings(..., gpu_standin=gpus.file, gpu_hook_dir=STANDIN_HOOKS)
    # or OFFLOAD_RUNNER_GPU_STANDIN=<gpus.file> OFFLOAD_RUNNER_GPU_HOOK_DIR=<STANDIN_HOOKS>
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STANDIN_HOOKS = Path(__file__).resolve().parent / "gpu_standin"
STANDIN_MODEL = "Offload Stand-in GPU 80GB"
STANDIN_MEMORY = 80 * 1024**3
STANDIN_DRIVER = "550.54.15-standin"
_NULL = os.makedev(1, 3)


@dataclass
class StandinGpus:
    file: Path  # the JSON file (OFFLOAD_RUNNER_GPU_STANDIN)
    directory: Path  # where the fake device nodes are
    uuids: list[str]  # in NVML index order; GPU i has minor i

    def node(self, index: int) -> Path:
        return self.directory / f"nvidia{index}"

    def data(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.file.read_text())
        return value

    def set(self, index: int, **fields: Any) -> None:
        """Change what the stand-in answers for GPU `index` (e.g. utilization_percent=40)."""
        data = self.data()
        data["devices"][index].update(fields)
        self.file.write_text(json.dumps(data, indent=2))

    def fail_init(self, error: str = "Driver Not Loaded") -> None:
        data = self.data()
        data["init_error"] = error
        self.file.write_text(json.dumps(data, indent=2))


def make_node(path: Path) -> Path:
    os.mknod(path, stat.S_IFCHR | 0o666, _NULL)
    os.chmod(path, 0o666)  # mknod's mode goes through the umask
    return path


def make_standin_gpus(
    directory: Path,
    count: int = 2,
    control: tuple[str, ...] = ("nvidiactl", "nvidia-uvm"),
    model: str = STANDIN_MODEL,
) -> StandinGpus:
    """`count` fake GPUs (minors 0..count-1) with their nodes and `control` nodes in
    `directory`, and the stand-in file describing them (`directory/gpus.json`)."""
    directory.mkdir(parents=True, exist_ok=True)
    uuids = [f"GPU-{uuid.uuid4()}" for _ in range(count)]
    devices = [
        {
            "uuid": gpu_uuid,
            "name": model,
            "memory_bytes": STANDIN_MEMORY,
            "minor": i,
            "node": str(make_node(directory / f"nvidia{i}")),
            "utilization_percent": 0,
            "memory_used_bytes": 0,
            "pci_bus_id": f"00000000:{0x3B + i:02X}:00.0",
        }
        for i, gpu_uuid in enumerate(uuids)
    ]
    nodes = {name: str(make_node(directory / name)) for name in control}
    file = directory / "gpus.json"
    document = {"driver_version": STANDIN_DRIVER, "control_nodes": nodes, "devices": devices}
    file.write_text(json.dumps(document, indent=2))
    return StandinGpus(file, directory, uuids)

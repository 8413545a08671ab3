"""A GPU provider STAND-IN for hosts without a GPU (tests, CI): fake NVML answers from a file.

`OFFLOAD_RUNNER_GPU_STANDIN=/path/gpus.json` makes the runner read its GPUs from that file
instead of the NVIDIA driver, and say so in its log. It is a test stand-in, never meant for
production: the "GPUs" are whatever the file lists, their device nodes are whatever character
devices it names (tests make them with mknod, with the numbers of /dev/null).

`StandinNvml` implements the NVML calls `offload.runner.gpus` makes, under pynvml's names. What
it answers about processes is real: a GPU's compute processes are the processes that hold its
device node open (found through /proc/*/fd, by inode), so the runner's release path (kill what
is left on a GPU) is exercised against real processes. Utilisation and memory use are read from
the file at each call, so a test can change them between heartbeats.

The file (JSON):

    {
      "driver_version": "550.54.15",
      "control_nodes": {"nvidiactl": "/abs/path/nvidiactl", "nvidia-uvm": "/abs/path/nvidia-uvm"},
      "devices": [
        {"uuid": "GPU-…", "name": "Stand-in GPU", "memory_bytes": 85899345920, "minor": 0,
         "node": "/abs/path/nvidia0", "utilization_percent": 0, "memory_used_bytes": 0,
         "pci_bus_id": "00000000:3B:00.0"}
      ],
      "init_error": null
    }

`init_error`, when set (e.g. "Driver Not Loaded"), makes nvmlInit fail as on a host whose
driver is missing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

# NVML's return codes for the errors the stand-in raises.
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_DRIVER_NOT_LOADED = 9


class StandinDevice(BaseModel):
    uuid: str = Field(min_length=1)
    name: str = "Offload stand-in GPU"
    memory_bytes: int = Field(default=80 * 1024**3, ge=0)
    minor: int = Field(ge=0, le=255)
    node: Path
    utilization_percent: int | None = Field(default=0, ge=0, le=100)
    memory_used_bytes: int | None = Field(default=0, ge=0)
    pci_bus_id: str | None = None


class StandinFile(BaseModel):
    driver_version: str = "0.0.0-standin"
    control_nodes: dict[str, Path] = {}
    devices: list[StandinDevice] = []
    init_error: str | None = None


class NVMLError(Exception):
    """pynvml's NVMLError, as the stand-in raises it (`value`: NVML's return code)."""

    def __init__(self, value: int, text: str) -> None:
        super().__init__(text)
        self.value = value


@dataclass(frozen=True)
class Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class Utilization:
    gpu: int
    memory: int


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    usedGpuMemory: int | None = None  # pynvml's field name


@dataclass(frozen=True)
class PciInfo:
    busId: str  # pynvml's field name


@dataclass(frozen=True)
class _Handle:
    index: int
    uuid: str


@dataclass(frozen=True)
class StandinNodes:
    """`offload.runner.gpus.DeviceNodes` for the stand-in: the paths its file names."""

    by_minor: dict[int, Path]
    controls: dict[str, Path]

    def gpu(self, minor: int) -> Path:
        return self.by_minor.get(minor, Path(f"/nonexistent/standin-nvidia{minor}"))

    def control(self) -> dict[str, Path]:
        return dict(self.controls)


class StandinNvml:
    """Fake NVML (pynvml's call names) reading `path`; see the module docstring."""

    NVMLError = NVMLError

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._initialized = False

    def _read(self) -> StandinFile:
        return StandinFile.model_validate_json(self.path.read_bytes())

    def _device(self, handle: Any) -> StandinDevice:
        if not self._initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED, "Uninitialized")
        if not isinstance(handle, _Handle):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT, "Invalid Argument")
        for device in self._read().devices:
            if device.uuid == handle.uuid:
                return device
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT, "Invalid Argument")

    def device_nodes(self) -> StandinNodes:
        data = self._read()
        return StandinNodes({d.minor: d.node for d in data.devices}, dict(data.control_nodes))

    # ---- pynvml's calls ---------------------------------------------------------------------

    def nvmlInit(self) -> None:
        error = self._read().init_error
        if error:
            raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED, error)
        self._initialized = True

    def nvmlShutdown(self) -> None:
        self._initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        if not self._initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED, "Uninitialized")
        return self._read().driver_version

    def nvmlDeviceGetCount(self) -> int:
        if not self._initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED, "Uninitialized")
        return len(self._read().devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        if not self._initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED, "Uninitialized")
        devices = self._read().devices
        if not 0 <= index < len(devices):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT, "Invalid Argument")
        return _Handle(index, devices[index].uuid)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._device(handle).uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._device(handle).name

    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        return self._device(handle).minor

    def nvmlDeviceGetPciInfo(self, handle: Any) -> PciInfo:
        bus = self._device(handle).pci_bus_id
        if bus is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT, "Not Supported")
        return PciInfo(bus)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Memory:
        device = self._device(handle)
        used = device.memory_used_bytes or 0
        return Memory(device.memory_bytes, max(0, device.memory_bytes - used), used)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Utilization:
        device = self._device(handle)
        if device.utilization_percent is None:
            raise NVMLError(3, "Not Supported")  # NVML_ERROR_NOT_SUPPORTED
        return Utilization(device.utilization_percent, 0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[ProcessInfo]:
        return [ProcessInfo(pid) for pid in holders(self._device(handle).node)]


def holders(node: Path) -> list[int]:
    """Pids of the processes that have `node` open (the same inode, through any mount)."""
    try:
        wanted = os.stat(node)
    except OSError:
        return []
    key = (wanted.st_dev, wanted.st_ino)
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    st = os.stat(fd.path)
                    if (st.st_dev, st.st_ino) == key:
                        found.append(int(entry.name))
                        break
    return sorted(found)

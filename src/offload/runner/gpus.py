"""The GPUs this runner offers: discovered through NVML, restricted by the operator.

NVML (`pynvml`, from NVIDIA's `nvidia-ml-py`) is taken as an injected object so that a stand-in
can replace it: `offload.runner.gpu_standin` answers the same calls from a JSON file on hosts
without a GPU (tests, CI). Only these calls are used:

    nvmlInit  nvmlShutdown  nvmlSystemGetDriverVersion  nvmlDeviceGetCount
    nvmlDeviceGetHandleByIndex  nvmlDeviceGetUUID  nvmlDeviceGetName  nvmlDeviceGetMemoryInfo
    nvmlDeviceGetMinorNumber  nvmlDeviceGetPciInfo  nvmlDeviceGetUtilizationRates
    nvmlDeviceGetComputeRunningProcesses

A host without the NVIDIA driver (or without NVML) offers no GPUs: said once in the log, not a
crash, unless the operator named GPUs (`OFFLOAD_RUNNER_GPUS`), which is then a start-up error.

Each GPU needs its own device node (`/dev/nvidia<minor>`) and the shared control nodes
(`/dev/nvidiactl`, `/dev/nvidia-uvm`, `/dev/nvidia-uvm-tools`, `/dev/nvidia-modeset`, where
present) inside the sandbox of the environment that holds it (`sandbox_devices`); nothing else
of /dev/nvidia* goes in. Inside, a GPU keeps its host node name (NVML and the NVIDIA Container
Toolkit look a device up by its minor number), and NVML inside numbers the environment's GPUs
from 0 in host order (`SandboxGpu`).

Blocking (NVML calls, /proc walks): call from a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import stat
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from offload.core.config import RunnerSettings, parse_gpu_choice
from offload.core.errors import EnvironmentError_
from offload.core.schemas import MAX_GPUS_PER_RUNNER, GpuDevice

log = logging.getLogger(__name__)

HOST_DEV = Path("/dev")
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
KILL_TIMEOUT_S = 10.0


class Nvml(Protocol):
    """The part of pynvml this module calls (a module or a stand-in object)."""

    @property
    def NVMLError(self) -> type[Exception]: ...  # pynvml's name

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str | bytes: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...  # .total .used
    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...  # .gpu
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]: ...  # .pid


class DeviceNodes(Protocol):
    """Where a host keeps the NVIDIA device nodes (the stand-in: wherever its file says)."""

    def gpu(self, minor: int) -> Path: ...

    def control(self) -> dict[str, Path]:
        """Name (`nvidiactl`) -> host path of each control node present."""
        ...


@dataclass(frozen=True)
class HostDeviceNodes:
    dev: Path = HOST_DEV

    def gpu(self, minor: int) -> Path:
        return self.dev / f"nvidia{minor}"

    def control(self) -> dict[str, Path]:
        return {name: self.dev / name for name in CONTROL_NODES if _is_char_device(self.dev / name)}


@dataclass(frozen=True)
class Gpu:
    """One GPU as discovered (what does not change while the runner runs)."""

    uuid: str
    index: int  # NVML's, on the runner host
    model: str
    memory_bytes: int
    driver_version: str
    minor: int
    node: Path  # host path of its device node
    pci_bus: str | None = None  # as /proc/driver/nvidia/gpus names it: 0000:3b:00.0

    @property
    def inside_node(self) -> str:
        return f"/dev/nvidia{self.minor}"

    def label(self) -> str:
        return f"{self.index} {self.uuid} ({self.model})"


@dataclass(frozen=True)
class SandboxGpu:
    """A GPU as the environment's engine sees it: NVML inside numbers them 0.. in host order."""

    index: int
    uuid: str
    model: str
    inside_node: str


class GpuInventory:
    """The GPUs offered, with NVML kept open for live numbers (utilisation, processes)."""

    def __init__(
        self,
        nvml: Nvml | None = None,
        gpus: Sequence[Gpu] = (),
        control: dict[str, Path] | None = None,
        handles: dict[str, Any] | None = None,
    ) -> None:
        self._nvml = nvml
        self.gpus = list(gpus)
        self.control = dict(control or {})
        self._handles = dict(handles or {})
        self._by_uuid = {gpu.uuid: gpu for gpu in self.gpus}

    @classmethod
    def empty(cls) -> GpuInventory:
        return cls()

    def __len__(self) -> int:
        return len(self.gpus)

    @property
    def uuids(self) -> list[str]:
        return [gpu.uuid for gpu in self.gpus]

    def get(self, uuid: str) -> Gpu:
        gpu = self._by_uuid.get(uuid)
        if gpu is None:
            raise EnvironmentError_(
                f"GPU {uuid} is not offered by this runner "
                f"(it offers: {', '.join(self.uuids) or 'none'}).",
                "The control plane's view of this runner is out of date: it corrects itself "
                "at the next registration (restart the runner if it persists).",
            )
        return gpu

    def of(self, uuids: Iterable[str]) -> list[Gpu]:
        """The GPUs named, in host order (raises for one not offered)."""
        return sorted((self.get(u) for u in dict.fromkeys(uuids)), key=lambda g: g.index)

    def sandbox_view(self, uuids: Iterable[str]) -> list[SandboxGpu]:
        return [
            SandboxGpu(i, gpu.uuid, gpu.model, gpu.inside_node)
            for i, gpu in enumerate(self.of(uuids))
        ]

    def sandbox_devices(self, uuids: Iterable[str]) -> list[tuple[Path, str]]:
        """(host node, path inside) for an environment holding `uuids`: their own nodes and
        the control nodes; nothing when it holds none."""
        gpus = self.of(uuids)
        if not gpus:
            return []
        nodes = [(gpu.node, gpu.inside_node) for gpu in gpus]
        return nodes + [(path, f"/dev/{name}") for name, path in sorted(self.control.items())]

    # ---- live numbers ----------------------------------------------------------------------

    def devices(self, warm: Collection[str] = ()) -> list[GpuDevice]:
        """The wire view, with utilisation sampled now (None where NVML gives none)."""
        out = []
        for gpu in self.gpus:
            utilization, used = self._sample(gpu)
            out.append(
                GpuDevice(
                    uuid=gpu.uuid,
                    index=gpu.index,
                    model=gpu.model,
                    memory_bytes=gpu.memory_bytes,
                    driver_version=gpu.driver_version,
                    utilization_percent=utilization,
                    memory_used_bytes=used,
                    warm=gpu.uuid in warm,
                )
            )
        return out

    def _sample(self, gpu: Gpu) -> tuple[int | None, int | None]:
        nvml, handle = self._nvml, self._handles.get(gpu.uuid)
        if nvml is None or handle is None:
            return None, None
        utilization = used = None
        try:
            utilization = min(100, max(0, int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)))
        except nvml.NVMLError as exc:
            log.debug("GPU %s: no utilisation from NVML (%s)", gpu.uuid, exc)
        try:
            used = max(0, int(nvml.nvmlDeviceGetMemoryInfo(handle).used))
        except nvml.NVMLError as exc:
            log.debug("GPU %s: no memory use from NVML (%s)", gpu.uuid, exc)
        return utilization, used

    def compute_pids(self, uuid: str) -> list[int]:
        """Host pids of the compute processes NVML sees on the GPU."""
        nvml, handle = self._nvml, self._handles.get(uuid)
        if nvml is None or handle is None:
            return []
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except nvml.NVMLError as exc:
            log.warning("GPU %s: NVML does not list its processes (%s)", uuid, exc)
            return []
        return sorted({int(p.pid) for p in processes if int(p.pid) > 1})

    def wipe(self, uuids: Iterable[str], what: str) -> list[int]:
        """Kill every compute process still on the GPUs `uuids` (their environment `what` is
        gone); return the pids that survive the bound."""
        left: list[int] = []
        for uuid in dict.fromkeys(uuids):
            pids = [p for p in self.compute_pids(uuid) if p != os.getpid()]
            if not pids:
                continue
            log.warning(
                "GPU %s: killing %d process(es) still on it after %s: %s",
                uuid,
                len(pids),
                what,
                pids,
            )
            left += _kill_until_gone(pids, partial(self.compute_pids, uuid))
        return left

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


def _kill_until_gone(pids: list[int], still: Callable[[], list[int]]) -> list[int]:
    """SIGKILL `pids` until `still()` names none of them (bounded); return the survivors."""
    deadline = time.monotonic() + KILL_TIMEOUT_S
    targets = set(pids)
    while True:
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)  # the kernel releases a killed process's files asynchronously
        targets &= set(still())
        if not targets or time.monotonic() >= deadline:
            return sorted(targets)


# ---- discovery ----------------------------------------------------------------------------


def discover(nvml: Nvml, offered: str = "all", nodes: DeviceNodes | None = None) -> GpuInventory:
    """The GPUs NVML finds, restricted to `offered` (`OFFLOAD_RUNNER_GPUS`)."""
    wanted = parse_gpu_choice(offered)
    if wanted == []:
        log.info("GPUs: none offered (OFFLOAD_RUNNER_GPUS=none)")
        return GpuInventory.empty()
    nodes = nodes or HostDeviceNodes()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        if wanted is not None:
            raise EnvironmentError_(
                f"OFFLOAD_RUNNER_GPUS names GPUs ({offered}) but NVML cannot start: {exc}.",
                "Install the NVIDIA driver on this host, or set OFFLOAD_RUNNER_GPUS=all "
                "(offers what is found, nothing without a driver) or none.",
            ) from None
        log.info("GPUs: none (no NVIDIA driver or NVML on this host: %s); this runner offers "
                 "standard sessions only", exc)  # fmt: skip
        return GpuInventory.empty()
    try:
        found, handles = _read_all(nvml, nodes)
        chosen = _restrict(found, wanted, offered)
    except BaseException:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
        raise
    if len(chosen) > MAX_GPUS_PER_RUNNER:
        log.warning("GPUs: %d found, offering the first %d", len(chosen), MAX_GPUS_PER_RUNNER)
        chosen = chosen[:MAX_GPUS_PER_RUNNER]
    control = nodes.control()
    for gpu in chosen:
        log.info("GPU offered: %s, %d MiB, driver %s, node %s",
                 gpu.label(), gpu.memory_bytes // 2**20, gpu.driver_version, gpu.node)  # fmt: skip
    if chosen and "nvidiactl" not in control:
        log.warning("GPUs: no nvidiactl device node found; CUDA in GPU sessions will not work")
    keep = {gpu.uuid: handles[gpu.uuid] for gpu in chosen}
    return GpuInventory(nvml, chosen, control, keep)


def _read_all(nvml: Nvml, nodes: DeviceNodes) -> tuple[list[Gpu], dict[str, Any]]:
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    found: list[Gpu] = []
    handles: dict[str, Any] = {}
    for index in range(int(nvml.nvmlDeviceGetCount())):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            minor = int(nvml.nvmlDeviceGetMinorNumber(handle))
            gpu = Gpu(
                uuid=uuid,
                index=index,
                model=_text(nvml.nvmlDeviceGetName(handle))[:128],
                memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                driver_version=driver[:64],
                minor=minor,
                node=nodes.gpu(minor),
                pci_bus=_pci_bus(nvml, handle),
            )
        except nvml.NVMLError as exc:
            log.warning("GPU %d: NVML cannot describe it (%s); not offered", index, exc)
            continue
        if not _is_char_device(gpu.node):
            log.warning("GPU %s: its device node %s is missing; not offered", gpu.label(), gpu.node)
            continue
        found.append(gpu)
        handles[uuid] = handle
    return found, handles


def _restrict(found: list[Gpu], wanted: list[str] | None, offered: str) -> list[Gpu]:
    if wanted is None:
        return found
    chosen: list[Gpu] = []
    for name in wanted:
        match = [g for g in found if name == str(g.index) or name.lower() == g.uuid.lower()]
        if not match:
            listed = "; ".join(g.label() for g in found) or "none"
            raise EnvironmentError_(
                f"OFFLOAD_RUNNER_GPUS={offered} names {name!r}, which matches no GPU on this "
                f"host. GPUs found: {listed}.",
                "Name GPUs by NVML index or UUID (`nvidia-smi -L` lists them), or set "
                "OFFLOAD_RUNNER_GPUS=all.",
            )
        if match[0] not in chosen:
            chosen.append(match[0])
    return sorted(chosen, key=lambda g: g.index)


def _pci_bus(nvml: Nvml, handle: Any) -> str | None:
    """The GPU's PCI address as /proc/driver/nvidia/gpus names it (None when NVML has none)."""
    get = getattr(nvml, "nvmlDeviceGetPciInfo", None)
    if get is None:
        return None
    try:
        bus = _text(get(handle).busId).lower()
        domain, rest = bus.split(":", 1)
        return f"{int(domain, 16):04x}:{rest}"
    except (nvml.NVMLError, AttributeError, ValueError):
        return None


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _is_char_device(path: Path) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


# ---- the container path: the NVIDIA Container Toolkit's prestart hook ----------------------

HOOK = "nvidia-container-runtime-hook"
TOOLKIT_CONFIG = Path("/etc/nvidia-container-runtime/config.toml")


@dataclass(frozen=True)
class Toolkit:
    """How `docker run --gpus` works inside a GPU environment.

    The sandboxed engine is dockerd 20.10: no CDI. Its `--gpus` is the NVIDIA Container
    Toolkit's prestart hook, which dockerd registers as the "nvidia" device driver only when
    `nvidia-container-runtime-hook` is on its PATH at start. The toolkit's hook, installed under
    /usr, is in the sandbox already (it shares the host's /usr); an operator's `hooks` directory
    is bound in and put first on dockerd's PATH. The hook runs inside the sandbox and mounts the
    GPUs the sandbox has (and only those: no other node is there) into the container.
    """

    available: bool
    hooks: Path | None = None  # bound into GPU sandboxes
    config: str | None = None  # /etc/nvidia-container-runtime/config.toml inside

    def describe(self) -> str:
        if not self.available:
            return "no NVIDIA Container Toolkit: `--gpus` is refused by the engines"
        return f"{HOOK} from {self.hooks or 'the host /usr'}"


def find_toolkit(hook_dir: Path | None, host_config: Path = TOOLKIT_CONFIG) -> Toolkit:
    """The toolkit this runner's GPU sandboxes use (`OFFLOAD_RUNNER_GPU_HOOK_DIR` first)."""
    if hook_dir is not None:
        hook = hook_dir / HOOK
        if not (hook.is_file() and os.access(hook, os.X_OK)):
            raise EnvironmentError_(
                f"OFFLOAD_RUNNER_GPU_HOOK_DIR={hook_dir} has no executable {HOOK}.",
                "Point it at the directory of the NVIDIA Container Toolkit's hook, or unset it "
                "to use the toolkit installed under /usr (`apt-get install "
                "nvidia-container-toolkit`).",
            )
        return Toolkit(True, hook_dir, toolkit_config(_read_or_none(host_config)))
    found = shutil.which(HOOK)
    if found is None or not Path(found).resolve().is_relative_to("/usr"):
        return Toolkit(False)  # not in the sandbox's view (only /usr is shared)
    return Toolkit(True, None, toolkit_config(_read_or_none(host_config)))


def toolkit_config(host: str | None) -> str:
    """The host's config.toml with `no-cgroups = true` under [nvidia-container-cli]: the
    sandboxed engine is rootless and cannot manage device cgroups (as for rootless Docker)."""
    lines = (host or "").splitlines()
    out: list[str] = []
    section = ""
    done = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("["):
            if section == "nvidia-container-cli" and not done:
                out.append("no-cgroups = true")
                done = True
            section = stripped.strip("[]").strip()
        elif section == "nvidia-container-cli" and re.match(r"#?\s*no-cgroups\s*=", stripped):
            if not done:
                out.append("no-cgroups = true")
                done = True
            continue
        out.append(line)
    if not done:
        if section != "nvidia-container-cli":
            out += ["", "[nvidia-container-cli]"]
        out.append("no-cgroups = true")
    return "\n".join(out).lstrip("\n") + "\n"


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# ---- the runner's choice ------------------------------------------------------------------


def load_gpus(settings: RunnerSettings) -> GpuInventory:
    """The runner's GPUs (`OFFLOAD_RUNNER_GPUS`, `OFFLOAD_RUNNER_GPU_STANDIN`)."""
    return load(settings.gpus, settings.gpu_standin)


def load(offered: str, standin: Path | None) -> GpuInventory:
    """The runner's GPUs: NVML's, or the stand-in's when `standin` is set (tests, CI)."""
    if parse_gpu_choice(offered) == []:
        return GpuInventory.empty()
    if standin is not None:
        from offload.runner.gpu_standin import StandinNvml

        log.warning(
            "GPU STAND-IN in use: GPUs are read from %s, not from the NVIDIA driver "
            "(OFFLOAD_RUNNER_GPU_STANDIN is a test stand-in for hosts without a GPU)", standin
        )  # fmt: skip
        fake = StandinNvml(standin)
        return discover(fake, offered, fake.device_nodes())
    try:
        import pynvml
    except ImportError:
        log.info("GPUs: none (nvidia-ml-py is not installed)")
        return GpuInventory.empty()
    return discover(pynvml, offered)

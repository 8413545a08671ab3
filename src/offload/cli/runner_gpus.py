"""`offload runner gpus`: the GPUs this host's runner would offer, found as the runner finds them.

Discovery is the runner's own (`offload.runner.gpus.load_gpus` and `find_toolkit`, from the same
OFFLOAD_RUNNER_* settings); this module only keeps what discovery says in its log (why nothing
is offered: NVML's error; a GPU left out) and shapes the answer. `gpu_devices` is what the
runner's registration sends (no GPU is warm at start).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from offload.core.config import RunnerSettings, parse_gpu_choice
from offload.core.schemas import GpuDevice
from offload.runner import gpus as runner_gpus


class ToolkitView(BaseModel):
    available: bool
    hook_dir: str | None  # None: the toolkit's hook under /usr (or none at all)
    description: str


class GpuSurvey(BaseModel):
    """What `offload runner gpus --json` prints."""

    gpu_devices: list[GpuDevice]  # exactly as the registration sends them
    device_nodes: dict[str, str]  # uuid -> host device node
    toolkit: ToolkitView
    # What discovery logged that matters here: warnings, and when nothing is offered, why.
    notes: list[str]
    standin: str | None  # OFFLOAD_RUNNER_GPU_STANDIN: the GPUs are a test stand-in's


def survey(settings: RunnerSettings) -> GpuSurvey:
    """Discover the GPUs as the runner does at start (blocking: NVML calls)."""
    with _discovery_log() as records:
        inventory = runner_gpus.load_gpus(settings)
    try:
        devices = inventory.devices()
        nodes = {gpu.uuid: str(gpu.node) for gpu in inventory.gpus}
    finally:
        inventory.close()
    toolkit = runner_gpus.find_toolkit(settings.gpu_hook_dir)
    floor = logging.INFO if not devices else logging.WARNING
    notes = [r.getMessage() for r in records if r.levelno >= floor]
    if not devices and parse_gpu_choice(settings.gpus) == []:
        notes.append("OFFLOAD_RUNNER_GPUS=none: no GPU is offered")
    return GpuSurvey(
        gpu_devices=devices,
        device_nodes=nodes,
        toolkit=ToolkitView(
            available=toolkit.available,
            hook_dir=str(toolkit.hooks) if toolkit.hooks else None,
            description=toolkit.describe(),
        ),
        notes=notes,
        standin=str(settings.gpu_standin) if settings.gpu_standin else None,
    )


@contextlib.contextmanager
def _discovery_log() -> Iterator[list[logging.LogRecord]]:
    """Collect what `offload.runner.gpus` logs (INFO and up) instead of printing it."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger(runner_gpus.__name__)
    handler = Keep(logging.INFO)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def show(found: GpuSurvey, console: Console) -> None:
    """The human view: a table of the GPUs offered, or why there is none; the toolkit line."""
    if found.gpu_devices:
        table = Table(box=None, pad_edge=False)
        widest = max(len(gpu.uuid) for gpu in found.gpu_devices)
        table.add_column("Index")
        table.add_column("UUID", no_wrap=True, min_width=widest)  # whole, to copy
        for column in ("Model", "Memory", "Driver", "Utilisation"):
            table.add_column(column)
        table.add_column("Node", overflow="fold")
        for gpu in found.gpu_devices:
            used = gpu.memory_used_bytes
            table.add_row(
                str(gpu.index),
                gpu.uuid,
                gpu.model,
                f"{gpu.memory_bytes / 1024**3:.0f} GiB"
                + (f" ({used / 1024**3:.1f} GiB used)" if used is not None else ""),
                gpu.driver_version,
                "n/a" if gpu.utilization_percent is None else f"{gpu.utilization_percent}%",
                found.device_nodes.get(gpu.uuid, ""),
            )
        console.print(table)
        console.print(f"{len(found.gpu_devices)} GPU(s) offered.")
    else:
        console.print("No GPU to offer on this host: the runner offers standard sessions only.")
    for note in found.notes:
        console.print(f"  {note}", highlight=False)
    console.print(f"Toolkit: {found.toolkit.description}", highlight=False)

"""The small interface every environment driver implements.

An environment is one isolated Docker Engine for one session.  The first driver
(`offload.runner.environment.DockerdDriver`) runs a dedicated `dockerd` in its own network
namespace, data-root, exec-root and cgroup; a VM or cluster driver can join later behind the
same five verbs.  Optional abilities are declared in `DriverCapabilities`, not discovered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from offload.core.schemas import InstanceSpec


class EnvState(StrEnum):
    WARM = "warm"  # created, no session yet
    BOUND = "bound"  # serving a session
    PAUSED = "paused"  # session idle: containers frozen
    DESTROYING = "destroying"


@dataclass
class Environment:
    id: str
    engine_socket: Path  # unix socket of this environment's Docker Engine API
    mount_area: Path  # the only place bind sources may come from; file sync writes here
    netns: str  # network namespace name (`ip netns`), for port forwards
    spec: InstanceSpec
    state: EnvState = EnvState.WARM
    session_id: str | None = None
    # The host uid/gid that is root inside the environment's sandbox: what the runner makes
    # the owner of files it writes into the mount area, so that containers can change them.
    area_owner: tuple[int, int] | None = None
    isolation: str = "rootless"  # said by status and diagnose
    gpu_uuids: tuple[str, ...] = ()  # the runner's GPUs its engine sees (and no others)


@dataclass
class EnvironmentDescription:
    id: str
    state: EnvState
    session_id: str | None
    containers_running: int
    containers_total: int
    pids: list[int] = field(default_factory=list)  # processes that belong to the environment


@dataclass(frozen=True)
class DriverCapabilities:
    gpus: int = 0  # GPUs this driver can hand to environments (`create(..., gpu_uuids)`)
    pause: bool = True


class EnvironmentDriver(Protocol):
    capabilities: DriverCapabilities

    async def create(self, spec: InstanceSpec, gpu_uuids: Sequence[str] = ()) -> Environment:
        """A new environment; with `gpu_uuids`, its engine sees those GPUs and no others."""
        ...

    async def pause(self, env: Environment) -> None: ...

    async def resume(self, env: Environment) -> None: ...

    async def destroy(self, env: Environment) -> None:
        """Leave nothing behind: no process, no namespace, no data-root, no cgroup."""
        ...

    async def describe(self, env: Environment) -> EnvironmentDescription: ...

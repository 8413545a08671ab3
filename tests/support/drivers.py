"""An in-memory environment driver for pool logic tests (no dockerd): it records what it is
asked and checks the one invariant of GPUs, that no two live environments share one."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path

from offload.core.schemas import InstanceSpec
from offload.runner.driver import (
    DriverCapabilities,
    Environment,
    EnvironmentDescription,
)
from offload.runner.engine_events import EngineEvents

_ids = itertools.count()


class FakeDriver:
    capabilities = DriverCapabilities(gpus=0, pause=True)

    def __init__(self) -> None:
        self.live: dict[str, Environment] = {}
        self.created: list[Environment] = []
        self.destroyed: list[str] = []
        # While cleared, creates wait on it: lets a test hold creations half-way.
        self.go = asyncio.Event()
        self.go.set()
        # While cleared, destroys wait on it (`destroying` is set when one has begun).
        self.destroy_go = asyncio.Event()
        self.destroy_go.set()
        self.destroying = asyncio.Event()

    async def create(self, spec: InstanceSpec, gpu_uuids: Sequence[str] = ()) -> Environment:
        await self.go.wait()
        await asyncio.sleep(0)  # let whatever runs beside this creation interleave
        for env in self.live.values():
            shared = set(env.gpu_uuids) & set(gpu_uuids)
            assert not shared, f"GPU {shared} given to {env.id} and to a new environment"
        n = next(_ids)
        env = Environment(
            id=f"env-fake{n}",
            engine_socket=Path(f"/nonexistent/fake{n}.sock"),
            mount_area=Path(f"/nonexistent/area{n}"),
            netns=f"off-fake{n}",
            spec=spec,
            gpu_uuids=tuple(gpu_uuids),
        )
        self.live[env.id] = env
        self.created.append(env)
        return env

    async def pause(self, env: Environment) -> None:
        pass

    async def resume(self, env: Environment) -> None:
        pass

    async def destroy(self, env: Environment) -> None:
        self.destroying.set()
        await self.destroy_go.wait()
        if self.live.pop(env.id, None) is not None:
            self.destroyed.append(env.id)

    async def describe(self, env: Environment) -> EnvironmentDescription:
        return EnvironmentDescription(env.id, env.state, env.session_id, 0, 0)


class QuietEvents(EngineEvents):
    """An event stream that never connects (the fake engines have no socket)."""

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def quiet_events(env: Environment) -> EngineEvents:
    return QuietEvents(env.id, env.engine_socket)

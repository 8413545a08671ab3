"""Real dockerd environments for runner tests, on short paths that cannot clash with others.

Each settings object gets its own run dir (`/run/ot-XXXX`), data dir and cgroup parent
(`offload-test-XXXX`).  At teardown every settings object is swept with `cleanup_orphans`, and a
test that leaked an environment fails there, after the leak has been wiped.

The policy plugin runs in the test's event loop: tests must never block that loop (docker CLI
calls go through `docker()` below, sync helpers through `asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from offload.core.config import RunnerSettings
from offload.core.schemas import InstanceSpec
from offload.runner import cgroups, identities, mounts, netns
from offload.runner.driver import Environment
from offload.runner.environment import EnvPaths, cleanup_orphans, engine_pid, identity_range
from tests.support.identities import runner_overrides

# Small enough for a 2-core test host, large enough for dockerd + containerd + a few containers.
SMALL = InstanceSpec(cpus=1.0, memory_bytes=1024**3, pids=1024)

MakeSettings = Callable[..., RunnerSettings]


@dataclass
class Result:
    rc: int
    out: str
    err: str


async def docker(env: Environment, *args: str, check: bool = True) -> Result:
    """The real docker CLI against `env`'s engine, without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        "docker",
        "-H",
        f"unix://{env.engine_socket}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    result = Result(proc.returncode or 0, out.decode().strip(), err.decode().strip())
    if check and result.rc != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.rc}: {result.err}")
    return result


def dockerd_pid(settings: RunnerSettings, env: Environment) -> int:
    pid = engine_pid(EnvPaths.of(settings, env.id))
    assert pid is not None, "the environment's dockerd is not running"
    return pid


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def leftovers(
    settings: RunnerSettings,
    env_id: str,
    pids: list[int] = (),
    owner: int | None = None,  # type: ignore[assignment]
) -> list[str]:
    """Everything of environment `env_id` still on the host; [] when it is fully wiped.

    `owner`: the environment's identity uid, whose processes must all be gone too."""
    paths = EnvPaths.of(settings, env_id)
    found = [f"pid {p}" for p in pids if _alive(p)]
    found += [str(d) for d in (paths.home, paths.run) if d.exists()]
    if netns.netns_path(paths.netns).exists():
        found.append(f"netns {paths.netns}")
    found += [
        str(h / settings.cgroup_parent / env_id)
        for h in cgroups.mounted_hierarchies()
        if (h / settings.cgroup_parent / env_id).exists()
    ]
    found += [f"mount {m}" for m in mounts.mounts_under([paths.home, paths.run])]
    if owner is not None:
        every = identity_range(settings)
        identity = every.identity(owner - settings.identity_uid_base)
        found += [f"pid {p} of {identity.name}" for p in identities.processes_of([identity])]
    return found


def _sweep(settings: RunnerSettings) -> list[str]:
    leaked = asyncio.run(cleanup_orphans(settings, netns_min_age_s=3600))
    cgroups.remove_parent(settings.cgroup_parent)
    shutil.rmtree(settings.run_dir, ignore_errors=True)
    identities.remove_accounts(identity_range(settings))
    return leaked


@pytest.fixture(scope="module")
def make_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeSettings]:
    made: list[RunnerSettings] = []

    def make(**overrides: object) -> RunnerSettings:
        suffix = uuid.uuid4().hex[:6]
        values: dict[str, object] = {
            "data_dir": tmp_path_factory.mktemp("runner"),
            "run_dir": Path(f"/run/ot-{suffix}"),
            "cgroup_parent": f"offload-test-{suffix}",
            "dockerd_start_timeout_s": 30.0,
            **runner_overrides(),
        }
        values.update(overrides)
        settings = RunnerSettings(**values)  # type: ignore[arg-type]
        made.append(settings)
        return settings

    yield make
    leaked = [env_id for settings in made for env_id in _sweep(settings)]
    assert not leaked, f"tests leaked environments (now wiped): {leaked}"


@pytest.fixture(scope="module")
def runner_settings(make_settings: MakeSettings) -> RunnerSettings:
    return make_settings()

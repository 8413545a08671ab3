"""Real session environments for tests that need a session's engine: `RootlessDriver`'s own.

Each settings object gets what the runner tests' settings get (tests/integration/runner/
conftest.py): a run dir `/run/ot-XXXX`, its data dir, a cgroup parent `offload-test-XXXX` and an
identity range of its own (`identity_overrides`).  `wipe()` leaves nothing of it on the host.

The driver's policy plugin is served by the event loop the environment was created on: that
loop must keep running, and must not be blocked, while the engine is in use.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

from offload.core.config import RunnerSettings
from offload.core.schemas import InstanceSpec
from offload.runner import identities
from offload.runner.environment import cleanup_orphans, identity_range
from tests.support.identities import runner_overrides

# A session's engine on a 2-core test host: room for a few containers and a build.
SESSION_SPEC = InstanceSpec(cpus=2.0, memory_bytes=2 * 1024**3, pids=2048)


def sandbox_settings(data_dir: Path, **overrides: object) -> RunnerSettings:
    """Runner settings apart from every other test runner's (paths, cgroups, identities)."""
    suffix = uuid.uuid4().hex[:6]
    values: dict[str, object] = {
        "data_dir": data_dir,
        "run_dir": Path(f"/run/ot-{suffix}"),
        "cgroup_parent": f"offload-test-{suffix}",
        "dockerd_start_timeout_s": 30.0,
        **runner_overrides(),
    }
    values.update(overrides)
    return RunnerSettings(**values)  # type: ignore[arg-type]


async def wipe(settings: RunnerSettings) -> list[str]:
    """Everything of `settings`' runner off the host: environments, their processes, netns and
    cgroups (`cleanup_orphans`), the run dir, the identity accounts.  Returns the environment
    ids that were still there (after a clean destroy: none)."""
    leftover = await cleanup_orphans(settings, netns_min_age_s=3600)
    await asyncio.to_thread(shutil.rmtree, settings.run_dir, True)
    await asyncio.to_thread(identities.remove_accounts, identity_range(settings))
    return leftover

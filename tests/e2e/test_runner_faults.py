"""A runner host that dies (SIGKILL of the runner and everything it started, nothing cleaned
up): its session ends `failed` after the lost-runner time, billed exactly to its last
heartbeat; the user's next docker command says what happened; the restarted runner leaves
nothing of the old environment behind, and the user works again on a new session."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

from offload.core import schemas as s
from offload.core.config import RunnerSettings
from offload.core.waiting import wait_until
from offload.runner import identities
from offload.runner.environment import EnvPaths, identity_range
from offload.server.bootstrap import runner_fleet
from tests.e2e.clocked import _RANGES, ClockedDeployment, Laptop, environment_of
from tests.integration.runner.conftest import leftovers

# The clocked deployment's runner is online while its heartbeats (stamped at the control
# plane's clock, which only the test moves) are within 30 s, lost after 120 s.
CLOCKED_SETTINGS = {"runner_timeout_s": 30.0, "runner_lost_after_s": 120.0}


def _runner_settings(clocked: ClockedDeployment) -> RunnerSettings:
    ranges = {
        k.removeprefix("OFFLOAD_RUNNER_").lower(): v for k, v in _RANGES[clocked.run_dir].items()
    }
    return RunnerSettings(
        data_dir=clocked.runner_data_dir,
        run_dir=clocked.run_dir,
        cgroup_parent=clocked.cgroup_parent,
        **ranges,
    )


def _agent_saw(laptop: Laptop, state: str) -> bool:
    seen = laptop.agent_state
    return seen is not None and seen.session_state == state


def _heartbeat_at_clock(clocked: ClockedDeployment) -> bool:
    fleet = runner_fleet(clocked.settings, clocked.clock)
    return any(view.last_heartbeat_at == clocked.clock() for view in fleet.runners)


def test_a_killed_runner_host_fails_its_session_billed_to_its_last_heartbeat(
    clocked: ClockedDeployment, make_laptop, hello_context: Path
) -> None:
    laptop = make_laptop()
    laptop.docker("offload", "start", "--timeout", "60s")
    laptop.docker("build", "-q", "-t", "hello", str(hello_context))
    laptop.docker("run", "-d", "--name", "keep", "hello", "sleep", "600")
    env = environment_of(laptop, clocked)
    runner_settings = _runner_settings(clocked)
    owner = EnvPaths.of(runner_settings, env.env_id).mount_area.stat().st_uid
    slot = owner - runner_settings.identity_uid_base
    old_pids = identities.processes_of([identity_range(runner_settings).identity(slot)])
    assert old_pids, "the environment's engine runs under its identity"
    session = laptop.session()
    assert session.started_at is not None

    clocked.clock.advance(60)  # a minute of work, then the runner's last heartbeat
    wait_until(lambda: _heartbeat_at_clock(clocked), 30, "a heartbeat at the moved clock")
    last_heartbeat = clocked.clock()
    clocked.kill_runner()
    clocked.clock.advance(121)

    def failed() -> s.SessionInfo | None:
        info = laptop.session_by_id(session.id)
        return info if info.state is s.SessionState.FAILED else None

    ended = wait_until(failed, 30, "the session to fail")
    assert ended.ended_at == last_heartbeat
    assert ended.end_reason == (
        f"runner clocked-runner lost: no heartbeat since "
        f"{last_heartbeat.isoformat(timespec='seconds')}"
    )
    assert ended.billed_s == (last_heartbeat - session.started_at).total_seconds()
    assert ended.billed_s >= timedelta(seconds=60).total_seconds()

    # The next docker command, once the agent has heard of the end (it polls): the old
    # session's end and why no new one can start yet.
    wait_until(lambda: _agent_saw(laptop, "failed"), 30, "the agent to hear the session failed")
    refused = laptop.docker("ps", check=False)
    assert refused.returncode != 0
    assert f"Your session {session.id} ended (runner clocked-runner lost" in refused.stderr
    assert "No runner is online" in refused.stderr

    # The host comes back: the restarted runner wipes what the killed one left.
    clocked.start_runner()
    wait_until(
        lambda: leftovers(runner_settings, env.env_id, old_pids) == [],
        90,
        "the restarted runner to wipe the old environment",
    )
    laptop.docker("build", "-q", "-t", "hello", str(hello_context))  # a new, empty engine
    again = laptop.docker("run", "--rm", "hello", "echo", "back")
    assert again.stdout.strip() == "back"
    assert laptop.session().id != session.id


def test_a_start_whose_engine_never_answers_leaves_the_docker_context_as_it_was(
    clocked: ClockedDeployment, make_laptop
) -> None:
    """`start` makes `offload` the docker context while it waits for the engine; when the
    engine never answers (the runner host hangs: SIGSTOP, so its SSH endpoint accepts TCP and
    says nothing), the user's own context is current again and `offload` is gone."""
    laptop = make_laptop()
    laptop.docker("context", "create", "mine", "--docker", "host=unix:///run/mine.sock")
    laptop.docker("context", "use", "mine")
    assert clocked.runner is not None
    os.kill(clocked.runner.pid, signal.SIGSTOP)
    try:
        failed = laptop.docker("offload", "start", "--timeout", "3s", check=False)
    finally:
        os.kill(clocked.runner.pid, signal.SIGCONT)
    assert failed.returncode != 0
    assert "The session engine did not answer within 3s" in failed.stderr
    assert laptop.docker("context", "show").stdout.strip() == "mine"
    assert laptop.docker("context", "inspect", "offload", check=False).returncode != 0
    laptop.docker("offload", "stop", "--force")

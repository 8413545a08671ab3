"""The control plane killed (SIGKILL) mid-session and started again: the session lives on, its
containers keep running, and the ledger neither loses nor double-counts time."""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import httpx

from offload.agent.state import read_model, write_model
from offload.cli import processes
from offload.cli.embedded import EmbeddedState
from offload.core.waiting import wait_until
from tests.e2e.conftest import Deployment, started


def _billed(user, session_id: str) -> float:  # type: ignore[no-untyped-def]
    usage = json.loads(user.offload("usage", "--json").stdout)
    for session in usage["recent_sessions"]:
        if session["id"] == session_id:
            return float(session["billed_s"])
    raise AssertionError(f"{session_id} not in usage: {usage}")


def test_killed_control_plane_loses_and_double_counts_nothing(
    deployment: Deployment, make_user, hello_context: Path
) -> None:
    user = started(make_user(), hello_context)
    user.docker("run", "-d", "--name", "keeps-running", "hello", "sleep", "3600")
    status = json.loads(user.offload("status", "-f", "json").stdout)
    session_id = status["session_id"]
    began = datetime.fromisoformat(status["session_start"])
    before = _billed(user, session_id)

    state_file = deployment.data_dir / "embedded.json"
    state = read_model(state_file, EmbeddedState)
    assert state is not None
    os.kill(state.server_pid, signal.SIGKILL)
    wait_until(lambda: not processes.is_alive(state.server_pid), 10, "the server to die")
    # Started again exactly as `offload up` starts it.
    pid = processes.spawn_detached(
        ["-m", "offload.cli.main", "server"],
        deployment.data_dir / "logs" / "server.log",
        env={
            "OFFLOAD_DATA_DIR": str(deployment.server_settings.data_dir),
            "OFFLOAD_PORT": str(deployment.server_settings.port),
        },
    )
    write_model(state_file, state.model_copy(update={"server_pid": pid}))

    def healthy() -> bool:
        try:
            return httpx.get(f"{deployment.server_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 60, "the control plane to come back", interval=0.2)
    after_restart = json.loads(user.offload("status", "-f", "json").stdout)
    assert after_restart["session_id"] == session_id
    assert after_restart["state"] == "Started (Active)"
    assert "keeps-running" in user.docker("ps", "--format", "{{.Names}}").stdout

    billed = _billed(user, session_id)
    elapsed = (datetime.now(UTC) - began).total_seconds()
    assert before <= billed  # nothing lost
    assert billed <= elapsed + 1  # nothing counted twice: never more than the wall clock
    user.docker("rm", "-f", "keeps-running")

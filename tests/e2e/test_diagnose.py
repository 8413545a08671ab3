"""`offload diagnose` finds the real problems a user meets."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

from offload.agent.state import ClientConfig, read_model, write_model
from offload.core.schemas import Role
from offload.core.waiting import wait_until
from tests.e2e.conftest import User, started


def _diagnose(user: User) -> tuple[int, dict[str, dict[str, str]]]:
    result = user.offload("diagnose", "--json", check=False)
    report = json.loads(result.stdout)
    return result.returncode, {check["name"]: check for check in report["checks"]}


def _isolation(user: User) -> str | None:
    return json.loads(user.offload("status", "-f", "json").stdout)["isolation"]


def test_healthy_session_passes_every_check(make_user, hello_context: Path) -> None:
    user = started(make_user(), hello_context)
    # The agent asks the engine how it is isolated once connected: wait for its answer.
    isolation = wait_until(lambda: _isolation(user), 30, "the agent to learn the isolation", 0.5)
    assert isolation.startswith("sandboxed: rootless engine")
    assert "Isolation" in user.offload("status").stdout
    code, checks = _diagnose(user)
    assert checks["session isolation"]["status"] == "pass", checks
    assert checks["session isolation"]["detail"] == isolation
    assert code == 0, checks
    for name in ("control plane reachable", "credentials", "agent", "clock skew"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["runner reachable (SSH, pinned key)"]["status"] == "pass"
    assert checks["billing (default)"]["status"] == "pass"


def test_stopped_agent_is_reported_with_the_fix(make_user, hello_context: Path) -> None:
    user = started(make_user(), hello_context)
    pid = json.loads(user.offload("status", "-f", "json").stdout)["agent"]["pid"]
    os.kill(pid, signal.SIGKILL)
    code, checks = _diagnose(user)
    assert code == 1
    assert checks["agent"]["status"] == "fail"
    assert "docker offload start" in checks["agent"]["fix"]


def test_wrong_token_and_unreachable_server(make_user) -> None:
    user = make_user()
    config_file = user.offload_home / "config.json"
    config = read_model(config_file, ClientConfig)
    assert config is not None
    write_model(config_file, config.model_copy(update={"token": "off_u_not-a-real-token"}))
    code, checks = _diagnose(user)
    assert code == 1
    assert checks["credentials"]["status"] == "fail"
    assert "offload login" in checks["credentials"]["fix"]

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    write_model(config_file, config.model_copy(update={"server_url": f"http://127.0.0.1:{port}"}))
    code, checks = _diagnose(user)
    assert code == 1
    assert checks["control plane reachable"]["status"] == "fail"
    assert "offload up" in checks["control plane reachable"]["fix"]


def test_exhausted_allowance_is_reported_with_the_owner_fix(make_user) -> None:
    owner = make_user(org=f"diag-{os.getpid()}", role=Role.OWNER)
    org = f"diag-{os.getpid()}"
    owner.offload("org", "billing", org, "--committed-minutes", "0", "--no-on-demand")
    code, checks = _diagnose(owner)
    assert code == 1
    billing = checks[f"billing ({org})"]
    assert billing["status"] == "fail"
    assert org in billing["fix"] and "--account" in billing["fix"]

"""`python -m offload.agent.daemon` as the CLI launches it: exit codes, signals, files left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncssh
import pytest

from offload.agent.state import AgentState, ClientConfig, SessionFile, read_model, write_model
from offload.core.client_paths import ClientPaths
from offload.core.schemas import InstanceType, RunnerEndpoint, SessionInfo, SessionState
from offload.core.waiting import wait_until

from .support import CertificateAuthority

pytestmark = pytest.mark.slow


def launch(home: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "offload.agent.daemon"],
        env={**os.environ, "OFFLOAD_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_without_session_file_exits_non_zero_with_a_clear_line(tmp_path: Path) -> None:
    write_model(ClientPaths(tmp_path).config_file, ClientConfig(server_url="http://x", token="t"))
    proc = launch(tmp_path)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "agent cannot run: No session file" in stderr
    assert "docker offload start" in stderr


def test_sigterm_stops_cleanly_and_marks_the_state(tmp_path: Path) -> None:
    """Nothing answers (no runner, no control plane): the agent still serves and stops cleanly."""
    paths = ClientPaths(tmp_path)
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = paths.home / "key"
    key.write_private_key(key_path)
    token = "off_u_secret-token-value"
    certificate = CertificateAuthority().sign(key, ["ses-process"])
    session = SessionInfo(
        id="ses-process",
        state=SessionState.ACTIVE,
        user="dev",
        org="default",
        instance_type=InstanceType.STANDARD,
        gpu=False,
        idle_timeout_s=300,
        created_at=datetime.now(UTC),
        runner=RunnerEndpoint(
            id="r1",
            name="r1",
            ssh_host="127.0.0.1",
            ssh_port=9,  # discard port: nothing listens
            host_key=asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode(),
        ),
        certificate=certificate,
    )
    write_model(paths.config_file, ClientConfig(server_url="http://127.0.0.1:9", token=token))
    write_model(paths.session_file, SessionFile(session=session, private_key_path=str(key_path)))
    proc = launch(paths.home)
    try:
        wait_until(lambda: paths.agent_socket.exists(), 30, "the agent socket")
        state = read_model(paths.agent_state_file, AgentState)
        assert state is not None and state.pid == proc.pid and state.session_id == "ses-process"
        assert paths.agent_socket.stat().st_mode & 0o777 == 0o600
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert not paths.agent_socket.exists()
    state = read_model(paths.agent_state_file, AgentState)
    assert state is not None and not state.connected and state.last_error == "the agent stopped"
    assert "agent stopped" in stderr
    assert token not in stderr and certificate.split()[1][:40] not in stderr

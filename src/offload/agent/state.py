"""Files the CLI and the agent share on the laptop (all under `ClientPaths.home`, mode 0600).

- config.json   `ClientConfig`  server URL, API token, default organisation (written by login/up)
- session.json  `SessionFile`   the live session the CLI started, for the agent to connect to
- run/agent.json `AgentState`   what the agent is doing, for `offload status`
- run/notice-shown              the session whose replaced-session notice `offload status` showed
"""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from offload.core.client_paths import ClientPaths
from offload.core.schemas import Prompt, SessionInfo
from offload.sync.status import SyncedPathStatus

M = TypeVar("M", bound=BaseModel)


def client_name() -> str:
    """How the control plane names this laptop (OFFLOAD_CLIENT_NAME overrides the hostname)."""
    return os.environ.get("OFFLOAD_CLIENT_NAME") or socket.gethostname()


# What the agent's port forwarder (agent/ports.py) reports for `offload status`: here, with the
# files' other models, so that the CLI reads them without loading the forwarder.


class ForwardInfo(BaseModel):
    proto: str  # "tcp" | "udp"
    host_ip: str  # where the laptop listens
    port: int
    container_id: str
    container_name: str
    private_port: int
    open_connections: int = 0


class PortConflict(BaseModel):
    proto: str
    host_ip: str
    port: int
    container_id: str
    container_name: str
    reason: str


class PortsSnapshot(BaseModel):
    """What `offload status` shows about published ports."""

    forwards: list[ForwardInfo] = []
    conflicts: list[PortConflict] = []
    open_connections: int = 0
    following: bool = False  # the engine's events are being followed right now
    last_error: str | None = None


class ClientConfig(BaseModel):
    server_url: str
    token: str
    default_org: str | None = None


class SessionFile(BaseModel):
    session: SessionInfo  # includes runner address, pinned host key and certificate
    private_key_path: str
    account: str | None = None
    previous_docker_context: str | None = None
    # What `start` asked for, so that the agent asks the same when it replaces an ended session.
    client_name: str | None = None
    idle_timeout_s: int | None = None


class AgentState(BaseModel):
    pid: int
    session_id: str
    socket: str
    connected: bool
    started_at: datetime
    connected_since: datetime | None = None
    last_error: str | None = None
    open_connections: int = 0
    # The session as the control plane last described it (answers to reports and polls).
    session_state: str | None = None
    suspended: bool = False  # tunnel closed while the session is idle
    as_of: datetime | None = None  # when that answer came (laptop clock)
    time_until_idle_s: float | None = None
    fair_use_remaining_s: float | None = None
    prompt: Prompt | None = None
    warnings: list[str] = []
    # Set when the agent replaced an ended session; `offload status` shows it once.
    replaced_session_notice: str | None = None
    moved_to: str | None = None  # the machine that took the session over
    # True once every Docker request seen has been reported and nothing is in flight.
    activity_quiet: bool = True
    # Published ports forwarded to this laptop, and those it could not bind (None: not yet).
    ports: PortsSnapshot | None = None
    # Laptop directories bind-mounted into containers, synced into the session's mount area.
    synced_paths: list[SyncedPathStatus] = []
    # How the session's engine is isolated on its runner (its `offload.isolation` label, e.g.
    # "rootless"); None until the engine said, or when it names none.
    isolation: str | None = None


def notice_marker(paths: ClientPaths) -> Path:
    """Holds the id of the session whose replaced-session notice was already shown."""
    return paths.agent_state_file.parent / "notice-shown"


def write_model(path: Path, model: BaseModel) -> None:
    """Atomic write, owner-only: a reader never sees half a file and nobody else reads tokens."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(model.model_dump_json(indent=2))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_model(path: Path, model: type[M]) -> M | None:
    """The model stored at `path`, or None if there is no such file."""
    try:
        return model.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None

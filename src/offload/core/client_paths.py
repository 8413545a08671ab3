"""Where the CLI and agent keep their files on the laptop (`OFFLOAD_HOME`, else `~/.offload`).

Apart from `offload.core.config` so that `docker offload start` does not load pydantic-settings
and the control plane's and runner's settings classes on its way to the first request.
"""

from __future__ import annotations

import os
from pathlib import Path


class ClientPaths:
    """Files of the CLI and agent. `OFFLOAD_HOME` overrides `~/.offload` (tests use it)."""

    def __init__(self, home: Path | None = None) -> None:
        env_home = os.environ.get("OFFLOAD_HOME")
        self.home = home or (Path(env_home) if env_home else Path.home() / ".offload")

    @property
    def config_file(self) -> Path:
        return self.home / "config.json"

    @property
    def session_file(self) -> Path:
        return self.home / "session.json"

    @property
    def key_file(self) -> Path:
        return self.home / "keys" / "session_ed25519"

    @property
    def agent_socket(self) -> Path:
        return self.home / "run" / "docker.sock"

    @property
    def agent_state_file(self) -> Path:
        return self.home / "run" / "agent.json"

    @property
    def agent_log(self) -> Path:
        return self.home / "logs" / "agent.log"

    @property
    def embedded_dir(self) -> Path:
        return self.home / "embedded"

"""The laptop's docker CLI: the `offload` context and the `docker-offload` CLI plugin.

Everything goes through the real `docker` binary (`docker context …`) so that the CLI's own
config format and `DOCKER_CONFIG` handling stay Docker's business, not ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONTEXT_NAME = "offload"


class DockerCLIMissing(RuntimeError):
    pass


def docker_binary() -> str | None:
    return shutil.which("docker")


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    binary = docker_binary()
    if binary is None:
        raise DockerCLIMissing("docker CLI not found on PATH")
    env = dict(os.environ)
    # The context commands must see the real context, not an override from the caller.
    env.pop("DOCKER_CONTEXT", None)
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, env=env, timeout=30, check=False
    )


def current_context() -> str | None:
    """The current docker context's name, or None when there is no docker CLI."""
    try:
        result = _docker("context", "show")
    except DockerCLIMissing:
        return None
    name = result.stdout.strip()
    return name or "default"


def context_exists(name: str) -> bool:
    return _docker("context", "inspect", name).returncode == 0


def use_offload_context(socket_path: Path, session_id: str) -> None:
    """Create or update the `offload` context for this session's socket and make it current."""
    endpoint = f"host=unix://{socket_path}"
    description = f"Offload session {session_id}"
    verb = "update" if context_exists(CONTEXT_NAME) else "create"
    result = _docker(
        "context", verb, CONTEXT_NAME, "--description", description, "--docker", endpoint
    )
    if result.returncode != 0:
        raise RuntimeError(f"docker context {verb} failed: {result.stderr.strip()}")
    result = _docker("context", "use", CONTEXT_NAME)
    if result.returncode != 0:
        raise RuntimeError(f"docker context use failed: {result.stderr.strip()}")


def restore_context(previous: str | None) -> str:
    """Make `previous` current again (default when unknown or gone) and drop `offload`."""
    target = previous if previous and previous != CONTEXT_NAME else "default"
    if target != "default" and not context_exists(target):
        target = "default"
    _docker("context", "use", target)
    if context_exists(CONTEXT_NAME):
        _docker("context", "rm", "--force", CONTEXT_NAME)
    return target


def docker_config_dir() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path.home() / ".docker"


def plugin_path() -> Path:
    return docker_config_dir() / "cli-plugins" / "docker-offload"


def plugin_executable() -> Path:
    """The `docker-offload` console script installed beside this interpreter."""
    beside = Path(sys.executable).parent / "docker-offload"
    if beside.exists():
        return beside
    found = shutil.which("docker-offload")
    if found is None:
        raise FileNotFoundError("the docker-offload console script is not installed")
    return Path(found)


def ensure_plugin_installed() -> Path | None:
    """Install `docker offload` as a Docker CLI plugin unless a working one is already there.

    Returns the path when it installed (or repaired) the plugin, None when nothing changed.
    """
    target = plugin_path()
    executable = plugin_executable()
    if target.is_symlink() and target.resolve() == executable.resolve():
        return None
    if target.exists() and not target.is_symlink():
        return None  # the user's own plugin file: leave it alone
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.symlink_to(executable)
    return target

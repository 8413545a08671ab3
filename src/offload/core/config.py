"""Settings: one pydantic-settings object per process, environment variables prefixed `OFFLOAD_`.

- `ServerSettings`  (`OFFLOAD_…`)          the control plane
- `RunnerSettings`  (`OFFLOAD_RUNNER_…`)   a runner host

`ClientPaths` (`OFFLOAD_HOME`, where the CLI and agent keep their files) is in
`offload.core.client_paths`: the laptop's commands load it without pydantic-settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from offload.core.defaults import DEFAULT_SERVER_PORT, DEFAULT_SSH_PORT

NetworkHelper = Literal["pasta", "slirp4netns"]


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OFFLOAD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_SERVER_PORT, ge=1, le=65535)
    data_dir: Path = Path("/var/lib/offload/server")
    # Default: SQLite in data_dir. PostgreSQL: postgresql+psycopg://user@host/db
    database_url: str | None = None
    # Validity of a session's client certificate; the agent renews it before it ends.
    cert_validity_s: int = Field(default=3600, ge=60, le=24 * 3600)
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=300)
    # A runner silent for this long is considered gone: no new sessions are placed on it.
    runner_timeout_s: float = Field(default=30.0, gt=0)
    # A runner silent this long is lost: its live sessions end `failed`, billed to its last
    # heartbeat (at least `runner_timeout_s`).
    runner_lost_after_s: float = Field(default=120.0, gt=0)
    min_client_version: str = "0.1.0"
    default_idle_timeout_s: int = Field(default=300, ge=10, le=3600)
    # How often the lifecycle clock runs (idle, grace, prompts, limits); 0 turns it off (tests
    # call `lifecycle.tick` themselves).
    tick_interval_s: float = Field(default=1.0, ge=0)
    # A prompt (keep / idle now) left unanswered this long makes the session idle.
    prompt_answer_timeout_s: int = Field(default=120, ge=10, le=3600)
    # Abuse limits (server/services/throttle.py), counted in the database across replicas:
    # failed sign-ins per account (then locked for `login_lockout_s`) and per client address
    # (then refused as long) within `login_window_s`; device-login requests per address a minute.
    login_failures_per_account: int = Field(default=5, ge=1, le=1000)
    login_failures_per_address: int = Field(default=30, ge=1, le=100_000)
    login_window_s: int = Field(default=900, ge=10, le=86_400)
    login_lockout_s: int = Field(default=900, ge=10, le=86_400)
    device_requests_per_address_per_minute: int = Field(default=120, ge=1, le=100_000)
    # Behind a load balancer or TLS proxy: the proxies' addresses (comma-separated, or "*")
    # whose X-Forwarded-For and X-Forwarded-Proto are believed; empty believes none.
    forwarded_allow_ips: str = ""
    # uvicorn's access log: a line per request (method, path, status), some 200 a second with
    # 1,000 agents (docs/operations.md); false keeps warnings, errors and the control plane's
    # own log.
    access_log: bool = True

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'offload.db'}"


class RunnerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OFFLOAD_RUNNER_", extra="ignore")

    server_url: str = f"http://127.0.0.1:{DEFAULT_SERVER_PORT}"
    token: str = ""
    name: str = Field(default_factory=lambda: os.uname().nodename)
    # Address clients use to reach the SSH endpoint, and the address it listens on.
    ssh_host: str = "127.0.0.1"
    ssh_listen_host: str = "127.0.0.1"
    ssh_port: int = Field(default=DEFAULT_SSH_PORT, ge=1, le=65535)
    data_dir: Path = Path("/var/lib/offload/runner")
    # Short paths: unix socket paths are limited to 108 bytes.
    run_dir: Path = Path("/run/offload")
    pool_size: int = Field(default=1, ge=0, le=64)
    capacity: int = Field(default=8, ge=1, le=1024)
    # Organisations' persistent builders this runner keeps (each holds an identity slot and
    # its build cache on disk); the cache is garbage-collected to `builder_keep_storage` unless
    # the organisation's owners set their own limit.
    builder_slots: int = Field(default=4, ge=0, le=256)
    builder_keep_storage: str = "20GB"
    # Per builder, the runner keeps the `docker save` archives of the images it moved into
    # sessions lately (`runner/export_cache.py`), so the next move of one skips the save; 0 off.
    builder_export_cache_mb: int = Field(default=4096, ge=0)
    # A builder no build has used for this long is stopped (its cache stays on disk; the next
    # build starts it again in about a second); 0 keeps builders running.
    builder_idle_stop_s: float = Field(default=1800.0, ge=0)
    cgroup_parent: str = "offload"
    # Where the cgroup filesystem is, and which version to use there ("auto": what is mounted;
    # a hybrid host with v1 controllers counts as v1).
    cgroup_root: Path = Path("/sys/fs/cgroup")
    cgroup_mode: Literal["auto", "v1", "v2"] = "auto"
    dockerd: str = "dockerd"
    rootlesskit: str = "rootlesskit"
    # The sandboxes' user-mode network helper: pasta (Debian `passt`; about twice slirp4netns's
    # download speed, bench/pasta_probe.py) or slirp4netns (Docker's rootless default).
    network: NetworkHelper = "pasta"
    dockerd_start_timeout_s: float = Field(default=30.0, gt=0)
    # Each environment runs as an unprivileged identity of its own: uid (= gid) base + slot,
    # subordinate ids subid_base + slot * 65536 (see offload.runner.identities).
    identity_uid_base: int = Field(default=1_900_000, ge=1000, lt=2**31)
    subid_base: int = Field(default=2_000_000, ge=1000, lt=2**31)
    # The sandboxed engines' daemon.json (JSON object), e.g. registry mirrors.
    dockerd_config: str = "{}"
    # Private ranges the sandboxes may reach (comma-separated CIDRs, e.g. a LAN registry);
    # the runner's own addresses, loopback and link-local stay out of reach whatever this says.
    egress_allow: str = ""

    # PEM file of certificate authorities the engines (and the pull cache) trust for registries
    # on top of the system's: a company registry's CA. Never a user's credential.
    registry_ca: Path | None = None
    # A pull-through cache of Docker Hub (or `pull_cache_upstream`) per runner host: engines use
    # it as their registry mirror, so an image one session pulled is served from this host to
    # the next. It authenticates upstream only as the operator's account (never with a user's
    # credentials), so it holds only what that account may read: public images.
    pull_cache: bool = True
    pull_cache_upstream: str = "https://registry-1.docker.io"
    pull_cache_username: str = ""
    pull_cache_password_file: Path | None = None
    # Where sandboxes reach it: a local, non-loopback address ("": the host's primary address)
    # and port (0: a free one, chosen at start).
    pull_cache_address: str = ""
    pull_cache_port: int = Field(default=0, ge=0, le=65535)
    docker_registry: str = "docker-registry"

    @field_validator("pull_cache_upstream")
    @classmethod
    def _upstream_is_a_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(
                "OFFLOAD_RUNNER_PULL_CACHE_UPSTREAM must be a registry URL such as "
                "https://registry-1.docker.io"
            )
        return value.rstrip("/")

    @field_validator("dockerd_config")
    @classmethod
    def _config_is_an_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"OFFLOAD_RUNNER_DOCKERD_CONFIG is not JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise ValueError("OFFLOAD_RUNNER_DOCKERD_CONFIG must be a JSON object, e.g. {}")
        return value

    # The control plane caps this at half its runner timeout (15 s by default).
    heartbeat_wait_s: float = Field(default=15.0, ge=0, le=60)

    # GPUs (offload.runner.gpus): which of the host's NVIDIA GPUs this runner offers: `all`
    # (what NVML finds; none without a driver), `none`, or a comma-separated list of NVML
    # indexes or UUIDs (a name that matches no GPU stops the runner at start).
    gpus: str = "all"
    # GPU environments kept warm, each holding one GPU of its own (bounded by the GPUs free and
    # by `capacity`); 0: a GPU session's environment is created when it is placed.
    warm_gpu: int = Field(default=0, ge=0, le=64)
    # A directory holding `nvidia-container-runtime-hook` (the NVIDIA Container Toolkit's, or
    # another that does its job), bound into GPU sandboxes and first on their engine's PATH;
    # unset: the toolkit's hook under /usr, if installed.
    gpu_hook_dir: Path | None = None
    # TEST STAND-IN for hosts without a GPU: a JSON file of fake GPUs and device nodes read in
    # place of NVML (offload.runner.gpu_standin). Never set it in production.
    gpu_standin: Path | None = None

    @field_validator("gpus")
    @classmethod
    def _gpus_is_a_choice(cls, value: str) -> str:
        parse_gpu_choice(value)  # ValueError names the accepted forms
        return value.strip()


def parse_gpu_choice(offered: str) -> list[str] | None:
    """`OFFLOAD_RUNNER_GPUS`: None for all, [] for none, else the names (indexes or UUIDs)."""
    text = offered.strip()
    if text.lower() == "all":
        return None
    if text.lower() == "none":
        return []
    names = [part.strip() for part in text.split(",")]
    if not text or not all(names):
        raise ValueError(
            f"OFFLOAD_RUNNER_GPUS={offered!r}: use all, none, or a comma-separated list of "
            "GPU indexes or UUIDs (e.g. 0,1 or GPU-5d1c…)"
        )
    return names

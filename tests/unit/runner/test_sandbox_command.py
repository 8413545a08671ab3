"""The sandbox's command line names the chosen network helper, and only its options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from offload.core.config import RunnerSettings
from offload.runner.identities import Identity
from offload.runner.sandbox import SandboxSpec, pasta_wrapper

P = Path("/x")
SPEC = SandboxSpec(
    env_id="env-0123456789", identity=Identity(0, 1_900_000, 2_000_000), root=P, data_root=P,
    mount_area=P, staged_area=P, sockets=P, plugins=P, config_file=P, ca_bundle=None,
    state_dir=P, cgroup_procs=[], inner_cgroups="", evacuate_cgroup2=False, policy_name="p",
    area_socket=None,
)  # fmt: skip


def test_pasta_is_the_default_and_stands_in_for_slirp4netns() -> None:
    assert RunnerSettings().network == "pasta"
    command = SPEC.command()
    assert "--net=slirp4netns" in command
    assert f"--slirp4netns-binary={pasta_wrapper()}" in command
    slirp_only = ("--slirp4netns-sandbox", "--slirp4netns-seccomp")
    assert not [arg for arg in command if arg.startswith(slirp_only)]


def test_slirp4netns_runs_sandboxed_with_seccomp() -> None:
    command = dataclasses.replace(SPEC, network="slirp4netns").command()
    assert "--net=slirp4netns" in command
    assert "--slirp4netns-sandbox=auto" in command and "--slirp4netns-seccomp=auto" in command
    assert not [arg for arg in command if arg.startswith("--slirp4netns-binary")]


def test_the_wrapper_is_shipped_executable() -> None:
    assert pasta_wrapper().is_file()
    assert pasta_wrapper().stat().st_mode & 0o111 == 0o111

"""The command line that starts one sandboxed engine: rootlesskit, then our init, then dockerd.

    sh JOIN_CGROUPS  (root: joins the environment's cgroups, then drops to the identity)
      setpriv --reuid=ID --regid=ID --clear-groups
        rootlesskit --net=slirp4netns [--slirp4netns-binary=pasta_as_slirp4netns.sh]
                    --disable-host-loopback --pidns --cgroupns --utsns --ipcns
          sh sandbox_init.sh  (root of the new user namespace: private root, pivot_root)
            dockerd ...

rootlesskit (Docker's own rootless mode is built on it) makes the user namespace with the
identity's subordinate ids through `newuidmap`/`newgidmap`, and the network namespace with a
user-mode network helper: pasta by default (`pasta_as_slirp4netns.sh`: rootlesskit 1.1 has no
pasta driver, so pasta stands in for slirp4netns), or slirp4netns in sandbox and seccomp mode
(`OFFLOAD_RUNNER_NETWORK=slirp4netns`). Either way the engine and its containers reach the
outside world through an unprivileged process of the runner, which the runner's egress rules
(`offload.runner.egress`) confine; pasta downloads at about twice slirp4netns's speed.  No
port is published on the runner host (`--port-driver=none`): the runner reaches published ports
inside the namespace itself.

What rootlesskit does not do is written in `sandbox_init.sh`: a private root filesystem in place
of `--copy-up`, which leaves the whole host visible (merely unreadable where permissions say so).
A GPU environment's sandbox also gets its GPUs' device nodes in its /dev and the NVIDIA hook
that `docker run --gpus` needs (`SandboxGpus`, see `offload.runner.gpus.Toolkit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from offload.core.config import NetworkHelper
from offload.core.defaults import SANDBOX_MTU
from offload.runner.identities import Identity

# Joins the cgroups named by its arguments, then execs the rest: a wrapper rather than a
# preexec_fn, which is unsafe in a process with threads (asyncio.to_thread's pool).
JOIN_CGROUPS_AND_EXEC = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 97; shift; n=$((n-1)); done; '
    'exec "$@"'
)
# Inside the sandbox (short: unix socket paths are limited to 108 bytes).
INNER_SOCKET = "/run/offload/docker.sock"
INNER_EXEC_ROOT = "/run/docker"
INNER_DATA_ROOT = "/var/lib/docker"
INNER_CONFIG = "/etc/docker/daemon.json"
# The sandbox's PATH, also where the runner's host checks look for the network helper.
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HELPER_MTU = SANDBOX_MTU  # tap0 in the sandbox; the engine's bridges get the same


def init_script() -> Path:
    return _packaged("sandbox_init.sh")


def pasta_wrapper() -> Path:
    return _packaged("pasta_as_slirp4netns.sh")


def _packaged(name: str) -> Path:
    return Path(str(resources.files("offload.runner").joinpath(name)))


@dataclass(frozen=True)
class SandboxGpus:
    """What a GPU environment's sandbox gets (host paths as the sandbox's start reaches them)."""

    devices: Path  # directory of device nodes, each bound at /dev/<name>
    uuids: tuple[tuple[str, str], ...]  # (uuid, node inside), in the order NVML numbers them
    hooks: Path | None = None  # directory with nvidia-container-runtime-hook, first on PATH
    nvidia_config: Path | None = None  # /etc/nvidia-container-runtime/config.toml inside


@dataclass(frozen=True)
class SandboxSpec:
    """Everything one environment's start needs; host paths unless said otherwise."""

    env_id: str
    identity: Identity
    root: Path  # empty directory: becomes / inside
    data_root: Path
    mount_area: Path  # the path it has inside: the same as the runner's
    staged_area: Path  # where the sandbox's start reaches it
    sockets: Path  # holds docker.sock
    plugins: Path  # holds this environment's policy socket
    config_file: Path
    ca_bundle: Path | None  # replaces /etc/ssl/certs/ca-certificates.crt inside (registry CAs)
    state_dir: Path  # rootlesskit's
    cgroup_procs: list[Path]  # joined before the identity is taken
    inner_cgroups: str  # OFFLOAD_SB_CGROUPS for sandbox_init.sh
    evacuate_cgroup2: bool  # cgroup v2: move the sandbox's processes out of the limited cgroup
    policy_name: str
    area_socket: str | None  # a second engine listener in the mount area, if the path fits
    rootlesskit: str = "rootlesskit"
    dockerd: str = "dockerd"
    network: NetworkHelper = "pasta"
    gpu: SandboxGpus | None = None  # a GPU environment's devices and hook
    gpu_pci: tuple[str, ...] = ()  # /proc/driver/nvidia/gpus entries left in view

    @property
    def hostname(self) -> str:
        return "offload-" + self.env_id.removeprefix("env-")[:8]

    def command(self) -> list[str]:
        procs = [str(p) for p in self.cgroup_procs]
        return [
            "sh", "-c", JOIN_CGROUPS_AND_EXEC, "sh", str(len(procs)), *procs,
            "setpriv", f"--reuid={self.identity.uid}", f"--regid={self.identity.gid}",
            "--clear-groups",
            *self._rootlesskit(),
            "sh", str(init_script()),
            *self._dockerd(),
        ]  # fmt: skip

    def _rootlesskit(self) -> list[str]:
        args = [
            self.rootlesskit,
            f"--state-dir={self.state_dir}",
            "--net=slirp4netns", f"--mtu={HELPER_MTU}", "--disable-host-loopback",
            *self._network_helper(),
            "--port-driver=none", "--subid-source=static",
            "--pidns", "--cgroupns", "--utsns", "--ipcns",
        ]  # fmt: skip
        if self.evacuate_cgroup2:
            args.append("--evacuate-cgroup2=init")
        return args

    def _network_helper(self) -> list[str]:
        if self.network == "pasta":
            return [f"--slirp4netns-binary={pasta_wrapper()}"]
        return ["--slirp4netns-sandbox=auto", "--slirp4netns-seccomp=auto"]

    def _dockerd(self) -> list[str]:
        listeners = ["-H", f"unix://{INNER_SOCKET}"]
        if self.area_socket:
            listeners += ["-H", f"unix://{self.area_socket}"]
        return [
            self.dockerd,
            "--config-file", INNER_CONFIG,
            "--data-root", INNER_DATA_ROOT,
            "--exec-root", INNER_EXEC_ROOT,
            "--pidfile", "/run/dockerd.pid",
            *listeners,
            "--group", "root",
            "--authorization-plugin", self.policy_name,
            "--log-level", "warn",
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        """The process environment: nothing of the runner's own (tokens live there)."""
        return {
            "PATH": SANDBOX_PATH,
            "HOME": str(self.state_dir),
            "XDG_RUNTIME_DIR": str(self.state_dir),
            "OFFLOAD_SB_ROOT": str(self.root),
            "OFFLOAD_SB_DATA": str(self.data_root),
            "OFFLOAD_SB_AREA": str(self.mount_area),
            "OFFLOAD_SB_AREA_SOURCE": str(self.staged_area),
            "OFFLOAD_SB_SOCKETS": str(self.sockets),
            "OFFLOAD_SB_PLUGINS": str(self.plugins),
            "OFFLOAD_SB_CONFIG": str(self.config_file),
            "OFFLOAD_SB_CGROUPS": self.inner_cgroups,
            "OFFLOAD_SB_HOSTNAME": self.hostname,
            "OFFLOAD_SB_CA_BUNDLE": str(self.ca_bundle or ""),
            "OFFLOAD_SB_GPU_PCI": " ".join(self.gpu_pci),
            **_gpu_environment(self.gpu),
        }


def _gpu_environment(gpu: SandboxGpus | None) -> dict[str, str]:
    if gpu is None:
        names = ("DEVICES", "GPUS", "GPU_HOOKS", "NVIDIA_CONFIG")
        return {f"OFFLOAD_SB_{name}": "" for name in names}
    return {
        "OFFLOAD_SB_DEVICES": str(gpu.devices),
        "OFFLOAD_SB_GPUS": ",".join(f"{uuid}={node}" for uuid, node in gpu.uuids),
        "OFFLOAD_SB_GPU_HOOKS": str(gpu.hooks or ""),
        "OFFLOAD_SB_NVIDIA_CONFIG": str(gpu.nvidia_config or ""),
    }

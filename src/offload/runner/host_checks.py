"""Can this host run sandboxed environments?  Each problem names its fix.

Checked before the runner starts (and nothing is half-created when one fails): the tools the
sandbox is built from, user namespaces, /dev/net/tun for the network helper (pasta or
slirp4netns), cgroups.  Blocking.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from offload.core.config import RunnerSettings
from offload.core.errors import EnvironmentError_
from offload.runner import cgroups
from offload.runner.sandbox import SANDBOX_PATH, pasta_wrapper

INSTALL_FIX = (
    "Install the runner's tools: "
    "`apt-get install docker.io rootlesskit slirp4netns uidmap iptables iproute2 util-linux`, "
    "and pasta with `scripts/build_pasta.sh`."
)
# Debian 12's pasta never resets a guest's connection whose connect() was refused: a container's
# connect to a closed port or a refused address hangs (scripts/build_pasta.sh builds a good one).
BAD_PASTA_PACKAGES = ("0.0~git20230309.7c7625d-1",)
DISTRO_BIN = Path("/usr/bin")  # where Debian's passt package puts pasta
PASTA_FIX = (
    "Build pasta from Debian 13's source into /usr/local/bin: `scripts/build_pasta.sh` (run by "
    "scripts/bootstrap.sh), or start the runner with OFFLOAD_RUNNER_NETWORK=slirp4netns."
)
TUN = Path("/dev/net/tun")
MAX_USER_NAMESPACES = Path("/proc/sys/user/max_user_namespaces")


def tools(settings: RunnerSettings) -> list[str]:
    return [
        settings.dockerd, settings.rootlesskit, settings.network, "newuidmap", "newgidmap",
        "setpriv", "iptables", "ip6tables", "ip", "mount", "pivot_root", "useradd", "usermod",
    ]  # fmt: skip


def problems(settings: RunnerSettings) -> list[EnvironmentError_]:
    found: list[EnvironmentError_] = []
    for tool in tools(settings):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            found.append(EnvironmentError_(f"`{tool}` was not found on PATH.", INSTALL_FIX))
    for helper in ("newuidmap", "newgidmap"):
        path = shutil.which(helper)
        if path and not _setuid_or_capable(Path(path)):
            found.append(
                EnvironmentError_(
                    f"{path} is neither setuid root nor has file capabilities: rootlesskit "
                    "cannot map the sandbox's ids.",
                    "Reinstall it: `apt-get install --reinstall uidmap`.",
                )
            )
    if settings.network == "pasta":
        found += _pasta_problems()
    if _read_int(MAX_USER_NAMESPACES) == 0:
        found.append(
            EnvironmentError_(
                "User namespaces are disabled (user.max_user_namespaces = 0).",
                "Enable them: `sysctl -w user.max_user_namespaces=63000`.",
            )
        )
    if not TUN.exists():
        found.append(
            EnvironmentError_(
                f"{TUN} does not exist: {settings.network} cannot give sandboxes a network.",
                "Load the tun module (`modprobe tun`).",
            )
        )
    if not cgroups.mounted_hierarchies():
        found.append(
            EnvironmentError_(
                "No cgroup hierarchy is mounted under /sys/fs/cgroup: environments cannot be "
                "limited or frozen.",
                "Mount cgroup2 at /sys/fs/cgroup (or the v1 controllers: `cgroupfs-mount`).",
            )
        )
    return found


def prepare(settings: RunnerSettings) -> list[str]:
    """Notes on what works but not fully; opens /dev/net/tun to the sandboxes (as udev does)."""
    said = [f"cgroups: {cgroups.describe_mode()}"]
    said += [f"cgroup controller {c} is not available: its limit is not enforced"
             for c in cgroups.missing_controllers()]  # fmt: skip
    if TUN.exists() and TUN.stat().st_mode & 0o666 != 0o666:
        # Stock udev rules make it 0666 (a tap device is useless without CAP_NET_ADMIN in a
        # network namespace); some images ship it 0600, which leaves the helper no network.
        TUN.chmod(0o666)
        said.append(f"{TUN} was not usable by unprivileged users: made 0666, as udev does")
    return said


def _pasta_problems() -> list[EnvironmentError_]:
    found = []
    if not os.access(pasta_wrapper(), os.X_OK):
        found.append(
            EnvironmentError_(
                f"{pasta_wrapper()} is not executable: sandboxes would have no network.",
                f"Reinstall Offload, or `chmod 755 {pasta_wrapper()}`.",
            )
        )
    pasta = shutil.which("pasta", path=SANDBOX_PATH)
    package = _debian_package_version("passt") if pasta == str(DISTRO_BIN / "pasta") else None
    if package in BAD_PASTA_PACKAGES:
        found.append(
            EnvironmentError_(
                f"{pasta} is Debian's passt {package}, which leaves a container's refused "
                "connection hanging instead of refusing it.",
                PASTA_FIX,
            )
        )
    return found


def _debian_package_version(package: str) -> str | None:
    try:
        shown = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (shown.stdout.strip() or None) if shown.returncode == 0 else None


def _setuid_or_capable(path: Path) -> bool:
    info = path.stat()
    if info.st_mode & stat.S_ISUID and info.st_uid == 0:
        return True
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None

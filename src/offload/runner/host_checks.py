"""Can this host run sandboxed environments?  Each problem names its fix.

Checked before the runner starts (and nothing is half-created when one fails): the tools the
sandbox is built from, user namespaces, /dev/net/tun for slirp4netns, cgroups.  Blocking.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from offload.core.config import RunnerSettings
from offload.core.errors import EnvironmentError_
from offload.runner import cgroups

INSTALL_FIX = (
    "Install the runner's tools: "
    "`apt-get install docker.io rootlesskit slirp4netns uidmap iptables iproute2 util-linux`."
)
TUN = Path("/dev/net/tun")
MAX_USER_NAMESPACES = Path("/proc/sys/user/max_user_namespaces")


def tools(settings: RunnerSettings) -> list[str]:
    return [
        settings.dockerd, settings.rootlesskit, "slirp4netns", "newuidmap", "newgidmap",
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
                f"{TUN} does not exist: slirp4netns cannot give sandboxes a network.",
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
        # network namespace); some images ship it 0600, which leaves slirp4netns no network.
        TUN.chmod(0o666)
        said.append(f"{TUN} was not usable by unprivileged users: made 0666, as udev does")
    return said


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

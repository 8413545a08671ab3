"""cgroup v1 bookkeeping for one environment: limits, membership, kill and removal.

An environment owns `/<parent>/<env_id>` in every v1 hierarchy.  We write the instance type's
limits into the cpu, memory and pids controllers and use the freezer for a clean kill; dockerd
itself creates per-container children (`/<parent>/<env_id>/<container>`) in *every* mounted
hierarchy, so membership, kill and removal walk all of them.

The calls here are blocking file operations on a pseudo-filesystem: callers run them through
`asyncio.to_thread`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from offload.core.schemas import InstanceSpec

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# The controllers an environment is placed in (and limited by) before its dockerd starts.
CONTROLLERS = ("cpu", "memory", "pids", "freezer")
CFS_PERIOD_US = 100_000


def mounted_hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """Every mounted cgroup hierarchy under `root` (skips symlinks such as `cpu,cpuacct`)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.is_symlink() and (p / "cgroup.procs").exists())


def missing_controllers(root: Path = CGROUP_ROOT) -> list[str]:
    return [c for c in CONTROLLERS if not (root / c / "cgroup.procs").exists()]


def limit_values(spec: InstanceSpec) -> dict[str, dict[str, str]]:
    """Files to write per controller, in order (period before quota)."""
    return {
        "cpu": {
            "cpu.cfs_period_us": str(CFS_PERIOD_US),
            "cpu.cfs_quota_us": str(int(spec.cpus * CFS_PERIOD_US)),
        },
        "memory": {"memory.limit_in_bytes": str(spec.memory_bytes)},
        "pids": {"pids.max": str(spec.pids)},
        "freezer": {},
    }


@dataclass(frozen=True)
class EnvCgroups:
    """The cgroups `/<parent>/<name>` of one environment."""

    parent: str
    name: str
    root: Path = CGROUP_ROOT

    @property
    def relative(self) -> str:
        """The path dockerd's `--cgroup-parent` takes."""
        return f"/{self.parent}/{self.name}"

    def path(self, hierarchy: str | Path) -> Path:
        base = hierarchy if isinstance(hierarchy, Path) else self.root / hierarchy
        return base / self.parent / self.name

    # ---- creation --------------------------------------------------------------------------

    def create(self, spec: InstanceSpec) -> list[Path]:
        """Create the limited cgroups; return the `cgroup.procs` files a process joins."""
        procs: list[Path] = []
        for controller, files in limit_values(spec).items():
            if not (self.root / controller / "cgroup.procs").exists():
                log.warning(
                    "cgroup controller %s is not mounted at %s: environments run without its "
                    "limit. Fix: mount cgroup v1 %s (cgroupfs-mount does it).",
                    controller,
                    self.root / controller,
                    controller,
                )
                continue
            directory = self.path(controller)
            directory.mkdir(parents=True, exist_ok=True)
            for name, value in files.items():
                (directory / name).write_text(value)
            procs.append(directory / "cgroup.procs")
        return procs

    # ---- membership ------------------------------------------------------------------------

    def existing_dirs(self) -> list[Path]:
        """This environment's cgroup directory in each hierarchy where it exists."""
        return [d for d in (self.path(h) for h in mounted_hierarchies(self.root)) if d.is_dir()]

    def pids(self) -> list[int]:
        """Every process in the environment's cgroups, children included (all hierarchies)."""
        found: set[int] = set()
        for top in self.existing_dirs():
            for directory in _walk(top):
                found.update(_read_pids(directory / "cgroup.procs"))
        return sorted(found)

    def child_pids(self) -> list[int]:
        """Processes in child cgroups only: docker puts each container in one."""
        found: set[int] = set()
        for top in self.existing_dirs():
            for directory in _walk(top):
                if directory != top:
                    found.update(_read_pids(directory / "cgroup.procs"))
        return sorted(found)

    # ---- teardown --------------------------------------------------------------------------

    def thaw(self) -> None:
        """Thaw every freezer cgroup of the environment: frozen tasks cannot die of SIGKILL."""
        top = self.path("freezer")
        if not top.is_dir():
            return
        for directory in _walk(top):
            state = directory / "freezer.state"
            try:
                if state.read_text().strip() != "THAWED":
                    state.write_text("THAWED")
            except OSError:
                pass  # raced with removal

    def kill(self, children_only: bool = False, timeout: float = 10.0) -> list[int]:
        """SIGKILL processes until none is left (bounded); return those still alive."""
        deadline = time.monotonic() + timeout
        while True:
            self.thaw()
            pids = self.child_pids() if children_only else self.pids()
            if not pids or time.monotonic() >= deadline:
                return pids
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)  # the kernel reaps asynchronously; re-read membership

    def remove(self) -> list[Path]:
        """rmdir the environment's cgroups, children first; return directories left behind."""
        left: list[Path] = []
        for top in self.existing_dirs():
            for directory in reversed(list(_walk(top))):
                if not _rmdir(directory):
                    left.append(directory)
        return left


def children(parent: str, root: Path = CGROUP_ROOT) -> set[str]:
    """Names of the environments that have a cgroup under `/<parent>` in any hierarchy."""
    names: set[str] = set()
    for hierarchy in mounted_hierarchies(root):
        directory = hierarchy / parent
        if directory.is_dir():
            names.update(p.name for p in directory.iterdir() if p.is_dir())
    return names


def remove_parent(parent: str, root: Path = CGROUP_ROOT) -> None:
    """rmdir `/<parent>` in every hierarchy where it is empty (busy ones stay)."""
    for hierarchy in mounted_hierarchies(root):
        directory = hierarchy / parent
        if directory.is_dir():
            _rmdir(directory, attempts=1)


def _walk(top: Path) -> list[Path]:
    """`top` and its descendants, parents before children."""
    out = [top]
    for dirpath, dirnames, _ in os.walk(top):
        out.extend(Path(dirpath) / d for d in dirnames)
    return out


def _read_pids(procs: Path) -> list[int]:
    try:
        return [int(line) for line in procs.read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []
    except OSError as exc:
        if exc.errno == errno.ENODEV:  # the cgroup was removed between open and read
            return []
        raise


def _rmdir(directory: Path, attempts: int = 50) -> bool:
    # A cgroup whose last task just died can report EBUSY for a moment.
    for _ in range(attempts):
        try:
            directory.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            if attempts > 1:
                time.sleep(0.02)
    return False

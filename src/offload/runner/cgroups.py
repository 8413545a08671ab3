"""cgroup bookkeeping for one environment: limits, delegation, membership, freeze, kill, removal.

An environment owns the cgroup `/<parent>/<env_id>`.  The runner (root) creates it, writes the
instance type's limits into it and joins the sandbox's first process to it; `delegate()` then
hands the directory to the environment's identity, so the engine inside (rootless dockerd and
runc, in a cgroup namespace rooted here) creates and manages its own child cgroups, one per
container.  The limit files of the environment's own cgroup stay root-owned: the tenant limits
its children, never itself, and every controller used is hierarchical, so children are capped.

Two implementations share one interface; `env_cgroups()` picks the host's:

* `EnvCgroups` (alias `EnvCgroupsV1`), cgroup v1: `/sys/fs/cgroup` is a tmpfs holding one
  hierarchy per controller (or controller group) plus named ones (`name=systemd`).  The
  environment gets its directory in *every* mounted v1 hierarchy, because runc places each
  container in all of them; the cpuset directories are initialised from their parent (a new
  v1 cpuset is empty, and nothing can join an empty one).  A host with a cgroup2 mounted beside
  the v1 hierarchies (systemd's "hybrid", e.g. at `unified`) counts as v1: that cgroup2 holds no
  controller a limit needs, and it is neither created nor mounted in the sandbox (runc would
  then want a delegated directory there too).
* `EnvCgroupsV2`, cgroup v2: `/sys/fs/cgroup` is the single unified hierarchy.  The
  controllers are enabled in `cgroup.subtree_control` from the root down to `/<parent>`; the
  environment's own `cgroup.subtree_control` is left empty and delegated: by the
  no-internal-processes rule a cgroup with processes cannot enable controllers for its
  children, so the sandbox first moves its own processes into a child (`rootlesskit
  --evacuate-cgroup2=init`), then enables what it needs.

Delegation, exactly (`delegation_paths()`): v1, in every hierarchy, the directory and its
`cgroup.procs` and `tasks`; v2, the directory and its `cgroup.procs`, `cgroup.threads` and
`cgroup.subtree_control` (Documentation/admin-guide/cgroup-v2.rst, "Model of Delegation").  v1's
`cgroup.clone_children` and `notify_on_release` are not delegated: runc does not write them (it
copies cpuset values into the children it creates, which it owns), and `notify_on_release` would
let the tenant trigger the hierarchy's root-run release agent.

A controller the host does not offer is never skipped silently: `setup()` logs a warning and
reports the limits it could not apply (`CgroupSetup.unapplied`).

The calls here are blocking file operations on a pseudo-filesystem: callers run them through
`asyncio.to_thread`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from offload.core.schemas import InstanceSpec

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CgroupMode = Literal["v1", "v2"]
# v1: the controllers an environment is limited (and frozen) by; `missing_controllers` checks them.
CONTROLLERS = ("cpu", "memory", "pids", "freezer")
# The controllers that carry an instance type's limits, in both modes.
LIMITED = ("cpu", "memory", "pids")
# v2: enabled down to the parent when the host offers them; the tenant may use them below its
# cgroup (docker's --cpus/-m/--pids-limit/--device-read-bps/--cpuset-cpus/--hugetlb).
V2_CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids", "hugetlb")
CFS_PERIOD_US = 100_000
V1_DELEGATED = ("cgroup.procs", "tasks")
V2_DELEGATED = ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control")
FREEZE_TIMEOUT_S = 10.0


# ---- the host ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    point: str
    fstype: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[_Mount]:
    """This mount namespace's mounts, in /proc/self/mountinfo order (later ones on top)."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields, rest = before.split(), after.split()
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        found.append(_Mount(_unescape(fields[4]), rest[0], tuple(rest[2].split(","))))
    return found


def _mount_of(path: Path) -> _Mount | None:
    """The mount `path` lies on: the longest mount point above it, the topmost if stacked."""
    real = os.path.realpath(path)
    best: _Mount | None = None
    for mount in _mounts():
        point = mount.point
        if real == point or real.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best.point):
                best = mount
    return best


def cgroup_mode(root: Path = CGROUP_ROOT) -> CgroupMode:
    """The mode: "v2" when `root` is on a cgroup2 filesystem (the unified hierarchy), else "v1".

    The filesystem type comes from /proc/self/mountinfo (what statfs's CGROUP2_SUPER_MAGIC
    tells); without it, a `cgroup.controllers` file at `root` (present only in cgroup2).  A
    tmpfs of v1 hierarchies with a cgroup2 beside them ("hybrid") is "v1".
    """
    mount = _mount_of(root)
    if mount is not None:
        return "v2" if mount.fstype == "cgroup2" else "v1"
    return "v2" if (root / "cgroup.controllers").is_file() else "v1"


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def describe_mode(root: Path = CGROUP_ROOT) -> str:
    """One line for diagnose, e.g. "cgroup v1 (hybrid: cgroup2 at unified has no controllers)"."""
    if cgroup_mode(root) == "v2":
        offered = _read_words(root / "cgroup.controllers")
        line = f"cgroup v2 (unified at {root}; controllers: {' '.join(offered) or 'none'})"
        missing = [c for c in LIMITED if c not in offered]
        return line + (f"; not offered, so not limited: {', '.join(missing)}" if missing else "")
    hierarchies = v1_hierarchies(root)
    if not hierarchies:
        return f"no cgroup hierarchy mounted at {root}"
    hybrid = [h for h in _listed(root) if (h / "cgroup.controllers").is_file()]
    if hybrid:
        offered = _read_words(hybrid[0] / "cgroup.controllers")
        what = f"offers {' '.join(offered)}, unused" if offered else "has no controllers"
        kind = f"hybrid: cgroup2 at {hybrid[0].name} {what}"
    else:
        kind = "legacy: no cgroup2 beside the v1 hierarchies"
    line = f"cgroup v1 ({kind}; hierarchies: {' '.join(h.path.name for h in hierarchies)})"
    missing = missing_controllers(root)
    return line + (f"; not mounted: {', '.join(missing)}" if missing else "")


def mounted_hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """Every mounted cgroup hierarchy at `root`: v1, its subdirectories with a `cgroup.procs`
    (symlinks such as `cpu` -> `cpu,cpuacct` skipped; a hybrid's cgroup2 included); v2, `root`."""
    if (root / "cgroup.procs").exists() and cgroup_mode(root) == "v2":
        return [root]
    return _listed(root)


def _listed(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.is_symlink() and (p / "cgroup.procs").exists())


def _known_controllers() -> set[str]:
    try:
        lines = Path("/proc/cgroups").read_text().splitlines()
    except OSError:
        return set(V2_CONTROLLERS) | {"cpuacct", "devices", "freezer", "blkio", "net_cls"}
    return {line.split()[0] for line in lines if line and not line.startswith("#")}


@dataclass(frozen=True)
class V1Hierarchy:
    """One mounted cgroup v1 hierarchy: its directory, controllers and name (`name=systemd`)."""

    path: Path
    controllers: frozenset[str]
    name: str | None = None

    @property
    def mount_options(self) -> str:
        """The `-o` that mounts this hierarchy again, e.g. "cpu,cpuacct", "none,name=systemd"."""
        options = sorted(self.controllers) or ["none"]
        return ",".join(options + ([f"name={self.name}"] if self.name else []))


def v1_hierarchies(root: Path = CGROUP_ROOT) -> list[V1Hierarchy]:
    """The cgroup v1 hierarchies mounted at `root` (none on a v2 host; a hybrid's cgroup2 left out)."""
    known = _known_controllers()
    mounts = {m.point: m for m in _mounts() if m.fstype == "cgroup"}
    found = []
    for directory in _listed(root):
        if (directory / "cgroup.controllers").is_file():
            continue  # cgroup2 (a hybrid's, or a v2 root's child cgroups): not a v1 hierarchy
        mount = mounts.get(os.path.realpath(directory))
        words = mount.super_options if mount else tuple(directory.name.split(","))
        controllers = frozenset(w for w in words if w in known)
        names = [w.removeprefix("name=") for w in words if w.startswith("name=")]
        name = names[0] if names else (None if controllers else directory.name)
        found.append(V1Hierarchy(directory, controllers, name))
    return found


def missing_controllers(root: Path = CGROUP_ROOT) -> list[str]:
    """Of `CONTROLLERS`, those this host cannot give an environment (v2: freezer is built in)."""
    if cgroup_mode(root) == "v2":
        offered = _read_words(root / "cgroup.controllers")
        return [c for c in LIMITED if c not in offered]
    present = {c for h in v1_hierarchies(root) for c in h.controllers}
    return [c for c in CONTROLLERS if c not in present]


def limit_values(spec: InstanceSpec) -> dict[str, dict[str, str]]:
    """v1: files to write per controller, in order (period before quota)."""
    return {
        "cpu": {
            "cpu.cfs_period_us": str(CFS_PERIOD_US),
            "cpu.cfs_quota_us": str(int(spec.cpus * CFS_PERIOD_US)),
        },
        "memory": {"memory.limit_in_bytes": str(spec.memory_bytes)},
        "pids": {"pids.max": str(spec.pids)},
        "freezer": {},
    }


def v2_limit_values(spec: InstanceSpec) -> dict[str, dict[str, str]]:
    """v2: files to write per controller on the environment's cgroup."""
    return {
        "cpu": {"cpu.max": f"{int(spec.cpus * CFS_PERIOD_US)} {CFS_PERIOD_US}"},
        "memory": {"memory.max": str(spec.memory_bytes)},
        "pids": {"pids.max": str(spec.pids)},
    }


# ---- what one environment gets ---------------------------------------------------------------


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup filesystem the sandbox mounts under its own /sys/fs/cgroup.

    `mount -t {fstype} -o nosuid,nodev,noexec[,{options}] cgroup /sys/fs/cgroup/{subdir}`.
    v1: one entry per hierarchy (subdir "cpu", fstype "cgroup", options "cpu"; subdir "systemd",
    options "none,name=systemd"), each below a tmpfs the sandbox mounts at /sys/fs/cgroup
    first.  v2: a single entry, subdir "" (/sys/fs/cgroup itself), fstype "cgroup2", options "".
    Inside the environment's cgroup namespace each shows the environment's cgroup as its root.
    """

    subdir: str
    fstype: Literal["cgroup", "cgroup2"]
    options: str = ""


@dataclass(frozen=True)
class CgroupSetup:
    """What `setup()` did."""

    procs: tuple[Path, ...]  # the `cgroup.procs` files the sandbox's first process joins
    applied: tuple[str, ...]  # limit files written, e.g. "memory.limit_in_bytes", "cpu.max"
    unapplied: tuple[str, ...]  # limited controllers the host does not offer: their limit is off
    enabled: tuple[str, ...] = ()  # v2: controllers available in the environment's cgroup


@dataclass(frozen=True)
class EnvCgroups:
    """The cgroups `/<parent>/<name>` of one environment: the cgroup v1 implementation, and the
    type of both (`EnvCgroupsV2` overrides what differs).  Build one with `env_cgroups()`."""

    parent: str
    name: str
    root: Path = CGROUP_ROOT
    mode: ClassVar[CgroupMode] = "v1"

    @property
    def relative(self) -> str:
        """`/<parent>/<name>`: the cgroup path as the host sees it (dockerd's `--cgroup-parent`)."""
        return f"/{self.parent}/{self.name}"

    def path(self, hierarchy: str | Path = "") -> Path:
        base = hierarchy if isinstance(hierarchy, Path) else self.root / hierarchy
        return base / self.parent / self.name

    def _hierarchy_dir(self, controller: str) -> Path | None:
        direct = self.root / controller  # the usual layout (or its symlink): no mountinfo read
        if (direct / "cgroup.procs").exists() and not (direct / "cgroup.controllers").exists():
            return direct
        for hierarchy in v1_hierarchies(self.root):
            if controller in hierarchy.controllers:
                return hierarchy.path
        return None

    # ---- creation --------------------------------------------------------------------------

    def create(self, spec: InstanceSpec) -> list[Path]:
        """Create the limited cgroups; return the `cgroup.procs` files a process joins."""
        return list(self.setup(spec).procs)

    def setup(self, spec: InstanceSpec) -> CgroupSetup:
        """Create the environment's cgroup in every v1 hierarchy and write the limits."""
        hierarchies = v1_hierarchies(self.root)
        applied: list[str] = []
        procs: list[Path] = []
        for hierarchy in hierarchies:
            directory = self.path(hierarchy.path)
            _make_v1_dirs(hierarchy, directory)
            procs.append(directory / "cgroup.procs")
        present = {c for h in hierarchies for c in h.controllers}
        unapplied = tuple(c for c in LIMITED if c not in present)
        if unapplied:
            log.warning(
                "cgroup v1 controllers %s are not mounted under %s: environments run without "
                "their limits. Fix: mount them (cgroupfs-mount does it).",
                ", ".join(unapplied),
                self.root,
                extra={"unapplied": unapplied},
            )
        for controller, files in limit_values(spec).items():
            base = self._hierarchy_dir(controller)
            if base is None:
                continue
            directory = self.path(base)
            if controller == "memory":
                _ensure_memory_hierarchy(directory)
            for name, value in files.items():
                (directory / name).write_text(value)
                applied.append(name)
        return CgroupSetup(tuple(procs), tuple(applied), unapplied)

    # ---- delegation ------------------------------------------------------------------------

    def delegation_paths(self) -> list[Path]:
        """What `delegate()` chowns: in each hierarchy the directory, `cgroup.procs`, `tasks`."""
        found: list[Path] = []
        for hierarchy in v1_hierarchies(self.root):
            directory = self.path(hierarchy.path)
            found += [directory, *(directory / f for f in V1_DELEGATED)]
        return found

    def delegate(self, uid: int, gid: int) -> list[Path]:
        """Hand the environment's cgroups to `uid`/`gid` (after `setup`); return what was chowned."""
        return _chown_all(self.delegation_paths(), uid, gid)

    def inner_mounts(self) -> list[CgroupMount]:
        """What the sandbox mounts at /sys/fs/cgroup (below a tmpfs): every v1 hierarchy."""
        return [
            CgroupMount(h.path.name, "cgroup", h.mount_options) for h in v1_hierarchies(self.root)
        ]

    # ---- membership ------------------------------------------------------------------------

    def existing_dirs(self) -> list[Path]:
        """This environment's cgroup directory in each hierarchy where it exists."""
        return [d for d in (self.path(h) for h in _listed(self.root)) if d.is_dir()]

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

    # ---- freezing --------------------------------------------------------------------------

    def freeze(self, timeout: float = FREEZE_TIMEOUT_S) -> bool:
        """Freeze the whole environment; return whether it reached FROZEN within `timeout`."""
        base = self._hierarchy_dir("freezer")
        if base is None:
            log.warning("cgroup v1 freezer is not mounted: environment %s not frozen", self.name)
            return False
        state = self.path(base) / "freezer.state"
        state.write_text("FROZEN")
        return _until(lambda: state.read_text().strip() == "FROZEN", timeout)

    def thaw(self) -> None:
        """Thaw every freezer cgroup of the environment: frozen tasks cannot die of SIGKILL."""
        base = self._hierarchy_dir("freezer")
        top = self.path(base) if base is not None else None
        if top is None or not top.is_dir():
            return
        for directory in _walk(top):
            state = directory / "freezer.state"
            try:
                if state.read_text().strip() != "THAWED":
                    state.write_text("THAWED")
            except OSError:
                pass  # raced with removal

    # ---- teardown --------------------------------------------------------------------------

    def kill(self, children_only: bool = False, timeout: float = 10.0) -> list[int]:
        """SIGKILL processes until none is left (bounded); return those still alive."""
        return self._kill_loop(children_only, time.monotonic() + timeout)

    def _kill_loop(self, children_only: bool, deadline: float) -> list[int]:
        while True:
            pids = self.child_pids() if children_only else self.pids()
            if not pids or time.monotonic() >= deadline:
                return pids
            self.thaw()
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
            for directory in reversed(_walk(top)):
                if not _rmdir(directory):
                    left.append(directory)
        return left


EnvCgroupsV1 = EnvCgroups


@dataclass(frozen=True)
class EnvCgroupsV2(EnvCgroups):
    """The environment's cgroup `<root>/<parent>/<name>` in the unified (v2) hierarchy.

    `sandbox_child` is the child the sandbox moves its own processes into (rootlesskit's
    `--evacuate-cgroup2=init`): `child_pids()` and `kill(children_only=True)` mean the
    containers' cgroups, so they leave that one alone.
    """

    sandbox_child: str = "init"
    mode: ClassVar[CgroupMode] = "v2"

    @property
    def directory(self) -> Path:
        return self.root / self.parent / self.name

    # ---- creation --------------------------------------------------------------------------

    def setup(self, spec: InstanceSpec) -> CgroupSetup:
        """Enable the controllers from the root to the parent, create the environment's cgroup
        (its own `cgroup.subtree_control` left empty, for the sandbox) and write its limits."""
        offered = _read_words(self.root / "cgroup.controllers")
        wanted = [c for c in V2_CONTROLLERS if c in offered]
        chain = [self.root]
        for part in Path(self.parent).parts:
            chain.append(chain[-1] / part)
        for directory in chain:
            directory.mkdir(exist_ok=True)
            _enable_controllers(directory, wanted)
        self.directory.mkdir(exist_ok=True)
        enabled = tuple(_read_words(self.directory / "cgroup.controllers"))
        unapplied = tuple(c for c in LIMITED if c not in enabled)
        if unapplied:
            log.warning(
                "cgroup v2 controllers %s are not available to %s (the host offers: %s): "
                "environments run without their limits. Fix: free them from cgroup v1 (boot "
                "with systemd.unified_cgroup_hierarchy=1, no cgroup_no_v1 exceptions) or "
                "enable them in the parents' cgroup.subtree_control.",
                ", ".join(unapplied),
                self.directory,
                " ".join(offered) or "none",
                extra={"unapplied": unapplied},
            )
        applied: list[str] = []
        for controller, files in v2_limit_values(spec).items():
            if controller not in enabled:
                continue
            for name, value in files.items():
                (self.directory / name).write_text(value)
                applied.append(name)
        return CgroupSetup(
            (self.directory / "cgroup.procs",), tuple(applied), unapplied, enabled=enabled
        )

    # ---- delegation ------------------------------------------------------------------------

    def delegation_paths(self) -> list[Path]:
        """The directory, `cgroup.procs`, `cgroup.threads`, `cgroup.subtree_control` (those the
        kernel has: `cgroup.threads` came in 4.14)."""
        files = [self.directory / f for f in V2_DELEGATED]
        return [self.directory, *(f for f in files if f.exists())]

    def inner_mounts(self) -> list[CgroupMount]:
        """A single cgroup2 at /sys/fs/cgroup."""
        return [CgroupMount("", "cgroup2", "")]

    # ---- membership ------------------------------------------------------------------------

    def existing_dirs(self) -> list[Path]:
        return [self.directory] if self.directory.is_dir() else []

    def _container_tops(self) -> list[Path]:
        """The environment's child cgroups other than the sandbox's own."""
        if not self.directory.is_dir():
            return []
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        return sorted(p for p in entries if p.is_dir() and p.name != self.sandbox_child)

    def child_pids(self) -> list[int]:
        """Processes in the containers' cgroups (every child but `sandbox_child`)."""
        found: set[int] = set()
        for top in self._container_tops():
            for directory in _walk(top):
                found.update(_read_pids(directory / "cgroup.procs"))
        return sorted(found)

    # ---- freezing --------------------------------------------------------------------------

    def freeze(self, timeout: float = FREEZE_TIMEOUT_S) -> bool:
        """Write `cgroup.freeze`; return whether `cgroup.events` says frozen within `timeout`."""
        (self.directory / "cgroup.freeze").write_text("1")
        return _until(lambda: _events(self.directory).get("frozen") == "1", timeout)

    def thaw(self) -> None:
        """Clear `cgroup.freeze` in the environment's cgroup and every descendant."""
        if not self.directory.is_dir():
            return
        for directory in _walk(self.directory):
            freeze = directory / "cgroup.freeze"
            try:
                if freeze.read_text().strip() != "0":
                    freeze.write_text("0")
            except OSError:
                pass  # raced with removal, or a kernel before 5.2

    # ---- teardown --------------------------------------------------------------------------

    def kill(self, children_only: bool = False, timeout: float = 10.0) -> list[int]:
        """`cgroup.kill` (5.14+: SIGKILL to the whole subtree, forks and frozen tasks included),
        then SIGKILL of what is left in `cgroup.procs` until none is (bounded)."""
        deadline = time.monotonic() + timeout
        targets = self._container_tops() if children_only else self.existing_dirs()
        for top in targets:
            try:
                (top / "cgroup.kill").write_text("1")
            except FileNotFoundError:
                pass  # removed meanwhile, or a kernel without cgroup.kill: the loop does it
        return self._kill_loop(children_only, deadline)


def env_cgroups(
    parent: str, name: str, root: Path = CGROUP_ROOT, mode: CgroupMode | None = None
) -> EnvCgroups:
    """The environment's cgroups for this host's mode (`cgroup_mode(root)` unless given)."""
    chosen = cgroup_mode(root) if mode is None else mode
    if chosen == "v1":
        return EnvCgroups(parent, name, root)
    if chosen == "v2":
        return EnvCgroupsV2(parent, name, root)
    raise ValueError(f"cgroup mode must be 'v1' or 'v2', not {mode!r}")


def inner_mount_spec(cgroups: EnvCgroups) -> str:
    """`inner_mounts()` as sandbox_init.sh's OFFLOAD_SB_CGROUPS: "subdir=options ..." (v1,
    below a tmpfs), "=cgroup2" (v2)."""
    mounts = cgroups.inner_mounts()
    if any(m.fstype == "cgroup2" for m in mounts):
        return "=cgroup2"
    return " ".join(f"{m.subdir}={m.options}" for m in mounts)


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


# ---- helpers -----------------------------------------------------------------------------------


def _make_v1_dirs(hierarchy: V1Hierarchy, directory: Path) -> None:
    """mkdir `directory` and the levels above it; cpuset: copy cpus/mems from the parent into
    every level still empty (an existing one made by hand may be)."""
    level = hierarchy.path
    for part in directory.relative_to(hierarchy.path).parts:
        level = level / part
        level.mkdir(exist_ok=True)
        if "cpuset" in hierarchy.controllers:
            _copy_cpuset(level)


def _copy_cpuset(directory: Path) -> None:
    for name in ("cpuset.cpus", "cpuset.mems"):
        own = directory / name
        if not own.read_text().strip():
            own.write_text((directory.parent / name).read_text().strip())


def _ensure_memory_hierarchy(directory: Path) -> None:
    """Children charge to the environment (always so since Linux 5.x; older ones may say 0)."""
    flag = directory / "memory.use_hierarchy"
    try:
        if flag.read_text().strip() == "0":
            flag.write_text("1")
    except OSError as exc:
        log.warning("memory.use_hierarchy of %s stays 0 (%s): children are not capped", flag, exc)


def _enable_controllers(directory: Path, wanted: list[str]) -> None:
    available = _read_words(directory / "cgroup.controllers")
    enabled = _read_words(directory / "cgroup.subtree_control")
    for controller in wanted:
        if controller in enabled or controller not in available:
            continue
        try:
            (directory / "cgroup.subtree_control").write_text(f"+{controller}")
        except OSError as exc:  # EBUSY: the directory holds processes (no internal processes)
            log.warning("cannot enable cgroup v2 %s in %s: %s", controller, directory, exc)


def _chown_all(paths: list[Path], uid: int, gid: int) -> list[Path]:
    for path in paths:
        os.chown(path, uid, gid)
    return paths


def _events(directory: Path) -> dict[str, str]:
    words = dict(line.split(maxsplit=1) for line in _lines(directory / "cgroup.events"))
    return {k: v.strip() for k, v in words.items()}


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


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

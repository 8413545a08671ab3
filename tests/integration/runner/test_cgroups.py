"""`offload.runner.cgroups` against the host's real cgroups: nothing mocked.

v1 runs on the v1 hierarchies at /sys/fs/cgroup; v2 on a real cgroup2 mount (on a hybrid host
the one at /sys/fs/cgroup/unified, passed as the root).  Each test uses a parent of its own and
leaves nothing behind.  The tenant is a real process under an unused uid ("the identity"),
joined to the environment by root the way the runner does it, then dropped with setpriv; the
sandbox tests add rootlesskit's user + mount + cgroup namespaces with `unshare`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload.core.schemas import InstanceSpec
from offload.core.waiting import wait_until
from offload.runner import cgroups
from offload.runner.cgroups import (
    CgroupMount,
    EnvCgroups,
    EnvCgroupsV2,
    env_cgroups,
    inner_mount_spec,
)

ROOT = Path("/sys/fs/cgroup")
UNIFIED = ROOT / "unified"
SPEC = InstanceSpec(cpus=0.5, memory_bytes=256 * 1024**2, pids=321)
UID = 1_900_000 + os.getpid() % 100_000  # no process of the host runs as this
# The runner's wrapper (environment.py): root writes its pid into each cgroup.procs, then execs.
JOIN = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 97; shift; n=$((n-1)); done; '
    'exec "$@"'
)
TENANT = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"]
SANDBOX = ["unshare", "--user", "--map-root-user", "--mount", "--cgroup"]


def _cgroup_mounts(fstype: str) -> dict[str, str]:
    """mount point -> super options of this namespace's mounts of `fstype`."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        if after.split()[0] == fstype:
            found[before.split()[4]] = after.split()[2]
    return found


V1_DIRS = sorted(
    Path(p) for p in _cgroup_mounts("cgroup") if Path(p).parent == ROOT
)  # what this test expects, read independently of the module
HAS_V1 = (ROOT / "memory" / "cgroup.procs").exists()
HAS_V2 = str(UNIFIED) in _cgroup_mounts("cgroup2")
TOOLS = all(shutil.which(t) for t in ("setpriv", "unshare"))

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not TOOLS, reason="needs root, setpriv and unshare"
)
needs_v1 = pytest.mark.skipif(not HAS_V1, reason="needs cgroup v1 hierarchies at /sys/fs/cgroup")
needs_v2 = pytest.mark.skipif(not HAS_V2, reason="needs a cgroup2 mount at /sys/fs/cgroup/unified")


def run(procs: list[Path], *command: str) -> subprocess.CompletedProcess[str]:
    """`command`, joined by root to `procs` first (as the runner starts a sandbox)."""
    argv = ["sh", "-c", JOIN, "sh", str(len(procs)), *map(str, procs), *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def start(procs: list[Path]) -> subprocess.Popen[bytes]:
    """A long-lived process in `procs`' cgroups (run as the identity, as the sandbox's processes are)."""
    argv = ["sh", "-c", JOIN, "sh", str(len(procs)), *map(str, procs), "sleep", "1000"]
    proc = subprocess.Popen(argv)
    wait_until(lambda: _cgroup_of(proc.pid, procs), 10, "the process to join its cgroups")
    return proc


def _cgroup_of(pid: int, procs: list[Path]) -> bool:
    return all(str(pid) in p.read_text().split() for p in procs)


def owner(path: Path) -> int:
    return path.stat().st_uid


def cgroup_lines(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controllers: path} (v2's line under "")."""
    lines = (line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2)
    return {parts[1]: parts[2] for parts in lines}


def _cleanup(env: EnvCgroups) -> None:
    assert env.kill(timeout=10) == []
    assert env.remove() == []
    cgroups.remove_parent(env.parent, env.root)


@pytest.fixture
def v1_env() -> Iterator[EnvCgroups]:
    env = EnvCgroups(f"offload-cgt-{uuid.uuid4().hex[:8]}", "env-1")
    yield env
    _cleanup(env)
    assert not [d for d in V1_DIRS if (d / env.parent).exists()]


@pytest.fixture
def v2_env() -> Iterator[EnvCgroupsV2]:
    before = (UNIFIED / "cgroup.subtree_control").read_text().split()
    env = env_cgroups(f"offload-cgt-{uuid.uuid4().hex[:8]}", "env-1", root=UNIFIED)
    assert isinstance(env, EnvCgroupsV2)
    yield env
    _cleanup(env)
    assert not (UNIFIED / env.parent).exists()
    for controller in set((UNIFIED / "cgroup.subtree_control").read_text().split()) - set(before):
        (UNIFIED / "cgroup.subtree_control").write_text(f"-{controller}")


# ---- the host ----------------------------------------------------------------------------------


@needs_v1
def test_this_host_is_v1_and_its_cgroup2_is_v2() -> None:
    assert cgroups.cgroup_mode() == "v1"
    line = cgroups.describe_mode()
    assert line.startswith("cgroup v1 (")
    if HAS_V2:
        assert "hybrid: cgroup2 at unified" in line
        assert cgroups.cgroup_mode(UNIFIED) == "v2"
        assert cgroups.describe_mode(UNIFIED).startswith("cgroup v2 (unified at ")
    assert type(env_cgroups("p", "e")) is EnvCgroups
    assert type(env_cgroups("p", "e", mode="v2")) is EnvCgroupsV2
    with pytest.raises(ValueError):
        env_cgroups("p", "e", mode="v3")  # type: ignore[arg-type]


@needs_v1
def test_v1_inner_mounts_name_every_hierarchy() -> None:
    mounts = EnvCgroups("p", "e").inner_mounts()
    assert [m.subdir for m in mounts] == [d.name for d in V1_DIRS]
    assert all(m.fstype == "cgroup" for m in mounts)
    if (ROOT / "systemd").is_dir():
        assert CgroupMount("systemd", "cgroup", "none,name=systemd") in mounts
    assert CgroupMount("memory", "cgroup", "memory") in mounts
    assert "memory=memory" in inner_mount_spec(EnvCgroups("p", "e")).split()


# ---- v1 ----------------------------------------------------------------------------------------


@needs_v1
def test_v1_setup_creates_every_hierarchy_with_limits_and_cpuset(v1_env: EnvCgroups) -> None:
    setup = v1_env.setup(SPEC)
    assert sorted(setup.procs) == [d / v1_env.parent / "env-1" / "cgroup.procs" for d in V1_DIRS]
    assert setup.unapplied == ()
    assert set(setup.applied) == {
        "cpu.cfs_period_us",
        "cpu.cfs_quota_us",
        "memory.limit_in_bytes",
        "pids.max",
    }
    top = {d.name: v1_env.path(d) for d in V1_DIRS}
    assert (top["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (top["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (top["memory"] / "memory.limit_in_bytes").read_text().strip() == str(256 * 1024**2)
    assert (top["pids"] / "pids.max").read_text().strip() == "321"
    for level in (ROOT / "cpuset" / v1_env.parent, top["cpuset"]):
        for name in ("cpuset.cpus", "cpuset.mems"):
            assert (level / name).read_text() == (ROOT / "cpuset" / name).read_text()
    assert v1_env.create(SPEC) == list(setup.procs)  # again (a restarted engine): the same


@needs_v1
def test_v1_delegation_is_the_directory_procs_and_tasks(v1_env: EnvCgroups) -> None:
    v1_env.setup(SPEC)
    chowned = v1_env.delegate(UID, UID)
    assert chowned == v1_env.delegation_paths()
    for hierarchy in V1_DIRS:
        directory = v1_env.path(hierarchy)
        assert owner(directory) == UID
        assert owner(directory.parent) == 0
        for entry in directory.iterdir():
            expected = UID if entry.name in ("cgroup.procs", "tasks") else 0
            assert owner(entry) == expected, entry
    assert len(chowned) == 3 * len(V1_DIRS)


@needs_v1
def test_v1_tenant_makes_and_joins_children_but_cannot_raise_its_limit(
    v1_env: EnvCgroups,
) -> None:
    procs = v1_env.create(SPEC)
    v1_env.delegate(UID, UID)
    tops = [str(v1_env.path(d)) for d in V1_DIRS]
    script = (
        "set -e; for d in " + " ".join(tops) + "; do mkdir $d/c; "
        "if [ -e $d/cpuset.cpus ]; then cat $d/cpuset.cpus > $d/c/cpuset.cpus; "
        "cat $d/cpuset.mems > $d/c/cpuset.mems; fi; echo $$ > $d/c/cgroup.procs; done; "
        f"echo 67108864 > {v1_env.path('memory')}/c/memory.limit_in_bytes; "
        f"if echo -1 > {v1_env.path('memory')}/memory.limit_in_bytes; then echo RAISED; fi; "
        "cat /proc/self/cgroup"
    )
    result = run(procs, *TENANT, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert "RAISED" not in result.stdout
    assert "Permission denied" in result.stderr
    seen = cgroup_lines(result.stdout)
    for hierarchy in cgroups.v1_hierarchies():
        key = ",".join(sorted(hierarchy.controllers)) or f"name={hierarchy.name}"
        assert seen[key] == f"{v1_env.relative}/c", key
    memory = v1_env.path("memory")
    assert (memory / "memory.limit_in_bytes").read_text().strip() == str(256 * 1024**2)
    assert (memory / "c" / "memory.limit_in_bytes").read_text().strip() == "67108864"
    assert owner(memory / "c") == UID


@needs_v1
def test_v1_sandbox_mounts_its_cgroups_and_runs_containers_below(v1_env: EnvCgroups) -> None:
    # As rootlesskit's child: root of a user namespace, own mount and cgroup namespaces.
    procs = v1_env.create(SPEC)
    v1_env.delegate(UID, UID)
    mounts = v1_env.inner_mounts()
    steps = ["set -e", "mount -t tmpfs -o mode=755,nosuid,nodev,noexec cgroup /sys/fs/cgroup"]
    for m in mounts:
        d = f"/sys/fs/cgroup/{m.subdir}"
        steps += [f"mkdir {d}", f"mount -t cgroup -o nosuid,nodev,noexec,{m.options} cgroup {d}"]
    for m in mounts:  # what runc does for a container: a child in every hierarchy, joined
        d = f"/sys/fs/cgroup/{m.subdir}"
        steps += [f"mkdir {d}/ctr"]
        if m.subdir == "cpuset":
            steps += [f"cat {d}/cpuset.cpus > {d}/ctr/cpuset.cpus"]
            steps += [f"cat {d}/cpuset.mems > {d}/ctr/cpuset.mems"]
        steps += [f"echo $$ > {d}/ctr/cgroup.procs"]
    steps += [
        "echo 67108864 > /sys/fs/cgroup/memory/ctr/memory.limit_in_bytes",
        "if echo -1 > /sys/fs/cgroup/memory/memory.limit_in_bytes; then echo RAISED; fi",
        "cat /proc/self/cgroup",
    ]
    result = run(procs, *TENANT, *SANDBOX, "sh", "-c", "; ".join(steps))
    assert result.returncode == 0, result.stderr
    assert "RAISED" not in result.stdout
    inside = cgroup_lines(result.stdout)
    for hierarchy in cgroups.v1_hierarchies():
        key = ",".join(sorted(hierarchy.controllers)) or f"name={hierarchy.name}"
        assert inside[key] == "/ctr", key  # the environment is the namespace's root
        assert (v1_env.path(hierarchy.path) / "ctr").is_dir()
    memory = v1_env.path("memory")
    assert (memory / "ctr" / "memory.limit_in_bytes").read_text().strip() == "67108864"
    assert (memory / "memory.limit_in_bytes").read_text().strip() == str(256 * 1024**2)


@needs_v1
def test_v1_freeze_kill_and_remove_leave_nothing(v1_env: EnvCgroups) -> None:
    procs = v1_env.create(SPEC)
    child_dirs = []
    for name in ("memory", "freezer", "pids"):
        child = v1_env.path(name) / "ctr"
        child.mkdir()
        child_dirs.append(child / "cgroup.procs")
    engine = start(procs)
    container = start(child_dirs)
    assert v1_env.freeze()
    assert (v1_env.path("freezer") / "ctr" / "freezer.state").read_text().strip() == "FROZEN"
    assert sorted(v1_env.pids()) == sorted([engine.pid, container.pid])
    assert v1_env.child_pids() == [container.pid]

    assert v1_env.kill(children_only=True) == []
    assert container.wait(timeout=10) == -9
    assert engine.poll() is None
    assert v1_env.kill() == []
    assert engine.wait(timeout=10) == -9
    assert v1_env.remove() == []
    assert v1_env.existing_dirs() == []
    cgroups.remove_parent(v1_env.parent)
    assert cgroups.children(v1_env.parent) == set()
    assert not [d for d in V1_DIRS if (d / v1_env.parent).exists()]


# ---- v2 (on the real cgroup2 mount) ------------------------------------------------------------


@needs_v2
def test_v2_setup_enables_what_the_host_offers_and_reports_the_rest(
    v2_env: EnvCgroupsV2, caplog: pytest.LogCaptureFixture
) -> None:
    offered = (UNIFIED / "cgroup.controllers").read_text().split()
    setup = v2_env.setup(SPEC)
    directory = UNIFIED / v2_env.parent / "env-1"
    assert setup.procs == (directory / "cgroup.procs",)
    wanted = [c for c in cgroups.V2_CONTROLLERS if c in offered]
    for level in (UNIFIED, UNIFIED / v2_env.parent):
        assert set(wanted) <= set((level / "cgroup.subtree_control").read_text().split())
    assert set(setup.enabled) == set(wanted)
    assert (directory / "cgroup.subtree_control").read_text().strip() == ""  # the tenant's
    missing = tuple(c for c in ("cpu", "memory", "pids") if c not in offered)
    assert setup.unapplied == missing
    if missing:
        warned = [r for r in caplog.records if r.levelname == "WARNING"]
        assert any(all(c in r.getMessage() for c in missing) for r in warned)
    if "hugetlb" in offered:  # this host: the only controller its cgroup2 has
        assert "hugetlb" in (directory / "cgroup.controllers").read_text().split()
        assert list(directory.glob("hugetlb.*.max"))
    limits = {"cpu": "cpu.max", "memory": "memory.max", "pids": "pids.max"}
    for controller, name in limits.items():
        assert (name in setup.applied) == (controller in offered)
    if "cpu" in offered:
        assert (directory / "cpu.max").read_text().strip() == "50000 100000"
    assert v2_env.inner_mounts() == [CgroupMount("", "cgroup2", "")]
    assert inner_mount_spec(v2_env) == "=cgroup2"


@needs_v2
def test_v2_delegation_is_the_documented_set(v2_env: EnvCgroupsV2) -> None:
    v2_env.setup(SPEC)
    chowned = v2_env.delegate(UID, UID)
    directory = v2_env.directory
    assert chowned == [
        directory,
        directory / "cgroup.procs",
        directory / "cgroup.threads",
        directory / "cgroup.subtree_control",
    ]
    assert owner(directory) == UID
    assert owner(directory.parent) == 0
    for entry in directory.iterdir():
        expected = UID if entry.name in cgroups.V2_DELEGATED else 0
        assert owner(entry) == expected, entry


@needs_v2
def test_v2_sandbox_evacuates_enables_and_makes_children(v2_env: EnvCgroupsV2) -> None:
    # rootlesskit --evacuate-cgroup2=init, then dockerd enabling controllers for containers.
    setup = v2_env.setup(SPEC)
    v2_env.delegate(UID, UID)
    enable = " ".join(f"+{c}" for c in setup.enabled)
    limit = next(iter(sorted(v2_env.directory.glob("hugetlb.*.max"))), None)
    limit_before = limit.read_text() if limit is not None else ""
    steps = [
        "set -e",
        "mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup",
        "mkdir /sys/fs/cgroup/init",
        "echo $$ > /sys/fs/cgroup/init/cgroup.procs",
        f"echo '{enable}' > /sys/fs/cgroup/cgroup.subtree_control" if enable else "true",
        "mkdir /sys/fs/cgroup/ctr",
        "cat /sys/fs/cgroup/ctr/cgroup.controllers",
        "echo ---",
        "cat /proc/self/cgroup",
    ]
    if limit is not None:  # the environment's own limit, from inside: refused
        steps.insert(-3, f"if echo 0 > /sys/fs/cgroup/{limit.name}; then echo RAISED; fi")
        steps.insert(-3, f"echo 1073741824 > /sys/fs/cgroup/ctr/{limit.name}")
    result = run(list(setup.procs), *TENANT, *SANDBOX, "sh", "-c", "; ".join(steps))
    assert result.returncode == 0, result.stderr
    controllers, _, proc_cgroup = result.stdout.partition("---")
    assert "RAISED" not in controllers
    assert set(controllers.split()) == set(setup.enabled)
    assert cgroup_lines(proc_cgroup)[""] == "/init"
    assert (v2_env.directory / "init").is_dir()
    assert owner(v2_env.directory / "ctr") == UID
    assert set((v2_env.directory / "cgroup.subtree_control").read_text().split()) == set(
        setup.enabled
    )
    if limit is not None:
        assert limit.read_text() == limit_before  # the tenant could not touch it
        assert (v2_env.directory / "ctr" / limit.name).read_text().strip() == "1073741824"


@needs_v2
def test_v2_tenant_without_namespaces_moves_itself_into_a_child(v2_env: EnvCgroupsV2) -> None:
    procs = v2_env.create(SPEC)
    v2_env.delegate(UID, UID)
    d = v2_env.directory
    script = f"set -e; mkdir {d}/init; echo $$ > {d}/init/cgroup.procs; cat /proc/self/cgroup"
    result = run(procs, *TENANT, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert cgroup_lines(result.stdout)[""] == f"{v2_env.relative}/init"


@needs_v2
def test_v2_freeze_thaw_kill_and_remove(v2_env: EnvCgroupsV2) -> None:
    v2_env.setup(SPEC)
    d = v2_env.directory
    for child in ("init", "ctr"):
        (d / child).mkdir()
    engine = start([d / "init" / "cgroup.procs"])
    container = start([d / "ctr" / "cgroup.procs"])
    assert sorted(v2_env.pids()) == sorted([engine.pid, container.pid])
    assert v2_env.child_pids() == [container.pid]  # the sandbox's own child is not a container

    assert v2_env.freeze()
    assert cgroups._events(d)["frozen"] == "1"
    assert cgroups._events(d / "ctr")["frozen"] == "1"
    v2_env.thaw()
    wait_until(lambda: cgroups._events(d)["frozen"] == "0", 10, "the thaw")

    assert v2_env.freeze()
    # timeout=0: cgroup.kill alone, no SIGKILL from the fallback loop; frozen tasks die too.
    v2_env.kill(children_only=True, timeout=0)
    assert container.wait(timeout=10) == -9
    assert engine.poll() is None
    v2_env.kill(timeout=0)
    assert engine.wait(timeout=10) == -9
    wait_until(lambda: not v2_env.pids(), 10, "the cgroups to empty")
    assert v2_env.remove() == []
    assert not d.exists()
    cgroups.remove_parent(v2_env.parent, UNIFIED)
    assert cgroups.children(v2_env.parent, UNIFIED) == set()
    assert not (UNIFIED / v2_env.parent).exists()

"""Bind mounts of laptop paths: find them in a container-create body and point them at the runner.

A `docker run -v /home/me/app:/app` (or `--mount type=bind`, or a compose volume, which compose
sends as one of those two with an absolute laptop path) names a directory on the laptop. The
agent syncs it into the session's mount area on the runner, under a stable id of the laptop
path, and rewrites the source before the request goes on. Named volumes (`Binds` entries whose
source is not absolute, `Mounts` of type `volume`), tmpfs and everything else stay as they were.

A bind of a single file syncs its directory restricted to that one name (`only`), and the
source becomes `<mount area>/<id>/<name>`.

The Docker socket (`/var/run/docker.sock`, `/run/docker.sock`) means "the engine" to the tools
that mount it (CI runners, testcontainers, docker-in-docker builds): it becomes the session
engine's socket in the mount area (`ENGINE_SOCKET_IN_MOUNT_AREA`), never a laptop file.

Each rewritten source comes back with the path the client named (`BindRewrite.sources`), so
that the engine's answers can show it again (`offload.agent.bind_sources`).

Pure apart from `probe`, which looks at the laptop's file system (tests pass their own).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from offload.core.errors import InvalidInput
from offload.core.schemas import ENGINE_SOCKET_IN_MOUNT_AREA

PathKind = Literal["dir", "file", "missing"]
Probe = Callable[[str], tuple[PathKind, str]]  # laptop path -> (kind, real path)


@dataclass(frozen=True)
class BindSync:
    """One laptop directory to sync before the container may be created."""

    laptop_path: str  # the directory synced (a file bind: the file's directory)
    subdir: str  # its directory in the mount area (a stable id of the laptop path)
    read_only: bool  # every bind of it is `ro`: the sync is one way
    only: str | None  # a file bind: the one name synced
    remote_source: str  # what the rewritten body names as the bind source


@dataclass(frozen=True)
class RemoteSource:
    """A bind source as the client named it, and what the rewritten body names instead."""

    remote: str  # in the mount area: `<area>/<id>`, `<area>/<id>/<name>` or the engine socket
    laptop: str  # the client's source, normalized (as a local engine shows it in `Mounts`)


@dataclass(frozen=True)
class BindRewrite:
    body: bytes
    syncs: list[BindSync]
    changed: bool = False
    sources: tuple[RemoteSource, ...] = ()


def probe_laptop_path(path: str) -> tuple[PathKind, str]:
    real = os.path.realpath(path)
    if os.path.isdir(real):
        return "dir", real
    if os.path.exists(real):
        return "file", real
    return "missing", real


def stable_id(laptop_path: str) -> str:
    """The mount-area directory name of a laptop path: the same on every run, a plain name."""
    digest = hashlib.sha256(posixpath.normpath(laptop_path).encode()).hexdigest()
    return f"b{digest[:24]}"


def rewrite_create_body(
    body: bytes, mount_area: str, *, probe: Probe = probe_laptop_path
) -> BindRewrite:
    """The create body with laptop bind sources moved into `mount_area`, and what to sync first.

    Raises InvalidInput for a body that is not a JSON object, or a `--mount type=bind` whose
    source does not exist (Docker refuses those too; `-v` creates the directory instead).
    """
    try:
        doc = json.loads(body) if body.strip() else {}
    except ValueError:
        raise InvalidInput("the container create request is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the container create request is not a JSON object")
    host_config = _get(doc, "HostConfig")
    if not isinstance(host_config, dict):
        return BindRewrite(body, [])
    plans = _Plans(posixpath.normpath(mount_area), probe)
    changed = _rewrite_binds(host_config, plans)
    changed = _rewrite_mounts(host_config, plans) or changed
    if not changed:
        return BindRewrite(body, [])
    syncs = [p.sync() for p in plans.by_subdir.values()]
    sources = tuple(RemoteSource(remote, laptop) for remote, laptop in plans.sources.items())
    return BindRewrite(json.dumps(doc).encode(), syncs, changed=True, sources=sources)


def has_laptop_binds(body: bytes) -> bool:
    """Cheap pre-check: could this body name a laptop bind source at all?"""
    return b"/" in body and (b"inds" in body or b"ounts" in body)


# ---- internals ------------------------------------------------------------------------------


@dataclass
class _Plan:
    laptop_dir: str
    subdir: str
    only: str | None
    read_only: bool
    remote_source: str

    def sync(self) -> BindSync:
        return BindSync(self.laptop_dir, self.subdir, self.read_only, self.only, self.remote_source)


def _get(obj: dict[str, Any], key: str) -> Any:
    """dockerd matches keys case-insensitively; the exact spelling wins, like Go's decoder."""
    if key in obj:
        return obj[key]
    lowered = key.lower()
    for k, v in obj.items():
        if k.lower() == lowered:
            return v
    return None


def _key(obj: dict[str, Any], key: str) -> str:
    if key in obj:
        return key
    return next((k for k in obj if k.lower() == key.lower()), key)


@dataclass
class _Plans:
    """What one create body's rewrite records: the syncs, and each rewritten source."""

    area: str
    probe: Probe
    by_subdir: dict[str, _Plan] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # remote source -> laptop source


def _plan_for(source: str, read_only: bool, plans: _Plans, must_exist: bool) -> str | None:
    """The rewritten source of a laptop path, recording what to sync; None: leave it alone."""
    remote = _remote_for(source, read_only, plans, must_exist)
    if remote is not None:
        plans.sources[remote] = posixpath.normpath(source)
    return remote


def _remote_for(source: str, read_only: bool, plans: _Plans, must_exist: bool) -> str | None:
    if not source.startswith("/"):
        return None  # a named volume
    area = plans.area
    normal = posixpath.normpath(source)
    if normal in DOCKER_SOCKETS:
        return f"{area}/{ENGINE_SOCKET_IN_MOUNT_AREA}"
    if normal == area or normal.startswith(area + "/"):
        return None  # already a runner path in the mount area
    kind, real = plans.probe(normal)
    _refuse_unsyncable(source, real)
    if kind == "missing" and must_exist:
        raise InvalidInput(
            f'invalid mount config for type "bind": bind source path does not exist: {source}',
            "Create the file or directory on this machine first, or use `-v`, which creates it.",
        )
    subdir = stable_id(normal)
    if kind == "file":
        laptop_dir, only = posixpath.dirname(real), posixpath.basename(real)
        remote = f"{area}/{subdir}/{only}"
    else:
        laptop_dir, only = real, None
        remote = f"{area}/{subdir}"
    plan = plans.by_subdir.get(subdir)
    if plan is None:
        plans.by_subdir[subdir] = _Plan(laptop_dir, subdir, only, read_only, remote)
    else:
        plan.read_only = plan.read_only and read_only
    return remote


DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")

# The laptop's root and its kernel file systems are not files to copy: syncing them would read
# the whole disk or pseudo-files that mean nothing on another machine.
_UNSYNCABLE = ("/proc", "/sys", "/dev")


def _refuse_unsyncable(source: str, real: str) -> None:
    if real == "/" or any(real == p or real.startswith(p + "/") for p in _UNSYNCABLE):
        raise InvalidInput(
            f"cannot bind-mount {source}: Offload syncs laptop directories to the runner, and "
            f"{real} is not one it can copy",
            "Bind a project directory instead; containers have their own /proc, /sys and /dev.",
        )


def _rewrite_binds(host_config: dict[str, Any], plans: _Plans) -> bool:
    binds = _get(host_config, "Binds")
    if not isinstance(binds, list):
        return False
    changed = False
    out: list[Any] = []
    for bind in binds:
        if not isinstance(bind, str):
            out.append(bind)
            continue
        source, sep, rest = bind.partition(":")
        options = rest.split(":", 1)[1].split(",") if rest.count(":") >= 1 else []
        remote = _plan_for(source, "ro" in options, plans, must_exist=False)
        out.append(bind if remote is None else remote + sep + rest)
        changed = changed or remote is not None
    host_config[_key(host_config, "Binds")] = out
    return changed


def _rewrite_mounts(host_config: dict[str, Any], plans: _Plans) -> bool:
    mounts = _get(host_config, "Mounts")
    if not isinstance(mounts, list):
        return False
    changed = False
    for mount in mounts:
        if not isinstance(mount, dict) or str(_get(mount, "Type") or "").lower() != "bind":
            continue
        source = _get(mount, "Source")
        if not isinstance(source, str):
            continue
        remote = _plan_for(source, bool(_get(mount, "ReadOnly")), plans, must_exist=True)
        if remote is not None:
            mount[_key(mount, "Source")] = remote
            changed = True
    return changed

"""`RootlessDriver`: one sandboxed, rootless `dockerd` per environment.

Each environment's engine runs under an unprivileged host identity of its own
(`offload.runner.identities`), inside rootlesskit's user, mount, pid, ipc, uts, network and
cgroup namespaces, on a private root filesystem (`sandbox_init.sh`: only /usr of the host is
shared, read-only).  Inside, everything a local engine allows works (privileged containers,
host namespaces, swarm): it all stays in the sandbox.  Containers reach the outside world
through the network helper (pasta, or slirp4netns), confined by the runner's egress rules.
The runner keeps from outside what the tenant must not change: the cgroups with the instance
type's limits (the sandbox manages its own children below them), the authorization plugin (a
second wall), the egress rules.
A GPU environment is made for the GPUs it is given (`create(spec, gpu_uuids)`): their device
nodes are the only NVIDIA ones in its sandbox, and its teardown kills whatever NVML still sees
running on them (`offload.runner.gpus`).

Layout on the host (short paths: unix sockets are limited to 108 bytes):

    data_dir/envs/<id>/data        the engine's /var/lib/docker (owned by the identity's ids)
    data_dir/envs/<id>/mounts      mount area, at the same path inside; file sync writes here
    data_dir/envs/<id>/daemon.json dockerd's configuration (copied in)
    data_dir/envs/<id>/dockerd.log output of rootlesskit, the init and dockerd
    data_dir/envs/<id>/identity    the identity slot this environment holds
    data_dir/envs/<id>/gpus        GPU environments: the UUIDs of the GPUs it holds
    run_dir/<id>/sock/docker.sock  the engine API
    run_dir/<id>/plugins/          this environment's policy plugin socket (nobody else's)
    run_dir/<id>/rk/               rootlesskit's state (child_pid)
    run_dir/<id>/dev/              GPU environments: bind mounts of its GPUs' device nodes and
                                   the control nodes, which the sandbox binds into its /dev
    run_dir/<id>/gpu-hooks/        a bind mount of OFFLOAD_RUNNER_GPU_HOOK_DIR (GPU environments)
    run_dir/<id>/root/             mount point of the private root (mounted inside only)
    run_dir/<id>/home/             a bind mount of data_dir/envs/<id>: the sandbox reaches its
                                   directories through run_dir, whatever data_dir's parents allow

The directories are the record of an environment: teardown removes them last, so a runner that
died half-way leaves something `cleanup_orphans` can find.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from offload.core.config import RunnerSettings
from offload.core.engine_http import engine_client
from offload.core.errors import EnvironmentError_, OffloadError
from offload.core.schemas import (
    ENGINE_ENV_LABEL,
    ENGINE_GPU_LABEL,
    ENGINE_GPU_RUNTIME_LABEL,
    ENGINE_ISOLATION_LABEL,
    ENGINE_SOCKET_IN_MOUNT_AREA,
    GPU_RUNTIME_NONE,
    InstanceSpec,
)
from offload.core.waiting import WaitTimeout, async_wait_until, within
from offload.runner import cgroups, identities, mounts, netns
from offload.runner.driver import (
    DriverCapabilities,
    Environment,
    EnvironmentDescription,
    EnvState,
)
from offload.runner.gpus import GpuInventory, SandboxGpu, Toolkit
from offload.runner.identities import Identity, IdentityRange
from offload.runner.registry_trust import EngineRegistries
from offload.runner.sandbox import HELPER_MTU, SandboxGpus, SandboxSpec

log = logging.getLogger(__name__)

ENV_PREFIX = "env-"
# Organisations' builders: persistent environments (their data outlives sessions and restarts).
BUILDER_PREFIX = "bld-"
NETNS_PREFIX = "off-"
POLICY_PREFIX = "offload-policy-"
ISOLATION = "rootless"  # what status and diagnose name
ENV_LABEL = ENGINE_ENV_LABEL  # engine labels (`docker info`)
ISOLATION_LABEL = ENGINE_ISOLATION_LABEL
STOP_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 10.0
# Images named in one heartbeat report (the control plane keeps 100 per session).
MAX_IMAGES_REPORTED = 100
# sun_path holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107


class PolicyLike(Protocol):
    """The runner's authorization plugin for one environment (see `offload.runner.policy`)."""

    name: str

    @property
    def socket_path(self) -> Path: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# (name, mount area, plugin dir, the environment's GPUs as its engine numbers them)
PolicyFactory = Callable[[str, Path, Path, Sequence[SandboxGpu]], PolicyLike]


def default_policy_factory(
    name: str, mount_area: Path, plugin_dir: Path, gpus: Sequence[SandboxGpu] = ()
) -> PolicyLike:
    from offload.runner.policy import PolicyPlugin  # lazy: keeps the driver importable alone

    return PolicyPlugin(name, mount_area, plugin_dir, gpus=gpus)


def identity_range(settings: RunnerSettings) -> IdentityRange:
    """Slots 0..capacity-1 serve sessions; the next `builder_slots` organisations' builders
    (one fixed slot each: their data is owned by that slot's ids)."""
    count = settings.capacity + settings.builder_slots
    return IdentityRange(settings.identity_uid_base, settings.subid_base, count)


@dataclass(frozen=True)
class EnvPaths:
    """Where one environment's files live; derived from the settings and its id alone."""

    env_id: str
    home: Path  # data_dir/envs/<id>
    run: Path  # run_dir/<id>

    @classmethod
    def of(cls, settings: RunnerSettings, env_id: str) -> EnvPaths:
        kind = "builders" if env_id.startswith(BUILDER_PREFIX) else "envs"
        return cls(env_id, settings.data_dir / kind / env_id, settings.run_dir / env_id)

    @property
    def persistent(self) -> bool:
        """A builder's home (its data-root: the build cache) is kept when it stops."""
        return self.env_id.startswith(BUILDER_PREFIX)

    @property
    def data_root(self) -> Path:
        return self.home / "data"

    @property
    def exports(self) -> Path:
        """A builder's kept image archives (`export_cache`): beside the homes, so out of the
        sandbox's view."""
        return self.home.parents[1] / "exports" / self.env_id

    @property
    def mount_area(self) -> Path:
        return self.home / "mounts"

    @property
    def log_file(self) -> Path:
        return self.home / "dockerd.log"

    @property
    def config_file(self) -> Path:
        return self.home / "daemon.json"

    @property
    def ca_bundle(self) -> Path:
        return self.home / "ca-certificates.crt"

    @property
    def identity_file(self) -> Path:
        return self.home / "identity"

    @property
    def gpus_file(self) -> Path:
        """The UUIDs of the GPUs it holds, one a line (wiped of processes at teardown)."""
        return self.home / "gpus"

    @property
    def nvidia_config(self) -> Path:
        return self.home / "nvidia-container-runtime.toml"

    @property
    def devices(self) -> Path:
        """Its GPUs' device nodes and the control nodes (bind mounts), bound into its /dev."""
        return self.run / "dev"

    @property
    def gpu_hooks(self) -> Path:
        return self.run / "gpu-hooks"

    @property
    def sockets(self) -> Path:
        return self.run / "sock"

    @property
    def socket(self) -> Path:
        return self.sockets / "docker.sock"

    @property
    def plugins(self) -> Path:
        return self.run / "plugins"

    @property
    def state_dir(self) -> Path:
        return self.run / "rk"

    @property
    def root(self) -> Path:
        return self.run / "root"

    @property
    def staged_home(self) -> Path:
        return self.run / "home"

    def staged(self, path: Path) -> Path:
        """`path` (under home) as the sandbox's start reaches it: through `staged_home`."""
        return self.staged_home / path.relative_to(self.home)

    @property
    def child_pidfile(self) -> Path:
        """rootlesskit's: the sandbox's first process (its pid 1), parent of dockerd."""
        return self.state_dir / "child_pid"

    @property
    def area_socket(self) -> Path:
        return self.mount_area / ENGINE_SOCKET_IN_MOUNT_AREA

    @property
    def netns(self) -> str:
        return NETNS_PREFIX + self.env_id.removeprefix(ENV_PREFIX)

    @property
    def policy_name(self) -> str:
        return POLICY_PREFIX + self.env_id


@dataclass
class _Runtime:
    """What the driver holds for an environment it created in this process."""

    paths: EnvPaths
    cgroups: cgroups.EnvCgroups
    identity: Identity | None = None
    policy: PolicyLike | None = None
    process: asyncio.subprocess.Process | None = None
    # Containers that pause() froze: resume() thaws these and no others.
    paused: list[str] = field(default_factory=list)
    gpu_uuids: tuple[str, ...] = ()  # the GPUs it holds


class RootlessDriver:
    """EnvironmentDriver with a sandboxed, rootless dockerd per environment (module docstring)."""

    def __init__(
        self,
        settings: RunnerSettings,
        policy_factory: PolicyFactory | None = None,
        registries: EngineRegistries | None = None,
        gpus: GpuInventory | None = None,
        toolkit: Toolkit | None = None,
    ) -> None:
        self.settings = settings
        self.registries = registries or EngineRegistries()
        self.gpus = gpus or GpuInventory.empty()
        self.toolkit = toolkit or Toolkit(False)
        self.capabilities = DriverCapabilities(gpus=len(self.gpus), pause=True)
        self.identities = identity_range(settings)
        self._policy_factory = policy_factory or default_policy_factory
        self._runtimes: dict[str, _Runtime] = {}
        self._destroying: dict[str, asyncio.Task[None]] = {}
        # Identity slots held by environments of this process, and those whose environment
        # could not be wiped (reused only once nothing of it remains).
        self._held_slots: dict[int, str] = {}

    # ---- create ------------------------------------------------------------------------------

    async def create(self, spec: InstanceSpec, gpu_uuids: Sequence[str] = ()) -> Environment:
        """A new environment; with `gpu_uuids`, its engine has those GPUs and no others."""
        held = tuple(gpu.uuid for gpu in self.gpus.of(gpu_uuids))  # raises for one not offered
        return await self._create(ENV_PREFIX + secrets.token_hex(5), spec, gpu_uuids=held)

    async def start_builder(
        self, env_id: str, spec: InstanceSpec, slot: int, config: dict[str, Any]
    ) -> Environment:
        """(Re)start the persistent environment `env_id` (BUILDER_PREFIX) on identity `slot`,
        with its data-root as it was left; `config` is merged into its daemon.json."""
        if not env_id.startswith(BUILDER_PREFIX):
            raise ValueError(f"{env_id} is not a builder id")
        return await self._create(env_id, spec, slot, config)

    async def _create(
        self,
        env_id: str,
        spec: InstanceSpec,
        slot: int | None = None,
        extra_config: dict[str, Any] | None = None,
        gpu_uuids: tuple[str, ...] = (),
    ) -> Environment:
        paths = EnvPaths.of(self.settings, env_id)
        _check_socket_paths(paths)
        rt = _Runtime(paths, env_cgroups(self.settings, env_id), gpu_uuids=gpu_uuids)
        self._runtimes[env_id] = rt
        started = time.monotonic()
        start = asyncio.create_task(self._start(rt, spec, slot, extra_config or {}))
        try:
            await asyncio.shield(start)
        except BaseException as exc:
            # A cancelled create (the runner stopping) lets its start settle before the wipe: the
            # threads it runs (cgroups, accounts) and a sandbox being spawned cannot be stopped
            # half-way, and a wipe that ran before them would miss what they make.
            await _settle(start)
            tail = await asyncio.to_thread(log_tail, paths.log_file)
            # Shielded: a cancelled create must still leave nothing behind.
            await asyncio.shield(self._teardown_quietly(env_id))
            if isinstance(exc, Exception):
                raise _create_error(env_id, exc, tail) from None
            raise
        log.info("environment %s ready in %.2fs", env_id, time.monotonic() - started)
        assert rt.identity is not None
        return Environment(
            id=env_id,
            engine_socket=paths.socket,
            mount_area=paths.mount_area,
            netns=paths.netns,
            spec=spec,
            area_owner=(rt.identity.uid, rt.identity.gid),
            isolation=ISOLATION,
            gpu_uuids=gpu_uuids,
        )

    async def _start(
        self, rt: _Runtime, spec: InstanceSpec, slot: int | None, extra: dict[str, Any]
    ) -> None:
        paths = rt.paths
        rt.identity = identity = await self._take_identity(paths.env_id, slot)
        config = engine_config(paths.env_id, self.settings.dockerd_config, self.registries.mirrors)
        config["labels"] += gpu_labels(rt.gpu_uuids, self.toolkit)
        config.update(extra)
        await asyncio.to_thread(_make_dirs, paths, identity, config, self.registries.ca_bundle)
        await asyncio.to_thread(mounts.bind, paths.home, paths.staged_home)
        if rt.gpu_uuids:
            await asyncio.to_thread(self._stage_gpus, rt)
        rt.policy = self._policy_factory(
            paths.policy_name,
            paths.mount_area,
            paths.plugins,
            self.gpus.sandbox_view(rt.gpu_uuids),
        )
        # dockerd checks its authorization plugin at start-up: the plugin must answer first.
        await rt.policy.start()
        os.chown(rt.policy.socket_path, identity.uid, identity.gid)
        await self._launch(rt, spec)

    async def _launch(self, rt: _Runtime, spec: InstanceSpec) -> None:
        """Start the sandbox on the environment's prepared directories (again, after a crash:
        its data-root and mount area are kept)."""
        assert rt.identity is not None
        paths = rt.paths
        procs = await asyncio.to_thread(rt.cgroups.create, spec)
        await asyncio.to_thread(rt.cgroups.delegate, rt.identity.uid, rt.identity.gid)
        rt.process = await _spawn(self._sandbox(rt, rt.identity, procs), paths.log_file)
        await self._wait_for_engine(rt)
        await netns.attach(paths.netns, await asyncio.to_thread(_sandbox_pid, paths))

    def _stage_gpus(self, rt: _Runtime) -> None:
        """Record the GPUs (teardown wipes them), bind their device nodes, the control nodes
        and the hook directory under run_dir, where the sandbox's start reaches them whatever
        the host paths' parents allow."""
        paths = rt.paths
        paths.gpus_file.write_text("".join(f"{uuid}\n" for uuid in rt.gpu_uuids))
        paths.devices.mkdir(mode=0o755)
        for host, inside in self.gpus.sandbox_devices(rt.gpu_uuids):
            target = paths.devices / Path(inside).name
            target.touch(mode=0o600)
            mounts.bind(host, target)
        if self.toolkit.hooks is not None:
            paths.gpu_hooks.mkdir(mode=0o755)
            mounts.bind(self.toolkit.hooks, paths.gpu_hooks)
        if self.toolkit.config is not None:
            paths.nvidia_config.write_text(self.toolkit.config)
            paths.nvidia_config.chmod(0o644)

    def _sandbox_gpus(self, rt: _Runtime) -> SandboxGpus | None:
        if not rt.gpu_uuids:
            return None
        paths = rt.paths
        return SandboxGpus(
            devices=paths.devices,
            uuids=tuple((g.uuid, g.inside_node) for g in self.gpus.sandbox_view(rt.gpu_uuids)),
            hooks=paths.gpu_hooks if self.toolkit.hooks is not None else None,
            nvidia_config=(
                paths.staged(paths.nvidia_config) if self.toolkit.config is not None else None
            ),
        )

    def _sandbox(self, rt: _Runtime, identity: Identity, procs: list[Path]) -> SandboxSpec:
        paths = rt.paths
        pci = tuple(g.pci_bus for g in self.gpus.of(rt.gpu_uuids) if g.pci_bus)
        return SandboxSpec(
            env_id=paths.env_id,
            identity=identity,
            root=paths.root,
            data_root=paths.staged(paths.data_root),
            mount_area=paths.mount_area,
            staged_area=paths.staged(paths.mount_area),
            sockets=paths.sockets,
            plugins=paths.plugins,
            config_file=paths.staged(paths.config_file),
            ca_bundle=paths.staged(paths.ca_bundle) if self.registries.ca_bundle else None,
            state_dir=paths.state_dir,
            cgroup_procs=procs,
            inner_cgroups=cgroups.inner_mount_spec(rt.cgroups),
            evacuate_cgroup2=rt.cgroups.mode == "v2",
            policy_name=paths.policy_name,
            area_socket=_area_listener(paths),
            rootlesskit=self.settings.rootlesskit,
            dockerd=self.settings.dockerd,
            network=self.settings.network,
            gpu=self._sandbox_gpus(rt),
            gpu_pci=pci,
        )

    async def _take_identity(self, env_id: str, wanted: int | None = None) -> Identity:
        """A free identity slot whose previous environment left no process behind (`wanted`:
        that slot, a builder's own; otherwise one of the sessions' slots)."""
        slots = [wanted] if wanted is not None else range(self.settings.capacity)
        for slot in slots:
            if slot in self._held_slots:
                continue
            identity = self.identities.identity(slot)
            if await asyncio.to_thread(identities.processes_of, [identity]):
                log.warning("identity %s still has processes: not reused yet", identity.name)
                continue
            self._held_slots[slot] = env_id
            try:
                await asyncio.to_thread(identities.ensure_account, identity)
            except BaseException:
                self._held_slots.pop(slot, None)
                raise
            return identity
        if wanted is not None:
            raise EnvironmentError_(
                f"The builder identity slot {wanted} is in use or not yet clean.",
                "Wait a moment and build again.",
            )
        raise EnvironmentError_(
            f"All {self.settings.capacity} sandbox identities are in use or not yet clean.",
            "Wait for sessions to end, or raise OFFLOAD_RUNNER_CAPACITY.",
        )

    async def _wait_for_engine(self, rt: _Runtime) -> None:
        process = rt.process
        assert process is not None
        async with _engine_client(rt.paths.socket, timeout=2.0) as client:

            async def answers() -> bool:
                if process.returncode is not None:
                    raise EnvironmentError_(
                        f"The sandboxed dockerd exited with status {process.returncode} "
                        "while starting."
                    )
                try:
                    return (await client.get("/_ping")).status_code == 200
                except httpx.TransportError:
                    return False

            try:
                await async_wait_until(
                    answers, self.settings.dockerd_start_timeout_s, "dockerd to answer /_ping"
                )
            except WaitTimeout as exc:
                raise EnvironmentError_(str(exc)) from None

    # ---- pause / resume ----------------------------------------------------------------------

    async def pause(self, env: Environment) -> None:
        """Freeze every running container (`docker inspect` then shows State.Paused).

        Idempotent: pausing a paused environment freezes only what runs now (a container that
        started meanwhile) and keeps the record of what was frozen before."""
        rt = self._runtimes.get(env.id)
        frozen = rt.paused if rt is not None else []
        count = 0
        for cid in await self._container_ids(env, "running"):
            if await self._container_action(env, cid, "pause"):
                # Recorded one by one: a failure half-way still lets resume() thaw these.
                if cid not in frozen:
                    frozen.append(cid)
                count += 1
        env.state = EnvState.PAUSED
        log.info("environment %s paused (%d containers)", env.id, count)

    async def resume(self, env: Environment) -> None:
        """Unpause what pause() froze (all paused containers if this process did not pause)."""
        rt = self._runtimes.get(env.id)
        ids = list(rt.paused) if rt is not None else await self._container_ids(env, "paused")
        for cid in ids:
            await self._container_action(env, cid, "unpause")
            if rt is not None:
                rt.paused.remove(cid)  # a failure half-way: the rest is thawed on the next try
        env.state = EnvState.BOUND if env.session_id else EnvState.WARM
        log.info("environment %s resumed (%d containers)", env.id, len(ids))

    async def _container_ids(self, env: Environment, status: str) -> list[str]:
        filters = json.dumps({"status": [status]})
        response = await self._engine_call(
            env, "GET", "/containers/json", params={"filters": filters}
        )
        return [c["Id"] for c in response.json()]

    async def _container_action(self, env: Environment, cid: str, action: str) -> bool:
        response = await self._engine_call(
            env, "POST", f"/containers/{cid}/{action}", allow=(404, 409)
        )
        # 404/409: the container went away or changed state meanwhile; nothing to undo.
        return response.status_code == 204

    async def _engine_call(
        self, env: Environment, method: str, path: str, allow: tuple[int, ...] = (), **kw: Any
    ) -> httpx.Response:
        try:
            async with _engine_client(env.engine_socket, timeout=30.0) as client:
                response = await client.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise EnvironmentError_(
                f"The engine of environment {env.id} does not answer ({exc.__class__.__name__}).",
                "The environment is broken: end the session (`offload stop`) and start again.",
            ) from None
        if response.is_success or response.status_code in allow:
            return response
        raise EnvironmentError_(
            f"The engine of environment {env.id} refused {method} {path}: "
            f"{response.status_code} {response.text[:200]}",
            "Check the environment's dockerd.log on the runner.",
        )

    # ---- describe ----------------------------------------------------------------------------

    async def describe(self, env: Environment) -> EnvironmentDescription:
        """Containers through the engine API (paused ones count as running); pids from cgroups."""
        containers = (
            await self._engine_call(env, "GET", "/containers/json", params={"all": "1"})
        ).json()
        running = sum(1 for c in containers if c.get("State") in ("running", "paused"))
        pids = await asyncio.to_thread(env_cgroups(self.settings, env.id).pids)
        return EnvironmentDescription(
            id=env.id,
            state=env.state,
            session_id=env.session_id,
            containers_running=running,
            containers_total=len(containers),
            pids=pids,
        )

    # ---- destroy -----------------------------------------------------------------------------

    async def destroy(self, env: Environment) -> None:
        """Leave nothing behind; idempotent, and safe after a half-finished create."""
        env.state = EnvState.DESTROYING
        await self.destroy_id(env.id)

    async def destroy_id(self, env_id: str) -> None:
        task = self._destroying.get(env_id)
        if task is None:
            task = asyncio.create_task(self._teardown_and_forget(env_id))
            self._destroying[env_id] = task
        # Shielded: a caller that gives up must not leave a half-wiped environment.
        await asyncio.shield(task)

    async def _teardown_and_forget(self, env_id: str) -> None:
        try:
            await teardown(self.settings, env_id, self._runtimes.get(env_id), self.gpus)
        finally:
            self._runtimes.pop(env_id, None)
            self._destroying.pop(env_id, None)
            # A slot whose processes survived stays out of use: `_take_identity` checks again.
            for slot in [s for s, e in self._held_slots.items() if e == env_id]:
                del self._held_slots[slot]

    async def _teardown_quietly(self, env_id: str) -> None:
        try:
            await self.destroy_id(env_id)
        except OffloadError as exc:
            log.error("cleaning up after a failed create: %s", exc)


async def _settle(task: asyncio.Task[None]) -> None:
    """Wait until `task` has finished, whatever happens to the caller meanwhile (bounded by
    the task itself: a start ends within the engine start timeout)."""
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task})


def env_cgroups(settings: RunnerSettings, env_id: str) -> cgroups.EnvCgroups:
    mode = None if settings.cgroup_mode == "auto" else settings.cgroup_mode
    return cgroups.env_cgroups(settings.cgroup_parent, env_id, settings.cgroup_root, mode)


# ---- teardown (shared by destroy and cleanup_orphans) -----------------------------------------


async def teardown(
    settings: RunnerSettings,
    env_id: str,
    rt: _Runtime | None = None,
    gpus: GpuInventory | None = None,
) -> None:
    """Wipe one environment from whatever state it is in; raise if something stays behind.

    Nothing needs a graceful stop: every mount the engine made lives in the sandbox's own mount
    namespace, which goes with its last process.  Its GPUs are then wiped of any compute process
    NVML still sees on them (`gpus`: the runner's inventory)."""
    paths = EnvPaths.of(settings, env_id)
    started = time.monotonic()
    problems: list[str] = []
    held = rt.gpu_uuids if rt is not None else await asyncio.to_thread(_recorded_gpus, paths)
    left = await _kill_everything(settings, paths, rt)
    if left:
        problems.append(f"processes still alive: {left}")
    if held and gpus is not None:
        on_gpu = await asyncio.to_thread(gpus.wipe, held, f"environment {env_id}")
        if on_gpu:
            problems.append(f"processes still on its GPUs: {on_gpu}")
    stuck = await asyncio.to_thread(mounts.unmount_under, [paths.home, paths.run])
    if stuck:
        problems.append(f"mounts left: {stuck}")
    try:
        await netns.delete(paths.netns)
    except EnvironmentError_ as exc:
        problems.append(exc.message)
    left_cgroups = await asyncio.to_thread(env_cgroups(settings, env_id).remove)
    if left_cgroups:
        problems.append(f"cgroups left: {[str(p) for p in left_cgroups]}")
    if not stuck:  # never rm -rf through a mount: it could reach host files
        await asyncio.to_thread(_remove_dirs, paths)
    await _stop_policy(rt.policy if rt else None)
    if problems:
        raise EnvironmentError_(
            f"Environment {env_id} was not fully wiped: {'; '.join(problems)}.",
            "Stop the runner, remove what is listed by hand, then start it again "
            "(it wipes leftovers at start).",
        )
    log.info("environment %s destroyed in %.2fs", env_id, time.monotonic() - started)


async def _kill_everything(
    settings: RunnerSettings, paths: EnvPaths, rt: _Runtime | None
) -> list[int]:
    """SIGKILL the environment's processes: by cgroup, then by identity (a process that left
    its cgroup still has the identity's ids); return those still alive after the bound."""
    left = await asyncio.to_thread(env_cgroups(settings, paths.env_id).kill, False, KILL_TIMEOUT_S)
    identity = (rt.identity if rt else None) or _recorded_identity(settings, paths)
    if identity is not None:
        left = sorted(set(left) | set(await asyncio.to_thread(_kill_identities, [identity])))
    if rt is not None and rt.process is not None and rt.process.returncode is None:
        with contextlib.suppress(TimeoutError):
            await within(rt.process.wait(), STOP_TIMEOUT_S)
    return left


def _kill_identities(owners: list[Identity]) -> list[int]:
    """SIGKILL every process of `owners` until none is left (bounded); return the survivors.

    A killed process still counts until the kernel has reaped it: wait for that too."""
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while True:
        pids = identities.processes_of(owners)
        if not pids or time.monotonic() >= deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)  # the kernel reaps asynchronously; re-read


def _recorded_gpus(paths: EnvPaths) -> tuple[str, ...]:
    try:
        return tuple(line for line in paths.gpus_file.read_text().split() if line)
    except OSError:
        return ()


def _recorded_identity(settings: RunnerSettings, paths: EnvPaths) -> Identity | None:
    try:
        return identity_range(settings).identity(int(paths.identity_file.read_text()))
    except (OSError, ValueError):
        return None


async def _stop_policy(policy: PolicyLike | None) -> None:
    if policy is not None:
        try:
            await policy.stop()
        except Exception as exc:  # noqa: BLE001 - a plugin failing to stop must not stop the wipe
            log.warning("policy plugin %s did not stop cleanly: %s", policy.name, exc)


# ---- orphans ----------------------------------------------------------------------------------


async def cleanup_orphans(
    settings: RunnerSettings, netns_min_age_s: float = 60.0, gpus: GpuInventory | None = None
) -> list[str]:
    """Wipe what a previous runner process left: envs, their processes, netns, cgroups.

    Environments are found by their directories and cgroups; then any process still running
    under one of the runner's identities is killed (nothing may run there before an environment
    does).  `off-*` namespaces that no process uses and that are older than `netns_min_age_s`
    go too (the age keeps a namespace another runner has just created).  Returns the
    environment ids wiped.
    """
    env_ids = await asyncio.to_thread(_leftover_env_ids, settings)
    for env_id in sorted(env_ids):
        log.warning("wiping environment %s left by a previous runner", env_id)
        try:
            await teardown(settings, env_id, gpus=gpus)
        except EnvironmentError_ as exc:
            log.error("%s", exc)
    every = identity_range(settings)
    strays = [every.identity(slot) for slot in range(every.count)]
    for pid in await asyncio.to_thread(identities.processes_of, strays):
        log.warning("killing process %d left under an Offload identity", pid)
    left = await asyncio.to_thread(_kill_identities, strays)
    if left:
        log.error("processes under the runner's identities survived SIGKILL: %s", left)
    for name in await asyncio.to_thread(netns.unused, NETNS_PREFIX, netns_min_age_s):
        log.warning("deleting unused network namespace %s", name)
        try:
            await netns.delete(name)
        except EnvironmentError_ as exc:
            log.error("%s", exc)
    await asyncio.to_thread(cgroups.remove_parent, settings.cgroup_parent, settings.cgroup_root)
    return sorted(env_ids)


PREFIXES = (ENV_PREFIX, BUILDER_PREFIX)  # a builder's teardown keeps its data


def _leftover_env_ids(settings: RunnerSettings) -> set[str]:
    found: set[str] = set()
    for directory in (settings.data_dir / "envs", settings.run_dir):
        if directory.is_dir():
            found.update(p.name for p in directory.iterdir() if p.name.startswith(PREFIXES))
    found.update(
        n
        for n in cgroups.children(settings.cgroup_parent, settings.cgroup_root)
        if n.startswith(PREFIXES)
    )
    return found


# ---- engine contents (the heartbeat's view) ---------------------------------------------------


@dataclass(frozen=True)
class EngineContents:
    """What a session's engine holds: a running container is activity (docs/activity.md)."""

    running: int  # running and not paused
    total: int
    images: list[str] = field(default_factory=list)  # repo:tag names, deduplicated, sorted


async def read_contents(env: Environment, timeout_s: float) -> EngineContents:
    """One `GET /containers/json?all=1` on the environment's engine, bounded by `timeout_s`.

    Any Environment has an engine socket, so this works for every driver.  Raises
    EnvironmentError_ when the engine does not answer in time; callers keep what they knew."""
    try:
        async with _engine_client(env.engine_socket, timeout=timeout_s) as client:
            response = await within(client.get("/containers/json", params={"all": "1"}), timeout_s)
        response.raise_for_status()
        containers = response.json()
    except (httpx.HTTPError, TimeoutError, ValueError) as exc:
        raise EnvironmentError_(
            f"The engine of environment {env.id} did not list its containers "
            f"({exc.__class__.__name__}).",
            "Check the environment's dockerd.log on the runner.",
        ) from None
    return contents_of(containers)


def contents_of(containers: list[dict[str, Any]]) -> EngineContents:
    """Counts and image names from an engine's container list (`State` is the API's word)."""
    running = sum(1 for c in containers if c.get("State") == "running")
    names = {image_name(c) for c in containers}
    images = sorted(n for n in names if n)[:MAX_IMAGES_REPORTED]
    return EngineContents(running=running, total=len(containers), images=images)


def image_name(container: dict[str, Any]) -> str | None:
    """`repo:tag` of a container's image; None when the container names its image only by id
    (the image was untagged, or run by id): an id says nothing in the usage insights."""
    ref = str(container.get("Image") or "")
    image_id = str(container.get("ImageID") or "").removeprefix("sha256:")
    bare = ref.removeprefix("sha256:")
    if not ref or ref.startswith("sha256:") or (len(bare) >= 12 and image_id.startswith(bare)):
        return None
    return reference_name(ref)


def reference_name(ref: str) -> str:
    """`repo:tag` of an image reference as a client sent it: `:latest` when it names no tag."""
    if "@" in ref or ":" in ref.rsplit("/", 1)[-1]:
        return ref  # tagged, or pinned by digest
    return ref + ":latest"


# ---- helpers ----------------------------------------------------------------------------------


async def _spawn(sandbox: SandboxSpec, log_file: Path) -> asyncio.subprocess.Process:
    with open(log_file, "ab") as log_out:
        # New session: a Ctrl-C meant for the runner must not reach the engines directly;
        # the runner stops them itself, in order.
        return await asyncio.create_subprocess_exec(
            *sandbox.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_out,
            stderr=asyncio.subprocess.STDOUT,
            env=sandbox.environment(),
            start_new_session=True,
        )


def _sandbox_pid(paths: EnvPaths) -> int:
    """The host pid of the sandbox's first process: its namespaces are the environment's."""
    try:
        return int(paths.child_pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise EnvironmentError_(
            f"rootlesskit did not record the sandbox's process ({exc.__class__.__name__})."
        ) from None


def engine_pid(paths: EnvPaths) -> int | None:
    """The host pid of the environment's dockerd (a child of the sandbox's first process)."""
    try:
        child = int(paths.child_pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition(" (")[2].rpartition(") ")
        if name == "dockerd" and int(rest.split()[1]) == child:
            return int(entry.name)
    return None


def _area_listener(paths: EnvPaths) -> str | None:
    """dockerd's second listener, in the mount area (`ENGINE_SOCKET_IN_MOUNT_AREA`): what a
    container's `-v /var/run/docker.sock` becomes. Skipped, and said, if the path is too long
    for a unix socket (a very deep data directory)."""
    if paths.persistent:
        return None  # a builder: no session's containers bind its socket
    path = str(paths.area_socket)
    if len(path.encode()) > MAX_SOCKET_PATH:
        log.warning(
            "environment %s: %s is too long for a unix socket; containers that mount "
            "/var/run/docker.sock will not reach the engine (use a shorter runner data dir)",
            paths.env_id, path,
        )  # fmt: skip
        return None
    return path


def _engine_client(socket: Path, timeout: float) -> httpx.AsyncClient:
    return engine_client(socket, timeout)


def _check_socket_paths(paths: EnvPaths) -> None:
    if len(os.fsencode(str(paths.socket))) >= MAX_SOCKET_PATH:
        raise EnvironmentError_(
            f"The socket path {paths.socket} is too long for a unix socket (limit ~100 bytes).",
            "Set OFFLOAD_RUNNER_RUN_DIR to a short directory such as /run/offload.",
        )


def _make_dirs(
    paths: EnvPaths, identity: Identity, config: dict[str, Any], ca_bundle: bytes | None
) -> None:
    """The environment's directories: its own ones owned by its identity, the rest root's.

    The identity reaches them through run_dir only (mode 0711 on the way: traversable, not
    listable); data_dir's parents may be closed to it (e.g. under /root). A builder's home may
    be there from its last run: its data-root is kept."""
    kept = paths.persistent
    paths.home.parent.mkdir(parents=True, exist_ok=True)
    paths.run.parent.mkdir(parents=True, exist_ok=True)
    paths.run.parent.chmod(0o711)
    paths.home.mkdir(mode=0o711, exist_ok=kept)
    paths.run.mkdir(mode=0o711)
    owned = (paths.data_root, paths.mount_area, paths.sockets, paths.state_dir, paths.root)
    for directory in owned:
        directory.mkdir(mode=0o700 if directory != paths.mount_area else 0o755, exist_ok=kept)
        os.chown(directory, identity.uid, identity.gid)
    paths.plugins.mkdir(mode=0o755)
    paths.staged_home.mkdir(mode=0o711)
    paths.identity_file.write_text(f"{identity.slot}\n")
    # Our own config: the host's /etc/docker/daemon.json must not shape tenants.
    paths.config_file.write_text(json.dumps(config) + "\n")
    paths.config_file.chmod(0o644)
    if ca_bundle is not None:
        paths.ca_bundle.write_bytes(ca_bundle)
        paths.ca_bundle.chmod(0o644)
    paths.log_file.touch(mode=0o600)


def engine_config(
    env_id: str, operator_config: str, mirrors: tuple[str, ...] = ()
) -> dict[str, Any]:
    """daemon.json: the operator's, plus labels that `docker info` shows (which environment,
    which isolation: what `offload status` and `diagnose` report), and the runner's pull cache
    as the first registry mirror."""
    config: dict[str, Any] = json.loads(operator_config)
    if mirrors:
        theirs = [str(m) for m in config.get("registry-mirrors", []) if m not in mirrors]
        config["registry-mirrors"] = [*mirrors, *theirs]
    # The bridge's MTU as the network helper's tap0: at docker's 1500 a container downloads at
    # half the speed (bench/sandbox.py). The operator's setting wins.
    config.setdefault("mtu", HELPER_MTU)
    labels = [str(label) for label in config.get("labels", [])]
    config["labels"] = [*labels, f"{ENV_LABEL}={env_id}", f"{ISOLATION_LABEL}={ISOLATION}"]
    return config


def gpu_labels(gpu_uuids: Sequence[str], toolkit: Toolkit) -> list[str]:
    """A GPU environment's labels: its GPUs and what serves `--gpus` (`offload diagnose`)."""
    if not gpu_uuids:
        return []
    runtime = "nvidia-container-toolkit" if toolkit.available else GPU_RUNTIME_NONE
    return [f"{ENGINE_GPU_LABEL}={','.join(gpu_uuids)}", f"{ENGINE_GPU_RUNTIME_LABEL}={runtime}"]


def _remove_dirs(paths: EnvPaths) -> None:
    shutil.rmtree(paths.run, ignore_errors=True)
    if not paths.persistent:
        shutil.rmtree(paths.home, ignore_errors=True)


async def wipe_builder(settings: RunnerSettings, env_id: str) -> None:
    """Remove a stopped builder's kept data (its build cache) for good."""
    paths = EnvPaths.of(settings, env_id)
    if paths.persistent and not await asyncio.to_thread(mounts.unmount_under, [paths.home]):
        await asyncio.to_thread(shutil.rmtree, paths.home, True)
        await asyncio.to_thread(shutil.rmtree, paths.exports, True)


def log_tail(log_file: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _create_error(env_id: str, exc: Exception, tail: str) -> EnvironmentError_:
    what = exc.message if isinstance(exc, OffloadError) else f"{exc.__class__.__name__}: {exc}"
    message = f"Could not create environment {env_id}: {what}"
    if tail:
        message += "\n  sandbox log (last lines):\n    " + tail.replace("\n", "\n    ")
    fix = (
        exc.fix
        if isinstance(exc, OffloadError) and exc.fix
        else (
            "Run the runner as root with `apt-get install docker.io rootlesskit slirp4netns "
            "uidmap iptables iproute2` and `scripts/build_pasta.sh`, and read the log lines "
            "above (`offload diagnose` checks the host)."
        )
    )
    return EnvironmentError_(message, fix)

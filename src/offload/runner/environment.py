"""`DockerdDriver`: one dedicated `dockerd` per environment.

Each environment gets its own network namespace (`off-<hex>`), data-root, exec-root, engine
socket and cgroup (`/<cgroup_parent>/<env_id>`, limited to the instance type).  The dockerd
process joins the cgroups before it execs, so the containerd, shims and containers it starts
inherit them; that is also how `destroy` finds every process to kill.

Layout (short paths: unix sockets are limited to 108 bytes):

    data_dir/envs/<id>/data        --data-root
    data_dir/envs/<id>/mounts      mount area: the only bind sources the policy allows
    data_dir/envs/<id>/dockerd.log dockerd's output (no secret goes through it)
    run_dir/<id>/exec              --exec-root
    run_dir/<id>/docker.sock       the engine API
    run_dir/<id>/dockerd.pid       --pidfile (lets a later runner find a stale dockerd)

The directories are the record of an environment: teardown removes them last, so a runner that
died half-way leaves something `cleanup_orphans` can find.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from offload.core.config import RunnerSettings
from offload.core.engine_http import engine_client
from offload.core.errors import EnvironmentError_, OffloadError
from offload.core.schemas import ENGINE_SOCKET_IN_MOUNT_AREA, InstanceSpec
from offload.core.waiting import WaitTimeout, async_wait_until, within
from offload.runner import cgroups, mounts, netns
from offload.runner.cgroups import EnvCgroups
from offload.runner.driver import (
    DriverCapabilities,
    Environment,
    EnvironmentDescription,
    EnvState,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "env-"
NETNS_PREFIX = "off-"
POLICY_PREFIX = "offload-policy-"
PLUGIN_DIR = Path("/run/docker/plugins")
# sun_path holds 108 bytes with its NUL; containerd's ttrpc socket is the longest we create.
MAX_SOCKET_PATH = 100
STOP_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 10.0
# Images named in one heartbeat report (the control plane keeps 100 per session).
MAX_IMAGES_REPORTED = 100
# Joins the cgroups named by its arguments, then execs the rest: a wrapper rather than a
# preexec_fn, which is unsafe in a process with threads (asyncio.to_thread's pool).
JOIN_CGROUPS_AND_EXEC = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 97; shift; n=$((n-1)); done; '
    'exec "$@"'
)


class PolicyLike(Protocol):
    """The runner's authorization plugin for one environment (see `offload.runner.policy`)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


PolicyFactory = Callable[[str, Path], PolicyLike]


def default_policy_factory(name: str, mount_area: Path) -> PolicyLike:
    from offload.runner.policy import PolicyPlugin  # lazy: keeps the driver importable alone

    return PolicyPlugin(name, mount_area)


@dataclass(frozen=True)
class EnvPaths:
    """Where one environment's files live; derived from the settings and its id alone."""

    env_id: str
    home: Path  # data_dir/envs/<id>
    run: Path  # run_dir/<id>

    @classmethod
    def of(cls, settings: RunnerSettings, env_id: str) -> EnvPaths:
        return cls(env_id, settings.data_dir / "envs" / env_id, settings.run_dir / env_id)

    @property
    def data_root(self) -> Path:
        return self.home / "data"

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
    def exec_root(self) -> Path:
        return self.run / "exec"

    @property
    def socket(self) -> Path:
        return self.run / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "dockerd.pid"

    @property
    def netns(self) -> str:
        return NETNS_PREFIX + self.env_id.removeprefix(ENV_PREFIX)

    @property
    def policy_name(self) -> str:
        return POLICY_PREFIX + self.env_id

    @property
    def longest_socket(self) -> Path:
        return self.exec_root / "containerd" / "containerd.sock.ttrpc"


@dataclass
class _Runtime:
    """What the driver holds for an environment it created in this process."""

    paths: EnvPaths
    cgroups: EnvCgroups
    policy: PolicyLike | None = None
    process: asyncio.subprocess.Process | None = None
    # Containers that pause() froze: resume() thaws these and no others.
    paused: list[str] = field(default_factory=list)


class DockerdDriver:
    """EnvironmentDriver with a dedicated dockerd per environment (see module docstring)."""

    capabilities = DriverCapabilities(gpus=0, pause=True)

    def __init__(
        self, settings: RunnerSettings, policy_factory: PolicyFactory | None = None
    ) -> None:
        self.settings = settings
        self._policy_factory = policy_factory or default_policy_factory
        self._runtimes: dict[str, _Runtime] = {}
        self._destroying: dict[str, asyncio.Task[None]] = {}

    # ---- create ------------------------------------------------------------------------------

    async def create(self, spec: InstanceSpec) -> Environment:
        env_id = ENV_PREFIX + secrets.token_hex(5)
        paths = EnvPaths.of(self.settings, env_id)
        _check_socket_paths(paths)
        rt = _Runtime(paths, EnvCgroups(self.settings.cgroup_parent, env_id))
        self._runtimes[env_id] = rt
        started = time.monotonic()
        try:
            await self._start(rt, spec)
        except BaseException as exc:
            tail = await asyncio.to_thread(_log_tail, paths.log_file)
            # Shielded: a cancelled create must still leave nothing behind.
            await asyncio.shield(self._teardown_quietly(env_id))
            if isinstance(exc, Exception):
                raise _create_error(env_id, exc, tail) from None
            raise
        log.info("environment %s ready in %.2fs", env_id, time.monotonic() - started)
        return Environment(
            id=env_id,
            engine_socket=paths.socket,
            mount_area=paths.mount_area,
            netns=paths.netns,
            spec=spec,
        )

    async def _start(self, rt: _Runtime, spec: InstanceSpec) -> None:
        paths = rt.paths
        await asyncio.to_thread(_make_dirs, paths)
        await netns.add(paths.netns)
        procs = await asyncio.to_thread(rt.cgroups.create, spec)
        rt.policy = self._policy_factory(paths.policy_name, paths.mount_area)
        # dockerd checks its authorization plugin at start-up: the plugin must answer first.
        await rt.policy.start()
        rt.process = await self._spawn_dockerd(rt, procs)
        await self._wait_for_engine(rt)

    async def _spawn_dockerd(self, rt: _Runtime, procs: list[Path]) -> asyncio.subprocess.Process:
        paths = rt.paths
        assert rt.policy is not None
        command = [
            "sh", "-c", JOIN_CGROUPS_AND_EXEC, "sh", str(len(procs)), *map(str, procs),
            "nsenter", f"--net={netns.netns_path(paths.netns)}",
            self.settings.dockerd,
            "--config-file", str(paths.config_file),
            "--data-root", str(paths.data_root),
            "--exec-root", str(paths.exec_root),
            "--pidfile", str(paths.pidfile),
            "-H", f"unix://{paths.socket}",
            *_area_listener(paths),
            "--group", "root",
            "--cgroup-parent", rt.cgroups.relative,
            "--authorization-plugin", rt.policy.name,
            "--log-level", "warn",
        ]  # fmt: skip
        with open(paths.log_file, "ab") as log_out:
            # New session: a Ctrl-C meant for the runner must not reach the engines directly;
            # the runner stops them itself, in order.
            return await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    async def _wait_for_engine(self, rt: _Runtime) -> None:
        process = rt.process
        assert process is not None
        async with _engine_client(rt.paths.socket, timeout=2.0) as client:

            async def answers() -> bool:
                if process.returncode is not None:
                    raise EnvironmentError_(
                        f"dockerd exited with status {process.returncode} while starting."
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
        env_cgroups = EnvCgroups(self.settings.cgroup_parent, env.id)
        pids = await asyncio.to_thread(env_cgroups.pids)
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
            await teardown(self.settings, env_id, self._runtimes.get(env_id))
        finally:
            self._runtimes.pop(env_id, None)
            self._destroying.pop(env_id, None)

    async def _teardown_quietly(self, env_id: str) -> None:
        try:
            await self.destroy_id(env_id)
        except OffloadError as exc:
            log.error("cleaning up after a failed create: %s", exc)


# ---- teardown (shared by destroy and cleanup_orphans) -----------------------------------------


async def teardown(settings: RunnerSettings, env_id: str, rt: _Runtime | None = None) -> None:
    """Wipe one environment from whatever state it is in; raise if something stays behind."""
    paths = EnvPaths.of(settings, env_id)
    env_cgroups = EnvCgroups(settings.cgroup_parent, env_id)
    started = time.monotonic()
    problems: list[str] = []
    await _stop_dockerd(paths, rt.process if rt else None, env_cgroups)
    left = await asyncio.to_thread(env_cgroups.kill, False, KILL_TIMEOUT_S)
    if left:
        problems.append(f"processes still alive: {left}")
    stuck = await asyncio.to_thread(mounts.unmount_under, [paths.home, paths.run])
    if stuck:
        problems.append(f"mounts left: {stuck}")
    try:
        await netns.delete(paths.netns)
    except EnvironmentError_ as exc:
        problems.append(exc.message)
    left_cgroups = await asyncio.to_thread(env_cgroups.remove)
    if left_cgroups:
        problems.append(f"cgroups left: {[str(p) for p in left_cgroups]}")
    if not stuck:  # never rm -rf through a mount: it could reach host files
        await asyncio.to_thread(_remove_dirs, paths)
    await _stop_policy(paths, rt.policy if rt else None)
    if problems:
        raise EnvironmentError_(
            f"Environment {env_id} was not fully wiped: {'; '.join(problems)}.",
            "Stop the runner, remove what is listed by hand, then start it again "
            "(it wipes leftovers at start).",
        )
    log.info("environment %s destroyed in %.2fs", env_id, time.monotonic() - started)


async def _stop_dockerd(
    paths: EnvPaths, process: asyncio.subprocess.Process | None, env_cgroups: EnvCgroups
) -> None:
    """SIGTERM, bounded wait, SIGKILL; by our child handle, else by a pidfile we can verify."""
    pid = process.pid if process else _pid_from_pidfile(paths)
    if pid is None or (process is not None and process.returncode is not None):
        return
    if not _signal(pid, signal.SIGTERM):
        return
    # Then the containers (each in a child cgroup): a stopping dockerd would otherwise wait out
    # each one's stop timeout, and once it is stopping it no longer restarts any of them.
    await asyncio.to_thread(env_cgroups.kill, True, KILL_TIMEOUT_S)
    if process is not None:
        try:
            await within(process.wait(), STOP_TIMEOUT_S)
            return
        except TimeoutError:
            pass
    else:
        try:
            await async_wait_until(
                lambda: _async_true(not Path(f"/proc/{pid}").exists()),
                STOP_TIMEOUT_S,
                "dockerd to stop",
            )
            return
        except WaitTimeout:
            pass
    log.warning("dockerd of %s did not stop in %.0fs: killing it", paths.env_id, STOP_TIMEOUT_S)
    _signal(pid, signal.SIGKILL)
    if process is not None:
        await process.wait()


async def _async_true(value: bool) -> bool:
    return value


def _pid_from_pidfile(paths: EnvPaths) -> int | None:
    """The pid in the pidfile, if that process is really this environment's dockerd."""
    try:
        pid = int(paths.pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if os.fsencode(str(paths.pidfile)) in cmdline else None


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


async def _stop_policy(paths: EnvPaths, policy: PolicyLike | None) -> None:
    if policy is not None:
        try:
            await policy.stop()
        except Exception as exc:  # noqa: BLE001 - a plugin failing to stop must not stop the wipe
            log.warning("policy plugin %s did not stop cleanly: %s", policy.name, exc)
    # A previous runner process's plugin leaves its socket/spec behind when it dies.
    for stale in PLUGIN_DIR.glob(f"{paths.policy_name}.*") if PLUGIN_DIR.is_dir() else []:
        stale.unlink(missing_ok=True)


# ---- orphans ----------------------------------------------------------------------------------


async def cleanup_orphans(settings: RunnerSettings, netns_min_age_s: float = 60.0) -> list[str]:
    """Wipe what a previous runner process left: envs, stale dockerd, netns, cgroups.

    Environments are found by their directories and cgroups.  `off-*` namespaces that no process
    uses and that are older than `netns_min_age_s` go too (the age keeps a namespace another
    runner has just created).  Returns the environment ids wiped.
    """
    env_ids = await asyncio.to_thread(_leftover_env_ids, settings)
    for env_id in sorted(env_ids):
        log.warning("wiping environment %s left by a previous runner", env_id)
        try:
            await teardown(settings, env_id)
        except EnvironmentError_ as exc:
            log.error("%s", exc)
    for name in await asyncio.to_thread(netns.unused, NETNS_PREFIX, netns_min_age_s):
        log.warning("deleting unused network namespace %s", name)
        try:
            await netns.delete(name)
        except EnvironmentError_ as exc:
            log.error("%s", exc)
    await asyncio.to_thread(cgroups.remove_parent, settings.cgroup_parent)
    return sorted(env_ids)


def _leftover_env_ids(settings: RunnerSettings) -> set[str]:
    found: set[str] = set()
    for directory in (settings.data_dir / "envs", settings.run_dir):
        if directory.is_dir():
            found.update(p.name for p in directory.iterdir() if p.name.startswith(ENV_PREFIX))
    found.update(n for n in cgroups.children(settings.cgroup_parent) if n.startswith(ENV_PREFIX))
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


# sun_path holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107


def _area_listener(paths: EnvPaths) -> list[str]:
    """dockerd's second listener, in the mount area (`ENGINE_SOCKET_IN_MOUNT_AREA`): what a
    container's `-v /var/run/docker.sock` becomes. Skipped, and said, if the path is too long
    for a unix socket (a very deep data directory)."""
    path = str(paths.mount_area / ENGINE_SOCKET_IN_MOUNT_AREA)
    if len(path.encode()) > MAX_SOCKET_PATH:
        log.warning(
            "environment %s: %s is too long for a unix socket; containers that mount "
            "/var/run/docker.sock will not reach the engine (use a shorter runner data dir)",
            paths.env_id, path,
        )  # fmt: skip
        return []
    return ["-H", f"unix://{path}"]


def _engine_client(socket: Path, timeout: float) -> httpx.AsyncClient:
    return engine_client(socket, timeout)


def _check_socket_paths(paths: EnvPaths) -> None:
    for path in (paths.socket, paths.longest_socket):
        if len(os.fsencode(str(path))) >= MAX_SOCKET_PATH:
            raise EnvironmentError_(
                f"The socket path {path} is too long for a unix socket (limit ~100 bytes).",
                "Set OFFLOAD_RUNNER_RUN_DIR to a short directory such as /run/offload.",
            )


def _make_dirs(paths: EnvPaths) -> None:
    for directory in (paths.data_root, paths.mount_area, paths.exec_root):
        directory.mkdir(parents=True, exist_ok=True)
    paths.home.chmod(0o700)
    paths.run.chmod(0o700)
    # An empty config of our own: the host's /etc/docker/daemon.json must not shape tenants.
    paths.config_file.write_text("{}\n")


def _remove_dirs(paths: EnvPaths) -> None:
    for directory in (paths.run, paths.home):
        shutil.rmtree(directory, ignore_errors=True)


def _log_tail(log_file: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _create_error(env_id: str, exc: Exception, tail: str) -> EnvironmentError_:
    what = exc.message if isinstance(exc, OffloadError) else f"{exc.__class__.__name__}: {exc}"
    message = f"Could not create environment {env_id}: {what}"
    if tail:
        message += "\n  dockerd log (last lines):\n    " + tail.replace("\n", "\n    ")
    fix = (
        exc.fix
        if isinstance(exc, OffloadError) and exc.fix
        else (
            "Run the runner as root on a host with cgroup v1, `apt-get install docker.io iproute2` "
            "(dockerd, nsenter, ip), and read the dockerd log lines above."
        )
    )
    return EnvironmentError_(message, fix)

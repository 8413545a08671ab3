"""`offload runner`: the runner daemon.

Start-up: check the host (root, dockerd, rootlesskit, pasta or slirp4netns, uidmap, iptables, user
namespaces, cgroups), install the egress rules of the sandboxes, wipe what a previous runner
process left, load (or create) the SSH host key, start warming environments, register with the
control plane (retrying while it is unreachable), then serve the SSH endpoint.

Then two loops:

- the heartbeat: a long poll that carries the pool's report (per bound environment: running
  containers, containers, containers created since bind, images) and brings back the sessions
  the control plane wants here (`RunnerDesired`).  Each session's allowed client key is handed
  to the SSH endpoint at once.
- the reconciler: applies the latest desired list to the pool (unlisted sessions wiped, new ones
  bound, environments paused while their session is `paused`) and reports each newly bound
  session ready once.  It runs apart from the heartbeat so that a slow wipe or create never
  delays the reports that carry other sessions' activity.

Cadence.  A running container is activity, and the control plane stamps it when a heartbeat
*arrives*; it then holds the poll up to `heartbeat_wait_s` (15 s) unless something changes.  The
shortest idle timeout is 10 s, so while any bound environment is not paused (its session is
active: a container may start or run in it at any moment) the poll asks for `ACTIVE_WAIT_S` (4 s)
instead.  Reports are then at most ~4 s + the engine query bound (2 s) + a round trip apart,
well inside 10 s.  With every session idle or none bound, the runner long-polls for the full wait
(nothing it holds is activity; the control plane wakes the poll on any change).

The SSH endpoint binds on a session's first connection too; binding is idempotent, so whichever
comes first wins.  A control plane that restarts or forgets this runner is waited for and
registered with again; a registration ends the sessions whose engines this runner held (see
`offload.server.services.runners`), and the reconciler then wipes them here too.  SIGTERM/SIGINT
stop the loops and wipe every environment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncssh

from offload.core.api_client import RunnerClient
from offload.core.config import RunnerSettings
from offload.core.errors import (
    Conflict,
    EnvironmentError_,
    InvalidInput,
    NotAuthenticated,
    NotFound,
    OffloadError,
    PermissionDenied,
    Unreachable,
)
from offload.core.schemas import (
    AssignedSession,
    GpuDevice,
    InstanceType,
    Role,
    RunnerDesired,
    RunnerHeartbeat,
    RunnerRegister,
)
from offload.core.waiting import wait_event
from offload.runner import cgroups, host_checks
from offload.runner.builder_proxy import BuildRoute, disk_nearly_full
from offload.runner.builders import BuilderPool
from offload.runner.driver import Environment
from offload.runner.egress import EgressFirewall
from offload.runner.environment import EnvPaths, RootlessDriver, cleanup_orphans, identity_range
from offload.runner.export_cache import ExportCache
from offload.runner.gpus import GpuInventory, Toolkit, find_toolkit, load_gpus
from offload.runner.image_transfer import move_image, prune_replaced, sync_tags
from offload.runner.pool import EnvironmentPool
from offload.runner.pull_cache import PullCache
from offload.runner.registry_trust import EngineRegistries, engine_bundle

if TYPE_CHECKING:
    from offload.runner.ssh_endpoint import SSHEndpoint

log = logging.getLogger("offload.runner")

T = TypeVar("T")

HOST_KEY_FILE = "ssh_host_ed25519_key"
# Errors that waiting does not cure: the operator must fix the configuration.
FATAL_AT_REGISTRATION = (NotAuthenticated, PermissionDenied, InvalidInput)
# Long-poll wait while a bound environment is not paused: below the shortest idle timeout (10 s)
# with room for the engine queries and a round trip (see the module docstring).
ACTIVE_WAIT_S = 4.0


# ---- start-up checks ----------------------------------------------------------------------------


def check_prerequisites(settings: RunnerSettings) -> None:
    """Refuse to start on a host where environments cannot work; each error names its fix."""
    if os.geteuid() != 0:
        raise EnvironmentError_(
            "The runner must run as root: it creates sandboxes, cgroups and egress rules.",
            "Start it as root (sudo, or a systemd unit without User=).",
        )
    if not settings.token:
        raise NotAuthenticated(
            "No runner token is configured.",
            "Set OFFLOAD_RUNNER_TOKEN to a runner token (`offload up` creates one for the "
            "embedded default).",
        )
    problems = host_checks.problems(settings)
    if problems:
        raise problems[0]
    identity_range(settings).check()
    for warning in host_checks.prepare(settings):
        log.warning("%s", warning)


def egress_firewall(
    settings: RunnerSettings, services: Sequence[tuple[str, int]] = ()
) -> EgressFirewall:
    """The sandboxes' egress rules: one chain per identity range, so runners with their own
    ranges (tests, several runners on one host) never touch each other's rules. `services`:
    the runner's own that sandboxes may reach (its pull cache)."""
    return EgressFirewall(
        identity_range(settings).uids,
        allow=[settings.egress_allow] if settings.egress_allow.strip() else [],
        chain=f"OFFLOAD-{settings.identity_uid_base}",
        services=services,
    )


async def start_pull_cache(
    settings: RunnerSettings, ca_bundle: bytes | None = None
) -> PullCache | None:
    if not settings.pull_cache:
        return None
    cache = PullCache(settings, ca_bundle)
    try:
        await cache.start()
    except EnvironmentError_ as exc:
        # A runner without its cache still serves sessions: pulls go to their registries.
        log.warning("pull cache not started, engines pull directly: %s", exc)
        return None
    return cache


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The SSH endpoint's host key; created (ed25519, mode 0600) on first start."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            log.warning("host key %s was readable by others: mode set to 0600", path)
            path.chmod(0o600)
        return asyncssh.read_private_key(path)
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 from the start: no moment where the key is readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.export_private_key())
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key())
    log.info("created SSH host key %s", path)
    return key


# ---- backoff ------------------------------------------------------------------------------------


class Backoff:
    """Exponential delays between retries, reset by a success."""

    def __init__(self, initial_s: float = 0.5, max_s: float = 10.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._next = initial_s

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next = self.initial_s


async def sleep_or_stop(stop: asyncio.Event, delay_s: float) -> bool:
    """Wait `delay_s` unless `stop` is set first; True when stopping."""
    return await wait_event(stop, delay_s)


async def until_stop(stop: asyncio.Event, call: Awaitable[T]) -> T | None:
    """Await `call`, or give up on it (cancelled) when `stop` is set; None when stopped."""
    task = asyncio.ensure_future(call)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


# ---- the runner ---------------------------------------------------------------------------------


class Runner:
    """This runner as the control plane sees it: registration, heartbeat, session binding."""

    def __init__(
        self,
        settings: RunnerSettings,
        client: RunnerClient,
        pool: EnvironmentPool,
        host_key: asyncssh.SSHKey,
        backoff: Backoff | None = None,
        active_wait_s: float = ACTIVE_WAIT_S,
        builders: BuilderPool | None = None,
        gpus: GpuInventory | None = None,
    ) -> None:
        self.settings = settings
        self.gpus = gpus or GpuInventory.empty()
        self.active_wait_s = active_wait_s
        self.client = client
        self.pool = pool
        self.host_key = host_key
        self.backoff = backoff or Backoff()
        self.runner_id: str | None = None
        self.ca_public_key = ""
        self.endpoint: SSHEndpoint | None = None
        self._reported: set[str] = set()  # sessions whose environment the control plane knows
        # The reconciler's input: the latest desired list, and a flag that it changed.
        self._latest: RunnerDesired | None = None
        self._pending = asyncio.Event()
        self.builders = builders
        self._assigned: dict[str, AssignedSession] = {}  # the latest word on each session

    # ---- registration ----------------------------------------------------------------------

    def registration(self, gpu_devices: list[GpuDevice] | None = None) -> RunnerRegister:
        """What the runner tells the control plane of itself; `gpu_devices`: its GPUs as
        `gpu_devices()` samples them (none given: none offered)."""
        devices = gpu_devices or []
        types = [InstanceType.STANDARD] + ([InstanceType.GPU] if devices else [])
        return RunnerRegister(
            name=self.settings.name,
            ssh_host=self.settings.ssh_host,
            ssh_port=self.endpoint.port if self.endpoint else self.settings.ssh_port,
            host_key=self.host_key.export_public_key().decode().strip(),
            capacity=self.settings.capacity,
            instance_types=types,
            gpus=len(devices),
            gpu_devices=devices,
        )

    async def gpu_devices(self) -> list[GpuDevice]:
        """The GPUs offered, utilisation sampled now (NVML calls: in a thread)."""
        if not len(self.gpus):
            return []
        return await asyncio.to_thread(self.gpus.devices, self.pool.warm_gpus())

    async def register(self, stop: asyncio.Event) -> bool:
        """Register, retrying while the control plane is unreachable; False if stopped first."""
        backoff = Backoff(self.backoff.initial_s, self.backoff.max_s)
        while not stop.is_set():
            try:
                registration = self.registration(await self.gpu_devices())
                registered = await until_stop(stop, self.client.register(registration))
            except FATAL_AT_REGISTRATION:
                raise
            except OffloadError as exc:
                delay = backoff.next()
                log.warning("registration failed: %s Retrying in %.1fs.", exc.message, delay)
                if await sleep_or_stop(stop, delay):
                    return False
                continue
            if registered is None:
                return False
            self.runner_id = registered.id
            self.ca_public_key = registered.ca_public_key
            self._reported.clear()  # a new registration: tell it again what is bound
            log.info("registered with %s as runner %s", self.settings.server_url, registered.id)
            return True
        return False

    # ---- the SSH endpoint's view -----------------------------------------------------------

    async def resolve(self, session_id: str) -> Environment:
        """The environment of a live session assigned here (NotFound otherwise)."""
        if self.runner_id is None:
            raise Unreachable(
                "This runner is not registered with its control plane yet.",
                "Try again in a few seconds.",
            )
        assigned = await self.client.assigned_session(self.runner_id, session_id)
        self._assigned[session_id] = assigned
        if self.endpoint is not None:  # the freshest word on which key holds the session
            await self.endpoint.set_client_key(session_id, assigned.client_key_fingerprint)
        env = await self.pool.bind(assigned)
        await self.pool.follow_state(assigned)
        await self._report_ready(session_id, env)
        return env

    async def build_route(self, session_id: str) -> BuildRoute:
        """Where the session's builds go: its organisation's builder, or (no builder slot) its
        own engine."""
        env = await self.resolve(session_id)
        assigned = self._assigned[session_id]
        work_dir = self.settings.data_dir / "transfers"
        limit = assigned.builder_keep_storage_bytes
        builder: Environment | None = None
        if self.builders is not None:
            try:
                builder = await self.builders.for_org(assigned.org, limit)
                self.builders.acquire(builder.id, session_id)
            except OffloadError as exc:
                log.warning("builds of %s run on its session's engine: %s", assigned.org, exc)
        pool = self.builders
        exports = ExportCache(
            EnvPaths.of(self.settings, (builder or env).id).exports,
            self.settings.builder_export_cache_mb * 1024**2 if builder else 0,
        )

        async def move(image_id: str, tags: list[str]) -> str:
            assert builder is not None and pool is not None
            async with pool.transfer_lock(builder.id):
                moved = await move_image(
                    builder.engine_socket, env.engine_socket, image_id, tags, work_dir, exports
                )
                await prune_replaced(builder.engine_socket)
            return moved.describe()

        async def prune_exports() -> None:
            if pool is not None and builder is not None:
                async with pool.transfer_lock(builder.id):
                    await asyncio.to_thread(exports.clear)

        async def prepare() -> None:
            assert builder is not None and pool is not None
            async with pool.transfer_lock(builder.id):
                await sync_tags(env.engine_socket, builder.engine_socket, work_dir)

        async def status() -> dict[str, Any]:
            if pool is None or builder is None:
                return {"org": assigned.org, "running": False}
            usage = await pool.usage(assigned.org, limit)
            return {"org": assigned.org, "running": True, **dataclasses.asdict(usage)}

        return BuildRoute(
            org=assigned.org,
            builder_socket=(builder or env).engine_socket,
            session_socket=env.engine_socket,
            is_owner=assigned.org_role is Role.OWNER,
            work_dir=work_dir,
            move=move if builder is not None else None,
            status=status,
            prepare=prepare if builder is not None else None,
            prune_exports=prune_exports,
            release=partial(pool.release, builder.id) if pool and builder else lambda: None,
            disk_full=(
                partial(disk_nearly_full, EnvPaths.of(self.settings, builder.id).data_root)
                if builder
                else lambda: False
            ),
        )

    # ---- heartbeat -------------------------------------------------------------------------

    async def heartbeat_loop(self, stop: asyncio.Event) -> None:
        """Long-poll the control plane until `stop`, survive its restarts; the reconciler runs
        beside it (see the module docstring)."""
        reconciler = asyncio.create_task(self._reconcile_loop(), name="runner-reconcile")
        try:
            await self._poll_loop(stop)
        finally:
            reconciler.cancel()
            await asyncio.gather(reconciler, return_exceptions=True)

    async def _poll_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff(self.backoff.initial_s, self.backoff.max_s)
        while not stop.is_set():
            try:
                desired = await until_stop(stop, self._heartbeat())
                if desired is None:
                    return
                backoff.reset()
                await self.receive(desired)
            except NotFound:
                log.warning("the control plane does not know runner %s: registering again",
                            self.runner_id)  # fmt: skip
                if not await self.register(stop):
                    return
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                delay = backoff.next()
                what = exc.message if isinstance(exc, OffloadError) else repr(exc)
                log.warning("heartbeat failed: %s Retrying in %.1fs.", what, delay)
                if not isinstance(exc, OffloadError):
                    log.debug("heartbeat failure", exc_info=True)
                if await sleep_or_stop(stop, delay):
                    return

    def poll_wait(self) -> float:
        """How long the control plane may hold this heartbeat (see the module docstring)."""
        wait = self.settings.heartbeat_wait_s
        if self.pool.serving_active_sessions():
            wait = min(wait, self.active_wait_s)
        return wait

    async def _heartbeat(self) -> RunnerDesired:
        assert self.runner_id is not None
        wait = self.poll_wait()  # decided before the survey: the survey may take a moment
        report = await self.pool.survey()
        if self.builders is not None:
            report = self._with_build_seconds(report, self.builders)
        if len(self.gpus):
            report = report.model_copy(update={"gpu_devices": await self.gpu_devices()})
        desired = await self.client.heartbeat(self.runner_id, report, wait_s=wait)
        self.pool.acknowledge(report)  # recorded: what it carried need not be sent again
        return desired

    @staticmethod
    def _with_build_seconds(report: RunnerHeartbeat, builders: BuilderPool) -> RunnerHeartbeat:
        """Each bound environment's report with its session's builder time so far."""
        environments = [
            env.model_copy(
                update={"build_seconds": round(builders.build_seconds(env.session_id), 3)}
            )
            if env.session_id
            else env
            for env in report.environments
        ]
        return report.model_copy(update={"environments": environments})

    async def receive(self, desired: RunnerDesired) -> None:
        """Take a desired list: client keys at once (a takeover drops the old machine's
        connections now), the rest for the reconciler."""
        self.ca_public_key = desired.ca_public_key
        if self.endpoint is not None:
            for session in desired.sessions:
                await self.endpoint.set_client_key(
                    session.session_id, session.client_key_fingerprint
                )
        self._latest = desired
        self._pending.set()

    async def _reconcile_loop(self) -> None:
        """Apply the latest desired list whenever one arrives; a failure waits for the next."""
        while True:
            await self._pending.wait()
            self._pending.clear()
            desired = self._latest
            if desired is None:
                continue
            try:
                await self.apply(desired)
            except Exception as exc:  # noqa: BLE001 - the next desired list tries again
                what = exc.message if isinstance(exc, OffloadError) else repr(exc)
                log.error("reconcile failed: %s", what)

    async def apply(self, desired: RunnerDesired) -> None:
        """Hold what the control plane wants: wipe the rest, bind and report the new."""
        self.ca_public_key = desired.ca_public_key
        before = {env.session_id for env in self.pool.bound()}
        await self.pool.reconcile(desired.sessions)
        after = {env.session_id: env for env in self.pool.bound() if env.session_id}
        for session_id in before - after.keys():
            if session_id and self.builders is not None:
                self.builders.forget(session_id)
            if session_id and self.endpoint is not None:
                await self.endpoint.disconnect(session_id)
        self._reported &= after.keys()
        for session_id, env in after.items():
            await self._report_ready(session_id, env)
        if self.builders is not None:
            await self.builders.stop_idle()

    async def _report_ready(self, session_id: str, env: Environment) -> None:
        """Tell the control plane once per session; failures are retried on the next beat."""
        if session_id in self._reported or self.runner_id is None:
            return
        try:
            await self.client.session_ready(self.runner_id, session_id, env.id)
        except Conflict as exc:
            # The control plane holds another environment for it (e.g. from before a runner
            # restart): retrying cannot help, the next heartbeat decides.
            log.error("session %s: %s", session_id, exc.message)
        except OffloadError as exc:
            log.warning("could not report session %s ready: %s", session_id, exc.message)
            return
        self._reported.add(session_id)


# ---- entry points -------------------------------------------------------------------------------


async def run_runner(settings: RunnerSettings, stop: asyncio.Event | None = None) -> None:
    """Run the runner until `stop` is set; every environment is wiped on the way out."""
    stop = stop or asyncio.Event()
    await asyncio.to_thread(check_prerequisites, settings)
    gpus = await asyncio.to_thread(load_gpus, settings)
    try:
        toolkit = await asyncio.to_thread(find_toolkit, settings.gpu_hook_dir)
        if len(gpus):
            log.info("GPU containers (`docker run --gpus`): %s", toolkit.describe())
            if not toolkit.available:
                log.warning(
                    "GPUs are offered but nvidia-container-runtime-hook is not found under "
                    "/usr: GPU sessions get their device nodes, and `docker run --gpus` in them "
                    "fails. Install nvidia-container-toolkit or set OFFLOAD_RUNNER_GPU_HOOK_DIR."
                )
        await cleanup_orphans(settings, gpus=gpus)
        ca_bundle = await asyncio.to_thread(engine_bundle, settings.registry_ca)  # checked first
        cache = await start_pull_cache(settings, ca_bundle)
        mirrors = (cache.mirror_url,) if cache is not None else ()
        try:
            registries = EngineRegistries(mirrors, ca_bundle)
            await _serve(settings, stop, cache, registries, gpus, toolkit)
        finally:
            if cache is not None:
                await cache.stop()
    finally:
        await asyncio.to_thread(gpus.close)


async def _serve(
    settings: RunnerSettings,
    stop: asyncio.Event,
    cache: PullCache | None,
    registries: EngineRegistries,
    gpus: GpuInventory,
    toolkit: Toolkit,
) -> None:
    egress = egress_firewall(settings, [(cache.address, cache.port)] if cache else [])
    await egress.install()
    host_key = await asyncio.to_thread(load_or_create_host_key, settings.data_dir / HOST_KEY_FILE)
    driver = RootlessDriver(settings, registries=registries, gpus=gpus, toolkit=toolkit)
    pool = EnvironmentPool(
        driver, settings.pool_size, settings.capacity, gpus=gpus.uuids, warm_gpu=settings.warm_gpu
    )
    builders = BuilderPool(settings, driver)
    client = RunnerClient(settings.server_url, settings.token)
    runner = Runner(settings, client, pool, host_key, builders=builders, gpus=gpus)
    try:
        await pool.start()  # warming overlaps with registration
        if not await runner.register(stop):
            return
        runner.endpoint = await _start_endpoint(settings, runner, host_key)
        log.info(
            "runner %s serving SSH on %s:%s (capacity %d, warm pool %d, GPUs %d, warm GPU %d)",
            settings.name, settings.ssh_listen_host, runner.endpoint.port,
            settings.capacity, settings.pool_size, len(gpus), settings.warm_gpu,
        )  # fmt: skip
        await runner.heartbeat_loop(stop)
    finally:
        log.info("runner stopping: wiping every environment")
        if runner.endpoint is not None:
            await runner.endpoint.stop()
        await builders.close()  # their caches stay on disk
        await pool.close()
        await client.aclose()
        await asyncio.to_thread(cgroups.remove_parent, settings.cgroup_parent, settings.cgroup_root)
        # No environment is left: its rules can go (the next start installs them again).
        await egress.uninstall()
        log.info("runner stopped")


async def _start_endpoint(
    settings: RunnerSettings, runner: Runner, host_key: asyncssh.SSHKey
) -> SSHEndpoint:
    from offload.runner.ssh_endpoint import SSHEndpoint  # lazy: asyncssh server side only here

    endpoint = SSHEndpoint(
        settings.ssh_listen_host,
        settings.ssh_port,
        host_key,
        ca_public_key=lambda: runner.ca_public_key,
        resolve=runner.resolve,
        build_route=runner.build_route,
    )
    try:
        await endpoint.start()
    except OSError as exc:
        raise EnvironmentError_(
            f"The SSH endpoint cannot listen on {settings.ssh_listen_host}:{settings.ssh_port}: "
            f"{exc.strerror or exc}.",
            "Free the port or set OFFLOAD_RUNNER_SSH_PORT to another one.",
        ) from None
    return endpoint


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per request or SSH packet is noise at INFO.
    for noisy in ("httpx", "httpcore", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def _serve_until_signalled(settings: RunnerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_runner(settings, stop)


def main(settings: RunnerSettings | None = None) -> None:
    """`offload runner`: run in the foreground until SIGTERM/SIGINT, then wipe and exit."""
    configure_logging()
    try:
        asyncio.run(_serve_until_signalled(settings or RunnerSettings()))
    except OffloadError as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)

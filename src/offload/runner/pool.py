"""The runner's environments: a warm pool, and the binding of environments to sessions.

Warm environments (of `warm_type`) are created ahead so that a session gets an engine in well
under a second.  Binding is idempotent per session: the SSH endpoint (first connection) and the
heartbeat (control plane's desired list) may both ask, concurrently, and get the same environment.
`capacity` bounds everything the runner holds: warm + bound + being created.

GPU sessions: the control plane assigns each one specific GPUs (`AssignedSession.gpu_uuids`),
and the environment is made for them: its engine sees those and no others.  Up to `warm_gpu`
GPU environments are kept warm, each holding one free GPU; a GPU session takes the warm one that
holds its GPU, else gets a new one.  A GPU is held by one environment at most, ever: every
environment holding a GPU is created under that GPU's lock, and one still bound to another
session keeps a new session off it (refused until that environment is wiped).

The pool also says what each bound environment's engine holds (`survey`, for the heartbeat):
running containers are activity on the control plane, so a slow engine must not hold the
heartbeat back, and a timeout must not make running containers look stopped.  Beside that
snapshot, each bound environment's event stream (`engine_events`) counts every container created
and the images they used, so a container that lives less than one survey (`docker run --rm`)
still reaches the usage insights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from offload.core.errors import Conflict, EnvironmentError_, NoCapacity, OffloadError
from offload.core.schemas import (
    INSTANCE_SPECS,
    AssignedSession,
    EnvironmentReport,
    InstanceSpec,
    InstanceType,
    RunnerHeartbeat,
)
from offload.runner.driver import Environment, EnvironmentDriver, EnvState
from offload.runner.engine_events import EngineEvents, EventTally
from offload.runner.environment import MAX_IMAGES_REPORTED, EngineContents, read_contents

log = logging.getLogger(__name__)

T = TypeVar("T")
SpecFor = Callable[[InstanceType], InstanceSpec]
ReadContents = Callable[[Environment, float], Awaitable[EngineContents]]
EventsFor = Callable[[Environment], EngineEvents]
# Per engine, per heartbeat: the heartbeat carries activity and must not wait on a stuck engine.
ENGINE_QUERY_TIMEOUT_S = 2.0


def _default_spec_for(instance_type: InstanceType) -> InstanceSpec:
    return INSTANCE_SPECS[instance_type]


def _default_events_for(env: Environment) -> EngineEvents:
    return EngineEvents(env.id, env.engine_socket)


class EnvironmentPool:
    def __init__(
        self,
        driver: EnvironmentDriver,
        size: int,
        capacity: int,
        spec_for: SpecFor = _default_spec_for,
        warm_type: InstanceType = InstanceType.STANDARD,
        read_contents: ReadContents = read_contents,
        events_for: EventsFor = _default_events_for,
        gpus: Sequence[str] = (),
        warm_gpu: int = 0,
    ) -> None:
        self.driver = driver
        self.gpus = list(gpus)  # UUIDs of the GPUs the runner offers
        self.warm_gpu = warm_gpu
        self._warm_gpu: dict[str, Environment] = {}  # GPU uuid -> the warm environment holding it
        self._gpu_locks = {uuid: asyncio.Lock() for uuid in self.gpus}
        self._read_contents = read_contents
        self._events_for = events_for
        self.size = size
        self.capacity = capacity
        self.spec_for = spec_for
        self.warm_type = warm_type
        self._warm: list[Environment] = []
        self._bound: dict[str, Environment] = {}
        self._creating = 0
        # Last known contents per bound environment id: what a heartbeat reports for an engine
        # that does not answer in time.
        self._contents: dict[str, EngineContents] = {}
        # Event stream per bound environment id, from bind to release.
        self._events: dict[str, EngineEvents] = {}
        self._closed = False
        self._fill_task: asyncio.Task[None] | None = None
        # One lock per session id, alive while someone holds or waits on it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin filling the warm pool in the background."""
        self._schedule_fill()

    async def close(self) -> None:
        """Stop filling and destroy every environment, warm and bound."""
        self._closed = True
        if self._fill_task is not None:
            self._fill_task.cancel()
            await asyncio.gather(self._fill_task, return_exceptions=True)
        envs = self._warm + list(self._warm_gpu.values()) + list(self._bound.values())
        self._warm.clear()
        self._warm_gpu.clear()
        self._bound.clear()
        await self._stop_events(list(self._events))
        await asyncio.gather(*(self._destroy(env) for env in envs))

    # ---- sessions ----------------------------------------------------------------------------

    def get(self, session_id: str) -> Environment | None:
        return self._bound.get(session_id)

    def bound(self) -> list[Environment]:
        return list(self._bound.values())

    def warm_gpus(self) -> set[str]:
        """UUIDs of the GPUs that warm environments hold."""
        return set(self._warm_gpu)

    async def bind(self, session: AssignedSession) -> Environment:
        """The session's environment: the one it has, else a warm one, else a new one."""
        async with self._lock(session.session_id):
            env = self._bound.get(session.session_id)
            if env is not None:
                return env
            if session.gpu_uuids or session.instance_type is InstanceType.GPU:
                env = await self._gpu_environment(session)
            else:
                env = self._take_warm(session.instance_type) or await self._create(
                    session.instance_type
                )
            if self._closed:  # close() ran while we were creating: it cannot see this one
                await self._destroy(env)
                raise NoCapacity("The runner is shutting down.", "Start the session again.")
            env.session_id = session.session_id
            env.state = EnvState.BOUND
            self._bound[session.session_id] = env
            self._events[env.id] = events = self._events_for(env)
            events.start()
        log.info("session %s bound to environment %s", session.session_id, env.id)
        self._schedule_fill()
        return env

    async def _gpu_environment(self, session: AssignedSession) -> Environment:
        """An environment holding exactly the session's GPUs: the warm one, else a new one."""
        uuids = list(dict.fromkeys(session.gpu_uuids))
        if not uuids:
            raise EnvironmentError_(
                f"Session {session.session_id} is a GPU session but has no GPU assigned.",
                "The control plane assigns one when it places the session: end the session "
                "(`offload stop`) and start again.",
            )
        foreign = [uuid for uuid in uuids if uuid not in self._gpu_locks]
        if foreign:
            raise EnvironmentError_(
                f"Session {session.session_id} was assigned GPU(s) {', '.join(foreign)}, which "
                f"this runner does not offer (it offers: {', '.join(self.gpus) or 'none'}).",
                "End the session and start again; restart the runner if it persists (its "
                "registration tells the control plane its GPUs).",
            )
        async with contextlib.AsyncExitStack() as held:
            for uuid in sorted(uuids):  # one order: two binds never wait on each other
                await held.enter_async_context(self._gpu_locks[uuid])
            for env in self._bound.values():
                taken = sorted(set(env.gpu_uuids) & set(uuids))
                if taken:
                    raise Conflict(
                        f"GPU {taken[0]} is still held by the environment of session "
                        f"{env.session_id}.",
                        "It is free once that session's environment is wiped; try again in a "
                        "moment.",
                    )
            if len(uuids) == 1 and session.instance_type is InstanceType.GPU:
                warm = self._warm_gpu.pop(uuids[0], None)
                if warm is not None:
                    return warm
            for uuid in uuids:  # a warm environment holding one of them gives way
                stale = self._warm_gpu.pop(uuid, None)
                if stale is not None:
                    await self._destroy(stale)
            return await self._create(session.instance_type, uuids)

    async def release(self, session_id: str) -> None:
        """Destroy the session's environment (nothing of it survives)."""
        async with self._lock(session_id), contextlib.AsyncExitStack() as gpus:
            env = self._bound.get(session_id)
            # Its GPUs stay locked until it is gone: a bind of the next session on one of them
            # waits for the wipe (which kills what still runs on the GPU) instead of racing it.
            for uuid in sorted(env.gpu_uuids if env is not None else ()):
                if uuid in self._gpu_locks:
                    await gpus.enter_async_context(self._gpu_locks[uuid])
            env = self._bound.pop(session_id, None)
            if env is not None:
                self._contents.pop(env.id, None)
                await self._stop_events([env.id])  # before the engine goes: no reconnect loop
                log.info("session %s ended: destroying environment %s", session_id, env.id)
                await self._destroy(env)
        self._schedule_fill()

    async def reconcile(self, desired: list[AssignedSession]) -> list[Environment]:
        """Make the held environments match the control plane's list; return newly bound ones.

        Environments of sessions absent or no longer live are destroyed; live sessions lacking
        one get one; each environment follows its session's `paused` flag.
        """
        live = {s.session_id: s for s in desired if s.state.live}
        for session_id in [sid for sid in self._bound if sid not in live]:
            await self._guarded(f"release {session_id}", self.release(session_id))
        newly: list[Environment] = []
        for session in live.values():
            if session.session_id not in self._bound:
                env = await self._guarded(f"bind {session.session_id}", self.bind(session))
                if env is not None:
                    newly.append(env)
            await self._guarded(f"pause/resume {session.session_id}", self.follow_state(session))
        self._schedule_fill()  # a fill that failed earlier gets another try here
        return newly

    async def follow_state(self, session: AssignedSession) -> None:
        """Pause the environment while `session.paused`, resume it when that turns false.

        `paused` is the one source of truth (the control plane sets it while the session is idle
        within grace).  Idempotent: a paused environment is paused again only if a container
        runs in it anyway (one started meanwhile), and resumed only once."""
        if not self.driver.capabilities.pause:
            return
        async with self._lock(session.session_id):
            env = self._bound.get(session.session_id)
            if env is None:
                return
            if session.paused and (env.state != EnvState.PAUSED or self._seen_running(env)):
                await self.driver.pause(env)
                self._forget_running(env)
            elif not session.paused and env.state == EnvState.PAUSED:
                await self.driver.resume(env)

    def _seen_running(self, env: Environment) -> bool:
        known = self._contents.get(env.id)
        return known is not None and known.running > 0

    def _forget_running(self, env: Environment) -> None:
        known = self._contents.get(env.id)
        if known is not None:  # frozen now; the next survey says what runs
            self._contents[env.id] = EngineContents(0, known.total, known.images)

    def serving_active_sessions(self) -> bool:
        """Some bound environment is not paused: its containers may run (activity) any time."""
        return any(env.state != EnvState.PAUSED for env in self._bound.values())

    @staticmethod
    async def _guarded(what: str, step: Awaitable[T]) -> T | None:
        # One session's failure must not keep the others from being reconciled.
        try:
            return await step
        except OffloadError as exc:
            log.error("reconcile: could not %s: %s", what, exc)
            return None

    def report(self, contents: Mapping[str, EngineContents] | None = None) -> RunnerHeartbeat:
        """The heartbeat body: warm and bound environments, with `contents` per bound env id."""
        contents = contents or {}
        warm = self._warm + list(self._warm_gpu.values())
        envs = [EnvironmentReport(env_id=e.id, session_id=None, state=e.state) for e in warm]
        for sid, env in self._bound.items():
            held = contents.get(env.id)
            events = self._events.get(env.id)
            tally = events.tally() if events is not None else EventTally()
            envs.append(
                EnvironmentReport(
                    env_id=env.id,
                    session_id=sid,
                    state=env.state,
                    running_containers=held.running if held else 0,
                    containers_total=held.total if held else 0,
                    images=_images_to_report(held.images if held else [], tally.images),
                    containers_created=tally.created,
                )
            )
        return RunnerHeartbeat(capacity=self.capacity, warm=len(warm), environments=envs)

    def acknowledge(self, sent: RunnerHeartbeat) -> None:
        """The control plane answered the heartbeat `sent`: the images it carried were recorded
        and need not wait for the next one (`created` is a running total: nothing to clear)."""
        for report in sent.environments:
            events = self._events.get(report.env_id)
            if events is not None and report.session_id is not None:
                events.acknowledge(report.images)

    async def survey(self, timeout_s: float = ENGINE_QUERY_TIMEOUT_S) -> RunnerHeartbeat:
        """The heartbeat body with what each bound engine holds, asked of all at once.

        Each engine gets `timeout_s`; one that does not answer is reported as last seen, so a
        slow engine neither delays the heartbeat nor makes its running containers vanish."""
        bound = list(self._bound.values())
        answers = await asyncio.gather(
            *(self._read_contents(env, timeout_s) for env in bound), return_exceptions=True
        )
        for env, answer in zip(bound, answers, strict=True):
            if isinstance(answer, EngineContents):
                if env.session_id in self._bound:  # not released while we asked
                    self._contents[env.id] = answer
            elif isinstance(answer, Exception):
                log.warning("heartbeat: %s", getattr(answer, "message", None) or repr(answer))
            else:
                raise answer  # cancellation and the like are not ours to swallow
        live = {env.id for env in self._bound.values()}
        for env_id in [e for e in self._contents if e not in live]:
            del self._contents[env_id]
        return self.report(self._contents)

    # ---- internals ---------------------------------------------------------------------------

    async def _stop_events(self, env_ids: list[str]) -> None:
        streams = [s for s in (self._events.pop(i, None) for i in env_ids) if s is not None]
        await asyncio.gather(*(events.stop() for events in streams))

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[session_id] = lock
        return lock

    @property
    def _held(self) -> int:
        return len(self._warm) + len(self._warm_gpu) + len(self._bound) + self._creating

    def _gpus_held(self) -> set[str]:
        held = set(self._warm_gpu)
        for env in self._bound.values():
            held.update(env.gpu_uuids)
        return held

    def _take_warm(self, instance_type: InstanceType) -> Environment | None:
        if instance_type != self.warm_type or not self._warm:
            return None
        return self._warm.pop(0)

    async def _create(
        self, instance_type: InstanceType, gpu_uuids: Sequence[str] = ()
    ) -> Environment:
        """A new environment (with `gpu_uuids`: the caller holds those GPUs' locks)."""
        if self._held >= self.capacity:
            await self._make_room()
        if self._closed:
            raise NoCapacity("The runner is shutting down.", "Start the session again.")
        self._creating += 1
        try:
            spec = self.spec_for(instance_type)
            if gpu_uuids:
                return await self.driver.create(spec, gpu_uuids)
            return await self.driver.create(spec)
        finally:
            self._creating -= 1

    async def _make_room(self) -> None:
        """At capacity: a warm environment gives way (a standard one first), else refuse."""
        if self._warm:
            await self._destroy(self._warm.pop())
            return
        for uuid, env in list(self._warm_gpu.items()):
            if not self._gpu_locks[uuid].locked():  # not one a bind is about to take
                del self._warm_gpu[uuid]
                await self._destroy(env)
                return
        raise NoCapacity(
            f"This runner holds its capacity of {self.capacity} environments.",
            "Try again when a session ends, or add runners with `offload runner`.",
        )

    async def _destroy(self, env: Environment) -> None:
        try:
            await self.driver.destroy(env)
        except OffloadError as exc:
            log.error("%s", exc)

    def _schedule_fill(self) -> None:
        if self._closed or (self._fill_task is not None and not self._fill_task.done()):
            return
        self._fill_task = asyncio.create_task(self._fill(), name="warm-pool-fill")

    async def _fill(self) -> None:
        """Create warm environments until the pool is full or capacity is reached: standard
        ones first, then GPU ones (one per free GPU, up to `warm_gpu`)."""
        while not self._closed and len(self._warm) < self.size and self._held < self.capacity:
            try:
                env = await self._create(self.warm_type)
            except OffloadError as exc:
                # Refilled on the next bind/release/reconcile: no hot retry loop on a broken host.
                log.error("could not warm an environment: %s", exc)
                return
            if self._closed:
                await self._destroy(env)
                return
            self._warm.append(env)
            log.info("warm pool: %d/%d", len(self._warm), self.size)
        while (
            not self._closed and len(self._warm_gpu) < self.warm_gpu and self._held < self.capacity
        ):
            held = self._gpus_held()
            free = [u for u in self.gpus if u not in held and not self._gpu_locks[u].locked()]
            if not free:
                return
            async with self._gpu_locks[free[0]]:
                if free[0] in self._gpus_held():  # bound meanwhile
                    continue
                try:
                    env = await self._create(InstanceType.GPU, [free[0]])
                except OffloadError as exc:
                    log.error("could not warm a GPU environment: %s", exc)
                    return
                if self._closed:
                    await self._destroy(env)
                    return
                self._warm_gpu[free[0]] = env
            log.info("warm GPU pool: %d/%d (GPU %s)", len(self._warm_gpu), self.warm_gpu, free[0])


def _images_to_report(held: list[str], seen: frozenset[str]) -> list[str]:
    """Images the engine holds containers of, and those events saw; the latter first under the
    cap: they are not acknowledged until a heartbeat carried them."""
    rest = sorted(set(held) - seen)
    return sorted([*sorted(seen), *rest][:MAX_IMAGES_REPORTED])

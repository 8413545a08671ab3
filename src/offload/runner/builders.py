"""Organisations' persistent builders: one sandboxed engine per organisation on this runner.

Builds of an organisation's sessions run on its builder (the agent sends them over the builder
channel, `offload.runner.builder_proxy`), so BuildKit's cache outlives sessions and teammates
share it, while another organisation's builds never see it (a builder of its own, on an identity
of its own). A builder is an ordinary environment of the sandboxed kind (`RootlessDriver`) whose
data-root is kept: stopping it (runner shutdown) keeps the cache, and the next build starts it
again on the same identity slot, the owner of its files.

Identity slots `capacity .. capacity + builder_slots - 1` are the builders'; the slot of each is
recorded in its directory (`data_dir/builders/bld-<key>/identity`). With every slot taken, the
builder used least recently is wiped to make room (its cache is lost, nothing else).

A builder no build has used for `OFFLOAD_RUNNER_BUILDER_IDLE_STOP_S` (30 min) is stopped to give
its memory back; its cache stays, and the next build starts it again in about a second.

GC: BuildKit's own policy (`builder.gc` in the builder's daemon.json, `defaultKeepStorage`),
which BuildKit applies after builds; the organisation's owners set the limit, the runner's
`OFFLOAD_RUNNER_BUILDER_KEEP_STORAGE` is the default. A changed limit restarts the builder.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from offload.core.config import RunnerSettings
from offload.core.engine_http import engine_client
from offload.core.errors import EnvironmentError_
from offload.core.schemas import InstanceSpec
from offload.runner.driver import Environment
from offload.runner.environment import (
    BUILDER_PREFIX,
    EnvPaths,
    RootlessDriver,
    wipe_builder,
)

log = logging.getLogger(__name__)

BUILDER_SPEC = InstanceSpec()
ENGINE_TIMEOUT_S = 60.0


def builder_id(org: str) -> str:
    return BUILDER_PREFIX + hashlib.sha256(org.encode()).hexdigest()[:10]


def gc_config(keep_storage: str) -> dict[str, Any]:
    return {"builder": {"gc": {"enabled": True, "defaultKeepStorage": keep_storage}}}


@dataclass
class _Live:
    env: Environment
    keep_storage: str
    last_used: float
    users: int = 0  # open build channels
    # The builder's current busy stretch (a channel open): when it began, and the session whose
    # build began it, which is billed for the whole stretch (concurrent builds: once).
    busy_since: float | None = None
    busy_session: str | None = None


@dataclass(frozen=True)
class BuilderUsage:
    """What `offload builder status` shows (from the builder's `GET /system/df`)."""

    size_bytes: int
    records: int
    shared_records: int
    last_used_at: str | None
    keep_storage: str


class BuilderPool:
    def __init__(
        self,
        settings: RunnerSettings,
        driver: RootlessDriver,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.driver = driver
        self.clock = clock
        self._live: dict[str, _Live] = {}
        self._lock = asyncio.Lock()
        self._transfers: dict[str, asyncio.Lock] = {}
        # Busy seconds of finished stretches per session (a running total: the heartbeat
        # reports it, and the control plane bills what it had not seen yet).
        self._busy_s: dict[str, float] = {}

    def transfer_lock(self, env_id: str) -> asyncio.Lock:
        """One image move into or out of a builder at a time."""
        return self._transfers.setdefault(env_id, asyncio.Lock())

    def keep_storage(self, org_limit_bytes: int | None) -> str:
        if org_limit_bytes is not None:
            return f"{org_limit_bytes}B"
        return self.settings.builder_keep_storage

    async def for_org(self, org: str, org_limit_bytes: int | None = None) -> Environment:
        """The organisation's builder, started if it is not running (same cache as before)."""
        env_id = builder_id(org)
        keep = self.keep_storage(org_limit_bytes)
        async with self._lock:  # one start at a time: two must never take the same slot
            live = self._live.get(env_id)
            if live is not None and live.keep_storage != keep and live.users == 0:
                log.info("builder %s: cache limit now %s, restarting it", env_id, keep)
                await self._stop(env_id)
                live = None
            if live is None:
                slot = await self._slot_for(env_id)
                env = await self.driver.start_builder(env_id, BUILDER_SPEC, slot, gc_config(keep))
                live = self._live[env_id] = _Live(env, keep, self.clock())
                log.info("builder %s of %s running on slot %d", env_id, org, slot)
            live.last_used = self.clock()
            return live.env

    def acquire(self, env_id: str, session_id: str) -> None:
        """A build channel of `session_id` uses the builder: it is not evicted meanwhile, and
        its time is billed (`build_seconds`)."""
        if (live := self._live.get(env_id)) is not None:
            if live.users == 0:
                live.busy_since, live.busy_session = self.clock(), session_id
            live.users += 1

    def release(self, env_id: str) -> None:
        if (live := self._live.get(env_id)) is not None:
            live.users = max(0, live.users - 1)
            live.last_used = self.clock()
            if live.users == 0 and live.busy_since is not None and live.busy_session:
                spent = live.last_used - live.busy_since
                self._busy_s[live.busy_session] = self._busy_s.get(live.busy_session, 0) + spent
                live.busy_since = live.busy_session = None

    def build_seconds(self, session_id: str) -> float:
        """The builder time `session_id` is billed for so far, the stretch under way included."""
        total = self._busy_s.get(session_id, 0.0)
        now = self.clock()
        for live in self._live.values():
            if live.busy_session == session_id and live.busy_since is not None:
                total += now - live.busy_since
        return total

    def forget(self, session_id: str) -> None:
        """The session is gone from this runner: its total is not asked for again."""
        self._busy_s.pop(session_id, None)

    async def _slot_for(self, env_id: str) -> int:
        first = self.settings.capacity
        slots = range(first, first + self.settings.builder_slots)
        if not slots:
            raise EnvironmentError_(
                "This runner keeps no builders (OFFLOAD_RUNNER_BUILDER_SLOTS=0).",
                "Builds run on the session's own engine; raise the setting for a shared cache.",
            )
        recorded = await asyncio.to_thread(self._recorded_slots)
        if env_id in recorded:
            return recorded[env_id]
        taken = set(recorded.values())
        free = [slot for slot in slots if slot not in taken]
        if free:
            return free[0]
        return await self._evict(recorded)

    def _recorded_slots(self) -> dict[str, int]:
        found = {}
        root = self.settings.data_dir / "builders"
        if root.is_dir():
            for home in root.iterdir():
                try:
                    found[home.name] = int((home / "identity").read_text())
                except (OSError, ValueError):
                    continue
        return found

    async def _evict(self, recorded: dict[str, int]) -> int:
        """Free the slot of the builder used least recently that no build uses now: stopped
        builders first (oldest directory), then running idle ones (oldest last use)."""
        stopped = [e for e in recorded if e not in self._live]
        idle = [e for e, live in self._live.items() if live.users == 0 and e in recorded]
        if stopped:
            victim = min(stopped, key=lambda e: EnvPaths.of(self.settings, e).home.stat().st_mtime)
        elif idle:
            victim = min(idle, key=lambda e: self._live[e].last_used)
            await self._stop(victim)
        else:
            raise EnvironmentError_(
                f"All {self.settings.builder_slots} builder slots of this runner are busy.",
                "Raise OFFLOAD_RUNNER_BUILDER_SLOTS, or build again once a build has finished.",
            )
        log.warning("builder slots full: wiping the cache of idle builder %s", victim)
        await wipe_builder(self.settings, victim)
        return recorded[victim]

    async def usage(self, org: str, org_limit_bytes: int | None = None) -> BuilderUsage:
        env = await self.for_org(org, org_limit_bytes)
        df = await _engine_json(env, "GET", "/system/df")
        cache = df.get("BuildCache") or []
        last = max((str(r.get("LastUsedAt") or "") for r in cache), default="") or None
        return BuilderUsage(
            size_bytes=sum(int(r.get("Size") or 0) for r in cache if not r.get("Shared")),
            records=len(cache),
            shared_records=sum(1 for r in cache if r.get("Shared")),
            last_used_at=last,
            keep_storage=self.keep_storage(org_limit_bytes),
        )

    async def stop_idle(self) -> list[str]:
        """Stop the builders no build has used for `builder_idle_stop_s` (their caches stay);
        returns their ids."""
        limit = self.settings.builder_idle_stop_s
        if not limit:
            return []
        now = self.clock()
        async with self._lock:
            idle = [e for e, live in self._live.items()
                    if live.users == 0 and now - live.last_used >= limit]  # fmt: skip
            for env_id in idle:
                log.info("builder %s idle for %.0fs: stopping it (its cache stays)", env_id, limit)
                await self._stop(env_id)
        return idle

    def running(self) -> list[str]:
        return sorted(self._live)

    async def close(self) -> None:
        """Stop every running builder; their caches stay on disk."""
        for env_id in list(self._live):
            await self._stop(env_id)

    async def _stop(self, env_id: str) -> None:
        live = self._live.pop(env_id, None)
        if live is not None:
            await self.driver.destroy(live.env)


async def _engine_json(env: Environment, method: str, path: str) -> dict[str, Any]:
    async with engine_client(env.engine_socket, timeout=ENGINE_TIMEOUT_S) as client:
        answer = await client.request(method, path)
    if answer.status_code >= 400:
        raise EnvironmentError_(
            f"The organisation's builder refused {method} {path}: {answer.text.strip()}",
            "Try again; if it persists, ask the operator to check the runner's log.",
        )
    body = answer.json()
    return body if isinstance(body, dict) else {}

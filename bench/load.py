"""Load: live sessions and runners against the real control plane, in three deployments.

One run, three scenarios (`--scenario` picks one):

- sqlite:   1 replica (`offload server`) on SQLite, the embedded default;
- postgres: 1 replica on PostgreSQL (a throw-away cluster of Debian's postgresql-15,
            tests/support/postgres.py: fsync and synchronous commit off);
- replicas: 3 replicas on one PostgreSQL database behind Debian's nginx (round robin, its own
            config in a temp dir, 127.0.0.1 and a free port).

Replicas are real processes with the default settings, the lifecycle clock ticking every second
in each.  Users (one organisation, an API token each) and runner tokens are written into the
database before the replicas start.  Then this process drives the API the way agents and runners
do, over HTTP (bench/http_client.py: connections of each agent's own, as each laptop has):

1. start: the runners register (a fresh ssh-ed25519 host key each) and long-poll their heartbeat
   (wait 15 s while they hold nothing, 4 s once they hold sessions: the runner's cadence); every
   agent starts a session (POST /sessions, a key of its own); the runner it was placed on learns
   it from its heartbeat and reports it ready (POST /runners/{id}/sessions/{sid}/ready); the
   sessions become active.
2. steady (`--duration` s): every agent reports activity every `--report-interval` s (the agent's
   5 s keepalive while Docker streams are open) and renews its certificate at an agent's rate
   (every `RENEW_EVERY_S`, 40 min, from a random start: about 12 renewals in 30 s with 1,000
   agents); runners heartbeat with a report of each bound environment (1 running container, so
   each heartbeat also writes its sessions' activity).  Agents wait for each answer: an
   overloaded server slows them down, and requests still unanswered `STEADY_GRACE_S` after the
   phase are counted as unfinished.
   renewals (`--duration` s): the same, with every agent renewing once in the phase (80 times an
   agent's rate, so that the certificate endpoint is measured under load; the steady phase of
   runs before 2026-12-03 15:00 UTC was this one).
3. saturation: the agents' cadence is replaced by an open-loop rate of activity reports spread
   over every session, raised step by step (`--ramp-start`, x`--ramp-factor`, `--ramp-step-s`
   each) until the p99 exceeds 100 ms, a request fails, or fewer than 90 % of the step's
   reports complete in time; the runners go on.  The saturation point is the highest rate that
   passed ("below the first step" when none did).

When both PostgreSQL scenarios run, `replicas` takes over `postgres`'s database and data
directory (a scale-out: the one replica stops, three start behind nginx): the sessions stay
live and the runners keep their registration, which saves starting 1,000 sessions again on this
slow machine.  It then churns `--churn` sessions through the load balancer (stops them, starts
as many for other users) to measure session start across replicas.

After each scenario, with its replicas stopped, one `lifecycle.tick` over its database is timed
in this process (SQL statements, CPU): the work the leading replica does every second; and its
read when no session is settled (lifecycle.due_candidates; two hours on, read only: every session
read, evaluated and found due, the most that read can cost).
Once per run, bench/load_costs.py measures each endpoint alone (statements and CPU per request).

Measured per scenario: requests/s; CPU seconds of every replica, of PostgreSQL, nginx and this
generator (from /proc), and of the whole machine (the rest is other people's work: this 2-core
machine is shared); requests per CPU-second of the control plane; p50/p99 per endpoint; database
connections (PostgreSQL: pg_stat_activity, and sessions waiting for the write lock in pg_locks;
SQLite: descriptors open on the database file, one per pooled connection); RSS per replica.
Targets are compared as ratios, never asserted: p99 of activity reports < 100 ms with 1,000 live
sessions on 3 replicas, and >= 500 heartbeats or activity reports per second per core.

Results: bench/results/load-<timestamp>.json and .md, and a table on stdout.

Run from the repository (as root: PostgreSQL then runs as the `postgres` user, and nginx is
installed if missing):
    .venv/bin/python bench/load.py                    # all three, 1,000 sessions, 50 runners
    .venv/bin/python bench/load.py --quick            # smoke check: 50 sessions, 5 runners
    .venv/bin/python bench/load.py --scenario replicas --sessions 300 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

import asyncssh  # noqa: E402
from sqlalchemy import event, func, select  # noqa: E402

from bench import load_support as sup  # noqa: E402
from bench.http_client import Pool, ProtocolError, Response  # noqa: E402
from bench.load_costs import measure_costs  # noqa: E402
from offload.agent.daemon import RENEW_FRACTION  # noqa: E402
from offload.core import schemas as s  # noqa: E402
from offload.core.config import ServerSettings  # noqa: E402
from offload.server.app import build_context  # noqa: E402
from offload.server.db.models import OffloadSession  # noqa: E402
from offload.server.services import lifecycle  # noqa: E402
from tests.support.postgres import (  # noqa: E402
    INSTALL_HINT,
    PostgresCluster,
    find_bin_dir,
    running_cluster,
)

RESULTS = REPO / "bench" / "results"
TARGET_P99_S = 0.100
TARGET_PER_CORE = 500.0
IDLE_WAIT_S = 15.0  # RunnerSettings.heartbeat_wait_s
ACTIVE_WAIT_S = 4.0  # runner.daemon.ACTIVE_WAIT_S
STEADY_GRACE_S = 15.0
# An agent renews its certificate when it enters the last third of its validity (agent/daemon.py).
RENEW_EVERY_S = ServerSettings.model_fields["cert_validity_s"].default * (1 - RENEW_FRACTION)
RAMP_GRACE_S = 10.0
SETTLE_TIMEOUT_S = 60.0
NOTE = (
    "Measured on a shared 2-core machine: the load generator, the replicas, PostgreSQL and nginx "
    "share its 2 cores, and other people's tests ran at the same time (machine_other_cpu_s is "
    "their CPU during each phase). Requests per core-second divide by the replicas' own CPU "
    "seconds, so they hold up better under that noise than latencies do. PostgreSQL ran with "
    "fsync, full_page_writes and synchronous_commit off (a throw-away test cluster)."
)
LINES: list[str] = []
T = TypeVar("T")


def say(text: str = "") -> None:
    LINES.append(text)
    print(text, flush=True)


# ---- measurement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    phase: str
    start: float  # perf_counter
    latency: float
    ok: bool


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarize(latencies: list[float], errors: int = 0) -> dict[str, Any]:
    values = sorted(latencies)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {
        "count": len(values),
        "errors": errors,
        "p50_ms": ms(percentile(values, 0.50)),
        "p90_ms": ms(percentile(values, 0.90)),
        "p99_ms": ms(percentile(values, 0.99)),
        "max_ms": ms(values[-1] if values else None),
    }


class Recorder:
    """Every request's latency and outcome, tagged with the phase it started in."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.samples: dict[str, list[Sample]] = defaultdict(list)
        self.failures: Counter[str] = Counter()

    def add(self, endpoint: str, start: float, latency: float, ok: bool, why: str = "") -> None:
        self.samples[endpoint].append(Sample(self.phase, start, latency, ok))
        if not ok:
            self.failures[f"{self.phase} {endpoint}: {why}"[:200]] += 1

    def of(self, endpoint: str, phase: str) -> list[Sample]:
        return [x for x in self.samples[endpoint] if x.phase == phase]

    def stats(self, endpoint: str, phase: str) -> dict[str, Any]:
        chosen = self.of(endpoint, phase)
        return summarize([x.latency for x in chosen if x.ok], sum(not x.ok for x in chosen))

    def count(self, phase: str, endpoints: tuple[str, ...] | None = None) -> int:
        return sum(
            1
            for name, samples in self.samples.items()
            if endpoints is None or name in endpoints
            for x in samples
            if x.phase == phase and x.ok
        )


@dataclass
class Usage:
    """CPU seconds at one instant of everything this bench runs, and of the whole machine."""

    wall: float
    replicas: list[float]
    postgres: float
    nginx: float
    generator: float
    machine_busy: float

    def minus(self, before: Usage) -> dict[str, Any]:
        wall = self.wall - before.wall
        replicas = [a - b for a, b in zip(self.replicas, before.replicas, strict=True)]
        ours = sum(replicas) + (self.postgres - before.postgres) + (self.nginx - before.nginx)
        ours += self.generator - before.generator
        busy = self.machine_busy - before.machine_busy
        return {
            "wall_s": round(wall, 2),
            "replica_cpu_s": [round(x, 2) for x in replicas],
            "control_plane_cpu_s": round(sum(replicas), 2),
            "control_plane_cores": round(sum(replicas) / wall, 3) if wall else None,
            "postgres_cpu_s": round(self.postgres - before.postgres, 2),
            "nginx_cpu_s": round(self.nginx - before.nginx, 2),
            "generator_cpu_s": round(self.generator - before.generator, 2),
            "generator_cores": round((self.generator - before.generator) / wall, 3)
            if wall
            else None,
            "machine_busy_cpu_s": round(busy, 2),
            "machine_other_cpu_s": round(max(0.0, busy - ours), 2),
        }


# ---- the simulated agents and runners ------------------------------------------------------------


@dataclass
class Agent:
    index: int
    token: str
    public_key: str
    session_id: str | None = None


@dataclass
class SimRunner:
    index: int
    token: str
    name: str
    id: str = ""
    bound: set[str] = field(default_factory=set)
    readying: set[str] = field(default_factory=set)
    heard_at: float = 0.0  # when a heartbeat of it last succeeded


def _env_report(session_id: str) -> dict[str, Any]:
    return s.EnvironmentReport(
        env_id="env-" + session_id,
        session_id=session_id,
        state="bound",
        running_containers=1,
        containers_total=1,
        containers_created=1,
        images=["busybox:latest"],
    ).model_dump(mode="json")


ACTIVITY = s.ActivityReport(api_calls=3, open_streams=1).model_dump(mode="json")


class Load:
    """The agents and runners of one deployment (carried over to the next on a takeover)."""

    def __init__(self, url: str, seeded: sup.Seeded, sessions: int) -> None:
        keys = [
            asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
            for _ in seeded.user_tokens
        ]
        everyone = [
            Agent(i, t, k) for i, (t, k) in enumerate(zip(seeded.user_tokens, keys, strict=True))
        ]
        self.agents = everyone[:sessions]
        self.spares = everyone[sessions:]  # users for the churn of a takeover
        self.runners = [
            SimRunner(i, token, f"bench-runner-{i:03d}")
            for i, token in enumerate(seeded.runner_tokens)
        ]
        self.capacity = max(8, -(-len(everyone) // max(1, len(self.runners))) * 2)
        self.rec = Recorder()
        self.created_at: dict[str, float] = {}  # when POST /sessions began
        self.told_at: dict[str, float] = {}  # when its runner's heartbeat first listed it
        self.active_at: dict[str, float] = {}  # when the runner's ready call came back
        self.stop_runners = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.api = url + s.API_PREFIX
        self.pools: dict[str, Pool] = {}  # by token: each agent's and runner's own connections

    def _pool(self, token: str) -> Pool:
        if token not in self.pools:
            self.pools[token] = Pool(self.api)
        return self.pools[token]

    def _close_pools(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools = {}

    async def retarget(self, url: str) -> None:
        """Talk to another deployment from now on (the runners' polls in flight fail, retry)."""
        self._close_pools()
        self.api = url + s.API_PREFIX

    async def aclose(self) -> None:
        self.stop_runners.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_pools()

    async def call(
        self,
        endpoint: str,
        path: str,
        token: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Response | None:
        """One POST, recorded; the response if it succeeded. Each caller (an agent or a runner)
        has connections of its own, found by its token."""
        started = time.perf_counter()
        try:
            response = await self._pool(token).post(path, token, body, params, timeout or 30.0)
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            ProtocolError,
            ValueError,
        ) as exc:
            latency = time.perf_counter() - started
            self.rec.add(endpoint, started, latency, False, type(exc).__name__)
            return None
        latency = time.perf_counter() - started
        ok = response.is_success
        why = "" if ok else f"{response.status_code} {response.text[:120]}"
        self.rec.add(endpoint, started, latency, ok, why)
        return response if ok else None

    # ---- runners ----------------------------------------------------------------------------

    async def register_runners(self) -> None:
        async def register(runner: SimRunner) -> None:
            host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key()
            body = s.RunnerRegister(
                name=runner.name,
                ssh_host="127.0.0.1",
                ssh_port=8422,
                host_key=host_key.decode().strip(),
                capacity=self.capacity,
            ).model_dump(mode="json")
            response = await self.call("register", "/runners/register", runner.token, body)
            if response is None:
                raise RuntimeError(f"runner {runner.name} could not register: {self.rec.failures}")
            runner.id = response.json()["id"]

        await asyncio.gather(*(register(runner) for runner in self.runners))
        self._tasks += [asyncio.create_task(self._runner_loop(r)) for r in self.runners]

    async def _runner_loop(self, runner: SimRunner) -> None:
        while not self.stop_runners.is_set():
            wait = ACTIVE_WAIT_S if runner.bound else IDLE_WAIT_S
            report = s.RunnerHeartbeat(capacity=self.capacity, warm=1).model_dump(mode="json")
            report["environments"] = [_env_report(sid) for sid in sorted(runner.bound)]
            path = f"/runners/{runner.id}/heartbeat"
            params = {"wait": wait}
            response = await self.call(
                "heartbeat", path, runner.token, report, params, timeout=wait + 30
            )
            if response is None:
                await asyncio.sleep(1.0)
                continue
            now = runner.heard_at = time.perf_counter()
            live = set()
            for item in response.json()["sessions"]:
                session_id = item["session_id"]
                live.add(session_id)
                self.told_at.setdefault(session_id, now)
                if item["state"] == s.SessionState.STARTING and session_id not in runner.readying:
                    runner.readying.add(session_id)
                    self._tasks.append(asyncio.create_task(self._ready(runner, session_id)))
            runner.bound = live

    async def _ready(self, runner: SimRunner, session_id: str) -> None:
        body = s.EnvironmentReady(env_id="env-" + session_id).model_dump(mode="json")
        path = f"/runners/{runner.id}/sessions/{session_id}/ready"
        if await self.call("session_ready", path, runner.token, body) is None:
            runner.readying.discard(session_id)  # the next heartbeat tries again
            return
        self.active_at.setdefault(session_id, time.perf_counter())

    async def runners_heard_since(self, since: float, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if all(runner.heard_at > since for runner in self.runners):
                return True
            await asyncio.sleep(0.2)
        return False

    # ---- agents -----------------------------------------------------------------------------

    async def start(self, agents: list[Agent], concurrency: int) -> list[str]:
        """The agents start their sessions; the ids created."""
        gate = asyncio.Semaphore(concurrency)
        created: list[str] = []

        async def start(agent: Agent) -> None:
            async with gate:
                body = s.SessionCreate(
                    client_public_key=agent.public_key, client_name=f"laptop-{agent.index}"
                ).model_dump(mode="json")
                began = time.perf_counter()
                response = await self.call("session_start", "/sessions", agent.token, body)
                if response is not None:
                    agent.session_id = response.json()["id"]
                    self.created_at[agent.session_id] = began
                    created.append(agent.session_id)

        await asyncio.gather(*(start(agent) for agent in agents))
        return created

    async def stop(self, agents: list[Agent]) -> None:
        async def stop(agent: Agent) -> None:
            path = f"/sessions/{agent.session_id}/stop"
            if await self.call("session_stop", path, agent.token) is not None:
                agent.session_id = None

        await asyncio.gather(*(stop(agent) for agent in agents if agent.session_id))

    async def wait_active(self, ids: list[str], timeout: float) -> float:
        began = time.perf_counter()
        while any(i not in self.active_at for i in ids) and time.perf_counter() - began < timeout:
            await asyncio.sleep(0.2)
        return time.perf_counter() - began

    def live(self) -> list[Agent]:
        return [agent for agent in self.agents + self.spares if agent.session_id]

    async def activity(self, agent: Agent) -> None:
        path = f"/sessions/{agent.session_id}/activity"
        await self.call("activity", path, agent.token, ACTIVITY)

    async def renew(self, agent: Agent) -> None:
        body = s.CertificateRequest(client_public_key=agent.public_key).model_dump(mode="json")
        path = f"/sessions/{agent.session_id}/certificate"
        await self.call("certificate", path, agent.token, body)

    async def steady(self, duration: float, interval: float, renew_every: float) -> dict[str, Any]:
        """Each agent: an activity report every `interval` s, and a renewal at a random moment
        of its `renew_every` s period (0: of the phase's first 90 %, so every agent renews)."""
        began = time.perf_counter()
        end = began + duration
        window = renew_every or duration * 0.9

        async def agent_loop(agent: Agent) -> None:
            next_at = began + random.uniform(0, interval)
            renew_at = began + random.uniform(0, window)
            renewed = False
            while True:
                now = time.perf_counter()
                if now >= end:
                    return
                if now < next_at:
                    await asyncio.sleep(min(next_at, end) - now)
                    continue
                if not renewed and now >= renew_at:
                    renewed = True
                    await self.renew(agent)
                next_at = time.perf_counter() + interval  # the agent's cadence: since the last
                await self.activity(agent)

        tasks = [asyncio.create_task(agent_loop(agent)) for agent in self.live()]
        _, pending = await asyncio.wait(tasks, timeout=duration + STEADY_GRACE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return {"unfinished": len(pending), "seconds": round(time.perf_counter() - began, 2)}

    async def open_loop(self, rate: float, seconds: float) -> dict[str, Any]:
        """`rate` activity reports a second for `seconds`, sent on schedule whatever the answers
        (round robin over the sessions); what came back."""
        agents = self.live()
        total = max(1, int(rate * seconds))
        began = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        max_lag = 0.0
        while len(tasks) < total:
            now = time.perf_counter()
            due = min(total, int((now - began) * rate) + 1)
            while len(tasks) < due:
                max_lag = max(max_lag, now - (began + len(tasks) / rate))
                agent = agents[len(tasks) % len(agents)]
                tasks.append(asyncio.create_task(self.activity(agent)))
            await asyncio.sleep(max(0.0, began + len(tasks) / rate - time.perf_counter()))
        sent_s = time.perf_counter() - began
        _, pending = await asyncio.wait(tasks, timeout=RAMP_GRACE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return {
            "sent": total,
            "unfinished": len(pending),
            "send_s": round(sent_s, 2),
            "done_s": round(time.perf_counter() - began, 2),
            "max_send_lag_ms": round(max_lag * 1000, 1),
        }


# ---- deployments ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    replicas: int
    postgres: bool


SPECS = {
    "sqlite": Spec("sqlite", "1 replica, SQLite", 1, False),
    "postgres": Spec("postgres", "1 replica, PostgreSQL", 1, True),
    "replicas": Spec("replicas", "3 replicas, PostgreSQL, nginx", 3, True),
}


class Deployment:
    """The replicas (and nginx) of one scenario, on a database and a data directory."""

    def __init__(
        self,
        spec: Spec,
        root: Path,
        cluster: PostgresCluster | None,
        command: list[str],
        db_name: str | None = None,
    ) -> None:
        self.spec = spec
        self.root = root
        self.cluster = cluster
        self.command = command
        self.data_dir = root / "data"  # the CA key: shared by every replica
        self.db_name = db_name or f"offload_{spec.name}"
        self.database_url = cluster.url(self.db_name) if cluster else None
        self.replicas: list[sup.Replica] = []
        self.nginx: sup.Nginx | None = None
        self.pg_sampler: Any = None

    @property
    def url(self) -> str:
        return self.nginx.url if self.nginx else self.replicas[0].url

    def settings(self) -> ServerSettings:
        return ServerSettings(data_dir=self.data_dir, database_url=self.database_url)

    def create_database(self) -> None:
        if self.cluster is not None:
            self.cluster.create_database(self.db_name)

    def start(self) -> None:
        log_dir = self.root / f"logs-{self.spec.name}"
        log_dir.mkdir(exist_ok=True)
        self.replicas = [
            sup.Replica(index, self.data_dir, self.database_url, log_dir, self.command)
            for index in range(self.spec.replicas)
        ]
        first, *others = self.replicas
        first.start()  # alone: it migrates the database and makes the CA key the others load
        first.wait_healthy()
        for replica in others:
            replica.start()
        for replica in others:
            replica.wait_healthy()
        if self.spec.replicas > 1:
            self.nginx = sup.Nginx([f"127.0.0.1:{r.port}" for r in self.replicas])
            self.nginx.start()
        if self.cluster is not None:
            self.pg_sampler = self.cluster.connect(self.db_name)

    def stop(self) -> None:
        """Stop the processes; the database and data directory stay."""
        if self.pg_sampler is not None:
            self.pg_sampler.close()
            self.pg_sampler = None
        if self.nginx is not None:
            self.nginx.stop()
        for replica in self.replicas:
            replica.stop()

    def drop(self) -> None:
        if self.cluster is not None:
            self.cluster.drop_database(self.db_name)

    def usage(self) -> Usage:
        postgres = 0.0
        if self.cluster is not None and self.cluster._process is not None:
            postgres = sup.tree_cpu_seconds(self.cluster._process.pid)
        return Usage(
            wall=time.perf_counter(),
            replicas=[sup.cpu_seconds(r.pid) for r in self.replicas],
            postgres=postgres,
            nginx=sup.tree_cpu_seconds(self.nginx.pid) if self.nginx else 0.0,
            generator=sup.self_cpu_seconds(),
            machine_busy=sup.machine_busy_seconds()[0],
        )

    def db_connections(self) -> dict[str, int]:
        """Open database connections now (of the replicas, of anyone), and writers waiting."""
        if self.pg_sampler is None:
            db_file = self.data_dir / "offload.db"
            n = sum(sup.open_files_named(r.pid, db_file) for r in self.replicas)
            return {"replicas": n, "total": n, "lock_waiters": 0}
        row = self.pg_sampler.execute(
            "SELECT count(*), count(*) FILTER (WHERE application_name = 'offload-server') "
            "FROM pg_stat_activity WHERE backend_type = 'client backend'"
        ).fetchone()
        waiting = self.pg_sampler.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchone()
        return {"replicas": int(row[1]), "total": int(row[0]) - 1, "lock_waiters": int(waiting[0])}

    def rss(self) -> list[int]:
        return [sup.rss_bytes(r.pid) for r in self.replicas]


class Sampler:
    """Database connections, write-lock waiters and RSS every second, per phase."""

    def __init__(self, deployment: Deployment, rec: Recorder) -> None:
        self.deployment = deployment
        self.rec = rec
        self.peaks: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        connections = self.deployment.db_connections()
        rss = self.deployment.rss()
        peak = self.peaks.setdefault(
            self.rec.phase,
            {"db_connections": 0, "db_connections_total": 0, "lock_waiters_max": 0,
             "lock_waiters_sum": 0, "samples": 0, "rss": [0] * len(rss)},
        )  # fmt: skip
        peak["db_connections"] = max(peak["db_connections"], connections["replicas"])
        peak["db_connections_total"] = max(peak["db_connections_total"], connections["total"])
        peak["lock_waiters_max"] = max(peak["lock_waiters_max"], connections["lock_waiters"])
        peak["lock_waiters_sum"] += connections["lock_waiters"]
        peak["samples"] += 1
        peak["rss"] = [max(a, b) for a, b in zip(peak["rss"], rss, strict=True)]

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a replica stopping mid-sample
                await asyncio.to_thread(self.sample)
            await asyncio.sleep(1.0)

    def __enter__(self) -> Sampler:
        self._task = asyncio.create_task(self._loop())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def measure_tick(settings: ServerSettings, repeats: int = 3) -> dict[str, Any]:
    """One `lifecycle.tick` over the deployment's database, in this process, its replicas
    stopped: what each replica does every `tick_interval_s`."""
    context = build_context(settings)
    statements = 0

    def count(*_args: Any) -> None:
        nonlocal statements
        statements += 1

    event.listen(context.db.engine, "before_cursor_execute", count)
    try:
        live = await context.db.read(
            lambda db: db.scalar(
                select(func.count())
                .select_from(OffloadSession)
                .where(OffloadSession.state.in_(lifecycle.LIVE_STATES))
            )
        )
        runs = []
        for _ in range(repeats):
            cost, changed = await _measured(lambda: lifecycle.tick(context), lambda: statements)
            runs.append({**cost, "changed": changed})
        worst = await _time_every_session_read(context, lambda: statements, repeats)
    finally:
        context.db.dispose()
    best = min(runs, key=lambda run: run["cpu_ms"])
    return {"live_sessions": live, **best, "runs": runs, "every_session_read": worst}


async def _measured(
    call: Callable[[], Awaitable[T]], statements_of: Callable[[], int]
) -> tuple[dict[str, Any], T]:
    """`call`'s CPU, wall time and SQL statements in this process, and its result."""
    before_s, cpu, wall = statements_of(), time.process_time(), time.perf_counter()
    result = await call()
    cost = {
        "cpu_ms": round((time.process_time() - cpu) * 1000, 1),
        "wall_ms": round((time.perf_counter() - wall) * 1000, 1),
        "statements": statements_of() - before_s,
    }
    return cost, result


async def _time_every_session_read(
    context: Any, statements_of: Callable[[], int], repeats: int = 3
) -> dict[str, Any]:
    """The tick's read when no session is settled (lifecycle.due_candidates): two hours on,
    every session is quiet and past its prompt window, so each is read, evaluated and found due
    (an upper bound: before the tick skipped the settled ones, it read each every second, most
    with nothing due, which costs less).  Read only: nothing is applied."""
    later = context.now() + timedelta(hours=2)
    rules = lifecycle.Rules.from_settings(context.settings)
    runs = []
    for _ in range(repeats):  # the best of three, as for the tick: the first compiles
        read = partial(context.db.read, lifecycle.due_session_ids, later, rules)
        cost, due = await _measured(read, statements_of)
        runs.append({**cost, "due": len(due)})
    return min(runs, key=lambda run: run["cpu_ms"])


# ---- one scenario --------------------------------------------------------------------------------


def _deltas(later: dict[str, float], earlier: dict[str, float], ids: list[str]) -> list[float]:
    return [later[i] - earlier[i] for i in ids if i in later and i in earlier]


async def _phase(
    load: Load, deployment: Deployment, name: str, work: Callable[[], Awaitable[Any]]
) -> tuple[Any, dict[str, Any]]:
    load.rec.phase = name
    before = deployment.usage()
    result = await work()
    return result, deployment.usage().minus(before)


def _rates(load: Load, phase: str, cpu: dict[str, Any]) -> dict[str, Any]:
    wall, cp_cpu = cpu["wall_s"], cpu["control_plane_cpu_s"]
    total = load.rec.count(phase)
    core = load.rec.count(phase, ("activity", "heartbeat"))
    return {
        "requests_ok": total,
        "requests_per_s": round(total / wall, 1) if wall else None,
        "activity_and_heartbeats_per_s": round(core / wall, 1) if wall else None,
        "requests_per_core_s": round(total / cp_cpu, 1) if cp_cpu else None,
        "activity_and_heartbeats_per_core_s": round(core / cp_cpu, 1) if cp_cpu else None,
    }


async def _steady_phase(
    load: Load,
    deployment: Deployment,
    args: argparse.Namespace,
    sampler: Sampler,
    phase: str,
    renew_every: float,
) -> dict[str, Any]:
    """Agents at their cadence for `args.duration` s, renewing every `renew_every` s."""
    work = partial(load.steady, args.duration, args.report_interval, renew_every)
    out, cpu = await _phase(load, deployment, phase, work)
    sampler.sample()
    steady = {
        "duration_s": args.duration,
        **out,
        "live_sessions": len(load.live()),
        "report_interval_s": args.report_interval,
        "renew_every_s": round(renew_every, 1) if renew_every else "once in the phase",
        "endpoints": {
            name: load.rec.stats(name, phase)
            for name in ("activity", "certificate", "heartbeat", "session_ready")
        },
        "cpu": cpu,
        **_rates(load, phase, cpu),
    }
    activity = steady["endpoints"]["activity"]
    say(f"  {phase} {steady['seconds']:.0f} s: {steady['requests_per_s']} req/s, control plane "
        f"{cpu['control_plane_cores']} cores, {steady['requests_per_core_s']} req per core-second, "
        f"activity p50/p99 {activity['p50_ms']}/{activity['p99_ms']} ms, certificates "
        f"{steady['endpoints']['certificate']['count']}, unfinished {steady['unfinished']}, "
        f"others {cpu['machine_other_cpu_s']} CPU-s")  # fmt: skip
    return steady


async def saturation(
    load: Load, deployment: Deployment, args: argparse.Namespace
) -> dict[str, Any]:
    """Raise the rate of activity reports until the p99 passes 100 ms or errors appear."""
    rate = float(args.ramp_start)
    steps: list[dict[str, Any]] = []
    passed: dict[str, Any] | None = None
    stop_reason = f"reached --ramp-steps ({args.ramp_steps})"
    for _ in range(args.ramp_steps):
        phase = f"ramp:{rate:g}"
        sent, cpu = await _phase(
            load, deployment, phase, partial(load.open_loop, rate, args.ramp_step_s)
        )
        stats = load.rec.stats("activity", phase)
        achieved = stats["count"] / sent["done_s"] if sent["done_s"] else 0.0
        step = {
            "target_per_s": round(rate, 1),
            "achieved_per_s": round(achieved, 1),
            **sent,
            "activity": stats,
            "heartbeat": load.rec.stats("heartbeat", phase),
            "cpu": cpu,
            **_rates(load, phase, cpu),
        }
        steps.append(step)
        say(f"    ramp {rate:6.1f}/s: achieved {achieved:6.1f}/s, activity p50 "
            f"{stats['p50_ms']} ms p99 {stats['p99_ms']} ms, errors {stats['errors']}, "
            f"unfinished {sent['unfinished']}; control plane {cpu['control_plane_cores']} "
            f"cores, generator {cpu['generator_cores']}, others "
            f"{cpu['machine_other_cpu_s'] / cpu['wall_s']:.2f} cores")  # fmt: skip
        reasons = []
        if (stats["p99_ms"] or 0) > TARGET_P99_S * 1000:
            reasons.append(f"p99 {stats['p99_ms']} ms > 100 ms")
        if stats["errors"] or sent["unfinished"]:
            reasons.append(f"{stats['errors']} errors, {sent['unfinished']} unfinished")
        if achieved < 0.9 * rate:
            reasons.append(f"achieved {achieved:.1f}/s < 90 % of {rate:g}/s")
        if reasons:
            stop_reason = f"at {rate:g}/s: " + "; ".join(reasons)
            break
        passed = step
        rate *= args.ramp_factor
    return {
        "saturation_per_s": passed["achieved_per_s"] if passed else None,
        "saturation_target_per_s": passed["target_per_s"] if passed else None,
        "below_first_step": passed is None,
        "stopped": stop_reason,
        "steps": steps,
    }


@dataclass
class Running:
    """A deployment left running for the next scenario to take over."""

    deployment: Deployment
    load: Load


async def run_scenario(
    spec: Spec,
    args: argparse.Namespace,
    cluster: PostgresCluster | None,
    root: Path,
    previous: Running | None,
    hand_over: bool,
) -> tuple[dict[str, Any], Running | None]:
    command = [os.path.abspath(x) if "/" in x else x for x in shlex.split(args.server_command)]
    result: dict[str, Any] = {"title": spec.title, "replicas": spec.replicas}
    cluster = cluster if spec.postgres else None
    if previous is not None:
        say(f"\n== {spec.name}: {spec.title}; takes over {previous.deployment.spec.name}'s "
            f"database, {len(previous.load.live())} live sessions")  # fmt: skip
        deployment = Deployment(
            spec, previous.deployment.root, cluster, command, previous.deployment.db_name
        )
        load = previous.load
        load.rec = Recorder()
        load.rec.phase = "takeover"
        result["took_over"] = previous.deployment.spec.name
    else:
        say(f"\n== {spec.name}: {spec.title}; {args.sessions} sessions, {args.runners} runners")
        deployment = Deployment(spec, root, cluster, command)
        deployment.create_database()
        spares = args.churn if hand_over else 0
        seeded = sup.seed(deployment.settings(), args.sessions + spares, args.runners)
        say(f"  seeded {args.sessions + spares} users, {args.runners} runner tokens "
            f"in {seeded.seconds:.1f} s")  # fmt: skip
        load = None
    handed: Running | None = None
    try:
        began = time.perf_counter()
        if previous is not None:
            previous.deployment.stop()
            result["server_errors_previous"] = {
                r.index: r.server_errors() for r in previous.deployment.replicas
            }
            result["tick_before"] = await measure_tick(previous.deployment.settings())
        deployment.start()
        say(f"  {spec.replicas} replica(s) up in {time.perf_counter() - began:.1f} s"
            + (f", nginx at {deployment.url}" if deployment.nginx else ""))  # fmt: skip
        if load is None:
            load = Load(deployment.url, seeded, args.sessions)
        else:
            await load.retarget(deployment.url)
        with Sampler(deployment, load.rec) as sampler:
            if previous is None:
                await _phase(load, deployment, "register", load.register_runners)
                sampler.sample()  # RSS before any session
                phase, starting = "start", load.agents
            else:
                heard = await load.runners_heard_since(began, SETTLE_TIMEOUT_S)
                say(f"  runners {'all' if heard else 'NOT all'} heard by the new replicas "
                    f"{time.perf_counter() - began:.1f} s after the switch")  # fmt: skip
                churned = [agent for agent in load.agents if agent.session_id][: args.churn]
                await _phase(load, deployment, "churn-stop", lambda: load.stop(churned))
                phase, starting = "churn", load.spares[: args.churn]
            ids, start_cpu = await _phase(
                load, deployment, phase, lambda: load.start(starting, args.start_concurrency)
            )
            start_s = start_cpu["wall_s"]
            say(f"  {len(ids)} sessions started ({phase}) in {start_s:.1f} s "
                f"({len(ids) / start_s:.1f}/s)")  # fmt: skip
            load.rec.phase = "settle"
            settle_s = await load.wait_active(ids, SETTLE_TIMEOUT_S)
            active = sum(1 for i in ids if i in load.active_at)
            say(f"  {active} of them active after a further {settle_s:.1f} s; "
                f"{len(load.live())} live sessions")  # fmt: skip
            result["start"] = {
                "phase": phase,
                "sessions": len(ids),
                "seconds": round(start_s, 2),
                "per_s": round(len(ids) / start_s, 1) if start_s else None,
                "session_start": load.rec.stats("session_start", phase),
                "session_stop": load.rec.stats("session_stop", "churn-stop"),
                "runner_told": summarize(_deltas(load.told_at, load.created_at, ids)),
                "start_to_active": summarize(_deltas(load.active_at, load.created_at, ids)),
                "session_ready": summarize(
                    [
                        x.latency
                        for p in (phase, "settle")
                        for x in load.rec.of("session_ready", p)
                        if x.ok
                    ]
                ),  # fmt: skip
                "cpu": start_cpu,
            }
            for phase, renew_every in (("steady", RENEW_EVERY_S), ("renewals", 0.0)):
                result[phase] = await _steady_phase(
                    load, deployment, args, sampler, phase, renew_every
                )
            if args.ramp_steps:
                result["saturation"] = await saturation(load, deployment, args)
                sat = result["saturation"]
                point = "below the first step" if sat["below_first_step"] else (
                    f"{sat['saturation_per_s']} activity reports/s")  # fmt: skip
                say(f"  saturation: {point} (stopped {sat['stopped']})")
            load.rec.phase = "end"
            result["peaks"] = sampler.peaks
        result["failures"] = dict(load.rec.failures.most_common(20))
        result["server_errors"] = {r.index: r.server_errors() for r in deployment.replicas}
        if hand_over:
            handed = Running(deployment, load)
    finally:
        if handed is None:
            if load is not None:
                await load.aclose()
            deployment.stop()
            with contextlib.suppress(Exception):
                result["tick"] = await measure_tick(deployment.settings())
            deployment.drop()
    result["resources"] = _resources(result, spec)
    if "tick" in result or "tick_before" in result:
        tick = result.get("tick") or result["tick_before"]
        worst = tick.get("every_session_read") or {}
        say(f"  lifecycle tick over {tick['live_sessions']} live sessions: {tick['statements']} "
            f"statements, {tick['cpu_ms']} ms CPU (the leading replica, every second); "
            f"{worst.get('cpu_ms')} ms when every session must be read and is due "
            f"({worst.get('due')} of them, two hours on)")  # fmt: skip
    return result, handed


def _resources(result: dict[str, Any], spec: Spec) -> dict[str, Any]:
    """RAM and database connections per replica, and per 1,000 live sessions."""
    peaks = result.get("peaks", {})
    steady = peaks.get("steady", {})
    overall_rss = [0] * spec.replicas
    overall_conn = overall_total = waiters = 0
    for peak in peaks.values():
        overall_rss = [max(a, b) for a, b in zip(overall_rss, peak["rss"], strict=True)]
        overall_conn = max(overall_conn, peak["db_connections"])
        overall_total = max(overall_total, peak["db_connections_total"])
        waiters = max(waiters, peak["lock_waiters_max"])
    sessions = result.get("steady", {}).get("live_sessions") or 0
    mib = 1024 * 1024
    mean_waiters = (
        round(steady["lock_waiters_sum"] / steady["samples"], 2) if steady.get("samples") else None
    )
    idle = peaks.get("register", {}).get("rss", [])  # no session yet
    return {
        "rss_mib_per_replica_idle": [round(x / mib, 1) for x in idle],
        "rss_mib_per_replica_steady": [round(x / mib, 1) for x in steady.get("rss", [])],
        "rss_mib_per_replica_peak": [round(x / mib, 1) for x in overall_rss],
        "db_connections_steady": steady.get("db_connections"),
        "db_connections_peak": overall_conn,
        "db_connections_peak_all_clients": overall_total,
        "db_connections_per_replica_peak": round(overall_conn / spec.replicas, 1),
        "write_lock_waiters_peak": waiters,
        "write_lock_waiters_mean_steady": mean_waiters,
        "live_sessions": sessions,
    }


# ---- the report ----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def _pp(d: dict[str, Any]) -> str:
    return f"{_fmt(d['p50_ms'])} / {_fmt(d['p99_ms'])}"


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| scenario | live sessions | req/s | control plane cores | req per core-s "
        "| activity+hb per core-s | activity p50/p99 ms | cert p50/p99 | heartbeat (long poll) "
        "p50/p99 | start p50/p99 | start→active p50/p99 | DB conns (peak) "
        "| RSS MiB per replica | saturation /s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "steady" not in r:
            lines.append(f"| {name} | failed: {r.get('error', '?')[:200]} |")
            continue
        st, ep, start, res = r["steady"], r["steady"]["endpoints"], r["start"], r["resources"]
        sat = r.get("saturation", {})
        saturation_text = _fmt(sat.get("saturation_per_s"))
        if sat.get("below_first_step"):
            saturation_text = f"< {sat['steps'][0]['target_per_s']}"
        lines.append(
            f"| {name} | {st['live_sessions']} | {st['requests_per_s']} "
            f"| {st['cpu']['control_plane_cores']} | {st['requests_per_core_s']} "
            f"| {st['activity_and_heartbeats_per_core_s']} | {_pp(ep['activity'])} "
            f"| {_pp(ep['certificate'])} | {_pp(ep['heartbeat'])} | {_pp(start['session_start'])} "
            f"| {_pp(start['start_to_active'])} | {res['db_connections_peak']} "
            f"| {', '.join(map(str, res['rss_mib_per_replica_peak']))} | {saturation_text} |"
        )
    return lines


def renewals_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """The phase with every agent renewing once (the steady phase of earlier runs)."""
    lines = [
        "| scenario | certificates | req/s | control plane cores | req per core-s "
        "| activity+hb per core-s | activity p50/p99 ms | cert p50/p99 | heartbeat (long poll) "
        "p50/p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "renewals" not in r:
            continue
        st, ep = r["renewals"], r["renewals"]["endpoints"]
        lines.append(
            f"| {name} | {ep['certificate']['count']} | {st['requests_per_s']} "
            f"| {st['cpu']['control_plane_cores']} | {st['requests_per_core_s']} "
            f"| {st['activity_and_heartbeats_per_core_s']} | {_pp(ep['activity'])} "
            f"| {_pp(ep['certificate'])} | {_pp(ep['heartbeat'])} |"
        )
    return lines


def cost_table(costs: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| request (alone, in-process) | SQL statements | CPU ms | per core-second |",
        "|---|---|---|---|",
    ]
    for name in ("activity", "certificate", "heartbeat", "session_start", "session_ready"):
        c = costs.get(name)
        if c:
            extra = f" ({c['environments_reported']} environments)" if name == "heartbeat" else ""
            per_core = round(1000 / c["cpu_ms"]) if c["cpu_ms"] else None
            lines.append(
                f"| {name}{extra} | {c['statements']} | {c['cpu_ms']} | {_fmt(per_core)} |"
            )
    for name, r in results.items():
        tick = r.get("tick") or r.get("tick_before")
        if tick:
            lines.append(
                f"| lifecycle tick ({name}, {tick['live_sessions']} live sessions) "
                f"| {tick['statements']} | {tick['cpu_ms']} | every second, on the leading replica |"
            )
            worst = tick.get("every_session_read")
            if worst:
                lines.append(
                    f"| its read when no session is settled ({name}, {worst['due']} due) "
                    f"| {worst['statements']} | {worst['cpu_ms']} | every session read and found due |"
                )
    return lines


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, r in results.items():
        if "steady" not in r:
            continue
        p99 = r["steady"]["endpoints"]["activity"]["p99_ms"]
        per_core = r["steady"]["activity_and_heartbeats_per_core_s"]
        steps = r.get("saturation", {}).get("steps") or []
        best = max((x["activity_and_heartbeats_per_core_s"] or 0 for x in steps), default=None)
        out[name] = {
            "activity_p99_ms": p99,
            "p99_target_ms": TARGET_P99_S * 1000,
            "p99_ratio_target_over_measured": round(TARGET_P99_S * 1000 / p99, 3) if p99 else None,
            "live_sessions": r["steady"]["live_sessions"],
            "per_core_steady": per_core,
            "per_core_best_ramp_step": best,
            "per_core_target": TARGET_PER_CORE,
            "per_core_ratio_steady": round(per_core / TARGET_PER_CORE, 3) if per_core else None,
            "per_core_ratio_best": round(best / TARGET_PER_CORE, 3) if best else None,
        }
    return out


def target_lines(report: dict[str, Any]) -> list[str]:
    return [
        f"- {name}: activity p99 {t['activity_p99_ms']} ms with {t['live_sessions']} live "
        f"sessions (target < 100 ms: ratio {t['p99_ratio_target_over_measured']}); "
        f"{t['per_core_steady']} activity reports + heartbeats per core-second steady, "
        f"{t['per_core_best_ramp_step']} at best in the ramp (target >= 500: ratio "
        f"{t['per_core_ratio_steady']} / {t['per_core_ratio_best']})"
        for name, t in report["targets"].items()
    ]


def markdown(report: dict[str, Any], rows: list[str]) -> str:
    m, a = report["machine"], report["args"]
    out = [
        f"# Load: {report['started']}",
        "",
        f"`bench/load.py {' '.join(report['argv']) or '(defaults)'}` ({report['seconds']} s): "
        f"{a['sessions']} live sessions, {a['runners']} runners, steady {a['duration']} s "
        f"(activity every {a['report_interval']} s, certificates at an agent's rate), the same "
        f"with every agent renewing once, then a ramp of activity reports. "
        f"Commit {report['commit']}{' with local changes in src/' if report['src_dirty'] else ''}.",
        "",
        f"Machine: {m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, load average "
        f"{m['loadavg_at_start']} at start. {NOTE}",
        "",
        *rows,
        "",
        "Targets (ratios, never asserted):",
        "",
        *target_lines(report),
        "",
    ]
    renewals = renewals_table(report["scenarios"])
    if len(renewals) > 2:
        out += [
            "With every agent renewing its certificate once in the phase (80 times an agent's "
            "rate; the steady phase of the runs before this table was added):",
            "",
            *renewals,
            "",
        ]
    out += ["CPU seconds in the steady phase:", ""]
    for name, r in report["scenarios"].items():
        if "steady" in r:
            c = r["steady"]["cpu"]
            out.append(
                f"- {name}: wall {c['wall_s']} s; replicas {c['replica_cpu_s']}; PostgreSQL "
                f"{c['postgres_cpu_s']}; nginx {c['nginx_cpu_s']}; generator "
                f"{c['generator_cpu_s']}; whole machine {c['machine_busy_cpu_s']} (other people's "
                f"{c['machine_other_cpu_s']})"
            )
    out += [
        "",
        "Saturation (activity reports/s, open loop, on top of the runners' heartbeats):",
        "",
    ]
    for name, r in report["scenarios"].items():
        sat = r.get("saturation")
        if sat:
            steps = ", ".join(
                f"{x['target_per_s']}/s → p99 {x['activity']['p99_ms']} ms" for x in sat["steps"]
            )
            point = "below the first step" if sat["below_first_step"] else (
                f"{sat['saturation_per_s']}/s")  # fmt: skip
            out.append(f"- {name}: {point}; stopped {sat['stopped']} ({steps})")
    out += ["", "Resources per replica (peaks of 1 s samples):", ""]
    for name, r in report["scenarios"].items():
        res = r.get("resources")
        if res:
            idle = res["rss_mib_per_replica_idle"]
            line = f"- {name}: RSS " + (f"{idle} MiB before any session, " if idle else "")
            line += (
                f"{res['rss_mib_per_replica_steady']} MiB with {res['live_sessions']} live "
                f"sessions; database connections {res['db_connections_peak']} "
                f"({res['db_connections_per_replica_peak']} per replica)"
            )
            if SPECS[name].postgres:
                line += (
                    f"; connections waiting for the write lock: mean "
                    f"{res['write_lock_waiters_mean_steady']}, peak {res['write_lock_waiters_peak']}"
                )
            out.append(line)
    out += ["", "Session start (replicas after a takeover: the churned sessions only):", ""]
    for name, r in report["scenarios"].items():
        st = r.get("start")
        if st:
            out.append(
                f"- {name}: {st['sessions']} started at {st['per_s']}/s; POST /sessions "
                f"{_pp(st['session_start'])} ms; runner told (its long poll answered) "
                f"{_pp(st['runner_told'])} ms; ready {_pp(st['session_ready'])} ms; start to "
                f"active {_pp(st['start_to_active'])} ms"
            )
    if report.get("costs"):
        out += ["", "Cost of one request alone (bench/load_costs.py):", ""]
        out += cost_table(report["costs"], report["scenarios"])
    return "\n".join(out) + "\n"


# ---- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_cluster(needed: bool) -> Iterator[PostgresCluster | None]:
    if not needed:
        yield None
        return
    if find_bin_dir() is None:
        raise SystemExit(INSTALL_HINT)
    with running_cluster() as cluster:
        yield cluster


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--scenario", choices=[*SPECS, "all"], default="all")
    add("--sessions", type=int, default=1000, help="live sessions (one user each)")
    add("--runners", type=int, default=50)
    add("--duration", type=float, default=30.0, help="steady phase, seconds")
    add("--report-interval", type=float, default=5.0, help="s between an agent's reports")
    add("--start-concurrency", type=int, default=32, help="session starts in flight")
    add("--churn", type=int, default=0, help="sessions restarted on a takeover (0: 5 %%)")
    add("--ramp-start", type=float, default=5.0, help="first rate of the ramp, reports/s")
    add("--ramp-factor", type=float, default=1.6)
    add("--ramp-step-s", type=float, default=5.0)
    add(
        "--ramp-steps",
        type=int,
        default=18,
        help="at most (it stops where it saturates); 0: no ramp",
    )
    add("--costs-sessions", type=int, default=100, help="live sessions for load_costs; 0: skip")
    add("--quick", action="store_true",
        help="smoke check: 50 sessions, 5 runners, short phases; writes only with --out")  # fmt: skip
    add("--server-command", default=str(sup.OFFLOAD),
        help="runs a replica (+ `server --host --port`): to measure a candidate fix")  # fmt: skip
    add("--out", type=Path, default=RESULTS, help="where results are written")
    add("--no-write", action="store_true", help="print only, write no results")
    add("--render", type=Path, help="only rewrite the .md of this results .json")
    args = parser.parse_args(argv)
    if args.quick:
        quick = {"sessions": 50, "runners": 5, "duration": 4.0, "ramp_steps": 2,
                 "ramp_step_s": 1.5, "ramp_factor": 2.0, "costs_sessions": 10}  # fmt: skip
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.quick and args.out == RESULTS:
        args.no_write = True  # a smoke check leaves no results behind unless --out is given
    if args.sessions < 1 or args.runners < 1:
        parser.error("--sessions and --runners must be at least 1")
    args.churn = args.churn or max(5, args.sessions // 20)
    return args


def _git(*argv: str) -> str:
    out = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip()


async def main_async(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    names = list(SPECS) if args.scenario == "all" else [args.scenario]
    specs = [SPECS[name] for name in names]
    if any(spec.replicas > 1 for spec in specs):
        sup.ensure_nginx()
    report: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": argv,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "commit": _git("rev-parse", "--short", "HEAD"),
        "src_dirty": bool(_git("status", "--porcelain", "src")),
        "machine": sup.describe_machine(),
        "note": NOTE,
        "scenarios": {},
    }
    began = time.monotonic()
    running: Running | None = None
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(postgres_cluster(any(spec.postgres for spec in specs)))
        for position, spec in enumerate(specs):
            following = specs[position + 1] if position + 1 < len(specs) else None
            hand_over = bool(spec.postgres and following and following.postgres)
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="offload-load-")))
            try:
                result, running = await run_scenario(spec, args, cluster, root, running, hand_over)
                report["scenarios"][spec.name] = result
                if "tick_before" in result and "took_over" in result:  # the one it took over
                    report["scenarios"][result["took_over"]]["tick"] = result["tick_before"]
            except Exception as exc:  # noqa: BLE001 - the other scenarios still run
                say(f"  {spec.name} failed: {exc!r}")
                report["scenarios"][spec.name] = {"error": repr(exc)[:2000]}
                running = None
        if args.costs_sessions:
            say(f"\n== costs: each request alone, {args.costs_sessions} live sessions (SQLite)")
            report["costs"] = await measure_costs(
                args.costs_sessions, max(1, args.costs_sessions // 20), 30
            )
    report["seconds"] = round(time.monotonic() - began, 1)
    report["targets"] = targets(report["scenarios"])
    return report


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(report, table(report["scenarios"])))
        print(f"wrote {args.render.with_suffix('.md')}")
        return
    report = asyncio.run(main_async(args, argv))
    rows = table(report["scenarios"])
    say()
    for row in rows:
        say(row)
    if report.get("costs"):
        say()
        for row in cost_table(report["costs"], report["scenarios"]):
            say(row)
    say()
    for line in target_lines(report):
        say(line)
    say(f"total {report['seconds']} s")
    if args.no_write:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"load-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report, rows))
    say(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()

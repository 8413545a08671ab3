"""What one request costs a real `offload server` process: uvicorn, the HTTP parser and the
access log included (bench/load_costs.py drives the app in-process and sees none of them).

Each variant is one server process on the same SQLite database (the lifecycle clock off, so that
nothing else runs in it), started with `offload.server.main.uvicorn_options` (what
`offload server` runs) and the variant's overrides (event loop, HTTP parser, access log).  The
database gets `--sessions` live sessions on `--runners` runners, set up over HTTP as agents and
runners do.  Then, in `--rounds` rounds that take the variants in turn (this machine is shared and
noisy: interleaving spreads the noise over all of them), each variant answers:

- activity: `--requests` activity reports one at a time over one keep-alive connection;
- activity_c: as many with `--concurrency` connections in flight (the server's CPU per request
  when it has work queued, as under load);
- certificate: renewals one at a time;
- heartbeat: a runner's heartbeat with its environments (wait=0: the long poll's answer too).

Measured: the server's CPU (user + system of all its threads, /proc/PID/stat) per request, and
requests per server CPU-second; medians over the rounds.  Results: bench/results/serve-<stamp>.json
and a table on stdout.

    .venv/bin/python -m bench.serve_costs                       # the variants below
    .venv/bin/python -m bench.serve_costs --variants default,h11-asyncio
    git archive HEAD src | tar -x -C /tmp/head                  # against the last commit
    .venv/bin/python -m bench.serve_costs --variants default --baseline /tmp/head \
        --baseline-variant default                              # the code alone, same options
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh
import httpx

from bench import load_support as sup
from offload.core import schemas as s
from offload.core.config import ServerSettings
from tests.support.net import free_port

# name -> overrides of uvicorn_options ("default": exactly what `offload server` runs)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "h11-asyncio": {"loop": "asyncio", "http": "h11"},
    "h11-asyncio-no-access-log": {"loop": "asyncio", "http": "h11", "access_log": False},
    "no-access-log": {"access_log": False},
}


def serve(overrides: dict[str, Any]) -> None:
    """The server side (a subprocess): `offload server` with some uvicorn options replaced."""
    import uvicorn

    from offload.server import main
    from offload.server.app import create_app

    settings = ServerSettings()
    if hasattr(main, "uvicorn_options"):
        options = main.uvicorn_options(settings)
    else:  # a --baseline from before uvicorn_options: what its `serve` ran
        options = {"host": settings.host, "port": settings.port, "log_level": "info",
                   "access_log": True, "timeout_graceful_shutdown": 2}  # fmt: skip
    uvicorn.run(create_app(settings), **{**options, **overrides})


@dataclass
class Server:
    name: str
    overrides: dict[str, Any]
    data_dir: Path
    source: Path | None = None  # another checkout's src/ (--baseline); None: this one's
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        env.update(
            OFFLOAD_DATA_DIR=str(self.data_dir),
            OFFLOAD_TICK_INTERVAL_S="0",
            OFFLOAD_HOST="127.0.0.1",
            OFFLOAD_PORT=str(self.port),
        )
        if self.source is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.source), str(sup.REPO)])
        argv = [sys.executable, "-m", "bench.serve_costs", "--serve", json.dumps(self.overrides)]
        log = open(self.data_dir / f"server-{self.name}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=sup.REPO
        )
        deadline = time.monotonic() + sup.START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server {self.name} exited: see {log.name}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.name} did not answer /healthz")
            time.sleep(0.1)

    def cpu(self) -> float:
        assert self.process is not None
        return sup.cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Fleet:
    """What the setup made: the live sessions and the runners they are on."""

    sessions: list[tuple[str, str, str]]  # (session id, user token, public key)
    runners: list[tuple[str, str, list[str]]]  # (runner id, runner token, its session ids)


async def _post(client: httpx.AsyncClient, path: str, token: str, body: Any, **params: Any) -> Any:
    response = await client.post(
        s.API_PREFIX + path, json=body, params=params, headers={"Authorization": f"Bearer {token}"}
    )
    if not response.is_success:
        raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")
    return response.json()


async def set_up(url: str, seeded: sup.Seeded, sessions: int) -> Fleet:
    runners = len(seeded.runner_tokens)
    capacity = -(-sessions // runners) + 1
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        runner_ids = []
        for index, token in enumerate(seeded.runner_tokens):
            body = sup.registration(f"serve-runner-{index}", capacity)
            runner_ids.append((await _post(client, "/runners/register", token, body))["id"])
        for runner_id, token in zip(runner_ids, seeded.runner_tokens, strict=True):
            body = {"capacity": capacity, "warm": 1, "environments": []}
            await _post(client, f"/runners/{runner_id}/heartbeat", token, body, wait=0)
        placed: list[tuple[str, str, str]] = []
        by_runner: dict[str, list[str]] = {rid: [] for rid in runner_ids}
        for index in range(sessions):
            token = seeded.user_tokens[index]
            key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
            body = s.SessionCreate(client_public_key=key, client_name=f"laptop-{index}")
            info = await _post(client, "/sessions", token, body.model_dump(mode="json"))
            placed.append((info["id"], token, key))
            by_runner[info["runner"]["id"]].append(info["id"])
        tokens = dict(zip(runner_ids, seeded.runner_tokens, strict=True))
        for runner_id, ids in by_runner.items():
            for session_id in ids:
                path = f"/runners/{runner_id}/sessions/{session_id}/ready"
                await _post(client, path, tokens[runner_id], {"env_id": "env-" + session_id})
    return Fleet(placed, [(rid, tokens[rid], by_runner[rid]) for rid in runner_ids])


async def _timed(server: Server, count: int, concurrency: int, request: Any) -> dict[str, float]:
    """`count` calls of `request(client, index)` with `concurrency` connections in flight."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(request(client, i) for i in range(concurrency)))  # connect, warm
        latencies: list[float] = []
        queue = iter(range(count))

        async def worker() -> None:
            for index in queue:
                began = time.perf_counter()
                await request(client, index)
                latencies.append(time.perf_counter() - began)

        cpu_before, wall_before = server.cpu(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = server.cpu() - cpu_before, time.perf_counter() - wall_before
    latencies.sort()
    return {
        "cpu_ms_per_request": cpu * 1000 / count,
        "requests_per_cpu_s": count / cpu if cpu else float("inf"),
        "requests_per_s": count / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


async def measure(server: Server, fleet: Fleet, count: int, concurrency: int) -> dict[str, Any]:
    report = {"api_calls": 3, "open_streams": 1, "building": False}

    async def activity(client: httpx.AsyncClient, i: int) -> None:
        session_id, token, _ = fleet.sessions[i % len(fleet.sessions)]
        await _post(client, f"/sessions/{session_id}/activity", token, report)

    async def certificate(client: httpx.AsyncClient, i: int) -> None:
        session_id, token, key = fleet.sessions[i % len(fleet.sessions)]
        await _post(
            client, f"/sessions/{session_id}/certificate", token, {"client_public_key": key}
        )

    runner_id, runner_token, bound = fleet.runners[0]
    environments = [
        {"env_id": "env-" + sid, "session_id": sid, "state": "bound", "running_containers": 1,
         "containers_total": 1, "containers_created": 1, "images": ["busybox:latest"]}
        for sid in bound
    ]  # fmt: skip
    beat = {"capacity": len(bound) + 1, "warm": 1, "environments": environments}

    async def heartbeat(client: httpx.AsyncClient, _i: int) -> None:
        await _post(client, f"/runners/{runner_id}/heartbeat", runner_token, beat, wait=0)

    return {
        "activity": await _timed(server, count, 1, activity),
        "activity_c": await _timed(server, count, concurrency, activity),
        "certificate": await _timed(server, count // 2, 1, certificate),
        "heartbeat": await _timed(server, count // 5, 1, heartbeat),
        "heartbeat_environments": len(bound),
    }


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for endpoint in ("activity", "activity_c", "certificate", "heartbeat"):
        out[endpoint] = {
            key: round(statistics.median(r[endpoint][key] for r in rounds), 2)
            for key in rounds[0][endpoint]
        }
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="offload-serve-costs-") as tmp:
        data_dir = Path(tmp)
        seeded = sup.seed(ServerSettings(data_dir=data_dir), args.sessions, args.runners)
        servers = [Server(name, VARIANTS[name], data_dir) for name in names]
        if args.baseline:
            source = args.baseline.resolve() / "src"
            overrides = VARIANTS[args.baseline_variant]
            servers.append(Server("baseline", overrides, data_dir, source))
        try:
            for server in servers:
                server.start()
            fleet = await set_up(servers[0].url, seeded, args.sessions)
            results: dict[str, list[dict[str, Any]]] = {server.name: [] for server in servers}
            for round_ in range(args.rounds):
                for server in servers if round_ % 2 == 0 else reversed(servers):
                    results[server.name].append(
                        await measure(server, fleet, args.requests, args.concurrency)
                    )
        finally:
            for server in servers:
                server.stop()
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "machine": sup.describe_machine(),
        "variants": {name: VARIANTS[name] for name in names},
        "baseline": str(args.baseline) if args.baseline else None,
        "medians": {name: _medians(rounds) for name, rounds in results.items()},
        "rounds": results,
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--variants", default="default,h11-asyncio,no-access-log,h11-asyncio-no-access-log")
    add("--sessions", type=int, default=100)
    add("--runners", type=int, default=5)
    add("--requests", type=int, default=400, help="activity reports per round and variant")
    add("--concurrency", type=int, default=16)
    add("--rounds", type=int, default=3)
    add("--baseline", type=Path,
        help="also serve another checkout (its src/, e.g. `git archive HEAD`): variant `baseline`")  # fmt: skip
    add("--baseline-variant", default="h11-asyncio", choices=sorted(VARIANTS),
        help="the baseline's server options (h11-asyncio: as before uvicorn[standard]; default: "
             "the same as this checkout's, to compare the code alone)")  # fmt: skip
    add("--label", default="", help="a word for the results file name")
    add("--no-write", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print(f"{'variant':28} {'endpoint':12} {'CPU ms/req':>10} {'req/CPU-s':>10} {'p50 ms':>8}")
    for name, medians in report["medians"].items():
        for endpoint, row in medians.items():
            print(
                f"{name:28} {endpoint:12} {row['cpu_ms_per_request']:>10} "
                f"{row['requests_per_cpu_s']:>10} {row['p50_ms']:>8}"
            )
    if args.no_write:
        return
    sup.write_result("serve", args.label, report)


if __name__ == "__main__":
    main()

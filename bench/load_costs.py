"""What one request costs inside the control plane, one at a time: SQL statements and CPU.

The load scenarios measure a whole deployment under contention; this measures each endpoint
alone, in this process (`create_app` behind httpx's ASGI transport, the lifecycle clock off so
that nothing else runs), with `sessions` live sessions in the database:

- statements: SQL statements the request sent (an engine event counts them);
- cpu_ms: CPU of this process for the request (the ASGI client's share included, which is
  small next to the server's), median of `samples` requests;
- the lifecycle tick: one `lifecycle.tick` over every live session, which each replica runs
  every `tick_interval_s` (1 s).

It explains the load numbers (where a replica's CPU goes per request) and shows how the cost of
the tick grows with the number of live sessions.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import httpx
from sqlalchemy import event

from bench import load_support as sup
from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.server.app import create_app
from offload.server.services import lifecycle


class _Counter:
    def __init__(self) -> None:
        self.statements = 0

    def __call__(self, *_args: Any, **_kwargs: Any) -> None:
        self.statements += 1


async def _measure(
    counter: _Counter, samples: int, request: Callable[[int], Awaitable[None]]
) -> dict[str, Any]:
    cpu, wall, statements = [], [], []
    for index in range(samples):
        before_s, before_cpu, before_wall = (
            counter.statements,
            time.process_time(),
            time.perf_counter(),
        )
        await request(index)
        cpu.append(time.process_time() - before_cpu)
        wall.append(time.perf_counter() - before_wall)
        statements.append(counter.statements - before_s)
    return {
        "samples": samples,
        "statements": statistics.median(statements),
        "cpu_ms": round(statistics.median(cpu) * 1000, 2),
        "wall_ms": round(statistics.median(wall) * 1000, 2),
    }


async def measure_costs(
    sessions: int, runners: int, samples: int, database_url: str | None = None
) -> dict[str, Any]:
    """Per-endpoint cost with `sessions` live (active) sessions on `runners` runners."""
    with tempfile.TemporaryDirectory(prefix="offload-load-costs-") as tmp:
        settings = ServerSettings(data_dir=Path(tmp), database_url=database_url, tick_interval_s=0)
        seeded = sup.seed(settings, sessions + samples, runners)
        app = create_app(settings)
        ctx = app.state.context
        counter = _Counter()
        event.listen(ctx.db.engine, "before_cursor_execute", counter)
        transport = httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(transport=transport, base_url="http://bench" + s.API_PREFIX)
        try:
            return await _costs(client, ctx, counter, seeded, sessions, runners, samples)
        finally:
            await client.aclose()
            ctx.db.dispose()


async def _costs(
    client: httpx.AsyncClient,
    ctx: Any,
    counter: _Counter,
    seeded: sup.Seeded,
    sessions: int,
    runners: int,
    samples: int,
) -> dict[str, Any]:
    async def post(path: str, token: str, body: Any, **params: Any) -> Any:
        response = await client.post(
            path, json=body, params=params, headers={"Authorization": f"Bearer {token}"}
        )
        if not response.is_success:
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    capacity = -(-(sessions + samples) // runners) + 1
    runner_ids = []
    for index, token in enumerate(seeded.runner_tokens):
        body = sup.registration(f"cost-runner-{index}", capacity)
        runner_ids.append((await post("/runners/register", token, body))["id"])
    keys = [
        asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        for _ in range(sessions + samples)
    ]
    placed: dict[str, tuple[str, str]] = {}  # session -> (user token, key)
    by_runner: dict[str, list[str]] = {rid: [] for rid in runner_ids}

    async def start(index: int) -> dict[str, Any]:
        token, key = seeded.user_tokens[index], keys[index]
        body = s.SessionCreate(client_public_key=key, client_name=f"laptop-{index}")
        info = await post("/sessions", token, body.model_dump(mode="json"))
        placed[info["id"]] = (token, key)
        by_runner[info["runner"]["id"]].append(info["id"])
        return info

    runner_token = dict(zip(runner_ids, seeded.runner_tokens, strict=True))

    async def ready(session_id: str, runner_id: str) -> None:
        body = {"env_id": "env-" + session_id}
        path = f"/runners/{runner_id}/sessions/{session_id}/ready"
        await post(path, runner_token[runner_id], body)

    async def keep_online() -> None:  # runners silent for 30 s get no sessions
        for runner_id in runner_ids:
            body = {"capacity": capacity, "warm": 1, "environments": []}
            await post(f"/runners/{runner_id}/heartbeat", runner_token[runner_id], body, wait=0)

    for index in range(sessions):
        if index % 200 == 0:
            await keep_online()
        await start(index)
    for runner_id, ids in by_runner.items():
        for session_id in ids:
            await ready(session_id, runner_id)
    live = list(placed)
    out: dict[str, Any] = {"live_sessions": sessions, "runners": runners}

    async def activity(i: int) -> None:
        session_id = live[i % len(live)]
        token, _ = placed[session_id]
        body = {"api_calls": 3, "open_streams": 1, "building": False}
        await post(f"/sessions/{session_id}/activity", token, body)

    async def certificate(i: int) -> None:
        session_id = live[i % len(live)]
        token, key = placed[session_id]
        await post(f"/sessions/{session_id}/certificate", token, {"client_public_key": key})

    first_runner = runner_ids[0]

    async def heartbeat(_i: int) -> None:
        envs = [
            {"env_id": "env-" + sid, "session_id": sid, "state": "bound", "running_containers": 1,
             "containers_total": 1, "containers_created": 1, "images": ["busybox:latest"]}
            for sid in by_runner[first_runner]
        ]  # fmt: skip
        body = {"capacity": capacity, "warm": 1, "environments": envs}
        path = f"/runners/{first_runner}/heartbeat"
        await post(path, runner_token[first_runner], body, wait=0)

    async def session_start(i: int) -> None:
        await start(sessions + i)

    async def session_ready(i: int) -> None:  # the new sessions just started, in turn
        session_id = list(placed)[sessions + i]
        runner_id = next(r for r, ids in by_runner.items() if session_id in ids)
        await ready(session_id, runner_id)

    await keep_online()
    environments = len(by_runner[first_runner])
    for name, request in (
        ("activity", activity),
        ("certificate", certificate),
        ("heartbeat", heartbeat),
        ("session_start", session_start),
        ("session_ready", session_ready),
    ):
        out[name] = await _measure(counter, samples, request)
    out["heartbeat"]["environments_reported"] = environments

    async def tick(_i: int) -> None:
        await lifecycle.tick(ctx)

    out["lifecycle_tick"] = await _measure(counter, 3, tick)
    return out


def main() -> None:
    """`python -m bench.load_costs`: the costs alone, printed and written to bench/results/."""
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100, help="live sessions")
    parser.add_argument("--runners", type=int, default=5)
    parser.add_argument("--samples", type=int, default=30, help="requests per endpoint")
    parser.add_argument("--database-url", help="default: SQLite in a temp dir")
    parser.add_argument("--label", default="", help="a word for the results file name")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    costs = asyncio.run(measure_costs(args.sessions, args.runners, args.samples, args.database_url))
    for name, row in costs.items():
        if isinstance(row, dict):
            print(f"{name:15} {row['statements']:>5} statements {row['cpu_ms']:>8} ms CPU")
    if args.no_write:
        return
    report = {"args": vars(args), "machine": sup.describe_machine(), "costs": costs}
    sup.write_result("costs", args.label, report)


if __name__ == "__main__":
    main()

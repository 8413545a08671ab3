"""Three `offload server` replicas on one PostgreSQL behind nginx, as real processes, and the
faults a platform team meets: a replica SIGKILLed while every replica ticks, a replica killed
under live traffic, PostgreSQL SIGKILLed and restarted.

The replicas run on the wall clock; the test makes work due by writing the sessions' past into
the database (started 2000 s ago, last active 1000 s ago), so the expected outcome is exact and
independent of when each tick runs: idle at last activity + 300 s, wiped after the 5-minute
grace, billed exactly 1300 s.  After every fault the ledger's invariants are checked on the
database and the billed time compared for equality.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncssh
import httpx
import pytest
from sqlalchemy import func, select, update

from offload.core import schemas as s
from offload.core.api_client import RunnerClient, UserClient
from offload.core.schemas import SessionState as S
from offload.core.waiting import async_wait_until, wait_until
from offload.server.db.engine import Database
from offload.server.db.models import LedgerInterval, OffloadSession, Runner
from offload.server.services import accounts, admin, ledger, lifecycle, tokens
from tests.support.ledger_checks import ledger_violations
from tests.support.postgres import PostgresCluster, find_bin_dir
from tests.support.replicas import ReplicaFleet
from tests.unit.server.support import new_host_key_line, session_request

pytestmark = pytest.mark.slow

SESSIONS = 120
IDLE_TIMEOUT_S = 300
STARTED_AGO_S = 2000
ACTIVE_AGO_S = 1000
EXPECTED_BILLED_S = STARTED_AGO_S - ACTIVE_AGO_S + IDLE_TIMEOUT_S  # 1300


@dataclass
class Setup:
    cluster: PostgresCluster
    fleet: ReplicaFleet
    db: Database


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    bin_dir = find_bin_dir()
    assert bin_dir is not None, "PostgreSQL server binaries are missing (scripts/test.sh)"
    cluster = PostgresCluster(bin_dir, crash_safe=True)
    cluster.start()
    url = cluster.create_database("offload")
    # Runners of these tests are API clients that heartbeat only when a test says: keep them
    # placeable and not lost for the module's length.
    env = {"OFFLOAD_RUNNER_TIMEOUT_S": "3600", "OFFLOAD_RUNNER_LOST_AFTER_S": "3600"}
    fleet = ReplicaFleet(tmp_path_factory.mktemp("replicas"), url, 3, env)
    try:
        fleet.start()
        db = Database(url)
        yield Setup(cluster, fleet, db)
        db.dispose()
    finally:
        fleet.stop()
        cluster.stop()


def _users(db: Database, count: int, prefix: str) -> list[str]:
    """`count` members of one organisation with API tokens (one argon2 hash for all: quick)."""
    now = datetime.now(UTC)
    with db.transaction() as session:
        org = accounts.get_or_create_org(session, f"{prefix}-org", now)
        first = accounts.create_user(session, f"{prefix}-0", "pw-0123456789", now)
        made = [first]
        for index in range(1, count):
            user = accounts.create_user(session, f"{prefix}-{index}", "x", now)
            user.password_hash = first.password_hash
            made.append(user)
        for user in made:
            accounts.add_member(session, user, org, s.Role.MEMBER, now)
        return [tokens.issue_api_token(session, user.id, "test", now) for user in made]


@dataclass
class FakeRunner:
    """A runner as the control plane sees one: its API calls (the host itself is not needed)."""

    client: RunnerClient
    id: str
    token: str


async def _runner(db: Database, url: str, name: str) -> FakeRunner:
    """A new runner; the earlier tests' runners are drained, so sessions come to this one."""
    with db.transaction() as session:
        for earlier in session.scalars(select(Runner.name).where(Runner.draining.is_(False))):
            admin.set_draining(session, earlier, True, datetime.now(UTC))
    token = db.call(tokens.issue_runner_token, name, datetime.now(UTC))
    client = RunnerClient(url, token)
    registered = await client.register(
        s.RunnerRegister(
            name=name,
            ssh_host="127.0.0.1",
            ssh_port=8422,
            host_key=new_host_key_line(),
            capacity=SESSIONS,
            instance_types=[s.InstanceType.STANDARD],
        )
    )
    return FakeRunner(client, registered.id, token)


async def _start_sessions(url: str, user_tokens: list[str], runner: FakeRunner) -> list[str]:
    async def one(token: str) -> str:
        async with UserClient(url, token) as user:
            key = asyncssh.generate_private_key("ssh-ed25519")
            created = await user.create_session(session_request(key, idle_timeout_s=IDLE_TIMEOUT_S))
        await runner.client.session_ready(runner.id, created.id, f"env-{created.id}")
        return created.id

    ids: list[str] = []
    for batch in range(0, len(user_tokens), 20):
        ids += await asyncio.gather(*(one(t) for t in user_tokens[batch : batch + 20]))
    return ids


def _age(db: Database, ids: list[str], now: datetime) -> None:
    """Write the sessions' past: started STARTED_AGO_S ago, last active ACTIVE_AGO_S ago."""
    started = now - timedelta(seconds=STARTED_AGO_S)
    with db.transaction() as session:
        session.execute(
            update(OffloadSession)
            .where(OffloadSession.id.in_(ids))
            .values(started_at=started, last_activity_at=now - timedelta(seconds=ACTIVE_AGO_S))
        )
        session.execute(
            update(LedgerInterval).where(LedgerInterval.session_id.in_(ids)).values(start=started)
        )


def _states(db: Database, ids: list[str]) -> dict[str, int]:
    with db.transaction(read_only=True) as session:
        rows = session.execute(
            select(OffloadSession.state, func.count())
            .where(OffloadSession.id.in_(ids))
            .group_by(OffloadSession.state)
        ).all()
    return {state: count for state, count in rows}


def _wait_all_terminated(db: Database, ids: list[str], what: str) -> None:
    wait_until(lambda: _states(db, ids) == {S.TERMINATED.value: len(ids)}, 60, what, 0.2)


def _assert_exact_outcome(db: Database, ids: list[str], now: datetime) -> None:
    idle_at = now - timedelta(seconds=ACTIVE_AGO_S - IDLE_TIMEOUT_S)
    with db.transaction(read_only=True) as session:
        assert ledger_violations(session) == []
        for session_id in ids:
            row = session.get_one(OffloadSession, session_id)
            assert (row.state, row.end_reason) == (S.TERMINATED.value, lifecycle.END_IDLE_EXPIRED)
            assert row.idle_since == idle_at
            assert row.ended_at == idle_at + timedelta(seconds=300)
            intervals = ledger.session_intervals(session, session_id)
            assert len(intervals) == 1  # idled once, not twice
            assert ledger.total_seconds(intervals, now) == EXPECTED_BILLED_S


async def test_a_replica_killed_while_all_tick_loses_no_transition_and_applies_none_twice(
    setup: Setup,
) -> None:
    fleet, db = setup.fleet, setup.db
    runner = await _runner(db, fleet.url, "replica-runner-1")
    ids = await _start_sessions(fleet.url, _users(db, SESSIONS, "tick"), runner)
    assert _states(db, ids) == {S.ACTIVE.value: SESSIONS}

    now = datetime.now(UTC)
    _age(db, ids, now)  # from here every replica's next tick finds all of them due
    fleet.replicas[0].kill()
    _wait_all_terminated(db, ids, "the surviving replicas to idle and wipe every session")
    _assert_exact_outcome(db, ids, now)
    await runner.client.aclose()


async def test_clients_keep_working_through_the_load_balancer_when_a_replica_dies(
    setup: Setup,
) -> None:
    fleet, db = setup.fleet, setup.db
    fleet.revive()
    runner = await _runner(db, fleet.url, "replica-runner-2")
    user_tokens = _users(db, 20, "traffic")
    ids = await _start_sessions(fleet.url, user_tokens, runner)
    traffic_began = asyncio.Event()

    async def traffic(rounds: int) -> list[int]:
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=fleet.url + s.API_PREFIX, timeout=30) as http:
            for _ in range(rounds):
                for token, session_id in zip(user_tokens, ids, strict=True):
                    response = await http.post(
                        f"/sessions/{session_id}/activity",
                        json={"api_calls": 1},
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    statuses.append(response.status_code)
                    traffic_began.set()
                beat = await http.post(
                    f"/runners/{runner.id}/heartbeat",
                    json={"capacity": SESSIONS, "warm": 0},
                    headers={"Authorization": f"Bearer {runner.token}"},
                )
                statuses.append(beat.status_code)
        return statuses

    async def kill_one_meanwhile() -> None:
        await traffic_began.wait()  # the kill lands among the requests, not before them
        await asyncio.to_thread(fleet.replicas[1].kill)

    statuses, _ = await asyncio.gather(traffic(10), kill_one_meanwhile())
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert _states(db, ids) == {S.ACTIVE.value: len(ids)}
    await runner.client.aclose()


async def test_postgresql_killed_and_restarted_loses_nothing(setup: Setup) -> None:
    fleet, db, cluster = setup.fleet, setup.db, setup.cluster
    fleet.revive()
    runner = await _runner(db, fleet.url, "replica-runner-3")
    user_tokens = _users(db, 10, "pgkill")
    ids = await _start_sessions(fleet.url, user_tokens, runner)
    now = datetime.now(UTC)
    _age(db, ids, now)  # committed before the crash: must survive it

    cluster.kill()
    async with httpx.AsyncClient(base_url=fleet.url + s.API_PREFIX, timeout=30) as http:
        down = await http.get("/me", headers={"Authorization": f"Bearer {user_tokens[0]}"})
        assert down.status_code == 503, down.text
        body = down.json()
        assert body["code"] == "unavailable" and body["fix"] and down.headers["Retry-After"]
        cluster.restart()

        async def me_works() -> bool:
            answer = await http.get("/me", headers={"Authorization": f"Bearer {user_tokens[0]}"})
            return answer.status_code == 200

        await async_wait_until(me_works, 60, "the replicas to reconnect", interval=0.2)

    db.engine.dispose()  # the test's own pool holds connections of the killed server
    _wait_all_terminated(db, ids, "the replicas to finish the due work after the restart")
    _assert_exact_outcome(db, ids, now)
    await runner.client.aclose()


async def test_a_change_on_one_replica_wakes_a_runner_poll_parked_on_another(
    setup: Setup,
) -> None:
    """LISTEN/NOTIFY between replicas: the runner's long poll on replica 2 answers as soon as
    replica 1 places a session on it, not when its 50 s wait runs out."""
    fleet, db = setup.fleet, setup.db
    fleet.revive()
    parked_on, placed_on = fleet.replicas[2].url, fleet.replicas[1].url
    runner = await _runner(db, parked_on, "replica-runner-4")
    poller = RunnerClient(parked_on, runner.token, timeout=120)
    report = s.RunnerHeartbeat(capacity=SESSIONS, warm=0)
    await poller.heartbeat(runner.id, report)  # a fresh registration answers at once
    parked = asyncio.create_task(poller.heartbeat(runner.id, report, wait_s=50))
    [token] = _users(db, 1, "wake")
    async with UserClient(placed_on, token) as user:
        key = asyncssh.generate_private_key("ssh-ed25519")
        created = await user.create_session(session_request(key))
    assert created.runner is not None and created.runner.name == "replica-runner-4"
    desired = await asyncio.wait_for(parked, timeout=20)  # woken, not timed out at 50 s
    assert created.id in [item.session_id for item in desired.sessions]
    await poller.aclose()
    await runner.client.aclose()


async def _parked_polls(url: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        text = (await http.get("/metrics")).text
    [line] = [x for x in text.splitlines() if x.startswith("offload_runner_polls_parked ")]
    return int(float(line.split()[1]))


async def test_a_replica_told_to_stop_answers_the_runner_poll_parked_on_it(setup: Setup) -> None:
    """A rolling restart: SIGTERM to a replica while a runner's long poll is parked there.  The
    poll gets its answer, the runner's desired sessions, not the 500 of a request that uvicorn
    cancels when its grace runs out; the replica exits cleanly, and the runner's next poll
    finds another replica."""
    fleet, db = setup.fleet, setup.db
    fleet.revive()
    replica = fleet.replicas[0]
    assert replica.process is not None
    runner = await _runner(db, replica.url, "replica-runner-5")
    poller = RunnerClient(replica.url, runner.token, timeout=120)
    report = s.RunnerHeartbeat(capacity=SESSIONS, warm=0)
    await poller.heartbeat(runner.id, report)  # a fresh registration answers at once
    parked = asyncio.create_task(poller.heartbeat(runner.id, report, wait_s=50))

    async def one_parked() -> bool:
        return await _parked_polls(replica.url) == 1

    await async_wait_until(one_parked, 20, "the runner's poll parked on the replica")
    logged = replica.log.stat().st_size
    replica.process.send_signal(signal.SIGTERM)

    desired = await asyncio.wait_for(parked, timeout=20)  # answered, not cancelled
    assert desired.sessions == []  # this runner holds no session
    # uvicorn shuts down, then re-raises the signal it caught, so the exit is by SIGTERM.
    assert await asyncio.to_thread(replica.process.wait, 20) == -signal.SIGTERM
    with replica.log.open("rb") as log:
        log.seek(logged)
        shutdown = log.read().decode(errors="replace")
    assert "Finished server process" in shutdown, shutdown
    assert "Exception in ASGI application" not in shutdown
    assert "timeout graceful shutdown exceeded" not in shutdown
    async with RunnerClient(fleet.url, runner.token) as through_balancer:
        assert (await through_balancer.heartbeat(runner.id, report)).sessions == []
    await poller.aclose()
    await runner.client.aclose()

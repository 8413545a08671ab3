"""Restarting the control plane mid-session loses nothing and double-counts nothing."""

from __future__ import annotations

from datetime import timedelta

import asyncssh
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from offload.core import schemas as s
from offload.core.api_client import UserClient
from offload.core.config import ServerSettings
from offload.core.waiting import wait_until
from offload.server.app import create_app
from offload.server.context import ServerContext
from offload.server.db.engine import Database
from offload.server.db.migrate import alembic_config, upgrade_database
from offload.server.db.models import OffloadSession
from offload.server.services import accounts, ledger, lifecycle, tokens

from .support import BUSY, new_host_key_line, public_line

S = s.SessionState


async def test_a_restart_mid_session_keeps_state_and_ledger(
    start_active, settings: ServerSettings, app_for, client_for, clock
):
    user, _, info = await start_active(idle_timeout_s=60)
    t0 = clock()
    clock.advance(30)
    await user.client.report_activity(info.id, BUSY)

    # Restart 1: a new app on the same database; the session went idle while it was down.
    second = app_for(settings)
    ctx2: ServerContext = second.state.context
    client2: UserClient = client_for(second, user.token)
    clock.advance(120)
    await lifecycle.tick(ctx2)
    idle = await client2.get_session(info.id)
    assert (idle.state, idle.idle_since, idle.billed_s) == (
        S.IDLE,
        t0 + timedelta(seconds=90),
        90,
    )
    resumed = await client2.report_activity(info.id, BUSY)  # 60 s into grace
    assert (resumed.state, resumed.billed_s) == (S.ACTIVE, 150)

    # Restart 2, and two clocks ticking at once (old and new process): nothing counts twice.
    third = app_for(settings)
    ctx3: ServerContext = third.state.context
    clock.advance(50)
    await lifecycle.tick(ctx2)
    await lifecycle.tick(ctx3)
    stopped = await client_for(third, user.token).stop_session(info.id)
    assert stopped.billed_s == 200  # continuous from start to stop
    with ctx3.db.transaction(read_only=True) as db:
        assert ledger.session_intervals(db, info.id) == [
            ledger.Interval(t0, t0 + timedelta(seconds=200))
        ]
        assert ledger.user_day_seconds(db, user.id, clock()) == 200
    usage = await client_for(third, user.token).usage()
    assert usage.total_billed_s == 200


def test_the_lifecycle_migration_upgrades_a_database_with_sessions(empty_database_url: str):
    db = Database(empty_database_url)
    try:
        config = alembic_config(db.url)
        with db.engine.connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
        with db.engine.begin() as connection:
            connection.execute(
                text("INSERT INTO organizations VALUES ('o1', 'org', '2025-01-01 00:00:00');")
            )
            connection.execute(
                text("INSERT INTO users VALUES ('u1', 'ann', 'x', '2025-01-01 00:00:00', 'o1')")
            )
            connection.execute(
                text(
                    "INSERT INTO sessions (id, user_id, org_id, state, instance_type, gpu, "
                    "idle_timeout_s, client_name, client_public_key, created_at) VALUES "
                    "('ses_1', 'u1', 'o1', 'active', 'standard', false, 300, '', 'k', "
                    "'2025-01-01 00:00:00')"
                )
            )
        upgrade_database(db)
        with db.transaction(read_only=True) as session:
            row = session.execute(
                select(
                    OffloadSession.images,
                    OffloadSession.containers_max,
                    OffloadSession.replacement_noticed,
                )
            ).one()
        assert tuple(row) == ([], 0, False)
    finally:
        db.dispose()


def test_the_app_runs_the_lifecycle_clock_in_the_background(settings, clock):
    """Under a server (lifespan started), ticks happen by themselves and stop with the app."""
    app = create_app(settings.model_copy(update={"tick_interval_s": 0.01}), clock)
    ctx: ServerContext = app.state.context
    with ctx.db.transaction() as db:
        org = accounts.get_or_create_org(db, "bg", clock())
        user = accounts.create_user(db, "bg-user", "pw", clock())
        accounts.add_member(db, user, org, s.Role.MEMBER, clock())
        user_token = tokens.issue_api_token(db, user.id, "t", clock())
        runner_token = tokens.issue_runner_token(db, "bg-runner", clock())
    as_user = {"Authorization": f"Bearer {user_token}"}
    as_runner = {"Authorization": f"Bearer {runner_token}"}
    with TestClient(app, base_url="http://offload.test") as http:
        runner = s.RunnerRegister(
            name="bg-runner", ssh_host="h", ssh_port=22, host_key=new_host_key_line(), capacity=1
        )
        runner_id = http.post(
            "/api/v1/runners/register", json=runner.model_dump(mode="json"), headers=as_runner
        ).json()["id"]
        key = public_line(asyncssh.generate_private_key("ssh-ed25519"))
        body = s.SessionCreate(client_public_key=key, idle_timeout_s=10)
        session_id = http.post(
            "/api/v1/sessions", json=body.model_dump(mode="json"), headers=as_user
        ).json()["id"]
        http.post(
            f"/api/v1/runners/{runner_id}/sessions/{session_id}/ready",
            json={"env_id": "e"},
            headers=as_runner,
        )
        clock.advance(10)

        def idle() -> bool:
            answer = http.get(f"/api/v1/sessions/{session_id}", headers=as_user).json()
            return answer["state"] == "idle"

        wait_until(idle, timeout=10, what="the background clock to idle the session")

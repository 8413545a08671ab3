"""The lifecycle tick reads only the live sessions something may be due for
(`lifecycle.due_candidates`), and finds exactly what reading every live session finds.

The reference is the rule itself: every live session's facts through `lifecycle.evaluate`, as
the tick did before it skipped the settled ones.  The sessions' columns are spread over the
edges of each rule (a second either side of the idle moment, the quiet prompt's wait, the grace
and the prompt cadences), in organisations of each fair-use policy and a metered one, on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.server.db.models import LedgerInterval, OffloadSession
from offload.server.services import ledger, lifecycle
from offload.server.services.lifecycle import Rules

S = s.SessionState
RULES = Rules()


def _every_live_session_due(db: Db, now: datetime, rules: Rules) -> list[str]:
    """What the tick found when it read every live session."""
    rows = db.scalars(
        select(OffloadSession).where(OffloadSession.state.in_((S.ACTIVE.value, S.IDLE.value)))
    ).all()
    return sorted(
        row.id for row in rows if lifecycle.evaluate(lifecycle.facts_of(db, row, now), now, rules)
    )


def _due(db: Db, now: datetime, rules: Rules) -> list[str]:
    return sorted(lifecycle.due_session_ids(db, now, rules))


def _candidates(db: Db, now: datetime, rules: Rules) -> set[str]:
    return {row.id for row in lifecycle.due_candidates(db, now, rules)}


def _set_columns(db: Db, session_id: str, values: dict[str, Any]) -> None:
    db.execute(update(OffloadSession).where(OffloadSession.id == session_id).values(**values))


def _past_fair_use(db: Db, session_id: str, now: datetime) -> None:
    """8.5 billed hours today for the session's user (an earlier stretch of the day)."""
    row = db.get_one(OffloadSession, session_id)
    day_start = ledger.utc_day(now)[0]
    assert now >= day_start + timedelta(hours=8, minutes=30)
    db.add(
        LedgerInterval(
            session_id=row.id,
            user_id=row.user_id,
            org_id=row.org_id,
            instance_type=row.instance_type,
            start=day_start,
            end=day_start + timedelta(hours=8, minutes=30),
        )
    )


def _ago(now: datetime, seconds: float | None) -> datetime | None:
    return None if seconds is None else now - timedelta(seconds=seconds)


def _edge_columns(pick: random.Random, now: datetime) -> dict[str, Any]:
    """Columns a live session may have, at and around the edges of each rule."""
    values: dict[str, Any] = {
        "idle_timeout_s": pick.choice([10, 60, 179, 180, 181, 300, 3600]),
        "started_at": _ago(now, pick.choice([0, 60, 3599, 3600, 3601, 10799, 10800, 10801])),
        "last_activity_at": _ago(
            now, pick.choice([None, 0, 5, 9, 10, 11, 179, 180, 181, 299, 300, 301, 3480, 3600])
        ),
        "last_long_prompt_at": _ago(now, pick.choice([None, None, 0, 3599, 3600, 3601, 10800])),
        "prompt_id": None,
        "prompt_reason": None,
        "prompt_asked_at": None,
        "prompt_expires_at": None,
        "idle_since": None,
        "state": S.ACTIVE.value,
    }
    if pick.random() < 0.25:
        values["state"] = S.IDLE.value
        values["idle_since"] = _ago(now, pick.choice([0, 299, 300, 301, 1000]))
    elif pick.random() < 0.3:
        values["prompt_id"] = f"prm_{pick.randrange(16**12):012x}"
        values["prompt_reason"] = pick.choice(list(s.PromptReason)).value
        values["prompt_asked_at"] = _ago(now, 60)
        values["prompt_expires_at"] = _ago(now, pick.choice([1, 0, -60]))
    return values


async def _teams(make_user, start_active, runner, policies: list[s.FairUsePolicy | str], each: int):
    """Sessions on `runner` in organisations of each policy ("metered": committed minutes)."""
    session_ids: list[str] = []
    for policy in policies:
        owner = make_user(role=s.Role.OWNER)
        if policy == "metered":
            terms = s.OrgBillingUpdate(committed_minutes_per_month=600, on_demand_enabled=False)
            await owner.client.update_org_billing(owner.org, terms)
        else:
            update_ = s.OrgSettingsUpdate(fair_use_policy=s.FairUsePolicy(policy))
            await owner.client.update_org_settings(owner.org, update_)
        for _ in range(each):
            _, _, info = await start_active(user=make_user(org=owner.org), runner=runner)
            session_ids.append(info.id)
    return session_ids


async def test_the_tick_finds_what_reading_every_live_session_finds(
    make_user, make_runner, start_active, ctx, clock
):
    policies: list[s.FairUsePolicy | str] = [*s.FairUsePolicy, "metered"]
    runner = await make_runner(capacity=40)
    session_ids = await _teams(make_user, start_active, runner, policies, each=8)
    day_start = ledger.utc_day(clock())[0]
    clock.advance(max(0.0, (day_start + timedelta(hours=10) - clock()).total_seconds()))
    now = clock()
    for session_id in session_ids[::2]:  # half the users are past the day's fair use
        await ctx.db.run(_past_fair_use, session_id, now)
    pick = random.Random(20261203)
    found_due = skipped = 0
    for round_ in range(6):
        for session_id in session_ids:
            await ctx.db.run(_set_columns, session_id, _edge_columns(pick, now))
        for later in (0, 1, 10, 180, 3600):
            at = now + timedelta(seconds=later)
            expected = await ctx.db.read(_every_live_session_due, at, RULES)
            assert await ctx.db.read(_due, at, RULES) == expected, (round_, later)
            found_due += len(expected)
            skipped += len(session_ids) - len(await ctx.db.read(_candidates, at, RULES))
    # Neither side is vacuous: sessions were due, and settled ones were left unread.
    assert found_due > 0 and skipped > 0


async def test_a_session_in_use_is_left_unread_until_it_could_be_due(
    make_user, start_active, ctx, clock, tick
):
    user, _, info = await start_active(idle_timeout_s=300)
    clock.advance(60)
    await user.client.report_activity(info.id, s.ActivityReport(api_calls=1))
    assert info.id not in await ctx.db.read(_candidates, clock(), RULES)

    # Quiet for the quiet prompt's wait: read again, and the prompt is asked on time.
    clock.advance(RULES.quiet_prompt_after_s)
    assert info.id in await ctx.db.read(_candidates, clock(), RULES)
    await tick()
    asked = await user.client.get_session(info.id)
    assert asked.prompt is not None and asked.prompt.reason is s.PromptReason.QUIET


async def test_sessions_of_stop_and_metered_organisations_are_always_read(
    make_user, make_runner, start_active, ctx, clock
):
    policies: list[s.FairUsePolicy | str] = [s.FairUsePolicy.STOP, "metered", s.FairUsePolicy.WARN]
    session_ids = await _teams(make_user, start_active, await make_runner(), policies, 1)
    stop, metered, warn = session_ids
    candidates = await ctx.db.read(_candidates, clock(), RULES)
    assert stop in candidates and metered in candidates and warn not in candidates

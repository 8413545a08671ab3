"""Property tests of the ledger: continuous billing across short idles, no overlap or double
count, totals equal the sum of intervals, the daily fair-use counter resets at 00:00 UTC, and
priced spend adds up.  The last property drives the real API and database."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncssh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.core import schemas as s
from offload.server.services import billing, ledger, lifecycle
from offload.server.services.ledger import Interval

from .support import BUSY, session_request

T0 = datetime(2025, 3, 30, 20, 0, tzinfo=UTC)  # near a day's and a month's end
S = s.SessionState

steps = st.lists(
    st.tuples(st.sampled_from(["open", "close", "resume"]), st.integers(0, 6 * 3600)),
    max_size=30,
)


def _run(ops: list[tuple[str, int]]) -> tuple[list[Interval], datetime]:
    intervals: list[Interval] = []
    now = T0
    for op, gap in ops:
        now += timedelta(seconds=gap)
        if op == "open":
            intervals = ledger.opened(intervals, now)
        elif op == "close":
            intervals = ledger.closed(intervals, now)
        else:
            intervals = ledger.resumed(intervals)
    return intervals, now


@given(steps)
def test_intervals_never_overlap_and_totals_are_their_sum(ops):
    intervals, now = _run(ops)
    assert ledger.is_well_formed(intervals)
    total = ledger.total_seconds(intervals, now)
    assert total == sum((i.end_or(now) - i.start).total_seconds() for i in intervals)
    assert sum(ledger.per_utc_day(intervals, now).values()) == pytest.approx(total)
    assert ledger.seconds_within(intervals, T0 - timedelta(days=1), now, now) == pytest.approx(
        total
    )
    assert total <= (now - T0).total_seconds()


@given(steps, st.integers(0, 30 * 86400))
def test_the_daily_counter_holds_only_the_utc_day_of_now(ops, later_s):
    intervals, end = _run(ops)
    now = end + timedelta(seconds=later_s)
    day_start, day_end = ledger.utc_day(now)
    today = ledger.seconds_within(intervals, day_start, day_end, now)
    assert 0 <= today <= (now - day_start).total_seconds() + 1e-6
    assert today == pytest.approx(ledger.per_utc_day(intervals, now).get(now.date(), 0.0))
    # Work that ended before midnight never counts on the new day.
    if all(i.end is not None and i.end <= day_start for i in intervals):
        assert today == 0


RULES = lifecycle.Rules(long_session_prompt_every_s=1e9)  # only idle and grace in play


def _simulate(timeout: int, gaps: list[int]) -> tuple[list[Interval], datetime, S]:
    """The rules and the ledger, composed as the control plane composes them."""
    facts = lifecycle.Facts(S.ACTIVE, timeout, started_at=T0, last_activity_at=T0)
    intervals = ledger.opened([], T0)
    now = T0
    for gap in gaps:
        now += timedelta(seconds=gap)
        for action in lifecycle.evaluate(facts, now, RULES):
            if action.kind is not lifecycle.ActionKind.ASK:
                intervals = ledger.closed(intervals, action.at)
            facts = lifecycle.after(facts, action)
        if facts.state is S.TERMINATED:
            break
        if facts.state is S.IDLE:
            intervals = ledger.resumed(intervals)
        facts = replace(facts, state=S.ACTIVE, idle_since=None, last_activity_at=now, prompt=None)
    return intervals, now, facts.state


@given(st.integers(10, 3600), st.lists(st.integers(0, 7200), min_size=1, max_size=20))
def test_idle_shorter_than_grace_is_billed_as_continuous_use(timeout, gaps):
    intervals, now, state = _simulate(timeout, gaps)
    assert ledger.is_well_formed(intervals)
    grace = RULES.grace_s
    expected, stopped = 0.0, False
    for gap in gaps:
        if gap >= timeout + grace:  # grace ran out: billed up to the idle moment, then gone
            expected += timeout
            stopped = True
            break
        expected += gap
    assert (state is S.TERMINATED) == stopped
    if not stopped:
        assert len(intervals) == 1  # one continuous stretch
    assert ledger.total_seconds(intervals, now) == expected


@given(
    st.integers(0, 600),
    st.floats(0.5, 20),
    st.lists(st.tuples(st.integers(0, 40 * 86400), st.integers(1, 20 * 3600)), max_size=8),
)
def test_priced_spend_adds_up(committed, rate, raw):
    """Without credits: each month, on-demand spend = minutes beyond committed x rate."""
    pieces, cursor = [], T0
    for gap, length in raw:
        cursor += timedelta(seconds=gap)
        pieces.append(
            ledger.Piece("x", "standard", Interval(cursor, cursor + timedelta(seconds=length)))
        )
        cursor += timedelta(seconds=length)
    now = cursor + timedelta(seconds=1)
    terms = billing.Terms(committed, True, None, {"standard": rate})
    current = billing.standing(terms, pieces, now)
    lo, hi = ledger.utc_month(now)
    used = ledger.seconds_within((p.interval for p in pieces), lo, hi, now) / 60
    assert current.used_minutes == pytest.approx(used)
    assert current.on_demand_spent_cents == pytest.approx(max(0.0, used - committed) * rate)
    assert current.committed_left_minutes == pytest.approx(max(0.0, committed - used))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(gaps=st.lists(st.integers(1, 1200), min_size=1, max_size=6))
async def test_through_the_api_short_idles_bill_continuously(
    gaps, make_user, make_runner, clock, tick
):
    """The real path: activity reports, the clock's ticks, the database ledger."""
    clock.advance(3600)  # earlier examples' runners and sessions are long gone
    await tick()
    runner = await make_runner()
    user = make_user()
    key = asyncssh.generate_private_key("ssh-ed25519")
    created = await user.client.create_session(session_request(key, idle_timeout_s=60))
    await runner.client.session_ready(runner.id, created.id, "env")
    expected, stopped = 0.0, False
    for gap in gaps:
        clock.advance(gap)
        await tick()
        info = await user.client.report_activity(created.id, BUSY)
        if gap >= 60 + RULES.grace_s:
            expected += 60
            stopped = True
            assert info.state is S.TERMINATED
            break
        expected += gap
        assert info.state is S.ACTIVE
    final = await user.client.get_session(created.id)
    assert final.billed_s == expected
    if not stopped:
        await user.client.stop_session(created.id)

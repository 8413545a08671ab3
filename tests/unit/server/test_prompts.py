"""Prompts: after 3 quiet minutes, every 3 hours of session, hourly past 8 hours in the day;
answers keep / idle, and no answer means idle."""

from __future__ import annotations

from datetime import timedelta

import pytest

from offload.core import schemas as s
from offload.core.errors import Conflict

from .support import BUSY, keep_busy

S = s.SessionState
KEEP = s.PromptAnswer(answer=s.PromptAnswerChoice.KEEP)
IDLE = s.PromptAnswer(answer=s.PromptAnswerChoice.IDLE)


async def _quiet_prompt(start_active, clock, tick):
    user, runner, info = await start_active()  # the default idle timeout: 5 minutes
    clock.advance(179)
    await tick()
    assert (await user.client.get_session(info.id)).prompt is None
    clock.advance(1)
    await tick()
    return user, runner, await user.client.get_session(info.id)


async def test_after_three_quiet_minutes_a_prompt_asks_and_no_answer_means_idle(
    start_active, clock, tick
):
    user, runner, info = await _quiet_prompt(start_active, clock, tick)
    assert info.prompt is not None
    assert info.prompt.reason is s.PromptReason.QUIET
    assert info.prompt.asked_at == clock()
    assert info.prompt.expires_at == clock() + timedelta(seconds=120)  # the answer time
    assert info.prompt.message

    clock.advance(119)
    await tick()
    assert (await user.client.get_session(info.id)).state is S.ACTIVE
    clock.advance(1)
    await tick()
    idle = await user.client.get_session(info.id)
    assert (idle.state, idle.prompt, idle.billed_s) == (S.IDLE, None, 300)


async def test_keep_restarts_the_quiet_clock(start_active, clock, tick):
    user, _, info = await _quiet_prompt(start_active, clock, tick)
    clock.advance(10)
    kept = await user.client.answer_prompt(info.id, KEEP)
    assert (kept.state, kept.prompt, kept.time_until_idle_s) == (S.ACTIVE, None, 300)
    clock.advance(179)
    await tick()
    assert (await user.client.get_session(info.id)).prompt is None
    clock.advance(1)
    await tick()
    assert (await user.client.get_session(info.id)).prompt is not None  # the next quiet stretch


async def test_answer_idle_goes_idle_now(start_active, clock, tick):
    user, runner, info = await _quiet_prompt(start_active, clock, tick)
    idle = await user.client.answer_prompt(info.id, IDLE)
    assert (idle.state, idle.idle_since, idle.billed_s) == (S.IDLE, clock(), 180)
    assert (await runner.heartbeat()).sessions[0].paused is True


async def test_activity_clears_a_quiet_prompt(start_active, clock, tick):
    user, _, info = await _quiet_prompt(start_active, clock, tick)
    clock.advance(30)
    back = await user.client.report_activity(info.id, BUSY)
    assert (back.prompt, back.time_until_idle_s) == (None, 300)


async def test_an_answer_to_a_closed_prompt_is_refused(start_active, clock, tick):
    user, _, info = await _quiet_prompt(start_active, clock, tick)
    await user.client.report_activity(info.id, BUSY)  # clears it
    await tick()
    stale = s.PromptAnswer(answer=s.PromptAnswerChoice.KEEP, prompt_id="prm_000000000000")
    clock.advance(180)
    await tick()  # a new prompt opens
    with pytest.raises(Conflict, match="no longer open"):
        await user.client.answer_prompt(info.id, stale)


async def test_a_long_idle_timeout_is_honoured_the_prompt_comes_before_its_end(
    start_active, clock, tick
):
    user, _, info = await start_active(idle_timeout_s=3600)
    clock.advance(3600 - 121)
    await tick()
    assert (await user.client.get_session(info.id)).prompt is None
    clock.advance(1)
    await tick()
    prompt = (await user.client.get_session(info.id)).prompt
    assert prompt is not None and prompt.expires_at == clock() + timedelta(seconds=120)


async def test_short_idle_timeouts_idle_before_any_quiet_prompt(start_active, clock, tick):
    user, _, info = await start_active(idle_timeout_s=120)
    for _ in range(12):
        clock.advance(10)
        await tick()
        current = await user.client.get_session(info.id)
        assert current.prompt is None
    assert current.state is S.IDLE


async def test_every_three_hours_a_long_session_is_asked_and_no_answer_means_idle(
    start_active, clock, tick
):
    user, _, info = await start_active(idle_timeout_s=3600)
    t0 = clock()
    busy = await keep_busy(user, info.id, clock, tick, 3 * 3600 - 1800, answer_prompts=False)
    assert busy.prompt is None
    busy = await keep_busy(user, info.id, clock, tick, 1800, answer_prompts=False)
    assert busy.prompt is not None and busy.prompt.reason is s.PromptReason.LONG_SESSION
    assert busy.prompt.asked_at == t0 + timedelta(hours=3)
    await user.client.report_activity(info.id, BUSY)  # activity does not answer it
    assert (await user.client.get_session(info.id)).prompt is not None

    clock.advance(120)
    await tick()
    idle = await user.client.get_session(info.id)
    assert idle.state is S.IDLE and idle.billed_s == 3 * 3600 + 120


async def test_keep_on_a_long_session_prompt_asks_again_three_hours_later(
    start_active, clock, tick
):
    user, _, info = await start_active(idle_timeout_s=3600)
    t0 = clock()
    asked = await keep_busy(user, info.id, clock, tick, 3 * 3600, answer_prompts=False)
    assert asked.prompt is not None
    kept = await user.client.answer_prompt(info.id, KEEP)
    assert kept.prompt is None
    again = await keep_busy(user, info.id, clock, tick, 3 * 3600, answer_prompts=False)
    assert again.prompt is not None and again.prompt.asked_at == t0 + timedelta(hours=6)


async def test_past_eight_hours_in_the_day_the_prompt_comes_every_hour(start_active, clock, tick):
    user, _, info = await start_active(idle_timeout_s=3600)
    t0 = clock()
    await keep_busy(user, info.id, clock, tick, 8 * 3600 - 1800)  # keeps at 3 h and 6 h
    busy = await keep_busy(user, info.id, clock, tick, 1800, answer_prompts=False)
    assert busy.fair_use_remaining_s == 0
    assert busy.prompt is not None and busy.prompt.reason is s.PromptReason.FAIR_USE
    assert busy.prompt.asked_at == t0 + timedelta(hours=8)
    assert any("every hour" in warning for warning in busy.warnings)
    await user.client.answer_prompt(info.id, KEEP)
    later = await keep_busy(user, info.id, clock, tick, 3600, answer_prompts=False)
    assert later.prompt is not None and later.prompt.asked_at == t0 + timedelta(hours=9)
